"""``compact``: rewrite an index without its tombstones and delete old generations."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from crossrank.errors import InvalidArgumentError
from crossrank.store._crash import crash_point
from crossrank.store._files import load_npy
from crossrank.write._common import (
    _carry_over,
    _first_stage_info,
    _index_config,
    _open_for_writing,
    writing,
)
from crossrank.write.reports import CompactReport, PhaseProgressFn

if TYPE_CHECKING:
    from crossrank.store import Generation, GenerationWriter

__all__ = ["compact_index"]

logger = logging.getLogger(__name__)

_COMPACT_CHUNK = 4096  # rows copied per step of a compaction (bounded memory)


def _fragmented(base: Generation) -> bool:
    """Whether the patch shards or metadata parts are more than a rewrite would make."""
    from crossrank.store import StoreConfig
    from crossrank.store.codecs import parse_codec
    from crossrank.store.patches import shard_rows_for

    info, config = base.info, StoreConfig()
    rows = info.n_live
    shard_rows = (
        shard_rows_for(config, parse_codec(info.patch_codec), info.n_patches, info.patch_dim)
        if info.n_patches
        else rows or 1
    )
    need_shards = max(1, math.ceil(rows / shard_rows)) if rows else 0
    need_parts = max(1, math.ceil(rows / config.metadata_part_rows))
    return len(info.patch_shards) > need_shards or len(info.metadata_parts) > need_parts


def _chunks(rows: np.ndarray, size: int = _COMPACT_CHUNK) -> Iterator[np.ndarray]:
    for i0 in range(0, rows.size, size):
        yield rows[i0 : i0 + size]


def compact_index(
    index_dir: str | Path, *, progress: PhaseProgressFn | None = None
) -> CompactReport:
    """Rewrite the index without its tombstones and delete the old generations no reader holds.

    Patch shards, metadata parts, vectors and ids are copied without the removed rows into full
    shards and parts (patches as stored: the index's patch codec, and a pq's trained quantiser,
    are kept, and no row is decoded or encoded again), and the first stage is rebuilt from the
    remaining vectors (an index whose factory was chosen by size gets the choice for its new
    size; IVF is retrained). Ids do not change. An index without tombstones and without
    fragmented shards is not rewritten; its old generations are still collected.

    Args:
        index_dir: the index directory.
        progress: ``progress("rewriting", done, total)`` over the remaining rows.

    Returns:
        A :class:`CompactReport`.

    Raises:
        IndexNotFoundError: no committed index in ``index_dir``.
        IndexLockedError: another process is writing the index.
    """
    from crossrank.indexes import FirstStage
    from crossrank.store import (
        Generation,
        GenerationWriter,
        WriterLock,
        collect_garbage,
        live_pins,
        read_manifest,
        read_skipped,
    )
    from crossrank.store.layout import SKIPPED_NAME, VECTORS_NAME

    start = time.perf_counter()
    index_dir = _open_for_writing(index_dir)
    with writing(index_dir, "compact"), WriterLock(index_dir, create=False) as lock:
        manifest = read_manifest(index_dir)
        base = Generation(manifest.generation_path)
        dead = base.tombstones()
        if not dead.size and not _fragmented(base):
            deleted = collect_garbage(index_dir, lock)
            kept = sorted(
                g for g in live_pins(index_dir, remove_stale=False) if g != manifest.generation
            )
            return CompactReport(
                index_dir=index_dir,
                generation=manifest.generation,
                committed=False,
                images=base.info.n_live,
                dropped=0,
                deleted_generations=tuple(deleted),
                kept_generations=tuple(kept),
                factory=str(manifest.first_stage.get("factory", "")),
                seconds=time.perf_counter() - start,
            )
        ids = np.asarray(base.ids())
        rows = (
            np.flatnonzero(~np.isin(ids, dead, assume_unique=True))
            if dead.size
            else np.arange(ids.size)
        )
        live_ids = ids[rows]
        store = base.patches()
        # No base: nothing is linked, and shards and parts are numbered from 0 again. The codec
        # is the base's, trained: its rows are copied as they are stored.
        with GenerationWriter(index_dir, lock=lock, patch_codec=store.codec) as writer:
            info = base.info
            if info.n_patches:
                writer.patches.append(
                    np.zeros((0, info.n_patches, info.patch_dim), np.float16)
                )  # the shape
            done = 0
            for chunk in _chunks(rows):
                writer.patches.append_stored(store.gather_stored(chunk))
                done += chunk.size
                crash_point("compact-rewriting")
                if progress is not None:
                    progress("rewriting", done, int(rows.size))
            if progress is not None and not rows.size:
                progress("rewriting", 0, 0)
            vectors = base.vectors()
            if rows.size:
                writer.write_vectors(np.asarray(vectors[chunk]) for chunk in _chunks(rows))
            else:
                writer.write_vectors(np.zeros((0, info.vector_dim), np.float32))
            writer.write_ids(live_ids)
            _write_live_metadata(writer, base, dead)
            writer.write_skipped(read_skipped(base.path / SKIPPED_NAME))
            xb = load_npy(writer.dir / VECTORS_NAME)
            auto = bool(manifest.first_stage.get("auto", False))
            factory = None if auto else manifest.first_stage.get("factory")
            try:
                first_stage = FirstStage.build(
                    xb, live_ids, _index_config(manifest, factory=factory)
                )
            except InvalidArgumentError as e:
                if factory is None:
                    raise
                # e.g. an IVF with more lists than images left: choose by size, like a new build
                logger.warning(
                    "cannot rebuild the %r first stage over %d images (%s); choosing by size",
                    factory,
                    live_ids.size,
                    e,
                )
                auto = True
                first_stage = FirstStage.build(xb, live_ids, _index_config(manifest, factory=None))
            del xb
            first_stage.save(writer.first_stage_path)
            generation = writer.commit(
                _carry_over(manifest, _first_stage_info(first_stage, manifest, auto=auto))
            )
            deleted = writer.collected
        store.close()
        kept = sorted(g for g in live_pins(index_dir, remove_stale=False) if g != generation)
    return CompactReport(
        index_dir=index_dir,
        generation=generation,
        committed=True,
        images=int(live_ids.size),
        dropped=int(dead.size),
        deleted_generations=tuple(deleted),
        kept_generations=tuple(kept),
        factory=first_stage.factory,
        seconds=time.perf_counter() - start,
    )


def _write_live_metadata(writer: GenerationWriter, base: Generation, dead: np.ndarray) -> None:
    """Copy the metadata parts of ``base`` without the tombstoned rows, into full parts."""
    import pyarrow.parquet as pq

    wrote = False
    for part in base.info.metadata_parts:
        table = pq.read_table(base.path / part.file)
        if dead.size:
            table = table.filter(~np.isin(table.column("id").to_numpy(), dead))
        if table.num_rows or not wrote:
            writer.write_metadata(table)  # a first table of 0 rows still fixes the schema
            wrote = True
