"""Attention building blocks and the layer of the cross-attention reranker (private).

Tensors carry any number of leading batch dims (``(B, k, ...)`` for B queries with k candidates
each); a size-1 dim broadcasts, so a query-side tensor of shape ``(B, 1, ...)`` meets the k
candidates without being copied. Masks are bool, True = attend.

A :class:`RerankerLayer` runs its blocks in order, each a pre-norm residual branch with its own
(optional) tanh gate; the config chooses which blocks exist::

    [query self-attention]  x = x + g·SelfAttn(LN(x))
    [patch self-attention]  p = p + g·SelfAttn(LN(p))      (inside the key/value source)
    cross-attention         x = x + g·Attn(LN(x), keys/values from the key/value source)
    [back-attention]        p = p + g·Attn(LN(p), LN(x))
    MLP                     x = x + g·MLP(LN(x))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossrank.rerank.config import RerankerConfig

if TYPE_CHECKING:
    from crossrank.rerank.kv_source import KVSource, PatchStates

__all__ = [
    "Attention",
    "MLP",
    "RerankerLayer",
    "attend",
    "gate",
    "merge_heads",
    "split_heads",
    "top_m_mask",
]


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., n, width)`` -> ``(..., heads, n, head_dim)``."""
    *lead, n, width = x.shape
    return x.view(*lead, n, heads, width // heads).transpose(-2, -3)  # (..., heads, n, head_dim)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(..., heads, n, head_dim)`` -> ``(..., n, width)``."""
    *lead, heads, n, head_dim = x.shape
    return x.transpose(-2, -3).reshape(*lead, n, heads * head_dim)  # (..., n, width)


def top_m_mask(
    q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None, m: int, scale: float
) -> torch.Tensor:
    """Keep, for each query row, only its ``m`` highest-scoring real keys.

    The selection is made on float32 logits without gradient (a hard top-m is not differentiable;
    the kept logits still are, inside the attention).

    Args:
        q: ``(..., heads, n, e)`` queries.
        k: ``(..., heads, S, e)`` keys.
        keep: bool, broadcastable to ``(..., heads, n, S)``, True = a real key; None = all real.
        m: keys kept per query row (``m >= S`` keeps all real keys).
        scale: the attention's logit scale (does not change the order; kept for clarity).

    Returns:
        ``(..., heads, n, S)`` bool: ``keep`` and among the row's top ``m``.
    """
    with torch.no_grad():
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (..., heads, n, S)
        if keep is None:
            keep = torch.ones((), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(~keep, float("-inf"))
        top = logits.topk(min(m, logits.shape[-1]), dim=-1).indices  # (..., heads, n, m)
        selected = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
    # Rows with fewer than m real keys pick some padding in the top m: the `& keep` drops it.
    return selected & keep  # (..., heads, n, S)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keep: torch.Tensor | None,
    scale: float,
    top_m: int | None = None,
) -> torch.Tensor:
    """Masked multi-head attention via ``F.scaled_dot_product_attention``.

    Args:
        q: ``(..., heads, n, e)``; leading dims broadcast against ``k``'s (a shared query side
            of shape ``(B, 1, ...)`` is never copied per candidate by this code).
        k: ``(..., heads, S, e)``.
        v: ``(..., heads, S, ev)``.
        keep: bool, broadcastable to ``(..., heads, n, S)``, True = attend. Every row needs at
            least one True (the public checks guarantee a real patch and a real token). None:
            attend to every key (no mask reaches the kernel, which is then a little faster).
        scale: the logit scale, ``head_dim ** -0.5``.
        top_m: attend only to each row's top-m real keys by logit; None = all.

    Returns:
        ``(..., heads, n, ev)``.
    """
    if keep is not None and keep.ndim < q.ndim:
        keep = keep.view((1,) * (q.ndim - keep.ndim) + tuple(keep.shape))  # (1.., *keep.shape)
    if top_m is not None and top_m < k.shape[-2]:
        keep = top_m_mask(q, k, keep, top_m, scale)  # (..., heads, n, S)
    shapes = [
        q.shape[:-3],
        k.shape[:-3],
        v.shape[:-3],
        *([] if keep is None else [keep.shape[:-3]]),
    ]
    # numpy's rule is torch's; torch.broadcast_shapes imports sympy on its first call (0.2 s of
    # every cold search).
    lead = torch.Size(np.broadcast_shapes(*(tuple(s) for s in shapes)))
    if len(lead) == 1:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep, scale=scale
        )  # (N, heads, n, ev)
    # The fused CPU/CUDA kernels take one batch dim; with more, SDPA falls back to the unfused
    # math path (2.5x slower on the CPU here). Flattening is a view for the candidate-side tensors;
    # a shared query side (size-1 candidate dim) is materialised per candidate by the reshape,
    # k * n * width floats, small next to the k * P * width of the keys.
    mask = None if keep is None else _flat(keep, lead)
    out = F.scaled_dot_product_attention(
        _flat(q, lead), _flat(k, lead), _flat(v, lead), attn_mask=mask, scale=scale
    )  # (prod(lead), heads, n, ev)
    return out.view(*lead, *out.shape[-3:])  # (..., heads, n, ev)


