import json

import numpy as np
import pytest
import torch

from crossrank.errors import InvalidArgumentError, ModelError, ModelMismatchError
from crossrank.rerank import (
    CrossAttentionReranker,
    RerankerConfig,
    get_reranker,
    load_reranker,
    read_reranker_config,
    save_reranker,
)
from crossrank.rerank.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_reranker_matches

D = 12


def _model(**options) -> CrossAttentionReranker:
    config = RerankerConfig(text_dim=D, patch_dim=D, width=16, heads=2, layers=2, **options)
    model = CrossAttentionReranker(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(5, D, generator=g),
        torch.tensor([True, True, True, False, True]),
        torch.randn(4, 6, D, generator=g),
    )


@pytest.fixture
def saved(tmp_path):
    model = _model(n_query_tokens=2, bidirectional=True, patch_positions=8)
    return model, save_reranker(model, tmp_path / "reranker", metadata={"steps": 3})


def test_round_trip_gives_identical_scores(saved):
    model, path = saved
    loaded = load_reranker(path, device="cpu")
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.score(*_inputs()), model.score(*_inputs()))
    assert json.loads((path / CONFIG_NAME).read_text())["metadata"] == {"steps": 3}
    assert read_reranker_config(path) == model.config


@pytest.mark.parametrize("pair_width", [None, 3])
def test_a_pair_head_round_trips_with_identical_scores(tmp_path, pair_width):
    model = _model(
        pair_head=True, patch_positions=9, query_self_attention=True, pair_width=pair_width
    )  # a 3 x 3 grid
    path = save_reranker(model, tmp_path / "pair")
    loaded = load_reranker(path, device="cpu")
    tokens, mask, patches = _inputs()
    assert loaded.config.pair_head and loaded.config.pair_width == pair_width
    assert torch.equal(loaded.score(tokens, mask, patches), model.score(tokens, mask, patches))


def test_a_config_written_before_pair_width_reads_as_the_full_width(tmp_path):
    model = _model(pair_head=True, patch_positions=9)
    path = save_reranker(model, tmp_path / "old")
    data = json.loads((path / CONFIG_NAME).read_text())
    del data["config"]["pair_width"]  # as the shipped demo reranker's config.json was written
    (path / CONFIG_NAME).write_text(json.dumps(data))
    loaded = load_reranker(path, device="cpu")
    assert loaded.config.pair_width is None
    assert torch.equal(loaded.score(*_inputs()), model.score(*_inputs()))


def test_layer_0_token_states_round_trip_and_widen_the_query(tmp_path):
    model = _model(token_embeddings=4)
    assert model.token_embeddings == 4 and model.config.token_input_dim == 4 + D
    path = save_reranker(model, tmp_path / "layer0")
    loaded = load_reranker(path, device="cpu")
    _, mask, patches = _inputs()
    query = torch.randn(5, 4 + D, generator=torch.Generator().manual_seed(2))
    assert loaded.config.token_embeddings == 4
    assert torch.equal(loaded.score(query, mask, patches), model.score(query, mask, patches))
    with pytest.raises(
        InvalidArgumentError,
        match=r"made for token dim 16 \(4 layer-0 \+ 12: give .*reranker_tokens",
    ):
        loaded.score(query[:, 4:], mask, patches)  # the last layer's features alone
    info = {"model_id": "tiny", "patch_dim": D}
    check_reranker_matches(
        loaded.config, info
    )  # an index that predates text_width: checked at search
    check_reranker_matches(loaded.config, {**info, "text_width": 4})
    with pytest.raises(
        ModelMismatchError,
        match="reads 4-dim layer-0 token states, but the index's encoder tiny gives 8-dim",
    ):
        check_reranker_matches(loaded.config, {**info, "text_width": 8})


def test_saving_again_replaces_the_checkpoint(saved, tmp_path):
    _, path = saved
    other = _model()
    save_reranker(other, path)
    assert torch.equal(load_reranker(path, device="cpu").score(*_inputs()), other.score(*_inputs()))
    assert sorted(p.name for p in path.iterdir()) == [
        CONFIG_NAME,
        WEIGHTS_NAME,
    ]  # no temp files left


