import numpy as np
import pytest
import torch

from crossrank.errors import InvalidArgumentError
from crossrank.rerank import MaxSimReranker, Reranker

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


def _reference_maxsim(query, query_mask, patches, patch_mask):
    """Per-candidate, per-token, per-patch python loops in float64: the definition, spelled out."""
    query = np.asarray(query, dtype=np.float64)
    patches = np.asarray(patches, dtype=np.float64)
    scores = []
    for c in range(patches.shape[0]):
        best_per_token = []
        for t in range(query.shape[0]):
            if not query_mask[t]:
                continue
            q = query[t] / np.linalg.norm(query[t])
            best = max(
                float(q @ patches[c, p] / np.linalg.norm(patches[c, p]))
                for p in range(patches.shape[1])
                if patch_mask[c, p]
            )
            best_per_token.append(best)
        scores.append(np.mean(best_per_token))
    return np.array(scores)


def _random_inputs(seed, k=7, n_tokens=5, n_patches=9, dim=16):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(n_tokens, dim, generator=g)
    query_mask = torch.rand(n_tokens, generator=g) < 0.7
    query_mask[0] = True
    patches = torch.randn(k, n_patches, dim, generator=g)
    patch_mask = torch.rand(k, n_patches, generator=g) < 0.8
    patch_mask[:, 0] = True
    return query, query_mask, patches, patch_mask


def test_hand_computed_two_tokens_three_patches():
    # Query tokens are not unit length, and neither are the patches: MaxSim uses cosines.
    query = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    patches = torch.tensor(
        [
            [
                [1.0, 0.0],
                [0.6, 0.8],
                [0.0, -2.0],
            ],  # token 1: max(1, .6, 0) = 1; token 2: max(0, .8, -1) = .8
            [
                [-1.0, 0.0],
                [0.0, 3.0],
                [3.0, 4.0],
            ],  # token 1: max(-1, 0, .6) = .6; token 2: max(0, 1, .8) = 1
        ]
    )
    scores = MaxSimReranker(device="cpu").score(query, torch.tensor([True, True]), patches)
    assert scores.dtype == torch.float32
    assert scores.device.type == "cpu"
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.8]))


