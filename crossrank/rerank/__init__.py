"""Rerankers: rescore a query's first-stage candidates from token and stored patch features.

Every reranker follows the :class:`Reranker` protocol, so the search path treats them alike:
:class:`MaxSimReranker`, parameter-free late interaction, and :class:`CrossAttentionReranker`, a
trained model configured by a :class:`RerankerConfig` and saved as safetensors + config.json
(:func:`save_reranker`, :func:`load_reranker`; :func:`get_reranker` takes such a folder too) and
trained over frozen encoders by :func:`train_reranker`; and :class:`BlipItmReranker`, BLIP's
pretrained image-text matching head (``blip-itm``, for an index built with a BLIP model). The final
score a hit is ranked by comes from :func:`fuse` (``rerank``, ``sum`` or ``weighted:ALPHA``).

The torch modules (the cross-attention model and its checkpoint I/O) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crossrank.rerank.config import Init, Pooling, QueryTokensMode, RerankerConfig
from crossrank.rerank.fusion import Fusion, FusionMode, fuse, parse_fusion, resolve_fusion
from crossrank.rerank.maxsim import MaxSimReranker
from crossrank.rerank.reranker import Reranker, RerankerName, check_rerank_inputs, get_reranker

if TYPE_CHECKING:
    from crossrank.rerank.blip_itm import BlipItmReranker
    from crossrank.rerank.checkpoint import load_reranker, read_reranker_config, save_reranker
    from crossrank.rerank.cross_attention import AttentionPath, CrossAttentionReranker
    from crossrank.rerank.kv_cache import PatchKV
    from crossrank.rerank.train import RerankLoss, RerankTrainConfig, TrainReport, train_reranker

__all__ = [
    "AttentionPath",
    "BlipItmReranker",
    "CrossAttentionReranker",
    "Fusion",
    "FusionMode",
    "Init",
    "MaxSimReranker",
    "PatchKV",
    "Pooling",
    "QueryTokensMode",
    "Reranker",
    "RerankerConfig",
    "RerankerName",
    "RerankLoss",
    "RerankTrainConfig",
    "TrainReport",
    "check_rerank_inputs",
    "fuse",
    "get_reranker",
    "load_reranker",
    "parse_fusion",
    "resolve_fusion",
    "read_reranker_config",
    "save_reranker",
    "train_reranker",
]

# torch is imported only when one of these is first used.
_LAZY = {
    "AttentionPath": "crossrank.rerank.cross_attention",
    "BlipItmReranker": "crossrank.rerank.blip_itm",
    "CrossAttentionReranker": "crossrank.rerank.cross_attention",
    "PatchKV": "crossrank.rerank.kv_cache",
    "load_reranker": "crossrank.rerank.checkpoint",
    "read_reranker_config": "crossrank.rerank.checkpoint",
    "save_reranker": "crossrank.rerank.checkpoint",
    "RerankLoss": "crossrank.rerank.train",
    "RerankTrainConfig": "crossrank.rerank.train",
    "TrainReport": "crossrank.rerank.train",
    "train_reranker": "crossrank.rerank.train",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossrank.rerank' has no attribute {name!r}")
