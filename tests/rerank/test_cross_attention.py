import numpy as np
import pytest
import torch

from crossrank.errors import InvalidArgumentError
from crossrank.rerank import CrossAttentionReranker, PatchKV, Reranker, RerankerConfig
from crossrank.rerank.layers import attend

D_T, D_V, K, L, P = 12, 10, 5, 6, 7

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]

# Option sets covering every flag, alone and combined (ids name them in the test report).
OPTIONS = {
    "default": {},
    "ungated": {"gated": False},
    "no-prenorm": {"prenorm": False},
    "bidirectional": {"bidirectional": True},
    "patch-self-attn": {"patch_self_attention": True},
    "query-self-attn": {"query_self_attention": True},
    "bidir+patch-sa": {"bidirectional": True, "patch_self_attention": True},
    "query-concat": {"n_query_tokens": 2},
    "query-replace": {"n_query_tokens": 2, "query_tokens_mode": "replace"},
    "sparse": {"sparse_top_m": 3},
    "positions": {"patch_positions": 12},
    "first-pooling": {"pooling": "first", "n_query_tokens": 2},
    "first-text-token": {"pooling": "first"},
    "everything": {
        "bidirectional": True,
        "n_query_tokens": 2,
        "sparse_top_m": 3,
        "patch_positions": 12,
        "pooling": "first",
        "query_self_attention": True,
    },
    "pair-head": {"pair_head": True, "patch_positions": 16},
    "pair-width": {"pair_head": True, "patch_positions": 16, "pair_width": 5},
    "pair+everything": {
        "pair_head": True,
        "patch_positions": 16,
        "bidirectional": True,
        "n_query_tokens": 2,
        "sparse_top_m": 3,
        "query_self_attention": True,
    },
}


def _config(**options) -> RerankerConfig:
    # Gated (not the library default), so that every test also runs through the gates.
    base = {
        "text_dim": D_T,
        "patch_dim": D_V,
        "width": 16,
        "heads": 2,
        "layers": 2,
        "mlp_ratio": 2.0,
        "gated": True,
    }
    return RerankerConfig(**{**base, **options})


