"""Decoding images on a thread pool, ahead of the consumer that encodes them, in bounded batches.

The consumer (the build loop) encodes batch ``i`` while the pool decodes batches ``i + 1`` to
``i + prefetch_batches``; Pillow's decoders, ``hashlib`` and the usual preprocessing ops release the
GIL, so threads overlap for real. Work is handed out in chunks of ``chunk_size`` images, so all
workers stay busy within one batch, and a worker holds at most one chunk of full-size images.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from crossrank.errors import InvalidArgumentError
from crossrank.ingest.config import IngestConfig
from crossrank.ingest.decode import (
    ImageRecord,
    SkippedFile,
    _as_item,
    _decode,
    _Unreadable,
    path_text,
)
from crossrank.ingest.sources import SourceItem

__all__ = ["Batch", "Preprocess", "iter_batches"]

logger = logging.getLogger(__name__)

# The encoder's preprocessing: RGB images -> pixel tensor (n, 3, H, W), thread-safe.
Preprocess = Callable[[list[Image.Image]], Any]


@dataclass
class Batch:
    """One batch of consecutive items: what decoded, ready to encode, and what was skipped.

    Attributes:
        records: one :class:`ImageRecord` per decoded image, in the order of the items; may be empty
            when every file of the batch was skipped.
        images: the RGB images, aligned with ``records``, only when no ``preprocess`` was given
            (``None`` otherwise, so full-size images are freed on the worker side).
        pixels: ``preprocess``'s output for the batch, rows aligned with ``records`` (for an
            encoder, a float32 tensor of shape (len(records), 3, H, W)); ``None`` without
            ``preprocess`` or when ``records`` is empty.
        skipped: the files of the batch that could not be decoded, in the order of the items.
        start: position in ``items`` of the batch's first item.
    """

    records: list[ImageRecord]
    images: list[Image.Image] | None
    pixels: Any | None
    skipped: list[SkippedFile]
    start: int = 0

    @property
    def n_items(self) -> int:
        """Items this batch accounts for (decoded + skipped); ``start + n_items`` are done."""
        return len(self.records) + len(self.skipped)


@dataclass
class _ChunkResult:
    records: list[ImageRecord]
    images: list[Image.Image] | None
    pixels: Any | None
    skipped: list[SkippedFile]


class _Deferred:
    """A task run in the calling thread when its result is asked for (``workers=0``)."""

    def __init__(self, fn: Callable[[], _ChunkResult]) -> None:
        self._fn = fn

    def result(self) -> _ChunkResult:
        return self._fn()

    def cancel(self) -> bool:
        return True


def iter_batches(
    items: Iterable[SourceItem | str | os.PathLike[str]],
    *,
    batch_size: int = 64,
    config: IngestConfig | None = None,
    preprocess: Preprocess | None = None,
) -> Iterator[Batch]:
    """Decode ``items`` on a thread pool and yield them in batches, in order.

    Batch ``j`` covers ``items[j * batch_size : (j + 1) * batch_size]``; its records keep the items'
    order, and a file that cannot be decoded becomes a :class:`SkippedFile` of that batch: it never
    raises and never shifts the other records. ``preprocess``, when given, runs on the worker
    threads, once per chunk of at most ``config.chunk_size`` images; the chunks' outputs are joined
    along the first axis (``torch.cat``, ``np.concatenate``, list or dict of those).

    Memory is bounded by ``config.prefetch_batches + 1`` batches of results plus one chunk of
    full-size images per worker. Closing the iterator early (``close()``, or leaving a
    ``with contextlib.closing(...)`` block) cancels the queued work and waits for the running
    chunks; an exception raised while iterating does the same.

    Args:
        items: what to decode, usually ``discover(source).items``; plain paths are accepted. Read
            lazily, in the calling thread.
        batch_size: items per batch (>= 1).
        config: threads, prefetch, chunk size and the pixel limit; ``IngestConfig()`` when None.
        preprocess: the encoder's ``preprocess`` (thread-safe): a list of RGB images to a tensor
            with one row per image. Exceptions it raises propagate to the consumer.

    Returns:
        An iterator of :class:`Batch`; progress is ``batch.start + batch.n_items`` items done.

    Raises:
        InvalidArgumentError: ``batch_size`` is not a positive int (raised at the call), or
            ``preprocess`` returned a number of rows other than the number of images, or a type
            whose chunks cannot be joined (raised while iterating).

    Example:
        >>> source = discover("photos/")
        >>> for batch in iter_batches(source.items, batch_size=64, preprocess=encoder.preprocess):
        ...     if batch.records:
        ...         features = encoder.encode_pixels(batch.pixels)
        ...     skipped.extend(batch.skipped)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    if preprocess is not None and not callable(preprocess):
        raise InvalidArgumentError(
            "preprocess must be a callable taking a list of images, "
            f"got {type(preprocess).__name__}"
        )
    return _iter_batches(items, batch_size, config or IngestConfig(), preprocess)


