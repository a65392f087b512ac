from __future__ import annotations

import faiss
import numpy as np
import pytest

from crossrank.indexes import selectors
from crossrank.indexes.factory import create_index
from crossrank.indexes.selectors import make_selector, search_params, selector_bytes


def members(sel, ntotal: int) -> np.ndarray:
    return np.array([i for i in range(ntotal) if sel.is_member(i)], dtype=np.int64)


def test_all_positions_need_no_selector():
    assert make_selector(faiss, np.arange(10), 10) is None


def test_contiguous_positions_become_a_range():
    sel = make_selector(faiss, np.arange(3, 8), 10)
    assert isinstance(sel, faiss.IDSelectorRange)
    np.testing.assert_array_equal(members(sel, 10), np.arange(3, 8))


@pytest.mark.parametrize(
    "positions", [[0], [1, 8], [0, 2, 4, 6, 8, 10, 12, 14, 16], [7, 9, 15, 16, 17, 99]]
)
def test_scattered_positions_become_a_bitmap_with_the_same_members(positions):
    positions = np.array(positions, dtype=np.int64)
    sel = make_selector(faiss, positions, 100)
    assert isinstance(sel, faiss.IDSelectorBitmap) or len(positions) == 1
    np.testing.assert_array_equal(members(sel, 100), positions)


def test_sparse_set_in_a_huge_index_becomes_a_batch(monkeypatch):
    monkeypatch.setattr(selectors, "BITMAP_MAX_BYTES", 8)  # pretend 100 bits is a huge bitmap
    positions = np.array([3, 50], dtype=np.int64)
    sel = make_selector(faiss, positions, 100_000)
    assert isinstance(sel, faiss.IDSelectorBatch)
    np.testing.assert_array_equal(members(sel, 100), positions)


def test_bitmap_outlives_the_caller_array():
    positions = np.array([2, 5, 11], dtype=np.int64)
    sel = make_selector(faiss, positions, 16)
    del positions
    import gc

    gc.collect()
    np.testing.assert_array_equal(members(sel, 16), [2, 5, 11])


def test_params_follow_the_index_structure():
    sel = faiss.IDSelectorRange(0, 5)
    ivf = create_index(faiss, 8, "IVF4_HNSW8,Flat")
    params = search_params(faiss, ivf, nprobe=99, ef_search=40, sel=sel)
    assert isinstance(params, faiss.SearchParametersIVF)
    assert params.nprobe == 4  # clamped to nlist
    assert params.sel is not None
    assert params.quantizer_params is not None  # an HNSW efSearch for the coarse quantizer

    hnsw = search_params(faiss, create_index(faiss, 8, "HNSW8"), nprobe=1, ef_search=77, sel=None)
    assert isinstance(hnsw, faiss.SearchParametersHNSW) and hnsw.efSearch == 77

    assert (
        search_params(faiss, create_index(faiss, 8, "Flat"), nprobe=1, ef_search=None, sel=None)
        is None
    )
    flat = search_params(faiss, create_index(faiss, 8, "Flat"), nprobe=1, ef_search=None, sel=sel)
    assert type(flat) is faiss.SearchParameters and flat.sel is not None


def test_selector_goes_to_the_innermost_index():
    # IndexPreTransform and IndexRefine ignore the sel of their own parameters in faiss 1.15;
    # test_first_stage checks that filtered searches of both return allowed ids only.
    sel = faiss.IDSelectorRange(0, 5)
    pre = search_params(
        faiss, create_index(faiss, 8, "PCA8,IVF4,Flat"), nprobe=2, ef_search=None, sel=sel
    )
    assert isinstance(pre, faiss.SearchParametersPreTransform)
    assert pre.sel is None and pre.index_params.sel is not None

    refine = search_params(
        faiss, create_index(faiss, 8, "IVF4,Flat,Refine(Flat)"), nprobe=3, ef_search=None, sel=sel
    )
    assert isinstance(refine, faiss.IndexRefineSearchParameters)
    assert refine.sel is None and refine.base_index_params.sel is not None


def test_gpu_params_carry_no_selector_and_no_hnsw():
    params = search_params(
        faiss, create_index(faiss, 8, "IVF4_HNSW8,Flat"), nprobe=2, ef_search=40, sel=None, gpu=True
    )
    assert isinstance(params, faiss.SearchParametersIVF) and params.nprobe == 2
    assert params.quantizer_params is None and params.sel is None
    assert (
        search_params(
            faiss, create_index(faiss, 8, "Flat"), nprobe=2, ef_search=None, sel=None, gpu=True
        )
        is None
    )


def test_selector_bytes_counts_what_each_selector_holds():
    ntotal = 80_000
    scattered = np.arange(0, ntotal, 3, dtype=np.int64)
    assert selector_bytes(make_selector(faiss, scattered, ntotal), len(scattered)) == ntotal // 8
    run = np.arange(10, 500, dtype=np.int64)
    assert selector_bytes(make_selector(faiss, run, ntotal), len(run)) == 0  # a range
    batch = faiss.IDSelectorBatch(scattered[:100])
    assert selector_bytes(batch, 100) >= 48 * 100
    assert selector_bytes(None, 0) == 0
