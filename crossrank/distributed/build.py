"""Building an index on Ray Data: decode in CPU tasks, encode in an actor pool, write on the driver.

The pipeline::

    driver: discover(SOURCE)  ->  ray.data.from_items([(pos, path), ...])
    CPU tasks:    decode + preprocess (crossrank.ingest.iter_batches: the same checks and reasons)
    actor pool:   encode (one encoder per actor; num_gpus=1 each when the cluster has GPUs),
                  patches stored in the index's codec on the worker (fp16, int8, binary; a pq
                  codec is trained on the driver from float16 rows, as a one-process build does)
    driver:       rows back in source order -> duplicates dropped, ids given, the generation
                  written by crossrank.store's GenerationWriter and committed once, atomically

The driver writes, not the workers: a generation is one folder on the disk of the machine that
holds the index's writer lock, its patch shards have a fixed row count and must be in id order,
and ids follow the source's path order after byte-identical duplicates are dropped, which needs
every earlier file's hash. Workers on other machines share none of that disk, so they send their
results (pooled vectors, patches already in the stored codec, a few metadata fields) to the
driver through Ray's object store, in order, and the driver appends them as they arrive. Decoding
and the forward passes, the work that scales, run on the cluster; the driver's work is a
sequential append of bytes. A killed worker is Ray's to retry (tasks are retried, an encoder actor
is restarted and its batch retried); a build that fails anyway raises one line, and nothing is
committed: the previous generation stays the index's.

The result equals a one-process :func:`crossrank.write.build_index` of the same files: the same
ids, metadata and skips, vectors within float rounding of batched matrix products (1e-5 on the
CPU).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.errors import CrossrankError, InvalidArgumentError, SourceError
from crossrank.write import BuildReport
from crossrank.write.build import ProgressFn

__all__ = ["build_on_ray"]

logger = logging.getLogger(__name__)

#: Files one decode task reads (a Ray Data block's batch): small enough to spread a source over
#: every CPU, large enough that a task's scheduling cost is small next to its decoding.
DECODE_BATCH = 16


def _check_positive(name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")


def build_on_ray(
    source: str | Path,
    index_dir: str | Path,
    *,
    model: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    factory: str | None = None,
    nprobe: int | None = None,
    patch_codec: str | None = None,
    overwrite: bool = False,
    ray_address: str | None = None,
    shards: int | None = None,
    num_encoders: int | None = None,
    num_cpus: int | None = None,
    progress: ProgressFn | None = None,
) -> BuildReport:
    """Index every image of ``source`` into a new generation of ``index_dir``, on Ray Data.

    The same index as :func:`crossrank.write.build_index` (ids, vectors within 1e-5 on the CPU,
    metadata, skips and duplicates), with decoding in Ray tasks and encoding in a pool of Ray
    actors. Every argument is checked, and a ``ray_address`` probed, before Ray starts or the model
    loads.

    Args:
        source: a folder (searched recursively) or a ``.parquet``/``.csv`` manifest with a
            ``path`` column. Every Ray worker must be able to read its files at the same paths (a
            shared file system on a multi-machine cluster).
        index_dir: the index directory, on the driver's machine (created if missing).
        model: the encoder: a Hugging Face id, a local directory (present on every worker), or
            None for the shipped demo model.
        batch_size: images per encoder forward pass (and per batch an actor receives).
        device: ``auto`` (a GPU per encoder actor when the cluster has GPUs), ``cpu`` or ``cuda``.
        factory: a FAISS factory string; None picks Flat or IVF by corpus size.
        nprobe: IVF lists probed per search, recorded as the index's default.
        patch_codec: ``fp16`` (None), ``int8``, ``binary``, ``pq``, ``pq:M`` or ``pq:MxB``.
        overwrite: replace an index that already exists in ``index_dir``.
        ray_address: ``HOST:PORT`` of a running cluster's head (``ray start --head``), or
            ``auto``; None starts a local Ray runtime for this build and stops it after. A
            runtime the caller already started (``ray.init``) is used as it is.
        shards: write a sharded index of this many shards (see :mod:`crossrank.shards`); None
            writes one ordinary index.
        num_encoders: encoder actors; None: one per GPU of the cluster, else one per two CPUs.
        num_cpus: CPUs of a local runtime (None: every CPU of this machine); ignored when joining
            a cluster or using a runtime already started.
        progress: called as ``progress(done, total)`` as files are decoded and encoded.

    Returns:
        A :class:`~crossrank.write.BuildReport`.

    Raises:
        DependencyError: Ray Data is not installed (the message names ``crossrank[ray]``).
        InvalidArgumentError: a bad argument (as :func:`~crossrank.write.build_index`), an
            unreachable ``ray_address``, ``shards`` < 1 or more shards than images.
        SourceError: the source is missing, unreadable, or holds no decodable image.
        ModelError: the model cannot be loaded.
        IndexLockedError: another process is writing ``index_dir``.
        IndexWriteError: the operating system refused a write.
        CrossrankError: the Ray job failed (a worker lost more times than Ray retries); nothing
            was committed.
    """
    from crossrank.distributed.runtime import check_ray_address, require_ray
    from crossrank.indexes import IndexConfig
    from crossrank.store import WriterLock
    from crossrank.store.codecs import parse_codec
    from crossrank.write._common import check_index_path, writing
    from crossrank.write.build import check_factory, refuse_foreign_folder

    codec = parse_codec(patch_codec)
    _check_positive("batch_size", batch_size, allow_none=False)
    _check_positive("num_encoders", num_encoders)
    _check_positive("num_cpus", num_cpus)
    if shards is not None:
        _check_positive("shards", shards)
    index_dir = Path(index_dir)
    check_index_path(index_dir)
    try:
        index_config = IndexConfig(
            factory=factory, device=device, **({"nprobe": nprobe} if nprobe else {})
        )
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from e
    if index_config.factory is not None:
        check_factory(index_config.factory)
    require_ray()
    if ray_address is not None:
        check_ray_address(ray_address)
    options = _Options(
        model=None if model is None else str(model),
        batch_size=batch_size,
        device=device,
        index_config=index_config,
        codec=codec,
        overwrite=overwrite,
        ray_address=ray_address,
        shards=shards,
        num_encoders=num_encoders,
        num_cpus=num_cpus,
        progress=progress,
    )
    if shards is not None and shards > 1:
        return _build_sharded(source, index_dir, options)
    with writing(index_dir, "build"):
        refuse_foreign_folder(index_dir)
        with WriterLock(index_dir) as lock:
            try:
                return _build_locked(source, index_dir, lock, options)
            except BaseException:
                lock.remove_root_if_unused()  # a first build that failed leaves no folder behind
                raise


@dataclass
class _Options:
    model: str | None
    batch_size: int
    device: str
    index_config: Any
    codec: Any
    overwrite: bool
    ray_address: str | None
    shards: int | None
    num_encoders: int | None
    num_cpus: int | None
    progress: ProgressFn | None


def _build_sharded(source: str | Path, index_dir: Path, options: _Options) -> BuildReport:
    raise InvalidArgumentError(
        f"--shards {options.shards} with --engine ray is not available yet; build with "
        "--engine local"
    )


def _build_locked(source: str | Path, index_dir: Path, lock: Any, o: _Options) -> BuildReport:
    from crossrank.encoders import load_encoder
    from crossrank.indexes import FirstStage
    from crossrank.ingest import discover
    from crossrank.store import GenerationWriter, has_index, read_manifest
    from crossrank.write.build import check_factory, metadata_table, skipped_table

    if has_index(index_dir) and not o.overwrite:
        n = read_manifest(index_dir).counts.get("images", "?")
        raise InvalidArgumentError(
            f"{index_dir} already holds an index ({n} images); pass --overwrite to rebuild it "
            "(the current generation stays readable until the new one commits), or add new files "
            f"with `crossrank add SOURCE --index {index_dir}`"
        )
    start = time.perf_counter()
    src = discover(source)
    total = len(src.items)
    # The driver loads the encoder on its CPU for the sizes, the manifest's record and the
    # preprocessing the decode tasks run; the actors load their own copy where they run.
    encoder = load_encoder(o.model, device="cpu", batch_size=o.batch_size)
    if o.index_config.factory is not None:
        check_factory(o.index_config.factory, encoder.dim)
    o.codec.configure(encoder.n_patches, encoder.patch_dim)
    if o.codec.needs_training:
        o.codec.check_trainable(
            total * encoder.n_patches, encoder.n_patches, f"SOURCE's {total:,} files"
        )
    logger.info(
        "building %s from %s (%d files) on Ray with %s", index_dir, source, total, encoder.model_id
    )
    from crossrank.distributed.runtime import ray_runtime

    with ray_runtime(o.ray_address, num_cpus=o.num_cpus) as ray:
        rows = _stream_rows(ray, src.items, encoder, o)
        with GenerationWriter(index_dir, lock=lock, patch_codec=o.codec) as writer:
            patch_shape = (encoder.n_patches, encoder.patch_dim)
            acc = _Accumulator(writer, src.items, o.batch_size, patch_shape, o.progress)
            acc.run(rows)
            if not acc.records:
                reasons = "; ".join(f"{s.path}: {s.reason}" for s in acc.skipped[:3])
                raise SourceError(
                    f"none of the {total} files in {source} could be decoded ({reasons}); "
                    "check that SOURCE holds images"
                )
            xb = np.concatenate(acc.pooled).astype(np.float32, copy=False)
            ids = writer.take_ids(len(acc.records))
            first_stage = FirstStage.build(xb, ids, o.index_config)
            first_stage.save(writer.first_stage_path)
            writer.write_vectors(xb)
            writer.write_ids(ids)
            writer.write_metadata(metadata_table(ids, acc.records, src.extra_schema))
            writer.write_skipped(skipped_table(acc.skipped))
            generation = writer.commit(
                encoder=encoder.info,
                first_stage={
                    **first_stage.info,
                    "metric": "inner_product",
                    "auto": o.index_config.factory is None,
                },
                counts={"images": len(acc.records), "skipped": len(acc.skipped)},
                source=str(Path(source).resolve()),
            )
    return BuildReport(
        index_dir=index_dir,
        generation=generation,
        indexed=len(acc.records),
        skipped=len(acc.skipped),
        seconds=time.perf_counter() - start,
        factory=first_stage.factory,
        model=encoder.model_id,
        duplicates=acc.duplicates,
        patch_codec=o.codec.spec,
    )


def _preprocess_only(encoder: Any) -> Any:
    """The encoder's ``preprocess`` without its weights, to ship to the decode tasks.

    ``preprocess`` reads only the image processor and the image size; a shallow copy without the
    network, the tokenizer and its lock pickles in kilobytes instead of the whole model.
    """
    import copy

    shell = copy.copy(encoder)
    for name in ("model", "tokenizer", "_tokenizer_lock"):
        if hasattr(shell, name):
            setattr(shell, name, None)
    return shell.preprocess


def _stream_rows(ray: Any, items: list[Any], encoder: Any, o: _Options) -> Iterable[dict]:
    """The Ray Data pipeline; yields numpy batches of encoded rows, in source order."""
    from PIL import Image

    from crossrank.distributed._tasks import CRASH_ONCE_ENV, EncodeActor, decode_batch
    from crossrank.ingest import IngestConfig

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # ids follow the source's order
    ctx.enable_progress_bars = False  # the caller's progress bar is the one shown
    ctx.print_on_execution_start = False

    preprocess = _preprocess_only(encoder)
    pixel_shape = tuple(preprocess([Image.new("RGB", (8, 8))]).shape[1:])
    gpus = float(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus >= 1 and o.device != "cpu"
    cpus = float(ray.cluster_resources().get("CPU", 1))
    n_encoders = o.num_encoders or (int(gpus) if use_gpu else max(1, int(cpus) // 2))
    actor_device = ("cuda" if use_gpu else "cpu") if o.device == "auto" else o.device
    logger.info("Ray build: %d encoder actors on %s", n_encoders, actor_device)

    rows = [{"pos": i, "path": os.fsencode(item.path)} for i, item in enumerate(items)]
    blocks = max(1, min(len(rows) // DECODE_BATCH, 1000))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = _map_batches(
        ds,
        decode_batch,
        batch_size=DECODE_BATCH,
        batch_format="numpy",
        fn_kwargs={
            "preprocess": preprocess,
            "max_pixels": IngestConfig().max_pixels,
            "pixel_shape": pixel_shape,
        },
        num_cpus=1,
        max_retries=3,
    )
    ds = _map_batches(
        ds,
        EncodeActor,
        batch_size=o.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model": o.model,
            "device": actor_device,
            "batch_size": o.batch_size,
            "codec": o.codec,
            "crash_marker": os.environ.get(CRASH_ONCE_ENV) or None,
        },
        compute=ray.data.ActorPoolStrategy(size=n_encoders),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
        # Bounded, not Ray Data's default of forever: a worker lost now and then is retried, an
        # actor that dies on every batch (out of memory) ends the build with one line.
        **_RETRIES,
    )
    return _iterate(ray, ds, o.batch_size)


#: Restarts of a lost encoder actor, and retries of the batch it held.
_RETRIES = {"max_restarts": 3, "max_task_retries": 3}


def _map_batches(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """``ds.map_batches`` with actor retry options, which newer Ray Data calls deprecated
    ``ray_remote_args`` but still applies (and has no named parameter for yet)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ds.map_batches(fn, **kwargs)


