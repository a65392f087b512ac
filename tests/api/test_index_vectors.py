"""``Index.search_vectors``: searching with query vectors encoded beforehand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossrank import Index, InvalidArgumentError
from crossrank.store import Generation


@pytest.fixture(scope="module")
def index(built_index: Path) -> Index:
    return Index.open(built_index, device="cpu")


def _unit(rng: np.random.Generator, m: int, d: int) -> np.ndarray:
    x = rng.standard_normal((m, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_vectors_equals_search_without_reranker(index: Index) -> None:
    text = "a red circle left of a blue square"
    xq = index.encoder.encode_text([text]).pooled  # (1, D)
    expected = index.search(text, k=5, reranker=None)
    got = index.search_vectors(xq, k=5)[0]
    assert [h.id for h in got] == [h.id for h in expected]
    assert [h.path for h in got] == [h.path for h in expected]
    assert [h.metadata for h in got] == [h.metadata for h in expected]
    np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], rtol=1e-6)
    assert got.counts == expected.counts
    assert "encode" not in got.timings_ms and "encode" in expected.timings_ms


def test_search_vectors_ranks_by_exact_inner_product(index: Index, built_index: Path) -> None:
    gen = Generation.current(built_index)
    xb, ids = np.asarray(gen.vectors()), np.asarray(gen.ids())
    xq = _unit(np.random.default_rng(0), 3, xb.shape[1])
    scores = xq @ xb.T  # (3, n)
    for qi, result in enumerate(index.search_vectors(xq, k=4)):
        got = np.array([h.id for h in result])
        # Tie-aware: the k-th score may be shared, so compare scores, and ids only above it.
        kth = np.sort(scores[qi])[::-1][3]
        assert set(ids[scores[qi] > kth + 1e-6]) <= set(got.tolist())
        expected_scores = scores[qi][np.searchsorted(ids, got)]
        np.testing.assert_allclose([h.score for h in result], expected_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            [h.first_stage_score for h in result], expected_scores, rtol=1e-5, atol=1e-6
        )
        assert all(h.rerank_score is None for h in result)
        assert result.query == f"<vector {qi}>"


def test_search_vectors_batch_equals_one_at_a_time(index: Index) -> None:
    xq = _unit(np.random.default_rng(1), 4, index.first_stage.d)
    batch = index.search_vectors(xq, k=3)
    assert len(batch) == 4
    for i in range(4):
        single = index.search_vectors(xq[i : i + 1], k=3)[0]
        assert [h.id for h in batch[i]] == [h.id for h in single]


def test_search_vectors_applies_where_like_search(index: Index) -> None:
    text = "a green triangle above a yellow star"
    xq = index.encoder.encode_text([text]).pooled
    where = "path LIKE '%nested%'"
    expected = index.search(text, k=5, where=where, reranker=None)
    got = index.search_vectors(xq, k=5, where=where)[0]
    assert [h.id for h in got] == [h.id for h in expected]
    assert got.counts == expected.counts
    assert got.counts.filtered_out > 0
    assert all("nested" in h.path for h in got)


def test_search_vectors_loads_no_encoder(
    built_index: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_encoder(*args: object, **kwargs: object) -> None:
        raise AssertionError("search_vectors loaded an encoder")

    monkeypatch.setattr("crossrank.encoders.load_encoder", no_encoder)
    monkeypatch.setattr("crossrank.encoders.load_text_encoder", no_encoder)
    index = Index.open(built_index, device="cpu")
    xq = _unit(np.random.default_rng(2), 1, index.first_stage.d)
    assert len(index.search_vectors(xq, k=2)[0]) == 2
    with pytest.raises(AssertionError, match="loaded an encoder"):  # the patch is in the way
        index.search("a red circle", k=2, reranker=None)


def test_search_vectors_empty_batch_returns_no_results(index: Index) -> None:
    assert index.search_vectors(np.zeros((0, index.first_stage.d), np.float32), k=3) == []


def test_search_vectors_rejects_bad_k(index: Index) -> None:
    xq = _unit(np.random.default_rng(3), 1, index.first_stage.d)
    with pytest.raises(InvalidArgumentError, match="k must be a positive number of hits, got 0"):
        index.search_vectors(xq, k=0)


def test_search_vectors_rejects_one_dimensional_query(index: Index) -> None:
    xq = _unit(np.random.default_rng(4), 1, index.first_stage.d)[0]
    with pytest.raises(InvalidArgumentError, match=r"xq must have shape \(m, \d+\).*xq\[None, :\]"):
        index.search_vectors(xq)


def test_search_vectors_rejects_wrong_dim(index: Index) -> None:
    d = index.first_stage.d
    expected = rf"query has dim {d + 1}, but index .* was built with dim {d} by .*same model"
    with pytest.raises(InvalidArgumentError, match=expected):
        index.search_vectors(np.ones((1, d + 1), np.float32))


def test_search_vectors_rejects_non_finite(index: Index) -> None:
    xq = _unit(np.random.default_rng(5), 1, index.first_stage.d)
    xq[0, 0] = np.nan
    with pytest.raises(InvalidArgumentError, match="xq holds NaN or infinite values"):
        index.search_vectors(xq)


def test_search_vectors_rejects_non_numeric(index: Index) -> None:
    with pytest.raises(InvalidArgumentError, match="xq must be a float matrix"):
        index.search_vectors([["a", "b"]])
