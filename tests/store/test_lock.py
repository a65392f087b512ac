"""The writer lock: one writer at a time, the holder named, released by any death."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from crossrank.errors import IndexLockedError, InvalidArgumentError
from crossrank.store import WriterLock, read_lock_holder

_HOLD = """
import sys, time
from crossrank.store import WriterLock
lock = WriterLock(sys.argv[1], command="crossrank add photos --index idx").acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture()
def holder(tmp_path: Path):
    """Another process holding the lock of ``tmp_path / "idx"``; killed with SIGKILL at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "idx")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_process_is_refused_with_the_holder_named(tmp_path, holder):
    with pytest.raises(IndexLockedError) as caught:
        WriterLock(tmp_path / "idx").acquire()
    message = str(caught.value)
    assert f"pid {holder.pid} on " in message
    assert "running `crossrank add photos --index idx`, since 20" in message
    assert "one writer at a time" in message and "\n" not in message


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (
        read_lock_holder(tmp_path / "idx")["pid"] == holder.pid
    )  # its body stays; its lock does not
    with WriterLock(tmp_path / "idx", command="me") as lock:
        assert lock.held and read_lock_holder(tmp_path / "idx")["command"] == "me"


def test_a_second_writer_in_the_same_process_is_refused(tmp_path):
    with WriterLock(tmp_path / "idx", command="first"):
        with pytest.raises(
            IndexLockedError, match=r"another writer of this process \(thread MainThread, since"
        ):
            WriterLock(tmp_path / "idx").acquire()
    assert WriterLock(tmp_path / "idx").acquire().held  # released by leaving the block


def test_release_keeps_the_file_and_empties_its_body(tmp_path):
    lock = WriterLock(tmp_path / "idx", command="x").acquire()
    body = json.loads((tmp_path / "idx" / "writer.lock").read_text())
    assert set(body) == {"pid", "host", "command", "since", "thread"} and body["pid"] == os.getpid()
    lock.release()
    lock.release()  # idempotent
    assert (tmp_path / "idx" / "writer.lock").read_text() == "" and read_lock_holder(
        tmp_path / "idx"
    ) is None


def test_a_fresh_directory_made_for_a_failed_build_is_removed(tmp_path):
    lock = WriterLock(tmp_path / "new" / "idx").acquire()
    assert lock.created_root
    lock.remove_root_if_unused()
    lock.release()
    assert not (tmp_path / "new" / "idx").exists()


def test_a_file_is_not_an_index_directory(tmp_path):
    (tmp_path / "idx").write_text("x")
    with pytest.raises(InvalidArgumentError, match="exists and is not a directory"):
        WriterLock(tmp_path / "idx").acquire()
