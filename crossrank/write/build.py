"""Building an index: walk the source, decode and encode the images, write one generation.

The pipeline overlaps its stages: decoder threads read, decode and preprocess batch i+1 while the
encoder runs on batch i (see :func:`crossrank.ingest.iter_batches`). The build streams: each
chunk of source files has its pooled vectors, patch features (fp16, or the ``patch_codec`` asked
for: :mod:`crossrank.store.codecs`), metadata rows and skipped files written to disk as it fills,
so memory stays bounded whatever the corpus size; at the end the chunks become one generation and
the FAISS first stage is trained and filled from the memory-mapped vectors
(:mod:`crossrank.write.streaming`). Nothing is visible to readers until the generation commits.

A build that is killed keeps its finished chunks: the same command again (or ``resume=True``,
``--resume``, which refuses to start over) resumes it without re-encoding them, and gives the
index an uninterrupted build gives.

A build holds the index's writer lock from start to end (a second writer is refused, naming it),
and :func:`encode_items` is shared with ``crossrank add`` (:mod:`crossrank.write`).

Every argument is checked before the model loads or any image is decoded: the FAISS factory
string, the patch codec's name (its fit to the model's patch dim, and for pq whether the source
has images enough to train on, right after the model loads), and the index folder, which must be
new, empty, or a crossrank index (a folder that holds anything else is refused, so nothing of the
user's is ever deleted). Byte-identical files are
indexed once, as ``add`` does: the later copy (in path order) is skipped with the reason
``duplicate of <first path>``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.errors import InvalidArgumentError, SourceError, some_of
from crossrank.store._crash import crash_point
from crossrank.write._common import check_index_path, writing
from crossrank.write.streaming import (
    CHUNK_ITEMS,
    BuildSpec,
    Duplicates,
    EncodedBatch,
    StreamingBuild,
    listing_fingerprint,
    metadata_table,
    resumable_build,
    skipped_table,
)

__all__ = [
    "BuildReport",
    "build_index",
    "encode_items",
    "encoded_batches",
    "metadata_table",
    "skipped_table",
    "ProgressFn",
    "check_counts",
    "checked_index_config",
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
        skipped: files that could not be indexed (listed by ``crossrank info --skipped``),
            ``duplicates`` included.
        seconds: wall time of the whole build.
        factory: the FAISS factory string of the first stage.
        model: the encoder's model id.
        duplicates: files skipped as byte-identical copies of an earlier file.
        patch_codec: how the patches are stored (``fp16``, ``int8``, ``pq:16``...).
        resumed: images kept from an interrupted build of the same source (not encoded again);
            0 for a build that started afresh.
    """

    index_dir: Path
    generation: int
    indexed: int
    skipped: int
    seconds: float
    factory: str
    model: str
    duplicates: int = 0
    patch_codec: str = "fp16"
    resumed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.index_dir),
            "generation": self.generation,
            "indexed": self.indexed,
            "skipped": self.skipped,
            "duplicates": self.duplicates,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.indexed / self.seconds, 2)
            if self.seconds > 0
            else None,
            "factory": self.factory,
            "model": self.model,
            "resumed": self.resumed,
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
    patch_codec: str | None = None,
    resume: bool | None = None,
    chunk_items: int = CHUNK_ITEMS,
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
        overwrite: replace an index that already exists in ``index_dir`` (never a folder that
            is not a crossrank index).
        progress: called as ``progress(done, total)`` after each batch.
        patch_codec: how patch features are stored: ``fp16`` (the default, None), ``int8``,
            ``binary``, ``pq`` (M = d/8 sub-quantisers of 8 bits: 16x fewer bytes than fp16),
            ``pq:M``, ``pq:MxB``, or ``opq`` in the same forms (the same bytes after a learned
            rotation, less lost, minutes to train); see :mod:`crossrank.store.codecs`. ``add``,
            ``remove`` and ``compact`` keep it.
        resume: what to do with a build of ``index_dir`` that was interrupted (killed, Ctrl-C,
            a full disk): None (the default) resumes it when it was started with the same source
            listing, model, patch codec and batch size, and starts over otherwise; True resumes
            it or refuses with one line saying what differs (or that none is in progress);
            False always starts over. A resumed build keeps its finished chunks and gives the
            index an uninterrupted one gives.
        chunk_items: source files per resumable chunk (rounded down to a multiple of
            ``batch_size``): the most work a crash can lose. Part of what a resume must match.

    Returns:
        A :class:`BuildReport`.

    Raises:
        SourceError: the source is missing, unreadable, or holds no decodable image.
        ModelError: the model cannot be loaded.
        InvalidArgumentError: a bad argument (a factory FAISS cannot parse, an unknown patch codec,
            a pq that cannot be trained on the source's images included), an existing index
            without ``overwrite``, or a folder that holds files and is not an index.
        IndexLockedError: another process is writing ``index_dir``.
        IndexWriteError: the operating system refused a write (disk full, read-only folder, a
            path under a file); the last committed generation is intact, and the build resumes
            from its last finished chunk when run again.
    """
    from crossrank.store import WriterLock
    from crossrank.store.codecs import parse_codec

    codec = parse_codec(patch_codec)  # an unknown name is refused before anything loads
    if resume is not None and not isinstance(resume, bool):
        raise InvalidArgumentError(f"resume must be True, False or None, got {resume!r}")
    check_counts(batch_size=batch_size, workers=workers, chunk_items=chunk_items)
    index_dir = Path(index_dir)
    check_index_path(index_dir)
    index_config = checked_index_config(factory, device, nprobe)
    with writing(index_dir, "build"):
        refuse_foreign_folder(index_dir)
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
                    codec=codec,
                    resume=resume,
                    chunk_items=chunk_items,
                )
            except BaseException:
                lock.remove_root_if_unused()  # a first build that failed leaves no folder behind
                raise


def check_counts(**counts: Any) -> None:
    """Refuse any count that is not an int >= 1 (``batch_size=64, workers=4``), naming it.

    Raises:
        InvalidArgumentError: the first such count.
    """
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")


def checked_index_config(
    factory: str | None, device: str, nprobe: int | None, dim: int | None = None
) -> Any:
    """The first stage's :class:`~crossrank.indexes.IndexConfig`, its factory string parsed by
    FAISS (for ``dim``-d vectors when known), before anything loads.

    Raises:
        InvalidArgumentError: a bad factory, device or nprobe.
    """
    from crossrank.indexes import IndexConfig

    try:
        config = IndexConfig(
            factory=factory, device=device, **({"nprobe": nprobe} if nprobe else {})
        )
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from e
    if config.factory is not None:
        check_factory(config.factory, dim)
    return config


def refuse_foreign_folder(index_dir: Path) -> None:
    """Refuse a folder that holds files and is not a crossrank index (``--overwrite`` or not).

    Which folders those are: :func:`~crossrank.store.layout.foreign_entries`.

    Raises:
        InvalidArgumentError: ``index_dir`` is such a folder.
    """
    from crossrank.store.layout import foreign_entries

    if not index_dir.is_dir():
        return
    if (index_dir / "shards.json").is_file():  # crossrank.shards' root manifest
        raise InvalidArgumentError(
            f"{index_dir} is a sharded index; rebuild it with --shards N "
            "(crossrank.shards.build_sharded), or build into a new folder"
        )
    foreign = foreign_entries(index_dir)
    if foreign:
        shown = some_of(foreign)
        raise InvalidArgumentError(
            f"--index {index_dir} is a folder that is not a crossrank index and is not empty "
            f"(it holds {shown}); crossrank never writes into it: choose an empty or new folder"
        )


#: Dimensions a factory string is first parsed with, before the model (and its dimension) is
#: known: a string FAISS parses with none of them is refused before anything loads.
_PROBE_DIMS = (512, 768, 1024, 256, 384, 640, 1536, 2048, 4096, 5040)


def check_factory(factory: str, dim: int | None = None) -> None:
    """Refuse a FAISS factory string FAISS cannot parse, before any image is decoded.

    Args:
        factory: the string.
        dim: the vector size when known (after the model loads); before that, a few common sizes
            are tried and the string passes when FAISS parses it for one of them.

    Raises:
        InvalidArgumentError: FAISS cannot parse it (its reason is in the message).
    """
    from crossrank.indexes._faiss import import_faiss
    from crossrank.indexes.factory import create_index

    faiss = import_faiss()
    first: InvalidArgumentError | None = None
    for d in (dim,) if dim is not None else _PROBE_DIMS:
        try:
            create_index(faiss, d, factory)
            return
        except InvalidArgumentError as e:
            first = first or e
    assert first is not None
    raise InvalidArgumentError(
        f"--factory: {first}" + (f" (for {dim}-d vectors)" if dim is not None else "")
    ) from first.__cause__


#: A build's encoding engine: ``(encoder, items, duplicates) -> batches`` of the files ``items``
#: decoded and encoded in order (``encoded_batches`` here; Ray tasks and actors in
#: :mod:`crossrank.distributed`). A generator is closed as soon as the build stops reading it.
BatchesFn = Callable[[Any, Sequence[Any], Any], Iterator[Any]]


def run_build(
    source: str | Path,
    index_dir: Path,
    lock: Any,
    *,
    load: Callable[[int], Any],
    batches: BatchesFn,
    batch_size: int,
    index_config: Any,
    codec: Any,
    overwrite: bool,
    resume: bool | None,
    progress: ProgressFn | None,
    chunk_items: int | None,
    engine: str = "",
) -> BuildReport:
    """A locked build's steps, whatever encodes: refuse what cannot be built or resumed, list the
    source, ``load(total)`` the encoder (with the checks that need its sizes), open or resume the
    streaming build, add ``batches`` of the files not yet kept, commit.

    The spec is the same for every engine, so a build interrupted on one resumes on the other.
    """
    from crossrank.ingest import discover
    from crossrank.store import has_index, read_manifest

    in_progress = resumable_build(index_dir) if resume is not False else None
    if resume and in_progress is None:  # before the model loads
        raise InvalidArgumentError(
            f"--resume: {index_dir} holds no build in progress (nothing to resume); run the "
            "build without --resume"
        )
    if has_index(index_dir) and not overwrite and in_progress is None:
        n = read_manifest(index_dir).counts.get("images", "?")
        raise InvalidArgumentError(
            f"{index_dir} already holds an index ({n} images); pass --overwrite to rebuild it "
            "(the current generation stays readable until the new one commits), or add new files "
            f"with `crossrank add SOURCE --index {index_dir}`"
        )
    start = time.perf_counter()
    src = discover(source)
    total = len(src.items)
    encoder = load(total)
    logger.info(
        "building %s from %s (%d files)%s with %s",
        index_dir,
        source,
        total,
        engine,
        encoder.model_id,
    )
    spec = BuildSpec(
        source=str(Path(source).resolve()),
        listing_sha256=listing_fingerprint(src),
        n_items=total,
        encoder=dict(encoder.info),
        patch_codec=codec.spec,
        batch_size=batch_size,
        chunk_items=BuildSpec.chunk_items_for(batch_size, chunk_items or CHUNK_ITEMS),
    )
    build = StreamingBuild.open(index_dir, lock, spec, extra_schema=src.extra_schema, resume=resume)
    try:
        if progress is not None and build.kept_items:
            progress(build.kept_items, total)
        stream = batches(encoder, src.items[build.kept_items :], build.duplicates)
        try:
            for batch in stream:
                build.add(batch)
                if batch.records:
                    crash_point("encoded")
                if progress is not None:
                    progress(build.items_done, total)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # a generator's engine (a Ray runtime) stops now, not when collected
        generation, first_stage = build.commit(
            index_config, source_label=str(source), source=spec.source
        )
    except (SourceError, InvalidArgumentError):
        build.abandon()  # nothing decoded, or data no run can index: nothing worth resuming
        raise
    except BaseException:
        build.abandon_if_empty()  # the finished chunks stay, for the next run to resume
        raise
    return BuildReport(
        index_dir=index_dir,
        generation=generation,
        indexed=build.images,
        skipped=build.n_skipped,
        seconds=time.perf_counter() - start,
        factory=first_stage.factory,
        model=encoder.model_id,
        duplicates=build.n_duplicates,
        patch_codec=codec.spec,
        resumed=build.kept_images,
    )


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
    codec: Any,
    resume: bool | None,
    chunk_items: int,
) -> BuildReport:
    """:func:`run_build` with the encoder and the decoder threads in this process."""
    from crossrank.encoders import load_encoder

    def load(total: int) -> Any:
        encoder = load_encoder(model, device=device, batch_size=batch_size)
        if index_config.factory is not None:
            check_factory(index_config.factory, encoder.dim)  # the model's size, before decoding
        # The codec's fit to the model, and whether pq can train on this source, before decoding.
        codec.configure(encoder.n_patches, encoder.patch_dim)
        if codec.needs_training:
            codec.check_trainable(
                total * encoder.n_patches, encoder.n_patches, f"SOURCE's {total:,} files"
            )
        return encoder

    def batches(encoder: Any, items: Sequence[Any], duplicates: Any) -> Iterator[Any]:
        return encoded_batches(
            encoder, items, batch_size=batch_size, workers=workers, duplicates=duplicates
        )

    return run_build(
        source,
        index_dir,
        lock,
        load=load,
        batches=batches,
        batch_size=batch_size,
        index_config=index_config,
        codec=codec,
        overwrite=overwrite,
        resume=resume,
        progress=progress,
        chunk_items=chunk_items,
    )


def encoded_batches(
    encoder: Any,
    items: Sequence[Any],
    *,
    batch_size: int,
    workers: int,
    duplicates: Duplicates,
) -> Iterator[EncodedBatch]:
    """Decode and encode ``items`` a batch at a time, in order (batch ``j`` covers
    ``items[j * batch_size : (j + 1) * batch_size]``).

    A file whose bytes equal an earlier file's (as ``duplicates`` knows them) is dropped before
    the forward pass and becomes a skip with the reason ``duplicate of <the earlier file's
    path>``.

    Args:
        encoder: the :class:`~crossrank.encoders.Encoder`.
        items: the :class:`~crossrank.ingest.SourceItem` to index, in id order.
        batch_size: images per forward pass.
        workers: decoder threads.
        duplicates: the contents seen so far; the kept records are added to it.

    Yields:
        One :class:`~crossrank.write.streaming.EncodedBatch` per batch of items (maybe without
        records, when every file of it was skipped): pooled float32, patches float16.
    """
    from crossrank.ingest import IngestConfig, iter_batches

    for batch in iter_batches(
        items,
        batch_size=batch_size,
        config=IngestConfig(workers=workers),
        preprocess=encoder.preprocess,
    ):
        keep, dups = duplicates.split(batch.records)
        if keep:
            # Duplicates are dropped before the forward pass, from the preprocessed pixels.
            pixels = (
                batch.pixels if len(keep) == len(batch.records) else _take_rows(batch.pixels, keep)
            )
            features = encoder.encode_pixels(pixels)
            pooled = np.asarray(features.pooled, dtype=np.float32)
            patches = features.patches.astype(np.float16)
        else:
            pooled = np.zeros((0, encoder.dim), np.float32)
            patches = np.zeros((0, encoder.n_patches, encoder.patch_dim), np.float16)
        yield EncodedBatch(
            pooled=pooled,
            patches=patches,
            records=[batch.records[i] for i in keep],
            skipped=[*batch.skipped, *dups],
            n_items=batch.n_items,
            duplicates=len(dups),
        )


def encode_items(
    writer: Any,
    encoder: Any,
    items: Sequence[Any],
    *,
    batch_size: int,
    workers: int,
    progress: ProgressFn | None = None,
) -> tuple[list[np.ndarray], list[Any], list[Any], int]:
    """Decode and encode ``items`` into a generation writer's patch store (for ``add``).

    A file whose bytes equal an earlier file's (same SHA-256) is not indexed twice: it is skipped
    with the reason ``duplicate of <the earlier file's path>``.

    Args:
        writer: the :class:`~crossrank.store.GenerationWriter`; patches are appended to it.
        encoder: the :class:`~crossrank.encoders.Encoder`.
        items: the :class:`~crossrank.ingest.SourceItem` to index, in id order.
        batch_size: images per forward pass.
        workers: decoder threads.
        progress: ``progress(done, len(items))`` after each batch.

    Returns:
        ``(pooled, records, skipped, duplicates)``: the pooled vectors per batch (float32
        ``(b, D)`` each), one :class:`~crossrank.ingest.ImageRecord` per encoded image, the
        skipped files (duplicates included), and how many of them are duplicates.
    """
    pooled: list[np.ndarray] = []
    records: list[Any] = []
    skipped: list[Any] = []
    duplicates = 0
    done, total = 0, len(items)
    for batch in encoded_batches(
        encoder, items, batch_size=batch_size, workers=workers, duplicates=Duplicates()
    ):
        skipped.extend(batch.skipped)
        duplicates += batch.duplicates
        if batch.records:
            pooled.append(batch.pooled)
            writer.patches.append(batch.patches)
            records.extend(batch.records)
            crash_point("encoded")
        done += batch.n_items
        if progress is not None:
            progress(done, total)
    return pooled, records, skipped, duplicates


def _take_rows(pixels: Any, rows: list[int]) -> Any:
    """Rows ``rows`` of a preprocessed batch: a tensor, an array, a list or a dict of those."""
    if isinstance(pixels, dict):
        return {key: _take_rows(value, rows) for key, value in pixels.items()}
    if isinstance(pixels, list):
        return [pixels[i] for i in rows]
    if type(pixels).__module__.partition(".")[0] == "torch":
        import torch

        return pixels[torch.as_tensor(rows, dtype=torch.long, device=pixels.device)]
    return pixels[np.asarray(rows, dtype=np.int64)]