def _flat(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """``(*lead', a, b, c)`` broadcast to ``(*lead, a, b, c)`` -> ``(prod(lead), a, b, c)``."""
    return x.expand(*lead, *x.shape[-3:]).reshape(-1, *x.shape[-3:])  # (prod(lead), a, b, c)


class Attention(nn.Module):
    """Multi-head attention with separate q, k, v and output projections (width -> width).

    Keeping k and v apart (not one fused ``kv`` Linear) lets the reranker precompute them and
    fold them (see :class:`~crossrank.rerank.CrossAttentionReranker`).
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (width // heads) ** -0.5
        self.q = nn.Linear(width, width)
        # No key bias: it would add the same q·b_k to every logit of a row (softmax-invariant).
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def project_kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(..., S, width)`` -> keys and values, each ``(..., heads, S, head_dim)``."""
        return split_heads(self.k(source), self.heads), split_heads(self.v(source), self.heads)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n, width)`` -> ``(..., heads, n, head_dim)``."""
        return split_heads(self.q(x), self.heads)

    def output(self, heads_out: torch.Tensor) -> torch.Tensor:
        """``(..., heads, n, head_dim)`` -> ``(..., n, width)`` through the output projection."""
        return self.drop(self.o(merge_heads(heads_out)))

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        keep: torch.Tensor | None,
        top_m: int | None = None,
    ) -> torch.Tensor:
        """Rows of ``x`` ``(..., n, width)`` attend to ``source`` ``(..., S, width)``.

        Args:
            x: the attending states, ``(..., n, width)``.
            source: the attended states, ``(..., S, width)``.
            keep: bool broadcastable to ``(..., heads, n, S)``, True = attend; None = all.
            top_m: see :func:`attend`.

        Returns:
            ``(..., n, width)``.
        """
        keys, values = self.project_kv(source)  # (..., heads, S, head_dim) each
        queries = self.project_q(x)  # (..., heads, n, head_dim)
        out = attend(queries, keys, values, keep, self.scale, top_m)  # (..., heads, n, head_dim)
        return self.output(out)


class MLP(nn.Module):
    """``Linear -> GELU -> Linear`` with dropout, width -> hidden -> width."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.proj = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., width)`` -> ``(..., width)``."""
        hidden = self.fc(x)  # (..., hidden)
        # In place without autograd (inference): the same values, one allocation fewer.
        hidden = F.gelu(hidden) if torch.is_grad_enabled() else torch.ops.aten.gelu_(hidden)
        return self.drop(self.proj(self.drop(hidden)))


def gate(gate: nn.Parameter | None, branch: torch.Tensor) -> torch.Tensor:
    """``tanh(gate) * branch`` (Flamingo, Alayrac et al. 2022), or ``branch`` for an ungated
    model (``gate`` None)."""
    return branch if gate is None else torch.tanh(gate) * branch


