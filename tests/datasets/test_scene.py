from __future__ import annotations

import itertools

import numpy as np
import pytest

from crossrank.datasets import Size
from crossrank.datasets.config import GRID, HELDOUT_PAIRS, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE
from crossrank.datasets.scene import Scene, allowed_pairs, geometry, sample_scene


@pytest.mark.parametrize("image_size", range(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE + 1))
def test_geometry_makes_relations_visually_unambiguous(image_size):
    geo = geometry(image_size)
    assert geo.edges[0] == 0 and geo.edges[-1] == image_size
    assert geo.half_size[Size.SMALL] < geo.half_size[Size.LARGE]
    for cell in range(GRID):
        for s in Size:
            lo, hi = geo.centre_range(cell, s)
            r = geo.half_size[s]
            assert lo <= hi
            # inside the cell with >= 1 px margin on both sides
            assert lo - r >= geo.edges[cell] + 1 and hi + r <= geo.edges[cell + 1] - 2
    for s1, s2 in itertools.product(Size, repeat=2):
        r1, r2 = geo.half_size[s1], geo.half_size[s2]
        for cell in range(GRID):
            lo1, hi1 = geo.centre_range(cell, s1)
            lo2, hi2 = geo.centre_range(cell, s2)
            # same column: the horizontal extents always overlap
            assert max(hi1 - lo2, hi2 - lo1) <= r1 + r2
            if cell + 1 < GRID:
                # adjacent columns: a gap of >= 2 px between the extents
                lo_next, _ = geo.centre_range(cell + 1, s2)
                assert (lo_next - r2) - (hi1 + r1) - 1 >= 2


def test_sampled_scenes_respect_the_rules():
    rng = np.random.default_rng(3)
    counts = np.zeros(4, dtype=int)
    for _ in range(300):
        scene = sample_scene(rng, 64, include_heldout=True)
        objs = scene.objects
        counts[len(objs)] += 1
        assert 1 <= len(objs) <= 3
        assert len({(o.row, o.col) for o in objs}) == len(objs)  # one object per cell
        assert len({(o.colour, o.shape) for o in objs}) == len(objs)  # no duplicate colour-shape
        assert [(o.row, o.col) for o in objs] == sorted((o.row, o.col) for o in objs)
        for o in objs:
            assert geometry(64).cell_of(o.cx) == o.col and geometry(64).cell_of(o.cy) == o.row
        assert Scene.from_json(scene.to_json()) == scene
    assert counts[1] > 0 and counts[2] > 0 and counts[3] > 0


def test_train_scenes_never_draw_heldout_pairs():
    assert not set(allowed_pairs(False)) & HELDOUT_PAIRS
    assert set(allowed_pairs(True)) >= HELDOUT_PAIRS
    rng = np.random.default_rng(4)
    for _ in range(300):
        assert not sample_scene(rng, 64, include_heldout=False).heldout
