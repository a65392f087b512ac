"""The FAISS selector of a cached filter is made once per generation and filter.

- repeated searches under one filter build its positions and selector once, and get the same
  results as a selector made per call;
- another filter, or a new generation, gets its own; an id array that is not cached gets one per
  call;
- the selector lives and dies with its filter's cache entry, and counts in the cache's bytes;
- threads racing on a new filter all end up using the one kept;
- the live ids of a generation with removed images (no filter) get one selector too;
- a selector made by another first stage is refused.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

import crossrank.indexes.first_stage as first_stage_module
import crossrank.search.snapshot as snapshot_module
from crossrank.errors import InvalidArgumentError
from crossrank.indexes import FirstStage
from crossrank.search.pipeline import allowed_ids, first_stage
from crossrank.search.snapshot import Snapshot

from .test_filtered import clustered, write_index

N, M, K = 3000, 20, 10


@pytest.fixture(scope="module")
def ivf(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """3,000 clustered vectors in IVF32 (nprobe 2): a 20 % filter is searched by FAISS."""
    root = tmp_path_factory.mktemp("sel") / "idx"
    xb, xq = clustered(N, M, seed=3)
    write_index(
        root, xb, np.random.default_rng(2).permutation(N) % 10, factory="IVF32,Flat", nprobe=2
    )
    return root, xb, xq


@pytest.fixture()
def made(monkeypatch) -> list[int]:
    """The size of every FAISS selector made (``make_selector`` calls) by a first stage."""
    sizes: list[int] = []
    real = first_stage_module.make_selector

    def counted(faiss, positions, ntotal):
        sizes.append(len(positions))
        return real(faiss, positions, ntotal)

    monkeypatch.setattr(first_stage_module, "make_selector", counted)
    return sizes


def test_a_repeated_filter_makes_its_selector_once(ivf, made):
    root, _, xq = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    try:
        allowed = allowed_ids(snap, "bucket < 2", None, {})
        assert not snap.first_stage.prefers_exact(allowed.size, K)  # FAISS, with a selector
        results = [
            first_stage(snap, xq, K, allowed_ids(snap, "bucket < 2", None, {})) for _ in range(4)
        ]
        assert made == [allowed.size]  # one selector for four searches
        assert snap.selector(allowed) is snap.selector(allowed)
        # the same answers as a selector made for the call
        probe = snap.first_stage.filtered_nprobe(allowed.size)
        D, I = snap.first_stage.search(xq, K, allowed_ids=np.array(allowed), nprobe=probe)
        for Dc, Ic in results:
            np.testing.assert_array_equal(Ic, I)
            np.testing.assert_array_equal(Dc, D)
        assert len(made) == 2  # the plain array was looked up for its call
    finally:
        snap.close()


def test_each_filter_and_each_generation_gets_its_own_selector(tmp_path, made):
    root = tmp_path / "idx"
    xb, xq = clustered(N, M, seed=4)
    write_index(root, xb, np.arange(N) % 10, factory="IVF32,Flat", nprobe=2)
    old = Snapshot(root, device="cpu", nprobe=None)
    try:
        for where in ("bucket < 2", "bucket >= 8", "bucket < 2"):
            first_stage(old, xq, K, allowed_ids(old, where, None, {}))
        assert len(made) == 2
        write_index(root, xb, (np.arange(N) + 1) % 10, factory="IVF32,Flat", nprobe=2)
        new = Snapshot(root, device="cpu", nprobe=None, reuse=old)
    finally:
        old.close()
    try:
        allowed = allowed_ids(new, "bucket < 2", None, {})
        _, I = first_stage(new, xq, K, allowed)
        assert len(made) == 3  # the new generation's ids: a new selector
        assert np.isin(I[I >= 0], allowed).all()
        assert not old._by_array and old._live_selector is None  # closed: its cache went too
    finally:
        new.close()


def test_a_selector_is_dropped_with_its_filter_and_counted_in_the_bytes(ivf, made, monkeypatch):
    root, _, xq = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    try:
        allowed = allowed_ids(snap, "bucket < 2", None, {})
        before = snap._allowed_bytes
        first_stage(snap, xq, K, allowed)
        sel = snap.selector(allowed)
        assert snap._allowed_bytes == before + sel.nbytes > before + allowed.nbytes
        for t in range(snapshot_module.FILTER_CACHE_ENTRIES):  # push "bucket < 2" out
            allowed_ids(snap, f"bucket = {t}", None, {})
        assert id(allowed) not in snap._by_array
        assert snap._allowed_bytes == sum(e.nbytes for e in snap._allowed.values())
        assert snap.selector(allowed) is not sel and len(made) == 2  # made again, not kept
        assert snap.selector(allowed) is not sel and len(made) == 3
        # a bound that holds the ids but not the selector: made per call, the bound kept
        monkeypatch.setattr(snapshot_module, "FILTER_CACHE_BYTES", 900 * 8 + 8)  # 900 ids
        again = allowed_ids(snap, "bucket < 3", None, {})
        assert again.size == 900 and list(snap._allowed.values())[-1].ids is again
        snap.selector(again)
        snap.selector(again)
        assert len(made) == 5
        assert snap._allowed_bytes <= snapshot_module.FILTER_CACHE_BYTES
        assert snap._allowed_bytes == sum(e.nbytes for e in snap._allowed.values())
    finally:
        snap.close()


def test_threads_racing_on_a_new_filter_share_one_selector(ivf, made):
    root, _, xq = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    try:
        want = first_stage(snap, xq, K, snap.metadata.allowed_ids("bucket >= 5"))
        made.clear()
        barrier = threading.Barrier(8)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        used: list[object] = []

        def work() -> None:
            barrier.wait()
            for _ in range(10):
                allowed = allowed_ids(snap, "bucket >= 5", None, {})
                out.append(first_stage(snap, xq, K, allowed))
                used.append(snap.selector(allowed))

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(out) == 80 and 1 <= len(made) <= 8
        assert len({id(s) for s in used}) == 1
        for D, I in out:
            np.testing.assert_array_equal(I, want[1])
            np.testing.assert_array_equal(D, want[0])
    finally:
        snap.close()


def test_the_live_ids_of_a_generation_with_removals_get_one_selector(ivf, made):
    root, _, xq = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    try:
        snap.live_ids = np.asarray(snap.ids)[N // 2 :]  # as if the first half were removed
        snap.live_ids.flags.writeable = False
        for _ in range(3):
            _, I = first_stage(snap, xq, K, allowed_ids(snap, None, None, {}))
            assert np.isin(I[I >= 0], snap.live_ids).all() and (I >= 0).all()
        assert made == [N - N // 2]
    finally:
        snap.close()


def test_a_selector_of_another_first_stage_is_refused(ivf):
    root, xb, xq = ivf
    snap = Snapshot(root, device="cpu", nprobe=None)
    try:
        other = FirstStage.build(xb, np.arange(N, dtype=np.int64) + 10**6)
        sel = other.select(np.arange(10**6, 10**6 + 100))
        with pytest.raises(InvalidArgumentError, match="another first stage"):
            snap.first_stage.search(xq, K, allowed_ids=sel)
        assert len(sel) == 100 and "positions" in repr(sel)
    finally:
        snap.close()
