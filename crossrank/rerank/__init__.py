"""Rerankers: rescore a query's first-stage candidates from token and stored patch features.

Every reranker subclasses :class:`Reranker` (:mod:`crossrank.rerank.base`), so the search path
treats them alike: :class:`MaxSimReranker`, parameter-free late interaction;
:class:`CrossAttentionReranker`, a trained model configured by a :class:`RerankerConfig` and saved
as safetensors + config.json (:func:`save_reranker`, :func:`load_reranker`); and
:class:`BlipItmReranker`, BLIP's pretrained image-text matching head (``blip-itm``, for an index
built with a BLIP model). :func:`get_reranker` (:mod:`crossrank.rerank.registry`) builds one from a
name or a folder. The final score a hit is ranked by comes from :func:`fuse` (``rerank``, ``sum``
or ``weighted:ALPHA``). Training lives apart, in :mod:`crossrank.training`.

The torch modules (the cross-attention model and its checkpoint I/O) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crossrank.rerank.base import Reranker, RerankerName, check_rerank_inputs
from crossrank.rerank.config import Init, Pooling, QueryTokensMode, RerankerConfig
from crossrank.rerank.fusion import Fusion, FusionMode, fuse, parse_fusion, resolve_fusion
from crossrank.rerank.maxsim import MaxSimReranker
from crossrank.rerank.registry import get_reranker

if TYPE_CHECKING:
    from crossrank.rerank.blip_itm import BlipItmReranker
    from crossrank.rerank.checkpoint import load_reranker, read_reranker_config, save_reranker
    from crossrank.rerank.cross_attention import AttentionPath, CrossAttentionReranker
    from crossrank.rerank.kv_cache import PatchKV

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
    "check_rerank_inputs",
    "fuse",
    "get_reranker",
    "load_reranker",
    "parse_fusion",
    "read_reranker_config",
    "resolve_fusion",
    "save_reranker",
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
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossrank.rerank' has no attribute {name!r}")
