"""ClipEncoder: shapes, numerics against transformers' CLIPModel, batching, padding, checks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from crossrank.encoders import Encoder, ImageFeatures, TextFeatures, load_encoder
from crossrank.errors import InvalidArgumentError

LONG = "a small green triangle above a large yellow star right of a blue square"


@pytest.fixture(scope="module")
def reference(tiny_clip):
    """transformers' CLIPModel and processors, loaded independently of crossrank."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    return (
        model,
        AutoImageProcessor.from_pretrained(tiny_clip),
        AutoTokenizer.from_pretrained(tiny_clip),
    )


def test_encode_images_shapes_and_dtypes(tiny_encoder, images):
    feats = tiny_encoder.encode_images(images)
    assert isinstance(feats, ImageFeatures) and len(feats) == len(images)
    assert feats.pooled.shape == (10, 32) and feats.pooled.dtype == np.float32
    assert feats.patches.shape == (10, 16, 32) and feats.patches.dtype == np.float32
    assert (tiny_encoder.dim, tiny_encoder.patch_dim, tiny_encoder.n_patches) == (32, 32, 16)
    assert isinstance(tiny_encoder, Encoder)


def test_pooled_vectors_are_unit_norm(tiny_encoder, images):
    np.testing.assert_allclose(
        np.linalg.norm(tiny_encoder.encode_images(images).pooled, axis=1), 1.0, atol=1e-5
    )
    np.testing.assert_allclose(
        np.linalg.norm(tiny_encoder.encode_text(["a red circle", LONG]).pooled, axis=1),
        1.0,
        atol=1e-5,
    )


def test_encode_images_equals_clipmodel_image_features(tiny_encoder, images, reference):
    model, processor, _ = reference
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.get_image_features(pixel_values=pixels).pooler_output
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state  # (n, 1 + P, width)
        # The patch formula applied to the CLS token is get_image_features: the patches share its
        # projection.
        cls = model.visual_projection(model.vision_model.post_layernorm(hidden[:, 0]))
        expected_patches = model.visual_projection(model.vision_model.post_layernorm(hidden[:, 1:]))
    torch.testing.assert_close(cls, expected, atol=1e-6, rtol=0)
    feats = tiny_encoder.encode_images(images)
    np.testing.assert_allclose(
        feats.pooled, torch.nn.functional.normalize(expected, dim=-1).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(feats.patches, expected_patches.numpy(), atol=1e-5)


def test_preprocess_matches_processor_and_encode_pixels_matches_encode_images(
    tiny_encoder, images, reference
):
    _, processor, _ = reference
    pixels = tiny_encoder.preprocess(images)
    assert (
        pixels.dtype == torch.float32
        and pixels.device.type == "cpu"
        and pixels.shape == (10, 3, 32, 32)
    )
    torch.testing.assert_close(
        pixels, processor(images=images, return_tensors="pt")["pixel_values"]
    )
    a, b = tiny_encoder.encode_pixels(pixels), tiny_encoder.encode_images(images)
    np.testing.assert_array_equal(a.pooled, b.pooled)
    np.testing.assert_array_equal(a.patches, b.patches)


def test_preprocess_converts_any_mode_to_rgb(tiny_encoder, images):
    rgb = images[0]
    for mode in ("L", "RGBA", "P", "CMYK"):
        converted = tiny_encoder.preprocess([rgb.convert(mode)])
        expected = tiny_encoder.preprocess([rgb.convert(mode).convert("RGB")])
        torch.testing.assert_close(converted, expected)


def test_preprocess_is_thread_safe(tiny_encoder, images):
    serial = [tiny_encoder.preprocess([im]) for im in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(lambda im: tiny_encoder.preprocess([im]), images * 4))
    for i, pixels in enumerate(threaded):
        torch.testing.assert_close(pixels, serial[i % len(images)], atol=0, rtol=0)


def test_encode_text_from_many_threads_matches_serial(tiny_encoder):
    texts = ["a red circle", LONG, "a blue square", "a star above a circle"] * 4
    serial = [tiny_encoder.encode_text([t]) for t in texts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda t: tiny_encoder.encode_text([t]), texts))
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-6)
        np.testing.assert_array_equal(a.mask, b.mask)


def test_text_pooled_equals_clipmodel_text_embeds(tiny_encoder, reference):
    model, _, tokenizer = reference
    texts = ["a red circle", LONG, "a blue square"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            pixel_values=torch.zeros(1, 3, 32, 32),
        )
        hidden = model.text_model(**enc).last_hidden_state
    feats = tiny_encoder.encode_text(texts)
    assert isinstance(feats, TextFeatures)
    np.testing.assert_allclose(feats.pooled, out.text_embeds.numpy(), atol=1e-5)
    mask = enc["attention_mask"].bool().numpy()
    np.testing.assert_array_equal(feats.mask, mask)
    np.testing.assert_allclose(
        feats.tokens[mask], model.text_projection(hidden).detach().numpy()[mask], atol=1e-5
    )


