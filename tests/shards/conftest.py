"""Fixtures of the sharded-index tests: one source folder, indexed once unsharded and once in
three shards with the same tiny CLIP, so that every test can compare the two."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ..conftest import write_images

N_SHARDS = 3


@pytest.fixture(scope="package")
def shard_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """41 distinct images (two folders), one undecodable file and one byte-identical copy."""
    root = tmp_path_factory.mktemp("shard-src")
    write_images(root, 30, seed=31)
    write_images(root / "more", 11, seed=32)
    (root / "broken.png").write_bytes(b"not a png")
    shutil.copy(root / "img_004.png", root / "more" / "copy_of_4.png")
    return root


@pytest.fixture(scope="package")
def pair(
    tmp_path_factory: pytest.TempPathFactory, shard_source: Path, tiny_clip: Path
) -> tuple[Path, Path]:
    """``(unsharded, sharded)`` indexes of ``shard_source``. Tests must not modify them."""
    from crossrank.shards import build_sharded
    from crossrank.write.build import build_index

    root = tmp_path_factory.mktemp("shard-pair")
    flat, sharded = root / "flat.idx", root / "sharded.idx"
    kw = {"model": tiny_clip, "device": "cpu", "batch_size": 8, "workers": 2}
    build_index(shard_source, flat, **kw)
    build_sharded(shard_source, sharded, shards=N_SHARDS, **kw)
    return flat, sharded


@pytest.fixture()
def pair_copy(pair: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """Private copies of ``pair`` (without reader pins) that a test may change."""
    ignore = shutil.ignore_patterns("*.pin")
    flat, sharded = pair
    return (
        Path(shutil.copytree(flat, tmp_path / "flat.idx", ignore=ignore)),
        Path(shutil.copytree(sharded, tmp_path / "sharded.idx", ignore=ignore)),
    )
