"""``add``: index the files of a source the index does not hold yet, as one new generation."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import ModelMismatchError, SourceError
from crossrank.store._crash import crash_point
from crossrank.write._common import (
    _carry_over,
    _first_stage_info,
    _index_config,
    _open_for_writing,
    writing,
)
from crossrank.write.reports import AddReport, PhaseProgressFn

if TYPE_CHECKING:
    import pyarrow as pa

    from crossrank.encoders import Encoder
    from crossrank.ingest import AddPlan
    from crossrank.store import Generation, GenerationWriter, Manifest

__all__ = ["add_images"]

logger = logging.getLogger(__name__)


def add_images(
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
    """Index the files of ``source`` that the index does not hold yet, as a new generation.

    Files are compared by the SHA-256 of their bytes (see :mod:`crossrank.ingest.changes`): a
    moved file keeps its id and gets its new path; a path whose content changed is indexed anew
    and its old image removed; copies are not indexed twice. Nothing is committed when nothing
    changed, so running the same add twice does the work once. The model is loaded only when
    there is a file to encode.

    A file the index skipped before (``crossrank info --skipped``) is not tried again unless
    ``retry_skipped``; a FIFO, socket or device is skipped without being opened, and a file whose
    name is not valid UTF-8 is skipped with the reason "file name is not valid UTF-8".

    Args:
        source: a folder (recursive) or a ``.parquet``/``.csv`` manifest with a ``path`` column.
            Its other columns must be metadata columns the index already has.
        index_dir: the index directory.
        model: the model to encode with; default (and the only one accepted) the index's own.
        encoder: an already loaded encoder of the index's model (``Index.add`` passes its own).
        batch_size: images per encoder forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        workers: decoder and hashing threads.
        rehash: hash every file, even those whose size and mtime equal the index's record.
        retry_skipped: try the files the index skipped before again (after fixing them).
        progress: ``progress(phase, done, total)`` with phase ``hashing`` then ``indexing``.

    Returns:
        An :class:`AddReport`.

    Raises:
        IndexNotFoundError: no committed index in ``index_dir``.
        SourceError: the source is missing or unreadable, or brings columns the index lacks.
        ModelMismatchError: ``model`` or ``encoder`` is another model than the index's.
        IndexLockedError: another process is writing the index.
        IndexWriteError: the operating system refused a write (disk full, read-only folder);
            the last committed generation is intact.
        InvalidArgumentError: a bad argument.

    Example:
        >>> report = add_images("photos/", "photos.idx")                    # doctest: +SKIP
        >>> report.added, report.moved, report.generation                    # doctest: +SKIP
        (12, 1, 5)
    """
    from crossrank.ingest import discover
    from crossrank.store import (
        Generation,
        GenerationWriter,
        WriterLock,
        collect_garbage,
        read_manifest,
        read_skipped,
    )
    from crossrank.store.layout import SKIPPED_NAME
    from crossrank.write.build import check_counts

    check_counts(batch_size=batch_size, workers=workers)
    start = time.perf_counter()
    index_dir = _open_for_writing(index_dir)
    with writing(index_dir, "add to"), WriterLock(index_dir, create=False) as lock:
        manifest = read_manifest(index_dir)
        base = Generation(manifest.generation_path)
        src = discover(source)
        old_skipped = read_skipped(base.path / SKIPPED_NAME)
        plan = plan_source(
            src,
            live_indexed(base),
            old_skipped,
            workers=workers,
            rehash=rehash,
            retry_skipped=retry_skipped,
            progress=progress,
        )
        committed, added, skipped, generation = False, 0, len(plan.skipped), manifest.generation
        if plan.changes_index or merge_skipped(old_skipped, plan, [])[1]:
            # The model loads only when there is something to encode.
            encoder = (
                encoder_for(
                    manifest, model=model, encoder=encoder, device=device, batch_size=batch_size
                )
                if plan.new
                else None
            )
            with GenerationWriter(index_dir, lock=lock, base=base) as writer:
                committed, added, skipped = _add_locked(
                    writer,
                    base,
                    manifest,
                    src,
                    plan,
                    encoder,
                    old_skipped,
                    batch_size=batch_size,
                    workers=workers,
                    progress=progress,
                )
                if committed:
                    generation = writer.generation
        if not committed:  # nothing to commit: finish what an interrupted writer left (its GC)
            collect_garbage(index_dir, lock)
    moved, replaced = (len(plan.moved), len(plan.replaced)) if committed else (0, 0)
    return AddReport(
        index_dir=index_dir,
        generation=generation,
        committed=committed,
        added=added,
        moved=moved,
        replaced=replaced,
        unchanged=plan.unchanged,
        duplicates=len(plan.duplicates),
        skipped=skipped,
        images=base.info.n_live + added - replaced,
        seconds=time.perf_counter() - start,
        still_skipped=len(plan.still_skipped),
    )


def live_indexed(base: Generation) -> pa.Table:
    """The ingest columns (path, size, mtime, hash) of ``base``'s live images: what a source's
    files are compared against."""
    from crossrank.ingest import INDEXED_COLUMNS

    with base.metadata() as meta:
        table = meta.table(columns=[c for c in INDEXED_COLUMNS if c in meta.columns])
    dead = base.tombstones()
    if dead.size:
        table = table.filter(~np.isin(table.column("id").to_numpy(), dead))
    return table


def plan_source(
    src: Any,
    indexed: pa.Table,
    old_skipped: pa.Table,
    *,
    workers: int,
    rehash: bool,
    retry_skipped: bool,
    progress: PhaseProgressFn | None,
) -> AddPlan:
    """What an add does with each file of ``src`` (:func:`crossrank.ingest.plan_add`), given the
    live images' ``indexed`` table and the files skipped before; reports the ``hashing`` phase."""
    from crossrank.ingest import plan_add

    plan = plan_add(
        src.items,
        indexed,
        workers=workers,
        rehash=rehash,
        skipped_before=_skipped_paths(old_skipped),
        retry_skipped=retry_skipped,
        progress=None if progress is None else lambda d, t: progress("hashing", d, t),
    )
    crash_point("add-hashed")
    return plan