def test_token_embeddings_are_the_text_models_layer_0_states(tiny_encoder, reference):
    model, _, tokenizer = reference
    texts = ["a red circle", LONG, "a blue square", "a", "two circles"]  # 5 > batch size 4
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        layer0 = model.text_model(**enc, output_hidden_states=True).hidden_states[0].numpy()
    plain = tiny_encoder.encode_text(texts)
    feats = tiny_encoder.encode_text(texts, token_embeddings=True)
    width = model.config.text_config.hidden_size
    assert tiny_encoder.token_embedding_dim == tiny_encoder.info["text_width"] == width
    assert plain.token_embeddings is None and plain.reranker_tokens() is plain.tokens
    assert (
        feats.token_embeddings.shape == (*feats.mask.shape, width)
        and feats.token_embeddings.dtype == np.float32
    )
    mask = feats.mask
    np.testing.assert_allclose(feats.token_embeddings[mask], layer0[mask], atol=1e-5)
    assert not feats.token_embeddings[~mask].any()  # zero at padding
    np.testing.assert_array_equal(feats.tokens, plain.tokens)  # the rest is unchanged
    joined = feats.reranker_tokens()  # layer 0 first, then the last layer's features
    assert joined.shape == (*mask.shape, width + feats.tokens.shape[-1])
    np.testing.assert_array_equal(joined[..., :width], feats.token_embeddings)
    np.testing.assert_array_equal(joined[..., width:], feats.tokens)


def test_token_embeddings_are_refused_by_an_encoder_that_has_none(tiny_clip):
    from crossrank.errors import ModelError

    encoder = load_encoder(tiny_clip, device="cpu")
    encoder.token_embedding_dim = None  # as a backend that does not give them
    with pytest.raises(ModelError, match="does not give its layer-0 token states"):
        encoder.encode_text(["a red circle"], token_embeddings=True)


def test_text_shapes_mask_and_zero_padding(tiny_encoder):
    feats = tiny_encoder.encode_text(["a", LONG])
    m, n_tokens, d = feats.tokens.shape
    assert (m, d) == (2, 32) and feats.pooled.shape == (2, 32)
    assert (
        feats.tokens.dtype == np.float32
        and feats.mask.dtype == np.bool_
        and feats.mask.shape == (2, n_tokens)
    )
    assert feats.mask[1].all() and feats.mask[0].sum() == 3  # <bos> a <eos>
    assert np.all(feats.tokens[~feats.mask] == 0.0)
    assert np.all(np.abs(feats.tokens[feats.mask]).sum(axis=-1) > 0)


def test_padding_does_not_change_a_texts_features(tiny_encoder):
    alone = tiny_encoder.encode_text(["a"])
    padded = tiny_encoder.encode_text(["a", LONG])
    length = int(alone.mask[0].sum())
    assert padded.tokens.shape[1] > length
    np.testing.assert_allclose(padded.pooled[0], alone.pooled[0], atol=1e-5)
    np.testing.assert_allclose(padded.tokens[0, :length], alone.tokens[0, :length], atol=1e-5)


def test_batch_size_one_and_four_give_the_same_features(tiny_clip, tiny_encoder, images):
    one = load_encoder(tiny_clip, device="cpu", batch_size=1)
    texts = ["a red circle", LONG, "a blue square", "a star", "two circles"]
    a, b = one.encode_images(images), tiny_encoder.encode_images(images)
    np.testing.assert_allclose(a.pooled, b.pooled, atol=1e-5)
    np.testing.assert_allclose(a.patches, b.patches, atol=1e-5)
    ta, tb = one.encode_text(texts), tiny_encoder.encode_text(texts)
    np.testing.assert_allclose(ta.pooled, tb.pooled, atol=1e-5)
    np.testing.assert_allclose(ta.tokens, tb.tokens, atol=1e-5)
    np.testing.assert_array_equal(ta.mask, tb.mask)


def test_long_text_is_truncated_to_max_positions(tiny_encoder, caplog):
    too_long = " ".join(["red circle"] * 40)
    with caplog.at_level("DEBUG", logger="crossrank.encoders.base"):
        feats = tiny_encoder.encode_text([too_long, too_long + " blue"])
    assert feats.tokens.shape[1] == tiny_encoder.max_text_len == 24
    assert feats.mask.all()
    np.testing.assert_allclose(np.linalg.norm(feats.pooled, axis=1), 1.0, atol=1e-5)
    assert any("truncated" in r.getMessage() for r in caplog.records)


def test_empty_image_batch_gives_empty_features(tiny_encoder):
    assert tiny_encoder.preprocess([]).shape == (0, 3, 32, 32)
    feats = tiny_encoder.encode_images([])
    assert feats.pooled.shape == (0, 32) and feats.patches.shape == (0, 16, 32)


@pytest.mark.parametrize(
    ("texts", "match"),
    [
        ([], "texts is empty"),
        ([""], r"texts\[0\] is empty"),
        (["a red circle", "  \n\t"], r"texts\[1\] is empty or only whitespace"),
        ("a red circle", "must be a list of strings, got str"),
        (["a red circle", 3], r"texts\[1\] must be a string, got int"),
    ],
)
def test_bad_texts_are_refused(tiny_encoder, texts, match):
    with pytest.raises(InvalidArgumentError, match=match):
        tiny_encoder.encode_text(texts)


def test_bad_images_are_refused(tiny_encoder, images):
    with pytest.raises(InvalidArgumentError, match="must be a list of PIL images, got Image"):
        tiny_encoder.preprocess(images[0])
    with pytest.raises(InvalidArgumentError, match=r"images\[1\] must be a PIL image, got str"):
        tiny_encoder.preprocess([images[0], "photo.jpg"])


def test_encode_pixels_refuses_a_wrong_shape(tiny_encoder):
    with pytest.raises(
        InvalidArgumentError, match=r"must have shape \(n, 3, 32, 32\).*got \(2, 3, 64, 64\)"
    ):
        tiny_encoder.encode_pixels(torch.zeros(2, 3, 64, 64))
    with pytest.raises(InvalidArgumentError, match="must be a torch tensor, got list"):
        tiny_encoder.encode_pixels([[0.0]])
