"""Building an index on Ray Data: decode in CPU tasks, encode in an actor pool, write on the driver.

The pipeline::

    driver: discover(SOURCE)  ->  ray.data.from_items([(pos, path), ...])
    CPU tasks:    decode + preprocess (crossrank.ingest.iter_batches: the same checks and reasons)
    actor pool:   encode (one encoder per actor; num_gpus=1 each when the cluster has GPUs)
    driver:       rows back in source order, a batch at a time -> duplicates dropped, the
                  streaming writer (crossrank.write.streaming: chunks staged on disk, resumable)
                  or the sharded builder, one commit, atomic

The driver writes, not the workers: a generation is one folder on the disk of the machine that
holds the index's writer lock, its patch shards have a fixed row count and must be in id order,
and ids follow the source's path order after byte-identical duplicates are dropped, which needs
every earlier file's hash. Workers on other machines share none of that disk, so they send their
results (pooled vectors, float16 patch rows, a few metadata fields) to the driver through Ray's
object store, in order, and the driver stages them as they arrive, a chunk at a time, as a
one-process build does. Decoding and the forward passes, the work that scales, run on the
cluster; the driver's work is a sequential append. A killed worker is Ray's to retry (tasks are
retried, an encoder actor is restarted and its batch retried); a build that fails anyway raises
one line, and nothing is committed: the previous generation stays the index's, and the chunks
finished so far stay staged, so the same build run again (with Ray or without) resumes there.

The result equals a one-process :func:`crossrank.write.build_index` of the same files: the same
ids, metadata and skips, vectors within float rounding of batched matrix products (1e-5 on the
CPU).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.errors import CrossrankError, InvalidArgumentError, SourceError
from crossrank.write import BuildReport
from crossrank.write.build import ProgressFn

__all__ = [
    "RayEncoding",
    "build_on_ray",
    "ray_encoded_batches",
]

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
    resume: bool | None = None,
    chunk_items: int | None = None,
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
        shards: write a sharded index of this many shards (:func:`crossrank.shards.build_sharded`:
            image ``id`` goes to shard ``id % shards``), its files decoded and encoded on Ray;
            None writes one ordinary index.
        num_encoders: encoder actors; None: one per GPU of the cluster, else one per two CPUs.
        num_cpus: CPUs of a local runtime (None: every CPU of this machine); ignored when joining
            a cluster or using a runtime already started.
        progress: called as ``progress(done, total)`` as files are decoded and encoded.
        resume: as :func:`~crossrank.write.build_index`'s: None resumes an interrupted build of
            the same source, model, codec and batch size (one started with or without Ray) and
            starts over otherwise; True refuses to start over; False always does. Not with
            ``shards``.
        chunk_items: source files per resumable chunk, as ``build_index``'s (None: its default);
            a build resumes only with the chunk size it was started with.

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
    _check_positive("chunk_items", chunk_items)
    if shards is not None:
        from crossrank.shards.build import check_shards

        check_shards(shards)
        if resume:
            raise InvalidArgumentError(
                "--resume is for an unsharded build; a sharded build starts over (leave out "
                "--resume or --shards)"
            )
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
    if model is not None and Path(model).exists():
        model = Path(model).resolve()  # the workers do not share this process's directory
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
        nprobe=nprobe,
        resume=resume,
        chunk_items=chunk_items,
    )
    if shards is not None:
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
    nprobe: int | None = None
    resume: bool | None = None
    chunk_items: int | None = None


def _build_sharded(source: str | Path, index_dir: Path, o: _Options) -> BuildReport:
    """A sharded index, its files encoded on Ray and written by the shards' own builder
    (:class:`crossrank.shards.build.ShardedBuilder`: image ``id`` goes to shard ``id % N``)."""
    from crossrank.distributed.runtime import ray_runtime
    from crossrank.ingest import discover
    from crossrank.shards.build import ShardedBuilder
    from crossrank.write._common import writing

    assert o.shards is not None
    builder = ShardedBuilder(
        index_dir, shards=o.shards, patch_codec=o.codec.spec, overwrite=o.overwrite
    )
    start = time.perf_counter()
    src = discover(source)
    total = len(src.items)
    if o.shards > total:
        raise InvalidArgumentError(
            f"--shards {o.shards} is more than the {total} files in {source}; every shard needs "
            f"at least one image: use --shards {max(1, total)} or fewer"
        )
    encoder = _driver_encoder(o, total, shards=o.shards)
    builder.codec.configure(encoder.n_patches, encoder.patch_dim)
    # The shards' writers store patches in the codec (each shard trains its own pq): the actors
    # send float16 rows.
    encoding = RayEncoding(
        model=o.model, batch_size=o.batch_size, device=o.device, num_encoders=o.num_encoders
    )
    done = 0
    with (
        writing(index_dir, "build"),
        builder,
        ray_runtime(o.ray_address, num_cpus=o.num_cpus) as ray,
    ):
        for batch in ray_encoded_batches(ray, encoder, src.items, encoding):
            builder.add(batch.pooled, batch.patches, batch.records, batch.skipped, batch.duplicates)
            done += batch.n_items
            if o.progress is not None:
                o.progress(done, total)
        top = builder.commit(
            encoder_info=encoder.info,
            index_config=o.index_config,
            extra_schema=src.extra_schema,
            source=str(Path(source).resolve()),
        )
    return BuildReport(
        index_dir=index_dir,
        generation=top.generation,
        indexed=len(builder.records),
        skipped=len(builder.skipped),
        seconds=time.perf_counter() - start,
        factory=str(builder.first_info.get("factory", "")),
        model=encoder.model_id,
        duplicates=builder.duplicates,
        patch_codec=builder.codec.spec,
    )


def _build_locked(source: str | Path, index_dir: Path, lock: Any, o: _Options) -> BuildReport:
    """:func:`crossrank.write.build_index`'s steps, with the batches encoded on Ray."""
    from crossrank.distributed.runtime import ray_runtime
    from crossrank.ingest import discover
    from crossrank.store import has_index, read_manifest
    from crossrank.write.streaming import (
        CHUNK_ITEMS,
        BuildSpec,
        StreamingBuild,
        listing_fingerprint,
        resumable_build,
    )

    in_progress = resumable_build(index_dir) if o.resume is not False else None
    if o.resume and in_progress is None:
        raise InvalidArgumentError(
            f"--resume: {index_dir} holds no build in progress (nothing to resume); run the "
            "build without --resume"
        )
    if has_index(index_dir) and not o.overwrite and in_progress is None:
        n = read_manifest(index_dir).counts.get("images", "?")
        raise InvalidArgumentError(
            f"{index_dir} already holds an index ({n} images); pass --overwrite to rebuild it "
            "(the current generation stays readable until the new one commits), or add new files "
            f"with `crossrank add SOURCE --index {index_dir}`"
        )
    start = time.perf_counter()
    src = discover(source)
    total = len(src.items)
    encoder = _driver_encoder(o, total)
    logger.info(
        "building %s from %s (%d files) on Ray with %s", index_dir, source, total, encoder.model_id
    )
    # The one-process build's spec: a build interrupted on one engine resumes on the other.
    spec = BuildSpec(
        source=str(Path(source).resolve()),
        listing_sha256=listing_fingerprint(src),
        n_items=total,
        encoder=dict(encoder.info),
        patch_codec=o.codec.spec,
        batch_size=o.batch_size,
        chunk_items=BuildSpec.chunk_items_for(o.batch_size, o.chunk_items or CHUNK_ITEMS),
    )
    build = StreamingBuild.open(
        index_dir, lock, spec, extra_schema=src.extra_schema, resume=o.resume
    )
    encoding = RayEncoding(
        model=o.model, batch_size=o.batch_size, device=o.device, num_encoders=o.num_encoders
    )
    try:
        if o.progress is not None and build.kept_items:
            o.progress(build.kept_items, total)
        with ray_runtime(o.ray_address, num_cpus=o.num_cpus) as ray:
            for batch in ray_encoded_batches(
                ray, encoder, src.items[build.kept_items :], encoding, build.duplicates
            ):
                build.add(batch)
                if o.progress is not None:
                    o.progress(build.items_done, total)
        generation, first_stage = build.commit(
            o.index_config, source_label=str(source), source=spec.source
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
        patch_codec=o.codec.spec,
        resumed=build.kept_images,
    )


