"""Draws a scene into an RGB image, deterministically.

The background is a light grey with a random tint, a linear gradient and per-pixel noise, every
channel kept in ``[150, 255]``. Objects are filled with their exact :data:`PALETTE` colour, without
antialiasing, so every object pixel is exactly a palette value and no background pixel ever is
(each palette colour has a channel <= 60).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from crossrank.datasets.config import PALETTE, Shape
from crossrank.datasets.scene import Scene, SceneObject

__all__ = ["render_scene", "BACKGROUND_MIN"]

BACKGROUND_MIN = 150  # lowest value of any background channel


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    base = int(rng.integers(185, 236))
    tint = rng.integers(-8, 9, size=3)
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    amplitude = float(rng.uniform(0.0, 12.0))
    t = np.linspace(-1.0, 1.0, size)
    ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]  # (size, size)
    noise = rng.integers(-5, 6, size=(size, size, 3))
    img = base + tint[None, None, :] + np.rint(amplitude * ramp)[:, :, None] + noise
    return np.clip(img, BACKGROUND_MIN, 255).astype(np.uint8)  # (size, size, 3)


def _draw(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    fill = PALETTE[obj.colour]
    x0, y0, x1, y1 = obj.bbox
    cx, cy, r = obj.cx, obj.cy, obj.r
    if obj.shape is Shape.CIRCLE:
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape is Shape.SQUARE:
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape is Shape.TRIANGLE:
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif obj.shape is Shape.DIAMOND:
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif obj.shape is Shape.CROSS:
        t = max(1, int(round(0.4 * r)))  # half-thickness of the arms
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
    else:  # pragma: no cover - Shape is closed
        raise AssertionError(obj.shape)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Renders ``scene``.

    Args:
        scene: the objects to draw.
        image_size: px (square).
        rng: draws the background (the same generator state gives the same pixels).

    Returns:
        An RGB PIL image of ``(image_size, image_size)``.
    """
    img = Image.fromarray(_background(rng, image_size))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw(draw, obj)
    return img
