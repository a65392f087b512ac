"""The search pipeline: one query's way from text or image to hits.

- :mod:`crossrank.search.encode`: encode the queries (:func:`encode_queries`);
- :mod:`crossrank.search.pipeline`: filter, first stage, gather and rerank, fuse, join metadata
  (:func:`search_snapshot`, one function per stage);
- :mod:`crossrank.search.snapshot`: the generation a search holds from start to end
  (:class:`Snapshot`).

:class:`crossrank.Index` is the entry point; these are its parts.
"""

from crossrank.search.encode import Query, encode_queries
from crossrank.search.pipeline import search_snapshot
from crossrank.search.snapshot import Snapshot

__all__ = ["Query", "Snapshot", "encode_queries", "search_snapshot"]
