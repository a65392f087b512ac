"""Scene graphs of the shapes world and how they are sampled.

Geometry (image size ``S``, grid ``GRID = 3``): column ``c`` spans pixels
``[c * S // 3, (c + 1) * S // 3)`` (rows alike). An object of half-size ``r`` has the square
bounding box ``[cx - r, cx + r] x [cy - r, cy + r]`` (inclusive pixels) and lies inside its cell
with at least 1 px of margin, so objects never overlap and objects in different columns (rows) are
separated by a gap of at least 2 px. Jitter inside a cell is small enough that two objects in the
same column always overlap horizontally (same for rows): "left of" by column is what the eye sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache

import numpy as np

from crossrank.datasets.config import GRID, HELDOUT_PAIRS, Colour, Shape, Size

__all__ = [
    "SceneObject",
    "Scene",
    "Geometry",
    "geometry",
    "allowed_pairs",
    "sample_scene",
    "N_OBJECTS_PROBS",
]

MAX_OBJECTS = 3
N_OBJECTS_PROBS = (0.2, 0.4, 0.4)  # P(1 object), P(2 objects), P(3 objects)
_HALF_SIZE_FRACTION = {Size.SMALL: 0.24, Size.LARGE: 0.36}  # half-size r as a fraction of a cell
_MARGIN = 1  # px between an object's bounding box and its cell's border


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    ``cx, cy`` is the centre pixel, ``r`` the half-size; the bounding box is inclusive.
    """

    colour: Colour
    shape: Shape
    size: Size
    row: int  # 0 = top
    col: int  # 0 = left
    cx: int  # px
    cy: int  # px
    r: int  # px, half-size

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)``, inclusive pixel coordinates."""
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

    @property
    def heldout(self) -> bool:
        """Whether this object's colour-shape pair is one of :data:`HELDOUT_PAIRS`."""
        return (self.colour, self.shape) in HELDOUT_PAIRS

    def to_dict(self) -> dict:
        """A JSON-able dict (the entries of the ``objects`` metadata column)."""
        return {
            "colour": self.colour.value,
            "shape": self.shape.value,
            "size": self.size.value,
            "row": self.row,
            "col": self.col,
            "cx": self.cx,
            "cy": self.cy,
            "bbox": list(self.bbox),
        }

    @classmethod
    def from_dict(cls, d: dict) -> SceneObject:
        """Inverse of :meth:`to_dict`."""
        x0, _, x1, _ = d["bbox"]
        return cls(
            colour=Colour(d["colour"]),
            shape=Shape(d["shape"]),
            size=Size(d["size"]),
            row=int(d["row"]),
            col=int(d["col"]),
            cx=int(d["cx"]),
            cy=int(d["cy"]),
            r=(int(x1) - int(x0)) // 2,
        )


@dataclass(frozen=True)
class Scene:
    """The scene graph of one image: 1 to 3 objects in distinct cells, sorted by (row, col).

    No two objects of a scene share both colour and shape (two red objects, or two circles, may).
    """

    objects: tuple[SceneObject, ...]

    @property
    def heldout(self) -> bool:
        """Whether any object is a held-out colour-shape pair."""
        return any(o.heldout for o in self.objects)

    def to_json(self) -> str:
        """The ``objects`` metadata column: a JSON list of :meth:`SceneObject.to_dict`."""
        return json.dumps([o.to_dict() for o in self.objects], separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """Inverse of :meth:`to_json`."""
        return cls(tuple(SceneObject.from_dict(d) for d in json.loads(text)))


@dataclass(frozen=True)
class Geometry:
    """Pixel geometry of the grid for one image size."""

    image_size: int
    edges: tuple[int, ...]  # GRID + 1 cell borders, px
    half_size: dict[Size, int]  # px

    def centre_range(self, cell: int, size: Size) -> tuple[int, int]:
        """Inclusive range of a ``size`` object's centre coordinate in column (row) ``cell``."""
        r = self.half_size[size]
        return self.edges[cell] + _MARGIN + r, self.edges[cell + 1] - 1 - _MARGIN - r

    def cell_of(self, coord: float) -> int:
        """Column (row) holding pixel coordinate ``coord``."""
        return int(np.searchsorted(self.edges, coord, side="right")) - 1


@cache
def geometry(image_size: int) -> Geometry:
    """The grid geometry for ``image_size`` px images."""
    edges = tuple((k * image_size) // GRID for k in range(GRID + 1))
    cell = image_size / GRID
    half = {s: int(round(f * cell)) for s, f in _HALF_SIZE_FRACTION.items()}
    return Geometry(image_size=image_size, edges=edges, half_size=half)


@cache
def allowed_pairs(include_heldout: bool) -> tuple[tuple[Colour, Shape], ...]:
    """All colour-shape pairs an image may hold, in a fixed order."""
    return tuple(
        (c, s) for c in Colour for s in Shape if include_heldout or (c, s) not in HELDOUT_PAIRS
    )


def sample_scene(rng: np.random.Generator, image_size: int, include_heldout: bool) -> Scene:
    """Draws a random scene.

    Args:
        rng: the image's own generator (consumed in a fixed order).
        image_size: px.
        include_heldout: False for the train split: no held-out colour-shape pair is drawn.

    Returns:
        A :class:`Scene` with 1 to 3 objects.
    """
    geo = geometry(image_size)
    pairs = allowed_pairs(include_heldout)
    n = int(rng.choice(MAX_OBJECTS, p=N_OBJECTS_PROBS)) + 1
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    kinds = rng.choice(len(pairs), size=n, replace=False)
    sizes = rng.integers(0, len(Size), size=n)
    size_list = list(Size)
    objects = []
    for cell, kind, size_idx in zip(cells.tolist(), kinds.tolist(), sizes.tolist(), strict=True):
        size = size_list[size_idx]
        row, col = divmod(cell, GRID)
        x_lo, x_hi = geo.centre_range(col, size)
        y_lo, y_hi = geo.centre_range(row, size)
        colour, shape = pairs[kind]
        objects.append(
            SceneObject(
                colour=colour,
                shape=shape,
                size=size,
                row=row,
                col=col,
                cx=int(rng.integers(x_lo, x_hi + 1)),
                cy=int(rng.integers(y_lo, y_hi + 1)),
                r=geo.half_size[size],
            )
        )
    objects.sort(key=lambda o: (o.row, o.col))
    return Scene(tuple(objects))
