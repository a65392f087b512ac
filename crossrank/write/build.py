"""Building an index: walk the source, decode and encode the images, write one generation.

The pipeline overlaps its stages: decoder threads read, decode and preprocess batch i+1 while the
encoder runs on batch i (see :func:`crossrank.ingest.iter_batches`). Pooled vectors go to the
first stage and ``vectors.npy``, patch features stream into the fp16 patch store, and one metadata
row per image goes to Parquet. Nothing is visible to readers until the generation commits.

A build holds the index's writer lock from start to end (a second writer is refused, naming it),
and :func:`encode_items` is shared with ``crossrank add`` (:mod:`crossrank.write`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.errors import InvalidArgumentError, SourceError
from crossrank.store._crash import crash_point

__all__ = [
    "BuildReport",
    "build_index",
    "encode_items",
    "metadata_table",
    "skipped_table",
    "ProgressFn",
]

logger = logging.getLogger(__name__)

#: ``progress(done, total)``: images processed (indexed or skipped) out of the source's total.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class BuildReport:
    """What a build did.

    Attributes:
        index_dir: the index directory.
        generation: the generation number that was committed.
        indexed: images in the index.
        skipped: files that could not be decoded (listed by ``crossrank info --skipped``).
        seconds: wall time of the whole build.
        factory: the FAISS factory string of the first stage.
        model: the encoder's model id.
    """

    index_dir: Path
    generation: int
    indexed: int
    skipped: int
    seconds: float
    factory: str
    model: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.index_dir),
            "generation": self.generation,
            "indexed": self.indexed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.indexed / self.seconds, 2)
            if self.seconds > 0
            else None,
            "factory": self.factory,
            "model": self.model,
        }


def build_index(
    source: str | Path,
    index_dir: str | Path,
    *,
    model: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    factory: str | None = None,
    nprobe: int | None = None,
    workers: int = 4,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> BuildReport:
    """Index every image of ``source`` into a new generation of ``index_dir``.

    Args:
        source: a folder (searched recursively) or a ``.parquet``/``.csv`` manifest with a ``path``
            column.
        index_dir: the index directory (created if missing).
        model: the encoder: a Hugging Face id, a local directory, or ``None`` for the shipped demo
            model.
        batch_size: images per encoder forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        factory: a FAISS factory string; ``None`` picks Flat or IVF by corpus size.
        nprobe: IVF lists probed per search, recorded as the index's default.
        workers: decoder threads.
        overwrite: replace an index that already exists in ``index_dir``.
        progress: called as ``progress(done, total)`` after each batch.

    Returns:
        A :class:`BuildReport`.

    Raises:
        SourceError: the source is missing, unreadable, or holds no decodable image.
        ModelError: the model cannot be loaded.
        InvalidArgumentError: a bad argument, or an existing index without ``overwrite``.
        IndexLockedError: another process is writing ``index_dir``.
    """
    from crossrank.store import WriterLock

    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 1:
        raise InvalidArgumentError(f"workers must be >= 1, got {workers}")
    index_dir = Path(index_dir)
    if index_dir.exists() and not index_dir.is_dir():
        raise InvalidArgumentError(
            f"index path {index_dir} exists and is not a directory; pass a directory"
        )
    try:
        from crossrank.indexes import IndexConfig

        index_config = IndexConfig(
            factory=factory, device=device, **({"nprobe": nprobe} if nprobe else {})
        )
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from e

    with WriterLock(index_dir) as lock:
        try:
            return _build_locked(
                source,
                index_dir,
                lock,
                model=model,
                batch_size=batch_size,
                device=device,
                index_config=index_config,
                workers=workers,
                overwrite=overwrite,
                progress=progress,
            )
        except BaseException:
            lock.remove_root_if_unused()  # a first build that failed leaves no folder behind
            raise


def _build_locked(
    source: str | Path,
    index_dir: Path,
    lock: Any,
    *,
    model: str | Path | None,
    batch_size: int,
    device: str,
    index_config: Any,
    workers: int,
    overwrite: bool,
    progress: ProgressFn | None,
) -> BuildReport:
    from crossrank.encoders import load_encoder
    from crossrank.indexes import FirstStage
    from crossrank.ingest import discover
    from crossrank.store import GenerationWriter, has_index, read_manifest

    if has_index(index_dir) and not overwrite:
        n = read_manifest(index_dir).counts.get("images", "?")
        raise InvalidArgumentError(
            f"{index_dir} already holds an index ({n} images); pass --overwrite to rebuild it "
            "(the current generation stays readable until the new one commits), or add new files "
            f"with `crossrank add SOURCE --index {index_dir}`"
        )
    start = time.perf_counter()
    src = discover(source)
    encoder = load_encoder(model, device=device, batch_size=batch_size)
    total = len(src.items)
    logger.info(
        "building %s from %s (%d files) with %s", index_dir, source, total, encoder.model_id
    )

    with GenerationWriter(index_dir, lock=lock) as writer:
        pooled, records, skipped = encode_items(
            writer, encoder, src.items, batch_size=batch_size, workers=workers, progress=progress
        )
        if not records:
            reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
            raise SourceError(
                f"none of the {total} files in {source} could be decoded ({reasons}); "
                "check that SOURCE holds images"
            )

        xb = np.concatenate(pooled).astype(np.float32, copy=False)  # (n, D)
        # Ids continue after every id this directory ever gave (0 in a new one): never reused.
        ids = writer.take_ids(len(records))
        first_stage = FirstStage.build(xb, ids, index_config)
        first_stage.save(writer.first_stage_path)
        writer.write_vectors(xb)
        writer.write_ids(ids)
        writer.write_metadata(metadata_table(ids, records, src.extra_schema))
        writer.write_skipped(skipped_table(skipped))
        generation = writer.commit(
            encoder=encoder.info,
            # `auto`: the factory was chosen by size, so a compaction may choose again.
            first_stage={
                **first_stage.info,
                "metric": "inner_product",
                "auto": index_config.factory is None,
            },
            counts={"images": len(records), "skipped": len(skipped)},
            source=str(Path(source).resolve()),
        )
    seconds = time.perf_counter() - start
    return BuildReport(
        index_dir=index_dir,
        generation=generation,
        indexed=len(records),
        skipped=len(skipped),
        seconds=seconds,
        factory=first_stage.factory,
        model=encoder.model_id,
    )


def encode_items(
    writer: Any,
    encoder: Any,
    items: Sequence[Any],
    *,
    batch_size: int,
    workers: int,
    progress: ProgressFn | None = None,
) -> tuple[list[np.ndarray], list[Any], list[Any]]:
    """Decode and encode ``items`` into a generation writer's patch store.

    Args:
        writer: the :class:`~crossrank.store.GenerationWriter`; patches are appended to it.
        encoder: the :class:`~crossrank.encoders.Encoder`.
        items: the :class:`~crossrank.ingest.SourceItem` to index, in id order.
        batch_size: images per forward pass.
        workers: decoder threads.
        progress: ``progress(done, len(items))`` after each batch.

    Returns:
        ``(pooled, records, skipped)``: the pooled vectors per batch (float32 ``(b, D)`` each), one
        :class:`~crossrank.ingest.ImageRecord` per encoded image, and the skipped files.
    """
    from crossrank.ingest import IngestConfig, iter_batches

    pooled: list[np.ndarray] = []
    records: list[Any] = []
    skipped: list[Any] = []
    done, total = 0, len(items)
    for batch in iter_batches(
        items,
        batch_size=batch_size,
        config=IngestConfig(workers=workers),
        preprocess=encoder.preprocess,
    ):
        skipped.extend(batch.skipped)
        if batch.records:
            features = encoder.encode_pixels(batch.pixels)
            pooled.append(np.asarray(features.pooled, dtype=np.float32))
            writer.patches.append(features.patches.astype(np.float16))
            records.extend(batch.records)
            crash_point("encoded")
        done += batch.n_items
        if progress is not None:
            progress(done, total)
    return pooled, records, skipped


def skipped_table(skipped: Sequence[Any]) -> Any:
    """The ``path``, ``reason`` table of :class:`~crossrank.ingest.SkippedFile` objects."""
    import pyarrow as pa

    return pa.table(
        {"path": [s.path for s in skipped], "reason": [s.reason for s in skipped]},
        schema=pa.schema([("path", pa.string()), ("reason", pa.string())]),
    )


def metadata_table(ids: np.ndarray, records: list[Any], extra_schema: Any) -> Any:
    """One metadata row per indexed image, in id order: the fixed columns, then the manifest's."""
    import pyarrow as pa

    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, type=pa.int64()),
        "path": pa.array([str(r.item.path) for r in records], type=pa.string()),
        "sha256": pa.array([r.sha256 for r in records], type=pa.string()),
        "width": pa.array([r.width for r in records], type=pa.int32()),
        "height": pa.array([r.height for r in records], type=pa.int32()),
        "bytes": pa.array([r.bytes for r in records], type=pa.int64()),
        "mtime": pa.array([int(r.mtime * 1e6) for r in records], type=pa.timestamp("us", tz="UTC")),
    }
    if extra_schema is not None:
        for fld in extra_schema:
            columns[fld.name] = pa.array(
                [r.item.extra.get(fld.name) for r in records], type=fld.type
            )
    return pa.table(columns)
