from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from crossrank.datasets import (
    Colour,
    ObjectSpec,
    QueryKind,
    QuerySpec,
    Relation,
    SceneArrays,
    Shape,
    Size,
    SpecArrays,
    match_aligned,
    match_matrix,
    satisfies,
)
from crossrank.datasets.sampling import sample_spec
from crossrank.datasets.scene import sample_scene


def _random_spec(rng: np.random.Generator) -> QuerySpec:
    def obj():
        size = [None, *Size][rng.integers(3)]
        return ObjectSpec(list(Colour)[rng.integers(6)], list(Shape)[rng.integers(5)], size)

    kind = list(QueryKind)[rng.integers(3)]
    if kind is QueryKind.SINGLE:
        return QuerySpec(kind, obj())
    if kind is QueryKind.PAIR:
        return QuerySpec(kind, obj(), obj())
    return QuerySpec(kind, obj(), obj(), list(Relation)[rng.integers(4)])


def test_match_matrix_equals_satisfies_on_every_pair():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, 64, include_heldout=True) for _ in range(80)]
    specs = [_random_spec(rng) for _ in range(150)]
    # plus specs true of some scene, so that both outcomes are well represented
    for kind in QueryKind:
        for s in scenes[:40]:
            spec = sample_spec(s, kind, rng, size_word_prob=0.5)
            if spec is not None:
                specs.append(spec)
    got = match_matrix(specs, scenes, chunk_elements=1000)  # small chunks: exercises the loop
    want = np.array([[satisfies(sc, sp) for sc in scenes] for sp in specs])
    assert got.shape == (len(specs), len(scenes))
    np.testing.assert_array_equal(got, want)
    assert 0.01 < want.mean() < 0.5


def test_match_matrix_accepts_texts_and_empty_inputs():
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, 64, include_heldout=True) for _ in range(5)]
    objs = scenes[0].objects
    texts = [QuerySpec(QueryKind.SINGLE, ObjectSpec(o.colour, o.shape)).text for o in objs]
    assert match_matrix(texts, scenes)[:, 0].all()
    assert match_matrix([], scenes).shape == (0, 5)
    assert match_matrix(SpecArrays.from_specs(texts), []).shape == (len(texts), 0)


def test_scene_arrays_from_metadata_table_equal_from_scenes(test_corpus):
    from_table = SceneArrays.from_table(pq.read_table(test_corpus.metadata_path))
    from_scenes = SceneArrays.from_scenes(test_corpus.scenes())
    for field in ("colour", "shape", "size", "row", "col"):
        np.testing.assert_array_equal(getattr(from_table, field), getattr(from_scenes, field))
    np.testing.assert_array_equal(test_corpus.scene_arrays().colour, from_scenes.colour)


def test_take_selects_a_batch_consistently():
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng, 64, include_heldout=True) for _ in range(30)]
    kinds = [QueryKind.SINGLE, QueryKind.PAIR, QueryKind.RELATION]
    specs = [
        sample_spec(s, kinds[i % 3 if len(s.objects) > 1 else 0], rng, size_word_prob=0.3)
        for i, s in enumerate(scenes)
    ]
    full = match_matrix(specs, scenes)
    idx = np.array([5, 2, 17, 2, 9, 10, 11])
    spec_arrays, scene_arrays = SpecArrays.from_specs(specs), SceneArrays.from_scenes(scenes)
    sub = match_matrix(spec_arrays.take(idx), scene_arrays.take(idx))
    np.testing.assert_array_equal(sub, full[np.ix_(idx, idx)])
    assert sub.diagonal().all()  # every caption matches the image it was drawn from


def test_match_aligned_equals_the_diagonal_of_match_matrix():
    rng = np.random.default_rng(3)
    scenes = [sample_scene(rng, 64, include_heldout=True) for _ in range(300)]
    specs = [
        _random_spec(rng)
        if i % 2
        else sample_spec(s, list(QueryKind)[i % 3], rng, size_word_prob=0.5) or _random_spec(rng)
        for i, s in enumerate(scenes)
    ]
    sp, sc = SpecArrays.from_specs(specs), SceneArrays.from_scenes(scenes)
    got = match_aligned(sp, sc)
    want = np.array([satisfies(scene, spec) for scene, spec in zip(scenes, specs, strict=True)])
    np.testing.assert_array_equal(got, want)
    assert 0.2 < want.mean() < 0.8  # both outcomes well represented
    with pytest.raises(ValueError, match="as many specs as scenes"):
        match_aligned(sp, sc.take(np.arange(3)))
