"""Shared tiny corpora for the datasets tests (generated once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossrank.datasets import ShapesDataset, generate_shapes

N_IMAGES = 60
N_QUERIES = 30


@pytest.fixture(scope="session")
def test_corpus(tmp_path_factory: pytest.TempPathFactory) -> ShapesDataset:
    out: Path = tmp_path_factory.mktemp("shapes") / "test"
    return generate_shapes(out, n_images=N_IMAGES, n_queries=N_QUERIES, seed=7)


@pytest.fixture(scope="session")
def train_corpus(tmp_path_factory: pytest.TempPathFactory) -> ShapesDataset:
    out: Path = tmp_path_factory.mktemp("shapes") / "train"
    return generate_shapes(out, n_images=N_IMAGES, n_queries=N_QUERIES, seed=7, split="train")


# --- a second, independent route to the scene: colour segmentation of the rendered pixels ---

import numpy as np  # noqa: E402

from crossrank.datasets import PALETTE  # noqa: E402


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask, as (k, 2) arrays of (y, x)."""
    seen = np.zeros_like(mask)
    out = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, pts = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pts.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        out.append(np.array(pts))
    return out


def _classify_shape(crop: np.ndarray) -> str:
    """Shape from a component's mask cropped to its bounding box (pixel statistics only)."""
    h = crop.shape[0]
    fill, top, bottom, quarter = crop.mean(), crop[0].mean(), crop[-1].mean(), crop[h // 4].mean()
    if fill > 0.95:
        return "square"
    if bottom > 0.8 and top < 0.4:
        return "triangle"
    if top < 0.2:  # a diamond's top row is one pixel, a cross's is an arm's width
        return "diamond"
    if quarter > 0.7:
        return "circle"
    return "cross"


def segment_image(pixels: np.ndarray) -> list[dict]:
    """Objects found in an (S, S, 3) uint8 image by exact palette colours.

    Returns dicts with colour, shape, size, row, col, bbox (inclusive), derived from pixels only:
    row/col from the bbox centre on the documented grid (cell k spans [k*S//3, (k+1)*S//3)),
    size from the bbox width against 0.6 of a cell.
    """
    size = pixels.shape[0]
    edges = [k * size // 3 for k in range(4)]
    objs = []
    for colour, rgb in PALETTE.items():
        mask = np.all(pixels == np.array(rgb, dtype=np.uint8), axis=-1)
        for pts in _components(mask):
            y0, x0 = pts.min(axis=0)
            y1, x1 = pts.max(axis=0)
            crop = mask[y0 : y1 + 1, x0 : x1 + 1]
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            objs.append(
                {
                    "colour": colour.value,
                    "shape": _classify_shape(crop),
                    "size": "large" if (x1 - x0 + 1) > 0.6 * size / 3 else "small",
                    "row": sum(cy >= e for e in edges[1:3]),
                    "col": sum(cx >= e for e in edges[1:3]),
                    "bbox": [int(x0), int(y0), int(x1), int(y1)],
                }
            )
    return sorted(objs, key=lambda o: (o["row"], o["col"]))


@pytest.fixture(scope="session")
def segment():
    return segment_image
