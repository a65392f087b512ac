"""The library's entry point: :class:`Index` opens, builds, searches and changes an index.

``from crossrank import Index`` is the same class. A search runs the stages of
:mod:`crossrank.search`; a build, add, remove or compact runs :mod:`crossrank.write`.
"""

from crossrank.api.index import DEFAULT_RERANKER, Index
from crossrank.api.verify import verify_index
from crossrank.search.encode import Query, QueryTruncatedWarning

__all__ = ["DEFAULT_RERANKER", "Index", "Query", "QueryTruncatedWarning", "verify_index"]
