"""Tiny images of every awkward kind, generated in tmp_path (nothing is committed)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from ._images import noise, png_with_header_only


@pytest.fixture
def write_image(tmp_path: Path) -> Callable[..., Path]:
    """``write_image("a/b.png", image, **save_kwargs)`` saves under tmp_path, making folders."""

    def write(rel: str, image: Image.Image, **save_kwargs: object) -> Path:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **save_kwargs)
        return path

    return write


@pytest.fixture
def solid(write_image: Callable[..., Path]) -> Callable[..., Path]:
    """``solid("x.png", color)``: a small one-colour image (distinct colours identify files)."""

    def make(rel: str, color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Path:
        return write_image(rel, Image.new("RGB", size, color))

    return make


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """Files that must be skipped, each with a known reason."""
    root = tmp_path / "bad"
    root.mkdir()
    out: dict[str, Path] = {}

    jpeg = root / "truncated.jpg"
    noise((64, 64)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    out["truncated_jpeg"] = jpeg

    png = root / "truncated.png"
    noise((64, 64), seed=1).save(png)
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    out["truncated_png"] = png

    out["empty"] = root / "empty.png"
    out["empty"].write_bytes(b"")

    out["text"] = root / "notes.png"
    out["text"].write_text("this is a text file, not a picture\n")

    # 20000 x 20000 = 4e8 pixels: over twice Pillow's default limit, so Pillow itself refuses it.
    out["bomb"] = root / "bomb.png"
    out["bomb"].write_bytes(png_with_header_only(20_000, 20_000))

    # 3000 x 2000 = 6e6 pixels: under Pillow's limit, refused only by a small max_pixels.
    out["big_header"] = root / "big_header.png"
    out["big_header"].write_bytes(png_with_header_only(3_000, 2_000))
    return out
