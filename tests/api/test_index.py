"""Index: open, search (filters, rerankers, fusion, images, batches, threads), verify, errors.

Expected rankings are computed here from the stored files (``vectors.npy``, ``ids.npy``, the patch
shards) and an independently loaded encoder, never from the code under test.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossrank import (
    FilterError,
    Index,
    IndexNotFoundError,
    InvalidArgumentError,
    ModelMismatchError,
)
from crossrank.indexes import FirstStage
from crossrank.rerank import MaxSimReranker

from ..conftest import committed_state

QUERY = "a red circle left of a blue square"
ATOL = 1e-5


# -- reference computations ---------------------------------------------------------------------


def _generation(index_dir: Path) -> Path:
    return index_dir / json.loads((index_dir / "manifest.json").read_text())["generation_dir"]


def _stored(index_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """ids (n,), pooled vectors (n, D), patches (n, P, d) and paths, straight from the files."""
    import pyarrow.parquet as pq

    gen = _generation(index_dir)
    ids = np.load(gen / "ids.npy")
    vectors = np.load(gen / "vectors.npy")
    patches = np.concatenate([np.load(p) for p in sorted(gen.glob("patches-*.npy"))])
    meta = pq.read_table(sorted(gen.glob("metadata-*.parquet"))).to_pydict()
    assert meta["id"] == ids.tolist()
    return ids, vectors, patches, meta["path"]


def _brute_force(
    xq: np.ndarray, vectors: np.ndarray, ids: np.ndarray, keep: np.ndarray
) -> dict[int, float]:
    """id -> inner product with ``xq``, over the rows ``keep`` allows."""
    scores = vectors[keep] @ xq
    return {int(i): float(s) for i, s in zip(ids[keep], scores, strict=True)}


def _assert_top_k(
    got_ids: list[int], got_scores: list[float], truth: dict[int, float], k: int
) -> None:
    """``got`` is a correct top-k of ``truth`` (id -> score), tolerating ties at any rank."""
    best = sorted(truth.values(), reverse=True)[:k]
    assert len(got_ids) == len(best) == min(k, len(truth))
    assert len(set(got_ids)) == len(got_ids)
    np.testing.assert_allclose(got_scores, best, atol=ATOL)  # the right scores, best first
    np.testing.assert_allclose(
        [truth[i] for i in got_ids], got_scores, atol=ATOL
    )  # each id truly has its score


@pytest.fixture(scope="module")
def index(built_index: Path) -> Index:
    return Index.open(built_index, device="cpu")


@pytest.fixture(scope="module")
def stored(built_index: Path):
    return _stored(built_index)


@pytest.fixture(scope="module")
def text_features(tiny_encoder):
    feats = tiny_encoder.encode_text([QUERY])
    return feats.pooled[0], feats.tokens[0], feats.mask[0]


# -- facts --------------------------------------------------------------------------------------


def test_open_reports_the_build(index, built_index, image_folder, tiny_clip):
    assert len(index) == 24
    facts = index.info()
    assert facts["path"] == str(built_index.resolve())
    assert facts["counts"] == {"images": 24, "skipped": 1}
    assert facts["encoder"]["model_id"] == str(tiny_clip) == index.model_id
    assert facts["first_stage"]["ntotal"] == 24 and facts["first_stage"]["factory"] == "Flat"
    assert facts["patches"] == {"n_patches": 16, "dim": 32, "dtype": "float16"}
    json.dumps(facts)  # the --json of `crossrank info`
    paths = index.metadata(columns=["path"])["path"].to_pylist()
    assert sorted(paths) == sorted(str(p) for p in image_folder.rglob("img_*.png"))
    assert index.skipped().to_pylist() == [
        {"path": str(image_folder / "broken.png"), "reason": index.skipped()["reason"][0].as_py()}
    ]
    assert index.skipped()["reason"][0].as_py().strip()


def test_metadata_columns_and_where(index):
    table = index.metadata(columns=["id", "width"], where="id < 3")
    assert table.column_names == ["id", "width"]
    assert table["id"].to_pylist() == [0, 1, 2] and set(table["width"].to_pylist()) == {40}


# -- the first stage, with and without filters --------------------------------------------------


def test_unfiltered_search_without_reranker_is_brute_force(index, stored, text_features):
    ids, vectors, _, paths = stored
    truth = _brute_force(text_features[0], vectors, ids, np.ones(len(ids), bool))
    result = index.search(QUERY, k=5, reranker=None)
    _assert_top_k([h.id for h in result], [h.score for h in result], truth, 5)
    for hit in result:
        assert hit.rerank_score is None and hit.score == hit.first_stage_score
        assert hit.path == paths[hit.id] and Path(hit.path).is_absolute()
        assert set(hit.metadata) == {"sha256", "width", "height", "bytes", "mtime"}
    assert result.counts.to_dict() == {
        "requested": 5,
        "returned": 5,
        "filtered_out": 0,
        "candidates": 5,
    }
    assert set(result.timings_ms) >= {"encode", "first_stage", "metadata", "total"}
    assert "rerank" not in result.timings_ms


FILTERS = [  # (where, the same filter in Python over (id, path))
    ("id % 3 = 0", lambda i, p: i % 3 == 0),
    ("path LIKE '%nested%'", lambda i, p: "nested" in p),
    ("id < 20", lambda i, p: i < 20),
    ("id = 5", lambda i, p: i == 5),
]


@pytest.fixture()
def first_stage_calls(monkeypatch) -> list[str]:
    """Records which first-stage path each search took: ``exact``, ``selector`` or ``all``."""
    import crossrank.indexes as indexes

    calls: list[str] = []
    real_exact, real_search = indexes.exact_search, FirstStage.search

    def exact_search(*args, **kwargs):
        calls.append("exact")
        return real_exact(*args, **kwargs)

    def search(self, xq, k, **kwargs):
        calls.append("all" if kwargs.get("allowed_ids") is None else "selector")
        return real_search(self, xq, k, **kwargs)

    monkeypatch.setattr(indexes, "exact_search", exact_search)
    monkeypatch.setattr(FirstStage, "search", search)
    return calls


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "faiss-selector"])
@pytest.mark.parametrize(("where", "allow"), FILTERS, ids=[w for w, _ in FILTERS])
def test_filtered_ranking_equals_brute_force_over_allowed_ids(
    index, stored, text_features, monkeypatch, first_stage_calls, where, allow, exact
):
    ids, vectors, _, paths = stored
    keep = np.array([allow(int(i), p) for i, p in zip(ids, paths, strict=True)])
    truth = _brute_force(text_features[0], vectors, ids, keep)
    monkeypatch.setattr(FirstStage, "prefers_exact", lambda self, n, k, **kw: exact)

    result = index.search(QUERY, k=6, where=where, reranker=None)
    assert first_stage_calls == ["exact" if exact else "selector"]
    _assert_top_k([h.id for h in result], [h.score for h in result], truth, 6)
    assert result.counts.filtered_out == len(ids) - int(keep.sum())
    assert result.counts.returned == min(6, int(keep.sum())) == len(result)
    assert "filter" in result.timings_ms


@pytest.fixture(scope="module")
def ivf_index(tmp_path_factory, image_folder, tiny_clip) -> Path:
    path = tmp_path_factory.mktemp("ivf") / "ivf.idx"
    Index.build(
        image_folder,
        path,
        model=tiny_clip,
        device="cpu",
        factory="IVF4,Flat",
        batch_size=12,
        workers=1,
    )
    return path


@pytest.mark.parametrize(
    ("where", "allow", "path_taken"),
    [
        (
            "id < 20",
            lambda i: i < 20,
            "selector",
        ),  # 20 of 24 allowed: FAISS searches with an IDSelector
        ("id IN (3, 7, 11)", lambda i: i in (3, 7, 11), "exact"),  # few allowed: scored exactly
    ],
)
def test_ivf_filtered_search_takes_the_chosen_path_and_is_exact(
    ivf_index, text_features, first_stage_calls, where, allow, path_taken
):
    ids, vectors, _, _ = _stored(ivf_index)
    index = Index.open(ivf_index, device="cpu")
    assert index.info()["first_stage"]["factory"] == "IVF4,Flat"
    keep = np.array([allow(int(i)) for i in ids])
    # nprobe (16) >= nlist (4): every list is probed, so the IVF answer must be the exact one.
    result = index.search(QUERY, k=2, where=where, reranker=None)
    assert first_stage_calls == [path_taken]
    _assert_top_k(
        [h.id for h in result],
        [h.score for h in result],
        _brute_force(text_features[0], vectors, ids, keep),
        2,
    )
    assert result.counts.filtered_out == 24 - int(keep.sum())


@pytest.mark.parametrize("reranker", [None, "maxsim"])
def test_a_filter_that_allows_nothing_returns_no_hits_and_says_so(index, reranker):
    result = index.search(QUERY, k=5, where="id < 0", reranker=reranker)
    assert list(result) == []
    assert result.counts.to_dict() == {
        "requested": 5,
        "returned": 0,
        "filtered_out": 24,
        "candidates": 0,
    }


def test_filter_shorter_than_k_is_reported_not_silent(index):
    result = index.search(QUERY, k=10, where="id IN (1, 2, 3)")
    assert sorted(h.id for h in result) == [1, 2, 3]
    assert (result.counts.requested, result.counts.returned, result.counts.filtered_out) == (
        10,
        3,
        21,
    )


# -- the reranker and fusion ---------------------------------------------------------------------


def _maxsim_truth(
    stored, text_features, rerank_k: int
) -> tuple[dict[int, float], dict[int, float]]:
    """First-stage scores of all images, MaxSim scores of the top ``rerank_k``, from the files."""
    import torch

    ids, vectors, patches, _ = stored
    first = _brute_force(text_features[0], vectors, ids, np.ones(len(ids), bool))
    candidates = sorted(first, key=lambda i: -first[i])[:rerank_k]
    rows = np.searchsorted(ids, candidates)
    scores = (
        MaxSimReranker(device="cpu")
        .score(
            torch.from_numpy(text_features[1]),
            torch.from_numpy(text_features[2]),
            torch.from_numpy(patches[rows]),
        )
        .numpy()
    )
    return first, dict(zip(candidates, scores.tolist(), strict=True))


def test_maxsim_scores_equal_the_reranker_on_stored_patches(index, stored, text_features):
    first, rerank = _maxsim_truth(stored, text_features, rerank_k=8)
    result = index.search(QUERY, k=5, rerank_k=8, reranker="maxsim")
    _assert_top_k([h.id for h in result], [h.score for h in result], rerank, 5)
    for hit in result:
        assert hit.score == hit.rerank_score  # fusion "rerank": the final score is the reranker's
        assert hit.first_stage_score == pytest.approx(first[hit.id], abs=ATOL)
    assert result.counts.candidates == 8
    assert "rerank" in result.timings_ms
    # The reranker reorders: its top 5 are not the first stage's top 5 in the same order.
    assert [h.id for h in result] != [h.id for h in index.search(QUERY, k=5, reranker=None)]


def test_weighted_fusion_ranks_by_the_weighted_sum(index, stored, text_features):
    first, rerank = _maxsim_truth(stored, text_features, rerank_k=10)
    fused = {i: 0.5 * rerank[i] + 0.5 * first[i] for i in rerank}
    result = index.search(QUERY, k=4, rerank_k=10, reranker="maxsim", fusion="weighted:0.5")
    _assert_top_k([h.id for h in result], [h.score for h in result], fused, 4)
    for hit in result:
        assert hit.score == pytest.approx(
            0.5 * hit.rerank_score + 0.5 * hit.first_stage_score, abs=1e-6
        )
        assert hit.rerank_score == pytest.approx(rerank[hit.id], abs=ATOL)


def test_weighted_zero_keeps_the_first_stage_order(index):
    fused = index.search(QUERY, k=6, rerank_k=24, reranker="maxsim", fusion="weighted:0")
    plain = index.search(QUERY, k=6, reranker="none")
    assert [h.id for h in fused] == [h.id for h in plain]
    assert all(h.rerank_score is not None for h in fused)


# -- image-to-image -----------------------------------------------------------------------------


@pytest.mark.parametrize("as_pil", [False, True], ids=["path", "pil"])
@pytest.mark.parametrize("reranker", [None, "maxsim"])
def test_an_image_query_finds_itself_first(index, image_folder, as_pil, reranker):
    target = image_folder / "nested" / "deeper" / "img_005.png"
    query = Image.open(target) if as_pil else target
    result = index.search(query, k=3, reranker=reranker)
    assert result[0].path == str(target)
    assert result[0].first_stage_score == pytest.approx(1.0, abs=1e-3)
    assert result.query == (f"<image {query.width}x{query.height}>" if as_pil else str(target))


# -- batches and threads ------------------------------------------------------------------------


def _same_result(a, b) -> None:
    assert [h.id for h in a] == [h.id for h in b]
    np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=ATOL)
    assert a.counts == b.counts and a.query == b.query


def test_search_batch_equals_one_search_per_query(index, image_folder):
    queries = [QUERY, image_folder / "img_002.png", "a green triangle", "a dog"]
    batch = index.search_batch(queries, k=4, rerank_k=12, where="id != 2")
    assert len(batch) == 4
    for query, result in zip(queries, batch, strict=True):
        _same_result(result, index.search(query, k=4, rerank_k=12, where="id != 2"))
    assert index.search_batch([]) == []


def test_eight_threads_search_one_index_at_once(built_index, index, image_folder):
    queries = [
        QUERY,
        "a green triangle above a yellow star",
        "a purple square",
        "a cat",
        "a dog photo",
        image_folder / "img_001.png",
        "a large blue circle",
        "the small orange star",
    ]
    wheres = [None, "id % 2 = 0", None, "id > 4", None, None, "path LIKE '%nested%'", None]
    expected = [
        index.search(q, k=5, rerank_k=10, where=w) for q, w in zip(queries, wheres, strict=True)
    ]
    shared = Index.open(
        built_index, device="cpu"
    )  # fresh: the threads also race to load the encoder
    start = threading.Barrier(8)

    def run(i: int):
        start.wait()
        return shared.search(queries[i], k=5, rerank_k=10, where=wheres[i])

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, range(8)))
    for got, want in zip(results, expected, strict=True):
        _same_result(got, want)


# -- verify -------------------------------------------------------------------------------------


def test_verify_passes_on_a_sound_index(index):
    assert index.verify() == []


def test_verify_names_a_deleted_patch_shard(index_copy):
    from crossrank.api.verify import verify_index

    shard = _generation(index_copy) / "patches-000.npy"
    shard.unlink()
    problems = verify_index(index_copy)
    assert problems and problems[0] == f"{shard} is missing"


def test_verify_names_a_first_stage_count_mismatch(index_copy):
    from crossrank.api.verify import verify_index
    from crossrank.indexes import IndexConfig

    gen = _generation(index_copy)
    ids, vectors, _, _ = _stored(index_copy)
    FirstStage.build(vectors[:23], ids[:23], IndexConfig(factory="Flat")).save(
        gen / "first_stage.faiss"
    )
    info = json.loads((gen / "generation.json").read_text())
    info["files"]["first_stage.faiss"] = (
        (gen / "first_stage.faiss").stat().st_size
    )  # only the count is off
    (gen / "generation.json").write_text(json.dumps(info))
    assert verify_index(index_copy) == [
        "first stage holds 23 vectors, but the generation has 24 images"
    ]
    assert (
        Index.open(index_copy, device="cpu").verify()[0].startswith("first stage holds 23 vectors")
    )


def test_verify_names_a_manifest_count_mismatch(index_copy):
    from crossrank.api.verify import verify_index

    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["counts"]["images"] = 99
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    assert verify_index(index_copy) == [
        "manifest counts.images is 99, generation gen-000001 holds 24"
    ]


# -- bad input: a CrossrankError with a message, and nothing changes ------------------------------


def test_open_without_a_committed_index(tmp_path):
    with pytest.raises(
        IndexNotFoundError,
        match=r"no committed index in .*nothing; build one with `crossrank build",
    ):
        Index.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="no committed index"):
        Index.open(tmp_path / "empty")


def test_searching_with_another_model_is_refused_naming_both(built_index, tiny_clip, other_clip):
    # A model named at open is checked at open, before any search can use it.
    with pytest.raises(
        ModelMismatchError,
        match=rf"built with model '{re.escape(str(tiny_clip))}'.*"
        rf"encoded with '{re.escape(str(other_clip))}'",
    ):
        Index.open(built_index, device="cpu", model=other_clip)


def test_a_model_that_changed_under_its_name_is_refused_saying_so(
    tmp_path, image_folder, tiny_clip, other_clip
):
    # As after an upgrade that ships a new demo encoder: the index names the same model, whose
    # weights are no longer those it was built with.
    import shutil

    model = shutil.copytree(tiny_clip, tmp_path / "model")
    index_dir = tmp_path / "photos.idx"
    Index.build(image_folder, index_dir, model=model, device="cpu", batch_size=8, workers=1).close()
    shutil.copy(other_clip / "model.safetensors", model / "model.safetensors")
    with (
        Index.open(index_dir, device="cpu") as index,
        pytest.raises(
            ModelMismatchError,
            match=r"built with model '.*model', whose weights or config have changed since "
            r"\(retrained.*\); rebuild the index with `crossrank build SOURCE --index "
            r".*photos\.idx --overwrite`",
        ),
    ):
        index.search("a red circle")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"where": "width >"}, FilterError, r'where "width >" is not a valid SQL expression'),
        (
            {"where": "widht > 3"},
            FilterError,
            r'unknown column "widht"; the metadata columns are: id, path',
        ),
        ({"where": "   "}, FilterError, "where is empty"),
        ({"k": 0}, InvalidArgumentError, "k must be a positive number of hits, got 0"),
        ({"k": -3}, InvalidArgumentError, "k must be a positive number of hits, got -3"),
        (
            {"k": 5, "rerank_k": 4},
            InvalidArgumentError,
            r"rerank_k must be >= k .* got rerank_k=4 and k=5",
        ),
        ({"query": ""}, InvalidArgumentError, "query is empty"),
        ({"query": "  \n"}, InvalidArgumentError, "query is empty"),
        ({"query": "a red \udcff circle"}, InvalidArgumentError, "bytes that are not UTF-8"),
        ({"query": 42}, InvalidArgumentError, "query must be a str .* got int"),
        (
            {"query": Path("/no/such/image.png")},
            InvalidArgumentError,
            r"query image /no/such/image.png does not exist",
        ),
        ({"reranker": "colbert"}, InvalidArgumentError, "colbert"),
        ({"fusion": "weighted:2"}, InvalidArgumentError, r"alpha in \[0, 1\]"),
    ],
    ids=[
        "malformed-where",
        "unknown-column",
        "empty-where",
        "k-zero",
        "k-negative",
        "rerank_k-below-k",
        "empty-query",
        "blank-query",
        "non-utf8-query",
        "query-type",
        "missing-image",
        "unknown-reranker",
        "bad-fusion",
    ],
)
def test_bad_search_input_raises_and_changes_nothing(index, built_index, kwargs, error, match):
    before = committed_state(built_index)
    kwargs = {"query": QUERY, **kwargs}
    with pytest.raises(error, match=match):
        index.search(kwargs.pop("query"), **kwargs)
    assert committed_state(built_index) == before
    assert len(index.search(QUERY, k=1)) == 1  # the Index still serves


def test_bad_metadata_filter_raises(index):
    with pytest.raises(FilterError, match='unknown column "label"'):
        index.metadata(where="label = 'cat'")


def test_search_batch_wants_a_list(index):
    with pytest.raises(InvalidArgumentError, match="queries must be a list"):
        index.search_batch(QUERY)
