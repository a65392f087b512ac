"""Filtered first-stage search on synthetic generations written through the store API.

- the allowed-id set is cached per snapshot and filter: a repeated filter asks DuckDB once;
- different filters do not share an entry, and a new generation starts with an empty cache;
- under a ``where``, an IVF first stage keeps recall@10 >= 0.99 against exact search at every
  selectivity (more lists probed as fewer images are allowed, exact search where that is cheaper),
  also with a small per-call ``nprobe``, and without probing every list for a large one;
- a per-call ``nprobe`` reaches FAISS through :func:`search_snapshot`'s first stage.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from crossrank import FilterError
from crossrank.indexes import FirstStage, IndexConfig, exact_search
from crossrank.search.pipeline import allowed_ids, first_stage
from crossrank.search.snapshot import FILTER_CACHE_ENTRIES, Snapshot, filter_key
from crossrank.store import GenerationWriter, MetadataStore

D = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, m: int, seed: int, noise: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors around 200 centres and ``m`` queries near them (what IVF is for)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, D))
    xb = _unit(centres[rng.integers(0, 200, n)] + noise * rng.standard_normal((n, D)))
    xq = _unit(xb[rng.integers(0, n, m)] + 0.3 * rng.standard_normal((m, D)))
    return xb, xq


def write_index(
    root: Path, xb: np.ndarray, bucket: np.ndarray, *, factory: str, nprobe: int = 16
) -> np.ndarray:
    """Commit one generation of ``xb`` with a real FAISS first stage; returns its ids.

    The metadata has a ``bucket`` column (a ``where`` keeps ``bucket < t``) and a ``label``.
    """
    n = len(xb)
    with GenerationWriter(root) as w:
        ids = w.take_ids(n)
        w.patches.append(np.zeros((n, 1, 4), np.float32))
        w.write_vectors(xb)
        w.write_ids(ids)
        w.write_metadata(
            pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "path": [f"/data/{i}.png" for i in ids],
                    "bucket": pa.array(bucket, pa.int64()),
                    "label": ["cat" if b % 2 else "dog" for b in bucket],
                }
            )
        )
        w.write_skipped(
            pa.table({"path": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        )
        config = IndexConfig(factory=factory, nprobe=nprobe)
        FirstStage.build(xb, ids, config).save(w.first_stage_path)
        w.commit(
            encoder={"model_id": "synthetic", "dim": D},
            first_stage={"factory": factory, "nprobe": nprobe},
        )
    return ids


@pytest.fixture()
def count_duckdb(monkeypatch) -> list[tuple[object, object]]:
    """Every ``MetadataStore.allowed_ids`` call (the DuckDB query), as ``(where, filters)``."""
    calls: list[tuple[object, object]] = []
    real = MetadataStore.allowed_ids

    def counted(self, where=None, *, filters=None):
        calls.append((where, filters))
        return real(self, where, filters=filters)

    monkeypatch.setattr(MetadataStore, "allowed_ids", counted)
    return calls


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "idx"
    xb, _ = clustered(300, 1, seed=1)
    write_index(root, xb, np.arange(300) % 10, factory="Flat")
    return root


# -- 1. the allowed-id cache -------------------------------------------------------------------


def test_a_repeated_filter_asks_duckdb_once(small, count_duckdb):
    snap = Snapshot(small, device="cpu", nprobe=None)
    try:
        first = allowed_ids(snap, "bucket < 3", None, {})
        timings: dict[str, float] = {}
        again = allowed_ids(snap, "  bucket <   3 ", None, timings)  # the same, spaced out
        assert count_duckdb == [("bucket < 3", None)]
        assert again is first and not again.flags.writeable  # shared, so read-only
        np.testing.assert_array_equal(first, np.asarray(snap.ids)[np.arange(300) % 10 < 3])
        assert first.size == 90 and "filter" in timings

        f1 = allowed_ids(snap, None, {"bucket": {"lt": 3}, "label": "cat"}, {})
        f2 = allowed_ids(snap, None, {"label": "cat", "bucket": {"lt": 3}}, {})  # keys reordered
        assert f2 is f1 and len(count_duckdb) == 2
    finally:
        snap.close()


def test_different_filters_do_not_collide(small, count_duckdb):
    snap = Snapshot(small, device="cpu", nprobe=None)
    try:
        filters = [
            ("bucket < 3", None),
            ("bucket < 4", None),
            ("bucket < 3", {"label": "cat"}),
            (None, {"label": "cat"}),
            (None, {"label": "dog"}),
            (None, {"bucket": 1}),
            (None, {"bucket": True}),  # not the same value as 1: its own entry (and its own error)
            ("label = 'cat  dog'", None),  # spaces inside a string literal are kept
            ("label = 'cat dog'", None),
        ]
        got = {}
        for where, flt in filters:
            try:
                got[(where, str(flt))] = allowed_ids(snap, where, flt, {}).tolist()
            except FilterError:
                got[(where, str(flt))] = "error"
        assert len(count_duckdb) == len(filters)  # no filter was answered from another's entry
        with MetadataStore.open(snap.generation.path, sandbox=True) as fresh:
            for where, flt in filters:
                try:
                    want = fresh.allowed_ids(where, filters=flt).tolist()
                except FilterError:
                    want = "error"
                assert got[(where, str(flt))] == want, (where, flt)
        assert filter_key("a  'x  y'", None) == filter_key(" a 'x  y' ", None)
        assert filter_key("a -- c\n AND b", None) != filter_key("a -- c AND b", None)
    finally:
        snap.close()


def test_a_failed_filter_is_not_cached_and_the_cache_is_bounded(small, count_duckdb):
    snap = Snapshot(small, device="cpu", nprobe=None)
    try:
        for _ in range(2):
            with pytest.raises(FilterError, match="unknown column"):
                allowed_ids(snap, "nope > 1", None, {})
        assert len(count_duckdb) == 2
        for t in range(FILTER_CACHE_ENTRIES + 5):
            allowed_ids(snap, f"bucket < {t}", None, {})
        assert len(snap._allowed) == FILTER_CACHE_ENTRIES
        n = len(count_duckdb)
        allowed_ids(snap, f"bucket < {FILTER_CACHE_ENTRIES + 4}", None, {})  # recent: kept
        allowed_ids(snap, "bucket < 0", None, {})  # the oldest: dropped, asked again
        assert len(count_duckdb) == n + 1
    finally:
        snap.close()


def test_threads_share_one_cache(small):
    snap = Snapshot(small, device="cpu", nprobe=None)
    try:
        want = snap.metadata.allowed_ids("bucket >= 5")
        barrier = threading.Barrier(8)
        out: list[np.ndarray] = []

        def work() -> None:
            barrier.wait()
            for t in range(20):
                out.append(allowed_ids(snap, "bucket >= 5", None, {}))
                allowed_ids(snap, f"bucket = {t % 10}", None, {})

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(out) == 160 and all(np.array_equal(a, want) for a in out)
    finally:
        snap.close()


def test_a_new_generation_does_not_reuse_the_old_cache(tmp_path, count_duckdb):
    root = tmp_path / "idx"
    xb, _ = clustered(50, 1, seed=2)
    write_index(root, xb, np.arange(50) % 10, factory="Flat")
    old = Snapshot(root, device="cpu", nprobe=None)
    try:
        before = allowed_ids(old, "bucket < 5", None, {})
        write_index(root, xb, (np.arange(50) + 5) % 10, factory="Flat")  # other buckets
        new = Snapshot(root, device="cpu", nprobe=None, reuse=old)
    finally:
        old.close()
    try:
        assert new.number == old.number + 1
        after = allowed_ids(new, "bucket < 5", None, {})
        assert len(count_duckdb) == 2
        assert not np.array_equal(before, after)
        np.testing.assert_array_equal(after, new.metadata.allowed_ids("bucket < 5"))
        assert not old._allowed  # closed: its cache went with it
    finally:
        new.close()


# -- 2. recall under filters -------------------------------------------------------------------

N, M, K = 30_000, 200, 10
SELECTIVITY = {1.0: 1000, 0.5: 500, 0.1: 100, 0.03: 30, 0.01: 10, 0.001: 1}  # t / 1000 kept


@pytest.fixture(scope="module")
def ivf(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """30,000 clustered vectors in IVF512 with nprobe 32 (unfiltered recall@10 about 0.995)."""
    root = tmp_path_factory.mktemp("ivf") / "idx"
    xb, xq = clustered(N, M, seed=7)
    bucket = np.random.default_rng(1).permutation(N) % 1000  # independent of the vectors
    write_index(root, xb, bucket, factory="IVF512,Flat", nprobe=32)
    return root, xb, xq, bucket


def _recall(I: np.ndarray, Iref: np.ndarray) -> float:
    return float(
        np.mean(
            [
                len(set(a[a >= 0]) & set(b[b >= 0])) / (b >= 0).sum()
                for a, b in zip(I, Iref, strict=True)
            ]
        )
    )


@pytest.mark.parametrize("fraction", list(SELECTIVITY))
def test_ivf_recall_under_a_filter_is_at_least_099(ivf, fraction):
    root, xb, xq, bucket = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    try:
        where = f"bucket < {SELECTIVITY[fraction]}"
        allowed = allowed_ids(snap, where, None, {})
        assert allowed.size == round(N * fraction)
        keep = bucket < SELECTIVITY[fraction]
        _, Iref = exact_search(xq, xb[keep], np.asarray(snap.ids)[keep], K)
        D, I = first_stage(snap, xq, K, allowed)
        assert np.isin(I[I >= 0], allowed).all()
        assert _recall(I, Iref) >= 0.99
    finally:
        snap.close()


def test_ivf_probes_more_lists_as_fewer_images_are_allowed(ivf, monkeypatch):
    import crossrank.indexes.first_stage as first_stage_module

    root = ivf[0]
    snap = Snapshot(root, device="cpu", nprobe=None)
    try:
        stage = snap.first_stage
        assert stage.nlist == 512 and stage.nprobe == 32
        assert stage.filtered_nprobe(N) == 32
        assert stage.filtered_nprobe(N // 2, nprobe=8) == 40  # 2.5 * 8 / 50 %
        assert stage.filtered_nprobe(N // 10, nprobe=8) == 200  # 2.5 * 8 / 10 %
        assert stage.filtered_nprobe(N // 10) == 256  # 2.5 * 32 / 10 % = 800: half the lists
        assert stage.filtered_nprobe(N // 100) == 256
        assert stage.filtered_nprobe(N // 10, nprobe=400) == 400  # a larger nprobe is kept
        assert not stage.prefers_exact(N // 10, K)
        assert stage.prefers_exact(N // 100, K)  # 300 vectors, 15,000 list entries: exact
        # 256 lists of about 59 entries: 15,000 entries tested, 32 per allowed vector up to 468
        assert stage.prefers_exact(468, K) and not stage.prefers_exact(469, K)
        monkeypatch.setattr(first_stage_module, "EXACT_MAX_BYTES", 468 * D * 4 - 1)
        assert not stage.prefers_exact(468, K)  # too many vectors to gather: FAISS
    finally:
        snap.close()


def _record_nprobe(monkeypatch) -> list[object]:
    """The nprobe of every FAISS search the first stage runs from now on, in order."""
    seen: list[object] = []
    real = FirstStage.search

    def search(self, xq, k, **kwargs):
        seen.append(kwargs.get("nprobe"))
        return real(self, xq, k, **kwargs)

    monkeypatch.setattr(FirstStage, "search", search)
    return seen


@pytest.mark.parametrize(("nprobe", "lists"), [(2, 50), (100, 256)])
def test_ivf_recall_at_10_percent_kept_whatever_the_call_nprobe(ivf, monkeypatch, nprobe, lists):
    """A small nprobe is lifted to the depth recall needs (2 / 10 % = 20 lists gave 0.95 here);
    a large one is capped below every list (100 / 10 % would be all 512) and keeps 0.99."""
    root, xb, xq, bucket = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    seen = _record_nprobe(monkeypatch)
    try:
        keep = bucket < 100
        allowed = allowed_ids(snap, "bucket < 100", None, {})
        _, Iref = exact_search(xq, xb[keep], np.asarray(snap.ids)[keep], K)
        _, I = first_stage(snap, xq, K, allowed, nprobe=nprobe)
        assert _recall(I, Iref) >= 0.99
        assert seen == [lists]  # one FAISS search, no retry
    finally:
        snap.close()


def test_a_filtered_search_that_comes_back_short_is_redone_over_every_list(ivf, monkeypatch):
    root, xb, xq, bucket = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    try:
        # One list probed under a 10 % filter holds about 6 allowed vectors: most rows come back
        # short, as they would under a filter that follows the clusters away from the query.
        monkeypatch.setattr(FirstStage, "prefers_exact", lambda self, n, k, **kw: False)
        monkeypatch.setattr(FirstStage, "filtered_nprobe", lambda self, n, **kw: 1)
        keep = bucket < 100
        allowed = allowed_ids(snap, "bucket < 100", None, {})
        _, Ione = snap.first_stage.search(xq, K, allowed_ids=allowed, nprobe=1)
        short = (Ione < 0).any(axis=1)
        assert short.sum() > M // 2
        _, Iref = exact_search(xq, xb[keep], np.asarray(snap.ids)[keep], K)
        D, I = first_stage(snap, xq, K, allowed)
        assert (I >= 0).all()
        np.testing.assert_array_equal(I[~short], Ione[~short])  # full rows are kept as they are
        assert _recall(I[short], Iref[short]) == 1.0  # short rows: every list, so exact
    finally:
        snap.close()


def test_per_call_nprobe_reaches_faiss(ivf, monkeypatch):
    root, xb, xq, _ = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    seen = _record_nprobe(monkeypatch)
    try:
        _, I1 = first_stage(snap, xq, K, None, nprobe=1)
        _, I512 = first_stage(snap, xq, K, None, nprobe=512)
        assert seen == [1, 512]
        assert not np.array_equal(I1, I512)
        _, Ie = exact_search(xq, xb, np.asarray(snap.ids), K)
        assert _recall(I512, Ie) == 1.0
        first_stage(snap, xq, K, allowed_ids(snap, "bucket < 100", None, {}), nprobe=4)
        assert seen[-1] == 100  # the filter scales the call's nprobe (2.5 * 4 / 10 %), not 32
        # a filter that keeps every image is an unfiltered search: no selector
        everything = allowed_ids(snap, "bucket >= 0", None, {})
        _, Iall = first_stage(snap, xq, K, everything)
        _, Inone = first_stage(snap, xq, K, None)
        np.testing.assert_array_equal(Iall, Inone)
    finally:
        snap.close()


def test_index_search_vectors_takes_nprobe_per_query(ivf):
    from crossrank import Index
    from crossrank.errors import InvalidArgumentError

    root, xb, xq, _ = ivf
    index = Index.open(root, device="cpu")
    _, Ie = exact_search(xq, xb, np.asarray(index.stored.ids()), K)

    def ids(results) -> np.ndarray:  # (m, K), -1 where a query came back short
        out = np.full((len(results), K), -1, dtype=np.int64)
        for row, result in zip(out, results, strict=True):
            row[: len(result)] = [h.id for h in result]
        return out

    one = ids(index.search_vectors(xq, k=K, nprobe=1))
    every = ids(index.search_vectors(xq, k=K, nprobe=512))
    assert _recall(every, Ie) == 1.0 and _recall(one, Ie) < _recall(every, Ie)
    default = ids(index.search_vectors(xq, k=K))
    assert _recall(default, Ie) < 1.0  # the index's own nprobe (32) stays the default
    for bad in (0, True, 2.5):
        with pytest.raises(InvalidArgumentError, match="nprobe must be an int >= 1"):
            index.search_vectors(xq, k=K, nprobe=bad)
        with pytest.raises(InvalidArgumentError, match="nprobe must be an int >= 1"):
            index.search("a query", nprobe=bad)  # refused before any model loads
