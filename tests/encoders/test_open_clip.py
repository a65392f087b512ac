"""OpenCLIP checkpoints: crossrank reads them only in Hugging Face format (open_clip_torch needs
torchvision, which crossrank does not install; docs/encoders.md), and says so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from crossrank.encoders import load_encoder, load_text_encoder
from crossrank.errors import ModelError

OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 24, "vocab_size": 256, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}


def _open_clip_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    (folder / "open_clip_model.safetensors").write_bytes(b"\0" * 16)
    return folder


@pytest.mark.parametrize("loader", [load_encoder, load_text_encoder])
def test_an_open_clip_folder_is_refused_saying_what_to_do(tmp_path: Path, loader) -> None:
    folder = _open_clip_folder(tmp_path / "ViT-B-32-laion")
    with pytest.raises(
        ModelError,
        match=r"is an OpenCLIP checkpoint \(open_clip_config\.json, no config\.json\); crossrank "
        r"reads OpenCLIP models only in Hugging Face format.*docs/encoders\.md",
    ):
        loader(folder, device="cpu")


def test_an_open_clip_repo_with_a_transformers_copy_opens_as_clip(
    tmp_path: Path, tiny_clip: Path, tiny_encoder
) -> None:
    # LAION's hub repos hold both: open_clip_config.json and a CLIPModel config.json beside it.
    folder = Path(shutil.copytree(tiny_clip, tmp_path / "laion-style"))
    (folder / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    encoder = load_encoder(folder, device="cpu")
    assert encoder.info["model_type"] == "clip"
    assert encoder.info["weights_sha256"] == tiny_encoder.info["weights_sha256"]
