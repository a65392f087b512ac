from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import pytest
from PIL import Image

from crossrank.errors import DecodeError
from crossrank.ingest import SkippedFile, SourceItem, decode_image, to_rgb

from ._images import BLUE, GREEN, RED, WHITE, noise


def px(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    return tuple(int(v) for v in image.getpixel(xy))


def header(path) -> tuple[str, dict, tuple[int, int], int]:
    """What Pillow sees in the file before ingest touches it: mode, info, size, frame count."""
    with Image.open(path) as im:
        return im.mode, dict(im.info), im.size, getattr(im, "n_frames", 1)


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# --- odd kinds: each becomes RGB, with the pixels it should have -------------------------------


@pytest.mark.parametrize("fmt", ["png", "gif"])
def test_palette_with_transparency_composites_on_white(write_image, fmt):
    im = Image.new("P", (4, 2), 0)
    im.putpalette([0, 0, 0, *RED] + [0] * (254 * 3))  # index 0: black, transparent; 1: red
    im.paste(1, (2, 0, 4, 2))
    path = write_image(f"p.{fmt}", im, transparency=0)
    mode, info, _, _ = header(path)
    assert mode == "P" and "transparency" in info

    image, record = decode_image(path)
    assert image.mode == "RGB" and image.size == (4, 2) == (record.width, record.height)
    assert px(image, (0, 0)) == WHITE  # transparent: white, not the palette's black
    assert px(image, (3, 1)) == RED


def test_la_composites_on_white(write_image):
    lum = Image.new("L", (4, 2), 0)
    alpha = Image.new("L", (4, 2), 0)
    alpha.paste(255, (2, 0, 4, 2))
    path = write_image("la.png", Image.merge("LA", (lum, alpha)))
    assert header(path)[0] == "LA"
    image, _ = decode_image(path)
    assert px(image, (0, 0)) == WHITE
    assert px(image, (3, 0)) == (0, 0, 0)


def test_rgba_composites_on_white(write_image):
    im = Image.new("RGBA", (3, 1))
    im.putdata([(*RED, 0), (*RED, 128), (*RED, 255)])
    image, _ = decode_image(write_image("rgba.png", im))
    assert px(image, (0, 0)) == WHITE
    assert close(px(image, (1, 0)), (255, 127, 127), tol=1)  # half red over white
    assert px(image, (2, 0)) == RED


def test_cmyk_jpeg_becomes_rgb(write_image):
    path = write_image("cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    assert header(path)[0] == "CMYK"
    image, _ = decode_image(path)
    assert image.mode == "RGB"
    assert close(px(image, (8, 8)), RED, tol=12)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(write_image):
    values = np.array([[0, 257 * 100, 65535, 257 * 200]], dtype=np.uint16)
    path = write_image("grey16.png", Image.fromarray(values))
    assert header(path)[0].startswith("I;16")
    image, _ = decode_image(path)
    assert [px(image, (x, 0)) for x in range(4)] == [(0,) * 3, (100,) * 3, (255,) * 3, (200,) * 3]


def test_one_bit_becomes_black_and_white(write_image):
    im = Image.new("1", (4, 1), 0)
    im.putpixel((3, 0), 1)
    image, _ = decode_image(write_image("bits.png", im))
    assert [px(image, (x, 0)) for x in (0, 3)] == [(0, 0, 0), WHITE]


@pytest.mark.parametrize("fmt", ["gif", "png", "webp"])
def test_animated_image_gives_its_first_frame(write_image, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    extra = {"lossless": True} if fmt == "webp" else {}
    path = write_image(
        f"anim.{fmt}",
        frames[0],
        save_all=True,
        append_images=frames[1:],
        duration=50,
        loop=0,
        **extra,
    )
    assert header(path)[3] == 3
    image, record = decode_image(path)
    assert px(image, (4, 4)) == RED
    assert (record.width, record.height) == (8, 8)


def test_exif_orientation_is_applied_before_size_is_recorded(write_image):
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = write_image("rotated.jpg", im, exif=exif, quality=95)
    assert header(path)[2] == (40, 20)

    image, record = decode_image(path)
    assert image.size == (20, 40) == (record.width, record.height)
    assert close(px(image, (10, 5)), RED, tol=40)  # the left edge is now the top
    assert close(px(image, (10, 35)), BLUE, tol=40)


@pytest.mark.parametrize("name", ["UPPER.JPG", "plain.bmp", "scan.TIFF", "photo.WebP", "x.jpeg"])
def test_common_formats_and_upper_case_suffixes_decode(write_image, name):
    path = write_image(name, noise((12, 10)))
    image, record = decode_image(path)
    assert image.mode == "RGB" and (record.width, record.height) == (12, 10)


def test_record_hashes_the_bytes_it_decoded(write_image, tmp_path, monkeypatch):
    path = write_image("sub/a.png", noise())
    monkeypatch.chdir(tmp_path)
    image, record = decode_image("sub/a.png")
    data = path.read_bytes()
    assert record.item == SourceItem(path=path)  # made absolute
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert record.bytes == len(data) == os.stat(path).st_size
    assert record.mtime == os.stat(path).st_mtime
    assert np.array_equal(np.asarray(image), np.asarray(noise()))


def test_source_item_metadata_is_kept_in_the_record(write_image):
    path = write_image("a.png", noise())
    item = SourceItem(path=path, extra={"caption": "noise"})
    assert decode_image(item)[1].item is item


# --- to_rgb's scaling rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),  # 0..1 floats
        ("F", [0.0, 100.0, 255.0], [0, 100, 255]),  # already 0..255
        ("F", [-1.0, 0.0, 3.0], [0, 64, 255]),  # anything else: stretched
        ("F", [np.nan, 0.0, 1.0], [0, 0, 255]),
        ("I", [0, 100, 255], [0, 100, 255]),
        ("I", [0, 257 * 10, 65535], [0, 10, 255]),  # 16-bit range
        ("I", [-5, -5, -5], [0, 0, 0]),  # flat outside 0..255: no contrast, no division by zero
    ],
)
def test_to_rgb_scales_wide_grey_modes_to_8_bit(mode, values, expected):
    dtype = np.float32 if mode == "F" else np.int32
    im = Image.fromarray(np.array([values], dtype=dtype))
    assert im.mode == mode
    out = to_rgb(im)
    assert out.mode == "RGB"
    assert [px(out, (x, 0))[0] for x in range(3)] == expected


def test_to_rgb_returns_rgb_images_unchanged():
    im = noise()
    assert to_rgb(im) is im


# --- files that cannot be decoded: a specific reason each -------------------------------------


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated_jpeg", "truncated image data"),
        ("truncated_png", "truncated image data"),
        ("empty", "empty file (0 bytes)"),
        ("text", "not an image (cannot identify format)"),
        ("bomb", "decompression bomb: 400000000 pixels > limit 89478485"),
    ],
)
def test_bad_files_raise_decode_error_with_reason(bad_files, kind, reason):
    path = bad_files[kind]
    with pytest.raises(DecodeError, match=f"^{re.escape(f'cannot decode {path}: {reason}')}$"):
        decode_image(path)


