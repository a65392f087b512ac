"""Finding a model (demo alias, local directory, hub id) and opening it with the right backend.

Resolution of ``model``:

1. ``None`` or ``"crossrank-demo"``: the demo model shipped in ``crossrank/assets/demo-encoder/``.
2. An existing directory (a ``Path`` is always taken as a directory): used as it is, no network.
3. Otherwise a Hugging Face hub id (``org/name``): the local Hugging Face cache first; the hub only
   when the model is not cached and ``HF_HUB_OFFLINE`` is not set. A model once downloaded is
   therefore always opened from the cache, without asking the hub for a newer revision.

In every case the directory is either in Hugging Face format (``config.json``, weights, tokenizer,
``preprocessor_config.json``) or a sentence-transformers CLIP folder, whose ``modules.json`` points
at such a directory (``0_CLIPModel/``); sentence-transformers itself is not needed. A folder with
only an ``open_clip_config.json`` (an OpenCLIP checkpoint) is refused with what to do instead.

``config.json``'s ``model_type`` then picks the backend in :data:`BACKENDS`. A new backend is a
class with a ``from_pretrained(model_dir, *, info, device, dtype, batch_size)`` classmethod (see
:class:`crossrank.encoders.clip.ClipEncoder`) and one line in that table.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossrank.device import resolve_device
from crossrank.encoders._hf import one_line, quiet_transformers
from crossrank.encoders.base import Encoder
from crossrank.encoders.config import DEMO_MODEL, EncoderConfig, Precision
from crossrank.encoders.fingerprint import config_sha256, weight_files, weights_sha256
from crossrank.errors import InvalidArgumentError, ModelError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKENDS",
    "supported_model_types",
    "demo_model_dir",
    "resolve_model",
    "ResolvedModel",
    "load_encoder",
]

logger = logging.getLogger(__name__)

# config.json model_type -> "module:Class" of the backend, imported only when used.
BACKENDS: dict[str, str] = {
    "blip": "crossrank.encoders.blip:BlipEncoder",
    "clip": "crossrank.encoders.clip:ClipEncoder",
    "siglip": "crossrank.encoders.siglip:SiglipEncoder",
    "siglip2": "crossrank.encoders.siglip:Siglip2Encoder",
}

# What to fetch from the hub: configs, tokenizer files and safetensors weights; PyTorch .bin weights
# only for repos without safetensors (never TF / Flax / ONNX weights).
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
_HUB_BIN_PATTERNS = ["*pytorch_model*.bin"]

_TRUE = {"1", "on", "yes", "true"}


def supported_model_types() -> list[str]:
    """The ``config.json`` ``model_type`` values :func:`load_encoder` can open, sorted."""
    return sorted(BACKENDS)


def demo_model_dir() -> Path:
    """Where the shipped demo model lives in this installation: ``crossrank/assets/demo-encoder/``.

    The directory may be missing (an installation without it, or before the demo model exists).
    """
    # The package is installed as plain files (not zipped): the assets sit beside this subpackage.
    return Path(__file__).resolve().parent.parent / "assets" / "demo-encoder"


@dataclass(frozen=True)
class ResolvedModel:
    """A model located on this machine.

    Attributes:
        model_id: what the manifest records: ``"crossrank-demo"``, the hub id, or the absolute
            directory.
        source: ``"demo"``, ``"local"`` or ``"hub"``.
        root: the directory found (a hub snapshot, a sentence-transformers folder, ...).
        model_dir: the Hugging Face format directory inside it (``root`` itself, or
            ``root/0_CLIPModel``).
        revision: the hub commit of the snapshot, else None.
    """

    model_id: str
    source: str
    root: Path
    model_dir: Path
    revision: str | None = None


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them at import)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _listing(directory: Path, limit: int = 8) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    if not names:
        return "nothing (the directory is empty)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _hf_dir(root: Path, model_id: str) -> Path:
    """The Hugging Face format folder in ``root``: itself or a sentence-transformers CLIP module."""
    modules_file = root / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelError(
                f"model {model_id!r}: cannot read {modules_file}: {one_line(e)}"
            ) from e
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ModelError(
                f"model {model_id!r}: {modules_file} is not a sentence-transformers module list"
            )
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if "CLIPModel" in kinds:
            others = [k for k in kinds if k not in ("CLIPModel", "Normalize")]
            if others:
                raise ModelError(
                    f"model {model_id!r} is a sentence-transformers pipeline of "
                    f"{', '.join(kinds)}; only a plain CLIPModel (optionally followed "
                    "by Normalize) can be read without sentence-transformers"
                )
            sub = (root / str(modules[kinds.index("CLIPModel")].get("path") or "")).resolve()
            if not sub.is_relative_to(root.resolve()) or not sub.is_dir():
                raise ModelError(
                    f"model {model_id!r}: {modules_file} points "
                    f"at {sub}, which is not a folder inside it"
                )
            if not (sub / "config.json").is_file():
                raise ModelError(
                    f"model {model_id!r}: the CLIP module folder "
                    f"{sub} has no config.json; found {_listing(sub)}"
                )
            return sub
    if (root / "config.json").is_file():
        return root
    if (root / "open_clip_config.json").is_file():
        # An OpenCLIP checkpoint without a Hugging Face copy: open_clip_torch needs torchvision,
        # which crossrank does not install (docs/encoders.md says why).
        raise ModelError(
            f"model {model_id!r} is an OpenCLIP checkpoint (open_clip_config.json, no "
            "config.json); crossrank reads OpenCLIP models only in Hugging Face format: use the "
            "hub repo's transformers copy if it has one (e.g. laion/CLIP-ViT-B-32-laion2B-"
            "s34B-b79K), or convert it to a CLIPModel folder; see docs/encoders.md"
        )
    raise ModelError(
        f"model directory {root} has no config.json; found {_listing(root)}. Expected a "
        "Hugging Face model directory (config.json, weights, tokenizer, "
        "preprocessor_config.json) or a sentence-transformers CLIP folder (modules.json)"
    )


def _snapshot_usable(root: Path) -> bool:
    """Whether a cached snapshot holds what loading needs (another tool may have cached a part)."""
    try:
        model_dir = _hf_dir(root, str(root))
    except ModelError:
        return False
    return bool(weight_files(model_dir))


def _resolve_hub(repo_id: str) -> Path:
    """A local snapshot of ``repo_id``: cached, else downloaded (configs, tokenizer, weights)."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    local_misses = tuple(
        getattr(hub_errors, name)
        for name in ("LocalEntryNotFoundError", "IncompleteSnapshotError")
        if hasattr(hub_errors, name)
    )
    try:
        # Only config files are named, so a snapshot that an earlier download fetched with other
        # patterns is not refused as incomplete; _snapshot_usable checks what we need.
        root = Path(snapshot_download(repo_id, allow_patterns=["*.json"], local_files_only=True))
        if _snapshot_usable(root):
            return root
        cached = "is only partly in the local Hugging Face cache"
    except local_misses:
        cached = "is not in the local Hugging Face cache"
    hint = "download it once with network, or pass a local directory in Hugging Face format"
    if _hub_offline():
        raise ModelError(
            f"model {repo_id!r} {cached} and the hub cannot be reached (HF_HUB_OFFLINE=1); {hint}"
        )
    try:
        root = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
        if not _snapshot_usable(root):
            root = Path(
                snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS + _HUB_BIN_PATTERNS)
            )
    except hub_errors.RepositoryNotFoundError as e:  # also GatedRepoError
        raise ModelError(
            f"model {repo_id!r} was not found on the Hugging Face hub, "
            f"or it is private or gated ({type(e).__name__}); check the "
            "id, log in with `hf auth login`, or pass a local directory"
        ) from e
    except (OSError, ValueError, *local_misses) as e:  # connection errors are OSErrors
        cause = e.__cause__ or e
        raise ModelError(
            f"model {repo_id!r} {cached} and the hub cannot be reached ({type(cause).__name__}: "
            f"{one_line(cause, 120)}); {hint}"
        ) from e
    except (
        Exception
    ) as e:  # e.g. the connection dropped mid-download (httpx errors are not OSErrors)
        raise ModelError(
            f"model {repo_id!r}: downloading it from the Hugging Face "
            f"hub failed ({type(e).__name__}: {one_line(e, 120)}); try "
            "again, or pass a local directory in Hugging Face format"
        ) from e
    return root


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith(("/", ".", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.endswith("/")
    )


def resolve_model(model: str | Path | None) -> ResolvedModel:
    """Locate a model on this machine (see the module notes for the order).

    Args:
        model: ``None`` / ``"crossrank-demo"``, a local directory, or a hub id.

    Returns:
        The :class:`ResolvedModel`.

    Raises:
        ModelError: nothing usable is there, with what was found and what to do.
    """
    if model is None or (isinstance(model, str) and model == DEMO_MODEL):
        root = demo_model_dir()
        if not root.is_dir():
            raise ModelError("the shipped demo model is not in this installation; pass --model")
        return ResolvedModel(DEMO_MODEL, "demo", root, _hf_dir(root, DEMO_MODEL))
    if not isinstance(model, str | Path):
        raise InvalidArgumentError(
            f"model must be a hub id, a directory or None, got {type(model).__name__}"
        )
    text = str(model)
    if not text.strip():
        raise InvalidArgumentError("model is an empty string; pass a hub id or a local directory")
    path = Path(text).expanduser()
    if path.is_dir():
        root = path.resolve()
        return ResolvedModel(str(root), "local", root, _hf_dir(root, str(root)))
    if path.exists():
        raise ModelError(
            f"model {text!r} is a file, not a directory; pass the directory in "
            "Hugging Face format that holds config.json and the weights, or a hub id"
        )
    if isinstance(model, Path) or _looks_like_path(text):
        raise ModelError(
            f"model directory {text!r} does not exist; pass a local directory in "
            "Hugging Face format or a hub id such as openai/clip-vit-base-patch32"
        )
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except ValueError as e:  # HFValidationError
        raise ModelError(
            f"model {text!r} is not a directory and not a valid Hugging Face "
            f"model id ({one_line(e, 120)}); pass a local directory in Hugging "
            "Face format or a hub id such as openai/clip-vit-base-patch32"
        ) from e
    root = _resolve_hub(text)
    return ResolvedModel(text, "hub", root, _hf_dir(root, text), revision=root.name)


def _read_config(resolved: ResolvedModel) -> dict[str, Any]:
    config_file = resolved.model_dir / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(
            f"model {resolved.model_id!r}: cannot read {config_file}: {one_line(e)}"
        ) from e
    if not isinstance(config, dict):
        raise ModelError(f"model {resolved.model_id!r}: {config_file} is not a JSON object")
    return config


def _check_model_type(model_type: Any, resolved: ResolvedModel) -> None:
    if model_type not in BACKENDS:
        found = f"model_type {model_type!r}" if model_type is not None else "no model_type"
        raise ModelError(
            f"model {resolved.model_id!r} has {found} in {resolved.model_dir / 'config.json'}; "
            f"supported model types: {', '.join(supported_model_types())}"
        )


def _backend(model_type: Any, resolved: ResolvedModel) -> Any:
    _check_model_type(model_type, resolved)
    module_name, _, class_name = BACKENDS[model_type].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    precision = Precision(str(dtype).lower())
    if precision is Precision.AUTO:
        return torch.float16 if device.type == "cuda" else torch.float32
    return {
        Precision.FP32: torch.float32,
        Precision.FP16: torch.float16,
        Precision.BF16: torch.bfloat16,
    }[precision]


def open_model(
    model: str | Path | None, device: str, batch_size: int, dtype: str
) -> tuple[EncoderConfig, torch.device, ResolvedModel, dict[str, Any], list[Path]]:
    """What every loader checks before building a model: the settings, the device, the model's
    folder, its ``config.json`` (a supported ``model_type``) and its weight files.

    Returns:
        The :class:`EncoderConfig`, the torch device, the resolved model, its config and its
        weight files.

    Raises:
        InvalidArgumentError: a bad ``device``, ``batch_size`` or ``dtype``.
        ModelError: the model cannot be found or opened, its ``model_type`` is not supported, or
            it has no weights.
    """
    try:
        config = EncoderConfig(
            model=DEMO_MODEL if model is None else str(model),
            device=str(device),
            batch_size=batch_size,
            dtype=str(dtype),
        )
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from e
    torch_device = resolve_device(config.device)
    resolved = resolve_model(model)
    hf_config = _read_config(resolved)
    _check_model_type(hf_config.get("model_type"), resolved)
    files = weight_files(resolved.model_dir)
    if not files:
        raise ModelError(
            f"model {resolved.model_id!r} has no weights in {resolved.model_dir} "
            f"(model.safetensors or pytorch_model.bin); found {_listing(resolved.model_dir)}"
        )
    return config, torch_device, resolved, hf_config, files


def model_info(
    resolved: ResolvedModel, hf_config: dict[str, Any], files: list[Path], backend: str
) -> dict[str, Any]:
    """The identity of a model that an index records and every loader checks against."""
    return {
        "model_id": resolved.model_id,
        "model_type": hf_config["model_type"],
        "backend": backend,
        "source": resolved.source,
        "revision": resolved.revision,
        "config_sha256": config_sha256(hf_config),
        "weights_sha256": weights_sha256(files),
    }


def load_encoder(
    model: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    *,
    dtype: str = "auto",
) -> Encoder:
    """Open an image/text encoder.

    Args:
        model: ``None`` or ``"crossrank-demo"`` for the shipped demo model; a local directory in
            Hugging Face format (or a sentence-transformers CLIP folder); or a hub id such as
            ``openai/clip-vit-base-patch32``, taken from the local Hugging Face cache when it is
            there, downloaded otherwise unless ``HF_HUB_OFFLINE=1``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images or texts per forward pass.
        dtype: ``auto`` (fp16 on CUDA, fp32 on the CPU), ``fp32``, ``fp16`` or ``bf16``. Outputs are
            float32 whatever the model runs in.

    Returns:
        An :class:`Encoder` whose ``info`` the index manifest records.

    Raises:
        InvalidArgumentError: a bad ``device``, ``batch_size`` or ``dtype``.
        ModelError: the model cannot be found or opened, or its ``model_type`` is not supported;
            one line saying what was found and what to do.

    Example:
        >>> enc = load_encoder("openai/clip-vit-base-patch32", device="cpu")  # doctest: +SKIP
        >>> enc.encode_text(["a red cube"]).pooled.shape  # doctest: +SKIP
        (1, 512)
    """
    config, torch_device, resolved, hf_config, files = open_model(model, device, batch_size, dtype)
    backend = _backend(hf_config.get("model_type"), resolved)
    info = model_info(resolved, hf_config, files, backend.backend)
    torch_dtype = _torch_dtype(config.dtype, torch_device)
    with quiet_transformers():
        encoder = backend.from_pretrained(
            resolved.model_dir,
            info=info,
            device=torch_device,
            dtype=torch_dtype,
            batch_size=config.batch_size,
        )
    logger.info(
        "loaded %s (%s, dim %d, %d patches) on %s in %s",
        resolved.model_id,
        info["model_type"],
        encoder.dim,
        encoder.n_patches,
        torch_device,
        str(torch_dtype).removeprefix("torch."),
    )
    return encoder
