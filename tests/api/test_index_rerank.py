"""``Index.rerank``: reranking the candidates a search backend chose with its own first stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossrank import Index, InvalidArgumentError

QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def index(built_index: Path) -> Index:
    return Index.open(built_index, device="cpu")


def _first_stage_ids(index: Index, m: int) -> list[int]:
    return [h.id for h in index.search(QUERY, k=m, reranker=None)]


@pytest.mark.parametrize("fusion", ["rerank", "sum", "weighted:0.3"])
def test_rerank_equals_search_over_the_same_candidates(index: Index, fusion: str) -> None:
    m = 8
    cands = _first_stage_ids(index, m)
    expected = index.search(QUERY, k=m, rerank_k=m, reranker="maxsim", fusion=fusion)
    shuffled = list(np.random.default_rng(0).permutation(cands))  # the backend's order is ignored
    got = index.rerank(QUERY, shuffled, reranker="maxsim", fusion=fusion)
    assert [h.id for h in got] == [h.id for h in expected]
    for attr in ("score", "first_stage_score", "rerank_score"):
        np.testing.assert_allclose(
            [getattr(h, attr) for h in got],
            [getattr(h, attr) for h in expected],
            rtol=1e-5,
            atol=1e-6,
        )
    assert [h.path for h in got] == [h.path for h in expected]
    assert [h.metadata for h in got] == [h.metadata for h in expected]
    assert (got.reranker, got.fusion, got.encoder) == (
        expected.reranker,
        expected.fusion,
        expected.encoder,
    )
    assert got.counts.candidates == m and got.counts.returned == m and got.query == QUERY
    assert {"encode", "first_stage", "rerank", "metadata", "total"} <= set(got.timings_ms)


def test_k_cuts_and_foreign_candidates_are_scored_by_stored_vectors(index: Index) -> None:
    cands = _first_stage_ids(index, 24)[-6:]  # ones the index's own first stage ranks last
    got = index.rerank(QUERY, cands, k=2, reranker="maxsim")
    assert len(got) == 2 and got.counts.requested == 2 and got.counts.candidates == 6
    xq = index.encoder.encode_text([QUERY]).pooled[0]
    gen = index.stored
    for hit in got:
        stored = np.asarray(gen.vectors())[gen.rows_of_ids(np.array([hit.id]))[0]]
        assert hit.first_stage_score == pytest.approx(float(stored @ xq), rel=1e-5, abs=1e-6)
        assert hit.rerank_score is not None


def test_without_a_reranker_the_first_stage_orders(index: Index) -> None:
    cands = _first_stage_ids(index, 5)
    got = index.rerank(QUERY, cands[::-1], reranker=None)
    assert [h.id for h in got] == cands
    assert got.reranker == "none" and got.fusion == "none"
    assert all(h.rerank_score is None for h in got)
    # "auto" on an index without a trained reranker: the same order, with the hint to train one.
    auto = index.rerank(QUERY, cands[::-1])
    assert [h.id for h in auto] == cands and any("train" in n for n in auto.notes)


def test_image_query(index: Index, image_folder: Path) -> None:
    path = image_folder / "img_003.png"
    cands = [h.id for h in index.search(path, k=6, reranker=None)]
    expected = index.search(path, k=6, rerank_k=6, reranker="maxsim", fusion="rerank")
    got = index.rerank(path, cands, reranker="maxsim", fusion="rerank")
    assert [h.id for h in got] == [h.id for h in expected]
    assert got.query == expected.query


def test_empty_ids_give_an_empty_result(index: Index) -> None:
    got = index.rerank(QUERY, [])
    assert len(got) == 0 and got.counts.candidates == 0 and got.counts.returned == 0
    assert got.generation == index.generation


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([0, 1, 999, 5000], r"2 id\(s\) not in index .*: 999, 5000; rerank only ids"),
        ([0, 1, 1], r"ids must each appear once, but these repeat: 1"),
        ([0.5, 1.0], r"ids must be a 1-d list of integer ids"),
        ("3,4", r"ids must be a list of integer ids"),
    ],
)
def test_bad_ids_are_one_line(index: Index, ids: object, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match) as e:
        index.rerank(QUERY, ids)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


def test_removed_ids_are_named(index_copy: Path) -> None:
    with Index.open(index_copy, device="cpu") as index:
        index.remove([2, 3])
        with pytest.raises(InvalidArgumentError, match=r"2 id\(s\) not in index .*: 2, 3"):
            index.rerank(QUERY, [1, 2, 3, 4])
        assert len(index.rerank(QUERY, [1, 4], reranker=None)) == 2


def test_bad_k_and_query(index: Index) -> None:
    with pytest.raises(InvalidArgumentError, match="k must be a positive number"):
        index.rerank(QUERY, [1, 2], k=0)
    with pytest.raises(InvalidArgumentError, match="empty"):
        index.rerank("  ", [1, 2])
