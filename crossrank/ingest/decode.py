"""Decoding one image file robustly: read once, hash, refuse bombs, orient, convert to RGB.

Every way a file can fail (missing, empty, not an image, truncated, too many pixels, a colour mode
Pillow cannot convert) ends in one short, specific reason; :func:`decode_image` raises it as a
:class:`~crossrank.errors.DecodeError`, the batch pipeline records it as a :class:`SkippedFile`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from crossrank.errors import DecodeError
from crossrank.ingest.config import DEFAULT_MAX_PIXELS
from crossrank.ingest.sources import SourceItem

__all__ = [
    "ImageRecord",
    "SkippedFile",
    "decode_image",
    "to_rgb",
    "BAD_NAME_REASON",
    "path_text",
    "valid_name",
    "non_regular_reason",
    "open_regular",
]

#: The reason a file whose name is not valid UTF-8 is skipped: metadata (Parquet, DuckDB) stores
#: paths as UTF-8 text, and a name it cannot store could never be found or served again.
BAD_NAME_REASON = "file name is not valid UTF-8"

logger = logging.getLogger(__name__)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_BOMB_LIMIT = re.compile(r"limit of (\d+) pixels")


@dataclass
class ImageRecord:
    """What the index stores about one decoded image (besides its features).

    Attributes:
        item: the :class:`SourceItem` it came from (absolute path, manifest metadata).
        width: width in pixels after EXIF orientation was applied.
        height: height in pixels after EXIF orientation was applied.
        bytes: file size in bytes.
        mtime: modification time, seconds since the epoch.
        sha256: hex SHA-256 of the file's bytes (the bytes that were decoded).
    """

    item: SourceItem
    width: int
    height: int
    bytes: int
    mtime: float
    sha256: str


@dataclass(frozen=True)
class SkippedFile:
    """A file that was listed but could not be indexed, and why.

    Attributes:
        path: absolute path of the file.
        reason: short, specific, non-empty: "empty file (0 bytes)", "truncated image data", ...
    """

    path: str
    reason: str

    def __post_init__(self) -> None:
        if not self.reason or not self.reason.strip():
            raise ValueError(
                f"SkippedFile.reason must be non-empty, got {self.reason!r} for {self.path}"
            )


class _Unreadable(Exception):
    """Internal: one file cannot be decoded; ``args[0]`` is the reason."""

    @property
    def reason(self) -> str:
        return str(self.args[0])


def decode_image(
    path: SourceItem | str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[Image.Image, ImageRecord]:
    """Read, check and decode one image file into an RGB image.

    The file is read once: its bytes give the SHA-256, the size and the decoded image. Only the
    first frame of an animated GIF / WebP / APNG is decoded. EXIF orientation is applied, then the
    image is converted to RGB by :func:`to_rgb`.

    The decompression-bomb check is explicit and per call: Pillow parses the header (lazily, no
    pixel data), and ``width * height > max_pixels`` is refused before any pixel is decoded.
    Pillow's own process-wide limit (``PIL.Image.MAX_IMAGE_PIXELS``) is not changed here (no global
    state shared by the decode threads is touched); when it fires first (images over twice that
    limit) the file is refused with the same kind of reason. Warnings cannot be caught per thread
    in Python 3.11, so a ``DecompressionBombWarning`` is caught only when filters make it an error.

    Args:
        path: the image file (a :class:`SourceItem` keeps its manifest metadata in the record).
        max_pixels: largest ``width * height`` accepted.

    Returns:
        ``(image, record)``: the RGB ``PIL.Image.Image`` (width x height as in the record) and its
        :class:`ImageRecord`.

    Raises:
        DecodeError: the file cannot be read or decoded; the message ends with the reason, e.g.
            "cannot decode /x/a.png: truncated image data".

    Example:
        >>> image, record = decode_image("photo.jpg")
        >>> image.mode, (record.width, record.height) == image.size
        ('RGB', True)
    """
    item = _as_item(path)
    try:
        return _decode(item, max_pixels)
    except _Unreadable as e:
        raise DecodeError(f"cannot decode {path_text(item.path)}: {e.reason}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to RGB, the way ingestion does.

    - transparency (RGBA, LA, PA, P or L with a transparent colour) is composited on white, so a
      transparent logo does not turn into a black square;
    - 16-bit grey (``I;16*``) is scaled by 255 / 65535;
    - 32-bit ``I`` is kept as is when its values lie in 0..255, scaled by 255 / 65535 when they
      lie in 0..65535, else stretched from its own min..max onto 0..255; ``F`` is scaled by 255
      when it lies in 0..1, kept in 0..255, else stretched (non-finite values become 0);
    - CMYK, YCbCr, LAB, HSV, 1-bit, L and the rest go through ``Image.convert("RGB")``.

    Args:
        image: a loaded image; EXIF orientation is not applied here.

    Returns:
        An RGB image of the same size (``image`` itself when already RGB without transparency).

    Raises:
        ValueError: Pillow cannot convert the mode (e.g. ``La``).
    """
    im = image
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = _to_8bit(im)
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if im.mode == "RGB" and not has_alpha:
        return im
    if not has_alpha:
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))  # alpha blend over white
    return out


def _as_item(path: SourceItem | str | os.PathLike[str]) -> SourceItem:
    if isinstance(path, SourceItem):
        return path
    return SourceItem(path=Path(os.path.abspath(os.fspath(path))))