def test_bomb_is_refused_from_the_header_before_any_pixel_is_decoded(bad_files):
    path = bad_files["big_header"]  # 3000 x 2000 declared, almost no data
    with pytest.raises(DecodeError, match=r"decompression bomb: 6000000 pixels > limit 1000000$"):
        decode_image(path, max_pixels=1_000_000)
    # Allowed, the same file fails later, on its (missing) pixel data: the check above came first.
    with pytest.raises(DecodeError, match=r"truncated image data$"):
        decode_image(path, max_pixels=10_000_000)


def test_pixel_limit_is_per_call_and_leaves_pillow_alone(write_image):
    before = Image.MAX_IMAGE_PIXELS
    path = write_image("a.png", noise((10, 10)))
    with pytest.raises(DecodeError, match=r"decompression bomb: 100 pixels > limit 99$"):
        decode_image(path, max_pixels=99)
    assert decode_image(path, max_pixels=100)[1].width == 10
    assert Image.MAX_IMAGE_PIXELS == before


def test_pillows_own_hard_limit_is_reported_when_max_pixels_is_above_it(bad_files):
    with pytest.raises(DecodeError, match=r"400000000 pixels > Pillow's limit \d+ \(raise PIL"):
        decode_image(bad_files["bomb"], max_pixels=10**12)


def test_missing_file_and_directory_are_reasons_too(tmp_path):
    with pytest.raises(DecodeError, match=r"nope\.png: file not found$"):
        decode_image(tmp_path / "nope.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DecodeError, match=r"dir\.png: is a directory$"):
        decode_image(tmp_path / "dir.png")


def test_fifo_is_not_read(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(DecodeError, match=r"pipe\.jpg: not a regular file \(FIFO\)$"):
        decode_image(fifo)


def test_skipped_file_needs_a_reason():
    with pytest.raises(ValueError, match=r"SkippedFile\.reason must be non-empty"):
        SkippedFile(path="/x.png", reason=" ")
