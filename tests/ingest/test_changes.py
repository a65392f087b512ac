"""plan_add: which files of a source are new, moved, duplicated or replaced, judged by content."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pytest

from crossrank.errors import InvalidArgumentError
from crossrank.ingest import SourceItem, file_sha256, plan_add


def _write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _indexed(rows: list[tuple[int, Path, bytes]], *, stale_stat: bool = False) -> pa.Table:
    """The index's view of files: id, path, sha256 of ``content``, and the file's size and mtime
    (as build records them) or, with ``stale_stat``, values no file has."""
    ids, paths, shas, sizes, mtimes = [], [], [], [], []
    for i, path, content in rows:
        ids.append(i)
        paths.append(str(path))
        shas.append(hashlib.sha256(content).hexdigest())
        st = os.stat(path) if path.exists() and not stale_stat else None
        sizes.append(st.st_size if st else -1)
        mtimes.append(int(st.st_mtime * 1e6) if st else 0)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "path": paths,
            "sha256": shas,
            "bytes": pa.array(sizes, pa.int64()),
            "mtime": pa.array(mtimes, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
        }
    )


def _items(root: Path) -> list[SourceItem]:
    return [SourceItem(path=p) for p in sorted(root.rglob("*.bin"))]


def test_unchanged_files_are_not_read_again(tmp_path):
    a = _write(tmp_path / "src" / "a.bin", b"A")
    b = _write(tmp_path / "src" / "b.bin", b"B")
    plan = plan_add(_items(tmp_path / "src"), _indexed([(0, a, b"A"), (1, b, b"B")]))
    assert (plan.unchanged, plan.new, plan.moved, plan.replaced, plan.duplicates) == (
        2,
        [],
        {},
        [],
        [],
    )
    assert plan.hashed == 0 and not plan.changes_index  # size and mtime matched: nothing hashed


def test_rehash_reads_every_file_and_agrees(tmp_path):
    a = _write(tmp_path / "src" / "a.bin", b"A")
    plan = plan_add(_items(tmp_path / "src"), _indexed([(0, a, b"A")]), rehash=True)
    assert (plan.unchanged, plan.hashed) == (1, 1)


def test_new_content_is_new_and_copies_within_the_source_count_once(tmp_path):
    a = _write(tmp_path / "src" / "a.bin", b"A")
    _write(tmp_path / "src" / "n1.bin", b"N")
    _write(tmp_path / "src" / "n2.bin", b"N")  # the same new content twice
    plan = plan_add(_items(tmp_path / "src"), _indexed([(0, a, b"A")]))
    assert [i.path.name for i in plan.new] == ["n1.bin"]
    assert [i.path.name for i in plan.duplicates] == ["n2.bin"]


def test_moved_file_keeps_its_id(tmp_path):
    old = tmp_path / "src" / "old.bin"
    indexed = _indexed([(7, _write(old, b"M"), b"M")])
    (tmp_path / "src" / "sub").mkdir()
    old.rename(tmp_path / "src" / "sub" / "new.bin")
    plan = plan_add(_items(tmp_path / "src"), indexed)
    assert plan.moved == {7: SourceItem(path=tmp_path / "src" / "sub" / "new.bin")}
    assert plan.new == [] and plan.replaced == [] and plan.changes_index


def test_swapped_files_swap_paths(tmp_path):
    a, b = _write(tmp_path / "src" / "a.bin", b"A"), _write(tmp_path / "src" / "b.bin", b"B")
    indexed = _indexed([(0, a, b"A"), (1, b, b"B")])
    a.write_bytes(b"B")
    b.write_bytes(b"A")
    for p in (
        a,
        b,
    ):  # same sizes: a new mtime is what says they changed (coarse clocks may not tick)
        os.utime(p, ns=(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns + 10**9))
    plan = plan_add(_items(tmp_path / "src"), indexed)
    assert {i: item.path.name for i, item in plan.moved.items()} == {0: "b.bin", 1: "a.bin"}
    assert plan.new == [] and plan.replaced == []


def test_copy_of_an_indexed_file_is_a_duplicate(tmp_path):
    a = _write(tmp_path / "src" / "a.bin", b"A")
    _write(tmp_path / "src" / "copy.bin", b"A")
    plan = plan_add(_items(tmp_path / "src"), _indexed([(0, a, b"A")]))
    assert [i.path.name for i in plan.duplicates] == ["copy.bin"] and not plan.changes_index


def test_copy_outside_the_source_is_found_by_reading_it(tmp_path):
    """The original sits outside the source: it is hashed to tell a copy from a move."""
    outside = _write(tmp_path / "elsewhere" / "a.bin", b"A")
    _write(tmp_path / "src" / "a.bin", b"A")
    indexed = _indexed([(0, outside, b"A")], stale_stat=True)  # forces reading the original
    assert [i.path.name for i in plan_add(_items(tmp_path / "src"), indexed).duplicates] == [
        "a.bin"
    ]
    outside.write_bytes(b"changed")
    assert plan_add(_items(tmp_path / "src"), indexed).moved == {
        0: SourceItem(path=tmp_path / "src" / "a.bin")
    }


def test_changed_content_is_new_and_replaces_the_old_image(tmp_path):
    a = _write(tmp_path / "src" / "a.bin", b"A")
    indexed = _indexed([(3, a, b"A")])
    a.write_bytes(b"A2")
    plan = plan_add(_items(tmp_path / "src"), indexed)
    assert [i.path.name for i in plan.new] == ["a.bin"] and plan.replaced == [3]


def test_files_gone_from_disk_are_not_removed_by_add(tmp_path):
    a = _write(tmp_path / "src" / "a.bin", b"A")
    gone = _write(tmp_path / "src" / "gone.bin", b"G")
    indexed = _indexed([(0, a, b"A"), (1, gone, b"G")])
    gone.unlink()
    plan = plan_add(_items(tmp_path / "src"), indexed)
    assert (plan.unchanged, plan.replaced, plan.moved) == (1, [], {})


def test_unreadable_file_goes_to_the_decoder(tmp_path):
    item = SourceItem(path=tmp_path / "src" / "missing.bin")
    plan = plan_add([item], _indexed([]))
    assert plan.new == [item]  # decoding it records "file not found"
    assert file_sha256(item.path) is None


def test_an_index_without_content_hashes_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"lacks the column\(s\) sha256 .*--overwrite"):
        plan_add([], pa.table({"id": [0], "path": ["x"], "bytes": [1], "mtime": [0]}))


def test_files_skipped_before_are_not_read_unless_retried(tmp_path):
    broken = _write(tmp_path / "src" / "broken.bin", b"X")
    item = SourceItem(path=broken)
    plan = plan_add([item], _indexed([]), skipped_before={str(broken)})
    assert (plan.new, plan.still_skipped, plan.hashed) == ([], [item], 0)
    retried = plan_add([item], _indexed([]), skipped_before={str(broken)}, retry_skipped=True)
    assert (retried.new, retried.still_skipped) == ([item], [])


def test_fifos_and_bad_names_are_skipped_by_the_plan_without_being_opened(tmp_path):
    (tmp_path / "src").mkdir()
    fifo = tmp_path / "src" / "pipe.bin"
    os.mkfifo(fifo)  # opening it to hash it would block forever
    bad = _write(tmp_path / "src" / os.fsdecode(b"\xff.bin"), b"B")
    plan = plan_add([SourceItem(path=fifo), SourceItem(path=bad)], _indexed([]))
    assert plan.new == []
    assert {(s.path, s.reason) for s in plan.skipped} == {
        (str(fifo), "not a regular file (FIFO)"),
        (str(tmp_path / "src") + "/\\xff.bin", "file name is not valid UTF-8"),
    }
    assert file_sha256(fifo) is None
