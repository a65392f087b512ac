"""Where each reranker layer's keys and values come from (one forward, B queries x k candidates).

A :class:`KVSource` answers one layer's cross-attention: ``attend(layer, q, channels)``. The
reranker picks one per layer for each call (:class:`AttentionPath` and the input decide):

- :class:`CachedKV`: keys/values an index stored (:class:`~crossrank.rerank.kv_cache.PatchKV`);
- :class:`~crossrank.rerank.folding.FoldedKV`: attention over the prepared patches x̃ with the
  key/value projections folded into the query side (:mod:`crossrank.rerank.folding`);
- :class:`ProjectedKV`: project the live patch states to keys/values in this call (the
  reference; patch self-attention runs here).

All of them share one :class:`PatchStates`, the candidates' patch stream, which back-attention
updates from layer to layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from crossrank.rerank.layers import RerankerLayer, attend

__all__ = ["CachedKV", "KVSource", "PatchStates", "ProjectedKV", "attend_kv", "with_channels"]


class PatchStates:
    """The candidates' patch stream during one forward.

    Args:
        project: the patch projection ``d_v -> width`` (the reranker's ``patch_in``).
        normed: ``(B, k, P, d_v)`` the layer-normalised patches before the position embedding,
            or None with a cache.
        keep: ``(B, k, 1, 1, P)`` bool, True = a real patch; None = all real.
        states: ``(B, k, P, width)`` states to start from (a cache's), or None: then x̃ is
            projected on first use, so that layers that never read the states never project.
        pos: ``(P, d_v)`` the position embedding added to ``normed`` to make x̃, or None.
        owned: whether ``normed`` is this stream's own tensor (not the caller's input), so that
            x̃ may be made in place on it when autograd is off.
    """

    def __init__(
        self,
        project: nn.Module,
        normed: torch.Tensor | None,
        keep: torch.Tensor | None,
        states: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
        owned: bool = False,
    ) -> None:
        self.normed, self.pos, self.keep, self._owned = normed, pos, keep, owned
        self._project, self._states, self._prepared = project, states, None

    @property
    def prepared(self) -> torch.Tensor | None:
        """``(B, k, P, d_v)`` the prepared patches x̃ = ``normed + pos``, made on first use."""
        if self._prepared is None and self.normed is not None:
            # In place when nothing else holds the LayerNorm's output (no autograd to feed).
            if self.pos is None:
                self._prepared = self.normed
            elif self._owned and not torch.is_grad_enabled():
                self._prepared = self.normed.add_(self.pos)
            else:
                self._prepared = self.normed + self.pos
            self.normed = None  # x̃ replaces it
        return self._prepared

    @property
    def states(self) -> torch.Tensor:
        """``(B, k, P, width)`` the current patch states."""
        if self._states is None:
            self._states = self._project(self.prepared)  # (B, k, P, width)
        return self._states

    @states.setter
    def states(self, value: torch.Tensor) -> None:
        self._states = value


class KVSource:
    """One layer's keys/values over the candidates' patches.

    Args:
        patches: the patch stream shared by every layer of the forward.
    """

    def __init__(self, patches: PatchStates) -> None:
        self.patches = patches

    def attend(
        self, layer: RerankerLayer, q: torch.Tensor, channels: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cross-attention branch of ``layer`` (before its gate).

        Args:
            layer: the layer whose ``cross_attn`` attends.
            q: ``(B, 1|k, heads, n, head_dim)`` projected queries.
            channels: per-patch channels to average with the attention weights (see
                :func:`with_channels`).

        Returns:
            ``(B, k, n, width)``, and the channels' averages ``(B, k, n, heads, c)`` (None
            without channels).
        """
        raise NotImplementedError


class ProjectedKV(KVSource):
    """Project the live patch states to keys and values in this call (the reference path)."""

    def attend(
        self, layer: RerankerLayer, q: torch.Tensor, channels: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        keys, values = layer.patch_kv(self.patches)  # (B, k, heads, P, head_dim) each
        return attend_kv(layer, q, keys, values, self.patches.keep, channels)


class CachedKV(KVSource):
    """Keys and values precomputed per image (:meth:`CrossAttentionReranker.precompute_kv`).

    Args:
        patches: the patch stream (the cache's states, for later layers of a bidirectional
            model).
        keys: ``(B, k, heads, P, head_dim)``.
        values: the same shape.
    """

    def __init__(self, patches: PatchStates, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(patches)
        self.keys, self.values = keys, values

    def attend(
        self, layer: RerankerLayer, q: torch.Tensor, channels: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return attend_kv(layer, q, self.keys, self.values, self.patches.keep, channels)


def attend_kv(
    layer: RerankerLayer,
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    keep: torch.Tensor | None,
    channels: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s cross-attention of queries ``q`` over ``keys``/``values``
    ``(B, k, heads, P, head_dim)``; arguments and result as :meth:`KVSource.attend`."""
    attn, head_dim = layer.cross_attn, keys.shape[-1]
    out = attend(
        q, keys, with_channels(values, channels), keep, attn.scale, layer.top_m
    )  # (B, k, heads, n, head_dim + c)
    averages = None
    if channels:
        averages = out[..., head_dim:].transpose(-3, -2)  # (B, k, n, heads, c)
        out = out[..., :head_dim]  # (B, k, heads, n, head_dim)
    return attn.output(out), averages  # (B, k, n, width)


def with_channels(values: torch.Tensor, channels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(..., P, e)`` values with per-patch ``channels`` appended (each broadcastable to
    ``(..., P, c_i)``), so that each head also returns their attention-weighted averages (more
    value channels, the same softmax); ``values`` itself when there are none."""
    if not channels:
        return values
    lead = values.shape[:-1]
    more = [c.to(values.dtype).expand(*lead, c.shape[-1]) for c in channels]  # (..., P, c_i)
    return torch.cat([values, *more], dim=-1)  # (..., P, e + c)
