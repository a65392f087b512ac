from __future__ import annotations

import numpy as np
import pytest

from crossrank.errors import InvalidArgumentError
from crossrank.indexes import exact_search

from ._vectors import assert_same_knn, brute_force, make_vectors


@pytest.mark.parametrize("k", [1, 7, 50])
def test_exact_search_equals_brute_force(vectors, k):
    D, I = exact_search(vectors.xq, vectors.xb, vectors.ids, k)
    assert (
        D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (len(vectors.xq), k)
    )
    Dref, Iref = brute_force(vectors.xq, vectors.xb, vectors.ids, k)
    assert_same_knn(D, I, Dref, Iref)
    # No ties in this random set: the ids must agree exactly, in order.
    np.testing.assert_array_equal(I, Iref)


def test_fewer_vectors_than_k_pad_with_minus_one_and_minus_inf(vectors):
    D, I = exact_search(vectors.xq[:3], vectors.xb[:4], vectors.ids[:4], k=6)
    Dref, Iref = brute_force(vectors.xq[:3], vectors.xb[:4], vectors.ids[:4], k=6)
    np.testing.assert_array_equal(I, Iref)
    np.testing.assert_allclose(D[:, :4], Dref[:, :4], atol=1e-6)
    assert (I[:, 4:] == -1).all() and np.isneginf(D[:, 4:]).all()


def test_no_vectors_gives_only_padding():
    D, I = exact_search(
        np.ones((2, 3), np.float32), np.zeros((0, 3), np.float32), np.zeros(0, np.int64), k=2
    )
    assert (I == -1).all() and np.isneginf(D).all()


def test_ties_are_ordered_by_id_also_at_the_kth_place():
    # Six identical vectors: every score ties, so the k smallest ids must come out, in order,
    # whatever the row order of xb.
    xb = np.tile(np.array([[0.6, 0.8]], np.float32), (6, 1))
    ids = np.array([40, 10, 30, 60, 20, 50])
    for perm in [np.arange(6), np.array([5, 3, 1, 0, 2, 4])]:
        D, I = exact_search(np.array([[1.0, 0.0]], np.float32), xb[perm], ids[perm], k=3)
        assert I.tolist() == [[10, 20, 30]]
        np.testing.assert_allclose(D, 0.6)


def test_a_tie_below_a_clear_winner_is_broken_by_id():
    xb = np.array([[1, 0], [0.6, 0.8], [0.6, -0.8], [0, 1]], np.float32)
    D, I = exact_search(np.array([[1, 0]], np.float32), xb, np.array([9, 7, 3, 1]), k=2)
    assert I.tolist() == [[9, 3]]


def test_inputs_are_coerced_to_float32():
    data = make_vectors(n=50, d=8, m=2)
    D64, I64 = exact_search(
        data.xq.astype(np.float64),
        np.asfortranarray(data.xb.astype(np.float64)),
        data.ids.tolist(),
        5,
    )
    D32, I32 = exact_search(data.xq, data.xb, data.ids, 5)
    np.testing.assert_array_equal(I64, I32)
    np.testing.assert_allclose(D64, D32, atol=1e-6)


def test_many_queries_are_scored_in_chunks(monkeypatch):
    from crossrank.indexes import exact

    data = make_vectors(n=300, d=8, m=40)
    expected = exact_search(data.xq, data.xb, data.ids, 4)
    monkeypatch.setattr(exact, "_SCORE_BLOCK", 1000)  # 3 queries per chunk
    got = exact_search(data.xq, data.xb, data.ids, 4)
    np.testing.assert_array_equal(got[1], expected[1])
    # A chunk's matmul may block (or thread) differently from the whole: last-bit differences.
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [0, -3, 2.0, True])
def test_bad_k_is_refused(vectors, k):
    with pytest.raises(InvalidArgumentError, match=r"k must be an int >= 1 \(results per query\)"):
        exact_search(vectors.xq, vectors.xb, vectors.ids, k)


def test_dim_mismatch_is_refused(vectors):
    with pytest.raises(
        InvalidArgumentError, match=r"query has dim 31, but the vectors searched have dim 32"
    ):
        exact_search(vectors.xq[:, :31], vectors.xb, vectors.ids, 3)


@pytest.mark.parametrize(
    ("xq", "xb", "ids", "match"),
    [
        (
            np.ones(4),
            np.ones((3, 4)),
            np.arange(3),
            r"xq must have shape \(m, 4\), got shape \(4,\); pass xq\[None, :\]",
        ),
        (np.ones((1, 4)), np.ones((3, 4)), np.arange(2), "ids has 2 ids, but there are 3 vectors"),
        (
            np.ones((1, 4)),
            np.ones((3, 4)),
            np.array([0, -1, 2]),
            r"ids must be >= 0 \(-1 marks an empty result slot\)",
        ),
        (
            np.ones((1, 4)),
            np.ones((3, 4)),
            np.array([0.0, 1.0, 2.0]),
            "ids must be a 1-D array of int64 ids",
        ),
        (np.full((1, 4), np.nan), np.ones((3, 4)), np.arange(3), "xq holds NaN or infinite values"),
        (np.ones((1, 4)), [[1, 1, 1, np.inf]], np.arange(1), "xb holds NaN or infinite values"),
        (np.zeros((1, 4)), [[1, 1, 1, np.inf]], np.arange(1), "xb holds NaN or infinite values"),
        (np.ones((2, 4)), [[1, np.nan, 1, 1]] * 3, np.arange(3), "xb holds NaN or infinite"),
        (np.ones((0, 4)), [[1, np.nan, 1, 1]], np.arange(1), "xb holds NaN or infinite values"),
        (np.ones((1, 4)), [[3e38] * 4], np.arange(1), "overflow float32"),
        (np.ones((1, 4)), np.ones((3, 4, 1)), np.arange(3), r"xb must have shape \(m, d\)"),
        (np.ones((1, 4)), "abc", np.arange(3), "xb must be a float matrix of shape"),
    ],
)
def test_bad_arrays_are_refused(xq, xb, ids, match):
    with pytest.raises(InvalidArgumentError, match=match):
        exact_search(xq, xb, ids, 2)
