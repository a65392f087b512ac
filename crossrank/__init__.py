"""crossrank: image retrieval with a FAISS first stage and a reranker over stored patch features.

Example:
    >>> from crossrank import Index
    >>> index = Index.build(  # doctest: +SKIP
    ...     "photos/", "photos.idx", model="openai/clip-vit-base-patch32"
    ... )
    >>> index.search("a dog on a red sofa", k=5)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossrank.device import Device, Precision
from crossrank.errors import (
    CrossrankError,
    DecodeError,
    DependencyError,
    FilterError,
    IndexCorruptError,
    IndexLockedError,
    IndexNotFoundError,
    InvalidArgumentError,
    ModelError,
    ModelMismatchError,
    SourceError,
)
from crossrank.hits import Hit, SearchCounts, SearchResult

if TYPE_CHECKING:
    from crossrank.api.index import Index
    from crossrank.write.build import BuildReport, build_index

__version__ = "0.1.0"

__all__ = [
    "Index",
    "open",
    "Hit",
    "SearchResult",
    "SearchCounts",
    "BuildReport",
    "build_index",
    "Device",
    "Precision",
    "CrossrankError",
    "InvalidArgumentError",
    "SourceError",
    "DecodeError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "IndexLockedError",
    "ModelError",
    "ModelMismatchError",
    "FilterError",
    "DependencyError",
    "__version__",
]

# Index pulls in numpy; the CLI's --help should not pay for it, so these load on first use.
_LAZY = {
    "Index": "crossrank.api.index",
    "BuildReport": "crossrank.write.build",
    "build_index": "crossrank.write.build",
}


def open(path: str | Path, **kwargs: Any) -> Index:
    """Open an index folder: one index, or a sharded index (a folder holding ``shards.json``).

    Keyword arguments as :meth:`Index.open` (``device``, ``model``, ``nprobe``, ``precision``); a
    sharded index
    also takes those of :class:`crossrank.shards.ShardedIndex` (``factory``, ``executor``).

    Raises:
        IndexNotFoundError: no committed index in ``path``.
    """
    from crossrank.shards.index import open_index

    return open_index(path, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossrank' has no attribute {name!r}")
