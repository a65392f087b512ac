import pytest
import torch

from crossrank.errors import InvalidArgumentError
from crossrank.rerank import (
    MaxSimReranker,
    Reranker,
    RerankerName,
    check_rerank_inputs,
    get_reranker,
)


class _ConstantReranker(Reranker):
    name = "constant"

    def score(self, query, query_mask, patches, patch_mask=None):
        return torch.zeros(patches.shape[0])


class _DuckReranker:
    """Not a Reranker subclass: a name, a score method and one optional member of its own."""

    name = "duck"
    fusion = "sum"

    def score(self, query, query_mask, patches, patch_mask=None):
        return torch.arange(patches.shape[0], dtype=torch.float32)


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
    assert get_reranker(custom) is custom
    assert (custom.needs_input_ids, custom.token_embeddings, custom.fusion) == (False, 0, None)


def test_a_duck_typed_reranker_gets_the_interface_defaults_and_keeps_its_own_members():
    wrapped = get_reranker(_DuckReranker())
    assert isinstance(wrapped, Reranker) and wrapped.name == "duck"
    assert (wrapped.needs_input_ids, wrapped.token_embeddings, wrapped.fusion) == (False, 0, "sum")
    scores = wrapped.score(torch.ones(2, 3), torch.ones(2, dtype=torch.bool), torch.ones(4, 5, 3))
    assert scores.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_unknown_name_lists_the_choices():
    with pytest.raises(
        InvalidArgumentError, match=r"reranker must be one of maxsim, blip-itm, none, got 'colbert'"
    ):
        get_reranker("colbert")


def test_an_object_without_score_is_refused():
    with pytest.raises(InvalidArgumentError, match=r"got int"):
        get_reranker(3)


def test_check_rerank_inputs_returns_tensors():
    out = check_rerank_inputs(
        torch.ones(2, 3).numpy(), torch.ones(2, dtype=torch.bool).numpy(), torch.ones(4, 5, 3)
    )
    assert all(isinstance(t, torch.Tensor) for t in out[:3])
    assert out[3] is None


@pytest.mark.parametrize(
    ("model_type", "name", "hint"),
    [
        ("blip", "BLIP", "use --reranker blip-itm"),
        ("siglip", "SigLIP", "train a cross-attention reranker"),
        ("siglip2", "SigLIP 2", "train a cross-attention reranker"),
    ],
)
def test_maxsim_is_refused_where_tokens_and_patches_are_not_in_one_space(model_type, name, hint):
    from crossrank.errors import ModelMismatchError

    info = {"model_type": model_type, "model_id": "m"}
    with pytest.raises(
        ModelMismatchError, match=rf"built with {name} \('m'\).*not in one space; {hint}"
    ):
        get_reranker("maxsim", device="cpu", encoder_info=info)
    clip = get_reranker(
        "maxsim", device="cpu", encoder_info={"model_type": "clip", "model_id": "m"}
    )
    assert isinstance(clip, MaxSimReranker)