def _iter_batches(
    items: Iterable[SourceItem | str | os.PathLike[str]],
    batch_size: int,
    config: IngestConfig,
    preprocess: Preprocess | None,
) -> Iterator[Batch]:
    chunk_size = min(config.chunk_size, batch_size)
    source = iter(items)
    # Register every Pillow plugin now, in this thread: Image.open() loads them lazily, and two
    # threads doing that at once can make one of them miss a format (a TIFF "not an image").
    Image.init()
    pool = (
        ThreadPoolExecutor(config.workers, thread_name_prefix="crossrank-decode")
        if config.workers > 0
        else None
    )
    pending: deque[tuple[int, list[Future[_ChunkResult] | _Deferred]]] = deque()
    next_start = 0
    exhausted = False

    def submit_batch() -> bool:
        nonlocal next_start
        batch_items: list[SourceItem] = []
        for raw in source:
            batch_items.append(_as_item(raw))
            if len(batch_items) == batch_size:
                break
        if not batch_items:
            return False
        tasks: list[Future[_ChunkResult] | _Deferred] = []
        for lo in range(0, len(batch_items), chunk_size):
            chunk = batch_items[lo : lo + chunk_size]
            if pool is None:
                run = functools.partial(_run_chunk, chunk, config.max_pixels, preprocess)
                tasks.append(_Deferred(run))
            else:
                tasks.append(pool.submit(_run_chunk, chunk, config.max_pixels, preprocess))
        pending.append((next_start, tasks))
        next_start += len(batch_items)
        return len(batch_items) == batch_size

    try:
        while True:
            # The batch about to be assembled plus `prefetch_batches` more are in flight; while
            # the consumer holds a batch, exactly the next `prefetch_batches` are being decoded.
            while not exhausted and len(pending) < config.prefetch_batches + 1:
                exhausted = not submit_batch()
            if not pending:
                return
            start, tasks = pending.popleft()
            yield _assemble(start, [t.result() for t in tasks], preprocess is not None)
    finally:
        for _, tasks in pending:
            for task in tasks:
                task.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _run_chunk(
    items: list[SourceItem], max_pixels: int, preprocess: Preprocess | None
) -> _ChunkResult:
    records: list[ImageRecord] = []
    images: list[Image.Image] = []
    skipped: list[SkippedFile] = []
    for item in items:
        try:
            image, record = _decode(item, max_pixels)
        except _Unreadable as e:
            text = path_text(item.path)  # valid UTF-8 even when the name is not
            logger.debug("skipping %s: %s", text, e.reason)
            skipped.append(SkippedFile(path=text, reason=e.reason))
            continue
        records.append(record)
        images.append(image)
    if preprocess is None:
        return _ChunkResult(records, images, None, skipped)
    pixels = None
    if images:
        try:
            pixels = preprocess(images)
        except Exception as e:
            e.add_note(f"raised by preprocess on {len(images)} images from {_describe(records)}")
            raise
        rows = _rows(pixels)
        if rows is not None and rows != len(images):
            raise InvalidArgumentError(
                f"preprocess returned {rows} rows for {len(images)} images; it must return one "
                "row per image, in order"
            )
    return _ChunkResult(records, None, pixels, skipped)


def _describe(records: list[ImageRecord]) -> str:
    first = records[0].item.path
    return f"{first}" if len(records) == 1 else f"{first} (+{len(records) - 1} more)"


def _rows(x: Any) -> int | None:
    if isinstance(x, Mapping):
        return _rows(next(iter(x.values()))) if x else None
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    if isinstance(x, list):
        return len(x)
    return None


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if type(first).__module__.partition(".")[0] == "torch":
        import torch

        return torch.cat(parts, dim=0)
    if isinstance(first, np.ndarray):
        return np.concatenate(parts, axis=0)
    if isinstance(first, list):
        return [row for part in parts for row in part]
    if isinstance(first, Mapping):
        return {key: _concat([part[key] for part in parts]) for key in first}
    raise InvalidArgumentError(
        f"preprocess returned a {type(first).__name__}, which cannot be joined across the chunks "
        "of a batch; return a torch.Tensor, a numpy array, a list or a dict of those, or set "
        "IngestConfig.chunk_size >= batch_size"
    )


def _assemble(start: int, results: list[_ChunkResult], preprocessed: bool) -> Batch:
    records = [r for res in results for r in res.records]
    skipped = [s for res in results for s in res.skipped]
    if not preprocessed:
        images = [im for res in results for im in (res.images or [])]
        return Batch(records=records, images=images, pixels=None, skipped=skipped, start=start)
    parts = [res.pixels for res in results if res.pixels is not None]
    pixels = None if not parts else parts[0] if len(parts) == 1 else _concat(parts)
    return Batch(records=records, images=None, pixels=pixels, skipped=skipped, start=start)
