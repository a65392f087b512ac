"""The cross-attention reranker's checkpoint format: state-dict names and shapes are pinned.

Saved rerankers (the shipped one in ``crossrank/assets/demo-reranker/`` included) load with
``load_state_dict(strict=True)``; a refactor of the module tree that renames or reshapes a weight
fails here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from crossrank.rerank.checkpoint import CONFIG_NAME, WEIGHTS_NAME, demo_reranker_dir
from crossrank.rerank.config import RerankerConfig
from crossrank.rerank.cross_attention import CrossAttentionReranker

W = 8  # width of the pinned config
ALL_OPTIONS = RerankerConfig(
    text_dim=6,
    token_embeddings=3,
    patch_dim=5,
    width=W,
    heads=2,
    layers=2,
    mlp_ratio=1.0,
    gated=True,
    n_query_tokens=2,
    bidirectional=True,
    patch_self_attention=True,
    query_self_attention=True,
    sparse_top_m=3,
    patch_positions=9,
    pair_head=True,
)


def _attention(name: str) -> dict[str, tuple[int, ...]]:
    """An attention's weights: no key bias."""
    return {
        f"{name}.q.weight": (W, W),
        f"{name}.q.bias": (W,),
        f"{name}.k.weight": (W, W),
        f"{name}.v.weight": (W, W),
        f"{name}.v.bias": (W,),
        f"{name}.o.weight": (W, W),
        f"{name}.o.bias": (W,),
    }


def _norm(name: str, dim: int = W) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _layer(i: int) -> dict[str, tuple[int, ...]]:
    at = f"layers.{i}"
    gates = {f"{at}.{g}_gate": () for g in ("cross", "mlp", "patch", "query", "back")}
    return {
        **gates,
        **_norm(f"{at}.patch_norm"),
        **_attention(f"{at}.patch_attn"),
        **_norm(f"{at}.query_norm"),
        **_attention(f"{at}.query_attn"),
        **_norm(f"{at}.cross_norm"),
        **_norm(f"{at}.cross_kv_norm"),
        **_attention(f"{at}.cross_attn"),
        **_norm(f"{at}.back_norm"),
        **_norm(f"{at}.back_kv_norm"),
        **_attention(f"{at}.back_attn"),
        **_norm(f"{at}.mlp_norm"),
        f"{at}.mlp.fc.weight": (W, W),
        f"{at}.mlp.fc.bias": (W,),
        f"{at}.mlp.proj.weight": (W, W),
        f"{at}.mlp.proj.bias": (W,),
    }


#: Every option on: the names and shapes checkpoints were written with (138 entries).
ALL_OPTIONS_KEYS = {
    "patch_pos": (9, 5),
    "query_tokens": (2, W),
    **_norm("text_norm", 9),
    **_norm("patch_norm", 5),
    "text_in.weight": (W, 9),
    "text_in.bias": (W,),
    "patch_in.weight": (W, 5),
    "patch_in.bias": (W,),
    **_norm("query_norm"),
    **_norm("query_kv_norm"),
    **_attention("query_attn"),
    **_layer(0),
    **_layer(1),
    **_norm("out_norm"),
    "head.0.weight": (W, W),
    "head.0.bias": (W,),
    "head.2.weight": (1, W),
    "head.2.bias": (1,),
    "pair_gate": (1,),
    **_norm("pair_norm"),
    "pair_u.weight": (W, W),
    "pair_u.bias": (W,),
    "pair_v.weight": (W, W),
    "pair_where.weight": (W, 4),
    "pair_out.weight": (1, W),
    "pair_out.bias": (1,),
}

SOME_CONFIGS = {
    "default": {},
    "ungated-pair-head": {"pair_head": True, "gated": False},
    "query-replace": {"n_query_tokens": 2, "query_tokens_mode": "replace"},
    "bidirectional": {"bidirectional": True, "patch_self_attention": False},
    "no-prenorm": {"prenorm": False, "pair_head": False, "patch_positions": None},
}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def test_every_option_keeps_its_checkpoint_names_and_shapes():
    assert len(ALL_OPTIONS_KEYS) == 138
    assert _shapes(CrossAttentionReranker(ALL_OPTIONS)) == ALL_OPTIONS_KEYS


def test_the_shipped_checkpoint_has_exactly_the_models_names_and_shapes():
    folder = demo_reranker_dir()
    config = RerankerConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text())["config"])
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as weights:
        stored = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    model = CrossAttentionReranker(config)
    assert _shapes(model) == stored
    # The shipped options: the pair head and query self-attention, under their flat names.
    assert config.pair_head and config.query_self_attention
    assert {"pair_u.weight", "layers.0.query_attn.q.weight", "layers.0.cross_kv_norm.weight"} & set(
        stored
    ) == {"pair_u.weight", "layers.0.query_attn.q.weight"}  # layer 1 reads p without a norm


@pytest.mark.parametrize("options", SOME_CONFIGS.values(), ids=SOME_CONFIGS.keys())
def test_a_state_dict_round_trips_strictly_with_flat_pair_head_names(options):
    config = RerankerConfig(**{**ALL_OPTIONS.to_dict(), "gated": False, **options})
    torch.manual_seed(0)
    model = CrossAttentionReranker(config)
    state = model.state_dict()
    assert not any(name.startswith("pair.") for name in state)  # saved as pair_u.weight, ...
    assert ("pair_u.weight" in state) == config.pair_head
    other = CrossAttentionReranker(config)
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(state[name], t) for name, t in other.state_dict().items())


def test_a_reranker_inside_another_module_saves_and_loads_the_same_names():
    outer = torch.nn.ModuleDict({"reranker": CrossAttentionReranker(ALL_OPTIONS)})
    state = outer.state_dict()
    assert set(state) == {f"reranker.{name}" for name in ALL_OPTIONS_KEYS}
    torch.nn.ModuleDict({"reranker": CrossAttentionReranker(ALL_OPTIONS)}).load_state_dict(
        state, strict=True
    )
    with pytest.raises(RuntimeError, match="pair_u.weight"):  # strict still names a missing one
        outer.load_state_dict({k: v for k, v in state.items() if k != "reranker.pair_u.weight"})
