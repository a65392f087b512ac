"""The Ray Data pipeline of a build: files in, encoded batches out, in source order.

::

    ray.data.from_items([(pos, path), ...])           the driver's listing
      .map_batches(decode_batch, num_cpus=1)           CPU tasks: read, hash, decode, preprocess
      .map_batches(EncodeActor, ActorPoolStrategy)     actors: one encoder each (a GPU each, if any)
      .iter_batches()                                  back on the driver, in order

:func:`ray_encoded_batches` regroups the rows into the one-process build's batches
(:class:`~crossrank.write.streaming.EncodedBatch`), drops byte-identical copies, and turns Ray's
failures into crossrank's one-line errors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crossrank.errors import CrossrankError

__all__ = ["DECODE_BATCH", "RayEncoding", "ray_encoded_batches"]

logger = logging.getLogger(__name__)

#: Files one decode task reads (a Ray Data block's batch): small enough to spread a source over
#: every CPU, large enough that a task's scheduling cost is small next to its decoding.
DECODE_BATCH = 16


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
