import numpy as np
import pytest

from crossrank.errors import InvalidArgumentError
from crossrank.rerank import Fusion, FusionMode, fuse, parse_fusion

FIRST = np.array([0.9, 0.5, 0.1], dtype=np.float32)
RERANK = np.array([0.2, 0.6, 0.4], dtype=np.float32)


def test_rerank_takes_the_rerank_score():
    np.testing.assert_array_equal(fuse(FIRST, RERANK, "rerank"), RERANK)


def test_sum_adds_the_scores():
    np.testing.assert_allclose(fuse(FIRST, RERANK, "sum"), [1.1, 1.1, 0.5], rtol=1e-6)


def test_weighted_is_alpha_rerank_plus_one_minus_alpha_first_stage():
    np.testing.assert_allclose(
        fuse(FIRST, RERANK, "weighted:0.25"), [0.725, 0.525, 0.175], rtol=1e-6
    )


def test_weighted_ends_reduce_to_each_stage():
    np.testing.assert_allclose(fuse(FIRST, RERANK, "weighted:1"), RERANK)
    np.testing.assert_allclose(fuse(FIRST, RERANK, "weighted:0"), FIRST)


def test_weighted_half_ranks_like_sum():
    rng = np.random.default_rng(0)
    first, rerank = rng.random((2, 50)).astype(np.float32)
    assert (
        np.argsort(-fuse(first, rerank, "weighted:0.5")) == np.argsort(-fuse(first, rerank, "sum"))
    ).all()


def test_fused_scores_are_float32_and_keep_the_shape():
    out = fuse(np.ones((2, 3)), np.ones((2, 3)), "sum")
    assert out.dtype == np.float32
    assert out.shape == (2, 3)


@pytest.mark.parametrize(
    ("spec", "mode", "alpha", "text"),
    [
        ("rerank", FusionMode.RERANK, None, "rerank"),
        ("SUM", FusionMode.SUM, None, "sum"),
        ("weighted:0.7", FusionMode.WEIGHTED, 0.7, "weighted:0.7"),
        (" Weighted : 1 ", FusionMode.WEIGHTED, 1.0, "weighted:1"),
    ],
)
def test_parse_round_trips(spec, mode, alpha, text):
    fusion = Fusion.parse(spec)
    assert (fusion.mode, fusion.alpha, str(fusion)) == (mode, alpha, text)
    assert Fusion.parse(str(fusion)) == fusion
    assert Fusion.parse(fusion) is fusion


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("max", r"fusion must be rerank, sum or weighted:ALPHA"),
        ("", r"fusion must be rerank, sum or weighted:ALPHA"),
        ("weighted", r"needs a number ALPHA in \[0, 1\]"),
        ("weighted:", r"needs a number ALPHA in \[0, 1\]"),
        ("weighted:abc", r"needs a number ALPHA in \[0, 1\]"),
        ("weighted:1.5", r"needs alpha in \[0, 1\], got 1.5"),
        ("weighted:-0.1", r"needs alpha in \[0, 1\], got -0.1"),
        ("weighted:nan", r"needs alpha in \[0, 1\], got nan"),
        ("sum:0.5", r"fusion 'sum' takes no argument"),
        (0.5, r"fusion must be a string .* got float"),
    ],
)
def test_malformed_fusion_is_refused(spec, match):
    with pytest.raises(InvalidArgumentError, match=match):
        Fusion.parse(spec)


def test_dataclass_validates_its_fields():
    with pytest.raises(
        InvalidArgumentError, match=r"fusion mode must be one of rerank, sum, weighted"
    ):
        Fusion("max")
    with pytest.raises(InvalidArgumentError, match=r"needs alpha in \[0, 1\], got None"):
        Fusion(FusionMode.WEIGHTED)
    with pytest.raises(InvalidArgumentError, match=r"needs alpha in \[0, 1\], got True"):
        Fusion(FusionMode.WEIGHTED, True)
    with pytest.raises(InvalidArgumentError, match=r"fusion 'sum' takes no alpha"):
        Fusion(FusionMode.SUM, 0.5)


def test_shape_mismatch_is_refused():
    with pytest.raises(
        InvalidArgumentError,
        match=r"first_stage scores have shape \(3,\) but rerank scores have shape \(2,\)",
    ):
        fuse(FIRST, RERANK[:2], "sum")


def test_parse_fusion_gives_a_callable_fusion():
    fusion = parse_fusion("weighted:0.25")
    np.testing.assert_array_equal(fusion(FIRST, RERANK), fuse(FIRST, RERANK, "weighted:0.25"))
    with pytest.raises(InvalidArgumentError, match=r"fusion must be rerank, sum or weighted:ALPHA"):
        parse_fusion("product")


def test_auto_takes_the_rerankers_recommendation_else_rerank():
    from types import SimpleNamespace

    from crossrank.rerank import resolve_fusion

    assert resolve_fusion("auto") == Fusion()
    assert resolve_fusion(" AUTO ", SimpleNamespace(fusion=None)) == Fusion()
    assert resolve_fusion("auto", SimpleNamespace(fusion="weighted:0.25")) == Fusion(
        FusionMode.WEIGHTED, 0.25
    )
    assert resolve_fusion("sum", SimpleNamespace(fusion="weighted:0.25")) == Fusion(FusionMode.SUM)
    with pytest.raises(InvalidArgumentError, match="fusion must be auto, rerank, sum or weighted"):
        resolve_fusion("autox")
    with pytest.raises(
        InvalidArgumentError, match="fusion 'auto' takes no argument, got 'auto:0.5'"
    ):
        resolve_fusion("auto:0.5")
