from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from crossrank.errors import SourceError
from crossrank.ingest import RESERVED_COLUMNS, SourceKind, discover

from ._images import BLUE, GREEN, RED, WHITE


@pytest.fixture
def photo_folder(tmp_path, solid):
    """Nested folders, mixed-case suffixes, hidden folders and files, non-image files."""
    for rel in [
        "photos/z.png",
        "photos/A.JPG",
        "photos/b.PnG",
        "photos/sub/deeper/c.TIFF",
        "photos/sub/d.Jpeg",
        "photos/sub/e.webp",
        "photos/f.GIF",
        "photos/g.bmp",
    ]:
        solid(rel, RED)
    for rel in [
        "photos/.git/objects/x.png",
        "photos/.cache/y.jpg",
        "photos/._z.jpg",
        "photos/sub/.hidden.png",
    ]:
        solid(rel, GREEN)
    (tmp_path / "photos/readme.txt").write_text("not an image")
    (tmp_path / "photos/data.csv").write_text("path\nz.png\n")
    (tmp_path / "photos/noext").write_bytes(b"")
    return tmp_path / "photos"


def test_folder_is_walked_recursively_sorted_skipping_hidden(photo_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = discover("photos")  # relative: made absolute
    assert source.kind == SourceKind.FOLDER == "folder"
    assert source.root == photo_folder
    assert source.extra_schema is None
    rel = [p.path.relative_to(photo_folder).as_posix() for p in source.items]
    assert rel == [
        "A.JPG",
        "b.PnG",
        "f.GIF",
        "g.bmp",
        "sub/d.Jpeg",
        "sub/deeper/c.TIFF",
        "sub/e.webp",
        "z.png",
    ]
    assert [str(i.path) for i in source.items] == sorted(str(i.path) for i in source.items)
    assert all(i.path.is_absolute() and i.extra == {} for i in source.items)
    assert len(source) == 8


def test_folder_order_does_not_depend_on_creation_order(tmp_path, solid):
    for name in ["c.png", "a.png", "b/a.png", "a.b.png", "B.png"]:
        solid(f"one/{name}", RED)
    for name in ["B.png", "a.b.png", "b/a.png", "a.png", "c.png"]:
        solid(f"two/{name}", RED)
    one = [p.path.relative_to(tmp_path / "one") for p in discover(tmp_path / "one").items]
    two = [p.path.relative_to(tmp_path / "two") for p in discover(tmp_path / "two").items]
    assert one == two
    assert [p.as_posix() for p in one] == ["B.png", "a.b.png", "a.png", "b/a.png", "c.png"]


def test_folder_with_symlinked_file_lists_the_link(tmp_path, solid):
    target = solid("elsewhere/t.png", RED)
    (tmp_path / "links").mkdir()
    os.symlink(target, tmp_path / "links/link.png")
    (items,) = [discover(tmp_path / "links").items]
    assert [i.path for i in items] == [tmp_path / "links/link.png"]


def test_csv_manifest_resolves_relative_paths_against_its_folder(tmp_path, solid, monkeypatch):
    a = solid("imgs/a.png", RED)
    b = solid("imgs/b.png", GREEN)
    c = solid("abs/c.png", BLUE)
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "m.csv").write_text(
        "path,caption,label,score\n"
        "../imgs/b.png,a green square,2,0.5\n"
        f"{c},a blue square,3,1.25\n"
        "../imgs/a.png,a red square,1,-2.0\n"
        "missing.png,gone,4,0.0\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not resolve against the cwd

    source = discover(meta / "m.csv")
    assert source.kind == SourceKind.MANIFEST
    assert source.root == meta / "m.csv"
    assert [i.path for i in source.items] == sorted([a, b, c, meta / "missing.png"], key=str)
    by_path = {i.path: i.extra for i in source.items}
    assert by_path[a] == {"caption": "a red square", "label": 1, "score": -2.0}
    assert by_path[b] == {"caption": "a green square", "label": 2, "score": 0.5}
    assert by_path[meta / "missing.png"]["caption"] == "gone"  # listed; skipped at decode time
    assert source.extra_schema == pa.schema(
        [("caption", pa.string()), ("label", pa.int64()), ("score", pa.float64())]
    )


def test_csv_manifest_keeps_numeric_looking_paths_as_text(tmp_path, write_image):
    write_image("0001", Image.new("RGB", (4, 4), RED), format="PNG")  # a manifest may name any file
    (tmp_path / "m.CSV").write_text("path\n0001\n")
    source = discover(tmp_path / "m.CSV")
    assert [i.path for i in source.items] == [tmp_path / "0001"]
    assert source.extra_schema == pa.schema([])
    assert source.items[0].extra == {}


def test_parquet_manifest_keeps_arrow_types(tmp_path, solid):
    solid("x/a.png", RED)
    solid("x/b.png", WHITE)
    when = [datetime(2024, 1, 2, 3, 4, 5), datetime(2023, 6, 7, 8, 9, 10)]
    table = pa.table(
        {
            "caption": pa.array(["white", "red"], pa.string()),
            "path": pa.array(["x/b.png", "x/a.png"], pa.large_string()),
            "rank": pa.array([7, 9], pa.int32()),
            "taken": pa.array(when, pa.timestamp("ms")),
            "tags": pa.array([["w"], ["r", "s"]], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    source = discover(tmp_path / "m.parquet")
    assert source.extra_schema == pa.schema(
        [
            ("caption", pa.string()),
            ("rank", pa.int32()),
            ("taken", pa.timestamp("ms")),
            ("tags", pa.list_(pa.string())),
        ]
    )
    assert [i.path.name for i in source.items] == ["a.png", "b.png"]  # sorted, extras travel along
    expected = {"caption": "red", "rank": 9, "taken": when[1], "tags": ["r", "s"]}
    assert source.items[0].extra == expected
    assert source.items[1].extra["rank"] == 7


def test_parquet_manifest_written_by_pandas_drops_the_index_column(tmp_path, solid):
    solid("a.png", RED)
    table = pa.table({"path": ["a.png"], "__index_level_0__": [5], "n": [1]})
    pq.write_table(table, tmp_path / "m.parquet")
    assert discover(tmp_path / "m.parquet").extra_schema.names == ["n"]


def test_missing_source_is_refused(tmp_path):
    with pytest.raises(SourceError, match=r"SOURCE .*nope does not exist; give a folder of images"):
        discover(tmp_path / "nope")


def test_folder_without_images_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty/readme.txt").write_text("hi")
    (tmp_path / "empty/.git").mkdir()
    (tmp_path / "empty/.git/x.png").write_bytes(b"png?")
    with pytest.raises(SourceError, match=r"no images found in .*empty \(looked recursively for"):
        discover(tmp_path / "empty")


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("photo.jpg", r"is an image file, not a folder or a manifest.*put a single image in"),
        ("notes.txt", r"is a file, not a folder or a manifest"),
    ],
)
def test_other_files_are_refused(tmp_path, name, match):
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(SourceError, match=match):
        discover(tmp_path / name)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("m.parquet", b"PAR1 not parquet at all", r"cannot read manifest .*m\.parquet as Parquet"),
        ("m.csv", b"path,caption\na.png,x,y\n", r"cannot read manifest .*m\.csv as CSV \(CSV"),
    ],
)
def test_unreadable_manifest_is_refused(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(SourceError, match=match):
        discover(tmp_path / name)


def test_manifest_without_path_column_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("file,caption\na.png,x\n")
    with pytest.raises(SourceError, match=r"has no `path` column \(columns: file, caption\)"):
        discover(tmp_path / "m.csv")


RESERVED_BUT_PATH = [c for c in RESERVED_COLUMNS if c != "path"]


@pytest.mark.parametrize("column", RESERVED_BUT_PATH + ["Width", "SHA256"])
def test_manifest_with_reserved_column_is_refused(tmp_path, column):
    (tmp_path / "m.csv").write_text(f"path,{column}\na.png,1\n")
    with pytest.raises(SourceError, match=rf"has a column '{column}', a name crossrank reserves"):
        discover(tmp_path / "m.csv")


def test_manifest_with_duplicate_column_names_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,caption,Caption\na.png,x,y\n")
    with pytest.raises(SourceError, match=r"has the column name 'Caption' twice"):
        discover(tmp_path / "m.csv")


def test_manifest_without_rows_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,caption\n")
    with pytest.raises(SourceError, match=r"has no rows"):
        discover(tmp_path / "m.csv")


def test_manifest_with_empty_path_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,n\na.png,1\n,2\n")
    with pytest.raises(SourceError, match=r"row 2 has an empty `path`"):
        discover(tmp_path / "m.csv")


def test_manifest_with_null_path_is_refused(tmp_path):
    pq.write_table(pa.table({"path": ["a.png", None]}), tmp_path / "m.parquet")
    with pytest.raises(SourceError, match=r"row 2 has an empty `path`"):
        discover(tmp_path / "m.parquet")


def test_manifest_listing_an_image_twice_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,caption\na.png,one\nsub/../a.png,two\n")
    with pytest.raises(SourceError, match=r"lists .*a\.png twice \(rows 1 and 2\)"):
        discover(tmp_path / "m.csv")


def test_manifest_with_non_text_paths_is_refused(tmp_path):
    pq.write_table(pa.table({"path": [1, 2]}), tmp_path / "m.parquet")
    with pytest.raises(SourceError, match=r"the `path` column must hold strings, got int64"):
        discover(tmp_path / "m.parquet")


def test_dictionary_encoded_paths_are_read(tmp_path, solid):
    solid("a.png", RED)
    paths = pa.array(["a.png"]).dictionary_encode()
    pq.write_table(pa.table({"path": paths}), tmp_path / "m.parquet")
    assert [i.path for i in discover(Path(tmp_path / "m.parquet")).items] == [tmp_path / "a.png"]
