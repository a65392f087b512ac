"""The library's entry point: :class:`Index` opens, builds, searches and changes an index.

``from crossrank import Index`` is the same class. A search runs the stages of
:mod:`crossrank.search`; a build, add, remove or compact runs :mod:`crossrank.write`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crossrank.api.index import DEFAULT_RERANKER, Index
from crossrank.search.encode import Query, QueryTruncatedWarning

if TYPE_CHECKING:
    from crossrank.api.verify import verify_index

__all__ = ["DEFAULT_RERANKER", "Index", "Query", "QueryTruncatedWarning", "verify_index"]


def __getattr__(name: str) -> Any:
    # verify_index on first use: a search never reads the checksums (a cold start).
    if name == "verify_index":
        from crossrank.api.verify import verify_index

        return verify_index
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
