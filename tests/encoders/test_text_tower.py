"""The light text path: CLIP's text tower in plain torch, equal to the transformers encoder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossrank.encoders import load_encoder, load_text_encoder
from crossrank.errors import ModelError, ModelMismatchError

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]

#: Short, over-long (truncated), empty-ish and unicode texts; more than one batch of 4.
TEXTS = [
    "a red circle",
    "a red circle left of a blue square",
    " ".join(["a green triangle above a yellow star"] * 8),
    ".",
    "  x  ",
    "Ünïcödé ＣＡＴ 猫 🐱 café",
    "a large small cat dog photo of the and below " * 3,
    "ﬁ",
]
FIELDS = ("pooled", "tokens", "mask", "input_ids", "token_embeddings")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_text_config(model_dir: Path, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config["text_config"].update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def _assert_same_text(light, full, texts, batch_texts: int | None = None) -> None:
    for token_embeddings in (False, True):
        a = light.encode_text(texts, token_embeddings=token_embeddings)
        b = full.encode_text(texts, token_embeddings=token_embeddings)
        for name in FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            if y is None:
                assert x is None, name
                continue
            assert x.shape == y.shape and x.dtype == y.dtype, name
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=name)
        # The rows cut at max_text_len, which a search warns about.
        assert a.truncated == b.truncated
    assert light._tokenize(list(texts))[2] == full._tokenize(list(texts))[2]


def _exact_length_text(encoder) -> str:
    """A text of exactly ``max_text_len`` tokens with the special ones (nothing cut)."""
    words = []
    while True:
        words.append("red")
        ids, _, cut = encoder._tokenize([" ".join(words)])
        if ids.shape[1] == encoder.max_text_len:
            assert not cut
            return " ".join(words)


@pytest.fixture(scope="module")
def light_tiny(tiny_clip):
    return load_text_encoder(tiny_clip, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def demo_pair():
    return (
        load_text_encoder("crossrank-demo", device="cpu", batch_size=3),
        load_encoder("crossrank-demo", device="cpu", batch_size=3),
    )


# -- equal to the transformers encoder -------------------------------------------------------------


def test_tiny_clip_text_features_equal_the_full_encoder(light_tiny, tiny_encoder) -> None:
    assert getattr(light_tiny, "light", False)
    texts = [*TEXTS, _exact_length_text(tiny_encoder)]
    assert tiny_encoder.encode_text(texts).truncated == (2, 6), "the over-long texts are cut"
    _assert_same_text(light_tiny, tiny_encoder, texts)
    for text in texts:  # one at a time: no padding at all
        _assert_same_text(light_tiny, tiny_encoder, [text])


def test_other_clip_and_batch_sizes(other_clip) -> None:
    full = load_encoder(other_clip, device="cpu", batch_size=2)
    light = load_text_encoder(other_clip, device="cpu", batch_size=5)
    _assert_same_text(light, full, TEXTS)


def test_demo_encoder_text_features_equal_the_full_encoder(demo_pair) -> None:
    light, full = demo_pair
    assert getattr(light, "light", False)
    texts = [*TEXTS, _exact_length_text(full)]
    assert full._tokenize(texts)[2]
    _assert_same_text(light, full, texts)


def test_word_offsets_equal_the_fast_tokenizers_so_training_finds_the_same_words(
    demo_pair,
) -> None:
    from crossrank.training.attention_targets import object_token_positions

    light, full = demo_pair
    texts = [
        "a red circle left of a blue square",
        "a small green triangle above a large purple star",
        "a circle",
        " ".join(["a red circle left of a blue square"] * 3),  # cut at the token limit
    ]
    limit = full.info["max_text_len"]
    got = light.tokenizer(texts, return_offsets_mapping=True, truncation=True, max_length=limit)
    want = full.tokenizer(texts, return_offsets_mapping=True, truncation=True, max_length=limit)
    assert got["input_ids"] == [list(ids) for ids in want["input_ids"]]
    assert got["offset_mapping"] == [[tuple(o) for o in row] for row in want["offset_mapping"]]
    np.testing.assert_array_equal(
        object_token_positions(light.tokenizer, texts, limit),
        object_token_positions(full.tokenizer, texts, limit),
    )


def test_info_equals_the_full_encoders_key_for_key(light_tiny, tiny_encoder, demo_pair) -> None:
    assert light_tiny.info == tiny_encoder.info
    assert list(light_tiny.info) == list(tiny_encoder.info)
    light, full = demo_pair
    assert light.info == full.info
    for name in ("model_id", "dim", "patch_dim", "token_dim", "max_text_len", "n_patches"):
        assert getattr(light, name) == getattr(full, name)
    assert light.token_embedding_dim == full.token_embedding_dim
    assert light.logit_scale == pytest.approx(full.logit_scale)


def test_empty_text_is_refused_as_by_the_full_encoder(light_tiny) -> None:
    from crossrank.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="empty or only whitespace"):
        light_tiny.encode_text(["a red circle", "   "])
    with pytest.raises(InvalidArgumentError, match="wrap a single query in a list"):
        light_tiny.encode_text("a red circle")


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_other_activations(tmp_path, tiny_clip, act) -> None:
    d = _copy(tiny_clip, tmp_path / f"clip-{act}")
    _edit_text_config(d, hidden_act=act)
    light = load_text_encoder(d, device="cpu")
    assert getattr(light, "light", False)
    _assert_same_text(light, load_encoder(d, device="cpu"), TEXTS)


def test_legacy_eos_token_id_2_pools_at_the_largest_id(tmp_path, tiny_clip) -> None:
    d = _copy(tiny_clip, tmp_path / "clip-legacy-eos")
    _edit_text_config(d, eos_token_id=2)
    light = load_text_encoder(d, device="cpu")
    _assert_same_text(light, load_encoder(d, device="cpu"), TEXTS)


def test_config_defaults_are_transformers_clip_text_config_defaults() -> None:
    from transformers import CLIPConfig, CLIPTextConfig

    from crossrank.encoders.text_tower import CLIP_PROJECTION_DIM_DEFAULT, CLIP_TEXT_DEFAULTS

    defaults = CLIPTextConfig()
    assert {k: getattr(defaults, k) for k in CLIP_TEXT_DEFAULTS} == CLIP_TEXT_DEFAULTS
    assert CLIPConfig().projection_dim == CLIP_PROJECTION_DIM_DEFAULT


def test_a_config_that_leaves_keys_to_the_defaults(tmp_path, tiny_clip) -> None:
    d = _copy(tiny_clip, tmp_path / "clip-short-config")
    config = json.loads((d / "config.json").read_text())
    for key in ("hidden_act", "layer_norm_eps"):
        config["text_config"].pop(key, None)
    (d / "config.json").write_text(json.dumps(config))
    _assert_same_text(load_text_encoder(d, device="cpu"), load_encoder(d, device="cpu"), TEXTS)


def _clip_tokenizer_model(tmp_path: Path, tiny_clip: Path) -> Path:
    """tiny_clip with a CLIPTokenizer as the hub's CLIPs have (byte-level BPE, '</w>', the
    end-of-text token as padding and unknown token, the largest id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    from tests.conftest import TINY_WORDS

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=200,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator(TINY_WORDS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    d = _copy(tiny_clip, tmp_path / "clip-hub-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / name).unlink(missing_ok=True)
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=20).save_pretrained(d)
    assert json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"] in (
        "CLIPTokenizer",
        "CLIPTokenizerFast",
    )
    # Re-initialise the model for this vocabulary; keep the rest of the tiny architecture.
    from crossrank.encoders.factory import ClipSpec, new_clip

    clip = new_clip(ClipSpec(), vocab_size=len(vocab), seed=3)
    clip.config.text_config.eos_token_id = vocab["<|endoftext|>"]
    clip.config.text_config.bos_token_id = vocab["<|startoftext|>"]
    clip.config.text_config.pad_token_id = vocab["<|endoftext|>"]
    clip.text_model.eos_token_id = vocab["<|endoftext|>"]
    clip.save_pretrained(d)
    return d


