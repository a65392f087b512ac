"""Hostile input when writing an index: FIFOs, bad file names, foreign folders, OS errors, Ctrl-C.

Each test names the item of the behaviour it pins: nothing hangs, nothing ends in a traceback,
nothing committed is lost and nothing crossrank did not write is deleted.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from crossrank import Index
from crossrank.errors import (
    IndexBusyError,
    IndexNotFoundError,
    IndexWriteError,
    InvalidArgumentError,
)
from crossrank.store import WriterLock, read_manifest
from crossrank.write import add_images, build_index, remove_images

from ..conftest import committed_state, write_images

BAD_NAME = os.fsdecode(b"\xff\xfe.png")  # a name that is not valid UTF-8 (surrogate-escaped)


@pytest.fixture()
def no_hang():
    """Fail instead of hanging forever (a FIFO opened for reading blocks until a writer comes)."""

    def on_alarm(signum, frame):
        raise TimeoutError("the call hung")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture()
def model_loads(monkeypatch) -> list[str]:
    """Every model load of an add, recorded (the loader itself still runs)."""
    import crossrank.encoders as encoders

    calls: list[str] = []
    real = encoders.load_encoder

    def counting(model, **kwargs):
        calls.append(str(model))
        return real(model, **kwargs)

    monkeypatch.setattr(encoders, "load_encoder", counting)
    return calls


def _add(source: Path, index_dir: Path, **kwargs):
    return add_images(source, index_dir, device="cpu", workers=1, batch_size=4, **kwargs)


def _skipped(index_dir: Path) -> dict[str, str]:
    with Index.open(index_dir, device="cpu") as index:
        return {r["path"]: r["reason"] for r in index.skipped().to_pylist()}


def _lock_is_free(index_dir: Path) -> bool:
    with WriterLock(index_dir, create=False):
        return True


def _no_leftovers(index_dir: Path) -> bool:
    return not [p.name for p in index_dir.iterdir() if p.name.startswith((".gen-", ".trash-"))]


# -- 5: add with nothing new does not load the model; --retry-skipped ---------------------------


def test_add_with_nothing_new_loads_no_model_and_skipped_files_wait_for_retry(living, model_loads):
    source, index_dir = living
    broken = source / "broken.png"
    broken.write_bytes(b"not an image")
    first = _add(source, index_dir)
    assert (first.committed, first.added, first.skipped) == (True, 0, 1)
    assert model_loads  # there was a file to decode

    model_loads.clear()
    before = committed_state(index_dir)
    again = _add(source, index_dir)
    assert (again.committed, again.added, again.still_skipped) == (False, 0, 1)
    assert model_loads == []  # nothing to encode: no model
    assert committed_state(index_dir) == before

    retried = _add(source, index_dir, retry_skipped=True)  # still broken: tried, same reason
    assert (retried.committed, retried.skipped, retried.still_skipped) == (False, 1, 0)
    assert model_loads

    shutil.copy(write_images(source.parent / "fix", 1, seed=90)[0], broken)  # fixed
    assert _add(source, index_dir).still_skipped == 1  # not tried without the flag
    fixed = _add(source, index_dir, retry_skipped=True)
    assert (fixed.committed, fixed.added, fixed.skipped) == (True, 1, 0)
    assert str(broken) not in _skipped(index_dir)


def test_a_move_alone_commits_without_loading_the_model(living, model_loads):
    source, index_dir = living
    first = sorted(source.glob("*.png"))[0]
    first.rename(source / "moved.png")
    report = _add(source, index_dir)
    assert (report.committed, report.moved, report.added) == (True, 1, 0)
    assert model_loads == []


# -- 8: FIFOs and other non-regular files; Ctrl-C -----------------------------------------------


def test_add_and_build_skip_a_fifo_and_a_link_to_it_without_opening_them(
    living, tmp_path, tiny_clip, no_hang
):
    source, index_dir = living
    fifo = source / "pipe.png"
    os.mkfifo(fifo)
    (source / "link.png").symlink_to(fifo)
    write_images(source / "new", 1, seed=91)
    report = _add(source, index_dir)
    assert (report.committed, report.added, report.skipped) == (True, 1, 2)
    skipped = _skipped(index_dir)
    assert skipped[str(fifo)] == "not a regular file (FIFO)"
    assert skipped[str(source / "link.png")] == "not a regular file (FIFO)"
    assert _lock_is_free(index_dir)
    assert _add(source, index_dir).committed is False  # the same files stay skipped

    built = build_index(source, tmp_path / "b.idx", model=tiny_clip, device="cpu", workers=2)
    assert built.skipped == 2
    assert _skipped(tmp_path / "b.idx")[str(fifo)] == "not a regular file (FIFO)"


@pytest.mark.parametrize("phase", ["hashing", "indexing"])
def test_ctrl_c_during_add_keeps_the_index_and_releases_the_lock(living, phase):
    source, index_dir = living
    write_images(source / "new", 3, seed=92)
    before = committed_state(index_dir)

    def interrupt(p: str, done: int, total: int) -> None:
        if p == phase:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _add(source, index_dir, progress=interrupt)
    assert committed_state(index_dir) == before
    assert _lock_is_free(index_dir) and _no_leftovers(index_dir)
    assert _add(source, index_dir).added == 3  # running it again does the whole job


def test_ctrl_c_during_a_first_build_leaves_no_folder(tmp_path, tiny_clip):
    source = tmp_path / "photos"
    write_images(source, 4, seed=93)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_index(source, tmp_path / "new.idx", model=tiny_clip, device="cpu", progress=interrupt)
    assert not (tmp_path / "new.idx").exists()


# -- 9: file names that are not valid UTF-8 -----------------------------------------------------


def test_a_name_that_is_not_utf8_is_skipped_and_the_rest_committed(tmp_path, tiny_clip):
    source = tmp_path / "photos"
    good = write_images(source, 3, seed=94)
    bad = source / BAD_NAME
    shutil.copy(write_images(tmp_path / "other", 1, seed=95)[0], bad)
    report = build_index(source, tmp_path / "p.idx", model=tiny_clip, device="cpu", workers=2)
    assert (report.indexed, report.skipped) == (3, 1)
    shown = str(source) + "/\\xff\\xfe.png"  # the bad bytes written out, valid UTF-8
    assert _skipped(tmp_path / "p.idx") == {shown: "file name is not valid UTF-8"}

    # It round-trips: add neither re-adds it nor fails on it, with or without --retry-skipped.
    assert _add(source, tmp_path / "p.idx").committed is False
    assert _add(source, tmp_path / "p.idx", retry_skipped=True).committed is False

    # A bad name that appears later is skipped by add, and the other new files are added.
    os.rename(bad, source / os.fsdecode(b"b\xe9.png"))
    write_images(source / "new", 1, seed=96)
    added = _add(source, tmp_path / "p.idx")
    assert (added.committed, added.added, added.skipped) == (True, 1, 1)
    assert _skipped(tmp_path / "p.idx")[str(source) + "/b\\xe9.png"] == (
        "file name is not valid UTF-8"
    )
    with Index.open(tmp_path / "p.idx", device="cpu") as index:
        assert len(index) == 4
        assert set(index.metadata(columns=["path"]).column("path").to_pylist()) >= {
            str(p) for p in good
        }


# -- 12: never write into, or delete from, a folder that is not an index ------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_build_refuses_a_folder_that_is_not_an_index(tmp_path, image_folder, tiny_clip, overwrite):
    target = tmp_path / "mine"
    (target / "gen-000005").mkdir(parents=True)
    (target / "gen-000005" / "thesis.txt").write_text("years of work")
    with pytest.raises(InvalidArgumentError, match=r"not a crossrank index.*empty or new folder"):
        build_index(image_folder, target, model=tiny_clip, device="cpu", overwrite=overwrite)
    assert (target / "gen-000005" / "thesis.txt").read_text() == "years of work"
    assert sorted(p.name for p in target.iterdir()) == ["gen-000005"]  # no lock file left either


def test_build_into_an_empty_folder_works(tmp_path, image_folder, tiny_clip):
    (tmp_path / "empty").mkdir()
    report = build_index(image_folder, tmp_path / "empty", model=tiny_clip, device="cpu")
    assert report.indexed > 0


def test_garbage_collection_leaves_folders_crossrank_did_not_write(index_only):
    _, index_dir = index_only
    (index_dir / "gen-000099").mkdir()
    (index_dir / "gen-000099" / "keep.txt").write_text("mine")
    (index_dir / ".trash-notes").mkdir()
    (index_dir / ".trash-notes" / "keep.txt").write_text("mine too")
    with Index.open(index_dir, device="cpu") as index:
        some = int(index.metadata(columns=["id"]).column("id")[0].as_py())
    remove_images(index_dir, ids=[some])  # commits, then collects garbage
    assert (index_dir / "gen-000099" / "keep.txt").read_text() == "mine"
    assert (index_dir / ".trash-notes" / "keep.txt").read_text() == "mine too"


# -- 14: operating-system errors are one line, and lose nothing ---------------------------------


def _fail_writes(monkeypatch, error: OSError) -> None:
    from crossrank.store import _files

    def refuse(self, rows):
        raise error

    monkeypatch.setattr(_files.NpyAppender, "append", refuse)


def test_disk_full_during_add_is_one_error_and_loses_nothing(living, monkeypatch):
    source, index_dir = living
    write_images(source / "new", 2, seed=97)
    before = committed_state(index_dir)
    _fail_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "vectors.npy"))
    with pytest.raises(
        IndexWriteError, match=r"No space left on device.*free some disk space"
    ) as e:
        _add(source, index_dir)
    assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC
    assert "\n" not in str(e.value)
    assert committed_state(index_dir) == before
    assert _lock_is_free(index_dir) and _no_leftovers(index_dir)
    monkeypatch.undo()
    assert _add(source, index_dir).added == 2


def test_disk_full_during_a_first_build_leaves_no_folder(
    tmp_path, image_folder, tiny_clip, monkeypatch
):
    _fail_writes(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(IndexWriteError, match="No space left on device"):
        build_index(image_folder, tmp_path / "new.idx", model=tiny_clip, device="cpu")
    assert not (tmp_path / "new.idx").exists()


def test_permission_denied_is_one_error_and_loses_nothing(living, monkeypatch):
    source, index_dir = living
    write_images(source / "new", 1, seed=98)
    before = committed_state(index_dir)
    _fail_writes(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "ids.npy"))
    with pytest.raises(IndexWriteError, match=r"Permission denied.*make the folder writable"):
        _add(source, index_dir)
    with pytest.raises(IndexWriteError, match="Permission denied"):
        remove_images(index_dir, ids=[0])
    assert committed_state(index_dir) == before
    assert _lock_is_free(index_dir) and _no_leftovers(index_dir)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_index_folder_is_one_error(living):
    source, index_dir = living
    write_images(source / "new", 1, seed=99)
    before = committed_state(index_dir)
    index_dir.chmod(0o555)
    try:
        with pytest.raises(IndexWriteError, match="Permission denied"):
            _add(source, index_dir)
    finally:
        index_dir.chmod(0o755)
    assert committed_state(index_dir) == before


def test_an_index_path_under_a_file_is_one_error(tmp_path, image_folder, tiny_clip):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InvalidArgumentError, match=r"lies under .*notes\.txt, which is a file"):
        build_index(image_folder, tmp_path / "notes.txt" / "idx", model=tiny_clip, device="cpu")
    assert (tmp_path / "notes.txt").read_text() == "x"


# -- 18: factory checked first; a build in progress; duplicates; huge ids ---------------------


def test_a_bad_factory_is_refused_before_the_model_loads(tmp_path, image_folder, monkeypatch):
    import crossrank.encoders as encoders

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(encoders, "load_encoder", no_load)
    with pytest.raises(InvalidArgumentError, match=r"--factory: bad FAISS factory string 'IVFx"):
        build_index(image_folder, tmp_path / "f.idx", factory="IVFx,Flat", device="cpu")
    assert not (tmp_path / "f.idx").exists()


def test_a_factory_wrong_for_the_model_is_refused_before_decoding(
    tmp_path, image_folder, tiny_clip, tiny_encoder, monkeypatch
):
    import crossrank.ingest as ingest

    m = next(m for m in (7, 5, 9, 11) if tiny_encoder.dim % m and 5040 % m == 0)

    def no_decode(*args, **kwargs):
        raise AssertionError("images were decoded")

    monkeypatch.setattr(ingest, "iter_batches", no_decode)
    with pytest.raises(InvalidArgumentError, match=rf"--factory: .*for {tiny_encoder.dim}-d"):
        build_index(image_folder, tmp_path / "f.idx", model=tiny_clip, factory=f"PQ{m}")


def test_a_first_build_in_progress_is_named(tmp_path):
    target = tmp_path / "being-built.idx"
    with WriterLock(target, command="crossrank build photos --index being-built.idx"):
        with pytest.raises(IndexBusyError, match=rf"being built by pid {os.getpid()} \(started"):
            read_manifest(target)
        with pytest.raises(IndexNotFoundError, match="wait for it to finish"):
            Index.open(target, device="cpu")
    with pytest.raises(IndexNotFoundError, match="no committed index"):
        read_manifest(target)


def test_build_skips_byte_identical_copies_as_add_does(tmp_path, tiny_clip):
    source = tmp_path / "photos"
    a, b = write_images(source, 2, seed=100)
    copy = source / "z-copy.png"
    shutil.copy(a, copy)
    report = build_index(source, tmp_path / "d.idx", model=tiny_clip, device="cpu")
    assert (report.indexed, report.skipped, report.duplicates) == (2, 1, 1)
    assert _skipped(tmp_path / "d.idx") == {str(copy): f"duplicate of {a}"}
    assert _add(source, tmp_path / "d.idx").committed is False  # add judges the copy the same

    a.unlink()  # the original is gone: the copy takes over its id, as add does for a move
    moved = _add(source, tmp_path / "d.idx")
    assert (moved.moved, moved.added) == (1, 0)
    assert _skipped(tmp_path / "d.idx") == {}


@pytest.mark.parametrize("bad", [99999999999999999999999, -(2**63) - 1])
def test_an_id_beyond_int64_is_named_with_the_range(index_only, bad):
    _, index_dir = index_only
    before = committed_state(index_dir)
    with pytest.raises(InvalidArgumentError, match=rf"id {bad} is out of range.*int64"):
        remove_images(index_dir, ids=[1, bad])
    with pytest.raises(InvalidArgumentError, match="ids must be integers, got 'x'"):
        remove_images(index_dir, ids=["x"])
    with pytest.raises(InvalidArgumentError, match="1-d array of integers"):
        remove_images(index_dir, ids=np.array([1.5]))
    assert committed_state(index_dir) == before
