from __future__ import annotations

import dataclasses

import pytest

from crossrank.indexes import IndexConfig


def test_defaults_match_the_contract():
    config = IndexConfig()
    assert (config.factory, config.flat_threshold, config.nlist, config.nprobe) == (
        None,
        20_000,
        None,
        16,
    )
    assert (config.train_size, config.device, config.seed) == (50_000, "auto", 0)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        IndexConfig().nprobe = 3  # type: ignore[misc]


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "CUDA:0"])
def test_devices_accepted(device):
    assert IndexConfig(device=device).device == device


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("factory", "", "factory must be a non-empty FAISS factory string such as 'IVF256,Flat'"),
        ("factory", "   ", "factory must be a non-empty"),
        ("factory", 3, "factory must be a non-empty"),
        ("flat_threshold", -1, r"flat_threshold must be an int >= 0 \(vectors\), got -1"),
        ("nlist", 0, r"nlist must be None or an int >= 1 \(IVF lists\), got 0"),
        ("nlist", 2.5, "nlist must be None or an int >= 1"),
        ("nprobe", 0, r"nprobe must be an int >= 1 \(IVF lists scanned per query\), got 0"),
        ("nprobe", True, "nprobe must be an int >= 1"),
        ("train_size", 0, "train_size must be an int >= 1"),
        ("seed", -1, "seed must be an int >= 0, got -1"),
        ("ef_search", 0, "ef_search must be an int >= 1"),
        ("device", "tpu", "device must be one of auto, cpu, cuda or cuda:N, got 'tpu'"),
        ("device", "cuda:x", "device must be one of auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_values_raise_value_error(field, value, match):
    with pytest.raises(ValueError, match=match):
        IndexConfig(**{field: value})
