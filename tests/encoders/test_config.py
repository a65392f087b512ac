"""EncoderConfig: defaults and the ValueError for each bad field."""

from __future__ import annotations

import pytest

from crossrank.encoders import DEMO_MODEL, EncoderConfig, Precision


def test_defaults_take_the_demo_model_on_the_best_device():
    config = EncoderConfig()
    assert (config.model, config.device, config.batch_size, config.dtype) == (
        DEMO_MODEL,
        "auto",
        64,
        "auto",
    )
    assert (
        EncoderConfig(
            model="openai/clip-vit-base-patch32", device="cuda:1", dtype=Precision.FP16
        ).device
        == "cuda:1"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": ""}, r"model must be a non-empty string, got ''"),
        ({"model": "   "}, r"model must be a non-empty string"),
        ({"device": "gpu"}, r"device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"batch_size": 2.5}, r"batch_size must be an int >= 1, got 2\.5"),
        ({"batch_size": True}, r"batch_size must be an int >= 1, got True"),
        ({"dtype": "float16"}, r"dtype must be one of auto, fp32, fp16, bf16, got 'float16'"),
    ],
)
def test_bad_fields_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EncoderConfig(**kwargs)
