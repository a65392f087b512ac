"""The cross-attention reranker: a query's text tokens attend to each candidate's stored patches.

Architecture (one query, k candidates; ``n`` query-side positions, ``P`` patches)::

    tokens (L, d_t) ─ LN_t ─ Linear ─┐                                  (once per query)
    query tokens (n_q, width) ─ attend to [query tokens; text] ─┴─► x0 (n, width)
    patches (k, P, d_v) ─ LN_v (+ pos) ─► x̃ (k, P, d_v) ─ Linear ─► p0 (k, P, width)
    layer × N:  [query self-attention]  x = x + g·SelfAttn(LN(x))   (positions compare)
                [patch self-attention]  p = p + g·SelfAttn(LN(p))
                cross-attention        x = x + g·Attn(LN(x), keys/values from p)
                [bidirectional]        p = p + g·Attn(LN(p), LN(x))
                MLP                    x = x + g·MLP(LN(x))
    pool x over real positions (mean | first real) ─ LN ─ MLP ─► logit (k,)
    [pair head]  + g·mean over pairs (i, j) of out(gelu(U y_i + V y_j + W (where_i - where_j)))

``g`` is ``tanh(gate)`` with the gate initialised at 0 when ``gated`` (Flamingo, Alayrac et al.
2022): an untrained model's pooled states equal those of ``x0``, whatever the candidate. The
position embedding (``patch_positions``) is added in the d_v space after LN_v, so that ``x̃`` stays
a per-patch, query-independent function of the stored features.

Where the pieces live: the layer and its blocks in :mod:`crossrank.rerank.layers`, pooling in
:mod:`crossrank.rerank.pooling`, the pair head in :mod:`crossrank.rerank.pair_head`, and where each
layer's keys/values come from in :mod:`crossrank.rerank.kv_source`. Three ways, all computing the
same scores (:class:`AttentionPath`):

- ``plain``: project the patches per call (the reference; what training uses by default);
- ``folded`` (:mod:`crossrank.rerank.folding`): never project the patches; attention runs over
  ``x̃`` itself and the query side carries the projections. Possible for the layers whose
  keys/values are linear in ``x̃`` (:attr:`RerankerConfig.foldable_layers`): all layers by
  default; layer 1 only with ``bidirectional`` (later layers read patch states updated by the
  query); none with ``patch_self_attention``.
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

import logging
from enum import StrEnum

import torch
from torch import nn

from crossrank.errors import InvalidArgumentError
from crossrank.rerank.autocast import autocast as _autocast
from crossrank.rerank.autocast import autocast_off as _autocast_off
from crossrank.rerank.base import Reranker, check_rerank_inputs
from crossrank.rerank.config import Init, QueryTokensMode, RerankerConfig
from crossrank.rerank.folding import FoldCache, FoldedKV
from crossrank.rerank.input_checks import check_batch, check_dims
from crossrank.rerank.kv_cache import PatchKV
from crossrank.rerank.kv_source import CachedKV, KVSource, PatchStates, ProjectedKV
from crossrank.rerank.layers import Attention, RerankerLayer
from crossrank.rerank.pair_head import PairHead, keep_flat_keys
from crossrank.rerank.pooling import POOLINGS

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
        precision: the :class:`~crossrank.device.Precision` :meth:`score` and :meth:`explain`
            run at (default ``auto``: bf16 autocast on CUDA, float32 on the CPU; ``bfloat16``
            also autocasts on the CPU).
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
        self._fold_cache: FoldCache = {}  # see folding.folded_weights; not module state
        # Attribute names are the checkpoint's keys and creation order is parameter order
        # (seeded initialisation, optimizer state): keep both.
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
        if config.n_query_tokens:  # learnable query tokens that read the text once
            self.query_tokens = nn.Parameter(torch.empty(config.n_query_tokens, w))
            self.query_norm = nn.LayerNorm(w)
            self.query_kv_norm = nn.LayerNorm(w)
            self.query_attn = Attention(w, config.heads, config.dropout)
        self.layers = nn.ModuleList(RerankerLayer(config, i) for i in range(config.layers))
        self.pool = POOLINGS[config.pooling]
        self.out_norm = nn.LayerNorm(w)
        self.head = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.Linear(w, 1))
        self.pair = None
        if config.pair_head:
            self.pair = PairHead(
                w, config.heads, config.patch_positions, config.gated, config.pair_width
            )
            keep_flat_keys(self, "pair")  # saved as pair_norm.weight, ..., pair_gate
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
            if name.rpartition(".")[2].endswith("gate"):
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

        Inputs go to the module's device; the forward runs at :attr:`precision`: by default under
        bf16 autocast on CUDA (fp16 where bf16 is unsupported) and in float32 on the CPU, with
        pooling and the score head in float32. Runs without gradient,
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
            check_dims(self.config, query.shape[-1], patches.shape[-1], patches.shape[-2])
            return torch.empty(0, dtype=torch.float32)
        if not bool(query_mask.all()):
            # Padding tokens cannot change a score, but each would cost k rows of every layer's
            # MLP and attention: one query has no reason to carry any.
            query, query_mask = (
                query[query_mask],
                query_mask[query_mask],
            )  # (n_real, token_input_dim)
        device = self.device
        with torch.inference_mode(), _autocast(device, self.precision):
            logits = self.forward(
                query.to(device),
                query_mask.to(device),
                patches.to(device, non_blocking=True),
                None if patch_mask is None else patch_mask.to(device),
                path=self.path,
            )
        return logits.to("cpu", torch.float32)

    def explain(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        patches: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | None:
        """Each query token's last-layer cross-attention over each candidate's patches.

        The weights are the model's own: the forward of :meth:`score` (same path, same top-m
        sparsity) is run once more with ``attend_to`` set to the ``(P, P)`` identity, so that the
        attention-weighted average of patch ``j``'s one-hot channel is the weight on patch ``j``;
        heads are averaged. Each real token's row sums to 1 over the real patches (a sparse
        ``sparse_top_m`` model puts exactly 0 outside each head's top m). Arguments as
        :meth:`score`.

        Returns:
            ``(k, n_tokens, n_patches)`` float32 on the CPU, rows in the order of ``query``
            (padding tokens' rows all zero); None for a model whose learnable query tokens
            replace the text (``query_tokens_mode="replace"``): no position is a word.
        """
        cfg = self.config
        if cfg.n_query_tokens and cfg.query_tokens_mode == QueryTokensMode.REPLACE:
            return None
        query, query_mask, patches, patch_mask = check_rerank_inputs(
            query, query_mask, patches, patch_mask, same_dim=False
        )
        k, n_patches = patches.shape[:2]
        maps = torch.zeros((k, query.shape[0], n_patches), dtype=torch.float32)
        if k == 0:
            return maps
        real = query_mask.cpu().nonzero().flatten()  # (L,) rows of the real tokens
        tokens = query[query_mask]  # (L, token_input_dim), as score() drops padding
        device = self.device
        # A view, never materialised per candidate here: (1, k, P, P)
        eye = torch.eye(n_patches, device=device).expand(1, k, n_patches, n_patches)
        with torch.inference_mode(), _autocast(device, self.precision):
            _, attended = self.forward_batch(
                tokens.to(device)[None],
                torch.ones((1, tokens.shape[0]), dtype=torch.bool, device=device),
                patches.to(device, non_blocking=True)[None],
                None if patch_mask is None else patch_mask.to(device)[None],
                path=self.path,
                attend_to=eye,
            )  # (1, k, n, P): n = learnable query tokens first, then the text tokens
        # Learnable query tokens (concat mode) come first; the text tokens are the last L rows.
        maps[:, real] = attended[0, :, attended.shape[2] - tokens.shape[0] :].to("cpu").float()
        return maps

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
        path = _path(path)
        patch_mask, n_patches = check_batch(
            self.config,
            tokens,
            token_mask,
            patches,
            patch_mask,
            path == AttentionPath.FOLDED,
            output,
            attend_to,
        )
        x, x_keep = self.encode_query(tokens, token_mask)  # (B, n, width), (B, n)
        # Computed once per query and broadcast over its k candidates; the first residual add
        # makes the per-candidate states (B, k, n, width).
        x = x.unsqueeze(1)  # (B, 1, n, width)
        token_keep = x_keep[:, None, None, None, :]  # (B, 1, 1, 1, n)
        sources = self._kv_sources(patches, patch_mask, path)  # one per layer
        # The last layer also averages per-patch channels with its attention weights: the pair
        # head's grid coordinates, then the caller's attend_to.
        channels = self._channels(n_patches, attend_to)
        for layer, kv in zip(self.layers, sources, strict=True):
            last = layer.index == self.config.layers - 1
            # averages: (B, k, n, heads, c) of the last layer's channels, None without channels
            x, averages = layer(x, kv, token_keep, channels if last else ())  # (B, k, n, width)

        with _autocast_off(x.device):
            pooled = self.pool(x.float(), x_keep[:, None, :])  # (B, k, width)
            if output == "pooled":
                return pooled
            logits = self.head(self.out_norm(pooled)).squeeze(-1).float()  # (B, k)
            if self.pair is not None:
                logits = logits + self.pair(x.float(), averages[..., :2], x_keep)  # (B, k)
            if attend_to is None:
                return logits
            skip = 2 if self.pair is not None else 0  # the pair head's coordinates
            return logits, averages[..., skip:].float().mean(dim=-2)  # (B, k, n, c)

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
        check_dims(self.config, cfg.token_input_dim, patches.shape[-1], patches.shape[-2])
        if patch_mask is not None and patch_mask.shape != patches.shape[:-1]:
            raise InvalidArgumentError(
                f"patch_mask must have shape {tuple(patches.shape[:-1])}, "
                f"got {tuple(patch_mask.shape)}"
            )
        keep = None if patch_mask is None else patch_mask[..., None, None, :]  # (*lead, 1, 1, P)
        stream = self._patch_stream(patches, patch_mask, keep)
        keys, values = zip(
            *(layer.patch_kv(stream) for layer in self.layers[: cfg.static_patch_layers]),
            strict=True,
        )  # per layer: (*lead, heads, P, head_dim) each
        states = stream.states if cfg.bidirectional else None  # (*lead, P, width)
        return PatchKV(tuple(keys), tuple(values), patch_mask, states)

    # -- pieces -------------------------------------------------------------------------------

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

    def _patch_stream(
        self, patches: torch.Tensor, patch_mask: torch.Tensor | None, keep: torch.Tensor | None
    ) -> PatchStates:
        """The patch stream of raw ``patches`` ``(..., P, d_v)``: LN_v(patches) and the position
        embedding, kept apart (x̃ = their sum: per patch, query-independent)."""
        given = patches
        patches = patches.to(self.patch_in.weight.dtype)
        if patch_mask is not None:
            # Padding content (even inf/NaN) must not reach a value row: in softmax @ V a
            # masked row still meets a 0 weight, and 0 * NaN is NaN.
            patches = patches.masked_fill(~patch_mask[..., None], 0.0)
        normed = self.patch_norm(patches)  # (..., P, patch_dim)
        pos = None if self.patch_pos is None else self.patch_pos[: patches.shape[-2]]  # (P, d_v)
        owned = normed.untyped_storage().data_ptr() != given.untyped_storage().data_ptr()
        return PatchStates(self.patch_in, normed, keep, pos=pos, owned=owned)

    def _kv_sources(
        self,
        patches: torch.Tensor | PatchKV,
        patch_mask: torch.Tensor | None,
        path: AttentionPath,
    ) -> list[KVSource]:
        """Where each layer's keys/values come from in this call: a cache's first layers, else the
        foldable layers folded (unless ``path`` is plain), the others projected per call."""
        n_layers = self.config.layers
        keep = None if patch_mask is None else patch_mask[..., None, None, :]  # (B, k, 1, 1, P)
        if isinstance(patches, PatchKV):
            stream = PatchStates(self.patch_in, None, keep, patches.states)
            cached = [
                CachedKV(stream, k, v) for k, v in zip(patches.keys, patches.values, strict=True)
            ]
            return (cached + [ProjectedKV(stream)] * n_layers)[:n_layers]
        stream = self._patch_stream(patches, patch_mask, keep)
        n_folded = 0 if path == AttentionPath.PLAIN else self.config.foldable_layers
        folded = [FoldedKV(stream, self.patch_in, self._fold_cache)] * n_folded
        return folded + [ProjectedKV(stream)] * (n_layers - n_folded)

    def _channels(self, n_patches: int, attend_to: torch.Tensor | None) -> list[torch.Tensor]:
        """The per-patch channels the last layer averages with its attention weights."""
        channels = []
        if self.pair is not None:
            channels.append(self.pair.coords[:n_patches])  # (P, 2)
        if attend_to is not None:
            channels.append(attend_to.unsqueeze(-3))  # (B, k, 1, P, c)
        return channels


def _path(path: AttentionPath | str) -> AttentionPath:
    try:
        return AttentionPath(str(path).lower())
    except ValueError:
        raise InvalidArgumentError(
            f"path must be one of {', '.join(p.value for p in AttentionPath)}, got {path!r}"
        ) from None
