"""The shipped demo encoder and reranker score exactly as they did when their weights were chosen.

``tests/data/shipped_scores.json`` holds their scores on inputs the package makes itself: eight
shapes scenes rendered from a fixed seed and four captions. A refactor of the encoder, the
reranker or the search path that changes any score fails here; so does a change of the weights,
which must then come with a new file (regenerate it with ``shipped_scores()`` below).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "shipped_scores.json"
CAPTIONS = [
    "a red circle",
    "a blue square left of a green triangle",
    "a small yellow star above a large purple circle",
    "two shapes",
]


def shipped_scores() -> dict:
    """Pooled cosines and reranker scores of every caption against every rendered scene."""
    import torch

    from crossrank.datasets.render import render_scene
    from crossrank.datasets.scene import sample_scene
    from crossrank.encoders import load_encoder
    from crossrank.rerank.checkpoint import demo_reranker_dir, load_reranker

    encoder = load_encoder(None, device="cpu")
    reranker = load_reranker(demo_reranker_dir(), device="cpu", encoder_info=encoder.info)
    rng = np.random.default_rng(1234)
    images = [render_scene(sample_scene(rng, 64, True), 64, rng) for _ in range(8)]
    image_feats = encoder.encode_images(images)
    text_feats = encoder.encode_text(CAPTIONS, token_embeddings=reranker.token_embeddings > 0)
    tokens = text_feats.reranker_tokens()
    patches = torch.from_numpy(np.asarray(image_feats.patches, dtype=np.float16))  # as stored
    rerank = [
        reranker.score(torch.from_numpy(tokens[i]), torch.from_numpy(text_feats.mask[i]), patches)
        .numpy()
        .tolist()
        for i in range(len(CAPTIONS))
    ]
    pooled = (text_feats.pooled @ image_feats.pooled.T).tolist()  # (captions, images)
    return {"captions": CAPTIONS, "pooled": pooled, "rerank": rerank}


def test_the_shipped_models_score_as_recorded() -> None:
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing; it ships with the tests")
    want = json.loads(GOLDEN.read_text())
    got = shipped_scores()
    assert got["captions"] == want["captions"]
    np.testing.assert_allclose(got["pooled"], want["pooled"], rtol=0, atol=1e-5)
    # float32 kernels differ between CPUs (summation order, vector width): on an AMD EPYC the
    # file, made on a CPU with AMX, is off by up to 6.1e-4 (2.9e-5 relative, on a score of -21.3).
    np.testing.assert_allclose(got["rerank"], want["rerank"], rtol=1e-4, atol=1e-4)
    # The reranker tells the scenes apart: a model that scored every candidate alike would pass
    # an all-equal golden file too.
    assert np.ptp(np.asarray(want["rerank"]), axis=1).min() > 0.1