def test_hand_computed_with_padding_token_and_patch():
    # The padding token would score -1 everywhere; the padding patch would be a perfect match.
    query = torch.tensor([[1.0, 0.0], [-1.0, -1.0]])
    patches = torch.tensor([[[0.6, 0.8], [0.0, 1.0], [5.0, 0.0]]])
    scores = MaxSimReranker(device="cpu").score(
        query, torch.tensor([True, False]), patches, torch.tensor([[True, True, False]])
    )
    torch.testing.assert_close(scores, torch.tensor([0.6]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_scores_equal_per_candidate_loop(device, seed):
    query, query_mask, patches, patch_mask = _random_inputs(seed)
    reranker = MaxSimReranker(device=device)
    scores = reranker.score(query, query_mask, patches, patch_mask)
    assert scores.shape == (7,)
    assert scores.device.type == "cpu"
    expected = _reference_maxsim(
        query.numpy(), query_mask.numpy(), patches.numpy(), patch_mask.numpy()
    )
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-5)
    # One candidate at a time through the same API gives the same numbers as the batch.
    one_by_one = torch.cat(
        [
            reranker.score(query, query_mask, patches[c : c + 1], patch_mask[c : c + 1])
            for c in range(7)
        ]
    )
    torch.testing.assert_close(scores, one_by_one, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_patches_never_change_scores(device):
    query, query_mask, patches, _ = _random_inputs(3, n_patches=6)
    reranker = MaxSimReranker(device=device)
    clean = reranker.score(query, query_mask, patches)
    # Padding patches that would beat every real patch: copies of the query's own tokens.
    k, dim = patches.shape[0], patches.shape[2]
    pad = query[query_mask][:1].expand(k, 3, dim) * 100.0
    padded = torch.cat([patches, pad], dim=1)  # (k, 9, dim)
    mask = torch.cat(
        [torch.ones(k, 6, dtype=torch.bool), torch.zeros(k, 3, dtype=torch.bool)], dim=1
    )
    torch.testing.assert_close(reranker.score(query, query_mask, padded, mask), clean)
    # Without the mask the padding would win: the check above is not vacuous.
    assert (reranker.score(query, query_mask, padded) > clean).all()


@pytest.mark.parametrize("device", DEVICES)
def test_padding_tokens_never_change_scores(device):
    query, _, patches, patch_mask = _random_inputs(4, n_tokens=4)
    reranker = MaxSimReranker(device=device)
    clean = reranker.score(query, torch.ones(4, dtype=torch.bool), patches, patch_mask)
    junk = torch.randn(3, query.shape[1], generator=torch.Generator().manual_seed(9)) * 50.0
    padded = torch.cat(
        [query[:2], junk[:1], query[2:], junk[1:]]
    )  # padding in the middle and at the end
    mask = torch.tensor([True, True, False, True, True, False, False])
    torch.testing.assert_close(reranker.score(padded, mask, patches, patch_mask), clean)
    assert not torch.allclose(
        reranker.score(padded, torch.ones(7, dtype=torch.bool), patches, patch_mask), clean
    )


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_patches_score_like_fp32(device):
    query, query_mask, patches, patch_mask = _random_inputs(5, k=20, n_patches=49, dim=64)
    reranker = MaxSimReranker(device=device)
    full = reranker.score(query, query_mask, patches, patch_mask)
    half = reranker.score(query, query_mask, patches.half(), patch_mask)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0, atol=3e-3)


def test_scores_are_cosines_invariant_to_feature_scale():
    query, query_mask, patches, patch_mask = _random_inputs(6)
    reranker = MaxSimReranker(device="cpu")
    base = reranker.score(query, query_mask, patches, patch_mask)
    scale = torch.linspace(0.1, 10.0, patches.shape[0] * patches.shape[1]).view(
        patches.shape[0], -1, 1
    )
    torch.testing.assert_close(
        reranker.score(query * 7.0, query_mask, patches * scale, patch_mask), base
    )
    assert ((base >= -1.0) & (base <= 1.0)).all()


def test_permuting_candidates_permutes_scores():
    query, query_mask, patches, patch_mask = _random_inputs(7)
    reranker = MaxSimReranker(device="cpu")
    perm = torch.randperm(patches.shape[0], generator=torch.Generator().manual_seed(0))
    base = reranker.score(query, query_mask, patches, patch_mask)
    torch.testing.assert_close(
        reranker.score(query, query_mask, patches[perm], patch_mask[perm]), base[perm]
    )


def test_numpy_inputs_and_read_only_fp16_patches():
    query, query_mask, patches, patch_mask = _random_inputs(8)
    reranker = MaxSimReranker(device="cpu")
    expected = reranker.score(query, query_mask, patches.half(), patch_mask)
    stored = patches.half().numpy().copy()
    stored.flags.writeable = False  # as a slice of np.load(mmap_mode="r") would be
    got = reranker.score(query.numpy(), query_mask.numpy(), stored, patch_mask.numpy())
    torch.testing.assert_close(got, expected)


def test_zero_candidates_give_empty_scores():
    scores = MaxSimReranker(device="cpu").score(
        torch.ones(3, 4), torch.ones(3, dtype=torch.bool), torch.ones(0, 5, 4)
    )
    assert scores.shape == (0,)
    assert scores.dtype == torch.float32


def test_all_zero_patch_scores_zero_not_nan():
    query = torch.tensor([[1.0, 0.0]])
    patches = torch.zeros(1, 2, 2)
    scores = MaxSimReranker(device="cpu").score(query, torch.tensor([True]), patches)
    torch.testing.assert_close(scores, torch.tensor([0.0]))


def test_maxsim_is_a_reranker():
    reranker = MaxSimReranker(device="cpu")
    assert isinstance(reranker, Reranker)
    assert reranker.name == "maxsim"
    assert reranker.device == torch.device("cpu")
    assert repr(reranker) == "MaxSimReranker(device='cpu')"


def test_dim_mismatch_names_both_dims():
    with pytest.raises(
        InvalidArgumentError, match=r"query tokens have dim 8, but patches have dim 16"
    ):
        MaxSimReranker(device="cpu").score(
            torch.ones(3, 8), torch.ones(3, dtype=torch.bool), torch.ones(2, 4, 16)
        )


def test_query_without_real_tokens_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"query has no real token"):
        MaxSimReranker(device="cpu").score(
            torch.ones(3, 4), torch.zeros(3, dtype=torch.bool), torch.ones(2, 5, 4)
        )


def test_candidate_without_real_patches_is_refused():
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(
        InvalidArgumentError, match=r"candidates at positions \[1\] have no real patch"
    ):
        MaxSimReranker(device="cpu").score(
            torch.ones(2, 4), torch.ones(2, dtype=torch.bool), torch.ones(3, 5, 4), mask
        )


_Q, _M, _P = torch.ones(3, 4), torch.ones(3, dtype=torch.bool), torch.ones(2, 5, 4)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.ones(4), _M, _P, None), r"query must be \(n_tokens, dim\)"),
        ((_Q, _M, torch.ones(5, 4), None), r"patches must be \(k, n_patches, dim\)"),
        ((_Q.long(), _M, _P, None), r"must be floating point"),
        ((_Q, torch.ones(3), _P, None), r"query_mask must be a bool tensor of shape \(3,\)"),
        ((_Q, _M[:2], _P, None), r"query_mask must be a bool tensor"),
        ((_Q, _M, torch.ones(2, 0, 4), None), r"n_patches == 0"),
        ((_Q, _M, _P, torch.ones(2, 5)), r"patch_mask must be a bool tensor of shape \(2, 5\)"),
        ((_Q, _M, _P, torch.ones(5, 2, dtype=torch.bool)), r"patch_mask must be a bool tensor"),
        (
            ([[1.0]], _M[:1], _P[..., :1], None),
            r"query must be a torch.Tensor or numpy array, got list",
        ),
    ],
)
def test_malformed_inputs_are_refused(args, match):
    with pytest.raises(InvalidArgumentError, match=match):
        MaxSimReranker(device="cpu").score(*args)


def test_unknown_device_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"device must be one of"):
        MaxSimReranker(device="tpu")