@pytest.mark.parametrize("as_str", [True, False])
def test_get_reranker_loads_a_folder(saved, as_str):
    model, path = saved
    reranker = get_reranker(
        str(path) if as_str else path,
        device="cpu",
        encoder_info={"model_id": "m", "patch_dim": D, "n_patches": 6},
    )
    assert isinstance(reranker, CrossAttentionReranker) and reranker.name == "cross-attention"
    assert torch.equal(reranker.score(*_inputs()), model.score(*_inputs()))


def test_get_reranker_keeps_the_names():
    assert get_reranker("none") is None
    assert get_reranker("maxsim", device="cpu").name == "maxsim"
    with pytest.raises(
        InvalidArgumentError,
        match=r"reranker must be one of maxsim, blip-itm, none, got 'colbert', or the folder",
    ):
        get_reranker("colbert")


def test_get_reranker_on_a_missing_folder_says_so(tmp_path):
    with pytest.raises(ModelError, match=r"no reranker at .*nowhere: the folder does not exist"):
        get_reranker(str(tmp_path / "nowhere"))


def test_a_file_instead_of_a_folder_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"is a file; give the folder holding config.json"):
        load_reranker(tmp_path / "model.bin", device="cpu")


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match=r"holds no config.json"):
        load_reranker(tmp_path, device="cpu")


def test_missing_weights_are_refused(saved):
    _, path = saved
    (path / WEIGHTS_NAME).unlink()
    with pytest.raises(ModelError, match=r"has config.json but no model.safetensors"):
        load_reranker(path, device="cpu")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_or_truncated_weights_are_refused(saved, damage):
    _, path = saved
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not safetensors" * 10, "empty": b""}[
            damage
        ]
    )
    with pytest.raises(
        ModelError, match=r"model.safetensors is corrupt or truncated \(.+\); save or train"
    ):
        load_reranker(path, device="cpu")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: "{not json", r"cannot read .*config.json: Expecting property name"),
        (lambda d: {**d, "format": "other"}, r"is not a crossrank reranker config"),
        (
            lambda d: {**d, "format_version": 99},
            r"has format_version 99, but this crossrank reads up to 1",
        ),
        (
            lambda d: {**d, "config": {**d["config"], "depth": 2}},
            r"invalid reranker config .*unknown reranker config fields \['depth'\]",
        ),
        (
            lambda d: {**d, "config": {**d["config"], "heads": 3}},
            r"invalid reranker config .*width must be divisible by heads",
        ),
        (
            lambda d: {**d, "config": {**d["config"], "width": 32}},
            r"weights in .* do not fit its config.json \(wrong shape: .*\)",
        ),
        (
            lambda d: {**d, "config": {**d["config"], "n_query_tokens": 0}},
            r"do not fit its config.json \(unexpected: query_attn",
        ),
    ],
    ids=["json", "format", "version", "unknown-field", "invalid-field", "shapes", "extra-weights"],
)
def test_a_bad_config_is_refused(saved, edit, match):
    _, path = saved
    config_path = path / CONFIG_NAME
    edited = edit(json.loads(config_path.read_text()))
    config_path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(ModelError, match=match):
        load_reranker(path, device="cpu")


def test_dims_that_do_not_fit_the_index_encoder_are_refused(saved):
    _, path = saved
    with pytest.raises(
        ModelMismatchError,
        match=r"takes token dim 12 and patch dim 12, but the index's encoder tiny gives 16-dim",
    ):
        load_reranker(path, device="cpu", encoder_info={"model_id": "tiny", "patch_dim": 16})
    with pytest.raises(
        ModelMismatchError,
        match=r"position embeddings for 8 patches, but the index's encoder tiny gives 49",
    ):
        check_reranker_matches(
            read_reranker_config(path), {"model_id": "tiny", "patch_dim": D, "n_patches": 49}
        )