def _driver_encoder(o: _Options, total: int, shards: int | None = None) -> Any:
    """The encoder, loaded on the driver's CPU, with the checks that need its sizes.

    The driver needs it for the sizes, the manifest's record and the preprocessing the decode
    tasks run; the encoder actors load their own copy where they run.
    """
    from crossrank.encoders import load_encoder
    from crossrank.write.build import check_factory

    encoder = load_encoder(o.model, device="cpu", batch_size=o.batch_size)
    if o.index_config.factory is not None:
        check_factory(o.index_config.factory, encoder.dim)
    o.codec.configure(encoder.n_patches, encoder.patch_dim)
    if o.codec.needs_training and shards is None:
        o.codec.check_trainable(
            total * encoder.n_patches, encoder.n_patches, f"SOURCE's {total:,} files"
        )
    elif o.codec.needs_training and shards is not None:  # each shard trains its own
        per_shard = total // shards
        o.codec.check_trainable(
            per_shard * encoder.n_patches,
            encoder.n_patches,
            f"each shard's {per_shard:,} files (SOURCE's {total:,} in {shards} shards)",
        )
    return encoder


@dataclass(frozen=True)
class RayEncoding:
    """How the Ray pipeline encodes.

    Attributes:
        model: the encoder the actors load (a Hugging Face id or folder; None: the demo model).
        batch_size: images per forward pass, and per encoded batch yielded.
        device: ``auto`` (a GPU per actor when the cluster has GPUs), ``cpu`` or ``cuda``.
        num_encoders: encoder actors; None: one per GPU, else one per two CPUs.
    """

    model: str | None = None
    batch_size: int = 64
    device: str = "auto"
    num_encoders: int | None = None


