from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from crossrank.errors import IndexCorruptError, IndexNotFoundError
from crossrank.store import (
    FORMAT_VERSION,
    Generation,
    list_generations,
    list_tmp_dirs,
    pin_current,
    read_manifest,
)


def test_commit_round_trip(written) -> None:
    manifest = read_manifest(written.root)
    assert (
        manifest.format_version == 1 < FORMAT_VERSION
    )  # no tombstones: readable by older crossranks
    assert manifest.generation == written.generation == 1
    assert manifest.generation_dir == "gen-000001"
    assert manifest.generation_path == written.root / "gen-000001"
    assert manifest.encoder == {"model_id": "tiny", "dim": 5}
    assert manifest.first_stage == {"factory": "Flat"}
    assert manifest.counts == {"images": 23, "skipped": 2}
    assert manifest.extra == {"note": "x"}
    assert manifest.created_at == manifest.updated_at
    assert manifest.first_stage_path.read_bytes() == b"faiss-placeholder-0"

    gen = Generation(manifest.generation_path)
    assert len(gen) == 23
    np.testing.assert_array_equal(gen.vectors(), written.vectors)
    np.testing.assert_array_equal(gen.ids(), written.ids)
    np.testing.assert_array_equal(gen.rows_of_ids(written.ids[[5, 0, 22]]), [5, 0, 22])
    assert isinstance(gen.vectors(), np.memmap)


def test_second_commit_switches_manifest_and_keeps_the_generation_a_reader_holds(
    tmp_path: Path, make_generation
) -> None:
    root = tmp_path / "idx"
    make_generation(root, seed=0)
    first, pin = pin_current(root)
    second = make_generation(root, n=11, seed=1)
    manifest = read_manifest(root)
    assert second.generation == manifest.generation == 2
    assert manifest.created_at == first.created_at
    assert manifest.counts["images"] == 11
    np.testing.assert_array_equal(Generation.current(root).ids(), second.ids)
    gens = list_generations(root)
    assert [(g.number, g.current) for g in gens] == [(1, False), (2, True)]
    assert len(Generation.open(gens[0].path)) == 23  # the previous generation still opens
    assert list_tmp_dirs(root) == []
    pin.release()
    make_generation(root, n=5, seed=2)  # the next commit collects it: no reader holds it now
    assert [(g.number, g.current) for g in list_generations(root)] == [(3, True)]


@pytest.mark.parametrize("layout", ["missing", "empty", "tmp_only"])
def test_dir_without_manifest_is_not_an_index(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "idx"
    if layout != "missing":
        root.mkdir()
    if layout == "tmp_only":
        (root / ".gen-000001.tmp-123").mkdir()
        (root / ".gen-000001.tmp-123" / "vectors.npy").write_bytes(b"partial")
    expected = (
        f"no committed index in {root}; build one with `crossrank build SOURCE --index {root}`"
    )
    with pytest.raises(IndexNotFoundError, match=f"^{expected}$".replace("(", r"\(")):
        read_manifest(root)
    with pytest.raises(IndexNotFoundError, match="no committed index in"):
        Generation.current(root)


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (
            "file",
            r"^{root} is a file, not an index folder; give the folder an index was built into",
        ),
        (
            "foreign",
            r"^no committed index in {root}: it is a folder of other files, not a crossrank index; "
            r"give the folder an index was built into, or build one into a new folder",
        ),
        (
            "a-gen-folder-of-theirs",
            r"^no committed index in {root}: it is a folder of other files, not a crossrank index; "
            r"give the folder an index was built into, or build one into a new folder",
        ),
    ],
)
def test_no_index_error_never_suggests_building_where_a_build_refuses(
    tmp_path: Path, layout: str, expected: str
) -> None:
    # A build refuses a file and a non-empty folder that is not an index; the hint must not
    # send the user there (e.g. `crossrank search photos/ "a cat"`, the image folder by mistake).
    root = tmp_path / "photos"
    if layout == "file":
        root.write_bytes(b"not an index")
    elif layout == "foreign":
        root.mkdir()
        (root / "cat.jpg").write_bytes(b"jpeg")
        (root / "writer.lock.bak").write_bytes(b"")
    else:  # named like a generation, with no manifest and no lock: a build refuses it too
        (root / "gen-000005").mkdir(parents=True)
    with pytest.raises(IndexNotFoundError, match=expected.format(root=re.escape(str(root)))) as e:
        read_manifest(root)
    assert f"--index {root}`" not in str(e.value)


def _rewrite(root: Path, **changes: object) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_newer_format_version_says_upgrade(written) -> None:
    _rewrite(written.root, format_version=FORMAT_VERSION + 1)
    with pytest.raises(IndexCorruptError, match=r"newer crossrank: upgrade crossrank"):
        read_manifest(written.root)


def test_unreadable_manifest_is_corrupt(written) -> None:
    (written.root / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match=r"manifest.json cannot be read .*JSONDecodeError"):
        read_manifest(written.root)


def test_manifest_naming_missing_generation_is_corrupt(written) -> None:
    _rewrite(written.root, generation=7, generation_dir="gen-000007")
    with pytest.raises(IndexCorruptError, match="generation folder gen-000007, which is missing"):
        read_manifest(written.root)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"generation_dir": "../elsewhere"}, "expected a name like 'gen-000001'"),
        ({"generation": 2}, "names generation 2 but generation_dir 'gen-000001'"),
        ({"counts": [1]}, "has counts \\[1\\], expected a JSON object"),
        ({"format_version": "1"}, "format_version '1', expected an integer"),
    ],
)
def test_malformed_manifest_fields_are_corrupt(written, changes: dict, message: str) -> None:
    _rewrite(written.root, **changes)
    with pytest.raises(IndexCorruptError, match=message):
        read_manifest(written.root)
