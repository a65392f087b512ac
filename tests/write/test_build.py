"""Building through the API: reports, skipped files, manifests, and failures that change nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from crossrank import Index, InvalidArgumentError, ModelError, SourceError
from crossrank.write.build import build_index

from ..conftest import committed_state, write_images


def _odd_folder(root: Path) -> tuple[list[Path], dict[str, Path]]:
    """Four good images and one of each file a build must skip without failing."""
    good = write_images(root, 4, seed=3)
    data = good[0].read_bytes()
    bad = {
        "truncated": root / "truncated.png",
        "zero": root / "zero.png",
        "text": root / "notes.png",
    }
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is a text file with a .png name\n")
    return good, bad


@pytest.fixture(scope="module")
def odd_build(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path):
    good, bad = _odd_folder(tmp_path_factory.mktemp("odd"))
    calls: list[tuple[int, int]] = []
    index = Index.build(
        good[0].parent,
        tmp_path_factory.mktemp("odd-idx") / "odd.idx",
        model=tiny_clip,
        device="cpu",
        batch_size=2,
        workers=2,
        progress=lambda d, t: calls.append((d, t)),
    )
    return index, good, bad, calls


def test_build_report_counts_indexed_and_skipped(odd_build, tiny_clip):
    index, good, bad, _ = odd_build
    report = index.build_report
    assert (report.indexed, report.skipped, report.generation) == (4, 3, 1)
    assert report.factory == "Flat" and report.model == index.model_id
    assert report.to_dict()["images_per_second"] > 0
    assert len(index) == 4
    assert sorted(index.metadata(columns=["path"])["path"].to_pylist()) == sorted(
        str(p) for p in good
    )


def test_progress_reaches_every_file(odd_build):
    *_, calls = odd_build
    assert calls and calls[-1] == (7, 7)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_each_skipped_file_is_listed_with_a_reason(odd_build):
    index, _, bad, _ = odd_build
    rows = {row["path"]: row["reason"] for row in index.skipped().to_pylist()}
    assert set(rows) == {str(p) for p in bad.values()}
    assert all(reason.strip() for reason in rows.values())
    assert (
        rows[str(bad["zero"])] != rows[str(bad["text"])]
    )  # a reason says what is wrong with that file
    assert index.info()["counts"] == {"images": 4, "skipped": 3}


@pytest.fixture(scope="module")
def manifest_index(
    tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path
) -> tuple[Path, list[Path], Path]:
    """A .csv manifest with relative paths and extra columns, built from another directory."""
    root = tmp_path_factory.mktemp("manifest")
    images = write_images(root / "pics", 6, seed=4)
    manifest = root / "photos.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "path", "rating"])
        for i, p in enumerate(images):
            writer.writerow(["cat" if i % 2 == 0 else "dog", f"pics/{p.name}", i * 10])
    elsewhere = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(elsewhere)  # relative paths resolve against the manifest's folder, not the cwd
        path = elsewhere / "m.idx"
        build_index(manifest, path, model=tiny_clip, device="cpu", batch_size=4, workers=1)
    return path, images, manifest


def test_manifest_columns_become_metadata(manifest_index):
    path, images, _ = manifest_index
    index = Index.open(path, device="cpu")
    assert index.info()["metadata_columns"][-2:] == ["label", "rating"]
    table = index.metadata(columns=["path", "label", "rating"])
    rows = {r["path"]: (r["label"], r["rating"]) for r in table.to_pylist()}
    assert rows == {str(p): ("cat" if i % 2 == 0 else "dog", i * 10) for i, p in enumerate(images)}


def test_manifest_columns_are_filterable_and_reach_hits(manifest_index):
    path, images, _ = manifest_index
    index = Index.open(path, device="cpu")
    result = index.search("a red circle", k=6, where="label = 'dog' AND rating >= 30")
    assert sorted(h.path for h in result) == [str(images[3]), str(images[5])]
    assert {(h.metadata["label"], h.metadata["rating"]) for h in result} == {
        ("dog", 30),
        ("dog", 50),
    }
    assert result.counts.filtered_out == 4


# -- failures: a clear error, and nothing committed changes --------------------------------------


def _manifest_without_path(tmp: Path) -> Path:
    p = tmp / "nopath.csv"
    p.write_text("file,label\nimg_000.png,cat\n")
    return p


def _unreadable_manifest(tmp: Path) -> Path:
    p = tmp / "broken.parquet"
    p.write_bytes(b"PAR1 but not really a parquet file")
    return p


def _undecodable_folder(tmp: Path) -> Path:
    (tmp / "bad").mkdir()
    (tmp / "bad" / "a.png").write_bytes(b"not a png")
    (tmp / "bad" / "b.jpg").write_bytes(b"")
    return tmp / "bad"


@pytest.mark.parametrize(
    ("make_source", "error", "match"),
    [
        (lambda tmp: tmp / "missing", SourceError, r"SOURCE .*missing does not exist"),
        (_unreadable_manifest, SourceError, r"cannot read manifest .*broken\.parquet as Parquet"),
        (_manifest_without_path, SourceError, r"has no `path` column \(columns: file, label\)"),
        (_undecodable_folder, SourceError, r"none of the 2 files .* could be decoded"),
    ],
    ids=["missing-source", "unreadable-manifest", "manifest-without-path", "nothing-decodable"],
)
def test_failed_rebuild_leaves_the_committed_index_alone(
    index_copy, tmp_path, tiny_clip, make_source, error, match
):
    before = committed_state(index_copy)
    with pytest.raises(error, match=match):
        build_index(
            make_source(tmp_path), index_copy, model=tiny_clip, device="cpu", overwrite=True
        )
    assert committed_state(index_copy) == before  # no new generation, no temporary folder left
    assert len(Index.open(index_copy, device="cpu")) == 24


def test_existing_index_needs_overwrite(index_copy, image_folder, tiny_clip):
    before = committed_state(index_copy)
    with pytest.raises(
        InvalidArgumentError, match=r"already holds an index \(24 images\); pass --overwrite"
    ):
        build_index(image_folder, index_copy, model=tiny_clip, device="cpu")
    assert committed_state(index_copy) == before


def test_missing_model_is_a_model_error(index_copy, image_folder, tmp_path):
    before = committed_state(index_copy)
    with pytest.raises(ModelError, match="no-such-model"):
        build_index(
            image_folder, index_copy, model=tmp_path / "no-such-model", device="cpu", overwrite=True
        )
    assert committed_state(index_copy) == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"workers": 0}, "workers must be an int >= 1, got 0"),
    ],
)
def test_bad_build_arguments(tmp_path, image_folder, tiny_clip, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        build_index(image_folder, tmp_path / "x.idx", model=tiny_clip, device="cpu", **kwargs)
    assert not (tmp_path / "x.idx").exists()


def test_overwrite_commits_a_new_generation_beside_open_readers(index_copy, tmp_path, tiny_clip):
    reader = Index.open(index_copy, device="cpu")
    write_images(tmp_path / "few", 3, seed=9)
    report = build_index(
        tmp_path / "few", index_copy, model=tiny_clip, device="cpu", overwrite=True
    )
    assert (report.generation, report.indexed) == (2, 3)
    assert len(Index.open(index_copy, device="cpu")) == 3
    # The reader opened before the rebuild keeps searching the generation it opened.
    assert len(reader) == 24 and len(reader.search("a red circle", k=24, reranker=None)) == 24


def test_an_empty_factory_string_is_a_clear_error(image_folder, tiny_clip, tmp_path):
    from crossrank.errors import InvalidArgumentError
    from crossrank.write.build import build_index

    with pytest.raises(
        InvalidArgumentError, match="factory must be a non-empty FAISS factory string"
    ):
        build_index(image_folder, tmp_path / "idx", model=tiny_clip, device="cpu", factory="")
    assert not (tmp_path / "idx" / "manifest.json").exists()
