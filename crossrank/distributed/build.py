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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossrank.distributed.pipeline import RayEncoding, ray_encoded_batches
from crossrank.errors import InvalidArgumentError
from crossrank.write import BuildReport
from crossrank.write.build import ProgressFn

__all__ = ["build_on_ray"]

logger = logging.getLogger(__name__)


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
        patch_codec: ``fp16`` (None), ``int8``, ``binary``, ``pq``, ``pq:M``, ``pq:MxB``, or
            ``opq`` in the same forms.
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
    from crossrank.store import WriterLock
    from crossrank.store.codecs import parse_codec
    from crossrank.write._common import check_index_path, writing
    from crossrank.write.build import (
        check_counts,
        checked_index_config,
        refuse_foreign_folder,
    )

    codec = parse_codec(patch_codec)
    optional = {"num_encoders": num_encoders, "num_cpus": num_cpus, "chunk_items": chunk_items}
    check_counts(batch_size=batch_size, **{k: v for k, v in optional.items() if v is not None})
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
    index_config = checked_index_config(factory, device, nprobe)
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
    """:func:`crossrank.write.build.run_build` with the batches decoded and encoded on Ray."""
    from crossrank.distributed.runtime import ray_runtime
    from crossrank.write.build import run_build

    encoding = RayEncoding(
        model=o.model, batch_size=o.batch_size, device=o.device, num_encoders=o.num_encoders
    )

    def batches(encoder: Any, items: Sequence[Any], duplicates: Any) -> Iterator[Any]:
        with ray_runtime(o.ray_address, num_cpus=o.num_cpus) as ray:
            yield from ray_encoded_batches(ray, encoder, items, encoding, duplicates)

    return run_build(
        source,
        index_dir,
        lock,
        load=lambda total: _driver_encoder(o, total),
        batches=batches,
        batch_size=o.batch_size,
        index_config=o.index_config,
        codec=o.codec,
        overwrite=o.overwrite,
        resume=o.resume,
        progress=o.progress,
        chunk_items=o.chunk_items,
        engine=" on Ray",
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
