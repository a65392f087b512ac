"""Fixtures shared by every test: a tiny random CLIP and small image folders, made offline."""

from __future__ import annotations

import os

# Tests never touch the network: transformers and huggingface_hub read only the local cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import numpy as np
import pytest

#: Words the tiny tokenizer is trained on: enough for the queries the tests send.
TINY_WORDS = [
    "a red circle left of a blue square",
    "a green triangle above a yellow star",
    "a purple square right of an orange circle",
    "a large small cat dog photo of the and below",
]


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised CLIP (32 px, patch 8, width 32, 2 layers) in Hugging Face format."""
    from crossrank.encoders.factory import make_clip

    return make_clip(tmp_path_factory.mktemp("models") / "tiny-clip", TINY_WORDS, seed=0)


@pytest.fixture(scope="session")
def other_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny CLIP with other weights: 'another model' for mismatch tests."""
    from crossrank.encoders.factory import make_clip

    return make_clip(tmp_path_factory.mktemp("models") / "other-clip", TINY_WORDS, seed=1)


def write_images(
    folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (40, 32)
) -> list[Path]:
    """Write ``n`` random RGB PNGs (a few coloured blocks each) into ``folder``; return paths."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        pixels = np.repeat(
            np.repeat(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), 8, axis=0), 8, axis=1
        )
        path = folder / f"img_{i:03d}.png"
        Image.fromarray(pixels[: size[1], : size[0]]).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 small random images in a nested folder, plus one undecodable file."""
    root = tmp_path_factory.mktemp("photos")
    write_images(root, 16, seed=0)
    write_images(root / "nested" / "deeper", 8, seed=1)
    (root / "broken.png").write_bytes(b"this is not a png")
    return root


@pytest.fixture(scope="session")
def built_index(
    tmp_path_factory: pytest.TempPathFactory, image_folder: Path, tiny_clip: Path
) -> Path:
    """``image_folder`` indexed with ``tiny_clip`` on the CPU. Tests must not modify it."""
    from crossrank.write.build import build_index

    path = tmp_path_factory.mktemp("indexes") / "photos.idx"
    build_index(image_folder, path, model=tiny_clip, device="cpu", batch_size=8, workers=2)
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tiny_clip: Path):
    """``tiny_clip`` on the CPU, loaded apart from any Index: the reference for expected scores.

    Batch size 4, so that the encoder tests' ten images and five texts cross batch boundaries
    (tests/encoders/test_clip.py compares it with batch size 1).
    """
    from crossrank.encoders import load_encoder

    return load_encoder(tiny_clip, device="cpu", batch_size=4)


@pytest.fixture()
def index_copy(built_index: Path, tmp_path: Path) -> Path:
    """A private copy of ``built_index`` that a test may damage or rebuild."""
    import shutil

    return Path(shutil.copytree(built_index, tmp_path / "copy.idx"))


# -- living indexes (tests/write/test_living.py, tests/cli/test_living.py) ------------------------


@pytest.fixture(scope="module")
def living_images() -> tuple[int, int]:
    """How many source images the living-index fixtures write, and their seed.

    A test module overrides it to get an index of its own size.
    """
    return 6, 40


@pytest.fixture()
def living(tmp_path: Path, tiny_clip: Path, living_images: tuple[int, int]) -> tuple[Path, Path]:
    """A source folder of ``living_images`` and an index built over it, both private to the test."""
    from ._living import build_living

    return build_living(tmp_path, tiny_clip, *living_images)


@pytest.fixture(scope="module")
def shared_living(
    tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path, living_images: tuple[int, int]
) -> tuple[Path, Path]:
    """The ``living`` pair built once per module; tests change neither (see ``index_only``)."""
    from ._living import build_living

    return build_living(tmp_path_factory.mktemp("living"), tiny_clip, *living_images)


@pytest.fixture()
def index_only(shared_living: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of ``shared_living``'s index; its source folder is shared: leave it alone."""
    from ._living import private_copy

    source, index_dir = shared_living
    return source, private_copy(index_dir, tmp_path)


def committed_state(index_dir: Path) -> tuple[bytes, int, list[str]]:
    """What a failed call must leave alone: manifest bytes, current generation, folder entries."""
    import json

    manifest = (index_dir / "manifest.json").read_bytes()
    return (
        manifest,
        int(json.loads(manifest)["generation"]),
        sorted(p.name for p in index_dir.iterdir()),
    )


# -- SigLIP (tests/encoders/test_siglip.py) --------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SigLIP (``SiglipModel``: 32 px, patch 8, width 32) in Hugging Face format."""
    from crossrank.encoders.factory import make_siglip

    return make_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip", TINY_WORDS, version=1)


@pytest.fixture(scope="session")
def tiny_siglip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SigLIP 2 NaFlex (``Siglip2Model``, 4 x 4 patches of 8 px, width 32), HF format."""
    from crossrank.encoders.factory import make_siglip

    return make_siglip(tmp_path_factory.mktemp("models") / "tiny-siglip2", TINY_WORDS, version=2)