def test_a_hub_style_clip_tokenizer(tmp_path, tiny_clip) -> None:
    d = _clip_tokenizer_model(tmp_path, tiny_clip)
    light = load_text_encoder(d, device="cpu", batch_size=3)
    assert getattr(light, "light", False)
    full = load_encoder(d, device="cpu", batch_size=3)
    assert light.info == full.info and light.max_text_len == 20
    assert full._tokenize(TEXTS)[2]
    _assert_same_text(light, full, [*TEXTS, "it's A   Photo!!", "don't 123"])


def test_sentence_transformers_clip_folder(tmp_path, tiny_clip, tiny_encoder) -> None:
    st = tmp_path / "st-clip"
    _copy(tiny_clip, st / "0_CLIPModel")
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "0_CLIPModel",
            "type": "sentence_transformers.models.CLIPModel",
        }
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    light = load_text_encoder(st, device="cpu")
    assert getattr(light, "light", False)
    assert light.model_id == str(st.resolve())
    _assert_same_text(light, tiny_encoder, TEXTS)


def test_hub_id_from_the_local_cache(tmp_path, monkeypatch, tiny_clip, tiny_encoder) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--crossrank-tests--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_clip, repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    light = load_text_encoder("crossrank-tests/tiny-clip", device="cpu")
    assert getattr(light, "light", False)
    assert (light.info["source"], light.info["revision"]) == ("hub", commit)
    _assert_same_text(light, tiny_encoder, TEXTS[:3])


