"""Folded cross-attention: the reranker attends over the stored patches without projecting them.

With ``x̃`` the prepared patches (``(B, k, P, d_v)``) and ``p = x̃ W_in^T + b`` their projection,
a layer that reads ``p`` unchanged has keys ``p W_k^T`` (no key bias: it would add the same
``q·b_k`` to every logit of a row) and values ``p W_v^T + b_v``. So:

- the score ``q·key = (q W_k W_in)·x̃ + q·(W_k b)``, whose second term is the same for every
  patch and cancels in the softmax: the queries carry ``W_k W_in`` and attention runs over x̃;
- ``softmax(..) V = (softmax(..) x̃) (W_v W_in)^T + W_v b + b_v``, since each softmax row sums
  to 1: ``W_v W_in`` is applied after the attention and the constant joins the output bias.

Possible for the layers whose keys/values are linear in x̃
(:attr:`~crossrank.rerank.config.RerankerConfig.foldable_layers`). Cost per candidate patch and
query: ``2h·n·d_v`` per layer (attention over d_v-wide patches, once per head) against
``d_v·w + 2w²`` (projections) + ``2n·w`` plain, so folding pays off while ``h·n·d_v`` stays below
about ``w²``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from crossrank.rerank.autocast import autocast_off
from crossrank.rerank.kv_source import KVSource, PatchStates
from crossrank.rerank.layers import Attention, RerankerLayer

__all__ = ["FoldCache", "FoldedKV", "folded_weights"]

#: Layer index -> (versions of the weights read, folded maps). Not module state.
FoldCache = dict[int, tuple[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


class FoldedKV(KVSource):
    """Cross-attention over x̃ with W_k folded into the queries and W_v applied afterwards.

    Args:
        patches: the patch stream (``patches.prepared`` is x̃).
        patch_in: the patch projection ``d_v -> width`` folded into the maps.
        cache: where the folded maps are kept across inference calls (see
            :func:`folded_weights`).
    """

    def __init__(self, patches: PatchStates, patch_in: nn.Linear, cache: FoldCache) -> None:
        super().__init__(patches)
        self.patch_in, self.cache = patch_in, cache

    def attend(
        self, layer: RerankerLayer, q: torch.Tensor, channels: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = layer.cross_attn
        w_k, w_v, b_out = folded_weights(attn, self.patch_in, self.cache, layer.index)
        heads, head_dim, d_v = w_k.shape
        n = q.shape[-2]
        # x̃ = LN(patches) + pos, made once per forward (in place on the LayerNorm's output).
        prepared = self.patches.prepared  # (B, k, P, d_v)
        n_batch, k, n_patches = prepared.shape[:3]
        rows = n * heads  # token-major (n, heads): the output then reshapes to (n, width)
        # All heads attend over the same x̃: stack them along the query rows, one d_v-wide head.
        # The kept maps are float32; under autocast q is not. Cast here, not in einsum: its
        # decomposition under a dispatch mode (a FLOP counter) passes autocast by.
        w_q = (w_k * attn.scale).to(q.dtype)
        q_fold = torch.einsum("...hnd,hde->...nhe", q, w_q)  # (B, 1|k, n, h, d_v)
        q_fold = q_fold.reshape(*q.shape[:-3], rows, d_v)  # (B, 1|k, rows, d_v)
        flat = prepared.reshape(n_batch * k, n_patches, d_v)  # (N, P, d_v), N = B * k
        if q_fold.shape[0] == 1 and q_fold.shape[1] == 1:
            queries = q_fold[0, 0].expand(n_batch * k, rows, d_v)  # a view: no copy per candidate
        else:
            queries = q_fold.expand(n_batch, k, rows, d_v).reshape(-1, rows, d_v)
        # An explicit softmax, not F.scaled_dot_product_attention: the channels' averages need the
        # weights, and SDPA's fused CPU kernels refuse values wider than the keys.
        logits = torch.bmm(queries, flat.transpose(1, 2))  # (N, rows, P)
        keep = self.patches.keep  # (B, k, 1, 1, P) | None
        if keep is not None:
            logits.masked_fill_(~keep.reshape(n_batch * k, 1, n_patches), float("-inf"))
        if layer.top_m is not None and layer.top_m < n_patches:
            top = logits.topk(layer.top_m, dim=-1).indices  # (N, rows, m)
            chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, top, True)
            logits.masked_fill_(~chosen, float("-inf"))  # padding picked in a top m stays -inf
        weights = torch.softmax(logits, dim=-1)  # (N, rows, P)
        out = torch.bmm(weights, flat)  # (N, rows, d_v)
        averages = None
        if channels:
            parts = []
            for c in channels:
                if c.ndim == 2:  # (P, c), the same for every candidate: one matrix multiply
                    part = weights.view(-1, n_patches) @ c.to(weights.dtype)  # (N * rows, c)
                    parts.append(part.view(n_batch * k, rows, -1))
                else:  # (B, k, 1, P, c): per candidate
                    per = c.to(weights.dtype).expand(n_batch, k, 1, n_patches, c.shape[-1])
                    parts.append(torch.bmm(weights, per.reshape(-1, n_patches, c.shape[-1])))
            averages = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (N, rows, c)
            averages = averages.view(n_batch, k, n, heads, -1)  # (B, k, n, heads, c)
        out = out.view(n_batch, k, n, heads, d_v)
        out = torch.einsum("...nhe,hde->...nhd", out, w_v.to(out.dtype))  # (B, k, n, h, head_dim)
        out = out.reshape(*out.shape[:-2], heads * head_dim)  # (B, k, n, width)
        return attn.drop(F.linear(out, attn.o.weight, b_out)), averages  # (B, k, n, width)


def folded_weights(
    attn: Attention, patch_in: nn.Linear, cache: FoldCache, index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The folded maps of the cross-attention ``attn`` of layer ``index``.

    They depend on the weights only, so under ``torch.inference_mode`` (how
    :meth:`~crossrank.rerank.CrossAttentionReranker.score` runs) they are computed once and kept
    in ``cache`` until a weight they read changes (an optimizer step, ``load_state_dict``, a move
    to another device or dtype: each bumps the tensor's version or replaces its storage). With
    autograd on, they are recomputed in every call so that gradients flow through them.

    Returns:
        ``W_k W_in`` and ``W_v W_in`` as ``(heads, head_dim, d_v)``, and the output bias
        ``b_o + W_o (W_v b_in + b_v)`` ``(width,)``.
    """
    sources = (
        attn.k.weight,
        attn.v.weight,
        attn.v.bias,
        attn.o.weight,
        attn.o.bias,
        patch_in.weight,
        patch_in.bias,
    )
    # Inference tensors (parameters made under inference mode) keep no version counter.
    cached = torch.is_inference_mode_enabled() and not any(t.is_inference() for t in sources)
    if cached:
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources)
        hit = cache.get(index)
        if hit is not None and hit[0] == key:
            return hit[1]
    heads, d_v = attn.heads, patch_in.in_features
    head_dim = attn.k.out_features // heads
    with autocast_off(attn.k.weight.device):  # fp32 products; autocast casts at use
        w_k = (attn.k.weight @ patch_in.weight).view(heads, head_dim, d_v)  # (heads, head_dim, d_v)
        w_v = (attn.v.weight @ patch_in.weight).view(heads, head_dim, d_v)  # (heads, head_dim, d_v)
        b_v = attn.v.weight @ patch_in.bias + attn.v.bias  # (width,)
        b_out = attn.o.bias + attn.o.weight @ b_v  # (width,): o(out + b_v) = W_o out + b_out
    folded = (w_k, w_v, b_out)
    if cached:
        cache[index] = (key, folded)
    return folded
