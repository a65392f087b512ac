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
    >>> query = parse_query("a red circle left of a blue square")
    >>> structural, attribute = caption_perturbations(query)
    >>> for s in structural[:3]:
    ...     print(s.text)
    a blue circle left of a red square
    a red square left of a blue circle
    a blue square left of a red circle
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np

from crossrank.datasets.config import Colour, QueryKind, Relation, Shape
from crossrank.datasets.language import ObjectSpec, QuerySpec, parse_query  # noqa: F401 (doctest)

__all__ = ["CaptionNegativeBank", "caption_perturbations", "perturbation_rows"]


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

    def make(
        x: ObjectSpec, y: ObjectSpec | None, relation: Relation | None = spec.relation
    ) -> QuerySpec:
        return QuerySpec(spec.kind, x, y, relation)

    if b is not None:
        add(
            structural,
            make(ObjectSpec(b.colour, a.shape, a.size), ObjectSpec(a.colour, b.shape, b.size)),
        )
        if spec.kind is QueryKind.RELATION:
            # Swapping the shapes of a pair says what swapping its colours says ("A and B" is
            # "B and A"); around a relation the two differ, as does swapping the objects.
            add(
                structural,
                make(ObjectSpec(a.colour, b.shape, a.size), ObjectSpec(b.colour, a.shape, b.size)),
            )
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


def perturbation_rows(
    captions: list[str], specs: list[QuerySpec]
) -> tuple[list[np.ndarray], np.ndarray, list[QuerySpec]]:
    """Each caption's near misses (:func:`caption_perturbations`), as rows of
    the caption bank: ``(rows per caption, structural count per caption, new specs)``.

    A rewrite never names a colour-shape pair absent from the captions (held-out compositions
    stay unseen). Rewrites that are themselves captions reuse their row; the others are appended
    after the U captions, in order of first appearance.
    """
    allowed = {(o.colour, o.shape) for spec in specs for o in (spec.a, spec.b) if o is not None}
    row_of_text = {text: i for i, text in enumerate(captions)}
    extra: list[QuerySpec] = []
    rows: list[np.ndarray] = []
    n_structural = np.zeros(len(captions), dtype=np.int64)
    for u, spec in enumerate(specs):
        structural, attribute = caption_perturbations(spec, allowed)
        n_structural[u] = len(structural)
        out = []
        for rewritten in structural + attribute:
            text = rewritten.text
            row = row_of_text.get(text)
            if row is None:
                row = row_of_text[text] = len(captions) + len(extra)
                extra.append(rewritten)
            out.append(row)
        rows.append(np.array(out, dtype=np.int64))
    return rows, n_structural, extra


@dataclass
class CaptionNegativeBank:
    """The rewritten captions of each caption, and what decides which are false of an image.

    Attributes:
        offsets: per caption ``u``, int64 rows of the caption bank (``TrainingSet.tokens``): its
            structural rewrites first (``n_structural[u]`` of them), then the attribute ones.
        n_structural: int64 ``(U,)``.
        specs: the parsed specs of every bank row (captions and rewrites).
        scenes: the scene graph of every local image.
    """

    offsets: list[np.ndarray]
    n_structural: np.ndarray
    specs: Any  # SpecArrays
    scenes: Any  # SceneArrays

    def sample(
        self, caption: np.ndarray, image: np.ndarray, n: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each (caption, image), the caption and ``n`` rewrites false of the image.

        Half the rewrites (rounded up) are structural where the caption has enough false ones
        (swapped bindings, swapped objects, another relation), the rest attribute changes; each
        group tops up the other.

        Returns:
            ``(rows, valid)``: int64 ``(B, 1 + n)`` bank rows, the caption in column 0, and bool
            ``(B, 1 + n)``; False marks a slot left empty because the caption has too few false
            rewrites for this image (its row repeats the caption and must be masked out).
        """
        from crossrank.datasets.relevance import match_aligned

        options_of = [self.offsets[u] for u in caption.tolist()]
        counts = np.array([o.size for o in options_of], dtype=np.int64)
        flat = np.concatenate([np.zeros(0, dtype=np.int64), *options_of])  # every row's options
        owner = np.repeat(np.arange(caption.size), counts)
        false = ~match_aligned(self.specs.take(flat), self.scenes.take(image[owner]))
        rows = np.repeat(caption[:, None], 1 + n, axis=1).astype(np.int64)
        valid = np.zeros((caption.size, 1 + n), dtype=bool)
        valid[:, 0] = True
        start = 0
        for b, (u, count) in enumerate(zip(caption.tolist(), counts.tolist(), strict=True)):
            options, ok = flat[start : start + count], false[start : start + count]
            start += count
            k = int(self.n_structural[u])
            structural = rng.permutation(options[:k][ok[:k]])
            attribute = rng.permutation(options[k:][ok[k:]])
            n_s = min(structural.size, max(n - attribute.size, (n + 1) // 2))
            chosen = np.concatenate([structural[:n_s], attribute[: n - n_s]])
            rows[b, 1 : 1 + chosen.size] = chosen
            valid[b, 1 : 1 + chosen.size] = True
        return rows, valid

    def relation_only(self, specs: list[QuerySpec]) -> CaptionNegativeBank:
        """This bank cut to each relation caption's rewrites that keep both of its objects:
        another relation, or the objects swapped around it. Every other caption has none.

        Ranked against these alone, a relation caption carries no signal but the relation (a
        blind scorer gets about 1/4): the rewrites the full bank mixes in (colours, shapes) are
        learnt first and dilute it.

        Args:
            specs: the :class:`~crossrank.datasets.QuerySpec` of every bank row (captions, then
                rewrites), in row order.

        Returns:
            A bank with the same specs and scenes; ``n_structural[u]`` is the number of rows kept
            for caption ``u`` (all of its rows), 0 for a caption without a relation.
        """
        offsets = []
        for u, rows in enumerate(self.offsets):
            spec = specs[u]
            keep: list[int] = []
            if spec.relation is not None:
                objects = {spec.a, spec.b}
                keep = [
                    r
                    for r in rows[: int(self.n_structural[u])].tolist()
                    if {specs[r].a, specs[r].b} == objects
                ]
            offsets.append(np.array(keep, dtype=np.int64))
        counts = np.array([o.size for o in offsets], dtype=np.int64)
        return CaptionNegativeBank(
            offsets=offsets, n_structural=counts, specs=self.specs, scenes=self.scenes
        )
