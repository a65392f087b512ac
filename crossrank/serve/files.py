"""The bytes of an indexed image file, and only those: what ``/images`` and ``/thumbnails`` serve.

A path in the index names the file that was indexed, but whatever sits at that path now may be
something else: a newer photo, a symbolic link to ``/etc/passwd``, a FIFO. The server serves a
file only when it is still the indexed one:

* it is opened with ``O_NOFOLLOW`` (a path that is now a symbolic link does not open) and
  ``O_NONBLOCK`` (a FIFO cannot hang the request), then must be a regular file of the recorded
  size, checked on the open descriptor before a byte is read;
* its bytes must hash to the recorded SHA-256 (an index without the hash: the recorded
  modification time must match instead);
* the bytes served are the bytes checked, held in memory, so the file cannot change in between.

Discovery lists symbolic links to files, so an indexed path may have been a link all along: a link
is followed only when the row has a SHA-256, so that the bytes read must still be the indexed ones,
and then only after its target passed the regular-file and size checks.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from typing import Any

__all__ = ["Recorded", "NotServable", "read_indexed", "media_type", "RECORDED_COLUMNS"]

#: The metadata columns that say what was indexed at a path.
RECORDED_COLUMNS = ("path", "bytes", "sha256", "mtime")

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)

# Pillow format -> the media type served; any other format is served as a download.
_MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # a JPEG with extra frames; browsers show the first
    "PNG": "image/png",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
}


class NotServable(Exception):
    """The file at an indexed path is not the indexed file any more; ``str()`` says why."""


@dataclass(frozen=True)
class Recorded:
    """What the index recorded about an image's file.

    Attributes:
        path: the absolute path indexed.
        size: its size in bytes (None: not recorded).
        sha256: the hex SHA-256 of its bytes (None: not recorded).
        mtime_us: its modification time in microseconds since the epoch (None: not recorded).
    """

    path: str
    size: int | None
    sha256: str | None
    mtime_us: int | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Recorded:
        """From a metadata row with (some of) :data:`RECORDED_COLUMNS`."""
        mtime = row.get("mtime")
        if isinstance(mtime, _dt.datetime):
            if mtime.tzinfo is None:
                mtime = mtime.replace(tzinfo=_dt.UTC)
            mtime = (mtime - _EPOCH) // _dt.timedelta(microseconds=1)
        size, sha = row.get("bytes"), row.get("sha256")
        return cls(
            path=str(row["path"]),
            size=int(size) if isinstance(size, int) else None,
            sha256=str(sha) if sha else None,
            mtime_us=int(mtime) if isinstance(mtime, int) else None,
        )


def read_indexed(recorded: Recorded) -> bytes:
    """The bytes of the indexed file, when the file at its path is still that file.

    Returns:
        The file's bytes, checked against what was recorded.

    Raises:
        NotServable: the file is gone, unreadable, not a regular file, a symbolic link that cannot
            be checked, or its size, hash (or, without a hash, modification time) changed.
    """
    try:
        fd = _open(recorded)
    except (FileNotFoundError, NotADirectoryError):
        raise NotServable("is no longer there") from None
    except PermissionError:
        raise NotServable("cannot be read (permission denied)") from None
    except OSError as e:
        raise NotServable(f"cannot be read ({e.strerror or type(e).__name__})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotServable("is no longer a regular file")
        if recorded.size is not None and st.st_size != recorded.size:
            raise NotServable(
                f"changed since it was indexed ({st.st_size} bytes now, {recorded.size} indexed)"
            )
        if recorded.sha256 is None and recorded.mtime_us is not None:
            if int(st.st_mtime * 1e6) != recorded.mtime_us:  # as the build records it
                raise NotServable("changed since it was indexed (its modification time)")
        # One byte more than recorded: a file that grew since the fstat shows as changed.
        data = f.read(-1 if recorded.size is None else recorded.size + 1)
    if recorded.size is not None and len(data) != recorded.size:
        raise NotServable("changed while it was read")
    if recorded.sha256 is not None and hashlib.sha256(data).hexdigest() != recorded.sha256:
        raise NotServable("changed since it was indexed (its content)")
    return data


def _open(recorded: Recorded) -> int:
    try:
        return os.open(recorded.path, _FLAGS | _NOFOLLOW)
    except OSError as e:
        # ELOOP: the path is a symbolic link (EMLINK on FreeBSD, EFTYPE on some BSDs).
        if e.errno not in (errno.ELOOP, errno.EMLINK, getattr(errno, "EFTYPE", -1)):
            raise
        if recorded.sha256 is None:
            raise NotServable(
                "is a symbolic link and the index has no hash to check its target against"
            ) from None
    return os.open(recorded.path, _FLAGS)  # the target's bytes must hash to the recorded SHA-256


def media_type(data: bytes) -> str:
    """The media type of image bytes, from their decoded format (not from the file's suffix).

    Raises:
        NotServable: Pillow cannot identify the bytes as an image.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            fmt = image.format or ""
    except Exception as e:  # Pillow raises many types for bad data; each means "not an image"
        raise NotServable(f"is not an image any more ({type(e).__name__})") from None
    return _MEDIA_TYPES.get(fmt, "application/octet-stream")
