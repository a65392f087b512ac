"""Collecting old generations and what crashed writers left behind; called with the writer lock.

After a commit every generation other than the current one is garbage unless a live reader pins
it (:mod:`crossrank.store.pins`). A generation is first renamed to ``DIR/.trash-gen-000003.<pid>``
and only then deleted file by file, so a crash half-way through never leaves a half-deleted
folder under a generation's name: the next writer finds the trash folder and finishes the job.
Generations share files by hard links, so deleting one frees only the files no other generation
links.

Nothing crossrank did not write is ever deleted: only names crossrank writes are considered
(``gen-NNNNNN`` folders holding a ``generation.json``, ``.gen-NNNNNN.tmp-PID`` folders,
``.trash-`` folders and ``.manifest.json.tmp-`` files), and only in a folder that is a crossrank
index: one that holds ``manifest.json`` or the ``writer.lock`` crossrank creates before it writes
anything else.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from crossrank.store._crash import crash_point
from crossrank.store._files import fsync_dir
from crossrank.store.layout import GENERATION_INFO_NAME
from crossrank.store.lock import LOCK_NAME, WriterLock
from crossrank.store.manifest import (
    MANIFEST_NAME,
    current_generation_number,
    list_generations,
    list_tmp_dirs,
)
from crossrank.store.pins import live_pins

__all__ = ["TRASH_PREFIX", "collect_garbage", "clean_interrupted", "is_own_leftover"]

logger = logging.getLogger(__name__)

TRASH_PREFIX = ".trash-"

_TRASH_RE = re.compile(r"^\.trash-gen-\d{6,}\.\d+$")
_MANIFEST_TMP_RE = re.compile(r"^\.manifest\.json\.tmp-\d+$")
_TMP_DIR_RE = re.compile(r"^\.gen-\d{6,}\.tmp-\d+$")


def is_own_leftover(name: str) -> bool:
    """Whether ``name`` is one crossrank gives what an interrupted writer leaves behind."""
    return any(r.match(name) for r in (_TRASH_RE, _MANIFEST_TMP_RE, _TMP_DIR_RE))


def _is_index_folder(root: Path) -> bool:
    """A folder crossrank writes: it holds ``manifest.json`` or crossrank's ``writer.lock``."""
    return (root / MANIFEST_NAME).is_file() or (root / LOCK_NAME).is_file()


def _delete_tree(path: Path) -> None:
    """Delete a folder bottom-up, one file at a time (a crash point after each file)."""
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
            crash_point("gc-deleting")
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(path)


def clean_interrupted(root: Path | str, lock: WriterLock) -> list[str]:
    """Delete the leftovers of writers that crashed: temporary generation folders, trash folders
    and temporary manifests. Only the lock holder may call this: every writer holds the lock, so
    whatever a writer left behind belongs to a dead one.

    Args:
        root: the index directory.
        lock: the held writer lock of ``root``.

    Returns:
        The names of what was deleted.
    """
    root = Path(root)
    lock.check()
    removed: list[str] = []
    if not root.is_dir() or not _is_index_folder(root):
        return removed
    for tmp in list_tmp_dirs(root):
        if tmp.is_symlink():  # crossrank makes real folders; never walk into a link's target
            continue
        _delete_tree(tmp)
        removed.append(tmp.name)
    for entry in sorted(root.iterdir()):
        if _TRASH_RE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            _delete_tree(entry)
            removed.append(entry.name)
        elif _MANIFEST_TMP_RE.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        logger.info("removed what interrupted writers left in %s: %s", root, ", ".join(removed))
    return removed


def collect_garbage(root: Path | str, lock: WriterLock) -> list[int]:
    """Delete every generation that is neither current nor pinned by a live reader.

    Also deletes the pin files of dead readers and the leftovers :func:`clean_interrupted` deletes.
    Does nothing while the manifest cannot be read (nothing can be known to be garbage then).

    Args:
        root: the index directory.
        lock: the held writer lock of ``root``.

    Returns:
        The numbers of the generations deleted.
    """
    root = Path(root)
    lock.check()
    current = current_generation_number(root)
    if current is None:
        return []
    pinned = live_pins(root, remove_stale=True)
    removed: list[int] = []
    for gen in list_generations(root):
        if gen.number == current or gen.number in pinned:
            continue
        if gen.path.is_symlink() or not (gen.path / GENERATION_INFO_NAME).is_file():
            # Not a generation crossrank wrote (every one holds generation.json before it gets
            # its name): someone else's folder, left alone.
            logger.warning("leaving %s alone: it is not a generation crossrank wrote", gen.path)
            continue
        trash = root / f"{TRASH_PREFIX}{gen.path.name}.{os.getpid()}"
        os.rename(gen.path, trash)
        fsync_dir(root)  # the folder leaves its generation name before any file goes
        crash_point("gc-trashed")
        _delete_tree(trash)
        removed.append(gen.number)
    clean_interrupted(root, lock)
    if removed:
        logger.info("deleted generation(s) %s of %s", ", ".join(map(str, removed)), root)
    kept = sorted(n for n in pinned if n != current)
    if kept:
        logger.info("kept generation(s) %s of %s: live readers hold them", kept, root)
    crash_point("after-gc")
    return removed
