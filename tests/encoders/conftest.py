"""Tiny random CLIP models for the encoder tests, made once per session in a temp dir."""

from __future__ import annotations

from pathlib import Path

import pytest

CAPTIONS = [
    "a red circle left of a blue square",
    "a small green triangle above a large yellow star",
    "a purple square below an orange circle",
    "a large blue star right of a small red triangle",
    "two circles and a square on a white background",
]


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP (image 32, patch 8, width 32, 2 layers) in Hugging Face format, seed 0."""
    from crossrank.encoders.factory import make_clip

    return make_clip(tmp_path_factory.mktemp("models") / "tiny-clip", CAPTIONS, seed=0)


@pytest.fixture(scope="session")
def other_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture and tokenizer corpus as ``tiny_clip_dir``, other weights (seed 1)."""
    from crossrank.encoders.factory import make_clip

    return make_clip(tmp_path_factory.mktemp("models") / "other-clip", CAPTIONS, seed=1)


@pytest.fixture(scope="session")
def tiny_encoder(tiny_clip_dir: Path):
    """The tiny CLIP loaded on the CPU, batch size 4 (so the tests cross batch boundaries)."""
    from crossrank.encoders import load_encoder

    return load_encoder(tiny_clip_dir, device="cpu", batch_size=4)


@pytest.fixture(scope="session")
def images():
    """Ten seeded random RGB images of assorted sizes (resized and cropped by the processor)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [
        (32, 32),
        (40, 56),
        (64, 48),
        (33, 90),
        (32, 32),
        (70, 70),
        (45, 38),
        (100, 40),
        (32, 64),
        (50, 50),
    ]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