# -- the full encoder where the light path cannot go -----------------------------------------------


def test_weights_only_in_pytorch_bin_fall_back_to_the_full_encoder(tmp_path, tiny_clip) -> None:
    from safetensors.torch import load_file

    d = _copy(tiny_clip, tmp_path / "clip-bin")
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(state, d / "pytorch_model.bin")
    enc = load_text_encoder(d, device="cpu")
    assert not getattr(enc, "light", False)
    assert enc.info == load_encoder(d, device="cpu").info


@pytest.mark.parametrize("change", ["activation", "tokenizer"])
def test_what_the_tower_does_not_know_falls_back(tmp_path, tiny_clip, change):
    d = _copy(tiny_clip, tmp_path / f"clip-{change}")
    if change == "activation":
        _edit_text_config(d, hidden_act="mish")
    else:
        settings = json.loads((d / "tokenizer_config.json").read_text())
        settings["tokenizer_class"] = "BertTokenizer"
        (d / "tokenizer_config.json").write_text(json.dumps(settings))
    enc = load_text_encoder(d, device="cpu")
    assert not getattr(enc, "light", False)
    assert enc.info == load_encoder(d, device="cpu").info


def test_blip_gets_the_full_encoder(tmp_path) -> None:
    from crossrank.encoders.blip import BlipEncoder
    from tests._models import make_tiny_blip

    d = make_tiny_blip(tmp_path / "tiny-blip")
    enc = load_text_encoder(d, device="cpu", expected_info=load_encoder(d, device="cpu").info)
    assert isinstance(enc, BlipEncoder)


def test_a_checkpoint_without_a_text_weight_is_the_full_loaders_error(tmp_path, tiny_clip):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_clip, tmp_path / "partial")
    state = load_file(d / "model.safetensors")
    del state["text_projection.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="is not a complete CLIPModel"):
        load_text_encoder(d, device="cpu")


# -- the index's model -----------------------------------------------------------------------------


def test_expected_info_of_another_model_is_refused_before_loading(
    tiny_clip, other_clip, tiny_encoder, monkeypatch
) -> None:
    import crossrank.encoders.text_tower as tower

    def boom(*args, **kwargs):
        raise AssertionError("weights read before the fingerprint check")

    monkeypatch.setattr(tower, "_read_weights", boom)
    with pytest.raises(ModelMismatchError, match="search it with the same --model") as excinfo:
        load_text_encoder(other_clip, device="cpu", expected_info=tiny_encoder.info, index_path="X")
    assert str(excinfo.value).startswith(f"index X was built with model {str(tiny_clip)!r}")


def test_expected_info_same_name_other_weights_says_rebuild(tmp_path, tiny_clip, other_clip):
    d = _copy(tiny_clip, tmp_path / "model")
    recorded = load_text_encoder(d, device="cpu").info
    shutil.copy2(other_clip / "model.safetensors", d / "model.safetensors")
    with pytest.raises(ModelMismatchError, match=r"rebuild the index with `crossrank build"):
        load_text_encoder(d, device="cpu", expected_info=recorded)


def test_expected_info_that_matches(light_tiny, tiny_clip) -> None:
    enc = load_text_encoder(tiny_clip, device="cpu", expected_info=light_tiny.info)
    assert getattr(enc, "light", False)


def test_image_methods_hand_over_to_the_full_encoder(light_tiny, tiny_encoder, images) -> None:
    feats = light_tiny.encode_images(images[:3])
    np.testing.assert_allclose(
        feats.pooled, tiny_encoder.encode_images(images[:3]).pooled, atol=1e-6
    )
    assert light_tiny.full_encoder().info == light_tiny.info


def test_query_path_never_imports_transformers() -> None:
    code = (
        "import sys\n"
        "import crossrank.encoders.text_tower as t\n"
        "enc = t.load_text_encoder('crossrank-demo', device='cpu')\n"
        "assert enc.light\n"
        "f = enc.encode_text(['a red circle left of a blue square'], token_embeddings=True)\n"
        "assert f.pooled.shape == (1, enc.dim)\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
