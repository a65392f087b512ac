"""Atomic writes to a sharded index: add, remove, compact, and the commit protocol they share.

Every write takes the sharded index's writer lock (``ROOT/writer.lock``), then:

1. **repairs**: a shard whose own ``manifest.json`` names another generation than ``shards.json``
   (a writer was killed between its shard commits and the top commit) gets its manifest switched
   back to the generation ``shards.json`` names; the orphan generation becomes garbage;
2. **pins** every shard generation ``shards.json`` names (a reader pin, as a search holds), so
   that the shard writers' garbage collection never deletes what readers of the sharded index
   may still open;
3. writes and commits a new generation in each shard it changes (each shard's own atomic commit);
4. **commits**: replaces ``shards.json`` atomically with the new set of shard generations. Before
   this, readers see the old set; after it, the new one; never a mix;
5. releases its pins and collects the shard generations no reader holds.

A crash at any moment leaves ``shards.json`` naming the old set or the new one, whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import IndexNotFoundError, InvalidArgumentError
from crossrank.shards.layout import (
    ShardRef,
    ShardsManifest,
    manifest_from_dict,
    new_shards_manifest,
    read_shards_manifest,
    shard_of,
    write_shards_manifest,
)
from crossrank.store._crash import crash_point

if TYPE_CHECKING:
    from crossrank.encoders import Encoder
    from crossrank.store import GenerationWriter, ReaderPin, WriterLock
    from crossrank.write import AddReport, CompactReport, PhaseProgressFn, RemoveReport

__all__ = ["add_sharded", "remove_sharded", "compact_sharded", "collect_shards", "ShardedWrite"]

logger = logging.getLogger(__name__)


def _repair(top: ShardsManifest) -> list[int]:
    """Switch every shard whose manifest ran ahead of ``shards.json`` back; returns which."""
    from crossrank.store import WriterLock, current_generation_number, write_manifest

    repaired = []
    for ref in top.shards:
        root = Path(ref.path)
        if not root.is_dir():
            raise IndexNotFoundError(
                f"{ref.name} is missing; put the shard folder back (or fix its path in "
                "shards.json) before writing to the index"
            )
        if current_generation_number(root) == ref.generation:
            continue
        with WriterLock(root, create=False):
            if current_generation_number(root) != ref.generation:
                write_manifest(manifest_from_dict(root, ref.manifest))
                repaired.append(ref.index)
    if repaired:
        logger.info(
            "shards %s of %s were ahead of shards.json (an interrupted write); switched back",
            repaired,
            top.root,
        )
    return repaired


def _collect(top: ShardsManifest) -> None:
    """Delete the shard generations neither ``shards.json`` names nor a reader pins."""
    from crossrank.errors import IndexLockedError
    from crossrank.store import WriterLock, collect_garbage

    for ref in top.shards:
        try:
            with WriterLock(Path(ref.path), create=False) as lock:
                collect_garbage(ref.path, lock)
        except IndexLockedError:
            pass  # a shard writer holds it; it collects after its own commit
        except OSError as e:
            logger.warning("could not collect old generations of %s: %s", ref.name, e)


def collect_shards(root: str | Path) -> None:
    """Repair and collect every shard of a sharded index (under its writer lock).

    Raises:
        IndexLockedError: a writer is writing the index.
    """
    from crossrank.store import WriterLock

    with WriterLock(Path(root), create=False):
        top = read_shards_manifest(root)
        _repair(top)
        _collect(top)


@dataclass
class ShardedWrite:
    """One write to a sharded index, between :func:`sharded_write` and its commit.

    Attributes:
        root: the sharded index folder.
        lock: its held writer lock.
        top: the committed ``shards.json`` (None for a first build).
        refs: the shard generations the commit will name, starting as ``top``'s; a shard writer's
            commit replaces its entry (:meth:`committed`).
        paths: each shard's folder as ``shards.json`` writes it.
    """

    root: Path
    lock: WriterLock
    top: ShardsManifest | None
    refs: list[ShardRef]
    paths: list[str]
    pins: list[ReaderPin] = field(default_factory=list)
    changed: set[int] = field(default_factory=set)
    result: ShardsManifest | None = None

    def shard_path(self, index: int) -> Path:
        return Path(self.refs[index].path)

    def committed(self, index: int) -> ShardRef:
        """Record that shard ``index`` committed a new generation (read from its manifest)."""
        return self.committed_at(index, self.shard_path(index))

    def committed_at(self, index: int, path: str | Path) -> ShardRef:
        """Record that the shard ``index`` in folder ``path`` committed a new generation."""
        from crossrank.store import read_manifest

        path = Path(path)
        manifest = read_manifest(path)
        ref = ShardRef(
            index=index, path=str(path), generation=manifest.generation, manifest=manifest.to_dict()
        )
        self.refs[index] = ref
        self.changed.add(index)
        return ref

    def commit(
        self, *, encoder: dict[str, Any], next_id: int, extra: dict[str, Any] | None = None
    ) -> ShardsManifest:
        """Name the new set of shard generations in ``shards.json``: the commit point."""
        crash_point("shards-committed")
        top = new_shards_manifest(
            self.root,
            self.top,
            encoder=encoder,
            shards=self.refs,
            paths=self.paths,
            next_id=next_id,
            extra=extra,
        )
        write_shards_manifest(top)
        crash_point("shards-after-manifest")
        self.result = top
        return top


@contextmanager
def sharded_write(root: Path, *, create: bool = False) -> Iterator[ShardedWrite]:
    """Lock, repair and pin a sharded index for one write; release and collect afterwards.

    Args:
        root: the sharded index folder.
        create: a first build (no ``shards.json`` yet is fine).
    """
    from crossrank.store import ReaderPin, WriterLock

    with WriterLock(root, create=create) as lock:
        try:
            top = read_shards_manifest(root)
        except IndexNotFoundError:
            if not create:
                raise
            top = None
        write = ShardedWrite(
            root=root,
            lock=lock,
            top=top,
            refs=list(top.shards) if top is not None else [],
            paths=list(top.paths) if top is not None else [],
        )
        try:
            if top is not None:
                _repair(top)
                write.pins = [ReaderPin(ref.path, ref.generation) for ref in top.shards]
            yield write
        finally:
            for pin in write.pins:
                pin.release()
        done = write.result or top
        if done is not None:
            _collect(done)


def _open_sharded(index_dir: str | Path) -> Path:
    root = Path(index_dir)
    read_shards_manifest(root)  # IndexNotFoundError, naming the folder
    return root


# -- remove -------------------------------------------------------------------------------------


def remove_sharded(
    index_dir: str | Path,
    *,
    ids: Any = None,
    where: str | None = None,
) -> RemoveReport:
    """Remove images from a sharded index by id or ``where``, in one atomic commit.

    Each id is removed from its shard (``id % N``); a ``where`` runs on every shard. See
    :func:`crossrank.write.remove_images` for the arguments, the report and the errors.
    """
    from crossrank.write import remove_images
    from crossrank.write.remove import _as_ids
    from crossrank.write.reports import RemoveReport

    if (ids is None) == (where is None):
        raise InvalidArgumentError(
            "give the images to remove as ids or as a where filter, not both and not neither"
        )
    wanted = None if ids is None else _as_ids(ids)
    root = _open_sharded(index_dir)
    with sharded_write(root) as w:
        top = w.top
        assert top is not None
        n = top.n_shards
        if wanted is not None:
            unknown = wanted[(wanted < 0) | (wanted >= top.next_id)]
            if unknown.size:
                shown = ", ".join(map(str, unknown[:10].tolist())) + (
                    " ..." if unknown.size > 10 else ""
                )
                raise InvalidArgumentError(
                    f"{unknown.size} of the {wanted.size} ids are not in index {root}: {shown}; "
                    f"nothing was removed (ids are below {top.next_id}: see `crossrank search "
                    "--json` or Index.metadata())"
                )
        removed: list[int] = []
        already: list[int] = []
        images = tombstones = 0
        for ref in top.shards:
            if wanted is not None:
                mine = wanted[shard_of(wanted, n) == ref.index]
                if not mine.size:
                    gen = _gen_info(ref)
                    images += gen.n_live
                    tombstones += gen.n_tombstones
                    continue
                report = remove_images(ref.path, ids=mine)
            else:
                report = remove_images(ref.path, where=where)
            removed += list(report.removed)
            already += list(report.already_removed)
            images += report.images
            tombstones += report.tombstones
            if report.committed:
                w.committed(ref.index)
        generation = top.generation
        if w.changed:
            generation = w.commit(encoder=top.encoder, next_id=top.next_id).generation
    return RemoveReport(
        index_dir=root,
        generation=generation,
        committed=bool(w.changed),
        removed=tuple(sorted(removed)),
        already_removed=tuple(sorted(already)),
        images=images,
        tombstones=tombstones,
    )


def _gen_info(ref: ShardRef) -> Any:
    from crossrank.store import read_generation_info

    return read_generation_info(Path(ref.path) / str(ref.manifest["generation_dir"]))


# -- compact ------------------------------------------------------------------------------------


def compact_sharded(
    index_dir: str | Path, *, progress: PhaseProgressFn | None = None
) -> CompactReport:
    """Compact every shard (:func:`crossrank.write.compact_index`), in one atomic commit."""
    from crossrank.write import compact_index
    from crossrank.write.reports import CompactReport

    start = time.perf_counter()
    root = _open_sharded(index_dir)
    with sharded_write(root) as w:
        top = w.top
        assert top is not None
        images = dropped = 0
        factory = ""
        for ref in top.shards:
            report = compact_index(ref.path, progress=progress)
            images += report.images
            dropped += report.dropped
            factory = factory or report.factory
            if report.committed:
                w.committed(ref.index)
        generation = top.generation
        if w.changed:
            generation = w.commit(encoder=top.encoder, next_id=top.next_id).generation
    return CompactReport(
        index_dir=root,
        generation=generation,
        committed=bool(w.changed),
        images=images,
        dropped=dropped,
        deleted_generations=(),
        kept_generations=(),
        factory=factory,
        seconds=time.perf_counter() - start,
    )


# -- add ----------------------------------------------------------------------------------------


class _Router:
    """What :func:`crossrank.write.build.encode_items` appends patches to: each row goes to the
    patch store of its shard's writer (row ``i`` is the image that gets id ``start + i``)."""

    def __init__(self, n_shards: int, start: int, writer_of: Any) -> None:
        self.n = n_shards
        self.next = start
        self.writer_of = writer_of
        self.patches = self  # encode_items calls writer.patches.append(rows)

    def append(self, rows: np.ndarray) -> None:
        ids = np.arange(self.next, self.next + rows.shape[0], dtype=np.int64)
        self.next += rows.shape[0]
        dest = shard_of(ids, self.n)
        for s in np.unique(dest):
            self.writer_of(int(s)).patches.append(rows[dest == s])