def _skipped_paths(old_skipped: pa.Table) -> set[str]:
    """The paths the index skipped, except copies a build skipped (judged again by content)."""
    from crossrank.ingest.changes import DUPLICATE_PREFIX

    return {
        p
        for p, r in zip(
            old_skipped.column("path").to_pylist(),
            old_skipped.column("reason").to_pylist(),
            strict=True,
        )
        if not (r or "").startswith(DUPLICATE_PREFIX)
    }


def merge_skipped(
    old_skipped: pa.Table, plan: AddPlan, decoded_skips: Sequence[Any]
) -> tuple[pa.Table, bool]:
    """The skipped files of the new generation, and whether they differ from ``old_skipped``.

    The old rows stay, except those of files judged again now (tried, moved or skipped anew);
    then the files the plan skipped and those the decoder could not read.
    """
    from crossrank.ingest.decode import path_text
    from crossrank.write.build import skipped_table

    judged = {path_text(item.path) for item in plan.new}
    judged |= {path_text(item.path) for item in plan.moved.values()}
    judged |= {s.path for s in plan.skipped}
    keep = [i for i, p in enumerate(old_skipped.column("path").to_pylist()) if p not in judged]
    merged = _concat(
        [
            old_skipped.take(np.asarray(keep, dtype=np.int64)),
            skipped_table([*plan.skipped, *decoded_skips]),
        ]
    )
    return merged, _pairs(merged) != _pairs(old_skipped)


def encoder_for(
    manifest: Manifest,
    *,
    model: str | Path | None,
    encoder: Encoder | None,
    device: str,
    batch_size: int,
) -> Encoder:
    """``encoder``, or the model loaded (``model``, default the index's own), refused in one line
    when it is not the model ``manifest``'s index was built with."""
    from crossrank.encoders import load_encoder, same_model

    built_with = manifest.encoder
    if encoder is None:
        encoder = load_encoder(
            model if model is not None else built_with["model_id"],
            device=device,
            batch_size=batch_size,
        )
    if not same_model(built_with, encoder.info):
        raise ModelMismatchError(
            f"index {manifest.root} was built with model "
            f"{built_with['model_id']!r}, but the new images would be encoded with "
            f"{encoder.model_id!r}; add with the index's model (omit --model)"
        )
    return encoder


