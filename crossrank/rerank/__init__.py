"""Rerankers: rescore a query's first-stage candidates from token and stored patch features.

Every reranker follows the :class:`Reranker` protocol, so the search path treats them alike.
Shipped today: :class:`MaxSimReranker`, parameter-free late interaction. The final score a hit
is ranked by comes from :func:`fuse` (``rerank``, ``sum`` or ``weighted:ALPHA``).
"""

from crossrank.rerank.fusion import Fusion, FusionMode, fuse, parse_fusion
from crossrank.rerank.maxsim import MaxSimReranker
from crossrank.rerank.reranker import Reranker, RerankerName, check_rerank_inputs, get_reranker

__all__ = [
    "Fusion",
    "FusionMode",
    "MaxSimReranker",
    "Reranker",
    "RerankerName",
    "check_rerank_inputs",
    "fuse",
    "get_reranker",
    "parse_fusion",
]