def path_text(path: str | os.PathLike[str]) -> str:
    """``path`` as text that is valid UTF-8, for the skipped-files table and messages.

    A name that is not valid UTF-8 comes from the operating system with its bad bytes as lone
    surrogates (``surrogateescape``), which Parquet cannot store; those bytes are written as
    ``\\xff``. The same file always gives the same text, so ``add`` recognises it later.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def valid_name(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` can be stored as UTF-8 text as it is."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def non_regular_reason(mode: int) -> str | None:
    """The skip reason of a file of ``st_mode`` ``mode`` that is not a regular file; None if it is.

    Such files are never opened: opening a FIFO blocks until something writes to it, and reading
    a device may never end.
    """
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    kind = next((name for test, name in _KINDS if test(mode)), "unknown kind")
    return f"not a regular file ({kind})"


def open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without ever blocking on a FIFO or a device.

    ``stat`` first (a FIFO, socket or device is refused without being opened; a symlink to one
    too), then ``open`` with ``O_NONBLOCK`` and ``fstat`` again, so that a file swapped for a FIFO
    between the two calls is still refused instead of hanging the process.

    Returns:
        ``(fd, stat of the open file)``; the caller closes ``fd``.

    Raises:
        _Unreadable: not a regular file (the reason says what it is).
        OSError: the file cannot be opened (missing, permission, ...).
    """
    reason = non_regular_reason(os.stat(path).st_mode)
    if reason is not None:
        raise _Unreadable(reason)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        reason = non_regular_reason(st.st_mode)
        if reason is not None:
            raise _Unreadable(reason)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _decode(item: SourceItem, max_pixels: int) -> tuple[Image.Image, ImageRecord]:
    if not valid_name(item.path):
        raise _Unreadable(BAD_NAME_REASON)
    data, st = _read(item.path)
    image = _decode_bytes(data, max_pixels)
    record = ImageRecord(
        item=item,
        width=image.width,
        height=image.height,
        bytes=len(data),
        mtime=st.st_mtime,
        sha256=hashlib.sha256(data).hexdigest(),  # releases the GIL: hashing overlaps in threads
    )
    return image, record


def _os_reason(e: OSError) -> str:
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return "file not found"
    if isinstance(e, PermissionError):
        return "permission denied"
    if isinstance(e, IsADirectoryError):
        return "is a directory"
    return f"cannot read file ({e.strerror or type(e).__name__})"


def _read(path: Path) -> tuple[bytes, os.stat_result]:
    try:
        # open_regular: open() on a FIFO named *.jpg would block forever.
        fd, st = open_regular(path)  # size and mtime of the very bytes read
        with open(fd, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _Unreadable(_os_reason(e)) from e
    return data, st


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if len(msg) > 120:
        msg = msg[:117] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _corrupt_reason(e: BaseException) -> str:
    if "truncat" in str(e).lower():
        return "truncated image data"
    return f"corrupt image data ({_short(e)})"


def _bomb_reason(e: BaseException, max_pixels: int) -> str:
    msg = str(e)
    pixels = _BOMB_PIXELS.search(msg)
    limit = _BOMB_LIMIT.search(msg)
    if pixels and int(pixels.group(1)) > max_pixels:
        return f"decompression bomb: {pixels.group(1)} pixels > limit {max_pixels}"
    count = f"{pixels.group(1)} pixels" if pixels else "too many pixels"
    pil_limit = f" {limit.group(1)}" if limit else ""
    return (
        f"decompression bomb: {count} > Pillow's limit{pil_limit} "
        "(raise PIL.Image.MAX_IMAGE_PIXELS to allow it)"
    )


def _decode_bytes(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise _Unreadable("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # The warning only arrives as an exception when the caller's filters say "error".
        raise _Unreadable(_bomb_reason(e, max_pixels)) from e
    except UnidentifiedImageError as e:
        raise _Unreadable("not an image (cannot identify format)") from e
    except MemoryError as e:
        raise _Unreadable("out of memory while reading the header") from e
    except Exception as e:
        raise _Unreadable(_corrupt_reason(e)) from e

    width, height = im.size
    if width < 1 or height < 1:
        raise _Unreadable(f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        # Checked from the header, before load(): no pixel of a bomb is ever decoded.
        raise _Unreadable(f"decompression bomb: {width * height} pixels > limit {max_pixels}")

    try:
        im.load()  # the first frame only: animated GIF / WebP / APNG are never seeked
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _Unreadable(_bomb_reason(e, max_pixels)) from e
    except MemoryError as e:
        raise _Unreadable("out of memory while decoding") from e
    except Exception as e:
        raise _Unreadable(_corrupt_reason(e)) from e

    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception as e:
        logger.debug("ignoring unreadable EXIF orientation (%s)", _short(e))

    mode = im.mode
    try:
        return to_rgb(im)
    except MemoryError as e:
        raise _Unreadable("out of memory while converting to RGB") from e
    except (ValueError, OSError) as e:
        raise _Unreadable(f"unsupported image mode {mode} ({_short(e)})") from e


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit int or float grey image to 8-bit ``L`` (rules in :func:`to_rgb`)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = arr.astype(np.float32) * (255.0 / 65535.0)
    else:
        values = arr.astype(np.float64)
        finite = np.isfinite(values)
        values = np.where(finite, values, 0.0)
        lo = float(values[finite].min()) if finite.any() else 0.0
        hi = float(values[finite].max()) if finite.any() else 0.0
        if lo >= 0.0 and hi <= 1.0 and im.mode == "F":
            out = values * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = values
        elif lo >= 0.0 and hi <= 65535.0 and im.mode == "I":
            out = values * (255.0 / 65535.0)
        elif hi > lo:
            out = (values - lo) * (255.0 / (hi - lo))
        else:  # flat, outside 0..255: no contrast to keep
            out = np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
