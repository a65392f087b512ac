"""The architecture of the cross-attention reranker.

One frozen :class:`RerankerConfig` describes a :class:`~crossrank.rerank.CrossAttentionReranker`
completely; it is saved as ``config.json`` beside the weights (see
:mod:`crossrank.rerank.checkpoint`) so a checkpoint reopens without remembering how it was made.
How a reranker is trained is :class:`crossrank.training.config.RerankTrainConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = ["Init", "Pooling", "QueryTokensMode", "RerankerConfig"]


class QueryTokensMode(StrEnum):
    """Where the learnable query tokens go in the query-side sequence."""

    CONCAT = "concat"  # beside the text tokens: [query tokens; text tokens]
    REPLACE = "replace"  # instead of them: only the query tokens attend to the patches


class Init(StrEnum):
    """How the linear maps (and position embeddings, query tokens) are initialised.

    Only training from scratch sees it; a saved reranker loads its weights whatever the value.
    """

    BERT = "bert"  # truncated normal, std 0.02 (BERT / ViT); at width 128 attention starts uniform
    # normal, std 1 / sqrt(fan_in) (LeCun): unit-scale projections, so attention logits start at
    # unit scale too; learns binding faster from scratch (research/caption_probe.py)
    LECUN = "lecun"


class Pooling(StrEnum):
    """How the query-side states become one vector per candidate before the score head."""

    MEAN = "mean"  # masked mean over the real positions (padding tokens never count)
    # The first real position: the first query token if any, else the first real text token (for
    # CLIP's causal text encoder a start token that has seen no word: use it with query tokens).
    FIRST = "first"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class RerankerConfig:
    """The architecture of a :class:`~crossrank.rerank.CrossAttentionReranker`.

    Each of ``layers`` layers lets the query-side states (text tokens, learnable query tokens, or
    both) attend to the candidate's patches, then runs an MLP; options add patch self-attention
    before and patch-to-token attention after. The defaults are the shipped demo reranker's
    architecture, the best measured (research/ablation.py): 1 layer of width 128, 4 heads, pre-norm,
    no gates, LeCun init, every other option off; ``patch_positions`` has no default size (it is
    the encoder's patch count: ``crossrank train`` and :func:`~crossrank.rerank.train_reranker`
    set it from the index when no architecture is given).

    Raises:
        ValueError: a field has a wrong type or value; the message names it.

    Example:
        >>> RerankerConfig(text_dim=64, patch_dim=64, width=32, heads=2).head_dim
        16
    """

    text_dim: int = 512  # d_t: size of the encoder's token features
    # Width of the text encoder's layer-0 token states (token plus position embeddings, before any
    # attention) read in front of each token's features; 0 = none. The last layer of a small text
    # encoder can merge the words a relation turns on ("left" vs "right"); layer 0 keeps them apart.
    # In training any value > 0 turns it on and the encoder's width replaces it (as for text_dim).
    token_embeddings: int = 0
    patch_dim: int = 512  # d_v: size of the encoder's stored patch features
    width: int = 128  # size of the reranker's hidden states (both modalities)
    layers: int = 1  # cross-attention layers
    heads: int = 4  # attention heads; must divide width
    mlp_ratio: float = 4.0  # MLP hidden size = mlp_ratio * width
    dropout: float = 0.0  # dropout on attention outputs and the MLP, in [0, 1); training only
    prenorm: bool = True  # a LayerNorm per modality on the raw features before projecting to width
    gated: bool = False  # Flamingo tanh gates on the residual branches, initialised at 0 (identity)
    n_query_tokens: int = 0  # learnable Q-Former-style query tokens; 0 = none
    query_tokens_mode: QueryTokensMode = QueryTokensMode.CONCAT  # concat: beside text; replace
    bidirectional: bool = False  # patches attend back to the query-side states in every layer
    patch_self_attention: bool = False  # self-attention among a candidate's patches in each layer
    query_self_attention: bool = (
        False  # self-attention among the query-side positions in each layer
    )
    sparse_top_m: int | None = None  # each query position attends to its top-m patches; None = all
    patch_positions: int | None = None  # learned position embedding over this many patch slots
    # A pairwise spatial head: every pair of query positions (i, j) is scored from their final
    # states and the difference of where they looked in the last layer (attention-weighted
    # patch coordinates on the patch_positions grid, which must be square), then mean-pooled and
    # added to the logit: a direct path from "where is each object" to the score ("left of").
    pair_head: bool = False
    # Width of the pair head's per-pair hidden layer (its (n, n, pair_width) GELU is most of its
    # cost); None = the reranker's width.
    pair_width: int | None = None
    pooling: Pooling = Pooling.MEAN  # mean over real positions | first position
    init: Init = (
        Init.LECUN
    )  # initialisation for training from scratch: lecun (std 1/sqrt(fan_in)) | bert (0.02)

    def __post_init__(self) -> None:
        for name in ("text_dim", "patch_dim", "width", "layers", "heads"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not _is_int(self.token_embeddings) or self.token_embeddings < 0:
            raise ValueError(
                "token_embeddings must be an int >= 0 (the width of the text encoder's layer-0 "
                f"token states; 0 = none), got {self.token_embeddings!r}"
            )
        if self.width % self.heads:
            raise ValueError(
                f"width must be divisible by heads, got width={self.width} and heads={self.heads}; "
                "e.g. width=128, heads=4"
            )
        if not _is_real(self.mlp_ratio) or not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {self.mlp_ratio!r}")
        if round(self.mlp_ratio * self.width) < 1:
            raise ValueError(
                "mlp_ratio * width must be >= 1 (MLP hidden size), "
                f"got {self.mlp_ratio} * {self.width}"
            )
        object.__setattr__(self, "mlp_ratio", float(self.mlp_ratio))
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))
        for name in (
            "prenorm",
            "gated",
            "bidirectional",
            "patch_self_attention",
            "query_self_attention",
            "pair_head",
        ):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if not _is_int(self.n_query_tokens) or self.n_query_tokens < 0:
            raise ValueError(
                f"n_query_tokens must be an int >= 0 (0 = no learnable query tokens), "
                f"got {self.n_query_tokens!r}"
            )
        mode = _enum(QueryTokensMode, self.query_tokens_mode, "query_tokens_mode")
        object.__setattr__(self, "query_tokens_mode", mode)
        if self.query_tokens_mode == QueryTokensMode.REPLACE and self.n_query_tokens == 0:
            raise ValueError(
                "query_tokens_mode='replace' needs n_query_tokens >= 1 (the query tokens replace "
                "the text tokens); set n_query_tokens or use 'concat'"
            )
        m = self.sparse_top_m
        if m is not None and (not _is_int(m) or m < 1):
            raise ValueError(
                f"sparse_top_m must be None (dense) or an int >= 1 (patches per query position), "
                f"got {self.sparse_top_m!r}"
            )
        if self.patch_positions is not None and (
            not _is_int(self.patch_positions) or self.patch_positions < 1
        ):
            raise ValueError(
                "patch_positions must be None (no position embedding) or an int >= 1 (patch "
                f"slots, at least the encoder's n_patches), got {self.patch_positions!r}"
            )
        if self.pair_head and (
            self.patch_positions is None
            or round(self.patch_positions**0.5) ** 2 != self.patch_positions
        ):
            raise ValueError(
                "pair_head needs patch_positions set to the encoder's square patch grid (e.g. 64 "
                f"for 8 x 8 patches): it reads where each patch lies, got {self.patch_positions!r}"
            )
        if self.pair_width is not None and (not _is_int(self.pair_width) or self.pair_width < 1):
            raise ValueError(
                "pair_width must be None (the reranker's width) or an int >= 1 (the pair head's "
                f"hidden size, e.g. 32), got {self.pair_width!r}"
            )
        object.__setattr__(self, "pooling", _enum(Pooling, self.pooling, "pooling"))
        object.__setattr__(self, "init", _enum(Init, self.init, "init"))

    # -- derived ------------------------------------------------------------------------------

    @property
    def token_input_dim(self) -> int:
        """Size of each query token's input: ``token_embeddings + text_dim`` (layer-0 first)."""
        return self.token_embeddings + self.text_dim

    @property
    def head_dim(self) -> int:
        """Size of one attention head: ``width // heads``."""
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        """Hidden size of each MLP: ``round(mlp_ratio * width)``."""
        return round(self.mlp_ratio * self.width)

    @property
    def static_patch_layers(self) -> int:
        """Layers whose keys/values come from query-independent patch states (precomputable).

        Without ``bidirectional`` the patch states never depend on the query, so every layer's
        keys and values can be computed once per image
        (:meth:`CrossAttentionReranker.precompute_kv`).
        With it, layer 1's patch-to-token attention makes the patch states query-dependent, so only
        layer 1 is precomputable.
        """
        return 1 if self.bidirectional else self.layers

    @property
    def foldable_layers(self) -> int:
        """Layers whose keys/values are *linear* in the (layer-normalised) stored patches.

        Folding W_k into the query side and W_v after the attention needs exactly that. With
        ``patch_self_attention`` layer 1's keys come from a self-attention over the patches (not
        linear): 0 layers. With ``bidirectional`` only layer 1 reads the unchanged patches: 1.
        Otherwise every layer reads the same projected patches: all of them.
        """
        if self.patch_self_attention:
            return 0
        return 1 if self.bidirectional else self.layers

    # -- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-able values (enums as their strings)."""
        out = dataclasses.asdict(self)
        out["query_tokens_mode"] = self.query_tokens_mode.value
        out["pooling"] = self.pooling.value
        out["init"] = self.init.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RerankerConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown fields are refused.

        Raises:
            ValueError: ``data`` is not a dict, has unknown fields, or a value is invalid.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a reranker config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown reranker config fields {unknown}; known fields are {sorted(known)} "
                "(was it written by a newer crossrank?)"
            )
        return cls(**data)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _enum(enum: type[StrEnum], value: object, name: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise ValueError(
            f"{name} must be one of {', '.join(m.value for m in enum)}, got {value!r}"
        ) from None