def test_index_search_reranks_with_a_saved_reranker(built_index, tmp_path):
    from crossrank import Index

    index = Index.open(built_index, device="cpu")
    dim = int(index.manifest.encoder["patch_dim"])
    model = CrossAttentionReranker(
        RerankerConfig(text_dim=dim, patch_dim=dim, width=16, heads=2, layers=1)
    )
    path = save_reranker(model, tmp_path / "reranker")
    hits = index.search("a red circle left of a blue square", k=3, rerank_k=6, reranker=str(path))
    assert len(hits) == 3 and all(h.rerank_score is not None for h in hits)


def test_index_search_gives_a_reranker_the_layer_0_states_it_reads(
    built_index, image_folder, tmp_path
):
    from crossrank import Index

    index = Index.open(built_index, device="cpu")
    dim, width = int(index.manifest.encoder["patch_dim"]), int(index.manifest.encoder["text_width"])
    torch.manual_seed(0)
    model = CrossAttentionReranker(
        RerankerConfig(
            text_dim=dim, patch_dim=dim, width=16, heads=2, layers=1, token_embeddings=width
        )
    ).eval()
    path = save_reranker(model, tmp_path / "layer0")
    text = "a red circle left of a blue square"
    hits = index.search(text, k=3, rerank_k=6, reranker=str(path), fusion="rerank")
    feats = index.encoder.encode_text([text], token_embeddings=True)
    rows = index.stored.rows_of_ids(np.array([h.id for h in hits]))
    expected = model.score(
        torch.from_numpy(feats.reranker_tokens()[0]),
        torch.from_numpy(feats.mask[0]),
        torch.from_numpy(index.patches.gather(rows)),
    )
    np.testing.assert_allclose(
        [h.rerank_score for h in hits], expected.numpy(), rtol=1e-5, atol=1e-5
    )
    # an image query has no layer-0 text states: zeros stand in, and it still reranks
    image_hits = index.search(
        sorted(image_folder.glob("img_*.png"))[0], k=2, rerank_k=4, reranker=str(path)
    )
    assert len(image_hits) == 2 and all(h.rerank_score is not None for h in image_hits)
    wrong = save_reranker(
        CrossAttentionReranker(
            RerankerConfig(
                text_dim=dim, patch_dim=dim, width=16, heads=2, layers=1, token_embeddings=width + 1
            )
        ),
        tmp_path / "wrong",
    )
    with pytest.raises(ModelMismatchError, match=f"reads {width + 1}-dim layer-0 token states"):
        index.search(text, k=3, rerank_k=6, reranker=str(wrong))


def test_half_weights_are_half_the_size_and_score_within_fp16_rounding(saved, tmp_path):
    model, path = saved
    half = save_reranker(model, tmp_path / "half", half=True)
    assert (half / WEIGHTS_NAME).stat().st_size < 0.6 * (path / WEIGHTS_NAME).stat().st_size
    loaded = load_reranker(half, device="cpu")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(
        loaded.score(*_inputs()), model.score(*_inputs()), atol=2e-2, rtol=2e-2
    )


def test_the_shipped_reranker_is_the_default_only_for_the_encoder_it_was_trained_over(
    built_index, tmp_path, monkeypatch
):
    from crossrank import Index
    from crossrank.rerank import checkpoint

    index = Index.open(built_index, device="cpu")
    dim = int(index.manifest.encoder["patch_dim"])
    model = CrossAttentionReranker(
        RerankerConfig(text_dim=dim, patch_dim=dim, width=16, heads=2, layers=1)
    )
    shipped = tmp_path / "demo-reranker"
    monkeypatch.setattr(checkpoint, "demo_reranker_dir", lambda: shipped)
    assert index.default_reranker == "none"  # nothing shipped: the first stage alone
    sha = index.manifest.encoder["weights_sha256"]
    save_reranker(model, shipped, metadata={"data": {"encoder": "0" * 64}})
    assert index.default_reranker == "none"  # shipped for another encoder
    save_reranker(model, shipped, metadata={"data": {"encoder": sha}})
    assert index.default_reranker == str(shipped)
    hits = index.search("a red circle", k=2, rerank_k=4).hits  # reranker="auto"
    assert all(h.rerank_score is not None for h in hits)
    (shipped / CONFIG_NAME).write_text("{not json")
    assert index.default_reranker == "none"  # an unreadable shipped config is not used
