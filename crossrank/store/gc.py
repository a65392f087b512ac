"""Collecting old generations and what crashed writers left behind; called with the writer lock.

After a commit every generation other than the current one is garbage unless a live reader pins
it (:mod:`crossrank.store.pins`). A generation is first renamed to ``DIR/.trash-gen-000003.<pid>``
and only then deleted file by file, so a crash half-way through never leaves a half-deleted
folder under a generation's name: the next writer finds the trash folder and finishes the job.
Generations share files by hard links, so deleting one frees only the files no other generation
links.

Nothing crossrank did not write is ever deleted: only names crossrank writes are considered
(``gen-NNNNNN`` folders holding a ``generation.json``, ``.gen-NNNNNN.tmp-PID`` folders,
``.trash-`` folders, ``.manifest.json.tmp-`` files and the ``.build-staging`` folder of a build in
progress), and only in a folder that is a crossrank index: one that holds ``manifest.json`` or the
``writer.lock`` crossrank creates before it writes anything else.

A build in progress (``.build-staging``, :mod:`crossrank.write.streaming`) records the generation
it started from (none for a first build). It can resume only while that generation is still the
committed one: its ids follow that generation's. So the rule is: a staging folder is kept while the
manifest names the generation it started from, and deleted by the next writer once another
generation was committed (the build's own commit, or an ``add``, ``remove`` or ``compact`` that
abandoned it), or when it has no readable ``build.json`` (a build killed before recording what it
was). While ``manifest.json`` exists but cannot be read nothing is known, and it is kept.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from crossrank.store._crash import crash_point
from crossrank.store._files import fsync_dir
from crossrank.store.layout import (
    GENERATION_INFO_NAME,
    MANIFEST_TMP_RE,
    STAGING_INFO_NAME,
    STAGING_NAME,
    TRASH_RE,
    is_own_leftover,
)
from crossrank.store.lock import LOCK_NAME, WriterLock
from crossrank.store.manifest import (
    MANIFEST_NAME,
    current_generation_number,
    list_generations,
    list_tmp_dirs,
)
from crossrank.store.pins import live_pins

__all__ = [
    "TRASH_PREFIX",
    "collect_garbage",
    "clean_interrupted",
    "is_own_leftover",
    "staging_base",
    "staging_is_stale",
]

logger = logging.getLogger(__name__)

TRASH_PREFIX = ".trash-"

_NO_BASE = object()


def staging_base(root: Path | str) -> int | None | object:
    """The generation a build in progress in ``root`` started from (None: a first build).

    Returns a private sentinel when there is no staging folder or its ``build.json`` cannot be
    read (then it belongs to no resumable build).
    """
    path = Path(root) / STAGING_NAME / STAGING_INFO_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        base = data["base_generation"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return _NO_BASE
    if base is None or (isinstance(base, int) and not isinstance(base, bool)):
        return base
    return _NO_BASE


def staging_is_stale(root: Path | str) -> bool:
    """Whether ``root`` holds a build staging folder no build can resume (see the module doc).

    False when there is none, and while ``manifest.json`` exists but cannot be read.
    """
    root = Path(root)
    staging = root / STAGING_NAME
    if staging.is_symlink() or not staging.is_dir():
        return False
    current = current_generation_number(root)
    if current is None and (root / MANIFEST_NAME).exists():
        return False  # a manifest that cannot be read: nothing is known, keep it
    base = staging_base(root)
    return base is _NO_BASE or base != current


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
    """Delete the leftovers of writers that crashed: temporary generation folders, trash folders,
    temporary manifests, and a build staging folder no build can resume any more
    (:func:`staging_is_stale`). Only the lock holder may call this: every writer holds the lock, so
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
        if TRASH_RE.match(entry.name) and entry.is_dir() and not entry.is_symlink():
            _delete_tree(entry)
            removed.append(entry.name)
        elif MANIFEST_TMP_RE.match(entry.name) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if staging_is_stale(root):
        _delete_tree(root / STAGING_NAME)
        removed.append(STAGING_NAME)
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
