import pytest
import torch

from crossrank.errors import InvalidArgumentError
from crossrank.rerank import MaxSimReranker, Reranker, RerankerName, check_rerank_inputs, get_reranker


class _ConstantReranker:
    name = "constant"

    def score(self, query, query_mask, patches, patch_mask=None):
        return torch.zeros(patches.shape[0])


@pytest.mark.parametrize("spec", ["maxsim", "MaxSim", " maxsim ", RerankerName.MAXSIM])
def test_maxsim_by_name(spec):
    reranker = get_reranker(spec, device="cpu")
    assert isinstance(reranker, MaxSimReranker)
    assert reranker.device == torch.device("cpu")


@pytest.mark.parametrize("spec", [None, "none", "NONE", RerankerName.NONE])
def test_none_turns_reranking_off(spec):
    assert get_reranker(spec) is None


def test_a_reranker_instance_is_passed_through():
    custom = _ConstantReranker()
    assert isinstance(custom, Reranker)
    assert get_reranker(custom) is custom


def test_unknown_name_lists_the_choices():
    with pytest.raises(InvalidArgumentError, match=r"reranker must be one of maxsim, blip-itm, none, got 'colbert'"):
        get_reranker("colbert")


def test_an_object_without_score_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"got int"):
        get_reranker(3)


def test_check_rerank_inputs_returns_tensors():
    out = check_rerank_inputs(torch.ones(2, 3).numpy(), torch.ones(2, dtype=torch.bool).numpy(), torch.ones(4, 5, 3))
    assert all(isinstance(t, torch.Tensor) for t in out[:3])
    assert out[3] is None
