"""Collecting old generations and what crashed writers left behind; called with the writer lock.

After a commit every generation other than the current one is garbage unless a live reader pins
it (:mod:`crossrank.store.pins`). A generation is first renamed to ``DIR/.trash-gen-000003.<pid>``
and only then deleted file by file, so a crash half-way through never leaves a half-deleted
folder under a generation's name: the next writer finds the trash folder and finishes the job.
Generations share files by hard links, so deleting one frees only the files no other generation
links.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from crossrank.store._crash import crash_point
from crossrank.store._files import fsync_dir
from crossrank.store.lock import WriterLock
from crossrank.store.manifest import (
    MANIFEST_NAME,
    current_generation_number,
    list_generations,
    list_tmp_dirs,
)
from crossrank.store.pins import live_pins

__all__ = ["TRASH_PREFIX", "collect_garbage", "clean_interrupted"]

logger = logging.getLogger(__name__)

TRASH_PREFIX = ".trash-"


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
    for tmp in list_tmp_dirs(root):
        _delete_tree(tmp)
        removed.append(tmp.name)
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if entry.name.startswith(TRASH_PREFIX) and entry.is_dir():
            _delete_tree(entry)
            removed.append(entry.name)
        elif entry.name.startswith(f".{MANIFEST_NAME}.tmp-") and entry.is_file():
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
