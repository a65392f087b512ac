"""SigLIP and SigLIP 2: pooled vectors equal transformers' own, pre-head patches and tokens, real
tokens only, and an index that builds, searches, trains and refuses another model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_WORDS, write_images

torch = pytest.importorskip("torch")

TEXTS = ["a red circle", "a green triangle above a yellow star left of a blue square"]
SQUARE_SIZES = [(32, 32), (48, 48), (70, 70), (33, 33)]


@pytest.fixture(scope="module", params=[1, 2], ids=["siglip", "siglip2"])
def family(request, tiny_siglip: Path, tiny_siglip2: Path):
    """``(version, model folder, encoder, transformers reference model)`` for each family."""
    from transformers import Siglip2Model, SiglipModel

    from crossrank.encoders import load_encoder

    path = tiny_siglip if request.param == 1 else tiny_siglip2
    reference = (SiglipModel if request.param == 1 else Siglip2Model).from_pretrained(path)
    return request.param, path, load_encoder(path, device="cpu", batch_size=3), reference.eval()


@pytest.fixture(scope="module")
def square_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SQUARE_SIZES
    ]


def _processor_outputs(path: Path, images, texts, max_length: int):
    """What the model's own image processor and tokenizer hand the model (SigLIP's usage:
    text padded to max_length)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    pixels = AutoImageProcessor.from_pretrained(path)(images=images, return_tensors="pt")
    tokens = AutoTokenizer.from_pretrained(path)(
        texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return pixels, tokens


def test_load_encoder_picks_the_backend_and_records_what_it_stores(family) -> None:
    from crossrank.encoders.siglip import Siglip2Encoder, SiglipEncoder

    version, path, encoder, _ = family
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == ("siglip" if version == 1 else "siglip2")
    assert type(encoder) is (SiglipEncoder if version == 1 else Siglip2Encoder)
    info = encoder.info
    assert info["backend"] == info["model_type"] == config["model_type"]
    assert (info["dim"], info["patch_dim"], info["token_dim"]) == (32, 32, 32)
    assert info["n_patches"] == (32 // 8) ** 2  # no CLS token: every token is a patch
    assert (info["image_size"], info["patch_size"]) == (32, 8)
    assert "before the attention-pool head" in info["patch_features"]
    assert "no head" in info["token_features"] and info["text_padding"] == "max_length"
    assert info["config_sha256"] and info["weights_sha256"]


def test_pooled_vectors_equal_the_models_own_features(family, square_images) -> None:
    import torch.nn.functional as F

    _, path, encoder, reference = family
    pixels, tokens = _processor_outputs(path, square_images, TEXTS, encoder.max_text_len)
    with torch.no_grad():
        image = F.normalize(reference.get_image_features(**pixels).pooler_output, dim=-1)
        text = F.normalize(reference.get_text_features(**tokens).pooler_output, dim=-1)
    feats = encoder.encode_images(square_images)
    queries = encoder.encode_text(TEXTS)
    np.testing.assert_allclose(feats.pooled, image.numpy(), atol=1e-5)
    np.testing.assert_allclose(queries.pooled, text.numpy(), atol=1e-5)
    # a random model still tells the images apart by far more than the tolerance
    assert np.abs(feats.pooled[0] - feats.pooled[1]).max() > 1e-2


def test_patches_are_the_vision_towers_last_hidden_states(family, square_images) -> None:
    version, path, encoder, reference = family
    pixels, _ = _processor_outputs(path, square_images, TEXTS, encoder.max_text_len)
    with torch.no_grad():
        hidden = reference.vision_model(**pixels).last_hidden_state
    feats = encoder.encode_images(square_images)
    assert feats.patches.shape == (len(square_images), 16, 32)
    np.testing.assert_allclose(feats.patches, hidden.numpy(), atol=1e-5)


def test_every_image_gets_the_same_patch_grid(family, images) -> None:
    _, _, encoder, _ = family
    feats = encoder.encode_images(images)  # assorted sizes and aspect ratios
    assert feats.patches.shape == (len(images), 16, 32)
    assert np.isfinite(feats.patches).all()


def test_tokens_are_the_real_tokens_of_the_text_tower_right_padded(family) -> None:
    version, path, encoder, reference = family
    _, tokens = _processor_outputs(path, [], TEXTS, encoder.max_text_len)
    with torch.no_grad():
        text = reference.text_model(**tokens, output_hidden_states=True)
    real = tokens["attention_mask"].bool()
    feats = encoder.encode_text(TEXTS, token_embeddings=True)
    lengths = real.sum(1).tolist()
    # only the real tokens, moved to the front of each row (SigLIP 2 pads on the left), cut to
    # the longest text
    assert feats.mask.sum(1).tolist() == lengths
    assert feats.tokens.shape == (2, max(lengths), 32)
    assert feats.mask.tolist() == [[j < n for j in range(max(lengths))] for n in lengths]
    for row in range(2):
        n = lengths[row]
        np.testing.assert_array_equal(feats.input_ids[row, :n], tokens["input_ids"][row][real[row]])
        np.testing.assert_allclose(
            feats.tokens[row, :n], text.last_hidden_state[row][real[row]].numpy(), atol=1e-5
        )
        np.testing.assert_allclose(
            feats.token_embeddings[row, :n],
            text.hidden_states[0][row][real[row]].numpy(),
            atol=1e-5,
        )
    assert not feats.tokens[~feats.mask].any() and not feats.token_embeddings[~feats.mask].any()
    if version == 1:  # SigLIP's tokenizer appends its end-of-text token
        eos = encoder.tokenizer.convert_tokens_to_ids("<eos>")
        assert [feats.input_ids[r, lengths[r] - 1] for r in range(2)] == [eos, eos]


def test_text_features_do_not_depend_on_the_batch(family) -> None:
    _, _, encoder, _ = family
    together = encoder.encode_text(TEXTS)
    alone = encoder.encode_text(TEXTS[:1])
    np.testing.assert_allclose(alone.pooled[0], together.pooled[0], atol=1e-5)
    n = int(alone.mask[0].sum())
    np.testing.assert_allclose(alone.tokens[0, :n], together.tokens[0, :n], atol=1e-5)


def test_a_siglip2_processor_without_a_square_patch_count_is_refused(tmp_path: Path) -> None:
    from crossrank.encoders import load_encoder
    from crossrank.encoders.factory import make_siglip
    from crossrank.errors import ModelError

    path = make_siglip(tmp_path / "s2", TINY_WORDS, version=2)
    config = json.loads((path / "preprocessor_config.json").read_text())
    config["max_num_patches"] = 12
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="square grid.*max_num_patches 12"):
        load_encoder(path, device="cpu")


def test_the_text_path_falls_back_to_the_full_encoder(tiny_siglip: Path) -> None:
    from crossrank.encoders import load_encoder, load_text_encoder
    from crossrank.encoders.siglip import SiglipEncoder

    light = load_text_encoder(tiny_siglip, device="cpu")
    assert isinstance(light, SiglipEncoder) and not getattr(light, "light", False)
    full = load_encoder(tiny_siglip, device="cpu")
    assert light.info == full.info
    np.testing.assert_allclose(
        light.encode_text(TEXTS).pooled, full.encode_text(TEXTS).pooled, atol=1e-6
    )


# -- an index over SigLIP ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip_index(tmp_path_factory: pytest.TempPathFactory, family):
    """A few coloured images and an index over them built with the family's tiny model."""
    from crossrank import Index

    version, path, _, _ = family
    root = tmp_path_factory.mktemp(f"siglip{version}-index")
    write_images(root / "img", 8, seed=version)
    index = Index.build(root / "img", root / "photos.idx", model=path, device="cpu", workers=1)
    return root, index


def test_an_index_records_the_model_and_searches_with_it(family, siglip_index) -> None:
    version, path, encoder, _ = family
    root, index = siglip_index
    manifest = json.loads((root / "photos.idx" / "manifest.json").read_text())
    recorded = manifest["encoder"]
    for key in ("model_type", "config_sha256", "weights_sha256", "n_patches", "patch_features"):
        assert recorded[key] == encoder.info[key]
    result = index.search(TEXTS[0], k=3, reranker=None)
    assert len(result) == 3
    # the first stage is the cosine of SigLIP's own pooled vectors
    query = encoder.encode_text(TEXTS[:1]).pooled[0]
    stored = index.stored.vectors()
    assert result[0].first_stage_score == pytest.approx(float((stored @ query).max()), abs=1e-4)


def test_the_cli_builds_and_searches_a_siglip_index(family, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from crossrank.cli import app

    _, path, _, _ = family
    write_images(tmp_path / "img", 5, seed=3)
    runner = CliRunner()
    idx = tmp_path / "s.idx"
    built = runner.invoke(
        app,
        [
            "build",
            str(tmp_path / "img"),
            "--index",
            str(idx),
            "--model",
            str(path),
            "--device",
            "cpu",
        ],  # fmt: skip
    )
    assert built.exit_code == 0, (built.stdout, built.stderr)
    found = runner.invoke(
        app, ["search", str(idx), TEXTS[0], "-k", "2", "--device", "cpu", "--json"]
    )
    assert found.exit_code == 0, (found.stdout, found.stderr)
    payload = json.loads(found.stdout)
    assert (
        payload["encoder"]["model_type"]
        == json.loads((path / "config.json").read_text())["model_type"]
    )
    assert len(payload["hits"]) == 2


def test_a_siglip_index_refuses_a_clip_model(siglip_index, tiny_clip: Path, family) -> None:
    from crossrank import Index
    from crossrank.errors import ModelMismatchError

    _, path, _, _ = family
    root, _ = siglip_index
    with pytest.raises(
        ModelMismatchError,
        match=rf"built with model '{re.escape(str(path))}'.*encoded with "
        rf"'{re.escape(str(tiny_clip))}'",
    ):
        Index.open(root / "photos.idx", device="cpu", model=tiny_clip)


def test_a_cross_attention_reranker_trains_over_a_siglip_index(
    family, siglip_index, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossrank.rerank import RerankerConfig, load_reranker
    from crossrank.training import RerankTrainConfig, train_reranker

    root, index = siglip_index
    paths = index.metadata(columns=["path"]).column("path").to_pylist()
    captions = [TINY_WORDS[i % len(TINY_WORDS)] for i in range(len(paths))]
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"path": paths, "caption": captions}), pairs)
    report = train_reranker(
        index,
        pairs,
        tmp_path / "r",
        model_config=RerankerConfig(width=16, heads=2, layers=1, mlp_ratio=2.0),
        config=RerankTrainConfig(
            steps=2,
            batch_size=4,
            n_candidates=3,
            mine_k=4,
            warmup=1,
            eval_every=2,
            checkpoint_every=2,
            device="cpu",
            val_fraction=0.0,
        ),
    )
    assert report.steps == 2
    reranker = load_reranker(tmp_path / "r", device="cpu")
    result = index.search(TEXTS[0], k=3, reranker=reranker)
    assert len(result) == 3 and all(hit.rerank_score is not None for hit in result)
