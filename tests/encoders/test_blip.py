"""The BLIP backend: ITC pooled vectors, vision tokens as patches, text ids for blip-itm."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests._models import make_tiny_blip

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


@pytest.fixture(scope="module")
def blip_encoder(tiny_blip: Path):
    from crossrank.encoders import load_encoder

    torch.set_num_threads(1)
    return load_encoder(tiny_blip, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def reference(tiny_blip: Path):
    from transformers import BlipForImageTextRetrieval

    return BlipForImageTextRetrieval.from_pretrained(tiny_blip).eval()


def test_saved_retrieval_model_is_model_type_blip(tiny_blip: Path) -> None:
    config = json.loads((tiny_blip / "config.json").read_text())
    assert config["model_type"] == "blip"
    assert config["architectures"] == ["BlipForImageTextRetrieval"]


def test_load_encoder_picks_the_blip_backend_with_its_sizes(blip_encoder) -> None:
    from crossrank.encoders.blip import BlipEncoder

    assert isinstance(blip_encoder, BlipEncoder)
    info = blip_encoder.info
    assert (info["backend"], info["model_type"]) == ("blip", "blip")
    # dim is the ITC projection, patch_dim the vision width; patches include the CLS token.
    assert (info["dim"], info["patch_dim"], info["token_dim"]) == (16, 32, 32)
    assert info["n_patches"] == 1 + (32 // 8) ** 2


def test_pooled_vectors_are_the_itc_features(blip_encoder, reference, images) -> None:
    pixels = blip_encoder.preprocess(images[:5])
    feats = blip_encoder.encode_pixels(pixels)
    texts = ["a red circle", "a blue square below a star"]
    text = blip_encoder.encode_text(texts)
    enc = blip_encoder.tokenizer(texts, padding="longest", return_tensors="pt")
    with torch.no_grad():
        # use_itm_head=False is BLIP's ITC: cosine of the projected vision and text CLS tokens.
        itc = torch.stack(
            [
                reference(
                    input_ids=enc.input_ids[j : j + 1],
                    attention_mask=enc.attention_mask[j : j + 1],
                    pixel_values=pixels,
                    use_itm_head=False,
                ).itm_score[:, 0]
                for j in range(len(texts))
            ],
            dim=1,
        )  # (n_images, n_texts)
    np.testing.assert_allclose(feats.pooled @ text.pooled.T, itc.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats.pooled, axis=1), 1.0, atol=1e-5)


def test_patches_are_all_vision_tokens_including_cls(blip_encoder, reference, images) -> None:
    pixels = blip_encoder.preprocess(images[:5])
    feats = blip_encoder.encode_pixels(pixels)
    with torch.no_grad():
        hidden = reference.vision_model(pixel_values=pixels).last_hidden_state
    assert feats.patches.shape == (5, 17, 32)
    np.testing.assert_allclose(feats.patches, hidden.numpy(), atol=1e-5)


def test_text_features_carry_input_ids_and_unimodal_tokens(blip_encoder) -> None:
    text = blip_encoder.encode_text(["a red circle", "a green triangle above a yellow star"])
    assert text.input_ids is not None and text.input_ids.dtype == np.int64
    assert text.input_ids.shape == text.mask.shape
    assert text.tokens.shape == (*text.mask.shape, 32)
    cls_id = blip_encoder.tokenizer.convert_tokens_to_ids("[CLS]")
    assert (text.input_ids[:, 0] == cls_id).all()
    # padding: id 0, no token features
    assert (text.input_ids[~text.mask] == 0).all() and not text.tokens[~text.mask].any()


def test_token_embeddings_are_the_text_encoders_embedding_layer(blip_encoder, reference) -> None:
    texts = ["a red circle", "a green triangle above a yellow star"]
    feats = blip_encoder.encode_text(texts, token_embeddings=True)
    ids = torch.from_numpy(feats.input_ids)
    with torch.no_grad():
        expected = (
            reference.text_encoder(
                input_ids=ids,
                attention_mask=torch.from_numpy(feats.mask).long(),
                output_hidden_states=True,
            )
            .hidden_states[0]
            .numpy()
        )
    assert blip_encoder.token_embedding_dim == reference.config.text_config.hidden_size
    np.testing.assert_allclose(feats.token_embeddings[feats.mask], expected[feats.mask], atol=1e-5)
    assert not feats.token_embeddings[~feats.mask].any()


def test_a_clip_encoder_fills_input_ids_too(tiny_encoder) -> None:
    text = tiny_encoder.encode_text(["a red circle"])
    assert text.input_ids is not None and text.input_ids.shape == text.mask.shape


def test_a_blip_captioning_checkpoint_is_refused(tmp_path: Path) -> None:
    from crossrank.encoders import load_encoder
    from crossrank.errors import ModelError

    path = make_tiny_blip(tmp_path / "caption", architecture="BlipForConditionalGeneration")
    with pytest.raises(ModelError, match="not an image-text retrieval model"):
        load_encoder(path, device="cpu")