def _randomize(
    model: torch.nn.Module, seed: int = 0, std: float = 0.3, gates: bool = True
) -> torch.nn.Module:
    """Every parameter random (gates too, unless ``gates=False``), so no branch is silently zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if gates or not name.rpartition(".")[2].endswith("gate"):  # cross_gate, pair.gate
                param.copy_(torch.randn(param.shape, generator=g) * std)
    return model.eval()


def _model(seed: int = 0, **options) -> CrossAttentionReranker:
    return _randomize(CrossAttentionReranker(_config(**options)), seed)


def _inputs(seed: int = 0, k: int = K, n_tokens: int = L, n_patches: int = P):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n_tokens, D_T, generator=g)
    token_mask = torch.rand(n_tokens, generator=g) < 0.7
    token_mask[0] = True
    patches = torch.randn(k, n_patches, D_V, generator=g)
    patch_mask = torch.rand(k, n_patches, generator=g) < 0.7
    patch_mask[:, 0] = True
    return tokens, token_mask, patches, patch_mask


def _close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_implements_the_reranker_protocol():
    model = _model()
    tokens, token_mask, patches, patch_mask = _inputs()
    scores = model.score(
        tokens.numpy(), token_mask.numpy(), patches.half().numpy(), patch_mask.numpy()
    )
    assert isinstance(model, Reranker) and model.name == "cross-attention"
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (K,)
    assert model.score(tokens, token_mask, patches[:0]).shape == (0,)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_batched_scores_equal_per_candidate_scores(options):
    model = _model(**options)
    tokens, token_mask, patches, patch_mask = _inputs()
    together = model.score(tokens, token_mask, patches, patch_mask)
    alone = torch.cat(
        [
            model.score(tokens, token_mask, patches[c : c + 1], patch_mask[c : c + 1])
            for c in range(K)
        ]
    )
    _close(together, alone)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_padding_tokens_and_patches_never_change_a_score(options):
    model = _model(**options)
    tokens, token_mask, patches, patch_mask = _inputs()
    # forward() keeps the padding tokens in the computation (score() drops them up front).
    before = model(tokens, token_mask, patches, patch_mask).detach()
    _close(model.score(tokens, token_mask, patches, patch_mask), before)

    # 1. Other content at the masked positions, NaN and inf included.
    g = torch.Generator().manual_seed(1)
    junk_tokens = torch.where(
        token_mask[:, None], tokens, torch.randn(tokens.shape, generator=g) * 100
    )
    junk_patches = torch.where(
        patch_mask[..., None], patches, torch.randn(patches.shape, generator=g) * 100
    )
    junk_tokens[~token_mask] = float("nan")
    junk_patches[~patch_mask] = float("inf")
    _close(model(junk_tokens, token_mask, junk_patches, patch_mask).detach(), before)

    # 2. More padding: tokens before and after, extra patch slots after, all masked.
    more_tokens = torch.cat(
        [torch.randn(2, D_T, generator=g), tokens, torch.randn(3, D_T, generator=g) * 50]
    )
    more_token_mask = torch.cat(
        [torch.zeros(2, dtype=torch.bool), token_mask, torch.zeros(3, dtype=torch.bool)]
    )
    more_patches = torch.cat([patches, torch.randn(K, 4, D_V, generator=g) * 50], dim=1)
    more_patch_mask = torch.cat([patch_mask, torch.zeros(K, 4, dtype=torch.bool)], dim=1)
    _close(model(more_tokens, more_token_mask, more_patches, more_patch_mask).detach(), before)
    _close(model.score(more_tokens, more_token_mask, more_patches, more_patch_mask), before)


@pytest.mark.parametrize(
    "options",
    [
        OPTIONS[name]
        for name in ("default", "bidir+patch-sa", "query-concat", "query-replace", "everything")
    ],
    ids=["default", "bidir+patch-sa", "query-concat", "query-replace", "everything"],
)
def test_an_untrained_gated_model_starts_from_the_identity(options):
    # Every weight random except the gates, which keep their initial 0: the branches are large,
    # and must still contribute exactly nothing.
    model = _randomize(CrossAttentionReranker(_config(**options)), gates=False)
    tokens, token_mask, patches, patch_mask = _inputs()
    pooled = model.forward_batch(
        tokens[None], token_mask[None], patches[None], patch_mask[None], output="pooled"
    )[0]  # (k, width)
    states, keep = model.encode_query(tokens[None], token_mask[None])  # (1, n, width), (1, n)
    if model.config.pooling == "first":
        expected = states[0, 0]
    else:
        expected = states[0][keep[0]].mean(dim=0)
    torch.testing.assert_close(pooled, expected.expand_as(pooled), atol=1e-6, rtol=0)
    assert torch.equal(pooled, pooled[:1].expand_as(pooled))  # exactly: no candidate-dependent term

    with torch.no_grad():
        model.layers[0].cross_gate.fill_(0.5)
    moved = model.forward_batch(
        tokens[None], token_mask[None], patches[None], patch_mask[None], output="pooled"
    )[0]
    assert not torch.allclose(moved, pooled, atol=1e-3)


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_folded_and_precomputed_attention_equal_the_plain_formulation(options):
    model = _model(**options)
    tokens, token_mask, patches, patch_mask = _inputs()
    with torch.no_grad():
        plain = model(tokens, token_mask, patches, patch_mask, path="plain")
        auto = model(tokens, token_mask, patches, patch_mask, path="auto")
        # As at index time: a cache over a larger bank, then the query's candidate rows cut out.
        bank_patches = torch.cat([torch.randn(3, P, D_V), patches])
        bank_mask = torch.cat([torch.ones(3, P, dtype=torch.bool), patch_mask])
        cache = model.precompute_kv(bank_patches, bank_mask).select(torch.arange(3, 3 + K))
        precomputed = model(tokens, token_mask, cache)
    _close(auto, plain)
    _close(precomputed, plain)
    if model.config.foldable_layers:
        _close(model(tokens, token_mask, patches, patch_mask, path="folded").detach(), plain)


def test_folded_weights_kept_across_calls_follow_every_weight_change():
    model = _model()
    tokens, token_mask, patches, _ = _inputs()
    other = _model(seed=1)

    def plain():
        with torch.no_grad():
            return model(tokens, token_mask, patches, path="plain")

    first = model.score(tokens, token_mask, patches)  # fills the cache (inference mode)
    _close(first, plain())
    assert model.score(tokens, token_mask, patches).equal(first)  # served from the cache
    with torch.no_grad():  # as an optimizer step does: in place, outside inference mode
        model.patch_in.weight.mul_(1.5)
        model.layers[1].cross_attn.o.bias.add_(0.25)
    stepped = model.score(tokens, token_mask, patches)
    assert not torch.allclose(stepped, first, atol=1e-3)
    _close(stepped, plain())
    model.load_state_dict(other.state_dict())
    _close(model.score(tokens, token_mask, patches), plain())
    before = model.score(tokens, token_mask, patches)
    model.patch_in.weight.data = model.patch_in.weight.data * 2  # new storage at version 0
    moved = model.score(tokens, token_mask, patches)
    assert not torch.allclose(moved, before, atol=1e-3)
    _close(moved, plain())


def test_a_callers_cpu_autocast_leaves_the_kept_folded_weights_in_float32():
    model = _model(seed=2)
    tokens, token_mask, patches, _ = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fills the cache inside the caller's
        in_bf16 = model.score(tokens, token_mask, patches)
    after = model.score(tokens, token_mask, patches)
    assert after.equal(_model(seed=2).score(tokens, token_mask, patches))  # a fresh cache's
    assert not in_bf16.equal(after)  # the autocast region itself did run in bf16


@pytest.mark.parametrize(
    "options", [OPTIONS["default"], OPTIONS["everything"]], ids=["default", "everything"]
)
def test_no_patch_mask_scores_as_an_all_true_mask(options):
    model = _model(**options)
    tokens, token_mask, patches, _ = _inputs()
    all_real = torch.ones(patches.shape[:2], dtype=torch.bool)
    _close(
        model.score(tokens, token_mask, patches), model.score(tokens, token_mask, patches, all_real)
    )


@pytest.mark.parametrize("path", ["folded", "precomputed"])
def test_stored_patches_are_never_projected_per_query(path):
    model = _model()
    tokens, token_mask, patches, patch_mask = _inputs()
    cache = model.precompute_kv(patches, patch_mask) if path == "precomputed" else None
    calls = []
    watched = [model.patch_in] + [
        m for layer in model.layers for m in (layer.cross_attn.k, layer.cross_attn.v)
    ]
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in watched]
    try:
        with torch.no_grad():
            if cache is not None:
                model(tokens, token_mask, cache)
            else:
                model(tokens, token_mask, patches, patch_mask, path="folded")
            assert calls == []
            model(tokens, token_mask, patches, patch_mask, path="plain")  # the hooks do fire
            assert calls
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(
    "options",
    [OPTIONS["default"], OPTIONS["everything"], OPTIONS["pair+everything"]],
    ids=["default", "everything", "pair+everything"],
)
def test_forward_batch_equals_forward_per_query(options):
    model = _model(**options)
    queries = [_inputs(seed) for seed in range(3)]
    tokens = torch.stack([q[0] for q in queries])
    token_mask = torch.stack([q[1] for q in queries])
    token_mask[1, 3:] = False  # queries of different lengths
    patches = torch.stack([q[2] for q in queries])
    patch_mask = torch.stack([q[3] for q in queries])
    with torch.no_grad():
        batched = model.forward_batch(tokens, token_mask, patches, patch_mask)
        one_by_one = torch.stack(
            [model(tokens[b], token_mask[b], patches[b], patch_mask[b]) for b in range(3)]
        )
    assert batched.shape == (3, K) and batched.dtype == torch.float32
    _close(batched, one_by_one)


@pytest.mark.parametrize(
    ("option", "off", "on"),
    [
        ("prenorm", False, True),
        ("gated", False, True),
        ("bidirectional", False, True),
        ("patch_self_attention", False, True),
        ("query_self_attention", False, True),
        ("n_query_tokens", 0, 2),
        ("query_tokens_mode", "concat", "replace"),
        ("sparse_top_m", None, 2),
        ("patch_positions", None, 12),
        ("pair_head", False, True),
        ("pooling", "mean", "first"),
        ("layers", 1, 2),
        ("heads", 2, 4),
        ("mlp_ratio", 2.0, 3.0),
    ],
)
def test_each_option_changes_the_scores(option, off, on):
    base = {"n_query_tokens": 2} if option == "query_tokens_mode" else {}
    base = {"patch_positions": 16} if option == "pair_head" else base
    model_on = _model(**base, **{option: on})
    model_off = CrossAttentionReranker(_config(**base, **{option: off}))
    _randomize(model_off, seed=1)
    # Share every weight the two have in common, so only the option differs.
    shared = {
        n: t
        for n, t in model_on.state_dict().items()
        if n in model_off.state_dict() and model_off.state_dict()[n].shape == t.shape
    }
    model_off.load_state_dict(shared, strict=False)
    inputs = _inputs()
    assert not torch.allclose(model_on.score(*inputs), model_off.score(*inputs), atol=1e-4)


@pytest.mark.parametrize("path", ["plain", "folded", "precomputed"])
def test_the_pair_head_reads_where_each_position_looked(path):
    # Two patches carry the only content; swapping where they lie changes nothing for a model
    # without positions, and must change the pair head's score (it reads the attended
    # coordinates; the position embedding is zeroed so nothing else sees the grid).
    tokens, token_mask, _, _ = _inputs()
    g = torch.Generator().manual_seed(3)
    patches = torch.zeros(2, 16, D_V)
    a, b = torch.randn(D_V, generator=g) * 3, torch.randn(D_V, generator=g) * 3
    patches[0, 0], patches[0, 15] = a, b  # a top left, b bottom right
    patches[1, 15], patches[1, 0] = a, b  # swapped
    scores = {}
    for pair in (False, True):
        model = _model(pair_head=pair, patch_positions=16, gated=False)
        with torch.no_grad():
            model.patch_pos.zero_()
            model.layers[-1].cross_attn.k.weight.mul_(10)  # peaked attention: positions that matter
            if pair:
                model.pair.where.weight.mul_(10)
            source = model.precompute_kv(patches) if path == "precomputed" else patches
            scores[pair] = model(
                tokens, token_mask, source, path="plain" if path == "precomputed" else path
            )
    _close(scores[False][0], scores[False][1])
    assert abs(float(scores[True][0] - scores[True][1])) > 1e-3


@pytest.mark.parametrize(
    "options",
    [OPTIONS["default"], OPTIONS["pair-head"], OPTIONS["pair+everything"]],
    ids=["default", "pair-head", "pair+everything"],
)
def test_attend_to_averages_channels_with_the_last_layers_attention(options):
    model = _model(**options)
    tokens, token_mask, patches, patch_mask = _inputs()
    # Channels: all ones, the padding indicator, and one random channel.
    g = torch.Generator().manual_seed(4)
    channels = torch.stack(
        [torch.ones(K, P), (~patch_mask).float(), torch.rand(K, P, generator=g)], dim=-1
    )
    args = (tokens[None], token_mask[None], patches[None], patch_mask[None])
    with torch.no_grad():
        plain_logits = model.forward_batch(*args, path="plain")
        results = {
            path: model.forward_batch(*args, path=path, attend_to=channels[None])
            for path in ("plain", "auto")
        }
        cache = model.precompute_kv(patches, patch_mask)
        results["precomputed"] = model.forward_batch(
            tokens[None], token_mask[None], cache.unsqueeze(0), attend_to=channels[None]
        )
    for logits, attended in results.values():
        _close(logits, plain_logits)  # asking changes no score
        n = model.encode_query(tokens[None], token_mask[None])[1].shape[1]
        assert attended.shape == (1, K, n, 3)
        _close(attended[..., 0], torch.ones_like(attended[..., 0]))  # the weights sum to 1
        _close(attended[..., 1], torch.zeros_like(attended[..., 1]))  # padding gets none
        _close(attended, results["plain"][1])


def test_attend_to_gives_the_attention_weights_of_a_one_layer_model():
    model = _model(layers=1, gated=False)
    tokens, token_mask, patches, patch_mask = _inputs()
    with torch.no_grad():
        _, attended = model.forward_batch(
            tokens[None],
            token_mask[None],
            patches[None],
            patch_mask[None],
            attend_to=torch.eye(P).expand(1, K, P, P),
        )  # channel j = patch j
        x, _ = model.encode_query(tokens[None], token_mask[None])  # (1, n, width)
        layer = model.layers[0]
        q = layer.cross_attn.project_q(layer.cross_norm(x))  # (1, heads, n, e)
        p = model.patch_in(model._patch_stream(patches, patch_mask, None).prepared)  # (K, P, w)
        k, _ = layer.cross_attn.project_kv(layer.cross_kv_norm(p))  # (K, heads, P, e)
        logits = (q @ k.transpose(-1, -2)) * layer.cross_attn.scale  # (K, heads, n, P)
        weights = logits.masked_fill(~patch_mask[:, None, None, :], float("-inf")).softmax(-1)
    _close(attended[0], weights.mean(dim=1))  # (K, n, P), heads averaged


def test_attend_to_of_the_wrong_shape_is_refused():
    model = _model()
    tokens, token_mask, patches, patch_mask = _inputs()
    with pytest.raises(InvalidArgumentError, match=r"attend_to must have shape \(1, 5, 7\)"):
        model.forward_batch(
            tokens[None],
            token_mask[None],
            patches[None],
            patch_mask[None],
            attend_to=torch.ones(1, K, P - 1, 2),
        )


def test_an_untrained_gated_pair_head_adds_nothing():
    model = _randomize(
        CrossAttentionReranker(_config(pair_head=True, patch_positions=16)), gates=False
    )
    tokens, token_mask, patches, patch_mask = _inputs()
    with torch.no_grad():
        for layer in model.layers:  # the layers' gates on too: the pair head alone is at 0
            layer.cross_gate.fill_(0.5)
            layer.mlp_gate.fill_(0.5)
        logits = model(tokens, token_mask, patches, patch_mask)
        pooled = model.forward_batch(
            tokens[None], token_mask[None], patches[None], patch_mask[None], output="pooled"
        )[0]
        _close(logits, model.head(model.out_norm(pooled)).squeeze(-1))
        model.pair.gate.fill_(0.5)
        assert not torch.allclose(model(tokens, token_mask, patches, patch_mask), logits, atol=1e-3)


def test_the_pair_head_scores_alike_with_and_without_autograd(monkeypatch):
    # Without autograd the pair head runs a few candidates at a time (an in-place GELU per chunk);
    # a small chunk size makes k = 7 span several chunks with a short last one.
    import crossrank.rerank.pair_head as module

    model = _model(pair_head=True, patch_positions=16, query_self_attention=True)
    tokens, token_mask, patches, patch_mask = _inputs(k=7)
    with torch.enable_grad():
        with_grad = model(tokens, token_mask, patches, patch_mask)
    assert with_grad.requires_grad
    monkeypatch.setattr(
        module, "_PAIR_CHUNK_VALUES", 3 * L * L * model.config.width
    )  # 3 candidates a chunk
    with torch.no_grad():
        chunked = model(tokens, token_mask, patches, patch_mask)
    _close(chunked, with_grad.detach())
    # score() drops the padding tokens: every pair is real, the sum needs no mask.
    with torch.enable_grad():
        real = model(tokens[token_mask], token_mask[token_mask], patches, patch_mask)
    _close(model.score(tokens, token_mask, patches, patch_mask), real.detach())


def test_pair_width_sets_the_pair_heads_hidden_size():
    model = _model(pair_head=True, patch_positions=16, pair_width=3)
    assert model.pair.u.weight.shape == (3, 16) and model.pair.out.weight.shape == (1, 3)
    assert _model(pair_head=True, patch_positions=16).pair.u.weight.shape == (16, 16)
    tokens, token_mask, patches, patch_mask = _inputs()
    assert model.score(tokens, token_mask, patches, patch_mask).isfinite().all()
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"pair_width must be None"):
            _config(pair_head=True, patch_positions=16, pair_width=bad)


def test_a_pair_head_needs_a_square_patch_grid():
    with pytest.raises(
        ValueError, match=r"pair_head needs patch_positions set to the encoder's square patch grid"
    ):
        _config(pair_head=True, patch_positions=12)
    with pytest.raises(ValueError, match=r"got None"):
        _config(pair_head=True)


def test_dropout_acts_in_training_only():
    tokens, token_mask, patches, patch_mask = _inputs()
    model = _model(dropout=0.5)
    no_dropout = CrossAttentionReranker(_config())
    no_dropout.load_state_dict(model.state_dict())
    no_dropout.eval()
    _close(
        model.score(tokens, token_mask, patches, patch_mask),
        no_dropout.score(tokens, token_mask, patches, patch_mask),
    )
    torch.manual_seed(0)
    trained = model.train()(tokens, token_mask, patches, patch_mask).detach()
    assert not torch.allclose(
        trained, no_dropout(tokens, token_mask, patches, patch_mask).detach(), atol=1e-4
    )


@pytest.mark.parametrize(
    "options", [OPTIONS["default"], OPTIONS["positions"]], ids=["default", "positions"]
)
def test_sparse_top_m_covering_every_real_patch_equals_dense(options):
    tokens, token_mask, patches, patch_mask = _inputs()
    patch_mask[:, 5:] = False  # at most 5 real patches per candidate, P = 7
    dense = _model(**options).score(tokens, token_mask, patches, patch_mask)
    for m in (5, P, P + 3):
        sparse = _model(**options, sparse_top_m=m).score(tokens, token_mask, patches, patch_mask)
        _close(sparse, dense)


def test_top_1_attention_returns_the_value_of_the_best_real_key():
    q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # (1, heads=1, n=2, e=2)
    k = torch.tensor([[[[3.0, 0.0], [0.0, 2.0], [5.0, 5.0]]]])  # (1, 1, S=3, 2)
    v = torch.tensor([[[[10.0], [20.0], [30.0]]]])
    keep = torch.tensor([True, True, False])  # the key both queries would pick is padding
    out = attend(q, k, v, keep, scale=1.0, top_m=1)
    assert out.flatten().tolist() == [10.0, 20.0]


def test_forward_batch_is_differentiable_in_both_paths():
    tokens, token_mask, patches, patch_mask = _inputs()
    for path in ("plain", "folded"):
        model = CrossAttentionReranker(_config()).train()
        model.forward_batch(
            tokens[None], token_mask[None], patches[None], patch_mask[None], path=path
        ).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        assert grads["layers.0.cross_gate"].abs() > 0  # the gates at 0 still learn


@pytest.mark.parametrize("device", DEVICES)
def test_scores_on_each_device_match_float32_cpu(device):
    model = _randomize(
        CrossAttentionReranker(_config(n_query_tokens=2, bidirectional=True)), std=0.1
    )
    tokens, token_mask, patches, patch_mask = _inputs(k=50)
    expected = model.score(tokens, token_mask, patches, patch_mask)
    model.to(device)
    got = model.score(tokens, token_mask, patches.half(), patch_mask)  # the store's fp16 patches
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    # CUDA runs in bf16 autocast (about 3 significant digits) with fp32 pooling and head.
    atol = 1e-5 if device == "cpu" else 3e-2
    torch.testing.assert_close(
        got, expected, atol=atol + float(expected.abs().max()) * 1e-3, rtol=0
    )
    if device == "cpu":  # fp16 storage then float32 compute: the only error is the fp16 rounding
        torch.testing.assert_close(
            got, model.score(tokens, token_mask, patches.half().float(), patch_mask)
        )


# -- errors --------------------------------------------------------------------------------------


def test_dims_that_do_not_match_the_config_are_refused():
    model = _model()
    tokens, token_mask, patches, patch_mask = _inputs()
    with pytest.raises(
        InvalidArgumentError, match=r"made for token dim 12 and patch dim 10, got token dim 8"
    ):
        model.score(tokens[:, :8], token_mask, patches, patch_mask)
    with pytest.raises(InvalidArgumentError, match=r"got token dim 12 and patch dim 9"):
        model.precompute_kv(patches[..., :9])


def test_more_patches_than_position_embeddings_are_refused():
    model = _model(patch_positions=4)
    tokens, token_mask, patches, patch_mask = _inputs()
    with pytest.raises(
        InvalidArgumentError, match=r"position embeddings for 4 patches, got 7 patches"
    ):
        model.score(tokens, token_mask, patches, patch_mask)


def test_folding_a_config_that_cannot_fold_is_refused():
    model = _model(patch_self_attention=True)
    tokens, token_mask, patches, patch_mask = _inputs()
    with pytest.raises(InvalidArgumentError, match=r"path='folded' needs keys/values linear"):
        model(tokens, token_mask, patches, patch_mask, path="folded")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda m, t, tm, p, pm: m.forward_batch(t, tm, p, pm),
            r"forward_batch needs tokens \(B, L, token_input_dim\)",
        ),
        (
            lambda m, t, tm, p, pm: m(t, tm.float(), p, pm),
            r"token_mask must be bool of shape \(1, 6\)",
        ),
        (
            lambda m, t, tm, p, pm: m(t, tm, p, pm[:, :3]),
            r"patch_mask must be bool of shape \(1, 5, 7\)",
        ),
        (
            lambda m, t, tm, p, pm: m(t, tm, m.precompute_kv(p), pm),
            r"patch_mask must be None with a PatchKV",
        ),
        (
            lambda m, t, tm, p, pm: m(t, tm, p, pm, path="fast"),
            r"path must be one of auto, plain, folded",
        ),
        (
            lambda m, t, tm, p, pm: m.forward_batch(t[None], tm[None], p[None], output="x"),
            r"output must be",
        ),
        (
            lambda m, t, tm, p, pm: m.score(t, torch.zeros_like(tm), p, pm),
            r"query has no real token",
        ),
        (
            lambda m, t, tm, p, pm: m.precompute_kv(p, pm[:2]),
            r"patch_mask must have shape \(5, 7\)",
        ),
    ],
    ids=[
        "batch-rank",
        "token-mask",
        "patch-mask",
        "mask-with-cache",
        "path",
        "output",
        "empty-query",
        "kv-mask",
    ],
)
def test_bad_inputs_are_refused(call, match):
    model = _model()
    with pytest.raises(InvalidArgumentError, match=match):
        call(model, *_inputs())


def test_patch_kv_select_cuts_rows():
    model = _model(bidirectional=True)
    _, _, patches, patch_mask = _inputs()
    cache = model.precompute_kv(patches, patch_mask)
    part = cache.select(np.array([4, 1]))
    assert isinstance(part, PatchKV) and len(part) == 2 and len(cache) == K
    assert torch.equal(part.keys[0][0], cache.keys[0][4]) and torch.equal(
        part.states[1], cache.states[1]
    )


@pytest.mark.parametrize(
    ("init", "std_of"), [("bert", lambda fan_in: 0.02), ("lecun", lambda fan_in: fan_in**-0.5)]
)
def test_init_scheme_sets_the_scale_of_every_linear_map(init, std_of):
    torch.manual_seed(0)
    model = CrossAttentionReranker(
        RerankerConfig(text_dim=64, patch_dim=48, width=64, heads=4, init=init, patch_positions=16)
    )
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for module in linears:
        expected = std_of(module.in_features)
        assert module.weight.std().item() == pytest.approx(expected, rel=0.15), module
        assert module.bias is None or torch.count_nonzero(module.bias) == 0
    assert model.patch_pos.std().item() == pytest.approx(0.02, rel=0.15)  # both schemes
    if init == "lecun":  # unit-scale projections: attention logits are not crushed towards uniform
        assert model.text_in.weight.std().item() > 5 * 0.02


@pytest.mark.parametrize("prenorm", [True, False])
def test_scoring_never_writes_into_the_callers_patches(prenorm):
    # x̃ = LN(patches) + pos is made in place where the stream owns the tensor: never the input.
    model = _model(prenorm=prenorm, patch_positions=P)
    tokens, token_mask, patches, _ = _inputs()
    before = patches.clone()
    model.score(tokens, token_mask, patches)
    with torch.no_grad():
        model(tokens, token_mask, patches, path="folded")
    assert torch.equal(patches, before)
