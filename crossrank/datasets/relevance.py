"""Vectorised relevance: which images satisfy which queries, as a boolean matrix.

Scenes and specs are encoded as small integer arrays (enum positions, ``-1`` = absent / any), so
that a (captions x images) positive matrix for a contrastive training batch, or the qrels of a
whole corpus, is a handful of numpy broadcasts. :func:`match_matrix` agrees with
:func:`~crossrank.datasets.language.satisfies` on every (spec, scene).

Example (a contrastive batch of pairs.parquet rows ``idx``, images and captions aligned):
    >>> ds = open_shapes("shapes-train")
    >>> pairs = pq.read_table(ds.pairs_path)                      # path, caption, ...
    >>> scenes = ds.scene_arrays()                                 # (n_images,) in metadata order
    >>> paths = pq.read_table(ds.metadata_path)["path"].to_pylist()
    >>> image_row = {p: i for i, p in enumerate(paths)}
    >>> pair_image = np.array([image_row[p] for p in pairs["path"].to_pylist()])
    >>> specs = SpecArrays.from_specs(pairs["caption"].to_pylist())  # once, (n_pairs,)
    >>> positives = match_matrix(specs.take(idx), scenes.take(pair_image[idx]))  # (b, b) bool
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from crossrank.datasets.config import Colour, QueryKind, Relation, Shape, Size
from crossrank.datasets.language import QuerySpec, parse_query
from crossrank.datasets.scene import MAX_OBJECTS, Scene

__all__ = ["SceneArrays", "SpecArrays", "match_aligned", "match_matrix"]

_COLOURS = list(Colour)
_SHAPES = list(Shape)
_SIZES = list(Size)
_KINDS = list(QueryKind)
_RELATIONS = list(Relation)


@dataclass(frozen=True)
class SceneArrays:
    """Scenes as int8 arrays of shape ``(n, MAX_OBJECTS)``; ``colour == -1`` marks no object.

    Values are positions in the enums' declaration order (``list(Colour).index(...)``).
    """

    colour: np.ndarray  # (n, 3) int8
    shape: np.ndarray  # (n, 3) int8
    size: np.ndarray  # (n, 3) int8
    row: np.ndarray  # (n, 3) int8
    col: np.ndarray  # (n, 3) int8

    def __len__(self) -> int:
        return int(self.colour.shape[0])

    def take(self, idx: np.ndarray) -> SceneArrays:
        """The scenes at positions ``idx`` (a training batch), in that order."""
        return SceneArrays(**{f: getattr(self, f)[idx] for f in _FIELDS})

    @classmethod
    def from_scenes(cls, scenes: Sequence[Scene]) -> SceneArrays:
        """Encodes scene graphs."""
        n = len(scenes)
        arrs = {k: np.full((n, MAX_OBJECTS), -1, dtype=np.int8) for k in _FIELDS}
        for i, scene in enumerate(scenes):
            for j, o in enumerate(scene.objects):
                arrs["colour"][i, j] = _COLOURS.index(o.colour)
                arrs["shape"][i, j] = _SHAPES.index(o.shape)
                arrs["size"][i, j] = _SIZES.index(o.size)
                arrs["row"][i, j] = o.row
                arrs["col"][i, j] = o.col
        return cls(**arrs)

    @classmethod
    def from_table(cls, table) -> SceneArrays:
        """Encodes the list columns of a ``metadata.parquet`` table (pyarrow), row order kept."""
        names = ("colours", "shapes", "sizes", "rows", "cols")
        cols = {name: table.column(name).to_pylist() for name in names}
        n = table.num_rows
        arrs = {k: np.full((n, MAX_OBJECTS), -1, dtype=np.int8) for k in _FIELDS}
        lookup = {
            "colours": {c.value: i for i, c in enumerate(_COLOURS)},
            "shapes": {s.value: i for i, s in enumerate(_SHAPES)},
            "sizes": {s.value: i for i, s in enumerate(_SIZES)},
        }
        for src, dst in zip(names, _FIELDS, strict=True):
            table_lookup = lookup.get(src)
            for i, values in enumerate(cols[src]):
                for j, v in enumerate(values):
                    arrs[dst][i, j] = table_lookup[v] if table_lookup is not None else v
        return cls(**arrs)


_FIELDS = ("colour", "shape", "size", "row", "col")


@dataclass(frozen=True)
class SpecArrays:
    """Query specs as int8 arrays of shape ``(m,)``.

    ``-1`` means: no second object (``b_*``), any size (``*_size``), not a relation (``relation``).
    """

    kind: np.ndarray  # (m,) int8, position in QueryKind
    a_colour: np.ndarray  # (m,) int8
    a_shape: np.ndarray  # (m,) int8
    a_size: np.ndarray  # (m,) int8, -1 = any
    b_colour: np.ndarray  # (m,) int8, -1 = single query
    b_shape: np.ndarray  # (m,) int8
    b_size: np.ndarray  # (m,) int8, -1 = any
    relation: np.ndarray  # (m,) int8, position in Relation, -1 = not a relation query

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    def take(self, idx: np.ndarray) -> SpecArrays:
        """The specs at positions ``idx`` (a training batch), in that order."""
        return SpecArrays(**{f: getattr(self, f)[idx] for f in self.__dataclass_fields__})

    @classmethod
    def from_specs(cls, specs: Sequence[QuerySpec | str]) -> SpecArrays:
        """Encodes specs (template texts are parsed with :func:`parse_query`)."""
        m = len(specs)
        out = {f: np.full(m, -1, dtype=np.int8) for f in cls.__dataclass_fields__}
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                spec = parse_query(spec)
            out["kind"][i] = _KINDS.index(spec.kind)
            for prefix, o in (("a", spec.a), ("b", spec.b)):
                if o is None:
                    continue
                out[f"{prefix}_colour"][i] = _COLOURS.index(o.colour)
                out[f"{prefix}_shape"][i] = _SHAPES.index(o.shape)
                out[f"{prefix}_size"][i] = -1 if o.size is None else _SIZES.index(o.size)
            if spec.relation is not None:
                out["relation"][i] = _RELATIONS.index(spec.relation)
        return cls(**out)


def _object_match(
    sc: SceneArrays,
    lead: Callable[[np.ndarray], np.ndarray],
    colour: np.ndarray,
    shape: np.ndarray,
    size: np.ndarray,
) -> np.ndarray:
    """``(m, n, 3)``: which objects of the scenes fit each spec's object; ``lead`` shapes a scene
    field ``(scenes, 3)`` to broadcast against the specs (see :func:`_match`)."""
    c = lead(sc.colour) == colour[:, None, None]
    s = lead(sc.shape) == shape[:, None, None]
    z = (size[:, None, None] < 0) | (lead(sc.size) == size[:, None, None])
    return c & s & z & (colour[:, None, None] >= 0)


def _relation_tensor(sc: SceneArrays) -> np.ndarray:
    """``(4, scenes, 3, 3)``: whether object i stands in each relation to object j."""
    col, row = sc.col, sc.row
    rel = np.empty((len(_RELATIONS), len(sc), MAX_OBJECTS, MAX_OBJECTS), dtype=bool)
    rel[_RELATIONS.index(Relation.LEFT_OF)] = col[:, :, None] < col[:, None, :]  # (n, 3, 3)
    rel[_RELATIONS.index(Relation.RIGHT_OF)] = col[:, :, None] > col[:, None, :]
    rel[_RELATIONS.index(Relation.ABOVE)] = row[:, :, None] < row[:, None, :]
    rel[_RELATIONS.index(Relation.BELOW)] = row[:, :, None] > row[:, None, :]
    return rel


def _match(sp: SpecArrays, sc: SceneArrays, rel: np.ndarray, aligned: bool) -> np.ndarray:
    """The truth of ``m`` specs, ``(m, n)`` bool: against every one of ``n`` scenes, or with
    ``aligned`` spec i against scene i only (``sc`` holds ``m`` scenes; ``n = 1``).

    ``rel`` is :func:`_relation_tensor` of ``sc``.
    """
    m = len(sp)
    # A scene field (scenes, ...) becomes (1, n, ...) against every spec, or (m, 1, ...) aligned.
    lead = (lambda x: x[:, None]) if aligned else (lambda x: x[None])
    a = _object_match(sc, lead, sp.a_colour, sp.a_shape, sp.a_size)  # (m, n, 3)
    b = _object_match(sc, lead, sp.b_colour, sp.b_shape, sp.b_size)  # (m, n, 3)
    both = a[:, :, :, None] & b[:, :, None, :] & ~np.eye(MAX_OBJECTS, dtype=bool)  # (m, n, 3, 3)
    relation = np.maximum(sp.relation, 0)
    holds = rel[relation, np.arange(m)][:, None] if aligned else rel[relation]  # (m, n, 3, 3)
    is_rel = (sp.kind == _KINDS.index(QueryKind.RELATION))[:, None, None, None]  # (m, 1, 1, 1)
    two = (both & (holds | ~is_rel)).any(axis=(2, 3))  # (m, n)
    return np.where((sp.kind == _KINDS.index(QueryKind.SINGLE))[:, None], a.any(axis=2), two)


def match_matrix(
    specs: SpecArrays | Sequence[QuerySpec | str],
    scenes: SceneArrays | Sequence[Scene],
    *,
    chunk_elements: int = 1 << 23,
) -> np.ndarray:
    """Which scenes satisfy which specs.

    Args:
        specs: ``m`` queries / captions (encoded, or specs / texts to encode).
        scenes: ``n`` scenes (encoded, or :class:`Scene` objects to encode).
        chunk_elements: bounds the temporary ``(m_chunk, n, 3, 3)`` tensors (memory).

    Returns:
        ``(m, n)`` bool: ``out[i, j]`` iff scene ``j`` satisfies spec ``i``.
    """
    sp = specs if isinstance(specs, SpecArrays) else SpecArrays.from_specs(specs)
    sc = scenes if isinstance(scenes, SceneArrays) else SceneArrays.from_scenes(scenes)
    m, n = len(sp), len(sc)
    out = np.zeros((m, n), dtype=bool)
    if m == 0 or n == 0:
        return out
    rel = _relation_tensor(sc)  # (4, n, 3, 3)
    step = max(1, chunk_elements // (n * MAX_OBJECTS * MAX_OBJECTS))
    for lo in range(0, m, step):
        out[lo : lo + step] = _match(
            sp.take(np.arange(lo, min(m, lo + step))), sc, rel, aligned=False
        )
    return out


def match_aligned(specs: SpecArrays, scenes: SceneArrays) -> np.ndarray:
    """Whether scene ``i`` satisfies spec ``i``, for aligned arrays of the same length.

    The diagonal of :func:`match_matrix` without the ``(m, n)`` work: a training step checks each
    of its (caption, image) pairs once.

    Returns:
        ``(m,)`` bool.

    Raises:
        ValueError: the lengths differ.
    """
    if len(specs) != len(scenes):
        raise ValueError(
            f"match_aligned needs as many specs as scenes, got {len(specs)} and {len(scenes)}"
        )
    out = np.empty(len(specs), dtype=bool)
    for lo in range(0, len(specs), 4096):
        idx = np.arange(lo, min(len(specs), lo + 4096))
        chunk = scenes.take(idx)
        out[idx] = _match(specs.take(idx), chunk, _relation_tensor(chunk), aligned=True)[:, 0]
    return out
