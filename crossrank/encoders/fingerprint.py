"""Fingerprints of a model directory, so an index can tell its own model from another.

An index records its encoder's ``info``; a search with another encoder compares the two with
:func:`same_model`. The comparison is by content, not by name: a copy of the model moved to another
folder (or the same hub model in another cache) matches, a model with other weights does not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crossrank.errors import InvalidArgumentError

__all__ = ["config_sha256", "weights_sha256", "weight_files", "same_model"]

# Keys of a saved config that say how or where it was saved, not what the model is.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "torch_dtype",
        "dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
    }
)

# Weight files up to this size are hashed whole; bigger ones by their size plus their first and last
# HEAD_TAIL_BYTES. A safetensors file starts with its header (every tensor's name, dtype, shape and
# offset) followed by the first tensors, so the head and tail already differ between two checkpoints
# of the same architecture, and fingerprinting a 600 MB CLIP stays a matter of milliseconds. It is
# an identity check, not an integrity check: a file corrupted in its middle is not detected.
FULL_HASH_MAX_BYTES = 16 * 1024 * 1024
HEAD_TAIL_BYTES = 1024 * 1024


def _strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in VOLATILE_CONFIG_KEYS}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def config_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 of a model config (the parsed ``config.json``) in canonical JSON.

    Keys that record how the file was written (``transformers_version``, ``_name_or_path``,
    ``torch_dtype``/``dtype``, ...) are dropped at every depth first, so re-saving a model with
    another transformers version or from another path keeps the digest.

    Args:
        config: the parsed ``config.json``.

    Returns:
        The hex digest.
    """
    canonical = json.dumps(
        _strip_volatile(dict(config)), sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files transformers would load from ``model_dir``, sorted by name.

    Safetensors files (one, or the shards of a sharded checkpoint) when there are any, otherwise
    PyTorch ``pytorch_model*.bin`` files, as ``from_pretrained`` prefers them. Empty when none.
    """
    files = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    if not files:
        files = sorted(p for p in model_dir.glob("pytorch_model*.bin") if p.is_file())
    return files


def _file_digest(path: Path, h: Any) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        if size <= FULL_HASH_MAX_BYTES:
            for chunk in iter(lambda: f.read(HEAD_TAIL_BYTES), b""):
                h.update(chunk)
        else:
            h.update(f.read(HEAD_TAIL_BYTES))
            f.seek(size - HEAD_TAIL_BYTES)
            h.update(f.read(HEAD_TAIL_BYTES))


def weights_sha256(files: list[Path]) -> str:
    """SHA-256 fingerprint of a model's weight files.

    Each file contributes its name and size, then its whole content when it is at most
    ``FULL_HASH_MAX_BYTES`` (16 MiB), else only its first and last MiB (see the module notes).

    Args:
        files: the weight files, as :func:`weight_files` lists them.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        _file_digest(path, h)
    return h.hexdigest()


def same_model(info_a: Mapping[str, Any], info_b: Mapping[str, Any]) -> bool:
    """Whether two encoder ``info`` dicts describe the same model.

    The model config and weight fingerprints must both be present and equal; the ``model_id`` is
    not compared, so a moved copy of a model matches it.

    Args:
        info_a: ``Encoder.info`` of one encoder (or as recorded in an index manifest).
        info_b: the other.

    Returns:
        True when both fingerprints match.

    Raises:
        InvalidArgumentError: an argument is not a mapping.
    """
    for name, info in (("info_a", info_a), ("info_b", info_b)):
        if not isinstance(info, Mapping):
            raise InvalidArgumentError(
                f"{name} must be an encoder info dict, got {type(info).__name__}"
            )
    keys = ("config_sha256", "weights_sha256")
    return all(
        isinstance(info_a.get(k), str) and info_a.get(k) and info_a.get(k) == info_b.get(k)
        for k in keys
    )
