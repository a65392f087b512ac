"""Hard negative captions built from a caption's structure (NegCLIP / ARO-style perturbations).

A pooled dual encoder confuses "a red circle left of a blue square" with "a blue circle left of
a red square". The reranker learns to tell them apart only if training shows it such pairs, so
:func:`caption_perturbations` rewrites a caption into near misses:

- **structural** (binding and order; the hard ones): swap the two objects' colours, swap their
  shapes, swap the objects around a relation, replace the relation;
- **attribute**: recolour or reshape one object.

Whether a perturbation is actually false of an image is decided on the image's scene graph
(:func:`~crossrank.datasets.relevance.match_aligned`), never assumed: "a red circle and a blue
square" swapped is still true of a scene holding all four objects.

Example:
    >>> structural, attribute = caption_perturbations(parse_query("a red circle left of a blue square"))
    >>> [s.text for s in structural[:3]]
    ['a blue circle left of a red square', 'a red square left of a blue circle', 'a blue square left of a red circle']
"""

from __future__ import annotations

from collections.abc import Collection

from crossrank.datasets.config import Colour, QueryKind, Relation, Shape
from crossrank.datasets.language import ObjectSpec, QuerySpec, parse_query  # noqa: F401 (doctest)

__all__ = ["caption_perturbations"]


def caption_perturbations(
    spec: QuerySpec, allowed: Collection[tuple[Colour, Shape]] | None = None
) -> tuple[list[QuerySpec], list[QuerySpec]]:
    """The near misses of ``spec``: ``(structural, attribute)``, distinct, none equal to ``spec``.

    Args:
        spec: the caption's spec.
        allowed: the colour-shape pairs a perturbation may name (e.g. those the training captions
            show, so that negatives never introduce a held-out composition); None = any.

    Returns:
        Two lists in a fixed order (deterministic): structural perturbations (only for two-object
        captions) and attribute perturbations (recolour or reshape one object). Some may still
        be true of a given image; check them on its scene.
    """
    seen: set[str] = {spec.text}
    structural: list[QuerySpec] = []
    attribute: list[QuerySpec] = []

    def ok(o: ObjectSpec) -> bool:
        return allowed is None or (o.colour, o.shape) in allowed

    def add(out: list[QuerySpec], candidate: QuerySpec) -> None:
        if candidate.text in seen or not ok(candidate.a):
            return
        if candidate.b is not None and not ok(candidate.b):
            return
        seen.add(candidate.text)
        out.append(candidate)

    a, b = spec.a, spec.b

    def make(x: ObjectSpec, y: ObjectSpec | None,
             relation: Relation | None = spec.relation) -> QuerySpec:
        return QuerySpec(spec.kind, x, y, relation)

    if b is not None:
        add(structural, make(ObjectSpec(b.colour, a.shape, a.size),
                             ObjectSpec(a.colour, b.shape, b.size)))
        if spec.kind is QueryKind.RELATION:
            # Swapping the shapes of a pair says what swapping its colours says ("A and B" is
            # "B and A"); around a relation the two differ, as does swapping the objects.
            add(structural, make(ObjectSpec(a.colour, b.shape, a.size),
                                 ObjectSpec(b.colour, a.shape, b.size)))
            add(structural, make(b, a))  # "B left of A"
            for relation in Relation:
                if relation is not spec.relation:
                    add(structural, make(a, b, relation))
    objects = [("a", a)] + ([("b", b)] if b is not None else [])
    for which, o in objects:
        changed = [ObjectSpec(c, o.shape, o.size) for c in Colour if c is not o.colour]
        changed += [ObjectSpec(o.colour, s, o.size) for s in Shape if s is not o.shape]
        for new in changed:
            add(attribute, make(new, b) if which == "a" else make(a, new))
    return structural, attribute
