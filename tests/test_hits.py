"""Hits and results: the sequence behaviour and the exact ``--json`` shape."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal

import numpy as np
import pytest

from crossrank.hits import Hit, SearchCounts, SearchResult


def _result(hits: tuple[Hit, ...]) -> SearchResult:
    return SearchResult(
        query="a red circle",
        hits=hits,
        counts=SearchCounts(requested=3, returned=len(hits), filtered_out=5, candidates=7),
        timings_ms={"encode": 1.23456, "total": 2.0},
    )


def test_hit_json_shape_nests_the_two_stage_scores():
    hit = Hit(
        id=4,
        path="/data/a.png",
        score=0.75,
        first_stage_score=0.5,
        rerank_score=0.25,
        metadata={"label": "cat", "width": np.int32(40)},
    )
    assert hit.to_dict() == {
        "id": 4,
        "path": "/data/a.png",
        "score": 0.75,
        "scores": {"first_stage": 0.5, "rerank": 0.25},
        "metadata": {"label": "cat", "width": 40},
    }
    assert type(hit.to_dict()["metadata"]["width"]) is int  # a numpy scalar would not serialise


def test_hit_without_reranker_has_null_rerank_score():
    hit = Hit(id=0, path="/a.png", score=0.5, first_stage_score=0.5, rerank_score=None)
    assert hit.to_dict()["scores"] == {"first_stage": 0.5, "rerank": None}


def test_metadata_values_become_json_values():
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    hit = Hit(
        id=1,
        path="/a.png",
        score=float("nan"),
        first_stage_score=float("-inf"),
        rerank_score=None,
        metadata={
            "mtime": when,
            "day": dt.date(2024, 5, 1),
            "price": Decimal("1.5"),
            "raw": b"\x01\xff",
            "tags": (np.float32(0.5), "x"),
            "nested": {1: np.int64(2)},
            "missing": None,
            "ratio": float("inf"),
        },
    )
    out = hit.to_dict()
    assert out["score"] is None and out["scores"]["first_stage"] is None  # JSON has no NaN / inf
    assert out["metadata"] == {
        "mtime": "2024-05-01T12:30:00+00:00",
        "day": "2024-05-01",
        "price": 1.5,
        "raw": "01ff",
        "tags": [0.5, "x"],
        "nested": {"1": 2},
        "missing": None,
        "ratio": None,
    }
    json.dumps(out, allow_nan=False)  # raises if anything is left that strict JSON cannot hold


def test_search_result_is_a_sequence_of_hits():
    hits = tuple(
        Hit(id=i, path=f"/{i}.png", score=1.0 - i / 10, first_stage_score=0.0, rerank_score=None)
        for i in range(3)
    )
    result = _result(hits)
    assert len(result) == 3
    assert result[0] is hits[0] and list(result[1:]) == list(hits[1:])
    assert [h.id for h in result] == [0, 1, 2]
    with pytest.raises(IndexError):
        result[3]


def test_search_result_json_shape():
    hits = (
        Hit(id=2, path="/2.png", score=0.9, first_stage_score=0.8, rerank_score=0.9, metadata={}),
    )
    out = _result(hits).to_dict()
    assert list(out) == [
        "query",
        "hits",
        "counts",
        "timings_ms",
        "generation",
        "encoder",
        "reranker",
        "fusion",
        "notes",
    ]
    assert out["query"] == "a red circle"
    assert out["hits"] == [hits[0].to_dict()]
    assert out["counts"] == {"requested": 3, "returned": 1, "filtered_out": 5, "candidates": 7}
    assert out["timings_ms"] == {"encode": 1.235, "total": 2.0}
    assert out["generation"] is None  # not searched through an Index
    assert out["encoder"] is None and out["notes"] == []
    assert out["reranker"] == "none" and out["fusion"] == "none"  # what a bare result says
    assert json.loads(json.dumps(out)) == out


def test_search_result_json_names_the_encoder_reranker_and_fusion():
    from crossrank.encoders.describe import DEMO_NOTE, describe_model

    result = SearchResult(
        query="q",
        hits=(),
        counts=SearchCounts(requested=1, returned=0, filtered_out=0, candidates=0),
        timings_ms={},
        encoder=describe_model({"model_id": "crossrank-demo", "source": "demo"}),
        reranker="cross-attention (index reranker/)",
        fusion="weighted:0.5",
        notes=("a note",),
    )
    out = result.to_dict()
    assert out["encoder"] == {
        "model_id": "crossrank-demo",
        "model_type": "",
        "demo": True,
        "note": DEMO_NOTE,
    }
    assert out["reranker"] == "cross-attention (index reranker/)"
    assert out["fusion"] == "weighted:0.5"
    assert out["notes"] == ["a note"]
