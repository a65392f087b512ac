"""Query and caption templates of the shapes world: specs, their text, parsing and truth.

Templates (the article is "an" before a vowel, "a" otherwise)::

    object    := "a" [size] colour shape          e.g. "a red circle", "a large red circle"
    single    := object                           "a red circle"
    pair      := object "and" object              "a red circle and a blue square"
    relation  := object rel object                "a red circle left of a blue square"
    rel       := "left of" | "right of" | "above" | "below"

Truth (:func:`satisfies`): an object spec matches an object with the same colour and shape, and
the same size when the spec names one. A single query holds if some object matches; a pair query
if two *distinct* objects match ``a`` and ``b``; a relation query if two distinct objects match
``a`` and ``b`` and stand in the relation (see :class:`~crossrank.datasets.config.Relation`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from crossrank.datasets.config import HELDOUT_PAIRS, Colour, QueryKind, Relation, Shape, Size
from crossrank.datasets.scene import Scene, SceneObject
from crossrank.errors import InvalidArgumentError

__all__ = ["ObjectSpec", "QuerySpec", "parse_query", "satisfies", "relation_holds"]


@dataclass(frozen=True)
class ObjectSpec:
    """An object description: colour and shape, and optionally its size."""

    colour: Colour
    shape: Shape
    size: Size | None = None  # None = any size

    def __post_init__(self) -> None:
        object.__setattr__(self, "colour", Colour(self.colour))
        object.__setattr__(self, "shape", Shape(self.shape))
        if self.size is not None:
            object.__setattr__(self, "size", Size(self.size))

    @property
    def text(self) -> str:
        """``"a red circle"`` / ``"a large red circle"`` / ``"an orange square"``."""
        words = ([self.size.value] if self.size is not None else []) + [
            self.colour.value,
            self.shape.value,
        ]
        article = "an" if words[0][0] in "aeiou" else "a"
        return " ".join([article, *words])

    @property
    def heldout(self) -> bool:
        """Whether the colour-shape pair is one of :data:`HELDOUT_PAIRS`."""
        return (self.colour, self.shape) in HELDOUT_PAIRS

    def matches(self, obj: SceneObject) -> bool:
        """Whether ``obj`` fits this description."""
        return (
            obj.colour == self.colour
            and obj.shape == self.shape
            and (self.size is None or obj.size == self.size)
        )


@dataclass(frozen=True)
class QuerySpec:
    """A structured query: ``kind`` with one object (single) or two (pair, relation).

    Raises:
        InvalidArgumentError: when the fields do not fit the kind.
    """

    kind: QueryKind
    a: ObjectSpec
    b: ObjectSpec | None = None  # pair and relation only
    relation: Relation | None = None  # relation only

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", QueryKind(self.kind))
        if self.relation is not None:
            object.__setattr__(self, "relation", Relation(self.relation))
        needs_b = self.kind is not QueryKind.SINGLE
        needs_rel = self.kind is QueryKind.RELATION
        if (self.b is not None) != needs_b or (self.relation is not None) != needs_rel:
            raise InvalidArgumentError(
                f"a {self.kind.value} query needs b={'set' if needs_b else 'None'} and "
                f"relation={'set' if needs_rel else 'None'}, got b={self.b!r}, "
                f"relation={self.relation!r}"
            )

    @property
    def text(self) -> str:
        """The template text; :func:`parse_query` inverts it."""
        if self.kind is QueryKind.SINGLE:
            return self.a.text
        assert self.b is not None
        if self.kind is QueryKind.PAIR:
            return f"{self.a.text} and {self.b.text}"
        assert self.relation is not None
        return f"{self.a.text} {self.relation.value} {self.b.text}"

    @property
    def heldout(self) -> bool:
        """Whether the query mentions a held-out colour-shape pair."""
        return self.a.heldout or (self.b is not None and self.b.heldout)

    def to_dict(self) -> dict:
        """A JSON-able dict (the ``spec`` column of ``pairs.parquet``)."""

        def obj(o: ObjectSpec | None) -> dict | None:
            if o is None:
                return None
            return {
                "colour": o.colour.value,
                "shape": o.shape.value,
                "size": None if o.size is None else o.size.value,
            }

        return {
            "kind": self.kind.value,
            "a": obj(self.a),
            "b": obj(self.b),
            "relation": None if self.relation is None else self.relation.value,
        }

    @classmethod
    def from_dict(cls, d: dict) -> QuerySpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            kind=QueryKind(d["kind"]),
            a=ObjectSpec(**d["a"]),
            b=None if d.get("b") is None else ObjectSpec(**d["b"]),
            relation=None if d.get("relation") is None else Relation(d["relation"]),
        )


_SIZES = "|".join(s.value for s in Size)
_COLOURS = "|".join(c.value for c in Colour)
_SHAPES = "|".join(s.value for s in Shape)
_RELS = "|".join(r.value for r in Relation)
_OBJ = rf"an? (?:({_SIZES}) )?({_COLOURS}) ({_SHAPES})"
_QUERY_RE = re.compile(rf"^{_OBJ}(?: (?:(and)|({_RELS})) {_OBJ})?$")


def parse_query(text: str) -> QuerySpec:
    """Parses a template text back into its spec (case and extra spaces are ignored).

    Args:
        text: e.g. ``"a large red circle left of a blue square"``.

    Returns:
        The :class:`QuerySpec`; ``parse_query(spec.text) == spec`` for every spec.

    Raises:
        InvalidArgumentError: when the text does not follow a template.

    Example:
        >>> parse_query("a red circle and a blue square").kind
        <QueryKind.PAIR: 'pair'>
    """
    norm = " ".join(str(text).lower().split()).rstrip(".")
    m = _QUERY_RE.match(norm)
    if m is None:
        raise InvalidArgumentError(
            f"query {text!r} does not follow a shapes template: 'a [size] COLOUR SHAPE' "
            f"optionally followed by 'and' or one of ({_RELS}) and a second object; "
            f"colours: {_COLOURS}; shapes: {_SHAPES}; sizes: {_SIZES}"
        )
    size_a, colour_a, shape_a, and_, rel, size_b, colour_b, shape_b = m.groups()
    a = ObjectSpec(Colour(colour_a), Shape(shape_a), None if size_a is None else Size(size_a))
    if colour_b is None:
        return QuerySpec(QueryKind.SINGLE, a)
    b = ObjectSpec(Colour(colour_b), Shape(shape_b), None if size_b is None else Size(size_b))
    if and_ is not None:
        return QuerySpec(QueryKind.PAIR, a, b)
    return QuerySpec(QueryKind.RELATION, a, b, Relation(rel))


def relation_holds(x: SceneObject, y: SceneObject, relation: Relation) -> bool:
    """Whether ``x`` stands in ``relation`` to ``y`` (decided by grid cells)."""
    if relation is Relation.LEFT_OF:
        return x.col < y.col
    if relation is Relation.RIGHT_OF:
        return x.col > y.col
    if relation is Relation.ABOVE:
        return x.row < y.row
    return x.row > y.row


def satisfies(scene: Scene, spec: QuerySpec | str) -> bool:
    """Whether ``scene`` satisfies ``spec`` (the definition of relevance).

    Args:
        scene: an image's scene graph.
        spec: a :class:`QuerySpec` or a template text.

    Returns:
        True iff the image is relevant to the query.
    """
    if isinstance(spec, str):
        spec = parse_query(spec)
    objs = scene.objects
    if spec.kind is QueryKind.SINGLE:
        return any(spec.a.matches(o) for o in objs)
    assert spec.b is not None
    for i, x in enumerate(objs):
        if not spec.a.matches(x):
            continue
        for j, y in enumerate(objs):
            if i == j or not spec.b.matches(y):
                continue
            if spec.kind is QueryKind.PAIR or relation_holds(x, y, spec.relation):
                return True
    return False
