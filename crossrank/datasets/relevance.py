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

from collections.abc import Sequence
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
    sc: SceneArrays, colour: np.ndarray, shape: np.ndarray, size: np.ndarray
) -> np.ndarray:
    c = sc.colour[None] == colour[:, None, None]  # (m, n, 3)
    s = sc.shape[None] == shape[:, None, None]  # (m, n, 3)
    z = (size[:, None, None] < 0) | (sc.size[None] == size[:, None, None])  # (m, n, 3)
    return c & s & z & (colour[:, None, None] >= 0)  # (m, n, 3)


def _relation_tensor(sc: SceneArrays) -> np.ndarray:
    col, row = sc.col, sc.row
    rel = np.empty((len(_RELATIONS), len(sc), MAX_OBJECTS, MAX_OBJECTS), dtype=bool)
    rel[_RELATIONS.index(Relation.LEFT_OF)] = col[:, :, None] < col[:, None, :]  # (n, 3, 3)
    rel[_RELATIONS.index(Relation.RIGHT_OF)] = col[:, :, None] > col[:, None, :]
    rel[_RELATIONS.index(Relation.ABOVE)] = row[:, :, None] < row[:, None, :]
    rel[_RELATIONS.index(Relation.BELOW)] = row[:, :, None] > row[:, None, :]
    return rel


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
    distinct = ~np.eye(MAX_OBJECTS, dtype=bool)  # (3, 3): two different objects
    step = max(1, chunk_elements // (n * MAX_OBJECTS * MAX_OBJECTS))
    single_k = _KINDS.index(QueryKind.SINGLE)
    rel_k = _KINDS.index(QueryKind.RELATION)
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        a = _object_match(sc, sp.a_colour[lo:hi], sp.a_shape[lo:hi], sp.a_size[lo:hi])  # (c, n, 3)
        b = _object_match(sc, sp.b_colour[lo:hi], sp.b_shape[lo:hi], sp.b_size[lo:hi])  # (c, n, 3)
        both = a[:, :, :, None] & b[:, :, None, :] & distinct  # (c, n, 3, 3)
        relation = sp.relation[lo:hi]
        rel_sel = rel[np.maximum(relation, 0)]  # (c, n, 3, 3)
        is_rel = (sp.kind[lo:hi] == rel_k)[:, None, None, None]  # (c, 1, 1, 1)
        two = (both & (rel_sel | ~is_rel)).any(axis=(2, 3))  # (c, n)
        single = a.any(axis=2)  # (c, n)
        out[lo:hi] = np.where((sp.kind[lo:hi] == single_k)[:, None], single, two)  # (c, n)
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
        sp, sc = specs.take(idx), scenes.take(idx)
        a = _aligned_object_match(sc, sp.a_colour, sp.a_shape, sp.a_size)  # (c, 3)
        b = _aligned_object_match(sc, sp.b_colour, sp.b_shape, sp.b_size)  # (c, 3)
        both = a[:, :, None] & b[:, None, :] & ~np.eye(MAX_OBJECTS, dtype=bool)  # (c, 3, 3)
        rel = _relation_tensor(sc)[np.maximum(sp.relation, 0), np.arange(idx.size)]  # (c, 3, 3)
        is_rel = (sp.kind == _KINDS.index(QueryKind.RELATION))[:, None, None]
        two = (both & (rel | ~is_rel)).any(axis=(1, 2))
        out[idx] = np.where(sp.kind == _KINDS.index(QueryKind.SINGLE), a.any(axis=1), two)
    return out


def _aligned_object_match(sc: SceneArrays, colour: np.ndarray, shape: np.ndarray,
                          size: np.ndarray) -> np.ndarray:
    c = sc.colour == colour[:, None]  # (m, 3)
    s = sc.shape == shape[:, None]
    z = (size[:, None] < 0) | (sc.size == size[:, None])
    return c & s & z & (colour[:, None] >= 0)
