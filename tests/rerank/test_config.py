import json

import pytest

from crossrank.rerank import Init, Pooling, QueryTokensMode, RerankerConfig


def test_defaults_are_valid_and_derived_sizes_follow():
    cfg = RerankerConfig()
    assert cfg.head_dim * cfg.heads == cfg.width
    assert cfg.mlp_hidden == round(cfg.mlp_ratio * cfg.width)
    assert cfg.prenorm and not cfg.gated


def test_defaults_are_the_shipped_demo_rerankers_architecture():
    from dataclasses import replace

    from crossrank.rerank import read_reranker_config
    from crossrank.rerank.checkpoint import demo_reranker_dir

    shipped = read_reranker_config(demo_reranker_dir())
    default = RerankerConfig()
    # Everything but the sizes that come from the encoder (training sets the patch positions and
    # the layer-0 width) and the three options the shipped reranker adds for relations: query
    # self-attention, the pair head and the layer-0 token states. They are not the defaults: the
    # pair head learns only with attention supervision, which needs a shapes dataset's scene
    # graphs, and none of the three was measured on a user's own encoder and captions: the shipped
    # reranker, trained on shapes data with the demo encoder, is their only measurement (its
    # config.json metadata: data.relevance "shapes", train.attention_supervision 0.5). Its width
    # (64) and pair head width (32) are a student's, distilled from a teacher at the default
    # width 128 (metadata train.teacher): the defaults keep the width that learns from labels.
    assert (shipped.query_self_attention, shipped.pair_head, shipped.token_embeddings) == (
        True,
        True,
        128,
    )
    assert (
        replace(
            shipped,
            text_dim=default.text_dim,
            patch_dim=default.patch_dim,
            patch_positions=None,
            query_self_attention=False,
            pair_head=False,
            token_embeddings=0,
            width=default.width,
            pair_width=default.pair_width,
        )
        == default
    )
    assert shipped.patch_positions == 64 and default.patch_positions is None
    assert (shipped.width, shipped.pair_width, default.width) == (64, 32, 128)


def test_enum_fields_accept_their_strings():
    cfg = RerankerConfig(
        n_query_tokens=2, query_tokens_mode="replace", pooling="first", init="lecun"
    )
    assert cfg.query_tokens_mode is QueryTokensMode.REPLACE
    assert cfg.pooling is Pooling.FIRST
    assert cfg.init is Init.LECUN
    assert RerankerConfig().init is Init.LECUN


def test_json_round_trip():
    cfg = RerankerConfig(
        text_dim=12,
        patch_dim=10,
        width=16,
        heads=2,
        n_query_tokens=3,
        query_tokens_mode="replace",
        sparse_top_m=4,
        patch_positions=9,
        pooling="first",
        init="lecun",
        token_embeddings=6,
    )
    data = json.loads(json.dumps(cfg.to_dict()))
    assert RerankerConfig.from_dict(data) == cfg and cfg.token_input_dim == 18


@pytest.mark.parametrize(
    ("options", "static", "foldable"),
    [
        ({}, 3, 3),
        ({"bidirectional": True}, 1, 1),
        ({"patch_self_attention": True}, 3, 0),
        ({"bidirectional": True, "patch_self_attention": True}, 1, 0),
    ],
)
def test_which_layers_can_be_precomputed_or_folded(options, static, foldable):
    cfg = RerankerConfig(layers=3, **options)
    assert (cfg.static_patch_layers, cfg.foldable_layers) == (static, foldable)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"text_dim": 0}, r"text_dim must be an int >= 1, got 0"),
        (
            {"token_embeddings": -1},
            r"token_embeddings must be an int >= 0 \(the width of the text encoder's layer-0",
        ),
        ({"token_embeddings": True}, r"token_embeddings must be an int >= 0"),
        ({"patch_dim": 3.0}, r"patch_dim must be an int >= 1, got 3.0"),
        ({"layers": True}, r"layers must be an int >= 1, got True"),
        ({"width": 30, "heads": 4}, r"width must be divisible by heads, got width=30 and heads=4"),
        ({"mlp_ratio": 0}, r"mlp_ratio must be a number > 0, got 0"),
        ({"mlp_ratio": 0.001, "width": 16, "heads": 2}, r"mlp_ratio \* width must be >= 1"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
        ({"gated": 1}, r"gated must be True or False, got 1"),
        ({"n_query_tokens": -1}, r"n_query_tokens must be an int >= 0"),
        (
            {"query_tokens_mode": "prefix"},
            r"query_tokens_mode must be one of concat, replace, got 'prefix'",
        ),
        ({"query_tokens_mode": "replace"}, r"'replace' needs n_query_tokens >= 1"),
        ({"sparse_top_m": 0}, r"sparse_top_m must be None \(dense\) or an int >= 1"),
        ({"patch_positions": 0}, r"patch_positions must be None"),
        ({"pooling": "max"}, r"pooling must be one of mean, first, got 'max'"),
        ({"init": "xavier"}, r"init must be one of bert, lecun, got 'xavier'"),
    ],
)
def test_invalid_fields_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        RerankerConfig(**options)


def test_from_dict_refuses_unknown_fields_and_non_dicts():
    with pytest.raises(ValueError, match=r"unknown reranker config fields \['depth'\]"):
        RerankerConfig.from_dict({"depth": 3})
    with pytest.raises(ValueError, match=r"must be a JSON object, got list"):
        RerankerConfig.from_dict([1, 2])
