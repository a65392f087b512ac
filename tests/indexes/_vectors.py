"""Seeded vector sets, brute-force references and tie-aware checks for the first-stage tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Vectors:
    """A clustered, L2-normalised database with queries near it and shuffled, non-contiguous ids."""

    xb: np.ndarray  # (n, d) float32
    ids: np.ndarray  # (n,) int64, unique, not in row order
    xq: np.ndarray  # (m, d) float32


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_vectors(
    n: int = 2000, d: int = 32, m: int = 12, clusters: int = 20, seed: int = 0
) -> Vectors:
    """``n`` vectors around ``clusters`` centres (what IVF is for), ``m`` queries near the data."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    xb = normalise(centres[rng.integers(0, clusters, n)] + 0.3 * rng.standard_normal((n, d)))
    xq = normalise(xb[rng.integers(0, n, m)] + 0.2 * rng.standard_normal((m, d)))
    ids = (rng.permutation(n) * 3 + 5).astype(np.int64)
    return Vectors(xb=xb, ids=ids, xq=xq)


def brute_force(
    xq: np.ndarray, xb: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k by inner product in float64, -1 / -inf padded: the slow, obvious way."""
    S = xq.astype(np.float64) @ xb.astype(np.float64).T  # (m, n)
    D = np.full((len(xq), k), -np.inf)
    I = np.full((len(xq), k), -1, dtype=np.int64)
    for row in range(len(xq)):
        order = sorted(range(len(ids)), key=lambda j: (-S[row, j], ids[j]))[:k]
        D[row, : len(order)] = S[row, order]
        I[row, : len(order)] = ids[order]
    return D, I


def assert_same_knn(
    D: np.ndarray, I: np.ndarray, Dref: np.ndarray, Iref: np.ndarray, atol: float = 1e-5
) -> None:
    """Tie-aware comparison: equal score lists, and equal id sets above the last (tied) score.

    Two correct searches may order tied vectors differently, or pick different ones of a tie at the
    k-th place; they may not differ anywhere else.
    """
    assert D.shape == Dref.shape and I.shape == Iref.shape
    np.testing.assert_array_equal(np.isneginf(D), np.isneginf(Dref))
    np.testing.assert_array_equal(I < 0, Iref < 0)
    finite = ~np.isneginf(Dref)
    np.testing.assert_allclose(D[finite], Dref[finite], atol=atol)
    for row in range(len(D)):
        real = Iref[row] >= 0
        if not real.any():
            continue
        last = Dref[row, real][-1]
        above_ref = set(Iref[row, real & (Dref[row] > last + atol)].tolist())
        above = set(I[row, (I[row] >= 0) & (D[row] > last + atol)].tolist())
        assert above == above_ref, f"row {row}: ids above the last score differ"
