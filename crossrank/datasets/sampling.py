"""Sampling true queries and captions from scenes.

Every spec is drawn from an actual scene (objects of that scene, a relation that holds between
them), so it is true of at least that image by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from crossrank.datasets.config import QueryKind, Relation
from crossrank.datasets.language import ObjectSpec, QuerySpec, relation_holds
from crossrank.datasets.scene import Scene, SceneObject
from crossrank.errors import InvalidArgumentError

__all__ = ["sample_spec", "sample_captions", "sample_queries", "canonical_key"]

logger = logging.getLogger(__name__)

_KIND_ORDER = (QueryKind.SINGLE, QueryKind.PAIR, QueryKind.RELATION)


def _object_spec(o: SceneObject, rng: np.random.Generator, size_word_prob: float) -> ObjectSpec:
    size = o.size if rng.random() < size_word_prob else None
    return ObjectSpec(o.colour, o.shape, size)


def _candidates(scene: Scene, kind: QueryKind, heldout: bool | None) -> list[tuple[int, ...]]:
    objs = scene.objects
    if kind is QueryKind.SINGLE:
        return [(i,) for i, o in enumerate(objs) if heldout is None or o.heldout == heldout]
    return [
        (i, j)
        for i in range(len(objs))
        for j in range(len(objs))
        if i != j and (heldout is None or (objs[i].heldout or objs[j].heldout) == heldout)
    ]


def sample_spec(
    scene: Scene,
    kind: QueryKind,
    rng: np.random.Generator,
    *,
    size_word_prob: float,
    heldout: bool | None = None,
) -> QuerySpec | None:
    """Draws a spec of ``kind`` that ``scene`` satisfies.

    Args:
        scene: the scene the spec is drawn from.
        kind: single, pair or relation.
        rng: the generator to draw from.
        size_word_prob: probability that each object's size is named.
        heldout: True: the spec must mention a held-out pair; False: must not; None: either.

    Returns:
        The spec, or None when the scene has no objects that fit (too few, or held-out wish).
    """
    cands = _candidates(scene, kind, heldout)
    if not cands:
        return None
    pick = cands[int(rng.integers(len(cands)))]
    objs = scene.objects
    a = _object_spec(objs[pick[0]], rng, size_word_prob)
    if kind is QueryKind.SINGLE:
        return QuerySpec(kind, a)
    b = _object_spec(objs[pick[1]], rng, size_word_prob)
    if kind is QueryKind.PAIR:
        return QuerySpec(kind, a, b)
    rels = [r for r in Relation if relation_holds(objs[pick[0]], objs[pick[1]], r)]
    return QuerySpec(kind, a, b, rels[int(rng.integers(len(rels)))])


def sample_captions(
    scene: Scene, rng: np.random.Generator, *, k: int, size_word_prob: float
) -> list[QuerySpec]:
    """Up to ``k`` true captions of ``scene``, distinct in meaning, cycling through its kinds.

    A 1-object scene only has single captions (at most 2 distinct: with and without size).
    """
    if len(scene.objects) < 2:
        kinds, k = [QueryKind.SINGLE], min(k, 2)  # "a red circle", "a large red circle"
    else:
        kinds = list(_KIND_ORDER)
    offset = int(rng.integers(len(kinds)))
    seen: dict[tuple[str, ...], QuerySpec] = {}
    for attempt in range(8 * k):
        if len(seen) >= k:
            break
        kind = kinds[(attempt + offset) % len(kinds)]
        spec = sample_spec(scene, kind, rng, size_word_prob=size_word_prob)
        assert spec is not None  # every kind in `kinds` has candidates
        seen.setdefault(canonical_key(spec), spec)
    return list(seen.values())


_INVERSE = {Relation.RIGHT_OF: Relation.LEFT_OF, Relation.BELOW: Relation.ABOVE}


def canonical_key(spec: QuerySpec) -> tuple[str, ...]:
    """A key shared by specs that mean the same.

    "A and B" == "B and A"; "A right of B" == "B left of A"; "A below B" == "B above A".
    """
    if spec.kind is QueryKind.SINGLE:
        return (spec.a.text,)
    assert spec.b is not None
    a, b = spec.a.text, spec.b.text
    if spec.kind is QueryKind.PAIR:
        return ("and", *sorted((a, b)))
    assert spec.relation is not None
    if spec.relation in _INVERSE:
        return (_INVERSE[spec.relation].value, b, a)
    return (spec.relation.value, a, b)


def _quotas(n_queries: int, heldout_fraction: float) -> dict[tuple[QueryKind, bool], int]:
    per_kind = [n_queries // 3 + (1 if i < n_queries % 3 else 0) for i in range(3)]
    quotas = {}
    for kind, n in zip(_KIND_ORDER, per_kind, strict=True):
        n_held = int(round(n * heldout_fraction))
        quotas[(kind, True)] = n_held
        quotas[(kind, False)] = n - n_held
    return quotas


def sample_queries(
    scenes: Sequence[Scene],
    rng: np.random.Generator,
    *,
    n_queries: int,
    heldout_fraction: float,
    size_word_prob: float,
) -> list[QuerySpec]:
    """Draws ``n_queries`` true queries from ``scenes``, distinct in meaning, a third of each kind.

    Within each kind, ``round(n_kind * heldout_fraction)`` queries mention a held-out pair when the
    scenes allow it; a shortfall is made up by other queries (logged).

    Raises:
        InvalidArgumentError: when the scenes cannot yield ``n_queries`` distinct queries.
    """
    seen: dict[tuple[str, ...], QuerySpec] = {}

    def draw(kind: QueryKind, heldout: bool | None, n: int) -> int:
        eligible = [i for i, s in enumerate(scenes) if _candidates(s, kind, heldout)]
        got = 0
        if not eligible:
            return 0
        for _ in range(50 * n + 100):
            if got >= n:
                break
            scene = scenes[eligible[int(rng.integers(len(eligible)))]]
            spec = sample_spec(scene, kind, rng, size_word_prob=size_word_prob, heldout=heldout)
            if spec is not None and canonical_key(spec) not in seen:
                seen[canonical_key(spec)] = spec
                got += 1
        return got

    short = 0
    for (kind, heldout), n in _quotas(n_queries, heldout_fraction).items():
        if n == 0:
            continue
        got = draw(kind, heldout, n)
        if got < n:
            logger.info(
                "only %d of %d %s queries with heldout=%s could be drawn",
                got,
                n,
                kind.value,
                heldout,
            )
            short += n - got
    for kind in _KIND_ORDER:
        if short == 0:
            break
        short -= draw(kind, None, short)
    if short > 0:
        raise InvalidArgumentError(
            f"n_queries={n_queries} is more than the {len(seen)} distinct queries that "
            f"{len(scenes)} images allow; lower n_queries or raise n_images"
        )
    specs = list(seen.values())
    order = rng.permutation(len(specs))
    return [specs[i] for i in order]