def _iterate(ray: Any, ds: Any, batch_size: int) -> Iterable[dict]:
    """Ray's errors as crossrank's: a user error raised on a worker comes back as itself."""
    try:
        yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, CrossrankError):
            raise cause from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrossrankError(
            f"the Ray build failed ({type(e).__name__}: {first}); nothing was committed and the "
            "index's previous generation is intact: run the build again"
        ) from e


@dataclass
class _Accumulator:
    """Takes encoded rows in source order and does what the one-process build's loop does."""

    writer: Any
    items: list[Any]
    batch_size: int
    patch_shape: tuple[int, int]  # (P, d) of the model
    progress: ProgressFn | None
    pooled: list[np.ndarray] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    skipped: list[Any] = field(default_factory=list)
    duplicates: int = 0

    def run(self, batches: Iterable[dict]) -> None:
        from crossrank.distributed._tasks import ships_half
        from crossrank.ingest import ImageRecord, SkippedFile
        from crossrank.ingest.changes import DUPLICATE_PREFIX
        from crossrank.ingest.decode import path_text

        total = len(self.items)
        expected = 0
        first_of: dict[str, str] = {}
        # Skips in the one-process order: per batch of `batch_size` files, the files that did
        # not decode, then the duplicates.
        undecoded: list[Any] = []
        dupes: list[Any] = []
        declared = False
        for out in batches:
            pos = np.asarray(out["pos"])
            if pos.size == 0:
                continue
            if pos[0] != expected or not np.array_equal(
                pos, np.arange(expected, expected + pos.size)
            ):
                raise CrossrankError(
                    f"the Ray build returned rows out of order (got {pos[0]}, expected "
                    f"{expected}); nothing was committed"
                )
            keep: list[int] = []
            for j, p in enumerate(pos.tolist()):
                item = self.items[p]
                if not out["ok"][j]:
                    undecoded.append(SkippedFile(path_text(item.path), str(out["reason"][j])))
                else:
                    path = str(item.path)
                    sha = str(out["sha256"][j])
                    first = first_of.setdefault(sha, path)
                    if first != path:
                        dupes.append(SkippedFile(path, DUPLICATE_PREFIX + first))
                        self.duplicates += 1
                    else:
                        keep.append(j)
                        self.records.append(
                            ImageRecord(
                                item=item,
                                width=int(out["width"][j]),
                                height=int(out["height"][j]),
                                bytes=int(out["bytes"][j]),
                                mtime=float(out["mtime"][j]),
                                sha256=sha,
                            )
                        )
                if (p + 1) % self.batch_size == 0 or p + 1 == total:
                    self.skipped.extend(undecoded)
                    self.skipped.extend(dupes)
                    undecoded, dupes = [], []
            expected += pos.size
            patches = np.asarray(out["patches"])
            if not declared:  # the shape, before append_stored (also when nothing decodes)
                self.writer.patches.append(np.zeros((0, *self.patch_shape), np.float16))
                declared = True
            if keep:
                rows = np.asarray(keep)
                self.pooled.append(np.asarray(out["pooled"])[rows].astype(np.float32))
                stored = patches[rows]
                if ships_half(self.writer.patches.codec):
                    self.writer.patches.append(stored)
                else:
                    self.writer.patches.append_stored(stored)
            if self.progress is not None:
                self.progress(expected, total)
        if expected != total:
            raise CrossrankError(
                f"the Ray build returned {expected} of {total} files; nothing was committed"
            )
