from __future__ import annotations

import pytest

from crossrank.datasets import HELDOUT_PAIRS, PALETTE, Colour, Shape, ShapesConfig, Split
from crossrank.datasets.render import BACKGROUND_MIN
from crossrank.errors import InvalidArgumentError


def test_defaults_are_valid_and_split_is_coerced():
    cfg = ShapesConfig(n_images=1, n_queries=0, split="train")
    assert cfg.split is Split.TRAIN
    assert cfg.image_size == 64


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_images": 0}, "n_images must be an integer >= 1"),
        ({"n_images": 2.5}, "n_images must be an integer >= 1"),
        ({"n_queries": -1}, "n_queries must be an integer >= 0"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"image_size": 63}, r"image_size must be an integer in \[64, 96\]"),
        ({"image_size": 97}, r"image_size must be an integer in \[64, 96\]"),
        ({"split": "val"}, "split must be one of"),
        ({"captions_per_image": 0}, "captions_per_image must be >= 1"),
        ({"heldout_query_fraction": 1.5}, r"heldout_query_fraction must be in \[0, 1\]"),
        ({"size_word_prob": -0.1}, r"size_word_prob must be in \[0, 1\]"),
    ],
)
def test_bad_config_raises(kwargs, match):
    base = {"n_images": 10, "n_queries": 3}
    with pytest.raises(InvalidArgumentError, match=match):
        ShapesConfig(**{**base, **kwargs})


def test_vocabulary_is_large_enough_and_colours_are_distinct():
    assert len(Colour) >= 6 and len(Shape) >= 4
    rgbs = list(PALETTE.values())
    assert len(set(rgbs)) == len(Colour)
    # every object colour is far from the grey background range, so colour never collides
    assert all(min(rgb) <= 60 < BACKGROUND_MIN for rgb in rgbs)


def test_heldout_pairs_are_fixed_and_leave_every_colour_and_shape_in_training():
    assert HELDOUT_PAIRS == frozenset(
        {
            (Colour.RED, Shape.DIAMOND),
            (Colour.GREEN, Shape.CIRCLE),
            (Colour.BLUE, Shape.TRIANGLE),
            (Colour.YELLOW, Shape.SQUARE),
        }
    )
    assert len({c for c, _ in HELDOUT_PAIRS}) == len({s for _, s in HELDOUT_PAIRS}) == 4
