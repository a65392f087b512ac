"""Settings of the ingest stage: decode threads, how far ahead they run, the pixel limit."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_PIXELS", "IngestConfig"]

# Pillow's own default for ``Image.MAX_IMAGE_PIXELS`` (1 GiB / 4 / 3 bytes per RGB pixel): such an
# image is already ~256 MiB decoded, and anything bigger is far more often an attack than a photo.
DEFAULT_MAX_PIXELS = 89_478_485


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        got = f"{type(value).__name__} {value!r}"
        raise ValueError(f"IngestConfig.{name} must be an int, got {got}")
    if value < minimum:
        raise ValueError(f"IngestConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class IngestConfig:
    """How images are read, decoded and batched.

    Memory stays bounded: at most ``prefetch_batches`` batches are decoded ahead of the batch the
    consumer holds, and a worker holds at most ``chunk_size`` full-size decoded images at a time
    (fewer once ``preprocess`` has turned them into pixel tensors).

    Example:
        >>> IngestConfig(workers=8, max_pixels=50_000_000)
        IngestConfig(workers=8, max_pixels=50000000, chunk_size=8, prefetch_batches=2)
    """

    workers: int = 4  # decode threads; 0 decodes in the calling thread (debugging, no overlap)
    max_pixels: int = DEFAULT_MAX_PIXELS  # largest width * height (from the header); more: a bomb
    chunk_size: int = 8  # images one worker task decodes (and preprocesses in one call)
    prefetch_batches: int = 2  # batches decoded ahead of the one the consumer is encoding

    def __post_init__(self) -> None:
        _check_int("workers", self.workers, 0)
        _check_int("max_pixels", self.max_pixels, 1)
        _check_int("chunk_size", self.chunk_size, 1)
        _check_int("prefetch_batches", self.prefetch_batches, 1)
