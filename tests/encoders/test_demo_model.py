"""The shipped demo encoder: it loads offline by default, and it is genuinely trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossrank.encoders import DEMO_MODEL, demo_model_dir, load_encoder


@pytest.fixture(scope="module")
def demo_encoder():
    if not (demo_model_dir() / "model.safetensors").is_file():
        pytest.fail("the shipped demo model is missing from crossrank/assets/demo-encoder/")
    return load_encoder(None, device="cpu")


def test_default_model_is_the_shipped_demo_model(demo_encoder) -> None:
    assert demo_encoder.model_id == DEMO_MODEL
    assert (demo_encoder.dim, demo_encoder.n_patches) == (128, 64)


def test_demo_model_ranks_single_objects_first(demo_encoder, tmp_path: Path) -> None:
    """A random model scores ~1/n_images; the trained one puts a matching image first."""
    from PIL import Image

    from crossrank.datasets import generate_shapes, match_matrix

    ds = generate_shapes(tmp_path / "shapes", n_images=120, n_queries=0, seed=11, workers=1)
    scenes = ds.scenes()
    paths = sorted(ds.images_dir.glob("*.png"))
    encoder_images = demo_encoder.encode_images(
        [Image.open(p).convert("RGB") for p in paths]
    ).pooled
    texts = [
        f"a {c} {s}"
        for c in ("red", "green", "blue", "yellow")
        for s in ("circle", "square", "cross")
    ]
    relevant = match_matrix(texts, scenes)  # (queries, images)
    keep = relevant.any(axis=1)
    top1 = (demo_encoder.encode_text(texts).pooled @ encoder_images.T).argmax(axis=1)
    hits = relevant[np.arange(len(texts)), top1][keep]
    assert encoder_images.shape == (120, 128)
    assert hits.mean() >= 0.8, f"R@1 on single objects {hits.mean():.2f}"