def add_sharded(
    source: str | Path,
    index_dir: str | Path,
    *,
    model: str | Path | None = None,
    encoder: Encoder | None = None,
    batch_size: int = 64,
    device: str = "auto",
    workers: int = 4,
    rehash: bool = False,
    retry_skipped: bool = False,
    progress: PhaseProgressFn | None = None,
) -> AddReport:
    """Index the new files of ``source`` into a sharded index, in one atomic commit.

    As :func:`crossrank.write.add_images` (files compared by content over every shard; a moved
    file keeps its id; a changed one is indexed anew and its old image removed), with the new
    images encoded once and each written to shard ``id % N``. Only the shards that change get a
    new generation. Files skipped are recorded by shard 0.
    """
    import pyarrow as pa

    from crossrank.ingest import discover
    from crossrank.store import Generation, GenerationWriter, read_skipped
    from crossrank.store.layout import SKIPPED_NAME
    from crossrank.write.add import encoder_for, live_indexed, merge_skipped, plan_source
    from crossrank.write.build import check_counts
    from crossrank.write.reports import AddReport

    check_counts(batch_size=batch_size, workers=workers)
    start = time.perf_counter()
    root = _open_sharded(index_dir)
    with sharded_write(root) as w:
        top = w.top
        assert top is not None
        bases = [Generation(Path(r.path) / str(r.manifest["generation_dir"])) for r in top.shards]
        manifests = [manifest_from_dict(r.path, r.manifest) for r in top.shards]
        src = discover(source)
        indexed = pa.concat_tables([live_indexed(b) for b in bases], promote_options="default")
        old_skipped = read_skipped(bases[0].path / SKIPPED_NAME)
        plan = plan_source(
            src,
            indexed,
            old_skipped,
            workers=workers,
            rehash=rehash,
            retry_skipped=retry_skipped,
            progress=progress,
        )
        added, n_skipped, generation = 0, len(plan.skipped), top.generation
        if plan.changes_index or merge_skipped(old_skipped, plan, [])[1]:
            enc = (
                encoder_for(
                    manifests[0], model=model, encoder=encoder, device=device, batch_size=batch_size
                )
                if plan.new
                else None
            )
            writers: dict[int, GenerationWriter] = {}

            def writer_of(s: int) -> GenerationWriter:
                if s not in writers:
                    writer = GenerationWriter(top.shards[s].path, base=bases[s], gc=False)
                    writer.link_patches()
                    writers[s] = writer
                return writers[s]

            try:
                added, n_skipped = _add_rows(
                    w,
                    top,
                    bases,
                    manifests,
                    src,
                    plan,
                    enc,
                    old_skipped,
                    writer_of,
                    writers,
                    batch_size=batch_size,
                    workers=workers,
                    progress=progress,
                )
            finally:
                for writer in writers.values():
                    writer.abort()  # no-op for the committed ones
            if w.changed:
                generation = w.commit(encoder=top.encoder, next_id=top.next_id + added).generation
    committed = bool(w.changed)
    moved, replaced = (len(plan.moved), len(plan.replaced)) if committed else (0, 0)
    return AddReport(
        index_dir=root,
        generation=generation,
        committed=committed,
        added=added,
        moved=moved,
        replaced=replaced,
        unchanged=plan.unchanged,
        duplicates=len(plan.duplicates),
        skipped=n_skipped,
        images=int(top.counts.get("images", 0)) + added - replaced,
        seconds=time.perf_counter() - start,
        still_skipped=len(plan.still_skipped),
    )


