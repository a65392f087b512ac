"""The per-shard interface as a remote engine uses it: every argument and result crosses a pickle
boundary, the reranker is named rather than sent, and any executor runs the rounds."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import crossrank
from crossrank.shards import ShardedIndex, ShardSearcher, read_shards_manifest

from .test_equality import assert_same


class PickledShard:
    """A ShardSearcher reached only through pickled calls, as a Ray actor is."""

    def __init__(self, ref: Any, calls: list[str]) -> None:
        self._shard = ShardSearcher(pickle.loads(pickle.dumps(ref)), device="cpu")
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._shard, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = pickle.loads(pickle.dumps((args, kwargs)))
            self._calls.append(name)
            return pickle.loads(pickle.dumps(method(*args, **kwargs)))

        return call

    def close(self) -> None:
        self._shard.close()


def test_a_search_through_pickled_shard_calls_equals_the_local_one(
    pair, shard_source: Path
) -> None:
    flat, sharded = pair
    calls: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        remote = ShardedIndex.open(
            sharded,
            device="cpu",
            factory=lambda ref: PickledShard(ref, calls),
            executor=pool,
            remote=True,
        )
        with crossrank.open(flat, device="cpu") as a:
            for query in ("a red circle left of a blue square", shard_source / "img_012.png"):
                kw = {"k": 6, "rerank_k": 15, "reranker": "maxsim", "where": "width > 1"}
                assert_same(a.search(query, **kw), remote.search(query, **kw))
            assert_same(
                a.rerank("a cat", [4, 8, 15], reranker="maxsim"),
                remote.rerank("a cat", [4, 8, 15], reranker="maxsim"),
            )
        remote.close()
    assert {"first_stage", "rerank", "hits", "stored_scores", "unknown"} <= set(calls)


def test_shard_refs_and_results_pickle(pair) -> None:
    import numpy as np

    ref = read_shards_manifest(pair[1]).shards[1]
    assert pickle.loads(pickle.dumps(ref)) == ref
    shard = ShardSearcher(ref, device="cpu")
    try:
        got = shard.first_stage(np.ones((2, 32), np.float32), 5, where="width > 1")
        back = pickle.loads(pickle.dumps(got))
        assert back.shard == 1 and back.ids.shape == (2, 5) and (back.ids % 3 == 1).all()
        hits = shard.hits(back.ids[0], back.scores[0], back.scores[0], None)
        assert [h.id for h in pickle.loads(pickle.dumps(hits))] == back.ids[0].tolist()
    finally:
        shard.close()


def test_a_shard_loads_a_named_reranker_at_its_precision(pair, tmp_path: Path) -> None:
    """A remote shard is sent the reranker's name or folder: it loads it at the precision its
    factory was given (``open_on_ray(precision=...)`` passes it to every actor)."""
    from crossrank import Precision
    from crossrank.rerank import CrossAttentionReranker, RerankerConfig
    from crossrank.rerank.checkpoint import save_reranker

    ref = read_shards_manifest(pair[1]).shards[0]
    dim = int(read_shards_manifest(pair[1]).encoder["patch_dim"])
    folder = save_reranker(
        CrossAttentionReranker(RerankerConfig(text_dim=dim, patch_dim=dim, width=16, heads=2)),
        tmp_path / "rr",
    )
    for precision in ("auto", "bfloat16"):
        shard = ShardSearcher(ref, device="cpu", precision=precision)
        try:
            assert shard._scorer(str(folder)).precision is Precision(precision)
        finally:
            shard.close()