class RerankerLayer(nn.Module):
    """One reranker layer: [query self-attention], [patch self-attention], cross-attention,
    [back-attention], MLP; the blocks a config leaves out are None.

    The weights keep flat names (``cross_norm``, ``cross_attn``, ``cross_gate``, ...): they are
    the checkpoint format.

    Args:
        config: the architecture.
        index: the layer's position, from 0 (layer 1's key/value source reads the patch stream
            without a LayerNorm, so that it can be folded or precomputed).
    """

    def __init__(self, config: RerankerConfig, index: int) -> None:
        super().__init__()
        w, heads, drop = config.width, config.heads, config.dropout
        self.index = index
        self.top_m = config.sparse_top_m
        # Creation order is parameter order (seeded initialisation, optimizer state): keep it.
        self.patch_norm, self.patch_attn = (
            (nn.LayerNorm(w), Attention(w, heads, drop))
            if config.patch_self_attention
            else (None, None)
        )
        self.query_norm, self.query_attn = (
            (nn.LayerNorm(w), Attention(w, heads, drop))
            if config.query_self_attention
            else (None, None)
        )
        self.cross_norm = nn.LayerNorm(w)
        # Keys/values read the patch stream through a LayerNorm only once a residual branch has
        # updated it; the stream entering layer 1 is a linear map of x̃, which folding requires.
        updated = config.patch_self_attention or (config.bidirectional and index > 0)
        self.cross_kv_norm = nn.LayerNorm(w) if updated else nn.Identity()
        self.cross_attn = Attention(w, heads, drop)
        self.back_norm, self.back_kv_norm, self.back_attn = (
            (nn.LayerNorm(w), nn.LayerNorm(w), Attention(w, heads, drop))
            if config.bidirectional
            else (None, None, None)
        )
        self.mlp_norm = nn.LayerNorm(w)
        self.mlp = MLP(w, config.mlp_hidden, drop)
        names = ["cross_gate", "mlp_gate"]
        names += ["patch_gate"] if config.patch_self_attention else []
        names += ["query_gate"] if config.query_self_attention else []
        names += ["back_gate"] if config.bidirectional else []
        for name in names:
            self.register_parameter(name, nn.Parameter(torch.zeros(())) if config.gated else None)

    def forward(
        self,
        x: torch.Tensor,
        kv: KVSource,
        token_keep: torch.Tensor,
        channels: Sequence[torch.Tensor] = (),
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the layer's blocks over the query side and the candidates' patches.

        Args:
            x: ``(B, 1|k, n, width)`` query-side states (size 1 along k until the first
                cross-attention makes them per candidate).
            kv: where this layer's keys/values come from (precomputed, folded or projected);
                ``kv.patches`` holds the candidates' patch states, which back-attention updates.
            token_keep: ``(B, 1, 1, 1, n)`` bool, True = a real query-side position.
            channels: per-patch channels the cross-attention also averages with its weights
                (see :func:`~crossrank.rerank.kv_source.with_channels`); none: no averages.

        Returns:
            ``(B, k, n, width)`` states, and the channels' averages ``(B, k, n, heads, c)``
            (None without channels).
        """
        if self.query_attn is not None:
            x = self.query_self_attend(x, token_keep)  # (B, 1|k, n, width)
        q = self.cross_attn.project_q(self.cross_norm(x))  # (B, 1|k, heads, n, head_dim)
        read, averages = kv.attend(self, q, channels)  # (B, k, n, width), (B, k, n, heads, c)
        x = x + gate(self.cross_gate, read)  # (B, k, n, width)
        if self.back_attn is not None:
            kv.patches.states = self.back_attend(kv.patches.states, x, token_keep)  # (B, k, P, w)
        x = x + gate(self.mlp_gate, self.mlp(self.mlp_norm(x)))  # (B, k, n, width)
        return x, averages

    def query_self_attend(self, x: torch.Tensor, token_keep: torch.Tensor) -> torch.Tensor:
        """``(..., n, width)`` -> the same, after self-attention among the query-side positions.

        After a cross-attention, each position holds what it read in one candidate; letting the
        positions read each other is what can compare two objects' positions ("left of").
        """
        h = self.query_norm(x)  # (..., n, width)
        return x + gate(self.query_gate, self.query_attn(h, h, token_keep))  # (..., n, width)

    def patch_self_attend(self, p: torch.Tensor, patch_keep: torch.Tensor | None) -> torch.Tensor:
        """``(..., P, width)`` -> the same, after self-attention among a candidate's patches."""
        h = self.patch_norm(p)  # (..., P, width)
        return p + gate(self.patch_gate, self.patch_attn(h, h, patch_keep))  # (..., P, width)

    def back_attend(
        self, p: torch.Tensor, x: torch.Tensor, token_keep: torch.Tensor
    ) -> torch.Tensor:
        """``(B, k, P, width)`` patch states -> the same, after they attend to the query side
        ``x`` ``(B, k, n, width)`` (bidirectional)."""
        back = self.back_attn(
            self.back_norm(p), self.back_kv_norm(x), token_keep
        )  # (B, k, P, width)
        return p + gate(self.back_gate, back)  # (B, k, P, width)

    def patch_kv(self, patches: PatchStates) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values projected from the live patch states, after its patch
        self-attention (which updates ``patches.states``).

        Returns:
            Keys and values, each ``(..., heads, P, head_dim)``.
        """
        if self.patch_attn is not None:
            patches.states = self.patch_self_attend(patches.states, patches.keep)  # (..., P, w)
        source = self.cross_kv_norm(patches.states)  # (..., P, width)
        return self.cross_attn.project_kv(source)  # (..., heads, P, head_dim) each
