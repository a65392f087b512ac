"""Pooling of the reranker's query-side states: one vector per candidate for the score head."""

from __future__ import annotations

from collections.abc import Callable

import torch

from crossrank.rerank.config import Pooling

__all__ = ["POOLINGS", "first_pool", "mean_pool"]


def mean_pool(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mean over the real positions.

    Args:
        x: ``(B, k, n, width)`` states.
        keep: ``(B, 1, n)`` bool, True = a real position (each row needs one).

    Returns:
        ``(B, k, width)``.
    """
    # masked_fill, not a multiply: a padding row is excluded even if it holds inf or NaN.
    total = x.masked_fill(~keep[..., None], 0.0).sum(dim=-2)  # (B, k, width)
    return total / keep.sum(dim=-1, keepdim=True).to(x.dtype)  # (B, k, width)


def first_pool(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The state of the first real position (arguments and result as :func:`mean_pool`)."""
    first = keep.int().argmax(dim=-1)  # (B, 1): the first real position
    index = first[..., None, None].expand(*x.shape[:-2], 1, x.shape[-1])  # (B, k, 1, width)
    return x.gather(-2, index).squeeze(-2)  # (B, k, width)


#: The pooling function of each :class:`~crossrank.rerank.config.Pooling` mode.
POOLINGS: dict[Pooling, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    Pooling.MEAN: mean_pool,
    Pooling.FIRST: first_pool,
}
