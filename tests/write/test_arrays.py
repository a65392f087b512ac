"""``build_from_arrays``: an index written from a backend's own vectors, patches and metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from crossrank import Index, InvalidArgumentError
from crossrank.store import Generation
from crossrank.write import build_from_arrays

N, D, P, DP = 30, 16, 4, 8
INFO = {"model_id": "my-backend-encoder"}


def _arrays(seed: int = 0, n: int = N) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, D)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    patches = (rng.standard_normal((n, P, DP)) * 0.5).astype(np.float16)
    return xb, patches


def _meta(n: int = N) -> dict[str, list]:
    return {"path": [f"s3://bucket/{i}.jpg" for i in range(n)], "price": list(range(n))}


def test_round_trip_matches_faiss_on_the_arrays(tmp_path: Path) -> None:
    import faiss

    xb, patches = _arrays()
    ids = np.arange(N, dtype=np.int64)[::-1] * 7 + 100  # descending: rows are reordered by id
    report = build_from_arrays(tmp_path / "a.idx", xb, patches, _meta(), ids=ids, encoder_info=INFO)
    assert (report.indexed, report.skipped, report.patch_codec) == (N, 0, "fp16")
    assert report.model == "my-backend-encoder"

    flat = faiss.IndexFlatIP(D)
    flat.add(xb)
    xq = _arrays(seed=1, n=3)[0]
    expected_scores, expected_rows = flat.search(xq, 5)
    with Index.open(tmp_path / "a.idx", device="cpu") as index:
        assert len(index) == N
        for qi, result in enumerate(index.search_vectors(xq, k=5)):
            assert [h.id for h in result] == ids[expected_rows[qi]].tolist()
            np.testing.assert_allclose([h.score for h in result], expected_scores[qi], rtol=1e-5)
            for hit, row in zip(result, expected_rows[qi], strict=True):
                assert hit.path == f"s3://bucket/{row}.jpg"
                assert hit.metadata["price"] == row
        # Each id's stored patches are the ones given for its row.
        gen = index.stored
        got = gen.patches().gather(gen.rows_of_ids(ids))
        np.testing.assert_array_equal(got, patches)
        assert index.search_vectors(xq[:1], k=3, where="price < 3")[0].counts.filtered_out == N - 3


def test_default_ids_and_no_metadata(tmp_path: Path) -> None:
    xb, patches = _arrays()
    build_from_arrays(tmp_path / "a.idx", xb, patches, encoder_info=INFO)
    gen = Generation.current(tmp_path / "a.idx")
    assert np.asarray(gen.ids()).tolist() == list(range(N))
    with Index.open(tmp_path / "a.idx", device="cpu") as index:
        hit = index.search_vectors(xb[5:6], k=1)[0][0]
        assert (hit.id, hit.path) == (5, "")
        assert index.metadata().column_names == ["id", "path"]


def test_ids_from_the_metadata_id_column(tmp_path: Path) -> None:
    xb, patches = _arrays()
    meta = pa.table({"id": pa.array(range(1000, 1000 + N)), "path": [str(i) for i in range(N)]})
    build_from_arrays(tmp_path / "a.idx", xb, patches, meta, encoder_info=INFO)
    with Index.open(tmp_path / "a.idx", device="cpu") as index:
        assert index.search_vectors(xb[2:3], k=1)[0][0].id == 1002


def test_memory_mapped_patches_in_small_chunks_with_int8(tmp_path: Path) -> None:
    xb, patches = _arrays()
    mm = np.lib.format.open_memmap(
        tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(N, P, DP)
    )
    mm[:] = patches
    mm.flush()
    mm = np.load(tmp_path / "p.npy", mmap_mode="r")
    report = build_from_arrays(
        tmp_path / "a.idx", xb, mm, encoder_info=INFO, patch_codec="int8", chunk_rows=7
    )
    assert report.patch_codec == "int8"
    with Index.open(tmp_path / "a.idx", device="cpu") as index:
        assert index.info()["patch_codec"] == "int8"
        gen = index.stored
        got = gen.patches().gather(gen.rows_of_ids(np.arange(N)))
        np.testing.assert_allclose(got, patches.astype(np.float32), atol=0.05)


def test_pq_with_too_few_images_is_refused_before_writing(tmp_path: Path) -> None:
    xb, patches = _arrays()
    with pytest.raises(InvalidArgumentError, match="cannot be trained on the 30 images given"):
        build_from_arrays(tmp_path / "a.idx", xb, patches, encoder_info=INFO, patch_codec="pq")
    assert not (tmp_path / "a.idx").exists()


def test_vectors_only_index_refuses_text_queries(tmp_path: Path) -> None:
    xb, patches = _arrays()
    index = Index.build_from_arrays(tmp_path / "a.idx", xb, patches, encoder_info=INFO)
    assert index.manifest.encoder["vectors_only"] is True
    assert index.build_report is not None and index.build_report.indexed == N
    for call in (
        lambda: index.search("a red bicycle"),
        lambda: index.rerank("a red bicycle", ids=[1, 2]),
    ):
        with pytest.raises(InvalidArgumentError, match="has no query encoder") as e:
            call()
        assert "\n" not in str(e.value) and "search_vectors" in str(e.value)
    assert len(index.search_vectors(xb[:1], k=2)[0]) == 2
    index.close()


def test_model_info_is_recorded_as_a_build_records_it(
    tmp_path: Path, tiny_clip: Path, tiny_encoder, built_index: Path
) -> None:
    rng = np.random.default_rng(0)
    n = 12
    xb = rng.standard_normal((n, tiny_encoder.dim)).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    patches = rng.standard_normal((n, tiny_encoder.n_patches, tiny_encoder.patch_dim))
    index = Index.build_from_arrays(
        tmp_path / "a.idx", xb, patches.astype(np.float32), model=tiny_clip, device="cpu"
    )
    with Index.open(built_index, device="cpu") as built:
        assert index.manifest.encoder == built.manifest.encoder
    result = index.search("a red circle", k=3, reranker=None)
    assert len(result) == 3 and result.encoder.model_id == index.model_id
    index.close()


def test_an_existing_index_needs_overwrite(tmp_path: Path) -> None:
    xb, patches = _arrays()
    build_from_arrays(tmp_path / "a.idx", xb, patches, encoder_info=INFO)
    with pytest.raises(InvalidArgumentError, match="already holds an index .30 images.; pass"):
        build_from_arrays(tmp_path / "a.idx", xb[:10], patches[:10], encoder_info=INFO)
    build_from_arrays(tmp_path / "a.idx", xb[:10], patches[:10], encoder_info=INFO, overwrite=True)
    gen = Generation.current(tmp_path / "a.idx")
    assert np.asarray(gen.ids()).tolist() == list(range(30, 40))  # ids are never reused


def _bad(name: str):
    xb, patches = _arrays()
    kw: dict = {"encoder_info": INFO}
    meta: object = None
    if name == "nan-vector":
        xb[4, 2] = np.nan
    elif name == "1d-vectors":
        xb = xb[0]
    elif name == "int-patches":
        patches = patches.astype(np.int32)
    elif name == "patch-count":
        patches = patches[:-1]
    elif name == "inf-patch":
        patches = patches.astype(np.float32)
        patches[7, 0, 0] = 1e6
    elif name == "dup-ids":
        kw["ids"] = np.r_[np.arange(N - 1), 3]
    elif name == "negative-ids":
        kw["ids"] = np.arange(N) - 1
    elif name == "float-ids":
        kw["ids"] = np.arange(N, dtype=np.float64)
    elif name == "meta-rows":
        meta = {"path": ["x"] * (N - 2)}
    elif name == "meta-path-type":
        meta = {"path": list(range(N))}
    elif name == "meta-not-a-table":
        meta = 42
    elif name == "both-encoders":
        kw["model"] = "crossrank-demo"
    elif name == "info-without-id":
        kw["encoder_info"] = {"name": "x"}
    elif name == "info-dims":
        kw["encoder_info"] = {"model_id": "x", "dim": 512}
    elif name == "codec":
        kw["patch_codec"] = "zstd"
    return xb, patches, meta, kw


BAD = {
    "nan-vector": r"vectors\[4\] holds NaN or inf",
    "1d-vectors": r"vectors must be a float array of shape \(n, D\)",
    "int-patches": r"patches must be a float16 or float32 array",
    "patch-count": r"patches hold 29 images but vectors hold 30",
    "inf-patch": r"patches\[7\] holds values that are not finite in float16",
    "dup-ids": r"ids must be unique, but these appear twice: 3",
    "negative-ids": r"ids must be >= 0, got -1",
    "float-ids": r"ids must be 30 integers",
    "meta-rows": r"metadata has 28 rows but vectors hold 30 images",
    "meta-path-type": r"metadata column `path` must hold strings",
    "meta-not-a-table": r"metadata must be a pyarrow.Table or anything pyarrow.table\(\) takes",
    "both-encoders": r"give either model= .* or encoder_info=",
    "info-without-id": r"encoder_info must be a mapping with a string `model_id`",
    "info-dims": r"encoder_info gives \(D, P, d\) = \(512, 4, 8\)",
    "codec": r"zstd",
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, name: str) -> None:
    xb, patches, meta, kw = _bad(name)
    with pytest.raises(InvalidArgumentError, match=BAD[name]) as e:
        build_from_arrays(tmp_path / "a.idx", xb, patches, meta, **kw)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a.idx").exists()


def test_model_sizes_must_match_the_arrays(tmp_path: Path, tiny_clip: Path) -> None:
    xb, patches = _arrays()
    with pytest.raises(InvalidArgumentError, match=r"model .* gives \(D, P, d\)"):
        build_from_arrays(tmp_path / "a.idx", xb, patches, model=tiny_clip, device="cpu")
    assert not (tmp_path / "a.idx").exists()
