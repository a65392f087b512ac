"""load_encoder: where models come from (dir, hub cache, sentence-transformers folder, demo alias),
what it records about them, and the one-line errors when it cannot open one."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from crossrank.encoders import DEMO_MODEL, load_encoder, loading, same_model, supported_model_types
from crossrank.errors import InvalidArgumentError, ModelError

INFO_KEYS = {
    "model_id",
    "model_type",
    "dim",
    "patch_dim",
    "n_patches",
    "image_size",
    "max_text_len",
    "config_sha256",
    "weights_sha256",
}
OFFLINE_HINT = "download it once with network, or pass a local directory in Hugging Face format"


def _copy(src: Path, dst: Path, *, without: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*without) if without else None)
    return dst


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, with offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _go_online(monkeypatch) -> None:
    """Turn offline mode off (the suite turns it on; these tests fake the hub, never call it)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _cache_snapshot(
    cache: Path, repo_id: str, src: Path, *, only: tuple[str, ...] | None = None
) -> Path:
    """Lay ``src`` out as huggingface_hub caches a snapshot of ``repo_id`` (refs/main -> commit)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        if only is None or f.name in only:
            shutil.copy2(f, snapshot / f.name)
    return snapshot


# -- what a loaded encoder records -----------------------------------------------------------------


def test_info_is_json_able_and_complete(tiny_encoder, tiny_clip):
    info = json.loads(json.dumps(tiny_encoder.info))
    assert INFO_KEYS <= set(info)
    assert info["model_id"] == str(tiny_clip.resolve()) == tiny_encoder.model_id
    assert (info["model_type"], info["source"], info["dim"], info["n_patches"]) == (
        "clip",
        "local",
        32,
        16,
    )
    assert (info["image_size"], info["max_text_len"]) == (32, 24)


def test_same_model_for_a_moved_copy_not_for_other_weights(
    tiny_encoder, tiny_clip, other_clip, tmp_path
):
    copy = load_encoder(_copy(tiny_clip, tmp_path / "moved"), device="cpu")
    other = load_encoder(other_clip, device="cpu")
    assert copy.model_id != tiny_encoder.model_id
    assert same_model(copy.info, tiny_encoder.info)
    assert not same_model(other.info, tiny_encoder.info)
    assert (
        other.info["config_sha256"] == tiny_encoder.info["config_sha256"]
    )  # same architecture, other weights


def test_relative_path_string_and_path_object_load_the_same_dir(tiny_clip, monkeypatch):
    monkeypatch.chdir(tiny_clip.parent)
    by_str = load_encoder(f"./{tiny_clip.name}", device="cpu")
    by_path = load_encoder(Path(tiny_clip.name), device="cpu")
    assert by_str.model_id == by_path.model_id == str(tiny_clip.resolve())


@pytest.mark.filterwarnings(
    "ignore:Cannot enable progress bars"
)  # huggingface_hub's, under the suite's env
def test_loading_is_quiet_and_leaves_transformers_logging_as_it_was(tiny_clip, capfd):
    from transformers.utils import logging as hf_logging

    hook_before = hf_logging.set_tqdm_hook(None)
    hf_logging.set_tqdm_hook(hook_before)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    # The suite may switch bars off; they must be on for this test to bite.
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        load_encoder(tiny_clip, device="cpu")
        captured = capfd.readouterr()
    finally:
        if not bars_were_on:
            hf_logging.disable_progress_bar()
    assert "Loading weights" not in captured.err and "LOAD REPORT" not in captured.err
    for name in ("transformers.modeling_utils", "transformers.utils.import_utils"):
        assert logging.getLogger(name).filters == []
    hook_after = hf_logging.set_tqdm_hook(hook_before)
    assert hook_after is hook_before  # the hook set for the load was taken off again


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
            ],
        ),
    ],
)
def test_device_param_places_the_model_and_outputs_float32(tiny_clip, tiny_encoder, images, device):
    enc = load_encoder(tiny_clip, device=device, batch_size=3)
    assert enc.device.type == device
    assert enc.dtype == (torch.float16 if device == "cuda" else torch.float32)
    assert next(enc.model.parameters()).device.type == device
    feats, text = (
        enc.encode_images(images),
        enc.encode_text(["a red circle", "a blue square left of a star"]),
    )
    assert (
        feats.pooled.dtype
        == feats.patches.dtype
        == text.pooled.dtype
        == text.tokens.dtype
        == np.float32
    )
    np.testing.assert_allclose(np.linalg.norm(feats.pooled, axis=1), 1.0, atol=1e-5)
    tol = 2e-2 if device == "cuda" else 1e-5  # fp16 on CUDA
    ref_text = tiny_encoder.encode_text(["a red circle", "a blue square left of a star"])
    np.testing.assert_allclose(feats.pooled, tiny_encoder.encode_images(images).pooled, atol=tol)
    np.testing.assert_allclose(text.pooled, ref_text.pooled, atol=tol)


def test_explicit_dtype_is_honoured(tiny_clip, tiny_encoder, images):
    enc = load_encoder(tiny_clip, device="cpu", dtype="bf16")
    assert enc.dtype == torch.bfloat16
    feats = enc.encode_images(images)
    assert feats.pooled.dtype == np.float32
    np.testing.assert_allclose(feats.pooled, tiny_encoder.encode_images(images).pooled, atol=5e-2)


# -- other places a model comes from ---------------------------------------------------------------


def test_hub_id_is_read_from_the_local_cache_offline(hub_cache, tiny_clip, tiny_encoder):
    snapshot = _cache_snapshot(hub_cache, "crossrank-tests/tiny-clip", tiny_clip)
    enc = load_encoder("crossrank-tests/tiny-clip", device="cpu")
    assert enc.model_id == enc.info["model_id"] == "crossrank-tests/tiny-clip"
    assert (enc.info["source"], enc.info["revision"]) == ("hub", snapshot.name)
    assert same_model(enc.info, tiny_encoder.info)


def test_hub_id_not_cached_offline_is_one_clear_line(hub_cache):
    with pytest.raises(ModelError) as excinfo:
        load_encoder("openai/clip-vit-base-patch32", device="cpu")
    assert str(excinfo.value) == (
        "model 'openai/clip-vit-base-patch32' is not in the local Hugging Face "
        f"cache and the hub cannot be reached (HF_HUB_OFFLINE=1); {OFFLINE_HINT}"
    )


def test_hub_id_partly_cached_offline_says_so(hub_cache, tiny_clip):
    _cache_snapshot(hub_cache, "crossrank-tests/partial", tiny_clip, only=("config.json",))
    with pytest.raises(
        ModelError,
        match=r"'crossrank-tests/partial' is only partly in the local Hugging Face cache",
    ):
        load_encoder("crossrank-tests/partial", device="cpu")


def _fake_snapshot_download(online_error: Exception):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake(repo_id, *, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
        raise online_error

    return fake


def test_hub_unreachable_is_one_clear_line(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    _go_online(monkeypatch)
    error = LocalEntryNotFoundError(
        "Got: ConnectError: [Errno -3] Temporary failure in name resolution\nmore"
    )
    error.__cause__ = ConnectionError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(error))
    with pytest.raises(ModelError) as excinfo:
        load_encoder("crossrank-tests/somewhere", device="cpu")
    message = str(excinfo.value)
    assert "\n" not in message
    assert message == (
        "model 'crossrank-tests/somewhere' is not in the local Hugging Face cache and the hub "
        "cannot be reached (ConnectionError: [Errno -3] Temporary failure in name resolution); "
        f"{OFFLINE_HINT}"
    )


def test_hub_id_that_does_not_exist_online(hub_cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    _go_online(monkeypatch)
    error = RepositoryNotFoundError(
        "404 Client Error", response=SimpleNamespace(headers={}, request=None)
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot_download(error))
    with pytest.raises(
        ModelError,
        match=r"'crossrank-tests/nope' was not found on the Hugging Face hub, or it is "
        r"private or gated",
    ):
        load_encoder("crossrank-tests/nope", device="cpu")


def test_hub_download_that_breaks_off(hub_cache, monkeypatch):
    import huggingface_hub

    class ReadError(Exception):  # stands in for httpx's transport errors, which are not OSErrors
        pass

    _go_online(monkeypatch)
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", _fake_snapshot_download(ReadError("connection reset"))
    )
    with pytest.raises(
        ModelError,
        match=r"'crossrank-tests/big': downloading it from the Hugging Face hub failed "
        r"\(ReadError: connection reset\); try again",
    ):
        load_encoder("crossrank-tests/big", device="cpu")


@pytest.mark.parametrize(
    ("subdir", "module_type"),
    [
        (
            "0_CLIPModel",
            "sentence_transformers.models.CLIPModel",
        ),  # sentence-transformers 2.x - 5.x
        (
            "",
            "sentence_transformers.sentence_transformer.modules.clip_model.CLIPModel",
        ),  # 6.x: model at the top
    ],
)
def test_sentence_transformers_clip_folder(
    tmp_path, tiny_clip, tiny_encoder, images, subdir, module_type
):
    st = tmp_path / "st-clip"
    _copy(tiny_clip, st / subdir if subdir else st)
    modules = [{"idx": 0, "name": "0", "path": subdir, "type": module_type}]
    (st / "modules.json").write_text(json.dumps(modules))
    enc = load_encoder(st, device="cpu")
    assert enc.model_id == str(st.resolve())
    assert same_model(enc.info, tiny_encoder.info)
    np.testing.assert_allclose(
        enc.encode_images(images).pooled, tiny_encoder.encode_images(images).pooled, atol=1e-6
    )


def test_sentence_transformers_pipeline_beyond_clip_is_refused(tmp_path, tiny_clip):
    st = tmp_path / "st-dense"
    _copy(tiny_clip, st / "0_CLIPModel")
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "0_CLIPModel",
            "type": "sentence_transformers.models.CLIPModel",
        },
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(
        ModelError,
        match="sentence-transformers pipeline of CLIPModel, Dense; only a plain CLIPModel",
    ):
        load_encoder(st, device="cpu")


@pytest.mark.parametrize(
    ("modules_json", "make_subdir", "match"),
    [
        ("[not json", False, r"cannot read .*modules\.json"),
        ('{"0": "CLIPModel"}', False, r"modules\.json is not a sentence-transformers module list"),
        (
            '[{"path": "../elsewhere", "type": "sentence_transformers.models.CLIPModel"}]',
            False,
            r"modules\.json points at .*elsewhere, which is not a folder inside it",
        ),
        (
            '[{"path": "0_CLIPModel", "type": "sentence_transformers.models.CLIPModel"}]',
            True,
            r"the CLIP module folder .*0_CLIPModel has no config\.json; found nothing",
        ),
    ],
)
def test_broken_sentence_transformers_folders(tmp_path, modules_json, make_subdir, match):
    st = tmp_path / "st"
    st.mkdir()
    (tmp_path / "elsewhere").mkdir()
    if make_subdir:
        (st / "0_CLIPModel").mkdir()
    (st / "modules.json").write_text(modules_json)
    with pytest.raises(ModelError, match=match):
        load_encoder(st, device="cpu")


def test_demo_alias_resolves_to_the_shipped_dir(monkeypatch, tiny_clip, tiny_encoder):
    monkeypatch.setattr(loading, "demo_model_dir", lambda: tiny_clip)
    for model in (None, DEMO_MODEL):
        enc = load_encoder(model, device="cpu")
        assert enc.model_id == enc.info["model_id"] == "crossrank-demo"
        assert enc.info["source"] == "demo"
        assert same_model(enc.info, tiny_encoder.info)


def test_demo_model_missing_from_the_installation(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "demo_model_dir", lambda: tmp_path / "no-demo-here")
    with pytest.raises(
        ModelError, match=r"^the shipped demo model is not in this installation; pass --model$"
    ):
        load_encoder(None, device="cpu")


def test_demo_model_dir_is_inside_the_package():
    import crossrank.encoders

    assert (
        loading.demo_model_dir()
        == Path(crossrank.encoders.__file__).parent.parent / "assets" / "demo-encoder"
    )


# -- errors ----------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(
        ModelError, match=r"model directory '\./no-such-model' does not exist; pass a local"
    ):
        load_encoder("./no-such-model", device="cpu")
    with pytest.raises(ModelError, match=r"model directory '.*/gone' does not exist"):
        load_encoder(tmp_path / "gone", device="cpu")


def test_not_a_hub_id_either():
    with pytest.raises(
        ModelError, match=r"'not a model!' is not a directory and not a valid Hugging Face model id"
    ):
        load_encoder("not a model!", device="cpu")


def test_a_file_is_not_a_model(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\0")
    with pytest.raises(ModelError, match=r"is a file, not a directory"):
        load_encoder(str(f), device="cpu")


def test_dir_without_config_json_names_what_it_found(tmp_path):
    d = tmp_path / "weights-only"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0")
    (d / "notes.txt").write_text("hi")
    with pytest.raises(
        ModelError, match=r"has no config\.json; found model\.safetensors, notes\.txt\. Expected"
    ):
        load_encoder(d, device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"found nothing \(the directory is empty\)"):
        load_encoder(empty, device="cpu")


def test_unsupported_model_type(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path / "bert"
    )
    with pytest.raises(
        ModelError,
        match=r"has model_type 'bert' in .*config\.json; supported model types: blip, clip",
    ):
        load_encoder(tmp_path / "bert", device="cpu")
    assert "clip" in supported_model_types()


def test_config_without_model_type_or_unreadable(tmp_path, tiny_clip):
    d = _copy(tiny_clip, tmp_path / "no-type")
    config = json.loads((d / "config.json").read_text())
    del config["model_type"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelError, match=r"has no model_type in .*; supported model types: blip, clip"
    ):
        load_encoder(d, device="cpu")
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"config\.json is not a JSON object"):
        load_encoder(d, device="cpu")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"cannot read .*config\.json"):
        load_encoder(d, device="cpu")


def test_dir_without_weights(tmp_path, tiny_clip):
    d = _copy(tiny_clip, tmp_path / "no-weights", without=("*.safetensors",))
    with pytest.raises(
        ModelError, match=r"has no weights in .*\(model\.safetensors or pytorch_model\.bin\); found"
    ):
        load_encoder(d, device="cpu")


def test_checkpoint_with_missing_weights_is_refused(tmp_path, tiny_clip):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_clip, tmp_path / "partial-weights")
    state = load_file(d / "model.safetensors")
    del state["text_projection.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ModelError,
        match=r"is not a complete CLIPModel: 1 weight\(s\) are missing .*text_projection",
    ):
        load_encoder(d, device="cpu")


def test_checkpoint_that_does_not_load(tmp_path, tiny_clip):
    d = _copy(tiny_clip, tmp_path / "broken-weights")
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelError, match=r"cannot load model .* as a CLIPModel from "):
        load_encoder(d, device="cpu")


def test_missing_processor_or_tokenizer(tmp_path, tiny_clip):
    d = _copy(tiny_clip, tmp_path / "no-processor", without=("preprocessor_config.json",))
    with pytest.raises(
        ModelError, match=r"has no usable image processor in .*preprocessor_config\.json"
    ):
        load_encoder(d, device="cpu")
    d = _copy(tiny_clip, tmp_path / "no-tokenizer", without=("tokenizer*",))
    with pytest.raises(
        ModelError, match=r"has no usable tokenizer in .*: none of tokenizer\.json, vocab\.json"
    ):
        load_encoder(d, device="cpu")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "tpu"}, r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
        ({"dtype": "int8"}, r"dtype must be one of auto, fp32, fp16, bf16, got 'int8'"),
    ],
)
def test_bad_arguments(tiny_clip, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        load_encoder(tiny_clip, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda(tiny_clip):
    with pytest.raises(
        InvalidArgumentError, match=r"device 'cuda' was asked for, but torch sees no CUDA device"
    ):
        load_encoder(tiny_clip, device="cuda")


def test_model_of_a_wrong_type_or_empty():
    with pytest.raises(
        InvalidArgumentError, match="model must be a hub id, a directory or None, got int"
    ):
        loading.resolve_model(3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="model is an empty string"):
        loading.resolve_model(" ")
    with pytest.raises(InvalidArgumentError, match="model must be a non-empty string"):
        load_encoder("", device="cpu")