def ray_encoded_batches(
    ray: Any,
    encoder: Any,
    items: Sequence[Any],
    encoding: RayEncoding,
    duplicates: Any = None,
) -> Iterator[Any]:
    """Decode and encode ``items`` on the Ray cluster; yield them a batch at a time, in order.

    What :func:`crossrank.write.build.encoded_batches` yields, from Ray: batch ``j`` covers
    ``items[j * batch_size : (j + 1) * batch_size]``, its skips are the files that did not decode
    then the byte-identical copies of an earlier file (dropped here, after encoding: the hashes
    are known only once a worker read the file).

    Args:
        ray: the ``ray`` module, initialised.
        encoder: the encoder loaded here (its sizes and preprocessing; the actors load their own).
        items: the :class:`~crossrank.ingest.SourceItem` to index, in id order.
        encoding: how (:class:`RayEncoding`).
        duplicates: the contents seen so far (a :class:`~crossrank.write.streaming.Duplicates`,
            a resumed build's); a new one when None.

    Yields:
        One :class:`~crossrank.write.streaming.EncodedBatch` per ``encoding.batch_size`` files:
        pooled float32 ``(b, D)``, patches float16 ``(b, P, d)``.

    Raises:
        CrossrankError: the Ray job failed past its retries (one line); a crossrank error raised
            on a worker is raised as itself.
    """
    from crossrank.ingest import ImageRecord, SkippedFile
    from crossrank.ingest.decode import path_text
    from crossrank.write.streaming import Duplicates, EncodedBatch

    seen = duplicates if duplicates is not None else Duplicates()
    total, bs = len(items), encoding.batch_size
    if total == 0:
        return
    group: dict[str, list[Any]] = {"records": [], "undecoded": [], "pooled": []}
    patches: list[np.ndarray] = []
    expected = 0
    for out in _stream_rows(ray, items, encoder, encoding):
        pos = np.asarray(out["pos"])
        if not np.array_equal(pos, np.arange(expected, expected + pos.size)):
            raise CrossrankError(
                f"the Ray build returned rows out of order (got {pos[:1]}, expected {expected}); "
                "nothing was committed"
            )
        expected += pos.size
        ok = np.asarray(out["ok"], dtype=bool)
        for j, p in enumerate(pos.tolist()):
            item = items[p]
            if not ok[j]:
                group["undecoded"].append(SkippedFile(path_text(item.path), str(out["reason"][j])))
            else:
                group["records"].append(
                    ImageRecord(
                        item=item,
                        width=int(out["width"][j]),
                        height=int(out["height"][j]),
                        bytes=int(out["bytes"][j]),
                        mtime=float(out["mtime"][j]),
                        sha256=str(out["sha256"][j]),
                    )
                )
                group["pooled"].append(out["pooled"][j])
                patches.append(out["patches"][j])
            if (p + 1) % bs == 0 or p + 1 == total:
                keep, dups = seen.split(group["records"])
                yield EncodedBatch(
                    pooled=_stack([group["pooled"][i] for i in keep], (encoder.dim,), np.float32),
                    patches=_stack(
                        [patches[i] for i in keep],
                        (encoder.n_patches, encoder.patch_dim),
                        np.float16,
                    ),
                    records=[group["records"][i] for i in keep],
                    skipped=[*group["undecoded"], *dups],
                    n_items=p + 1 - (p // bs) * bs,
                    duplicates=len(dups),
                )
                group = {"records": [], "undecoded": [], "pooled": []}
                patches = []
    if expected != total:
        raise CrossrankError(
            f"the Ray build returned {expected} of {total} files; nothing was committed"
        )


def _stack(rows: list[np.ndarray], shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """``rows`` as one ``(len(rows), *shape)`` array (an empty one without rows)."""
    if not rows:
        return np.zeros((0, *shape), dtype)
    return np.stack(rows).astype(dtype, copy=False)


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


def _stream_rows(
    ray: Any, items: Sequence[Any], encoder: Any, encoding: RayEncoding
) -> Iterator[dict[str, np.ndarray]]:
    """The Ray Data pipeline; yields numpy batches of encoded rows, in source order."""
    from PIL import Image

    from crossrank.distributed._tasks import CRASH_ONCE_ENV, EncodeActor, decode_batch
    from crossrank.ingest import IngestConfig

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # ids follow the source's order
    ctx.enable_progress_bars = False  # the caller's progress bar is the one shown
    ctx.print_on_execution_start = False
    if hasattr(ctx, "raise_original_map_exception"):  # a worker's crossrank error, as itself
        ctx.raise_original_map_exception = True

    preprocess = _preprocess_only(encoder)
    pixel_shape = tuple(preprocess([Image.new("RGB", (8, 8))]).shape[1:])
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    use_gpu = gpus >= 1 and encoding.device != "cpu"
    cpus = float(resources.get("CPU", 1))
    n_encoders = encoding.num_encoders or (int(gpus) if use_gpu else max(1, int(cpus) // 2))
    device = encoding.device
    actor_device = ("cuda" if use_gpu else "cpu") if device == "auto" else device
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
        batch_size=encoding.batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "model": encoding.model,
            "device": actor_device,
            "batch_size": encoding.batch_size,
            "crash_marker": os.environ.get(CRASH_ONCE_ENV) or None,
        },
        compute=ray.data.ActorPoolStrategy(size=n_encoders),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0 if use_gpu else 1,
        # Bounded, not Ray Data's default of forever: a worker lost now and then is retried, an
        # actor that dies on every batch (out of memory) ends the build with one line.
        **_RETRIES,
    )
    return _iterate(ray, ds, encoding.batch_size)


#: Restarts of a lost encoder actor, and retries of the batch it held.
_RETRIES = {"max_restarts": 3, "max_task_retries": 3}


def _map_batches(ds: Any, fn: Any, **kwargs: Any) -> Any:
    """``ds.map_batches`` with retry options, which newer Ray Data calls deprecated
    ``ray_remote_args`` but still applies (and has no named parameter for yet)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        return ds.map_batches(fn, **kwargs)


def _crossrank_cause(e: BaseException) -> CrossrankError | None:
    """The crossrank error a worker raised, wherever Ray and Ray Data wrapped it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, CrossrankError) and not _raised_by_ray(x):
            return x  # not Ray's RayTaskError(ModelError) wrapper, but what it wraps
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def _raised_by_ray(e: BaseException) -> bool:
    """Whether ``e`` is one of Ray's or Ray Data's own exceptions."""
    return type(e).__module__.partition(".")[0] == "ray"


def _iterate(ray: Any, ds: Any, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray's errors as crossrank's: a user error raised on a worker comes back as itself."""
    try:
        yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)
    except Exception as e:
        cause = _crossrank_cause(e)
        if cause is not None:
            raise cause from e
        if isinstance(e, CrossrankError) or not _raised_by_ray(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrossrankError(
            f"the Ray build failed ({type(e).__name__}: {first}); nothing was committed and the "
            "index's previous generation is intact: run the build again"
        ) from e
