from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from crossrank.errors import (
    DependencyError,
    IndexCorruptError,
    IndexNotFoundError,
    InvalidArgumentError,
)
from crossrank.indexes import FirstStage, IndexConfig, exact_search

from ._vectors import assert_same_knn, brute_force

IVF = IndexConfig(factory="IVF16,Flat")


@pytest.fixture(scope="module")
def flat(vectors):
    return FirstStage.build(vectors.xb, vectors.ids, IndexConfig())


@pytest.fixture(scope="module")
def ivf(vectors):
    return FirstStage.build(vectors.xb, vectors.ids, IVF)


def allowed_sets(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Allowed-id sets for every selector: one id, a few, a run of positions, half, all."""
    rng = np.random.default_rng(1)
    return {
        "one": np.sort(ids[[7]]),
        "five": np.sort(rng.choice(ids, 5, replace=False)),
        "contiguous_rows": np.sort(ids[100:160]),  # contiguous positions: an IDSelectorRange
        "half": np.sort(rng.choice(ids, len(ids) // 2, replace=False)),
        "all": np.sort(ids),
    }


def test_auto_config_builds_flat_for_a_small_corpus(flat, vectors):
    assert flat.factory == "Flat" and flat.nlist is None
    assert flat.ntotal == len(flat) == len(vectors.ids) and flat.d == 32
    assert not flat.on_gpu
    assert flat.info["factory"] == "Flat" and flat.info["metric"] == "inner_product"


def test_flat_equals_brute_force(flat, vectors):
    D, I = flat.search(vectors.xq, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (len(vectors.xq), 10)
    assert_same_knn(D, I, *brute_force(vectors.xq, vectors.xb, vectors.ids, 10))


def test_ivf_with_every_list_probed_equals_exact(ivf, vectors):
    assert ivf.factory == "IVF16,Flat" and ivf.nlist == 16
    D, I = ivf.search(vectors.xq, 10, nprobe=16)
    assert_same_knn(D, I, *brute_force(vectors.xq, vectors.xb, vectors.ids, 10))


def test_ivf_with_few_lists_probed_finds_most_neighbours_on_clustered_data(ivf, vectors):
    _, Iref = brute_force(vectors.xq, vectors.xb, vectors.ids, 10)
    _, I = ivf.search(vectors.xq, 10, nprobe=4)
    recall = np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(I.tolist(), Iref.tolist(), strict=True)]
    )
    assert recall >= 0.9


def test_auto_ivf_tier_above_the_threshold(vectors):
    stage = FirstStage.build(vectors.xb, vectors.ids, IndexConfig(flat_threshold=1000, nprobe=51))
    assert stage.factory == "IVF51,Flat"  # 4 sqrt(2000) = 179 lists, capped to 2000 // 39 = 51
    assert_same_knn(
        *stage.search(vectors.xq, 5), *brute_force(vectors.xq, vectors.xb, vectors.ids, 5)
    )


def test_training_sample_is_seeded(vectors):
    config = IndexConfig(factory="IVF16,Flat", train_size=800, seed=3)
    a = FirstStage.build(vectors.xb, vectors.ids, config)
    b = FirstStage.build(vectors.xb, vectors.ids, config)
    centroids = [faiss.extract_index_ivf(s._base).quantizer.reconstruct_n(0, 16) for s in (a, b)]
    np.testing.assert_array_equal(*centroids)
    for nprobe in (1, 3):
        np.testing.assert_array_equal(
            a.search(vectors.xq, 5, nprobe=nprobe)[1], b.search(vectors.xq, 5, nprobe=nprobe)[1]
        )


@pytest.mark.parametrize("index_name", ["flat", "ivf", "hnsw", "pretransform", "refine"])
def test_filtered_search_equals_brute_force_over_the_allowed_ids(request, vectors, index_name):
    if index_name in ("flat", "ivf"):
        stage = request.getfixturevalue(index_name)
    else:
        # A random rotation (RR) keeps inner products, so the pre-transformed index is exact too.
        factory = {
            "hnsw": "HNSW32",
            "pretransform": "RR32,IVF16,Flat",
            "refine": "IVF16,Flat,Refine(Flat)",
        }
        stage = FirstStage.build(
            vectors.xb, vectors.ids, IndexConfig(factory=factory[index_name], ef_search=256)
        )
    for name, allowed in allowed_sets(vectors.ids).items():
        keep = np.isin(vectors.ids, allowed)
        for k in (1, 10):
            D, I = stage.search(vectors.xq, k, allowed_ids=allowed, nprobe=16)
            assert np.isin(I[I >= 0], allowed).all(), name
            if index_name == "hnsw" and keep.sum() < 100:
                # A filtered HNSW walk cannot reach a handful of scattered nodes through the graph:
                # it may come back short (never wrong); exact_search is the tool for such sets.
                continue
            Dref, Iref = brute_force(vectors.xq, vectors.xb[keep], vectors.ids[keep], k)
            assert_same_knn(D, I, Dref, Iref, atol=1e-4)


def test_a_selection_made_once_searches_like_the_ids_it_was_made_from(flat, ivf, vectors):
    for stage in (flat, ivf):
        for name, allowed in allowed_sets(vectors.ids).items():
            selection = stage.select(allowed[::-1])  # any order
            assert len(selection) == len(allowed) and not selection.positions.flags.writeable
            assert (selection.selector is None) == (name == "all")
            assert selection.nbytes >= selection.positions.nbytes
            for _ in range(2):  # reusable
                D, I = stage.search(vectors.xq, 10, allowed_ids=selection, nprobe=4)
                Dw, Iw = stage.search(vectors.xq, 10, allowed_ids=allowed, nprobe=4)
                np.testing.assert_array_equal(I, Iw)
                np.testing.assert_array_equal(D, Dw)
    with pytest.raises(InvalidArgumentError, match="another first stage"):
        flat.search(vectors.xq, 10, allowed_ids=ivf.select(vectors.ids[:5]))
    empty = ivf.select(np.array([-7], dtype=np.int64) + 10**9)  # no id of the index
    assert ivf.search(vectors.xq, 3, allowed_ids=empty)[1].tolist() == [[-1] * 3] * 12


def test_fewer_allowed_ids_than_k_pad_with_minus_one_and_minus_inf(flat, ivf, vectors):
    allowed = np.sort(vectors.ids[[3, 500, 1999]])
    for stage in (flat, ivf):
        D, I = stage.search(vectors.xq, 5, allowed_ids=allowed, nprobe=16)
        assert (np.sort(I[:, :3], axis=1) == allowed).all()
        assert (I[:, 3:] == -1).all() and np.isneginf(D[:, 3:]).all()
        assert np.isfinite(D[:, :3]).all()


def test_selective_filter_on_few_probed_lists_is_short_not_wrong(ivf, vectors):
    # IVF scans only the probed lists: with nprobe=1 most of a tiny allowed set is never seen. The
    # rows come back padded; prefers_exact foresees it, and exact_search over the set is complete.
    allowed = np.sort(vectors.ids[:20])
    D, I = ivf.search(vectors.xq, 10, allowed_ids=allowed, nprobe=1)
    assert np.isin(I[I >= 0], allowed).all()
    assert (I == -1).any()
    assert ivf.prefers_exact(len(allowed), 10, nprobe=1)
    _, Ix = exact_search(vectors.xq, vectors.xb[:20], vectors.ids[:20], 10)
    assert (Ix >= 0).all()


def test_allowed_ids_unsorted_duplicated_or_unknown_are_accepted(flat, vectors):
    allowed = np.sort(vectors.ids[[10, 20, 30]])
    expected = flat.search(vectors.xq, 3, allowed_ids=allowed)
    messy = np.array(
        [allowed[2], allowed[0], allowed[2], 10**12, allowed[1], 4]
    )  # 4 and 10**12 are no ids
    for got, want in zip(flat.search(vectors.xq, 3, allowed_ids=messy), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_no_allowed_id_in_the_index_gives_only_padding(flat, vectors):
    D, I = flat.search(vectors.xq, 4, allowed_ids=np.array([0, 1, 2], np.int64))  # ids start at 5
    assert (I == -1).all() and np.isneginf(D).all()
    D, I = flat.search(vectors.xq, 4, allowed_ids=np.array([], np.int64))
    assert (I == -1).all()


def test_ids_in_row_order_and_shuffled_give_the_same_results(vectors):
    order = np.argsort(vectors.ids)
    sorted_stage = FirstStage.build(vectors.xb[order], vectors.ids[order], IVF)
    shuffled_stage = FirstStage.build(vectors.xb, vectors.ids, IVF)
    allowed = np.sort(vectors.ids[::7])
    for kwargs in ({}, {"allowed_ids": allowed}):
        a = sorted_stage.search(vectors.xq, 8, nprobe=16, **kwargs)
        b = shuffled_stage.search(vectors.xq, 8, nprobe=16, **kwargs)
        assert_same_knn(*a, *b)


def test_k_larger_than_the_index_pads(vectors):
    stage = FirstStage.build(vectors.xb[:5], vectors.ids[:5])
    D, I = stage.search(vectors.xq[:2], 8)
    assert sorted(I[0, :5].tolist()) == sorted(vectors.ids[:5].tolist())
    assert (I[:, 5:] == -1).all() and np.isneginf(D[:, 5:]).all()


def test_empty_index_and_no_queries(vectors):
    stage = FirstStage.build(np.zeros((0, 32), np.float32), np.zeros(0, np.int64))
    assert stage.factory == "Flat" and stage.ntotal == 0
    D, I = stage.search(vectors.xq, 3)
    assert (I == -1).all() and np.isneginf(D).all()
    D, I = stage.search(np.zeros((0, 32), np.float32), 3)
    assert D.shape == I.shape == (0, 3)


def test_ties_come_back_ordered_by_id():
    xb = np.tile(np.array([[0.6, 0.8]], np.float32), (5, 1))
    stage = FirstStage.build(xb, np.array([9, 4, 7, 1, 3]))
    assert stage.search(np.array([[0.6, 0.8]], np.float32), 5)[1].tolist() == [[1, 3, 4, 7, 9]]


def test_queries_are_coerced_to_contiguous_float32(flat, vectors):
    expected = flat.search(vectors.xq, 5)
    got = flat.search(np.asfortranarray(vectors.xq.astype(np.float64)), np.int64(5))
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("mmap", [None, True], ids=["default", "mapped"])
@pytest.mark.parametrize("stage_name", ["flat", "ivf"])
def test_save_load_round_trip_gives_identical_results(request, tmp_path, vectors, stage_name, mmap):
    stage = request.getfixturevalue(stage_name)
    path = tmp_path / "first_stage.faiss"
    stage.save(path)
    loaded = FirstStage.load(path, IndexConfig(nprobe=stage.nprobe), mmap=mmap)
    assert (loaded.factory, loaded.ntotal, loaded.d, loaded.nlist) == (
        stage.factory,
        stage.ntotal,
        stage.d,
        stage.nlist,
    )
    if (
        stage_name == "ivf"
    ):  # mapped: the inverted lists stay on disk; default: a small file is read
        invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(loaded._base).invlists)
        assert isinstance(invlists, faiss.OnDiskInvertedLists) == bool(mmap)
        assert loaded.mapped == bool(mmap)
    allowed = np.sort(vectors.ids[::3])
    for kwargs in ({}, {"allowed_ids": allowed}, {"nprobe": 3}):
        for got, want in zip(
            loaded.search(vectors.xq, 10, **kwargs),
            stage.search(vectors.xq, 10, **kwargs),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)


def test_load_reads_a_small_index_into_memory_and_maps_a_large_one(
    tmp_path, ivf, vectors, monkeypatch
):
    import crossrank.indexes.first_stage as first_stage_module

    path = tmp_path / "ivf.faiss"
    ivf.save(path)
    flags: list[int] = []
    real_read = faiss.read_index

    def read_index(name, io_flags=0):
        flags.append(io_flags)
        return real_read(name, io_flags)

    monkeypatch.setattr(faiss, "read_index", read_index)
    assert path.stat().st_size <= first_stage_module.in_memory_limit() <= 2 << 30
    small = FirstStage.load(path)
    assert flags == [0] and not small.mapped
    small.add(vectors.xb[:1], np.array([10**9]))  # read into memory: writable, unlike a map

    monkeypatch.setattr(first_stage_module, "in_memory_limit", lambda: path.stat().st_size - 1)
    large = FirstStage.load(path)
    assert flags == [0, faiss.IO_FLAG_MMAP] and large.mapped
    for a, b in zip(large.search(vectors.xq, 10), ivf.search(vectors.xq, 10), strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_takes_the_factory_name_from_the_config(tmp_path, flat):
    flat.save(tmp_path / "x.faiss")
    assert (
        FirstStage.load(tmp_path / "x.faiss", IndexConfig(factory="IDMap,Flat")).factory
        == "IDMap,Flat"
    )


def test_load_missing_file(tmp_path):
    with pytest.raises(
        IndexNotFoundError, match=r"no first-stage index at .*nothing.faiss; build one"
    ):
        FirstStage.load(tmp_path / "nothing.faiss")


def test_load_garbage_file(tmp_path):
    path = tmp_path / "garbage.faiss"
    path.write_bytes(b"this is no faiss index at all")
    with pytest.raises(IndexCorruptError, match=r"cannot read the first stage .*garbage.faiss: "):
        FirstStage.load(path)


def test_load_index_without_ids(tmp_path):
    path = tmp_path / "plain.faiss"
    faiss.write_index(faiss.IndexFlatIP(4), str(path))
    with pytest.raises(
        IndexCorruptError, match=r"holds a FAISS IndexFlat.* without ids \(expected an IndexIDMap\)"
    ):
        FirstStage.load(path)


def test_load_index_with_l2_metric(tmp_path):
    path = tmp_path / "l2.faiss"
    faiss.write_index(faiss.IndexIDMap(faiss.IndexFlatL2(4)), str(path))
    with pytest.raises(IndexCorruptError, match="not inner product; rebuild the index"):
        FirstStage.load(path)


def test_save_to_a_missing_folder(tmp_path, flat):
    with pytest.raises(InvalidArgumentError, match=r"cannot write the first stage to .*nowhere"):
        flat.save(tmp_path / "nowhere" / "x.faiss")


def test_bad_factory_string(vectors):
    with pytest.raises(
        InvalidArgumentError,
        match=r"bad FAISS factory string 'IVFx,Flat': could not parse .*'IVF256,Flat'",
    ):
        FirstStage.build(vectors.xb, vectors.ids, IndexConfig(factory="IVFx,Flat"))


def test_factory_that_cannot_be_trained_on_so_few_vectors(vectors):
    with pytest.raises(
        InvalidArgumentError,
        match=r"FAISS could not train a 'IVF4096,Flat' index on 2000 vectors: .*fewer IVF lists",
    ):
        FirstStage.build(vectors.xb, vectors.ids, IndexConfig(factory="IVF4096,Flat"))


def test_index_type_without_filter_support_says_so(vectors):
    stage = FirstStage.build(vectors.xb[:300], vectors.ids[:300], IndexConfig(factory="PQ4x4"))
    assert stage.search(vectors.xq, 3)[1].shape == (len(vectors.xq), 3)
    with pytest.raises(
        InvalidArgumentError,
        match=r"the 'PQ4x4' index cannot run a filtered search: .*use exact_search",
    ):
        stage.search(vectors.xq, 3, allowed_ids=vectors.ids[:10])


def test_hits_outside_the_selector_are_dropped(monkeypatch, flat, vectors, caplog):
    # Simulates an index type that ignores the selector: the guard must still return only allowed
    # ids.
    from crossrank.indexes import first_stage

    monkeypatch.setattr(first_stage, "search_params", lambda *args, **kwargs: None)
    allowed = np.sort(vectors.ids[:50])
    D, I = flat.search(vectors.xq, 5, allowed_ids=allowed)
    assert np.isin(I[I >= 0], allowed).all() and (I == -1).any()
    assert "ignored the id selector" in caplog.text


def test_dim_mismatch(flat, vectors):
    with pytest.raises(
        InvalidArgumentError, match=r"query has dim 16, but the index was built with dim 32"
    ):
        flat.search(vectors.xq[:, :16], 3)


@pytest.mark.parametrize("k", [0, -1, 1.5, None])
def test_bad_k(flat, vectors, k):
    with pytest.raises(InvalidArgumentError, match=r"k must be an int >= 1"):
        flat.search(vectors.xq, k)


def test_bad_nprobe(ivf, vectors):
    with pytest.raises(
        InvalidArgumentError,
        match=r"nprobe must be an int >= 1 \(IVF lists scanned per query\), got 0",
    ):
        ivf.search(vectors.xq, 3, nprobe=0)
    with pytest.raises(InvalidArgumentError, match="nprobe must be an int >= 1"):
        ivf.nprobe = -2


def test_nprobe_setter_changes_the_default(vectors):
    stage = FirstStage.build(vectors.xb, vectors.ids, IVF)
    assert stage.nprobe == 16
    wide = stage.search(vectors.xq, 10)
    stage.nprobe = 1
    assert stage.nprobe == 1
    for got, want in zip(
        stage.search(vectors.xq, 10), stage.search(vectors.xq, 10, nprobe=1), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(stage.search(vectors.xq, 10)[1], wide[1])


@pytest.mark.parametrize(
    ("xb", "ids", "match"),
    [
        (
            np.ones((3, 4), np.float32),
            np.array([1, 2, 1]),
            "ids must be unique, but some id appears twice",
        ),
        (np.ones((3, 4), np.float32), np.array([1, 2]), "ids has 2 ids, but there are 3 vectors"),
        (np.ones((3, 4), np.float32), np.array([1, -2, 3]), r"ids must be >= 0"),
        (np.full((3, 4), np.inf, np.float32), np.arange(3), "xb holds NaN or infinite values"),
        (
            np.ones(4, np.float32),
            np.arange(1),
            r"xb must have shape \(n, d\) with d >= 1, got shape \(4,\)",
        ),
        (np.array([["a", "b"]]), np.arange(1), "xb must hold floats, got <U1"),
    ],
)
def test_bad_build_inputs(xb, ids, match):
    with pytest.raises(InvalidArgumentError, match=match):
        FirstStage.build(xb, ids)


def test_unnormalised_vectors_log_a_warning(caplog):
    FirstStage.build(np.full((3, 4), 2.0, np.float32), np.arange(3))
    assert "xb is not L2-normalised" in caplog.text


def test_memory_mapped_float64_database_is_added_in_blocks(tmp_path, monkeypatch, vectors):
    from crossrank.indexes import first_stage

    monkeypatch.setattr(first_stage, "_ADD_BLOCK", 300)
    np.save(tmp_path / "xb.npy", vectors.xb.astype(np.float64))
    xb = np.load(tmp_path / "xb.npy", mmap_mode="r")
    stage = FirstStage.build(xb, vectors.ids, IVF)
    assert stage.ntotal == len(vectors.ids)
    assert_same_knn(
        *stage.search(vectors.xq, 5, nprobe=16),
        *brute_force(vectors.xq, vectors.xb, vectors.ids, 5),
    )


def test_missing_faiss_raises_dependency_error_with_the_install_hint(monkeypatch, vectors):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    hint = r"pip install 'crossrank\[cpu\]' \(or \[gpu\] on CUDA machines\)"
    with pytest.raises(DependencyError, match=hint):
        FirstStage.build(vectors.xb, vectors.ids)
    with pytest.raises(DependencyError, match=hint):
        FirstStage.load("anything.faiss")
    # exact search needs no faiss
    assert exact_search(vectors.xq, vectors.xb, vectors.ids, 2)[1].shape == (len(vectors.xq), 2)


def test_eight_threads_with_different_nprobe_match_sequential_results(tmp_path, vectors):
    ivf = FirstStage.build(vectors.xb, vectors.ids, IVF)
    ivf.save(tmp_path / "ivf.faiss")
    stages = [ivf, FirstStage.load(tmp_path / "ivf.faiss")]  # built, and loaded with mmapped lists
    allowed = np.sort(vectors.ids[::5])
    jobs = [(s, nprobe, allowed if nprobe % 2 else None) for s in stages for nprobe in range(1, 9)]

    def run(job):
        stage, nprobe, allowed_ids = job
        return stage.search(vectors.xq, 10, nprobe=nprobe, allowed_ids=allowed_ids)

    sequential = [run(job) for job in jobs]
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        return [run(jobs[j]) for _ in range(5) for j in range(i, len(jobs), 8)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(worker, range(8)))
    for i, got in enumerate(results):
        want = [sequential[j] for _ in range(5) for j in range(i, len(jobs), 8)]
        for (D, I), (Dw, Iw) in zip(got, want, strict=True):
            np.testing.assert_array_equal(I, Iw)
            np.testing.assert_array_equal(D, Dw)
    # different nprobe must give different answers somewhere, or this test shows nothing
    assert not np.array_equal(sequential[0][1], sequential[7][1])


def test_prefers_exact_follows_the_index_type(flat, ivf, vectors):
    assert not flat.prefers_exact(1, 10)  # a filtered Flat search is exact already
    # IVF16 with nprobe 4: a filter keeping 5 % probes 2.5 * 4 / 5 % = 200 lists, at most half
    # of the 16; nprobe itself is never cut, and a filter that keeps everything changes nothing
    assert ivf.filtered_nprobe(100, nprobe=4) == 8 and ivf.filtered_nprobe(1000, nprobe=4) == 8
    assert ivf.filtered_nprobe(1900, nprobe=1) == 3  # ceil(2.5 * 2000 / 1900)
    assert ivf.filtered_nprobe(100, nprobe=12) == 12
    assert ivf.filtered_nprobe(2000, nprobe=4) == 4 and ivf.filtered_nprobe(2000) == ivf.nprobe
    # 8 lists hold about 1000 entries: exact scoring below 80 allowed vectors, where the 8 lists
    # would hold fewer than 4 * k = 40 of them (likely short)
    assert ivf.prefers_exact(79, 10, nprobe=4) and not ivf.prefers_exact(80, 10, nprobe=4)
    assert not ivf.prefers_exact(1000, 10, nprobe=4)
    # every list: 2000 entries tested, exact up to 2000 / 32 = 62 allowed vectors
    assert ivf.prefers_exact(62, 10, nprobe=16) and not ivf.prefers_exact(63, 10, nprobe=16)
    hnsw = FirstStage.build(vectors.xb[:500], vectors.ids[:500], IndexConfig(factory="HNSW8"))
    assert hnsw.prefers_exact(49, 10) and not hnsw.prefers_exact(50, 10)
    pq = FirstStage.build(vectors.xb[:300], vectors.ids[:300], IndexConfig(factory="PQ4x4"))
    assert pq.prefers_exact(300, 10)
