from __future__ import annotations

import itertools

import pytest

from crossrank.datasets import (
    Colour,
    ObjectSpec,
    QueryKind,
    QuerySpec,
    Relation,
    Scene,
    SceneObject,
    Shape,
    Size,
    parse_query,
    satisfies,
)
from crossrank.errors import InvalidArgumentError

SIZES = [None, *Size]


def _all_object_specs():
    return [ObjectSpec(c, s, z) for c in Colour for s in Shape for z in SIZES]


def test_parse_query_round_trips_every_single_template():
    specs = [QuerySpec(QueryKind.SINGLE, o) for o in _all_object_specs()]
    assert len({s.text for s in specs}) == len(specs) == 90
    for spec in specs:
        assert parse_query(spec.text) == spec


def test_parse_query_round_trips_every_two_object_template():
    objs = _all_object_specs()
    # every object spec in each slot, each pair / relation template
    for a, b in itertools.chain(
        zip(objs, objs[::-1], strict=True), zip(objs, objs[1:] + objs[:1], strict=True)
    ):
        for spec in [QuerySpec(QueryKind.PAIR, a, b)] + [
            QuerySpec(QueryKind.RELATION, a, b, r) for r in Relation
        ]:
            assert parse_query(spec.text) == spec


def test_text_uses_the_right_article_and_parse_normalises_case_and_spaces():
    spec = parse_query("  An  ORANGE circle   left of a Large blue square.")
    assert spec.text == "an orange circle left of a large blue square"
    assert spec == QuerySpec(
        QueryKind.RELATION,
        ObjectSpec(Colour.ORANGE, Shape.CIRCLE),
        ObjectSpec(Colour.BLUE, Shape.SQUARE, Size.LARGE),
        Relation.LEFT_OF,
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a pink circle",
        "a red hexagon",
        "red circle",
        "a red circle near a blue square",
        "a red circle and",
        "a huge red circle",
        "a red circle and a blue square and a red cross",
    ],
)
def test_parse_query_rejects_unknown_text(text):
    with pytest.raises(InvalidArgumentError, match="does not follow a shapes template"):
        parse_query(text)


def test_query_spec_rejects_fields_that_do_not_fit_the_kind():
    a = ObjectSpec(Colour.RED, Shape.CIRCLE)
    with pytest.raises(InvalidArgumentError, match="a single query needs b=None"):
        QuerySpec(QueryKind.SINGLE, a, a)
    with pytest.raises(InvalidArgumentError, match="a relation query needs b=set and relation=set"):
        QuerySpec(QueryKind.RELATION, a, a)


def _obj(colour, shape, size, row, col):
    return SceneObject(Colour(colour), Shape(shape), Size(size), row, col, 0, 0, 1)


def test_satisfies_on_a_hand_made_scene():
    # red circle top-left, blue square bottom-right (both small), red square top-right (large)
    scene = Scene(
        (
            _obj("red", "circle", "small", 0, 0),
            _obj("red", "square", "large", 0, 2),
            _obj("blue", "square", "small", 2, 2),
        )
    )
    truth = {
        "a red circle": True,
        "a small red circle": True,
        "a large red circle": False,
        "a blue circle": False,
        "a red square and a blue square": True,
        "a blue circle and a red square": False,  # binding: colours swapped
        "a red circle and a red circle": False,  # needs two distinct objects
        "a red circle left of a blue square": True,
        "a red circle above a blue square": True,
        "a blue square right of a red circle": True,
        "a blue square left of a red circle": False,
        "a red square left of a blue square": False,  # same column
        "a red square above a blue square": True,
        "a large red square above a small blue square": True,
        "a small red square above a blue square": False,
        "a blue square below a red square": True,
        "a red circle below a red square": False,  # same row
    }
    assert {t: satisfies(scene, t) for t in truth} == truth
    assert satisfies(scene, parse_query("a red circle")) is True
