"""The cross-attention reranker: a query's text tokens attend to each candidate's stored patches.

Architecture (one query, k candidates; ``n`` query-side positions, ``P`` patches)::

    tokens (L, d_t) ─ LN_t ─ Linear ─┐                                  (once per query)
    query tokens (n_q, width) ─ attend to [query tokens; text] ─┴─► x0 (n, width)
    patches (k, P, d_v) ─ LN_v (+ pos) ─► x̃ (k, P, d_v) ─ Linear ─► p0 (k, P, width)
    layer × N:  [query self-attention]  x = x + g·SelfAttn(LN(x))   (positions compare what they read)
                [patch self-attention]  p = p + g·SelfAttn(LN(p))
                cross-attention        x = x + g·Attn(LN(x), keys/values from p)
                [bidirectional]        p = p + g·Attn(LN(p), LN(x))
                MLP                    x = x + g·MLP(LN(x))
    pool x over real positions (mean | first real) ─ LN ─ MLP ─► logit (k,)

``g`` is ``tanh(gate)`` with the gate initialised at 0 when ``gated`` (Flamingo, Alayrac et al.
2022): an untrained model's pooled states equal those of ``x0``, whatever the candidate. The
position embedding (``patch_positions``) is added in the d_v space after LN_v, so that ``x̃`` stays
a per-patch, query-independent function of the stored features.

Three ways to get the patches' keys and values, all computing the same scores
(:class:`AttentionPath`):

- ``plain``: project the patches per call (the reference; what training uses by default);
- ``folded``: never project the patches. Keys are ``(x̃ W_in^T + b) W_k^T`` (no key bias:
  it would add the same ``q·b_k`` to every logit of a row), so the score
  ``q·key = (q W_k W_in)·x̃ + q·(W_k b)``, whose second term is the same for every patch and
  cancels in the softmax; values give ``softmax(..) V = (softmax(..) x̃) (W_v W_in)^T +
  W_v b + b_v`` since each row of the softmax sums to 1. Attention then runs over ``x̃`` itself,
  the query side carries the projections. Possible for the layers whose keys/values are linear in
  ``x̃`` (:attr:`RerankerConfig.foldable_layers`): all layers by default; layer 1 only with
  ``bidirectional`` (later layers read patch states updated by the query); none with
  ``patch_self_attention`` (layer 1 already reads a self-attention over the patches).
- precomputed (:meth:`CrossAttentionReranker.precompute_kv`): what an index would store, per image
  and layer, for the layers whose patch states do not depend on the query
  (:attr:`RerankerConfig.static_patch_layers`): all layers, patch self-attention included, unless
  ``bidirectional``, then layer 1 (plus the patch states layer 1's back-attention updates).

Whatever the path, the stored patches are never projected to keys and values per query for a
foldable or precomputed layer; bidirectional configs project the *updated* patch states of later
layers per query, which is inherent to them.

Cost per candidate patch and query, in multiply-adds (``n`` query positions, ``h`` heads, ``w``
width, N layers): plain ``d_v·w + N·2w²`` (projections) + ``N·2n·w`` (attention); folded
``N·2h·n·d_v`` (attention over d_v-wide patches, once per head); precomputed ``N·2n·w``.
Folding therefore pays off only while ``h·n·d_v`` stays below about ``w²``; a precomputed cache
costs ``N·2w`` stored numbers per patch against the patch store's ``d_v``.
``benchmarks/bench_rerank_paths.py`` measures the three.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from enum import StrEnum

import torch
import torch.nn.functional as F
from torch import nn

from crossrank.errors import InvalidArgumentError
from crossrank.rerank.base import Reranker, check_rerank_inputs
from crossrank.rerank.config import Init, Pooling, QueryTokensMode, RerankerConfig
from crossrank.rerank.kv_cache import PatchKV
from crossrank.rerank.layers import Attention, RerankerLayer, attend

__all__ = ["AttentionPath", "CrossAttentionReranker", "PatchKV", "DEFAULT_PATH"]

logger = logging.getLogger(__name__)


class AttentionPath(StrEnum):
    """How layers whose patch keys/values are query-independent get them (same scores)."""

    AUTO = "auto"  # folded where the config allows it, plain elsewhere
    PLAIN = "plain"  # project the patches to keys/values in every call (the reference)
    FOLDED = "folded"  # fold W_k / W_v into the query side; attention runs over the raw patches


#: The path :meth:`CrossAttentionReranker.score` uses unless ``reranker.path`` is set.
DEFAULT_PATH = AttentionPath.AUTO


class CrossAttentionReranker(nn.Module, Reranker):
    """Query tokens attend to each candidate's stored patch features; one logit per candidate.

    Implements the :class:`~crossrank.rerank.Reranker` protocol through :meth:`score` (device
    placement, autocast on CUDA, float32 scores on the CPU), so ``Index.search`` uses it as it uses
    MaxSim. :meth:`forward` scores one query's k candidates; :meth:`forward_batch` scores B queries
    with k candidates each (training). In both, the query side is computed once per query and
    broadcast to its candidates, and all candidates go through one pass.

    Args:
        config: the architecture; default :class:`RerankerConfig()`.

    Attributes:
        name: ``"cross-attention"``.
        path: the :class:`AttentionPath` :meth:`score` uses (default :data:`DEFAULT_PATH`).
        fusion: the ``--fusion`` this reranker recommends (set by
            :func:`~crossrank.rerank.load_reranker` from its metadata; ``weighted:1/(1+W)`` after
            residual training), or None; ``fusion="auto"`` in search and eval uses it.

    Example:
        >>> cfg = RerankerConfig(text_dim=8, patch_dim=8, width=16, heads=2, layers=1)
        >>> model = CrossAttentionReranker(cfg).eval()
        >>> query, mask = torch.randn(3, 8), torch.ones(3, dtype=torch.bool)
        >>> model.score(query, mask, torch.randn(5, 4, 8)).shape
        torch.Size([5])
    """

    name: str = "cross-attention"

    def __init__(self, config: RerankerConfig | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else RerankerConfig()
        self.path = DEFAULT_PATH
        self.fusion: str | None = None
        # layer -> (weight versions, folded maps); see _folded_weights. Not module state.
        self._fold_cache: dict[int, tuple[tuple, tuple[torch.Tensor, ...]]] = {}
        w = config.width
        self.text_norm = nn.LayerNorm(config.token_input_dim) if config.prenorm else nn.Identity()
        self.patch_norm = nn.LayerNorm(config.patch_dim) if config.prenorm else nn.Identity()
        self.text_in = nn.Linear(config.token_input_dim, w)
        self.patch_in = nn.Linear(config.patch_dim, w)
        self.patch_pos = (
            nn.Parameter(torch.empty(config.patch_positions, config.patch_dim))
            if config.patch_positions
            else None
        )
        if config.n_query_tokens:
            self.query_tokens = nn.Parameter(torch.empty(config.n_query_tokens, w))
            self.query_norm = nn.LayerNorm(w)
            self.query_kv_norm = nn.LayerNorm(w)
            self.query_attn = Attention(w, config.heads, config.dropout)
        self.layers = nn.ModuleList(RerankerLayer(config, i) for i in range(config.layers))
        self.out_norm = nn.LayerNorm(w)
        self.head = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, 1))
        if config.pair_head:
            self.pair_norm = nn.LayerNorm(w)
            self.pair_u = nn.Linear(w, w)  # position i of a pair
            self.pair_v = nn.Linear(w, w, bias=False)  # position j
            self.pair_where = nn.Linear(
                2 * config.heads, w, bias=False
            )  # where i looked - where j did
            self.pair_out = nn.Linear(w, 1)
            self.pair_gate = nn.Parameter(torch.zeros(1)) if config.gated else None
            # Each patch slot's (column, row) on the square grid, in [-1, 1]; not module state.
            side = round(config.patch_positions**0.5)
            grid = torch.arange(config.patch_positions)
            coords = torch.stack([grid % side, grid // side], dim=-1).float()
            self.register_buffer(
                "pair_coords", coords * (2 / max(side - 1, 1)) - 1, persistent=False
            )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        lecun = self.config.init == Init.LECUN
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if lecun:
                    nn.init.normal_(module.weight, std=module.in_features**-0.5)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.patch_pos is not None:  # both schemes: the lecun probe measured them at 0.02
            nn.init.trunc_normal_(self.patch_pos, std=0.02)
        if self.config.n_query_tokens:
            nn.init.trunc_normal_(self.query_tokens, std=0.02)
        for name, param in self.named_parameters():
            if name.endswith("_gate"):
                nn.init.zeros_(param)  # tanh(0) = 0: every residual branch starts switched off

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"CrossAttentionReranker({self.config}, parameters={n})"

    @property
    def device(self) -> torch.device:
        """Where the parameters are."""
        return self.text_in.weight.device

    @property
    def token_embeddings(self) -> int:
        """Width of the layer-0 token states the query must carry in front of its token features
        (``config.token_embeddings``; 0 = none): :class:`crossrank.Index` then encodes queries
        with ``token_embeddings=True`` and passes ``TextFeatures.reranker_tokens()``."""
        return self.config.token_embeddings

    # -- the Reranker protocol ----------------------------------------------------------------

    def score(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        patches: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score one query against its k candidates (the :class:`Reranker` protocol).

        Inputs go to the module's device; on CUDA the forward runs under bf16 autocast (fp16 where
        bf16 is unsupported) with pooling and the score head in float32. Runs without gradient,
        in the module's current train/eval mode (loaded rerankers are in eval mode).

        Args:
            query: ``(n_tokens, token_input_dim)`` token features of one query (tensor or numpy):
                ``TextFeatures.tokens``, or ``reranker_tokens()`` when ``token_embeddings`` is set.
            query_mask: ``(n_tokens,)`` bool, True = a real token.
            patches: ``(k, n_patches, patch_dim)`` float16/float32 patch features.
            patch_mask: ``(k, n_patches)`` bool, True = a real patch; None = all real.

        Returns:
            ``(k,)`` float32 logits on the CPU, higher is better.

        Raises:
            InvalidArgumentError: shapes, dtypes or dims are wrong (dims must match the config),
                the query has no real token, or a candidate has no real patch.
        """
        query, query_mask, patches, patch_mask = check_rerank_inputs(
            query, query_mask, patches, patch_mask, same_dim=False
        )
        if patches.shape[0] == 0:
            self._check_dims(query.shape[-1], patches.shape[-1], patches.shape[-2])
            return torch.empty(0, dtype=torch.float32)
        if not bool(query_mask.all()):
            # Padding tokens cannot change a score, but each would cost k rows of every layer's
            # MLP and attention: one query has no reason to carry any.
            query, query_mask = (
                query[query_mask],
                query_mask[query_mask],
            )  # (n_real, token_input_dim)
        device = self.device
        with torch.inference_mode(), _autocast(device):
            logits = self.forward(
                query.to(device),
                query_mask.to(device),
                patches.to(device, non_blocking=True),
                None if patch_mask is None else patch_mask.to(device),
                path=self.path,
            )
        return logits.to("cpu", torch.float32)

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        patches: torch.Tensor | PatchKV,
        patch_mask: torch.Tensor | None = None,
        *,
        path: AttentionPath | str = AttentionPath.PLAIN,
    ) -> torch.Tensor:
        """Logits of one query's k candidates, all in one pass.

        Args:
            tokens: ``(L, token_input_dim)`` token features.
            token_mask: ``(L,)`` bool, True = a real token.
            patches: ``(k, P, patch_dim)`` patch features, or a :class:`PatchKV` of the k
                candidates (from :meth:`precompute_kv`, then ``path`` is ignored).
            patch_mask: ``(k, P)`` bool, True = a real patch; None = all real. Must be None with a
                PatchKV (which carries its own mask).
            path: plain, folded or auto, for raw ``patches``.

        Returns:
            ``(k,)`` float32 logits.

        Raises:
            InvalidArgumentError: shapes or dims do not match the config, or ``folded`` was asked
                of a config that cannot fold.
        """
        source = patches.unsqueeze(0)  # (1, k, P, patch_dim), or a PatchKV with leading (1, k)
        mask = None if patch_mask is None else patch_mask.unsqueeze(0)  # (1, k, P)
        logits = self.forward_batch(
            tokens.unsqueeze(0), token_mask.unsqueeze(0), source, mask, path=path
        )  # (1, k)
        return logits[0]  # (k,)

    def forward_batch(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        patches: torch.Tensor | PatchKV,
        patch_mask: torch.Tensor | None = None,
        *,
        path: AttentionPath | str = AttentionPath.PLAIN,
        output: str = "logits",
        attend_to: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits of B queries with k candidates each (the training forward).

        Args:
            tokens: ``(B, L, token_input_dim)`` token features.
            token_mask: ``(B, L)`` bool, True = a real token (each query needs one).
            patches: ``(B, k, P, patch_dim)`` patch features, or a :class:`PatchKV` with leading
                dims ``(B, k)``.
            patch_mask: ``(B, k, P)`` bool, True = a real patch (each candidate needs one);
                None = all real.
            path: plain, folded or auto (raw patches only).
            output: ``"logits"``, or ``"pooled"`` for the pooled states before the score head
                (without the pair head's term).
            attend_to: ``(B, k, P, c)`` per-patch channels (e.g. masks of where each object
                is) to average with the last layer's attention weights, heads averaged: how
                much of each query position's attention lands on each mask (training's
                attention supervision). None = not asked.

        Returns:
            ``(B, k)`` float32 logits, or ``(B, k, width)`` float32 pooled states; with
            ``attend_to`` (and logits), ``(logits, attended)`` with attended ``(B, k, n, c)``
            float32, n the query-side positions (:meth:`encode_query`).

        Raises:
            InvalidArgumentError: as :meth:`forward`.
        """
        cfg = self.config
        path = _path(path)
        if output not in ("logits", "pooled"):
            raise InvalidArgumentError(f"output must be 'logits' or 'pooled', got {output!r}")
        if attend_to is not None and output != "logits":
            raise InvalidArgumentError("attend_to needs output='logits'")
        cache = patches if isinstance(patches, PatchKV) else None
        if cache is not None:
            if patch_mask is not None:
                raise InvalidArgumentError(
                    "patch_mask must be None with a PatchKV: the cache carries the mask it was "
                    "computed with"
                )
            patch_mask = cache.mask
            lead, n_patches = tuple(cache.keys[0].shape[:-3]), cache.keys[0].shape[-2]
            self._check_dims(tokens.shape[-1], cfg.patch_dim, n_patches)
        else:
            lead, n_patches = tuple(patches.shape[:-2]), patches.shape[-2]
            self._check_dims(tokens.shape[-1], patches.shape[-1], n_patches)
        if tokens.ndim != 3 or len(lead) != 2 or lead[0] != tokens.shape[0]:
            raise InvalidArgumentError(
                "forward_batch needs tokens (B, L, token_input_dim) and patches (B, k, P, patch_dim) "
                f"with the same B, got tokens {tuple(tokens.shape)} and patches of leading "
                f"shape {lead}"
            )
        if tuple(token_mask.shape) != tuple(tokens.shape[:2]) or token_mask.dtype != torch.bool:
            raise InvalidArgumentError(
                f"token_mask must be bool of shape {tuple(tokens.shape[:2])}, "
                f"got {token_mask.dtype} {tuple(token_mask.shape)}"
            )
        if patch_mask is not None and (
            tuple(patch_mask.shape) != (*lead, n_patches) or patch_mask.dtype != torch.bool
        ):
            raise InvalidArgumentError(
                f"patch_mask must be bool of shape {(*lead, n_patches)}, "
                f"got {patch_mask.dtype} {tuple(patch_mask.shape)}"
            )
        if attend_to is not None and (
            attend_to.ndim != 4 or tuple(attend_to.shape[:3]) != (*lead, n_patches)
        ):
            raise InvalidArgumentError(
                f"attend_to must have shape {(*lead, n_patches)} + (channels,), got {tuple(attend_to.shape)}"
            )
        if cache is None and path == AttentionPath.FOLDED and cfg.foldable_layers == 0:
            raise InvalidArgumentError(
                "path='folded' needs keys/values linear in the stored patches, but "
                "patch_self_attention=True puts a self-attention before layer 1; use path='plain' "
                "or precompute_kv()"
            )

        x, x_keep = self.encode_query(tokens, token_mask)  # (B, n, width), (B, n)
        # Computed once per query and broadcast over its k candidates; the first residual add
        # makes the per-candidate states (B, k, n, width).
        x = x.unsqueeze(1)  # (B, 1, n, width)
        # No mask at all when every patch is real: the attention kernels run a little faster.
        patch_keep = (
            None if patch_mask is None else patch_mask[..., None, None, :]
        )  # (B, k, 1, 1, P)
        token_keep = x_keep[:, None, None, None, :]  # (B, 1, 1, 1, n)

        n_cached = len(cache.keys) if cache is not None else 0
        n_folded = 0 if cache is not None or path == AttentionPath.PLAIN else cfg.foldable_layers
        xt = p = None
        if cache is None:
            xt = self._prepare_patches(patches, patch_mask)  # (B, k, P, patch_dim)
        elif cache.states is not None:
            p = cache.states  # (B, k, P, width)
        # The last layer can also average per-patch channels with its attention weights (more
        # value channels, the same softmax): the pair head's grid coordinates, the caller's.
        channels = []
        if cfg.pair_head:
            channels.append(self.pair_coords[:n_patches])  # (P, 2)
        if attend_to is not None:
            channels.append(attend_to.unsqueeze(-3))  # (B, k, 1, P, c)
        extra = None  # (B, k, n, heads, channels), from the last layer
        for i, layer in enumerate(self.layers):
            if cfg.query_self_attention:
                x = layer.query_self_attend(x, token_keep)  # (B, 1|k, n, width)
            h = layer.cross_norm(x)
            q = layer.cross_attn.project_q(h)  # (B, 1|k, heads, n, head_dim)
            more = channels if i == cfg.layers - 1 else []
            if i < n_cached:
                keys, values = cache.keys[i], cache.values[i]  # (B, k, heads, P, head_dim)
                out = attend(
                    q,
                    keys,
                    _with_channels(values, more),
                    patch_keep,
                    layer.cross_attn.scale,
                    layer.top_m,
                )  # (B, k, heads, n, head_dim + channels)
                out, extra = _split_channels(out, cfg.head_dim, extra)
                out = layer.cross_attn.output(out)  # (B, k, n, width)
            elif i < n_folded:
                out, extra = self._folded_attention(
                    i, q, xt, patch_keep, more, extra
                )  # (B, k, n, width)
            else:
                if p is None:
                    p = self.patch_in(xt)  # (B, k, P, width)
                if cfg.patch_self_attention:
                    p = layer.patch_self_attend(p, patch_keep)  # (B, k, P, width)
                kv_source = layer.cross_kv_norm(p)  # (B, k, P, width)
                keys, values = layer.cross_attn.project_kv(kv_source)  # (B, k, heads, P, head_dim)
                out = attend(
                    q,
                    keys,
                    _with_channels(values, more),
                    patch_keep,
                    layer.cross_attn.scale,
                    layer.top_m,
                )  # (B, k, heads, n, head_dim + channels)
                out, extra = _split_channels(out, cfg.head_dim, extra)
                out = layer.cross_attn.output(out)  # (B, k, n, width)
            x = x + layer.gate(layer.cross_gate, out)  # (B, k, n, width)
            if cfg.bidirectional:
                if p is None:
                    p = self.patch_in(xt)  # (B, k, P, width)
                back = layer.back_attn(
                    layer.back_norm(p), layer.back_kv_norm(x), token_keep
                )  # (B, k, P, width)
                p = p + layer.gate(layer.back_gate, back)
            x = x + layer.gate(layer.mlp_gate, layer.mlp(layer.mlp_norm(x)))  # (B, k, n, width)

        with _autocast_off(x.device):
            pooled = self._pool(x.float(), x_keep[:, None, :])  # (B, k, width)
            if output == "pooled":
                return pooled
            logits = self.head(self.out_norm(pooled)).squeeze(-1).float()  # (B, k)
            if cfg.pair_head:
                where = extra[..., :2].flatten(-2).float()  # (B, k, n, 2 * heads)
                logits = logits + RerankerLayer.gate(
                    self.pair_gate, self._pair_score(x.float(), where, x_keep)
                )  # (B, k)
            if attend_to is None:
                return logits
            attended = extra[..., 2 if cfg.pair_head else 0 :].float().mean(dim=-2)  # (B, k, n, c)
            return logits, attended

    # -- precomputation -----------------------------------------------------------------------

    def precompute_kv(
        self, patches: torch.Tensor, patch_mask: torch.Tensor | None = None
    ) -> PatchKV:
        """The query-independent keys/values of ``patches``: what an index would store per image.

        Covers :attr:`RerankerConfig.static_patch_layers` layers (all of them unless
        ``bidirectional``). Runs in the caller's grad mode; wrap in ``torch.inference_mode()``
        at index time.

        Args:
            patches: ``(*lead, P, patch_dim)``, e.g. ``(n_images, P, patch_dim)``.
            patch_mask: ``(*lead, P)`` bool, True = a real patch; None = all real.

        Returns:
            A :class:`PatchKV` with the same leading dims; :meth:`PatchKV.select` cuts out a
            query's candidates.

        Raises:
            InvalidArgumentError: the patch dim or count does not match the config.
        """
        cfg = self.config
        self._check_dims(cfg.token_input_dim, patches.shape[-1], patches.shape[-2])
        if patch_mask is not None and patch_mask.shape != patches.shape[:-1]:
            raise InvalidArgumentError(
                f"patch_mask must have shape {tuple(patches.shape[:-1])}, "
                f"got {tuple(patch_mask.shape)}"
            )
        patch_keep = (
            None if patch_mask is None else patch_mask[..., None, None, :]
        )  # (*lead, 1, 1, P)
        p = self.patch_in(self._prepare_patches(patches, patch_mask))  # (*lead, P, width)
        keys, values = [], []
        for layer in self.layers[: cfg.static_patch_layers]:
            if cfg.patch_self_attention:
                p = layer.patch_self_attend(p, patch_keep)  # (*lead, P, width)
            kv_source = layer.cross_kv_norm(p)  # (*lead, P, width)
            k_i, v_i = layer.cross_attn.project_kv(kv_source)  # (*lead, heads, P, head_dim) each
            keys.append(k_i)
            values.append(v_i)
        return PatchKV(tuple(keys), tuple(values), patch_mask, p if cfg.bidirectional else None)

    # -- pieces -------------------------------------------------------------------------------

    def _check_dims(self, token_dim: int, patch_dim: int, n_patches: int) -> None:
        cfg = self.config
        if token_dim != cfg.token_input_dim or patch_dim != cfg.patch_dim:
            layer0 = (
                f" ({cfg.token_embeddings} layer-0 + {cfg.text_dim}: give "
                "TextFeatures.reranker_tokens() of encode_text(..., token_embeddings=True))"
                if cfg.token_embeddings
                else ""
            )
            raise InvalidArgumentError(
                f"the reranker was made for token dim {cfg.token_input_dim}{layer0} and patch dim "
                f"{cfg.patch_dim}, got token dim {token_dim} and patch dim {patch_dim}; use a "
                "reranker trained on the encoder the index was built with"
            )
        if cfg.patch_positions is not None and n_patches > cfg.patch_positions:
            raise InvalidArgumentError(
                f"the reranker has position embeddings for {cfg.patch_positions} patches, got "
                f"{n_patches} patches per candidate; use a reranker trained on this encoder"
            )

    def encode_query(
        self, tokens: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The query side before any cross-attention, computed once per query.

        Args:
            tokens: ``(B, L, token_input_dim)`` token features.
            token_mask: ``(B, L)`` bool, True = a real token.

        Returns:
            States ``(B, n, width)`` and their keep mask ``(B, n)`` bool: the text tokens, the
            learnable query tokens, or both (``n = n_query_tokens + L`` in concat mode).
        """
        cfg = self.config
        tokens = tokens.to(self.text_in.weight.dtype).masked_fill(~token_mask[..., None], 0.0)
        t = self.text_in(self.text_norm(tokens))  # (B, L, width)
        if not cfg.n_query_tokens:
            return t, token_mask
        batch = tokens.shape[0]
        qt = self.query_tokens.expand(batch, -1, -1)  # (B, n_q, width)
        q_keep = torch.ones(qt.shape[:2], dtype=torch.bool, device=qt.device)  # (B, n_q)
        # The query tokens read the text (and each other) once, Q-Former style: without this,
        # "replace" would score every query the same.
        context = torch.cat([qt, t], dim=1)  # (B, n_q + L, width)
        context_keep = torch.cat([q_keep, token_mask], dim=1)  # (B, n_q + L)
        context_keep = context_keep[:, None, None, :]  # (B, 1, 1, n_q + L)
        read = self.query_attn(
            self.query_norm(qt), self.query_kv_norm(context), context_keep
        )  # (B, n_q, width)
        qt = qt + read  # (B, n_q, width)
        if cfg.query_tokens_mode == QueryTokensMode.REPLACE:
            return qt, q_keep
        states = torch.cat([qt, t], dim=1)  # (B, n_q + L, width)
        return states, torch.cat([q_keep, token_mask], dim=1)  # (B, n_q + L)

    def _prepare_patches(
        self, patches: torch.Tensor, patch_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """x̃ = LN_v(patches) + pos: per patch, query-independent. ``(..., P, d_v)`` -> same."""
        patches = patches.to(self.patch_in.weight.dtype)
        if patch_mask is not None:
            # Padding content (even inf/NaN) must not reach a value row: in softmax @ V a
            # masked row still meets a 0 weight, and 0 * NaN is NaN.
            patches = patches.masked_fill(~patch_mask[..., None], 0.0)
        xt = self.patch_norm(patches)
        if self.patch_pos is not None:
            xt = xt + self.patch_pos[: patches.shape[-2]]  # (..., P, patch_dim)
        return xt

    def _folded_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer ``i``'s folded maps: ``W_k W_in`` and ``W_v W_in`` as ``(heads, head_dim, d_v)``,
        and the output bias ``b_o + W_o (W_v b_in + b_v)`` ``(width,)``.

        They depend on the weights only, so under ``torch.inference_mode`` (how :meth:`score`
        runs) they are computed once and kept until a weight they read changes (an optimizer
        step, ``load_state_dict``, a move to another device or dtype: each bumps the tensor's
        version or replaces its storage). With autograd on, they are recomputed in every call so
        that gradients flow through them.
        """
        attn, cfg = self.layers[i].cross_attn, self.config
        sources = (
            attn.k.weight,
            attn.v.weight,
            attn.v.bias,
            attn.o.weight,
            attn.o.bias,
            self.patch_in.weight,
            self.patch_in.bias,
        )
        # Inference tensors (parameters made under inference mode) keep no version counter.
        cached = torch.is_inference_mode_enabled() and not any(t.is_inference() for t in sources)
        if cached:
            key = tuple((t.data_ptr(), t._version, t.dtype) for t in sources)
            hit = self._fold_cache.get(i)
            if hit is not None and hit[0] == key:
                return hit[1]
        heads, head_dim, d_v = cfg.heads, cfg.head_dim, cfg.patch_dim
        with _autocast_off(attn.k.weight.device):  # fp32 products; autocast casts at use
            w_k = (attn.k.weight @ self.patch_in.weight).view(heads, head_dim, d_v)
            w_v = (attn.v.weight @ self.patch_in.weight).view(heads, head_dim, d_v)
            b_v = attn.v.weight @ self.patch_in.bias + attn.v.bias  # (width,)
            b_out = attn.o.bias + attn.o.weight @ b_v  # (width,): o(out + b_v) = W_o out + b_out
        folded = (w_k, w_v, b_out)
        if cached:
            self._fold_cache[i] = (key, folded)
        return folded

    def _folded_attention(
        self,
        i: int,
        q: torch.Tensor,
        xt: torch.Tensor,
        patch_keep: torch.Tensor | None,
        channels: Sequence[torch.Tensor] = (),
        extra: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cross-attention over x̃ with W_k folded into the queries and W_v applied afterwards.

        Args:
            i: the layer whose ``cross_attn`` weights are folded.
            q: ``(B, 1|k, heads, n, head_dim)`` projected queries.
            xt: ``(B, k, P, d_v)`` prepared patches x̃.
            patch_keep: ``(B, k, 1, 1, P)`` bool, or None when every patch is real.
            channels: per-patch channels to average with the attention weights (see
                :func:`_with_channels`); none: ``extra`` is returned unchanged.
            extra: see ``channels``.

        Returns:
            ``(B, k, n, width)``, the attention branch before its gate, and with ``channels``
            their attention-weighted averages, ``(B, k, n, heads, c)``.
        """
        layer, cfg = self.layers[i], self.config
        attn = layer.cross_attn
        heads, head_dim, d_v = cfg.heads, cfg.head_dim, cfg.patch_dim
        w_k, w_v, b_out = self._folded_weights(i)
        n = q.shape[-2]
        # Token-major rows (n, heads): the attention's output then reshapes to (n, width) as a view.
        q_fold = torch.einsum("...hnd,hde->...nhe", q, w_k)  # (B, 1|k, n, heads, d_v)
        # All heads attend over the same x̃: stack them along the query rows, one d_v-wide head.
        q_fold = q_fold.reshape(*q.shape[:-3], 1, n * heads, d_v)  # (B, 1|k, 1, n * heads, d_v)
        keys = xt.unsqueeze(-3)  # (B, k, 1, P, d_v)
        out = attend(
            q_fold, keys, _with_channels(keys, channels), patch_keep, attn.scale, layer.top_m
        )  # (B, k, 1, n * heads, d_v + c)
        if channels:  # rows are token-major (n, heads)
            extra = out[..., d_v:].reshape(*out.shape[:-3], n, heads, -1)  # (B, k, n, heads, c)
            out = out[..., :d_v]
        out = out.reshape(*out.shape[:-3], n, heads, d_v)  # (B, k, n, heads, d_v)
        out = torch.einsum("...nhe,hde->...nhd", out, w_v)  # (B, k, n, heads, head_dim)
        out = out.reshape(*out.shape[:-2], heads * head_dim)  # (B, k, n, width)
        return attn.drop(F.linear(out, attn.o.weight, b_out)), extra  # (B, k, n, width)

    def _pair_score(self, x: torch.Tensor, where: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The pair head: ``(B, k, n, width)`` states, ``(B, k, n, 2 * heads)`` where each
        position looked, keep ``(B, n)`` -> ``(B, k)``, the mean over pairs of real positions of
        ``out(gelu(U y_i + V y_j + W (where_i - where_j)))``."""
        y = self.pair_norm(x)  # (B, k, n, width)
        moved = self.pair_where(where)  # (B, k, n, width); linear, so W(w_i - w_j) = Ww_i - Ww_j
        first, second = self.pair_u(y) + moved, self.pair_v(y) - moved  # (B, k, n, width) each
        if torch.is_grad_enabled():
            pairs = F.gelu(first.unsqueeze(-2) + second.unsqueeze(-3))  # (B, k, n, n, width)
            scores = self.pair_out(pairs).squeeze(-1)  # (B, k, n, n)
        else:
            # Without autograd: a few candidates at a time, so the (n, n, width) pair tensor of a
            # chunk stays in cache through the add, the GELU (in place) and the output map; the
            # same arithmetic. Measured on the 2-core CPU: within noise at k = 100 when idle,
            # 217 against 280 ms at k = 1000 under load (README, "Performance").
            n_batch, k, n, width = first.shape
            chunk = max(1, _PAIR_CHUNK_VALUES // max(1, n_batch * n * n * width))
            scores = first.new_empty((n_batch, k, n, n))
            for lo in range(0, k, chunk):
                pairs = first[:, lo : lo + chunk].unsqueeze(-2) + second[
                    :, lo : lo + chunk
                ].unsqueeze(-3)
                scores[:, lo : lo + chunk] = self.pair_out(torch.ops.aten.gelu_(pairs)).squeeze(-1)
        both = keep[:, None, :, None] & keep[:, None, None, :]  # (B, 1, n, n)
        total = scores.masked_fill(~both, 0.0).sum(dim=(-2, -1))  # (B, k)
        return total / both.sum(dim=(-2, -1)).to(scores.dtype)  # (B, k)

    def _pool(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B, k, n, width)`` float32 with keep ``(B, 1, n)`` -> ``(B, k, width)``."""
        if self.config.pooling == Pooling.FIRST:
            first = keep.int().argmax(dim=-1)  # (B, 1): the first real position
            index = first[..., None, None].expand(*x.shape[:-2], 1, x.shape[-1])  # (B, k, 1, width)
            return x.gather(-2, index).squeeze(-2)  # (B, k, width)
        # masked_fill, not a multiply: a padding row is excluded even if it holds inf or NaN.
        total = x.masked_fill(~keep[..., None], 0.0).sum(dim=-2)  # (B, k, width)
        return total / keep.sum(dim=-1, keepdim=True).to(x.dtype)  # (B, k, width)


#: Values of the pair head's ``(chunk, n, n, width)`` tensor per inference chunk (2 MB of fp32).
_PAIR_CHUNK_VALUES = 1 << 19


def _with_channels(values: torch.Tensor, channels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(..., P, e)`` values with per-patch ``channels`` appended (each broadcastable to
    ``(..., P, c_i)``), so that each head also returns their attention-weighted averages;
    ``values`` itself when there are none."""
    if not channels:
        return values
    lead = values.shape[:-1]
    more = [c.to(values.dtype).expand(*lead, c.shape[-1]) for c in channels]
    return torch.cat([values, *more], dim=-1)


def _split_channels(
    out: torch.Tensor, head_dim: int, extra: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(B, k, heads, n, head_dim + c)`` -> the heads' outputs ``(B, k, heads, n, head_dim)`` and
    the channels' averages ``(B, k, n, heads, c)``; an output without channels passes through
    with ``extra`` unchanged."""
    if out.shape[-1] == head_dim:
        return out, extra
    return out[..., :head_dim], out[..., head_dim:].transpose(-3, -2)


def _path(path: AttentionPath | str) -> AttentionPath:
    try:
        return AttentionPath(str(path).lower())
    except ValueError:
        raise InvalidArgumentError(
            f"path must be one of {', '.join(p.value for p in AttentionPath)}, got {path!r}"
        ) from None


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); nothing on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """Pooling and the score head run in float32 even inside an autocast region."""
    if device.type == "cuda":
        with torch.autocast("cuda", enabled=False):
            yield
    else:
        yield
