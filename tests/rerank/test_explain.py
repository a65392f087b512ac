"""Reranker.explain: the maps are the weights the model computed, never a second guess."""

import pytest
import torch
import torch.nn.functional as F

from crossrank.rerank import CrossAttentionReranker, MaxSimReranker, Reranker, RerankerConfig

D_T, D_V, K, L, P = 12, 10, 5, 6, 9


def _model(seed: int = 0, **options) -> CrossAttentionReranker:
    config = RerankerConfig(
        **{"text_dim": D_T, "patch_dim": D_V, "width": 16, "heads": 2, "layers": 2, **options}
    )
    model = CrossAttentionReranker(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return model.eval()


def _inputs(seed: int = 0, dim: int = D_T):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(L, dim, generator=g)
    token_mask = torch.tensor([True, True, True, True, False, False])
    patches = torch.randn(K, P, D_V if dim == D_T else dim, generator=g)
    patch_mask = torch.rand(K, P, generator=g) < 0.7
    patch_mask[:, :4] = True
    return tokens, token_mask, patches, patch_mask


OPTIONS = {
    "default": {},
    "gated": {"gated": True},
    "sparse": {"sparse_top_m": 3},
    "query-concat": {"n_query_tokens": 2},
    "bidirectional": {"bidirectional": True},
    "pair-head": {"pair_head": True, "patch_positions": P},
    "query-self-attn": {"query_self_attention": True},
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_cross_attention_rows_sum_to_one_over_real_patches(options):
    model = _model(**options)
    tokens, token_mask, patches, patch_mask = _inputs()
    maps = model.explain(tokens, token_mask, patches, patch_mask)
    assert maps.shape == (K, L, P) and maps.dtype == torch.float32
    real = maps[:, token_mask]  # (K, 4, P)
    torch.testing.assert_close(real.sum(-1), torch.ones(K, 4), atol=1e-5, rtol=0)
    assert (real >= 0).all()
    assert (real.masked_select(~patch_mask[:, None, :].expand_as(real)) == 0).all()
    assert (maps[:, ~token_mask] == 0).all()  # padding tokens have no map


def test_cross_attention_maps_are_the_last_layers_softmax_weights(monkeypatch):
    """Record the weights the scoring forward's last attention call computes (softmax of the
    masked logits, heads averaged) and compare: explain must return exactly those."""
    model = _model(layers=1)
    model.path = "plain"  # one attention call, heads in their own dim (folded: see below)
    tokens, token_mask, patches, patch_mask = _inputs(seed=3)
    recorded = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, scale=None, **kw):
        logits = (q.float() @ k.float().transpose(-1, -2)) * scale
        if attn_mask is not None:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        recorded.append(logits.softmax(-1))
        return sdpa(q, k, v, attn_mask=attn_mask, scale=scale, **kw)

    monkeypatch.setattr("crossrank.rerank.layers.F.scaled_dot_product_attention", spy)
    model.score(tokens, token_mask, patches, patch_mask)
    weights = recorded[-1]  # (K, heads, n_real, P): the one cross-attention of the score
    monkeypatch.setattr("crossrank.rerank.layers.F.scaled_dot_product_attention", sdpa)
    maps = model.explain(tokens, token_mask, patches, patch_mask)
    torch.testing.assert_close(maps[:, token_mask], weights.mean(1), atol=1e-6, rtol=0)


def test_sparse_top_m_puts_exactly_zero_outside_its_m_patches():
    m = 3
    model = _model(heads=1, sparse_top_m=m)
    tokens, token_mask, patches, patch_mask = _inputs(seed=1)
    maps = model.explain(tokens, token_mask, patches, patch_mask)[:, token_mask]  # (K, 4, P)
    assert ((maps > 0).sum(-1) == m).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(K, 4), atol=1e-5, rtol=0)
    dense = _model(heads=1)  # the same weights without the cut: every real patch gets some
    dense.load_state_dict(model.state_dict())
    full = dense.explain(tokens, token_mask, patches, patch_mask)[:, token_mask]
    assert ((full > 0).sum(-1) == patch_mask.sum(-1, keepdim=True)).all()


def test_folded_and_plain_paths_explain_alike():
    model = _model()
    tokens, token_mask, patches, patch_mask = _inputs(seed=2)
    model.path = "plain"
    plain = model.explain(tokens, token_mask, patches, patch_mask)
    model.path = "folded"
    folded = model.explain(tokens, token_mask, patches, patch_mask)
    torch.testing.assert_close(plain, folded, atol=1e-5, rtol=0)


def test_explain_leaves_scores_alone():
    model = _model(sparse_top_m=4)
    tokens, token_mask, patches, patch_mask = _inputs(seed=4)
    before = model.score(tokens, token_mask, patches, patch_mask)
    model.explain(tokens, token_mask, patches, patch_mask)
    assert torch.equal(model.score(tokens, token_mask, patches, patch_mask), before)


def test_query_tokens_that_replace_the_text_cannot_explain_words():
    model = _model(n_query_tokens=2, query_tokens_mode="replace")
    assert model.explain(*_inputs()) is None


def test_maxsim_map_is_one_hot_at_each_tokens_best_patch():
    tokens, token_mask, patches, patch_mask = _inputs(seed=5, dim=8)
    maps = MaxSimReranker(device="cpu").explain(tokens, token_mask, patches, patch_mask)
    assert maps.shape == (K, L, P)
    cos = F.normalize(patches, dim=-1) @ F.normalize(tokens, dim=-1).T  # (K, P, L)
    cos = cos.masked_fill(~patch_mask[..., None], -2.0)
    best = cos.argmax(1)  # (K, L)
    for t in range(L):
        if token_mask[t]:
            expected = F.one_hot(best[:, t], P).float()
            assert torch.equal(maps[:, t], expected)
        else:
            assert (maps[:, t] == 0).all()


def test_a_reranker_that_cannot_explain_says_none():
    class Plain(Reranker):
        def score(self, query, query_mask, patches, patch_mask=None):
            return torch.zeros(patches.shape[0])

    assert Plain().explain(*_inputs()) is None
