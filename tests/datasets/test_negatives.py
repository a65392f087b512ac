from __future__ import annotations

import numpy as np

from crossrank.datasets import (
    HELDOUT_PAIRS,
    Colour,
    QueryKind,
    Shape,
    caption_perturbations,
    parse_query,
    satisfies,
)
from crossrank.datasets.sampling import sample_spec
from crossrank.datasets.scene import sample_scene


def test_structural_negatives_swap_bindings_and_relations():
    structural, attribute = caption_perturbations(parse_query("a red circle left of a blue square"))
    texts = [s.text for s in structural]
    assert texts[:3] == [
        "a blue circle left of a red square",
        "a red square left of a blue circle",
        "a blue square left of a red circle",
    ]
    assert set(texts[3:]) == {
        "a red circle right of a blue square",
        "a red circle above a blue square",
        "a red circle below a blue square",
    }
    assert "a green circle left of a blue square" in [s.text for s in attribute]
    assert "a red circle left of a blue cross" in [s.text for s in attribute]


def test_a_pair_has_one_swap_because_it_is_symmetric():
    structural, _ = caption_perturbations(parse_query("a red circle and a blue square"))
    assert [s.text for s in structural] == ["a blue circle and a red square"]


def test_a_single_object_has_only_attribute_negatives_and_sizes_are_kept():
    structural, attribute = caption_perturbations(parse_query("a large red circle"))
    assert structural == []
    assert len(attribute) == 5 + 4  # the other colours, the other shapes
    assert all(s.a.size is not None and s.a.size.value == "large" for s in attribute)


def test_perturbations_are_distinct_and_never_the_caption_nor_a_disallowed_pair():
    rng = np.random.default_rng(0)
    allowed = {(c, s) for c in Colour for s in Shape} - HELDOUT_PAIRS
    n_checked = n_false = 0
    for _ in range(200):
        scene = sample_scene(rng, 64, include_heldout=False)
        spec = sample_spec(scene, list(QueryKind)[rng.integers(3)], rng, size_word_prob=0.5)
        if spec is None:
            continue
        structural, attribute = caption_perturbations(spec, allowed)
        texts = [s.text for s in structural + attribute]
        assert len(set(texts)) == len(texts) and spec.text not in texts
        for s in structural + attribute:
            assert not s.heldout  # never a held-out composition when it is not allowed
            assert parse_query(s.text) == s
            n_checked += 1
            n_false += not satisfies(scene, s)
    # Most near misses are false of the caption's own image, but not all: that is checked per image.
    assert n_checked > 1000 and 0.7 < n_false / n_checked < 1.0
