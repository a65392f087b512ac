"""``remove``: tombstone images in a new generation that shares every other file."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crossrank.errors import InvalidArgumentError
from crossrank.store._crash import crash_point
from crossrank.write._common import _carry_over, _open_for_writing, writing
from crossrank.write.reports import RemoveReport

__all__ = ["remove_images"]

logger = logging.getLogger(__name__)


def remove_images(
    index_dir: str | Path,
    *,
    ids: Sequence[int] | np.ndarray | None = None,
    where: str | None = None,
) -> RemoveReport:
    """Remove images from the index: they are tombstoned in a new generation.

    The next search (of a reader that refreshes, or opens the index anew) no longer returns them;
    their data stays on disk until :func:`compact_index`. Removing is idempotent: ids removed
    before are reported as ``already_removed``, and nothing is committed when nothing is left.

    Args:
        index_dir: the index directory.
        ids: the ids to remove (the ``id`` of search hits and metadata rows).
        where: or a DuckDB SQL filter over the metadata columns selecting the images to remove.

    Returns:
        A :class:`RemoveReport`.

    Raises:
        IndexNotFoundError: no committed index in ``index_dir``.
        InvalidArgumentError: neither or both of ``ids`` and ``where``, ids that are not
            integers in the int64 range (the first is named), or ids that were never in the
            index (all are named; nothing is removed then).
        FilterError: a malformed ``where``.
        IndexLockedError: another process is writing the index.
    """
    from crossrank.store import (
        Generation,
        GenerationWriter,
        WriterLock,
        collect_garbage,
        read_manifest,
    )
    from crossrank.store.layout import FIRST_STAGE_NAME, IDS_NAME, SKIPPED_NAME, VECTORS_NAME

    if (ids is None) == (where is None):
        raise InvalidArgumentError(
            "give the images to remove as ids or as a where filter, not both and not neither"
        )
    wanted = None if ids is None else _as_ids(ids)
    index_dir = _open_for_writing(index_dir)
    with writing(index_dir, "remove from"), WriterLock(index_dir, create=False) as lock:
        manifest = read_manifest(index_dir)
        base = Generation(manifest.generation_path)
        dead = base.tombstones()
        live = base.live_ids()
        if wanted is not None:
            unknown = wanted[(wanted < 0) | (wanted >= base.next_id)]
            if unknown.size:
                shown = ", ".join(map(str, unknown[:10].tolist())) + (
                    " ..." if unknown.size > 10 else ""
                )
                raise InvalidArgumentError(
                    f"{unknown.size} of the {wanted.size} ids are not in index "
                    f"{index_dir}: {shown}; nothing was removed (ids are below "
                    f"{base.next_id}: see `crossrank search --json` or Index.metadata())"
                )
            in_live = np.isin(wanted, live, assume_unique=True)
            to_remove, already = wanted[in_live], wanted[~in_live]
        else:
            with base.metadata() as meta:
                allowed = meta.allowed_ids(where)
            to_remove = (
                allowed[~np.isin(allowed, dead, assume_unique=True)] if dead.size else allowed
            )
            already = np.zeros(0, np.int64)
        if not to_remove.size:
            collect_garbage(index_dir, lock)  # finish what an interrupted writer left
            return RemoveReport(
                index_dir=index_dir,
                generation=manifest.generation,
                committed=False,
                removed=(),
                already_removed=tuple(already.tolist()),
                images=int(live.size),
                tombstones=int(dead.size),
            )
        with GenerationWriter(index_dir, lock=lock, base=base) as writer:
            writer.link_patches()
            for part in base.info.metadata_parts:
                writer.link_metadata_part(part)
            for name in (VECTORS_NAME, IDS_NAME, FIRST_STAGE_NAME, SKIPPED_NAME):
                writer.link(name)
            crash_point("segments-linked")
            tombstones = np.union1d(dead, to_remove)
            writer.write_tombstones(tombstones)
            generation = writer.commit(_carry_over(manifest))
    logger.info("removed %d images from %s (generation %d)", to_remove.size, index_dir, generation)
    return RemoveReport(
        index_dir=index_dir,
        generation=generation,
        committed=True,
        removed=tuple(to_remove.tolist()),
        already_removed=tuple(already.tolist()),
        images=int(live.size - to_remove.size),
        tombstones=int(tombstones.size),
    )


_INT64 = np.iinfo(np.int64)


def _as_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The sorted unique int64 ids of ``ids``, or a one-line error naming the first bad one."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise InvalidArgumentError(
                f"ids must be a 1-d array of integers, got {ids.dtype} of shape {ids.shape}"
            )
        if ids.dtype.kind == "u" and ids.size and int(ids.max()) > _INT64.max:
            raise InvalidArgumentError(
                f"id {int(ids.max())} is out of range: ids are integers from 0 to {_INT64.max} "
                "(int64)"
            )
        return np.unique(ids.astype(np.int64))
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InvalidArgumentError(f"ids must be a list of integers, got {type(ids).__name__}")
    values = []
    for value in ids:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise InvalidArgumentError(
                f"ids must be integers, got {value!r} ({type(value).__name__})"
            )
        if not _INT64.min <= int(value) <= _INT64.max:
            raise InvalidArgumentError(
                f"id {int(value)} is out of range: ids are integers from 0 to {_INT64.max} "
                "(int64); see `crossrank search --json` or Index.metadata() for the ids"
            )
        values.append(int(value))
    return np.unique(np.asarray(values, dtype=np.int64))
