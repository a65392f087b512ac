"""Fixtures of the encoder tests; the tiny CLIPs and ``tiny_encoder`` are the root conftest's."""

from __future__ import annotations

import pytest


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
