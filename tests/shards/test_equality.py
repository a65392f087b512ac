"""A sharded index equals the unsharded index of the same files: ids, vectors, metadata, skips,
and every search (text and image queries, with and without a filter and a reranker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import crossrank
from crossrank.shards import ShardedIndex, read_shards_manifest

from .conftest import N_SHARDS

TOL = 1e-4


@pytest.fixture(scope="module")
def opened(pair: tuple[Path, Path]):
    flat, sharded = pair
    a = crossrank.open(flat, device="cpu")
    b = crossrank.open(sharded, device="cpu")
    yield a, b
    a.close()
    b.close()


def _stored(index_dir: Path) -> dict[int, np.ndarray]:
    """``{id: vector}`` of an unsharded index, or of every shard of a sharded one."""
    from crossrank.store import Generation, read_manifest

    roots = (
        [Path(r.path) for r in read_shards_manifest(index_dir).shards]
        if (index_dir / "shards.json").is_file()
        else [index_dir]
    )
    out: dict[int, np.ndarray] = {}
    for root in roots:
        gen = Generation(read_manifest(root).generation_path)
        for i, v in zip(np.asarray(gen.ids()).tolist(), np.asarray(gen.vectors()), strict=True):
            out[i] = v
    return out


def assert_same(x, y) -> None:
    """Same hits, same order, same paths, scores within TOL; same counts."""
    assert [h.id for h in x] == [h.id for h in y]
    assert [h.path for h in x] == [h.path for h in y]
    for g, h in zip(x, y, strict=True):
        assert abs(g.score - h.score) <= TOL
        assert abs(g.first_stage_score - h.first_stage_score) <= TOL
        assert (g.rerank_score is None) == (h.rerank_score is None)
        if g.rerank_score is not None:
            assert abs(g.rerank_score - h.rerank_score) <= TOL
        assert g.metadata == h.metadata
    assert x.counts == y.counts
    assert x.reranker == y.reranker and x.fusion == y.fusion


def test_open_returns_a_sharded_index(opened) -> None:
    a, b = opened
    assert isinstance(b, ShardedIndex) and not isinstance(a, ShardedIndex)
    assert b.n_shards == N_SHARDS
    assert len(a) == len(b) == 41


def test_ids_vectors_metadata_and_skips_equal_the_unsharded_build(pair, opened) -> None:
    flat, sharded = pair
    a, b = opened
    va, vb = _stored(flat), _stored(sharded)
    assert sorted(va) == sorted(vb) == list(range(41))
    for i in va:
        np.testing.assert_allclose(va[i], vb[i], atol=1e-6)
    cols = ["id", "path", "sha256", "width", "height", "bytes"]
    assert a.metadata(columns=cols).equals(b.metadata(columns=cols))
    assert sorted(a.skipped().to_pylist(), key=str) == sorted(b.skipped().to_pylist(), key=str)
    fa, fb = a.info(), b.info()
    assert fa["counts"]["images"] == fb["counts"]["images"] == 41
    assert fa["counts"]["skipped"] == fb["counts"]["skipped"] == 2  # undecodable + the copy


def test_each_shard_holds_the_ids_routed_to_it(pair) -> None:
    from crossrank.store import Generation, read_manifest

    top = read_shards_manifest(pair[1])
    sizes = []
    for ref in top.shards:
        ids = np.asarray(Generation(read_manifest(ref.path).generation_path).ids())
        assert (ids % N_SHARDS == ref.index).all()
        sizes.append(ids.size)
    assert sum(sizes) == 41 and min(sizes) >= 13


@pytest.mark.parametrize("where", [None, "id % 3 <> 1 AND width >= 8"])
@pytest.mark.parametrize("reranker", ["none", "maxsim"])
@pytest.mark.parametrize("image", [False, True])
def test_search_equals_the_unsharded_search(
    opened, shard_source: Path, where, reranker, image
) -> None:
    a, b = opened
    query = shard_source / "img_007.png" if image else "a red circle left of a blue square"
    kw = {"k": 8, "rerank_k": 20, "where": where, "reranker": reranker, "fusion": "sum"}
    x, y = a.search(query, **kw), b.search(query, **kw)
    assert len(x) == 8
    assert_same(x, y)
    if where is not None:
        assert y.counts.filtered_out > 0


def test_search_batch_vectors_and_filters_equal(opened, shard_source: Path) -> None:
    a, b = opened
    queries = ["a green triangle above a yellow star", shard_source / "more" / "img_002.png"]
    kw = {"k": 5, "rerank_k": 12, "reranker": "maxsim", "filters": {"width": {"ge": 8}}}
    for x, y in zip(a.search_batch(queries, **kw), b.search_batch(queries, **kw), strict=True):
        assert_same(x, y)
    xq = a.encoder.encode_text(["a purple square"]).pooled
    for x, y in zip(a.search_vectors(xq, k=41), b.search_vectors(xq, k=41), strict=True):
        assert_same(x, y)  # every image, in the same order


def test_k_beyond_the_index_and_a_filter_that_allows_nothing(opened) -> None:
    a, b = opened
    assert_same(a.search("a cat", k=100, rerank_k=200), b.search("a cat", k=100, rerank_k=200))
    x, y = a.search("a cat", where="width < 0"), b.search("a cat", where="width < 0")
    assert len(y) == 0 and x.counts == y.counts


def test_rerank_of_given_ids_and_explain_equal(opened) -> None:
    a, b = opened
    ids = [3, 17, 22, 40, 8]
    assert_same(
        a.rerank("a dog", ids, reranker="maxsim"), b.rerank("a dog", ids, reranker="maxsim")
    )
    x = a.search("a red circle", k=3, reranker="maxsim", explain=True)
    y = b.search("a red circle", k=3, reranker="maxsim", explain=True)
    assert_same(x, y)
    for g, h in zip(x, y, strict=True):
        assert g.explain is not None and h.explain is not None
        assert g.explain.tokens == h.explain.tokens
        np.testing.assert_allclose(g.explain.maps, h.explain.maps, atol=TOL)


def test_rerank_refuses_ids_not_in_the_index(opened) -> None:
    from crossrank.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="not in index .*: 99"):
        opened[1].rerank("a dog", [1, 99])


def test_an_int8_sharded_index_reranks_as_the_unsharded_one(
    shard_source: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    from crossrank.shards import build_sharded
    from crossrank.write.build import build_index

    kw = {"model": tiny_clip, "device": "cpu", "batch_size": 16, "patch_codec": "int8"}
    build_index(shard_source, tmp_path / "flat.idx", **kw)
    build_sharded(shard_source, tmp_path / "sharded.idx", shards=2, **kw)
    with (
        crossrank.open(tmp_path / "flat.idx", device="cpu") as a,
        crossrank.open(tmp_path / "sharded.idx", device="cpu") as b,
    ):
        assert b.info()["patch_codec"] == "int8"
        kw = {"k": 6, "rerank_k": 15, "reranker": "maxsim", "fusion": "weighted:0.7"}
        assert_same(a.search("a yellow star", **kw), b.search("a yellow star", **kw))
