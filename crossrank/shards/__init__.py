"""A sharded index: N whole crossrank indexes named by one top manifest, searched as one.

Build one with :func:`build_sharded` (``crossrank build SOURCE --index DIR --shards N``), open it
with ``crossrank.open(DIR)`` (a :class:`ShardedIndex`, an :class:`~crossrank.Index`), and change
it with ``add``, ``remove`` and ``compact``: every write commits atomically across the shards.

The per-shard operations are :class:`ShardSearcher` (open one shard generation; ``first_stage``,
``rerank``, ``hits``): small and picklable, so that a shard can be served by a thread (the
default), a process, or a Ray actor. The coordinator (:mod:`crossrank.shards.coordinator`) fans
a search out over any executor and merges it. See docs/sharding.md.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "SHARDS_NAME",
    "ShardRef",
    "ShardsManifest",
    "ShardSearcher",
    "ShardCandidates",
    "ShardedIndex",
    "open_index",
    "ShardedView",
    "build_sharded",
    "ShardedBuilder",
    "build_sharded_from_arrays",
    "add_sharded",
    "remove_sharded",
    "compact_sharded",
    "collect_shards",
    "verify_sharded",
    "is_sharded",
    "read_shards_manifest",
    "shard_of",
    "search_shards",
    "fan_out",
]

_LAZY = {
    "SHARDS_NAME": "crossrank.shards.layout",
    "ShardRef": "crossrank.shards.layout",
    "ShardsManifest": "crossrank.shards.layout",
    "is_sharded": "crossrank.shards.layout",
    "read_shards_manifest": "crossrank.shards.layout",
    "shard_of": "crossrank.shards.layout",
    "ShardSearcher": "crossrank.shards.searcher",
    "ShardCandidates": "crossrank.shards.searcher",
    "ShardedIndex": "crossrank.shards.index",
    "open_index": "crossrank.shards.index",
    "ShardedView": "crossrank.shards.coordinator",
    "search_shards": "crossrank.shards.coordinator",
    "fan_out": "crossrank.shards.coordinator",
    "build_sharded": "crossrank.shards.build",
    "ShardedBuilder": "crossrank.shards.build",
    "build_sharded_from_arrays": "crossrank.shards.build",
    "add_sharded": "crossrank.shards.write",
    "remove_sharded": "crossrank.shards.write",
    "compact_sharded": "crossrank.shards.write",
    "collect_shards": "crossrank.shards.write",
    "verify_sharded": "crossrank.shards.verify",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossrank.shards' has no attribute {name!r}")
