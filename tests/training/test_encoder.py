"""The demo encoder trainer: multi-positive loss, learning, resuming, and the saved model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from crossrank.encoders.factory import ClipSpec  # noqa: E402
from crossrank.errors import InvalidArgumentError  # noqa: E402
from crossrank.training.encoder import (  # noqa: E402
    EncoderTrainConfig,
    TrainData,
    _multi_positive_nce,
    shapes_train_data,
    train_encoder,
)

SPEC = ClipSpec(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=1,
    vision_heads=2,
    text_width=32,
    text_layers=1,
    text_heads=2,
    projection_dim=16,
    max_text_len=12,
    vocab_size=64,
)


def test_multi_positive_nce_by_hand() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    pos = torch.tensor([[True, True, False], [False, False, True]])
    row0 = -math.log((math.exp(2) + math.exp(1)) / (math.exp(2) + math.exp(1) + 1))
    row1 = -math.log(math.exp(3) / (2 + math.exp(3)))
    assert _multi_positive_nce(logits, pos).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_multi_positive_nce_ignores_rows_without_a_positive() -> None:
    logits = torch.tensor([[2.0, 1.0], [5.0, -5.0]])
    pos = torch.tensor([[True, False], [False, False]])
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1)))
    assert _multi_positive_nce(logits, pos).item() == pytest.approx(expected, rel=1e-6)


def _toy_data(n: int = 24, seed: int = 0) -> TrainData:
    """Images that are one flat colour each; captions name the colour, so positives are exact."""
    rng = np.random.default_rng(seed)
    colours = {
        "red": (220, 30, 30),
        "green": (30, 200, 30),
        "blue": (30, 30, 220),
        "yellow": (230, 220, 30),
    }
    names = list(colours)
    labels = rng.integers(0, len(names), n)
    images = np.stack(
        [
            np.broadcast_to(np.array(colours[names[c]], np.uint8)[:, None, None], (3, 32, 32))
            for c in labels
        ]
    ).copy()
    captions = [f"a {names[c]} image" for c in labels]
    caption_label = np.array(labels)

    def positives(caption_rows: np.ndarray, image_rows: np.ndarray) -> np.ndarray:
        return caption_label[caption_rows][:, None] == labels[image_rows][None, :]

    return TrainData(
        images=images, captions=captions, caption_image=np.arange(n), positives=positives
    )


def _config(steps: int, **kw) -> EncoderTrainConfig:
    settings = {
        "batch_size": 16,
        "lr": 3e-3,
        "warmup": 2,
        "seed": 0,
        "device": "cpu",
        "checkpoint_every": 5,
        "spec": SPEC,
        **kw,
    }
    return EncoderTrainConfig(steps=steps, **settings)


def test_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    losses: list[float] = []
    out = train_encoder(
        _toy_data(), tmp_path / "enc", _config(40), progress=lambda s, n, loss: losses.append(loss)
    )
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    from crossrank.encoders import load_encoder

    encoder = load_encoder(out, device="cpu")
    text = encoder.encode_text(["a red image", "a blue image"]).pooled
    red = np.full((32, 32, 3), (220, 30, 30), np.uint8)
    from PIL import Image

    image = encoder.encode_images([Image.fromarray(red)]).pooled
    assert (image @ text.T)[0, 0] > (image @ text.T)[
        0, 1
    ]  # the red image is closer to "a red image"


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = _toy_data()
    straight = train_encoder(data, tmp_path / "straight", _config(10))

    class Stop(Exception):
        pass

    def stop_after_5(step: int, steps: int, loss: float) -> None:
        if step == 6:  # the checkpoint at step 5 is on disk; die mid-run
            raise Stop

    with pytest.raises(Stop):
        train_encoder(data, tmp_path / "resumed", _config(10), progress=stop_after_5)
    resumed = train_encoder(data, tmp_path / "resumed", _config(10))

    from safetensors.torch import load_file

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_checkpoint_from_another_config_is_refused(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    data = _toy_data()
    train_encoder(data, tmp_path / "enc", _config(5))
    with pytest.raises(InvalidArgumentError, match="different training config or data"):
        train_encoder(data, tmp_path / "enc", _config(5, lr=1e-4))


def test_wrong_image_size_is_refused(tmp_path: Path) -> None:
    data = _toy_data()
    bad = TrainData(
        images=data.images[:, :, :16, :16],
        captions=data.captions,
        caption_image=data.caption_image,
        positives=data.positives,
    )
    with pytest.raises(
        InvalidArgumentError, match=r"training images must be uint8 \(n, 3, 32, 32\)"
    ):
        train_encoder(bad, tmp_path / "enc", _config(2))


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="steps must be >= 1"):
        EncoderTrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        EncoderTrainConfig(lr=0)


def test_shapes_positives_are_exact(tmp_path: Path) -> None:
    from crossrank.datasets import generate_shapes, parse_query, satisfies

    ds = generate_shapes(tmp_path / "train", n_images=30, n_queries=3, seed=0, split="train")
    data = shapes_train_data(tmp_path / "train", image_size=32)
    assert data.images.shape == (30, 3, 32, 32)
    scenes = ds.scenes()
    caption_rows = np.arange(len(data.captions))[:40]
    image_rows = np.arange(30)
    pos = data.positives(caption_rows, image_rows)
    for i, c in enumerate(caption_rows):
        spec = parse_query(data.captions[c])
        assert pos[i, data.caption_image[c]]  # a caption is true of the image it was written for
        for j in image_rows:
            assert pos[i, j] == satisfies(scenes[j], spec)


def test_shapes_data_carries_a_caption_negative_bank(tmp_path: Path) -> None:
    from crossrank.datasets import generate_shapes, parse_query, satisfies

    ds = generate_shapes(tmp_path / "train", n_images=30, n_queries=3, seed=0, split="train")
    assert shapes_train_data(tmp_path / "train", image_size=32).negatives is None  # only when asked
    data = shapes_train_data(tmp_path / "train", image_size=32, caption_negatives=True)
    assert [data.bank_texts[u] for u in data.caption_bank_row] == data.captions
    scenes = ds.scenes()
    rows, valid = data.negatives.sample(
        data.caption_bank_row[:20], data.caption_image[:20], 3, np.random.default_rng(0)
    )
    assert valid[:, 1:].any()  # some captions have false rewrites: the check below can fail
    for b in range(20):
        image = scenes[data.caption_image[b]]
        assert data.bank_texts[rows[b, 0]] == data.captions[b]
        for r in rows[b, 1:][valid[b, 1:]]:
            assert not satisfies(image, parse_query(data.bank_texts[r]))  # false of its own image


def test_caption_negatives_fine_tune_a_model_with_its_tokenizer(
    tmp_path: Path, monkeypatch
) -> None:
    # NegCLIP: each step adds rewrites as text columns, their truth decided on every batch
    # image; --init-from starts from an existing model and keeps its tokenizer.
    import crossrank.training.encoder as train_module
    from crossrank.datasets import generate_shapes, match_matrix
    from crossrank.encoders import load_encoder

    torch.set_num_threads(1)
    generate_shapes(tmp_path / "train", n_images=40, n_queries=3, seed=0, split="train")
    data = shapes_train_data(tmp_path / "train", image_size=32, caption_negatives=True)
    base = train_encoder(data, tmp_path / "base", _config(3))
    seen = []

    def spy(specs, scenes):
        out = match_matrix(specs, scenes)
        seen.append(out)
        return out

    monkeypatch.setattr(train_module, "match_matrix", spy)
    tuned = train_encoder(
        data, tmp_path / "tuned", _config(3, caption_negatives=2, init_from=str(base))
    )
    assert len(seen) == 3 and all(
        m.shape[0] > 16 and m.shape[1] == 16 for m in seen
    )  # captions + rewrites
    a, b = load_encoder(base, device="cpu"), load_encoder(tuned, device="cpu")
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    before = a.encode_text(["a red circle left of a blue square"]).pooled
    after = b.encode_text(["a red circle left of a blue square"]).pooled
    assert not np.allclose(before, after)  # trained from the base weights, not a copy


def test_caption_negatives_need_scene_graphs_and_init_from_needs_a_crossrank_clip(
    tmp_path: Path,
) -> None:
    import shutil

    with pytest.raises(InvalidArgumentError, match="caption negatives need the scene graphs"):
        train_encoder(_toy_data(), tmp_path / "enc", _config(2, caption_negatives=2))
    with pytest.raises(ValueError, match="caption_negatives must be >= 0"):
        EncoderTrainConfig(caption_negatives=-1)
    base = train_encoder(_toy_data(), tmp_path / "base", _config(1))
    foreign = tmp_path / "foreign"
    shutil.copytree(base, foreign)
    (foreign / "crossrank_clip.json").unlink()
    with pytest.raises(InvalidArgumentError, match="no crossrank_clip.json with a spec"):
        train_encoder(_toy_data(), tmp_path / "enc2", _config(2, init_from=str(foreign)))