def _add_rows(
    w: ShardedWrite,
    top: ShardsManifest,
    bases: list[Any],
    manifests: list[Any],
    src: Any,
    plan: Any,
    encoder: Any,
    old_skipped: Any,
    writer_of: Any,
    writers: dict[int, Any],
    *,
    batch_size: int,
    workers: int,
    progress: Any,
) -> tuple[int, int]:
    """Encode the plan's new files once, route them, and commit each changed shard."""
    from crossrank.indexes import FirstStage
    from crossrank.store.layout import SKIPPED_NAME
    from crossrank.write._common import _carry_over, _first_stage_info, _index_config
    from crossrank.write.add import conform_metadata, merge_skipped, write_metadata_with_moves
    from crossrank.write.build import encode_items, metadata_table

    n = top.n_shards
    router = _Router(n, top.next_id, writer_of)
    pooled: list[np.ndarray] = []
    records: list[Any] = []
    skipped: list[Any] = []
    if plan.new:
        pooled, records, skipped, _ = encode_items(
            router,
            encoder,
            plan.new,
            batch_size=batch_size,
            workers=workers,
            progress=None if progress is None else lambda d, t: progress("indexing", d, t),
        )
    merged_skipped, skipped_changed = merge_skipped(old_skipped, plan, skipped)
    n_skipped = len(skipped) + len(plan.skipped)
    d = bases[0].info.vector_dim
    xb = np.concatenate(pooled).astype(np.float32) if pooled else np.zeros((0, d), np.float32)
    new_ids = top.next_id + np.arange(len(records), dtype=np.int64)
    dest = shard_of(new_ids, n)
    moved_ids = np.asarray(sorted(plan.moved), dtype=np.int64)
    replaced = np.asarray(plan.replaced, dtype=np.int64)
    touched = set(dest.tolist()) | set(shard_of(moved_ids, n).tolist())
    touched |= set(shard_of(replaced, n).tolist())
    if skipped_changed:
        touched.add(0)
    for s in sorted(touched):
        writer = writer_of(s)
        base, manifest = bases[s], manifests[s]
        rows = np.flatnonzero(dest == s)
        ids_s = new_ids[rows]
        moved_s = {i: plan.moved[i] for i in plan.moved if int(i) % n == s}
        write_metadata_with_moves(writer, base, moved_s)
        crash_point("segments-linked")
        if rows.size:
            table = conform_metadata(
                metadata_table(ids_s, [records[i] for i in rows], src.extra_schema),
                writer.metadata_schema,
                src,
            )
            writer.write_metadata(table)
        writer.write_vectors([base.vectors(), xb[rows]])
        writer.write_ids(np.concatenate([np.asarray(base.ids()), ids_s]))
        dead = base.tombstones()
        mine = replaced[shard_of(replaced, n) == s]
        if mine.size:
            dead = np.union1d(dead, mine)
        writer.write_tombstones(dead)
        if s == 0:
            writer.write_skipped(merged_skipped)
        else:
            writer.link(SKIPPED_NAME)
        config = _index_config(manifest, factory=manifest.first_stage.get("factory"))
        first_stage = FirstStage.load(base.first_stage_path, config, mmap=False)
        first_stage.add(xb[rows], ids_s)
        first_stage.save(writer.first_stage_path)
        writer.commit(_carry_over(manifest, _first_stage_info(first_stage, manifest)))
        w.committed(s)
    for s in [s for s in writers if s not in touched]:
        writers[s].abort()
    return len(records), n_skipped
