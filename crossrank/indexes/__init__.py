"""The first stage: FAISS inner-product search over pooled image vectors, with id pre-filters.

Public API:
    IndexConfig: which index (by size, or a FAISS factory string), training, nprobe, device.
    FirstStage: build / load / save / search, on the CPU or a GPU copy, thread-safe searches.
    AllowedSelector: allowed ids made ready once (positions, FAISS selector) for many searches.
    exact_search: exact top-k over a given set of vectors (small filtered sets).
    auto_factory: the factory string chosen for a corpus size.

faiss is imported only when an index is built or loaded (never on ``import crossrank.indexes``).
"""

from __future__ import annotations

from crossrank.indexes._checks import PAD_ID, PAD_SCORE
from crossrank.indexes.config import IndexConfig
from crossrank.indexes.exact import exact_search
from crossrank.indexes.factory import auto_factory
from crossrank.indexes.first_stage import AllowedSelector, FirstStage

__all__ = [
    "IndexConfig",
    "FirstStage",
    "AllowedSelector",
    "exact_search",
    "auto_factory",
    "PAD_ID",
    "PAD_SCORE",
]
