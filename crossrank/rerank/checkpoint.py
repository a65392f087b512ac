"""Saving and loading a cross-attention reranker: ``model.safetensors`` + ``config.json``.

::

    my-reranker/
      config.json          {"format": "crossrank-reranker", "format_version": 1,
                            "config": {RerankerConfig fields}, "metadata": {...}}
      model.safetensors    the state dict, float32

Both files are written through a temporary file and an atomic rename (weights first, config last),
so a crash leaves the previous checkpoint or the new one. Loading checks everything a user can get
wrong (a missing folder or file, a corrupt or truncated file, weights that do not fit their config,
dims that do not fit the index's encoder) and says so in one line.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossrank.device import Device, Precision, resolve_device
from crossrank.errors import ModelError, ModelMismatchError, some_of
from crossrank.rerank.config import RerankerConfig

if TYPE_CHECKING:
    from crossrank.rerank.cross_attention import CrossAttentionReranker

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "check_reranker_matches",
    "demo_reranker_dir",
    "shipped_reranker_for",
    "has_reranker_config",
    "is_reranker_dir",
    "load_reranker",
    "read_reranker_config",
    "save_reranker",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FORMAT = "crossrank-reranker"
_FORMAT_VERSION = 1


def demo_reranker_dir() -> Path:
    """The shipped demo reranker's folder, ``crossrank/assets/demo-reranker/`` (may be missing)."""
    from crossrank.encoders.loading import demo_model_dir

    return demo_model_dir().parent / "demo-reranker"


def shipped_reranker_for(encoder_info: Mapping[str, Any]) -> Path | None:
    """The shipped reranker trained over this encoder, or None.

    The demo reranker records the weights hash of the encoder it was trained over; an index whose
    encoder has exactly those weights gets it as its default (``reranker="auto"``).
    """
    folder = demo_reranker_dir()
    sha = encoder_info.get("weights_sha256")
    if not sha or not (folder / CONFIG_NAME).is_file():
        return None
    try:
        data = _read_config_file(folder)[1].get("data")
    except ModelError as e:
        logger.warning("the shipped reranker %s is not used: %s", folder, e)
        return None
    return folder if isinstance(data, dict) and data.get("encoder") == sha else None


