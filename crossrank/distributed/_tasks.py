"""What runs on the Ray workers of a build: decode tasks and the encoder actor.

Both keep to plain numpy columns (Ray Data's ``numpy`` batch format), so a batch crosses the
object store without pickling Python objects row by row. Rows keep their position in the source
(``pos``), which is the order ids are given in.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CRASH_ONCE_ENV", "EncodeActor", "decode_batch"]

logger = logging.getLogger(__name__)

#: Test hook: a path; the first encoder actor call that finds no file there creates it and
#: kills its own process (``os._exit``), as a node lost mid-build would. Read by the driver and
#: handed to the actors, so it works whatever environment the workers were started with.
CRASH_ONCE_ENV = "CROSSRANK_RAY_CRASH_ONCE"


def decode_batch(
    batch: dict[str, np.ndarray], *, preprocess: Any, max_pixels: int, pixel_shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """Decode and preprocess one block of files, as the one-process build does.

    The files go through :func:`crossrank.ingest.iter_batches` (one thread: Ray runs many of
    these tasks side by side), so decoding, the checks and the skip reasons are the one-process
    build's own.

    Args:
        batch: ``pos`` (int64) and ``path`` (the file name's bytes, ``os.fsencode``: a name that
            is not UTF-8 travels intact and is skipped with the usual reason).
        preprocess: the encoder's ``preprocess`` (images to ``(n, *pixel_shape)``).
        max_pixels: the decompression-bomb limit.
        pixel_shape: ``(3, H, W)`` of one preprocessed image.

    Returns:
        The columns ``pos``, ``ok`` (decoded), ``reason`` (why not, ``""`` when decoded),
        ``width``, ``height``, ``bytes``, ``mtime``, ``sha256`` and ``pixels``
        ``(n, *pixel_shape)`` float32 (zeros for a skipped file).
    """
    from crossrank.ingest import IngestConfig, SourceItem, iter_batches
    from crossrank.ingest.decode import path_text

    pos = np.asarray(batch["pos"], dtype=np.int64)
    n = len(pos)
    paths = [Path(os.fsdecode(bytes(raw))) for raw in batch["path"]]
    out: dict[str, Any] = {
        "pos": pos,
        "ok": np.zeros(n, dtype=bool),
        "reason": np.full(n, "", dtype=object),
        "width": np.zeros(n, dtype=np.int32),
        "height": np.zeros(n, dtype=np.int32),
        "bytes": np.zeros(n, dtype=np.int64),
        "mtime": np.zeros(n, dtype=np.float64),
        "sha256": np.full(n, "", dtype=object),
        "pixels": np.zeros((n, *pixel_shape), dtype=np.float32),
    }
    config = IngestConfig(workers=0, max_pixels=max_pixels, chunk_size=max(1, n))
    items = [SourceItem(p) for p in paths]
    for b in iter_batches(items, batch_size=max(1, n), config=config, preprocess=preprocess):
        # Records and skips each keep the items' order; walk both back onto the rows.
        r = s = 0
        for i, path in enumerate(paths):
            if r < len(b.records) and b.records[r].item.path == path:
                rec = b.records[r]
                out["ok"][i] = True
                out["width"][i], out["height"][i] = rec.width, rec.height
                out["bytes"][i], out["mtime"][i], out["sha256"][i] = (
                    rec.bytes,
                    rec.mtime,
                    rec.sha256,
                )
                out["pixels"][i] = np.asarray(b.pixels[r], dtype=np.float32)
                r += 1
            elif s < len(b.skipped) and b.skipped[s].path == path_text(path):
                out["reason"][i] = b.skipped[s].reason
                s += 1
            else:  # an invariant of iter_batches, not a user error
                raise RuntimeError(f"decode results out of order at {path}")
    return out


class EncodeActor:
    """One encoder, loaded once per actor; encodes the decoded rows of each batch it is given.

    Patch rows go back as float16, the form the writers take them in (they store them in the
    index's codec: :mod:`crossrank.store.codecs`).

    Args:
        model: the encoder (a Hugging Face id or folder, None for the demo model).
        device: ``auto``, ``cpu`` or ``cuda`` (``auto`` takes the GPU Ray gave the actor, if any).
        batch_size: images per forward pass.
        crash_marker: the :data:`CRASH_ONCE_ENV` test hook, or None.
    """

    def __init__(
        self,
        model: str | None,
        device: str,
        batch_size: int,
        crash_marker: str | None = None,
    ) -> None:
        from crossrank.encoders import load_encoder
        from crossrank.errors import CrossrankError

        # An error in an actor's constructor reaches the driver as a bare "actor died"; kept and
        # raised by the first call instead, it reaches the driver as itself (a ModelError: the
        # model is missing on this node).
        self.error: CrossrankError | None = None
        try:
            self.encoder = load_encoder(model, device=device, batch_size=batch_size)
        except CrossrankError as e:
            self.error = e
        self.crash_marker = crash_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        if self.crash_marker and not os.path.exists(self.crash_marker):
            Path(self.crash_marker).touch()
            logger.warning("test hook %s: this encoder actor exits now", CRASH_ONCE_ENV)
            os._exit(1)
        ok = np.asarray(batch["ok"], dtype=bool)
        n = ok.shape[0]
        enc = self.encoder
        pooled = np.zeros((n, enc.dim), dtype=np.float32)
        patches = np.zeros((n, enc.n_patches, enc.patch_dim), dtype=np.float16)
        if ok.any():
            features = enc.encode_pixels(np.ascontiguousarray(batch["pixels"][ok]))
            pooled[ok] = features.pooled
            with np.errstate(over="ignore"):  # the writer refuses values float16 cannot hold
                patches[ok] = features.patches.astype(np.float16)
        out = {key: value for key, value in batch.items() if key != "pixels"}
        out["pooled"] = pooled
        out["patches"] = patches
        return out
