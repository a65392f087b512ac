"""Reader pins: a reader marks the generation it reads so that no writer deletes it underneath.

A pin is a file ``DIR/readers/gen-000004.<pid>.<token>.pin`` on which the reader holds a shared
``flock`` for as long as it reads generation 4. A writer collecting old generations
(:func:`~crossrank.store.gc.collect_garbage`) tries an exclusive, non-blocking flock on each pin:
if that fails the reader is alive and its generation stays; if it succeeds the reader died (the
kernel dropped its lock), and the pin file is deleted. Readers never wait for anything.

Opening a generation safely takes three steps (:func:`pin_current`): read which generation is
current, pin it, and check the manifest still names it. A writer switches the manifest *before*
it looks at pins, so either it sees the pin or the reader sees the switch and pins the newer
generation instead.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import weakref
from pathlib import Path

from crossrank.errors import CrossrankError
from crossrank.store.layout import READERS_DIR

__all__ = ["READERS_DIR", "ReaderPin", "pin_current", "live_pins"]

logger = logging.getLogger(__name__)

_PIN_RE = re.compile(r"^gen-(\d{6,})\.(\d+)\.([0-9a-f]+)\.pin$")
_TMP_PREFIX = ".pin-"
_TMP_MAX_AGE_S = (
    600.0  # a half-made pin file older than this belongs to a reader that died making it
)


class ReaderPin:
    """A held pin on one generation of an index directory (see the module docstring).

    A pin that cannot be made (a read-only index directory) is a no-op pin: nothing can delete
    generations there anyway. Released by :meth:`release`, by garbage collection of the object,
    or by the process ending.

    Attributes:
        root: the index directory.
        generation: the generation pinned.
        path: the pin file, or None for a no-op pin.
    """

    def __init__(self, root: Path | str, generation: int) -> None:
        self.root = Path(root)
        self.generation = int(generation)
        self.path: Path | None = None
        self._fd: int | None = None
        self._make()
        self._finalizer = weakref.finalize(self, _release, self._fd, self.path)

    def _make(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; open files cannot be deleted there anyway
            return
        folder = self.root / READERS_DIR
        token = secrets.token_hex(6)
        final = folder / f"gen-{self.generation:06d}.{os.getpid()}.{token}.pin"
        tmp = folder / f"{_TMP_PREFIX}{os.getpid()}.{token}"
        try:
            folder.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            logger.debug(
                "cannot pin generation %d of %s (%s); reading unpinned",
                self.generation,
                self.root,
                e,
            )
            return
        try:
            # Locked before it gets a name writers look at: a writer never sees an unlocked pin.
            fcntl.flock(fd, fcntl.LOCK_SH)
            body = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "generation": self.generation,
                "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "thread": threading.current_thread().name,
            }
            os.write(fd, (json.dumps(body) + "\n").encode())
            os.rename(tmp, final)
        except OSError as e:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            logger.debug(
                "cannot pin generation %d of %s (%s); reading unpinned",
                self.generation,
                self.root,
                e,
            )
            return
        self._fd, self.path = fd, final

    @property
    def held(self) -> bool:
        """Whether a pin file is held (False for a no-op or released pin)."""
        return self._finalizer.alive and self._fd is not None

    def release(self) -> None:
        """Delete the pin file and drop its lock; idempotent."""
        self._finalizer()

    def __repr__(self) -> str:
        return f"ReaderPin({str(self.root)!r}, generation={self.generation}, held={self.held})"


def _release(fd: int | None, path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass
    if fd is not None:
        try:
            os.close(fd)  # drops the flock
        except OSError:
            pass


def pin_current(root: Path | str, *, attempts: int = 50):  # -> tuple[Manifest, ReaderPin]
    """Read the current manifest of an index directory and pin its generation, race-free.

    Args:
        root: the index directory.
        attempts: how many commits in a row may overtake the reader before it gives up.

    Returns:
        ``(manifest, pin)``: the validated :class:`~crossrank.store.manifest.Manifest` and the
        :class:`ReaderPin` holding its generation. Release the pin when done.

    Raises:
        IndexNotFoundError: no committed index in ``root``.
        IndexCorruptError: the manifest is damaged.
        CrossrankError: writers committed faster than the reader could pin, ``attempts`` times.
    """
    from crossrank.store.manifest import current_generation_number, read_manifest

    root = Path(root)
    for _ in range(attempts):
        number = current_generation_number(root)
        if number is None:
            read_manifest(root)  # raises the right error (no index, or a damaged manifest)
            continue  # a first commit landed just now
        pin = ReaderPin(root, number)
        try:
            manifest = read_manifest(root)
        except BaseException:
            pin.release()
            raise
        if manifest.generation == number:
            return manifest, pin
        pin.release()  # a writer committed in between: pin the newer generation
    raise CrossrankError(f"index {root} changed {attempts} times while it was being opened; retry")


def live_pins(root: Path | str, *, remove_stale: bool = True) -> dict[int, int]:
    """The generations live readers hold, with how many pins each; deletes dead readers' pins.

    Only a writer holding the writer lock should pass ``remove_stale=True``.

    Args:
        root: the index directory.
        remove_stale: delete the pin files of readers that died, and half-made pin files older
            than ten minutes.

    Returns:
        ``{generation: number of live pins}``.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no pins are made (ReaderPin)
        return {}
    folder = Path(root) / READERS_DIR
    try:
        entries = list(folder.iterdir())
    except OSError:
        return {}
    pins: dict[int, int] = {}
    for path in entries:
        m = _PIN_RE.match(path.name)
        if m is None:
            if remove_stale and path.name.startswith(_TMP_PREFIX):
                try:
                    if time.time() - path.stat().st_mtime > _TMP_MAX_AGE_S:
                        path.unlink(missing_ok=True)
                except OSError:
                    pass
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # released meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                generation = int(m.group(1))
                pins[generation] = pins.get(generation, 0) + 1
                continue
            if remove_stale:  # nobody holds it: its reader died without releasing it
                path.unlink(missing_ok=True)
                logger.debug("removed the pin of a dead reader: %s", path.name)
        finally:
            os.close(fd)
    return pins
