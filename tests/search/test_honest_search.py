"""What a search says about itself, and the inputs it refuses before any model loads.

- the encoder, the reranker and the fusion that ranked the hits are named in the result;
- ``reranker="auto"`` reranks only with a trained reranker, else the first stage alone with a hint;
- image queries get no text-trained reranker under ``auto``;
- a query longer than the text positions is cut with a warning;
- k and rerank_k are capped at the index size, numpy integers accepted, bools refused;
- a bad ``where``, k or image fails before the encoder loads.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from crossrank import FilterError, Index, InvalidArgumentError
from crossrank.search.encode import QueryTruncatedWarning

QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def index(built_index: Path) -> Index:
    return Index.open(built_index, device="cpu")


@pytest.fixture()
def no_encoder(monkeypatch):
    """Any attempt to load an encoder fails the test."""
    import crossrank.encoders

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(crossrank.encoders, "load_encoder", refuse)
    monkeypatch.setattr(crossrank.encoders, "load_text_encoder", refuse)


def _with_own_reranker(index_copy: Path) -> Path:
    from crossrank.rerank import CrossAttentionReranker, RerankerConfig
    from crossrank.rerank.checkpoint import save_reranker

    probe = Index.open(index_copy, device="cpu")
    dim = int(probe.manifest.encoder["patch_dim"])
    probe.close()
    model = CrossAttentionReranker(
        RerankerConfig(text_dim=dim, patch_dim=dim, width=16, heads=2, layers=1)
    )
    save_reranker(model, index_copy / "reranker")
    return index_copy


# -- items 1 and 2: the result says what ranked it -------------------------------------------


def test_auto_without_a_trained_reranker_is_the_first_stage_with_a_hint(index):
    result = index.search(QUERY, k=5, rerank_k=20)
    plain = index.search(QUERY, k=5, reranker="none")
    assert [h.id for h in result] == [h.id for h in plain]
    assert all(h.rerank_score is None for h in result)
    assert result.reranker == "none" and result.fusion == "none"
    assert len(result.notes) == 1 and "crossrank train" in result.notes[0]
    assert result.encoder is not None and result.encoder.model_id == index.model_id
    assert not result.encoder.is_demo and result.encoder.note is None
    assert index.default_reranker == "none"
    out = result.to_dict()
    assert out["reranker"] == "none" and out["fusion"] == "none"
    assert out["encoder"]["model_id"] == index.model_id


def test_maxsim_by_name_still_reranks_and_says_so(index):
    result = index.search(QUERY, k=3, rerank_k=10, reranker="maxsim", fusion="sum")
    assert result.reranker == "maxsim" and result.fusion == "sum"
    assert all(h.rerank_score is not None for h in result)
    assert result.notes == ()


def test_auto_uses_the_index_own_reranker_and_names_it(index_copy):
    index = Index.open(_with_own_reranker(index_copy), device="cpu")
    result = index.search(QUERY, k=3, rerank_k=10)
    assert result.reranker == "cross-attention (index reranker/)"
    assert result.fusion == "rerank"
    assert all(h.rerank_score is not None for h in result)
    assert result.notes == ()
    by_folder = index.search(QUERY, k=3, rerank_k=10, reranker=index_copy / "reranker")
    assert by_folder.reranker == f"cross-attention ({index_copy / 'reranker'})"
    assert [h.rerank_score for h in by_folder] == [h.rerank_score for h in result]


def test_auto_gives_image_queries_no_text_trained_reranker(index_copy, image_folder):
    index = Index.open(_with_own_reranker(index_copy), device="cpu")
    image = image_folder / "img_003.png"
    text, by_image = index.search_batch([QUERY, image], k=3, rerank_k=10)
    assert text.reranker.startswith("cross-attention")
    assert all(h.rerank_score is not None for h in text)
    assert by_image.reranker == "none" and by_image.fusion == "none"
    assert all(h.rerank_score is None for h in by_image)
    assert by_image[0].path == str(image)
    assert "image queries are not reranked" in by_image.notes[0]
    alone = index.search(image, k=3, reranker="none")
    assert [h.id for h in by_image] == [h.id for h in alone]
    named = index.search(image, k=3, rerank_k=10, reranker="maxsim")  # by name: it reranks
    assert named.reranker == "maxsim" and all(h.rerank_score is not None for h in named)


def test_the_demo_encoder_is_named_with_its_note(tmp_path):
    from crossrank.encoders.describe import DEMO_NOTE
    from crossrank.write.build import build_index

    from ..conftest import write_images

    write_images(tmp_path / "src", 3)
    build_index(tmp_path / "src", tmp_path / "demo.idx", device="cpu", workers=1)
    result = Index.open(tmp_path / "demo.idx", device="cpu").search("a red circle", k=2)
    assert result.encoder.is_demo and result.encoder.note == DEMO_NOTE
    assert result.to_dict()["encoder"]["note"] == DEMO_NOTE
    assert result.reranker.startswith("cross-attention (shipped for")  # the demo reranker


# -- item 1: a long query is cut with a warning ------------------------------------------------


def test_a_query_longer_than_the_text_positions_is_cut_with_a_warning(index):
    long = " ".join([QUERY] * 6)  # far beyond the tiny CLIP's 24 positions
    with pytest.warns(QueryTruncatedWarning, match="longer than the text encoder reads"):
        results = index.search_batch([long, QUERY], k=2)
    assert any("24 tokens" in n for n in results[0].notes)
    assert not any("longer than" in n for n in results[1].notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QueryTruncatedWarning)
        index.search(QUERY, k=2)  # a short query: no warning


# -- item 10: k and rerank_k follow the index size --------------------------------------------


def test_huge_k_and_rerank_k_are_capped_at_the_index_size(index):
    huge = 10**18
    for reranker in ("none", "maxsim"):
        result = index.search(QUERY, k=huge, rerank_k=huge, reranker=reranker)
        assert len(result) == len(index)
        assert result.counts.requested == huge and result.counts.returned == len(index)
        assert result.counts.candidates == len(index)


def test_k_beyond_int64_or_not_a_whole_number_is_refused_in_one_line(index):
    for bad in (2**63, 2**100):
        with pytest.raises(InvalidArgumentError, match=r"k must be at most 9223372036854775807"):
            index.search(QUERY, k=bad, rerank_k=bad)
    with pytest.raises(InvalidArgumentError, match=r"rerank_k must be at most"):
        index.search(QUERY, k=3, rerank_k=2**64)
    for bad in (True, 2.0, "3", np.float64(3.0)):
        with pytest.raises(InvalidArgumentError, match="k must be a positive number of hits"):
            index.search(QUERY, k=bad)
    with pytest.raises(InvalidArgumentError, match="rerank_k must be a whole number"):
        index.search(QUERY, k=3, rerank_k=True)


def test_numpy_integers_are_accepted_as_k(index):
    result = index.search(QUERY, k=np.int64(3), rerank_k=np.int32(5), reranker="maxsim")
    assert len(result) == 3 and result.counts.requested == 3
    assert type(result.counts.requested) is int


# -- items 4 and 18: inputs are checked before any model loads ---------------------------------


def test_a_bad_where_fails_before_the_encoder_loads(built_index, no_encoder):
    index = Index.open(built_index, device="cpu")
    with pytest.raises(FilterError, match='unknown column "label"'):
        index.search(QUERY, where="label = 'cat'")
    with pytest.raises(FilterError):
        index.search_batch([QUERY, "a dog"], where="width >")
    with pytest.raises(FilterError, match='unknown column "label"'):
        index.check_search([QUERY], where="label = 'cat'")
    index.check_search([QUERY], k=3, where="width > 1")  # sound: nothing raised, nothing loaded


def test_bad_k_and_images_fail_before_the_encoder_loads(built_index, tmp_path, no_encoder):
    index = Index.open(built_index, device="cpu")
    with pytest.raises(InvalidArgumentError, match="k must be"):
        index.search(QUERY, k=0)
    with pytest.raises(InvalidArgumentError, match="is a folder, not an image file"):
        index.search(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InvalidArgumentError, match="notes.png cannot be used"):
        index.search(tmp_path / "notes.png")
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        index.search(tmp_path / "missing.png")
    with pytest.raises(InvalidArgumentError, match="alpha"):
        index.search(QUERY, fusion="weighted:7")
