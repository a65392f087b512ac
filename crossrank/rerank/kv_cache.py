"""The patch key/value cache of the cross-attention reranker: what an index would store per image.

:meth:`~crossrank.rerank.CrossAttentionReranker.precompute_kv` makes a :class:`PatchKV` from
stored patch features once; a query then reads its candidates' rows (:meth:`PatchKV.select`) and
attends to them with no projection of the patches. The cache belongs to one set of reranker
weights: retraining the reranker means recomputing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PatchKV"]


@dataclass
class PatchKV:
    """Query-independent patch keys and values, computed once per image (index time).

    Leading dims ``(*lead)`` are those of the patches given to
    :meth:`CrossAttentionReranker.precompute_kv`, typically ``(n_images,)``.

    Attributes:
        keys: one ``(*lead, heads, P, head_dim)`` tensor per precomputed layer.
        values: the same shapes.
        mask: ``(*lead, P)`` bool, True = a real patch; None = all real.
        states: ``(*lead, P, width)`` patch states after the precomputed layers' patch
            self-attention; only with ``bidirectional`` (layer 1's back-attention updates them).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: torch.Tensor | None = None
    states: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.keys[0].shape[0])

    def select(self, rows: torch.Tensor | slice) -> PatchKV:
        """The cache of some images along the first dim (e.g. a query's candidate rows)."""
        return PatchKV(
            keys=tuple(t[rows] for t in self.keys),
            values=tuple(t[rows] for t in self.values),
            mask=None if self.mask is None else self.mask[rows],
            states=None if self.states is None else self.states[rows],
        )

    def unsqueeze(self, dim: int) -> PatchKV:
        """Add a size-1 dim at ``dim`` (counted from the front) to every tensor."""
        return PatchKV(
            keys=tuple(t.unsqueeze(dim) for t in self.keys),
            values=tuple(t.unsqueeze(dim) for t in self.values),
            mask=None if self.mask is None else self.mask.unsqueeze(dim),
            states=None if self.states is None else self.states.unsqueeze(dim),
        )
