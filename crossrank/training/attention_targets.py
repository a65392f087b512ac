"""Attention supervision from scene graphs: where each object a caption names lies in its image.

On a shapes dataset a caption's objects and their grid cells are known. ``crossrank train
--attention-supervision W`` pulls the last cross-attention layer's attention (heads averaged) of
each named object's shape word ("circle" in "a red circle left of a blue square") onto the
patches of that object's cell, on the true caption of each caption-negative list. Finding each
object is then learned directly, instead of only through a relation loss that gives no gradient
until finding and comparing both work (measured by `research/relation_probe.py`, option `sup`).

- :func:`object_token_positions`: per caption bank row, the token position of each object's shape
  word, from the tokenizer's character offsets;
- :func:`object_cell_masks`: per (caption row, image), the patches under each named object's
  cell, as ``attend_to`` channels for :meth:`CrossAttentionReranker.forward_batch`;
- :func:`attention_supervision_loss`: the mean negative log attention mass on those patches.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from crossrank.datasets.config import GRID, Shape
from crossrank.errors import InvalidArgumentError

__all__ = [
    "attention_supervision_loss",
    "cell_patches",
    "object_cell_masks",
    "object_token_positions",
]

_SHAPE_WORDS = frozenset(s.value for s in Shape)
_CHUNK = 2048  # texts per tokenizer call


def object_token_positions(tokenizer: Any, texts: list[str], max_length: int) -> np.ndarray:
    """``(len(texts), 2)`` int64: the token position of the first and of the last shape word of
    each text (the first and second object of a two-object caption; -1 where a text names fewer
    objects, or the word was truncated away). A word split into several tokens gives its last.

    Args:
        tokenizer: the text encoder's (fast) tokenizer, called as the encoder calls it.
        texts: caption bank texts, e.g. ``"a red circle left of a blue square"``.
        max_length: the encoder's token limit.

    Raises:
        InvalidArgumentError: the tokenizer gives no character offsets (not a fast tokenizer).
    """
    out = np.full((len(texts), 2), -1, dtype=np.int64)
    for lo in range(0, len(texts), _CHUNK):
        chunk = texts[lo : lo + _CHUNK]
        try:
            enc = tokenizer(
                chunk, return_offsets_mapping=True, truncation=True, max_length=max_length
            )
        except NotImplementedError as e:
            raise InvalidArgumentError(
                "attention supervision needs a fast tokenizer (character offsets locate "
                "each object "
                f"word): {e}; train without --attention-supervision"
            ) from None
        for i, (text, offsets) in enumerate(zip(chunk, enc["offset_mapping"], strict=True)):
            spans, start = [], 0
            for word in text.split(" "):
                if word in _SHAPE_WORDS:
                    spans.append((start, start + len(word)))
                start += len(word) + 1
            for k, (a, b) in enumerate(spans[:1] + spans[1:][-1:]):
                # The word's last token: in a causal text encoder it has read the whole word.
                hits = [t for t, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
                out[lo + i, k] = hits[-1] if hits else -1
    return out


def cell_patches(n_patches: int) -> np.ndarray:
    """``(GRID, GRID, P)`` float32: 1 for the patches whose centre lies in each grid cell."""
    side = round(n_patches**0.5)
    if side * side != n_patches:
        raise InvalidArgumentError(
            f"attention supervision needs a square patch grid, got {n_patches} patches per image"
        )
    cell = ((2 * np.arange(side) + 1) * GRID) // (2 * side)  # the cell under each patch row/column
    out = np.zeros((GRID, GRID, side, side), dtype=np.float32)
    for r in range(GRID):
        for c in range(GRID):
            out[r, c] = (cell[:, None] == r) & (cell[None, :] == c)  # patches row-major, as stored
    return out.reshape(GRID, GRID, n_patches)


def object_cell_masks(
    specs: Any, scenes: Any, rows: np.ndarray, images: np.ndarray, n_patches: int
) -> np.ndarray:
    """``(len(rows), P, 2)`` float32: for each caption row on its image, the patches under the
    cell of the object its spec names first (channel 0) and second (channel 1); every object that
    matches (colour, shape and, if named, size) counts; all zero when none does or the spec names
    no second object.

    Args:
        specs: the caption bank's ``SpecArrays``.
        scenes: the images' ``SceneArrays`` (indexed by ``images``).
        rows: caption bank rows.
        images: one image per row.
        n_patches: patches per image (a square grid).
    """
    cells = cell_patches(n_patches)  # (GRID, GRID, P)
    sc = scenes.take(images)
    out = np.zeros((rows.size, n_patches, 2), dtype=np.float32)
    for k, prefix in enumerate(("a", "b")):
        colour = getattr(specs, f"{prefix}_colour")[rows][:, None]  # (n, 1)
        shape = getattr(specs, f"{prefix}_shape")[rows][:, None]
        size = getattr(specs, f"{prefix}_size")[rows][:, None]
        match = (
            (colour >= 0)
            & (sc.colour == colour)
            & (sc.shape == shape)
            & ((size < 0) | (sc.size == size))
        )
        for slot in range(match.shape[1]):  # (n, MAX_OBJECTS)
            hit = np.flatnonzero(match[:, slot])
            if hit.size:
                out[hit, :, k] = np.maximum(
                    out[hit, :, k], cells[sc.row[hit, slot], sc.col[hit, slot]]
                )
    return out


def attention_supervision_loss(
    attended: torch.Tensor, positions: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor | None, float | None]:
    """The mean of ``-log(attention mass on the object's patches)`` over the named objects.

    Args:
        attended: ``(B, n, 2)`` float32, the last layer's attention mass of every query position
            on each object's patches (``forward_batch(attend_to=masks)``).
        positions: ``(B, 2)`` int64 query positions of the objects' words, -1 = none.
        masks: ``(B, P, 2)`` the objects' patch masks (an all-zero mask: the object is absent).

    Returns:
        ``(loss, mean mass)``, or ``(None, None)`` when no object is supervised.
    """
    use = (positions >= 0) & (masks.sum(dim=1) > 0)  # (B, 2)
    if not bool(use.any()):
        return None, None
    index = positions.clamp_min(0)[:, None, :]  # (B, 1, 2)
    mass = attended.gather(1, index).squeeze(1)  # (B, 2): object k's word on object k's mask
    mass = mass[use]
    return -mass.clamp_min(1e-6).log().mean(), float(mass.detach().mean())
