"""The writer lock: one process at a time builds, adds to, removes from or compacts an index.

``DIR/writer.lock`` is locked with ``fcntl.flock(LOCK_EX | LOCK_NB)``. The kernel drops a flock
when its process dies, however it dies, so ``kill -9`` never leaves a stale lock behind and there
is no lock-breaking logic to get wrong. While held, the file holds a JSON body naming the holder
(pid, host, command, since) for the error a second writer gets.

The file is never deleted while an index exists: deleting a lock file lets two processes lock two
different inodes under the same name. The one exception, a first build that fails and leaves no
index behind, deletes it while still holding the lock, and :meth:`WriterLock.acquire` re-checks
after locking that the name still refers to the inode it locked.

Readers never take this lock; they pin the generation they read (:mod:`crossrank.store.pins`).
flock needs a local POSIX file system (Linux, macOS); on NFS it may not be enforced.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from crossrank.errors import CrossrankError, DependencyError, IndexLockedError, InvalidArgumentError
from crossrank.store.layout import LOCK_NAME, MANIFEST_NAME, READERS_DIR

__all__ = ["LOCK_NAME", "WriterLock", "read_lock_holder", "live_lock_holder", "default_command"]

logger = logging.getLogger(__name__)


def default_command() -> str:
    """The command line of this process, for the lock's body (``crossrank add photos ...``)."""
    argv = list(sys.argv) or ["python"]
    name = Path(argv[0]).name
    if name in ("__main__.py", "-c", ""):
        name = "python"
    return shlex.join([name, *argv[1:]])


def _fcntl() -> Any:
    try:
        import fcntl
    except ImportError as e:  # Windows
        raise DependencyError(
            "writing a crossrank index needs POSIX file locks (fcntl): "
            "build, add, remove and compact run on Linux or macOS"
        ) from e
    return fcntl


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def read_lock_holder(root: Path | str) -> dict[str, Any] | None:
    """The JSON body of ``DIR/writer.lock``: who holds (or last held) the lock; None if empty.

    The body is only meaningful while the lock is held: a holder that was killed leaves its body
    behind (the lock itself is released by the kernel).
    """
    try:
        text = (Path(root) / LOCK_NAME).read_text(encoding="utf-8")
        data = json.loads(text) if text.strip() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by another user
    except (OSError, OverflowError, ValueError):
        return False
    return True


def live_lock_holder(root: Path | str) -> dict[str, Any] | None:
    """The holder of ``DIR/writer.lock`` when it looks alive: a body naming a running process.

    Read without taking the lock (a reader that took it, even for a moment, could make a real
    writer fail). A holder on another host, or whose process is gone (killed: the kernel released
    its lock but its body stays), is None. Used to say "being built by pid N" instead of "no
    index" while a first build runs.
    """
    holder = read_lock_holder(root)
    if not holder:
        return None
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return None
    if holder.get("host") not in (None, socket.gethostname()):
        return None
    return holder if _pid_alive(pid) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    parts = [f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"]
    if holder.get("command"):
        parts.append(f"running `{holder['command']}`")
    if holder.get("since"):
        parts.append(f"since {holder['since']}")
    return ", ".join(parts)


class WriterLock:
    """The exclusive writer lock of an index directory; a context manager.

    Args:
        root: the index directory; created (with parents) when ``create`` is true.
        command: what the holder is doing, shown to a second writer (default: this process's
            command line).
        create: create ``root`` if it does not exist (a first build); otherwise a missing
            directory is :class:`IndexNotFoundError`-worthy and the caller checks first.

    Raises:
        InvalidArgumentError: ``root`` exists and is not a directory.

    Example:
        >>> with WriterLock("photos.idx", command="crossrank add photos") as lock:  # doctest: +SKIP
        ...     ...  # write and commit a generation; a second writer gets IndexLockedError
    """

    def __init__(
        self, root: Path | str, *, command: str | None = None, create: bool = True
    ) -> None:
        self.root = Path(root)
        self.command = command if command is not None else default_command()
        self.create = create
        self.created_root = False  # whether acquire() made the directory
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        """``root / "writer.lock"``."""
        return self.root / LOCK_NAME

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> WriterLock:
        """Take the lock, or fail at once naming its holder.

        Returns:
            ``self``.

        Raises:
            IndexLockedError: another process (or another writer of this process) holds it.
            InvalidArgumentError: ``root`` is not a directory.
        """
        fcntl = _fcntl()
        if self._fd is not None:
            raise CrossrankError(f"the writer lock of {self.root} is already held by this object")
        if self.root.exists() and not self.root.is_dir():
            raise InvalidArgumentError(
                f"index path {self.root} exists and is not a directory; pass a directory"
            )
        if self.create and not self.root.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            self.created_root = True
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise IndexLockedError(self._locked_message()) from None
            except BaseException:
                os.close(fd)
                raise
            # The name may have been unlinked (a failed first build) between open() and flock():
            # then this lock guards nothing; open the name again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:  # pragma: no cover - needs a lock file deleted ten times in a row
            raise IndexLockedError(f"the writer lock {self.path} keeps disappearing; retry")
        body = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": _now(),
            "thread": threading.current_thread().name,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(body) + "\n").encode(), 0)
        self._fd = fd
        logger.debug("writer lock %s taken by pid %d", self.path, os.getpid())
        return self

    def _locked_message(self) -> str:
        holder = None
        for _ in range(20):  # the holder writes its body right after locking
            holder = read_lock_holder(self.root)
            if holder:
                break
            time.sleep(0.005)
        # flock conflicts between two open files of one process too: a second writer thread is
        # refused like a second process, and told so.
        if holder and holder.get("pid") == os.getpid():
            who = f"another writer of this process (thread {holder.get('thread', '?')}"
            who += f", since {holder['since']})" if holder.get("since") else ")"
        else:
            who = _describe(holder)
        return (
            f"index {self.root} is being written by {who}; one writer at a time: wait for it "
            f"to finish and run this again (a writer that died released the lock already)"
        )

    def check(self) -> None:
        """Raise :class:`CrossrankError` unless this object holds the lock (a writer bug)."""
        if self._fd is None:
            raise CrossrankError(f"the writer lock of {self.root} is not held")

    def release(self) -> None:
        """Release the lock (idempotent). The file stays; its body is emptied."""
        fcntl = _fcntl()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        logger.debug("writer lock %s released", self.path)

    def remove_root_if_unused(self) -> None:
        """Delete ``root`` again if :meth:`acquire` created it and nothing was committed there.

        For a first build that failed: it leaves no directory behind. Removes the lock file (while
        still holding the lock), an empty ``readers/`` folder and ``root`` if it is then empty.
        """
        self.check()
        if not self.created_root or (self.root / MANIFEST_NAME).exists():
            return
        try:
            (self.root / READERS_DIR).rmdir()
        except OSError:
            pass
        try:
            self.path.unlink(missing_ok=True)
        except OSError:  # a read-only folder: the original error matters, not this one
            return
        try:
            self.root.rmdir()
        except OSError:
            pass

    def __enter__(self) -> WriterLock:
        if self._fd is None:
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"WriterLock({str(self.root)!r}, held={self.held})"
