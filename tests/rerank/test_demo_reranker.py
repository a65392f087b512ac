"""The shipped demo reranker: it is in the package, small, and the default over the demo encoder."""

from __future__ import annotations

import json

import pytest
import torch

from crossrank.encoders import load_encoder
from crossrank.rerank import load_reranker
from crossrank.rerank.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    demo_reranker_dir,
    shipped_reranker_for,
)


@pytest.fixture(scope="module")
def demo_info():
    return load_encoder(None, device="cpu").info


def test_the_demo_reranker_ships_small_and_fits_the_demo_encoder(demo_info) -> None:
    folder = demo_reranker_dir()
    assert (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file(), (
        "the shipped demo reranker is missing from crossrank/assets/demo-reranker/"
    )
    assert (folder / WEIGHTS_NAME).stat().st_size < 2_000_000  # fp16; the package stays a few MB
    assert shipped_reranker_for(demo_info) == folder
    assert shipped_reranker_for({**demo_info, "weights_sha256": "0" * 64}) is None
    reranker = load_reranker(folder, device="cpu", encoder_info=demo_info)
    meta = json.loads((folder / CONFIG_NAME).read_text())["metadata"]
    assert (
        reranker.fusion
        == meta["fusion"]
        == f"weighted:{1 / (1 + meta['train']['first_stage_weight']):.6g}"
    )
    g = torch.Generator().manual_seed(0)
    scores = reranker.score(
        torch.randn(6, reranker.config.token_input_dim, generator=g),
        torch.ones(6, dtype=torch.bool),
        torch.randn(5, 64, 128, generator=g).half(),
    )
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    assert scores.std() > 0  # trained: candidates are told apart, unlike an untrained gated model
