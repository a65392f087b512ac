from __future__ import annotations

import numpy as np
import pytest

from crossrank.datasets import PALETTE, Colour, Scene, SceneObject, Shape, Size
from crossrank.datasets.render import BACKGROUND_MIN, render_scene
from crossrank.datasets.scene import geometry, sample_scene


@pytest.mark.parametrize("image_size", [64, 80, 96])
def test_every_shape_and_size_is_recovered_from_pixels(image_size, segment):
    geo = geometry(image_size)
    for shape in Shape:
        for size in Size:
            objs = []
            for k, colour in enumerate(Colour):  # the same shape in 6 colours, different cells
                row, col = divmod(k, 3)
                x_lo, x_hi = geo.centre_range(col, size)
                y_lo, y_hi = geo.centre_range(row, size)
                cx = x_lo if k % 2 else x_hi  # both extremes of the jitter range
                cy = y_hi if k % 2 else y_lo
                objs.append(SceneObject(colour, shape, size, row, col, cx, cy, geo.half_size[size]))
            scene = Scene(tuple(objs))
            pixels = np.asarray(render_scene(scene, image_size, np.random.default_rng(0)))
            want = sorted(
                (
                    {k: v for k, v in o.to_dict().items() if k not in ("cx", "cy")}
                    for o in scene.objects
                ),
                key=lambda o: (o["row"], o["col"]),
            )
            assert segment(pixels) == want, (shape, size)


def test_background_never_uses_an_object_colour():
    rng = np.random.default_rng(5)
    palette = np.array(list(PALETTE.values()), dtype=np.uint8)  # (6, 3)
    for _ in range(20):
        scene = sample_scene(rng, 64, include_heldout=True)
        pixels = np.asarray(render_scene(scene, 64, rng))
        assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
        is_object = (pixels[:, :, None, :] == palette).all(-1).any(-1)  # (64, 64)
        inside = np.zeros((64, 64), dtype=bool)
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
        assert not (is_object & ~inside).any()  # object colours only inside bounding boxes
        assert (pixels[~is_object] >= BACKGROUND_MIN).all()
        # and the background varies (noise), it is not a flat colour
        assert pixels[~is_object].std() > 1.0


def test_same_rng_state_gives_identical_pixels():
    scene = sample_scene(np.random.default_rng(9), 64, include_heldout=True)
    a = np.asarray(render_scene(scene, 64, np.random.default_rng(1)))
    b = np.asarray(render_scene(scene, 64, np.random.default_rng(1)))
    c = np.asarray(render_scene(scene, 64, np.random.default_rng(2)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
