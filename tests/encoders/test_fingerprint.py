"""Model fingerprints: what changes them, what does not, and same_model on top of them."""

from __future__ import annotations

import pytest

from crossrank.encoders import fingerprint, same_model
from crossrank.encoders.fingerprint import config_sha256, weight_files, weights_sha256
from crossrank.errors import InvalidArgumentError

CONFIG = {
    "model_type": "clip",
    "projection_dim": 32,
    "text_config": {"hidden_size": 32, "vocab_size": 65},
    "vision_config": {"image_size": 32, "patch_size": 8},
}


def test_config_digest_ignores_how_and_where_it_was_saved():
    saved = {
        "transformers_version": "5.24.0",
        "_name_or_path": "/somewhere",
        "dtype": "float32",
        **{k: v for k, v in reversed(list(CONFIG.items()))},
    }
    saved["text_config"] = {
        **CONFIG["text_config"],
        "torch_dtype": "float16",
        "transformers_version": "4.46.0",
    }
    assert config_sha256(saved) == config_sha256(CONFIG)


def test_config_digest_changes_with_the_architecture():
    changed = {**CONFIG, "vision_config": {**CONFIG["vision_config"], "patch_size": 16}}
    assert config_sha256(changed) != config_sha256(CONFIG)


def test_weight_files_prefer_safetensors_over_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"bin")
    assert weight_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    for name in ("model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"):
        (tmp_path / name).write_bytes(b"st")
    assert [p.name for p in weight_files(tmp_path)] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert weight_files(tmp_path / "missing-subdir") == []


def test_small_weight_files_are_hashed_whole(tmp_path):
    a, b = tmp_path / "a" / "model.safetensors", tmp_path / "b" / "model.safetensors"
    for path, middle in ((a, b"x"), (b, b"y")):
        path.parent.mkdir()
        path.write_bytes(b"head" + middle * 100 + b"tail")
    assert weights_sha256([a]) != weights_sha256([b])


def test_big_weight_files_are_hashed_by_size_head_and_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "FULL_HASH_MAX_BYTES", 16)
    monkeypatch.setattr(fingerprint, "HEAD_TAIL_BYTES", 4)
    base = b"HEAD" + b"m" * 40 + b"TAIL"
    variants = {
        "same": base,
        "middle": b"HEAD" + b"n" * 40 + b"TAIL",
        "head": b"HEAX" + base[4:],
        "tail": base[:-1] + b"!",
        "size": b"HEAD" + b"m" * 41 + b"TAIL",
    }
    digests = {}
    for name, content in variants.items():
        path = tmp_path / name / "model.safetensors"
        path.parent.mkdir()
        path.write_bytes(content)
        digests[name] = weights_sha256([path])
    assert (
        digests["middle"] == digests["same"]
    )  # documented: an identity check, not an integrity check
    assert len({digests[k] for k in ("same", "head", "tail", "size")}) == 4


def test_same_model_needs_both_fingerprints_equal():
    info = {"model_id": "a", "config_sha256": "c1", "weights_sha256": "w1"}
    assert same_model(info, {**info, "model_id": "/moved/copy"})
    assert not same_model(info, {**info, "weights_sha256": "w2"})
    assert not same_model(info, {**info, "config_sha256": "c2"})
    assert not same_model({"model_id": "a"}, {"model_id": "a"})  # no fingerprints: never "the same"


def test_same_model_refuses_non_dicts():
    with pytest.raises(InvalidArgumentError, match="info_b must be an encoder info dict, got str"):
        same_model({}, "openai/clip-vit-base-patch32")