def is_reranker_dir(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding a reranker ``config.json``."""
    return (Path(path) / CONFIG_NAME).is_file()


def has_reranker_config(path: str | os.PathLike[str]) -> bool:
    """True when ``path/config.json`` is readable and a crossrank reranker's (its ``format``),
    not another model's config of the same name."""
    try:
        data = json.loads((Path(path) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == _FORMAT


def save_reranker(
    model: CrossAttentionReranker,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    half: bool = False,
) -> Path:
    """Write ``model`` to the folder ``path`` (created if missing; existing files replaced).

    Args:
        model: the reranker to save (its weights are copied to the CPU as float32).
        path: the checkpoint folder.
        metadata: JSON-able facts to keep beside the config (training data, steps, metrics).
        half: store the weights as float16 (half the size; loading casts them back to float32,
            so scores move by float16 rounding). The shipped demo reranker is stored this way.

    Returns:
        The folder.

    Raises:
        ModelError: the folder cannot be written.
    """
    import torch
    from safetensors.torch import save_file

    from crossrank.store._files import atomic_write_json, fsync_file

    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            name: t.detach().to("cpu", torch.float16 if half else torch.float32).contiguous()
            for name, t in model.state_dict().items()
        }
        weights = folder / WEIGHTS_NAME
        tmp = folder / f".{WEIGHTS_NAME}.tmp-{os.getpid()}"
        try:
            save_file(state, str(tmp), metadata={"format": _FORMAT})
            os.chmod(
                tmp, 0o644
            )  # safetensors creates it owner-only; a reranker is shared like code
            fsync_file(tmp)
            os.replace(tmp, weights)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        atomic_write_json(
            folder / CONFIG_NAME,
            {
                "format": _FORMAT,
                "format_version": _FORMAT_VERSION,
                "reranker": model.name,
                "config": model.config.to_dict(),
                "metadata": dict(metadata or {}),
            },
        )
    except OSError as e:
        raise ModelError(f"cannot write the reranker to {folder}: {e.strerror or e}") from e
    logger.info("saved reranker to %s", folder)
    return folder


def read_reranker_config(path: str | os.PathLike[str]) -> RerankerConfig:
    """The :class:`RerankerConfig` of a saved reranker, without loading its weights.

    Raises:
        ModelError: the folder or its ``config.json`` is missing, or the file is not a valid
            reranker config.
    """
    return _read_config_file(path)[0]


def _read_config_file(path: str | os.PathLike[str]) -> tuple[RerankerConfig, dict[str, Any]]:
    """The config and the metadata of a saved reranker's ``config.json``, checked (one read)."""
    folder = _existing_dir(path)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelError(
            f"{folder} holds no {CONFIG_NAME}; a saved reranker folder has {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} (as written by save_reranker / `crossrank train`)"
        )
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {config_path}: {_one_line(e)}") from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ModelError(
            f"{config_path} is not a crossrank reranker config (expected "
            f'"format": "{_FORMAT}"); give the folder `crossrank train` wrote'
        )
    version = data.get("format_version")
    if not isinstance(version, int) or version > _FORMAT_VERSION:
        raise ModelError(
            f"{config_path} has format_version {version!r}, but this crossrank reads up to "
            f"{_FORMAT_VERSION}; upgrade crossrank"
        )
    try:
        config = RerankerConfig.from_dict(data.get("config"))
    except (TypeError, ValueError) as e:
        raise ModelError(f"invalid reranker config in {config_path}: {_one_line(e)}") from e
    metadata = data.get("metadata")
    return config, metadata if isinstance(metadata, dict) else {}


def check_reranker_matches(
    config: RerankerConfig, encoder_info: Mapping[str, Any], where: str = "the reranker"
) -> None:
    """Refuse a reranker whose input dims differ from the encoder's feature dims.

    Args:
        config: the reranker's config.
        encoder_info: the encoder's ``info`` (an index manifest's ``encoder``): ``patch_dim``
            is the size of both its token and its patch features, ``n_patches`` its patches.
        where: how to name the reranker in the message (e.g. its path).

    Raises:
        ModelMismatchError: ``text_dim``/``patch_dim`` differ from the encoder's ``patch_dim``,
            the encoder has more patches than the reranker has position embeddings, or the
            reranker reads layer-0 token states of another width than the encoder's ``text_width``.
    """
    model_id = encoder_info.get("model_id", "its encoder")
    dim = encoder_info.get("patch_dim")
    if dim is not None and (config.text_dim != dim or config.patch_dim != dim):
        raise ModelMismatchError(
            f"{where} takes token dim {config.text_dim} and patch dim {config.patch_dim}, but the "
            f"index's encoder {model_id} gives {dim}-dim token and patch features; use a reranker "
            "trained on that encoder"
        )
    width = encoder_info.get("text_width")
    # An index built before encoders recorded text_width has none: the encoder itself refuses
    # (or the query's width is checked) at search time instead.
    if config.token_embeddings and width is not None and width != config.token_embeddings:
        raise ModelMismatchError(
            f"{where} reads {config.token_embeddings}-dim layer-0 token states, but the index's "
            f"encoder {model_id} gives {width}-dim ones; use a reranker trained on that encoder"
        )
    n_patches = encoder_info.get("n_patches")
    slots = config.patch_positions
    if n_patches is not None and slots is not None and n_patches > slots:
        raise ModelMismatchError(
            f"{where} has position embeddings for {slots} patches, but the index's encoder "
            f"{model_id} gives {n_patches} patches per image; use a reranker trained on it"
        )


def load_reranker(
    path: str | os.PathLike[str],
    device: Device | str = Device.AUTO,
    *,
    encoder_info: Mapping[str, Any] | None = None,
    precision: Precision | str = Precision.AUTO,
) -> CrossAttentionReranker:
    """Load a saved reranker onto ``device``, in eval mode.

    Args:
        path: the folder :func:`save_reranker` wrote.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        encoder_info: the ``info`` of the encoder it will rerank for (an index manifest's
            ``encoder``); its dims are checked against the config before the weights are read.
        precision: what it computes in (:class:`~crossrank.device.Precision`): ``auto`` (bf16
            autocast on CUDA, float32 on the CPU), ``float32``, or ``bfloat16`` (also on the
            CPU, where it pays on CPUs with native bf16).

    Returns:
        The :class:`~crossrank.rerank.CrossAttentionReranker`.

    Raises:
        ModelError: the folder, ``config.json`` or ``model.safetensors`` is missing, corrupt or
            truncated, or the weights do not fit the config.
        ModelMismatchError: the config's dims do not fit ``encoder_info``.
        InvalidArgumentError: the device is unknown or unavailable, or the precision is unknown
            or unsupported there.

    Example:
        >>> reranker = load_reranker("runs/demo-reranker", device="cpu")  # doctest: +SKIP
        >>> index.search("a red cube left of a blue ball", reranker=reranker)  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from crossrank.rerank.autocast import check_precision
    from crossrank.rerank.cross_attention import CrossAttentionReranker

    torch_device = resolve_device(device)
    precision = check_precision(precision, torch_device)
    config, metadata = _read_config_file(path)
    folder = Path(path)
    if encoder_info is not None:
        check_reranker_matches(config, encoder_info, where=f"reranker {folder}")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(
            f"{folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the checkpoint is incomplete, "
            "save or train it again"
        )
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(
            f"{weights} is corrupt or truncated ({_one_line(e)}); save or train the reranker again"
        ) from e
    model = CrossAttentionReranker(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(
            f"the weights in {weights} do not fit its {CONFIG_NAME} "
            f"({_state_mismatch(model, state)}); the two files come from different rerankers"
        ) from e
    # A reranker trained as a residual over the first stage recommends the fusion it was trained
    # with; ``fusion="auto"`` in search and eval uses it.
    model.fusion = _recommended_fusion(folder, metadata)
    model.precision = precision
    return model.to(torch_device).eval()


def _recommended_fusion(folder: Path, metadata: Mapping[str, Any]) -> str | None:
    from crossrank.rerank.fusion import Fusion

    spec = metadata.get("fusion")
    if spec is None:
        return None
    try:
        return str(Fusion.parse(spec))
    except Exception:
        logger.warning("reranker %s recommends an unreadable fusion %r: ignored", folder, spec)
        return None


def _existing_dir(path: str | os.PathLike[str]) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise ModelError(
            f"no reranker at {folder}: the folder does not exist; give the folder save_reranker or "
            "`crossrank train` wrote"
        )
    if not folder.is_dir():
        raise ModelError(
            f"reranker path {folder} is a file; give the folder holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}"
        )
    return folder


def _state_mismatch(model: Any, state: Mapping[str, Any]) -> str:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(n for n in set(expected) & set(state) if tuple(state[n].shape) != expected[n])
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if names:
            parts.append(f"{label}: {some_of(names)}")
    return "; ".join(parts) or "incompatible tensors"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
