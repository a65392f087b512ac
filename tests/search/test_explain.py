"""``search(..., explain=True)``: where each query word looked, per returned hit.

- each hit carries the query's words (special tokens left out), the patch grid and one map per
  word, the reranker's own weights (cross-attention rows sum to 1; MaxSim is one-hot);
- explaining changes no score and no ranking;
- what cannot be explained (no reranker, an image query, a reranker without maps) is a note;
- the JSON shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossrank import Index
from crossrank.rerank import CrossAttentionReranker, Reranker, RerankerConfig

from ..conftest import write_images

QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def index(built_index: Path) -> Index:
    return Index.open(built_index, device="cpu")


@pytest.fixture(scope="module")
def cross(index: Index) -> CrossAttentionReranker:
    dim = int(index.manifest.encoder["patch_dim"])
    model = CrossAttentionReranker(
        RerankerConfig(text_dim=dim, patch_dim=dim, width=16, heads=2, layers=2)
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return model.eval()


def _ranked(result):
    return [(hit.id, hit.score, hit.first_stage_score, hit.rerank_score) for hit in result]


@pytest.mark.parametrize("which", ["cross", "maxsim"])
def test_explain_changes_no_score_and_no_ranking(index, cross, which):
    reranker = cross if which == "cross" else "maxsim"
    plain = index.search_batch([QUERY, "a green triangle"], k=4, rerank_k=10, reranker=reranker)
    told = index.search_batch(
        [QUERY, "a green triangle"], k=4, rerank_k=10, reranker=reranker, explain=True
    )
    for a, b in zip(plain, told, strict=True):
        assert _ranked(a) == _ranked(b)
        assert all(hit.explain is None for hit in a)
        assert all(hit.explain is not None for hit in b)


def test_cross_attention_maps_are_words_on_the_patch_grid(index, cross):
    result = index.search(QUERY, k=3, rerank_k=8, reranker=cross, explain=True)
    n_patches = index.patches.gather(np.zeros(1, dtype=np.int64)).shape[1]
    for hit in result:
        ex = hit.explain
        assert ex.tokens == ("a", "red", "circle", "left", "of", "a", "blue", "square")
        rows, cols = ex.grid
        assert rows * cols == n_patches and rows == cols
        assert ex.maps.shape == (len(ex.tokens), n_patches)
        np.testing.assert_allclose(ex.maps.sum(-1), 1.0, atol=1e-5)


def test_maxsim_maps_are_one_hot(index):
    result = index.search(QUERY, k=3, rerank_k=8, reranker="maxsim", explain=True)
    for hit in result:
        maps = hit.explain.maps
        assert set(np.unique(maps)) == {0.0, 1.0}
        assert (maps.sum(-1) == 1).all()


def test_what_cannot_be_explained_is_a_note(index, tmp_path):
    class Blind(Reranker):
        name = "blind"

        def score(self, query, query_mask, patches, patch_mask=None):
            return torch.zeros(patches.shape[0])

    none = index.search(QUERY, k=2, reranker="none", explain=True)
    blind = index.search(QUERY, k=2, reranker=Blind(), explain=True)
    image = index.search(write_images(tmp_path, 1)[0], k=2, reranker="maxsim", explain=True)
    for result, words in [(none, "no reranker"), (blind, "cannot"), (image, "image query")]:
        assert all(hit.explain is None for hit in result)
        assert any(note.startswith("explain:") and words in note for note in result.notes)


def test_json_shape_carries_maps_for_the_returned_hits_only(index, cross):
    result = index.search(QUERY, k=2, rerank_k=8, reranker=cross, explain=True)
    data = json.loads(json.dumps(result.to_dict()))
    assert len(data["hits"]) == 2
    for hit in data["hits"]:
        ex = hit["explain"]
        assert set(ex) == {"tokens", "grid", "maps"}
        assert len(ex["maps"]) == len(ex["tokens"]) == 8
        assert all(len(row) == ex["grid"][0] * ex["grid"][1] for row in ex["maps"])
        assert abs(sum(ex["maps"][0]) - 1) < 1e-3
    assert "explain" not in index.search(QUERY, k=2, reranker=cross).to_dict()["hits"][0]
