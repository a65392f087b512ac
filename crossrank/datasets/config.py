"""The vocabulary and settings of the synthetic "shapes" benchmark.

The world is small and closed: 6 named colours, 5 shapes, 2 sizes, a 3 x 3 grid of cells, and four
spatial relations. A fixed set of colour-shape pairs (:data:`HELDOUT_PAIRS`) never appears in the
train split, neither in its images nor in its captions; the test split contains them, so a model's
systematic generalisation can be measured on queries that mention them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from crossrank.errors import InvalidArgumentError

__all__ = [
    "Colour",
    "Shape",
    "Size",
    "Relation",
    "QueryKind",
    "Split",
    "PALETTE",
    "HELDOUT_PAIRS",
    "GRID",
    "MIN_IMAGE_SIZE",
    "MAX_IMAGE_SIZE",
    "ShapesConfig",
]


class Colour(StrEnum):
    """Object colours; each is drawn as exactly one RGB value (see :data:`PALETTE`)."""

    RED = "red"
    GREEN = "green"
    BLUE = "blue"
    YELLOW = "yellow"
    PURPLE = "purple"
    ORANGE = "orange"


class Shape(StrEnum):
    """Object shapes; every shape is inscribed in its square bounding box and centred on it."""

    CIRCLE = "circle"
    SQUARE = "square"
    TRIANGLE = "triangle"
    DIAMOND = "diamond"
    CROSS = "cross"


class Size(StrEnum):
    """Object sizes (half-sizes are fractions of a grid cell, see ``scene.py``)."""

    SMALL = "small"
    LARGE = "large"


class Relation(StrEnum):
    """Spatial relations between two objects, decided by their grid cells.

    ``A left of B`` iff ``A.col < B.col``; ``right of`` iff ``A.col > B.col``; ``above`` iff
    ``A.row < B.row``; ``below`` iff ``A.row > B.row`` (row 0 is the top). Objects in different
    columns are also separated horizontally by a gap of at least 2 px, and objects in the same
    column always overlap horizontally, so the relation is what the eye sees (same for rows).
    """

    LEFT_OF = "left of"
    RIGHT_OF = "right of"
    ABOVE = "above"
    BELOW = "below"


class QueryKind(StrEnum):
    """Query / caption templates."""

    SINGLE = "single"  # "a red circle", "a large red circle"
    PAIR = "pair"  # "a red circle and a blue square"
    RELATION = "relation"  # "a red circle left of a blue square"


class Split(StrEnum):
    """Which corpus a seed generates; the two use disjoint random streams."""

    TEST = "test"
    TRAIN = "train"


# Every colour has a channel <= 60 while every background pixel has all channels >= 150, so a
# pixel is an object pixel iff it equals one of these values exactly (no antialiasing is used).
PALETTE: dict[Colour, tuple[int, int, int]] = {
    Colour.RED: (220, 30, 30),
    Colour.GREEN: (30, 160, 50),
    Colour.BLUE: (30, 70, 220),
    Colour.YELLOW: (235, 200, 20),
    Colour.PURPLE: (140, 50, 180),
    Colour.ORANGE: (245, 125, 15),
}

# Fixed (not seed-dependent): 4 of the 30 colour-shape pairs, covering 4 different colours and 4
# different shapes so that every colour and every shape is still seen in training.
HELDOUT_PAIRS: frozenset[tuple[Colour, Shape]] = frozenset(
    {
        (Colour.RED, Shape.DIAMOND),
        (Colour.GREEN, Shape.CIRCLE),
        (Colour.BLUE, Shape.TRIANGLE),
        (Colour.YELLOW, Shape.SQUARE),
    }
)

GRID = 3  # the scene is a GRID x GRID array of cells; at most one object per cell
MIN_IMAGE_SIZE = 64  # px
MAX_IMAGE_SIZE = 96  # px


@dataclass(frozen=True)
class ShapesConfig:
    """Settings of one generated corpus.

    Raises:
        InvalidArgumentError: (a ``ValueError``) when a field is out of range.
    """

    n_images: int  # images in the corpus, >= 1
    n_queries: int  # evaluation queries, >= 0 (about 1/3 of each kind)
    seed: int = 0  # the same seed and split give byte-identical files
    split: Split = Split.TEST  # test: all pairs; train: no held-out pairs, another random stream
    image_size: int = 64  # px, square, in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]
    captions_per_image: int = 6  # true captions per image in pairs.parquet (fewer if fewer exist)
    heldout_query_fraction: float = 0.3  # test split: share of each kind naming a held-out pair
    size_word_prob: float = 0.25  # probability that a query / caption names an object's size

    def __post_init__(self) -> None:
        object.__setattr__(self, "split", _as_split(self.split))
        if not _is_int(self.n_images) or self.n_images < 1:
            raise InvalidArgumentError(f"n_images must be an integer >= 1, got {self.n_images!r}")
        if not _is_int(self.n_queries) or self.n_queries < 0:
            raise InvalidArgumentError(f"n_queries must be an integer >= 0, got {self.n_queries!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise InvalidArgumentError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not _is_int(self.image_size) or not (
            MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE
        ):
            raise InvalidArgumentError(
                f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] px, "
                f"got {self.image_size!r}"
            )
        if self.captions_per_image < 1:
            raise InvalidArgumentError(
                f"captions_per_image must be >= 1, got {self.captions_per_image!r}"
            )
        if not 0.0 <= self.heldout_query_fraction <= 1.0:
            raise InvalidArgumentError(
                f"heldout_query_fraction must be in [0, 1], got {self.heldout_query_fraction!r}"
            )
        if not 0.0 <= self.size_word_prob <= 1.0:
            raise InvalidArgumentError(
                f"size_word_prob must be in [0, 1], got {self.size_word_prob!r}"
            )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _as_split(split: object) -> Split:
    try:
        return Split(split)
    except ValueError:
        raise InvalidArgumentError(
            f"split must be one of {[s.value for s in Split]}, got {split!r}"
        ) from None