def _add_locked(
    writer: GenerationWriter,
    base: Generation,
    manifest: Manifest,
    src: Any,
    plan: AddPlan,
    encoder: Encoder | None,
    old_skipped: pa.Table,
    *,
    batch_size: int,
    workers: int,
    progress: PhaseProgressFn | None,
) -> tuple[bool, int, int]:
    """Write the add's generation; returns ``(committed, added, skipped)``."""
    from crossrank.indexes import FirstStage
    from crossrank.write.build import encode_items, metadata_table

    writer.link_patches()
    pooled: list[np.ndarray] = []
    records: list[Any] = []
    skipped: list[Any] = []
    if plan.new:
        assert encoder is not None  # loaded by add_images whenever there is a file to encode
        pooled, records, skipped, _ = encode_items(
            writer,
            encoder,
            plan.new,
            batch_size=batch_size,
            workers=workers,
            progress=None if progress is None else lambda d, t: progress("indexing", d, t),
        )
    merged_skipped, skipped_changed = merge_skipped(old_skipped, plan, skipped)
    n_skipped = len(skipped) + len(plan.skipped)
    if not records and not plan.moved and not plan.replaced and not skipped_changed:
        writer.abort()  # every new file was undecodable, as already recorded
        return False, 0, n_skipped

    new_ids = writer.take_ids(len(records))
    d = base.info.vector_dim
    xb = (
        np.concatenate(pooled).astype(np.float32, copy=False)
        if pooled
        else np.zeros((0, d), np.float32)
    )
    write_metadata_with_moves(writer, base, plan.moved)
    crash_point("segments-linked")
    if records:
        table = conform_metadata(
            metadata_table(new_ids, records, src.extra_schema), writer.metadata_schema, src
        )
        writer.write_metadata(table)
    writer.write_vectors([base.vectors(), xb])
    writer.write_ids(np.concatenate([np.asarray(base.ids()), new_ids]))
    dead = base.tombstones()
    if plan.replaced:
        dead = np.union1d(dead, np.asarray(plan.replaced, dtype=np.int64))
    writer.write_tombstones(dead)
    writer.write_skipped(merged_skipped)
    # Read whole, not memory-mapped: a mapped index is read-only, and the base's file is shared.
    config = _index_config(manifest, factory=manifest.first_stage.get("factory"))
    first_stage = FirstStage.load(base.first_stage_path, config, mmap=False)
    first_stage.add(xb, new_ids)
    first_stage.save(writer.first_stage_path)
    writer.commit(_carry_over(manifest, _first_stage_info(first_stage, manifest)))
    return True, len(records), n_skipped


def _concat(tables: Sequence[pa.Table]) -> pa.Table:
    import pyarrow as pa

    schema = pa.schema([("path", pa.string()), ("reason", pa.string())])
    return pa.concat_tables([t.select(["path", "reason"]).cast(schema) for t in tables])


def _pairs(table: pa.Table) -> set[tuple[str, str]]:
    return set(
        zip(table.column("path").to_pylist(), table.column("reason").to_pylist(), strict=True)
    )


def write_metadata_with_moves(
    writer: GenerationWriter, base: Generation, moved: dict[int, Any]
) -> None:
    """Link every metadata part of ``base``; rewrite the parts holding moved images' rows."""
    import pyarrow.parquet as pq

    ids = np.asarray(base.ids())
    moved_ids = np.asarray(sorted(moved), dtype=np.int64)
    row = 0
    for part in base.info.metadata_parts:
        part_ids = ids[row : row + part.rows]
        row += part.rows
        if not moved_ids.size or not np.isin(moved_ids, part_ids).any():
            writer.link_metadata_part(part)
            continue
        table = pq.read_table(base.path / part.file)
        writer.write_metadata(_with_moves(table, moved))


def _with_moves(table: pa.Table, moved: dict[int, Any]) -> pa.Table:
    """``table`` with the ``path`` (and ``mtime``) of moved ids replaced by their new file's."""
    import pyarrow as pa

    ids = table.column("id").to_pylist()
    paths = table.column("path").to_pylist()
    columns = {name: table.column(name) for name in table.column_names}
    mtime_us = None
    if "mtime" in columns:
        field_type = table.schema.field("mtime").type
        mtime_us = (
            columns["mtime"].cast(pa.int64()).to_pylist()
            if pa.types.is_timestamp(field_type)
            else None
        )
    for i, image_id in enumerate(ids):
        item = moved.get(image_id)
        if item is None:
            continue
        paths[i] = str(item.path)
        if mtime_us is not None:
            try:
                mtime_us[i] = int(os.stat(item.path).st_mtime * 1e6)
            except OSError:
                pass
    columns["path"] = pa.array(paths, type=table.schema.field("path").type)
    if mtime_us is not None:
        columns["mtime"] = pa.array(mtime_us, type=pa.int64()).cast(
            table.schema.field("mtime").type
        )
    return pa.table(columns, schema=table.schema)


def conform_metadata(table: pa.Table, schema: pa.Schema | None, src: Any) -> pa.Table:
    """New metadata rows in the index's schema: missing columns null, extra columns refused."""
    import pyarrow as pa

    if schema is None:
        return table
    extra = [name for name in table.column_names if name not in schema.names]
    if extra:
        raise SourceError(
            f"SOURCE {src.root} has column(s) {', '.join(extra)} that the index's metadata lacks "
            f"(it has {', '.join(schema.names)}); add from a source with those columns only, or "
            "rebuild the index with `crossrank build SOURCE --index DIR --overwrite`"
        )
    columns = []
    for fld in schema:
        if fld.name in table.column_names:
            columns.append(table.column(fld.name))
        else:
            columns.append(pa.nulls(table.num_rows, type=fld.type))
    try:
        return pa.table(columns, names=schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
        raise SourceError(
            f"SOURCE {src.root} has metadata that does not fit the index's column types "
            f"({str(e).splitlines()[0]}); give the columns the types the index was built with"
        ) from e
