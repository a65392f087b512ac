"""Helpers the living-index operations share: the manifest fields a new generation carries over."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crossrank.store import Manifest


def _open_for_writing(index_dir: str | Path) -> Path:
    """``index_dir`` as a Path, after checking it holds a committed index (IndexNotFoundError)."""
    from crossrank.store import read_manifest

    index_dir = Path(index_dir)
    read_manifest(index_dir)
    return index_dir


def _carry_over(manifest: Manifest, first_stage: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest fields a new generation keeps from the current one."""
    return {
        "encoder": manifest.encoder,
        "first_stage": first_stage or manifest.first_stage,
        **manifest.extra,
    }


def _index_config(manifest: Manifest, *, factory: str | None) -> Any:
    from crossrank.indexes import IndexConfig

    first = manifest.first_stage
    return IndexConfig(factory=factory, device="cpu", nprobe=int(first.get("nprobe") or 16))


def _first_stage_info(
    first_stage: Any, manifest: Manifest, *, auto: bool | None = None
) -> dict[str, Any]:
    info = {**manifest.first_stage, **first_stage.info, "metric": "inner_product"}
    if auto is not None:
        info["auto"] = auto
    return info
