from __future__ import annotations

import logging

import faiss
import pytest

from crossrank.errors import InvalidArgumentError
from crossrank.indexes import IndexConfig, auto_factory
from crossrank.indexes.factory import (
    MIN_POINTS_PER_CENTROID,
    auto_nlist,
    create_index,
    describe_index,
)


@pytest.mark.parametrize(
    ("n", "config", "expected"),
    [
        (0, IndexConfig(), "Flat"),
        (19_999, IndexConfig(), "Flat"),
        # 4 * sqrt(20k) = 566 lists, capped to 20k // 39 = 512 so each centroid gets 39 points.
        (20_000, IndexConfig(), "IVF512,Flat"),
        (100_000, IndexConfig(), "IVF1265,Flat"),
        # the default train_size (50k) caps nlist at 50k // 39 = 1282 however large the corpus
        (1_000_000, IndexConfig(), "IVF1282,Flat"),
        (3_000_000, IndexConfig(), "IVF1282,SQ8"),
        (3_000_000, IndexConfig(train_size=1_000_000), "IVF6928_HNSW32,SQ8"),
        (500, IndexConfig(flat_threshold=0), "IVF12,Flat"),
        (10, IndexConfig(flat_threshold=0), "IVF1,Flat"),
        (0, IndexConfig(flat_threshold=0), "Flat"),
        (50_000, IndexConfig(nlist=100), "IVF100,Flat"),
        (10, IndexConfig(factory=" HNSW32 "), "HNSW32"),
        (10**7, IndexConfig(factory="Flat"), "Flat"),
    ],
)
def test_auto_factory_tiers(n, config, expected):
    assert auto_factory(n, config) == expected


def test_auto_nlist_leaves_39_training_points_per_centroid():
    for n in [40, 1_000, 20_000, 10**6]:
        nlist = auto_nlist(n, IndexConfig())
        assert nlist * MIN_POINTS_PER_CENTROID <= min(n, 50_000)


def test_explicit_nlist_too_large_for_the_sample_is_reduced_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="crossrank.indexes.factory"):
        assert auto_nlist(1_000, IndexConfig(nlist=256)) == 1_000 // MIN_POINTS_PER_CENTROID
    assert "nlist=256 needs 9984 training vectors but only 1000 are used" in caplog.text


@pytest.mark.parametrize(
    "factory", ["Flat", "IVF8,Flat", "HNSW16", "IDMap2,Flat", "PCA8,IVF4,Flat"]
)
def test_create_index_has_ids_and_inner_product(factory):
    index = create_index(faiss, 16, factory)
    assert isinstance(index, faiss.IndexIDMap)
    assert index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert index.d == 16 and index.ntotal == 0


@pytest.mark.parametrize(
    ("factory", "reason"),
    [
        ("IVFbad,Flat", "could not parse index string IVFbad,Flat"),
        ("IVF16,Flat,Refine(Flat", "unbalanced parentheses"),
        ("LSH", "metric == METRIC_L2"),
    ],
)
def test_bad_factory_string_gives_faiss_reason_and_an_example(factory, reason):
    with pytest.raises(InvalidArgumentError, match=r"bad FAISS factory string") as info:
        create_index(faiss, 16, factory)
    message = str(info.value)
    assert reason in message
    assert "'IVF256,Flat'" in message and "'HNSW32'" in message
    assert "\n" not in message and "index_factory.cpp" not in message


@pytest.mark.parametrize(
    "factory",
    ["Flat", "IVF8,Flat", "IVF8_HNSW16,Flat", "IVF8,SQ8", "IVF8,SQfp16", "IVF8,PQ4x8", "HNSW16"],
)
def test_describe_index_gives_back_the_factory_string(factory):
    index = create_index(faiss, 16, factory)
    assert describe_index(faiss, index) == factory


def test_describe_index_names_other_types_by_class():
    index = create_index(faiss, 16, "PCA8,IVF4,Flat")
    assert describe_index(faiss, index) == "IndexPreTransform"


def test_auto_factory_strings_parse_in_faiss():
    for n in [20_000, 3_000_000]:
        for config in [IndexConfig(), IndexConfig(train_size=1_000_000)]:
            index = create_index(faiss, 8, auto_factory(n, config))
            assert not index.is_trained
    assert auto_nlist(1, IndexConfig()) == 1
