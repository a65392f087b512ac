"""Patch codecs through build, add, remove and compact: the codec is asked for once and kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossrank import Index, InvalidArgumentError
from crossrank.store import Generation, check_index
from crossrank.store.codecs import PQ_FILE
from crossrank.write import add_images, compact_index, remove_images
from crossrank.write.build import build_index

from ..conftest import committed_state, write_images

QUERY = "a red circle left of a blue square"
N_IMAGES = 40  # the tiny CLIP has 16 patches of 32 dims: pq:8x4 (16 centroids) trains on 39+


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("codec-src")
    write_images(root, N_IMAGES, seed=11)
    return root


def _build(source: Path, index: Path, tiny_clip: Path, codec: str | None) -> None:
    build_index(
        source, index, model=tiny_clip, device="cpu", batch_size=16, workers=2, patch_codec=codec
    )


@pytest.fixture(scope="module")
def fp16_index(tmp_path_factory, source, tiny_clip) -> Path:
    path = tmp_path_factory.mktemp("codec-idx") / "fp16.idx"
    _build(source, path, tiny_clip, None)
    return path


def _stored(index: Path) -> Generation:
    return Generation.current(index)


def test_build_records_the_codec_and_keeps_fp16_the_default(fp16_index, source, tiny_clip):
    gen = _stored(fp16_index)
    assert gen.info.patch_codec == "fp16" and gen.info.format_version == 1
    index = Index.open(fp16_index, device="cpu")
    info = index.info()
    assert info["patch_codec"] == "fp16" and info["patch_bytes_per_image"] == 16 * 32 * 2


def test_int8_search_gives_the_fp16_top_hits(fp16_index, source, tiny_clip, tmp_path):
    path = tmp_path / "int8.idx"
    report = Index.build(
        source, path, model=tiny_clip, device="cpu", batch_size=16, workers=2, patch_codec="int8"
    ).build_report
    assert report.patch_codec == "int8"
    with Index.open(fp16_index, device="cpu") as a, Index.open(path, device="cpu") as b:
        assert b.info()["patch_codec"] == "int8"
        assert b.info()["patch_bytes_per_image"] == 16 * (32 + 2)
        ha = a.search(QUERY, k=10, rerank_k=N_IMAGES, reranker="maxsim").hits
        hb = b.search(QUERY, k=10, rerank_k=N_IMAGES, reranker="maxsim").hits
    sa = np.array([h.rerank_score for h in ha])
    sb = np.array([h.rerank_score for h in hb])
    # int8 moves each value by at most half a step (max|x| / 254): scores move by far less
    # than the gap between most neighbours; where two fp16 scores are that close, either
    # order is right.
    tol = 0.02
    np.testing.assert_allclose(sb, sa, atol=tol)
    ids_a, ids_b = [h.id for h in ha], [h.id for h in hb]
    for i in range(len(ids_a)):
        gap_before = sa[i - 1] - sa[i] if i else np.inf
        gap_after = sa[i] - sa[i + 1] if i + 1 < len(sa) else np.inf
        if min(gap_before, gap_after) > 2 * tol:
            assert ids_a[i] == ids_b[i], (i, ids_a, ids_b)
    assert ids_a[0] == ids_b[0] or sa[0] - sa[1] <= 2 * tol


def test_pq_is_kept_by_add_remove_and_compact(source, tiny_clip, tmp_path):
    index = tmp_path / "pq.idx"
    _build(source, index, tiny_clip, "pq:8x4")
    first = _stored(index)
    assert first.info.patch_codec == "pq:8x4" and first.info.format_version == 3
    quantiser = (first.path / PQ_FILE).read_bytes()
    ids = np.asarray(first.ids()).copy()
    codes = first.patches().gather_stored(np.arange(ids.size)).copy()

    more = tmp_path / "more"
    write_images(more, 3, seed=99)
    report = add_images(more, index, model=tiny_clip, device="cpu", workers=2)
    assert report.added == 3
    added = _stored(index)
    assert added.info.patch_codec == "pq:8x4"
    assert (added.path / PQ_FILE).read_bytes() == quantiser  # never retrained on add
    np.testing.assert_array_equal(
        added.patches().gather_stored(np.arange(ids.size)), codes
    )  # the old rows' codes as they were
    assert check_index(index, full=True) == []

    remove_images(index, ids=[int(ids[0]), int(ids[5])])
    assert _stored(index).info.patch_codec == "pq:8x4"
    compact = compact_index(index)
    assert compact.committed
    last = _stored(index)
    assert last.info.patch_codec == "pq:8x4" and last.info.n_tombstones == 0
    assert (last.path / PQ_FILE).read_bytes() == quantiser
    kept = np.flatnonzero(~np.isin(ids, [ids[0], ids[5]]))
    rows = last.rows_of_ids(ids[kept])
    np.testing.assert_array_equal(last.patches().gather_stored(rows), codes[kept])
    assert check_index(index, full=True) == []
    with Index.open(index, device="cpu") as idx:
        assert idx.info()["patch_codec"] == "pq:8x4"
        assert idx.info()["patch_bytes_per_image"] == 16 * 4
        assert len(idx.search(QUERY, k=5, reranker="maxsim").hits) == 5


def test_build_overwrite_may_change_the_codec(fp16_index, source, tiny_clip, tmp_path):
    import shutil

    index = Path(shutil.copytree(fp16_index, tmp_path / "copy.idx"))
    build_index(
        source,
        index,
        model=tiny_clip,
        device="cpu",
        workers=2,
        overwrite=True,
        patch_codec="int8",
    )
    assert _stored(index).info.patch_codec == "int8"


# -- bad input ------------------------------------------------------------------------------------


def test_an_unknown_codec_is_refused_before_the_model_loads(source, tmp_path):
    with pytest.raises(InvalidArgumentError) as e:
        build_index(source, tmp_path / "idx", model=tmp_path / "no-model", patch_codec="zstd")
    assert "unknown codec 'zstd'" in str(e.value) and "int8" in str(e.value)
    assert not (tmp_path / "idx").exists()


def test_pq_on_ten_images_is_refused_before_any_image_is_encoded(tmp_path, tiny_clip, monkeypatch):
    import crossrank.write.build as build_module

    def never(*a, **kw):
        raise AssertionError("an image was encoded")

    monkeypatch.setattr(build_module, "encode_items", never)
    src = tmp_path / "ten"
    write_images(src, 10, seed=1)
    with pytest.raises(InvalidArgumentError) as e:
        build_index(src, tmp_path / "idx", model=tiny_clip, device="cpu", patch_codec="pq")
    message = str(e.value)
    assert "\n" not in message
    assert "10 files" in message and "624 images" in message and "int8" in message
    assert not (tmp_path / "idx").exists()


def test_pq_that_loses_images_to_skips_is_refused_at_commit(tmp_path, tiny_clip, living):
    """The source counted enough files, but too few decoded: nothing is committed."""
    src = tmp_path / "few"
    write_images(src, 38, seed=2)  # 39 files x 16 patches = 624: enough, were all decodable
    (src / "broken.png").write_bytes(b"not a png")
    index = tmp_path / "idx"
    with pytest.raises(InvalidArgumentError, match="38 images"):
        build_index(src, index, model=tiny_clip, device="cpu", workers=2, patch_codec="pq:8x4")
    assert not (index / "manifest.json").exists()
    _, living_index = living
    before = committed_state(living_index)
    with pytest.raises(InvalidArgumentError):
        build_index(
            src, living_index, model=tiny_clip, device="cpu", overwrite=True, patch_codec="pq:8x4"
        )
    assert committed_state(living_index) == before
    assert json.loads((living_index / "manifest.json").read_text())["generation"] == before[1]
