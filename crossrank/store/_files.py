"""Durable file primitives of the store writers: fsync, atomic replace, streaming ``.npy``."""

from __future__ import annotations

import io
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

__all__ = [
    "fsync_file",
    "fsync_dir",
    "atomic_write_json",
    "link_or_copy",
    "NpyAppender",
    "load_npy",
    "read_npy_header",
    "save_npy",
]

#: numpy parses a ``.npy`` header with ``ast.literal_eval``, and CPython 3.11 can raise
#: ``SystemError: AST constructor recursion depth mismatch`` when two threads build ASTs at once
#: (python/cpython#106905): a reader opening a generation while another thread does the same.
#: crossrank's header reads take turns (a header is a few hundred bytes: microseconds).
_NPY_HEADER_LOCK = threading.Lock()


def fsync_file(path: Path) -> None:
    """Flush a written file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (creations, renames) durable.

    Some platforms (Windows) cannot open a directory; there the rename itself is the best we get.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(
    path: Path, data: dict[str, Any], *, before_replace: str | None = None
) -> None:
    """Replace ``path`` with ``data`` as JSON so that a reader sees the old or the new file, whole.

    temp file in the same directory -> write -> fsync -> ``os.replace`` -> fsync the directory.
    ``before_replace`` names a crash point (:mod:`crossrank.store._crash`) reached between the
    fsync and the replace.
    """
    from crossrank.store._crash import crash_point

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            crash_point(before_replace)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


_copy_warned = False


def link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` the same immutable file as ``src``: a hard link, or a copy where the file
    system cannot link (then a later generation costs its full size on disk, once per file).

    Generations share their unchanged files this way: a file is never modified once written, so
    sharing its inode is safe, and deleting one generation frees only what no other one links.
    """
    global _copy_warned
    import shutil

    try:
        os.link(src, dst)
    except OSError as e:
        if isinstance(e, FileExistsError):
            raise
        if not _copy_warned:
            _copy_warned = True
            import logging

            logging.getLogger(__name__).warning(
                "cannot hard-link %s (%s); copying unchanged index files instead", src, e.strerror
            )
        shutil.copyfile(src, dst)


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    npy_format.write_array_header_1_0(
        buf, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file, from its header only.

    Raises:
        ValueError: the file is not a ``.npy`` file numpy can read.
    """
    with open(path, "rb") as f, _NPY_HEADER_LOCK:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(f)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(f)
    return shape, dtype


def load_npy(path: Path | str, *, mmap_mode: str | None = "r") -> np.ndarray:
    """``np.load(path, mmap_mode=..., allow_pickle=False)``, its header read under the lock
    every crossrank header read takes (see ``_NPY_HEADER_LOCK``).

    Raises:
        ValueError: the file is empty or not a ``.npy`` file (numpy's ``EOFError`` for an empty
            file included, so that every reader's ``except UNREADABLE`` catches it).
    """
    with _NPY_HEADER_LOCK:
        try:
            return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        except EOFError as e:  # np.load on a 0-byte file; click would print a bare "Aborted."
            raise ValueError("empty file (0 bytes), not a .npy file") from e


class NpyAppender:
    """Writes a C-ordered ``.npy`` file whose first axis grows as rows are appended.

    The header is written for ``(0, *row_shape)`` and rewritten in place on :meth:`close`.
    numpy pads every v1 header so that the first axis can grow to 21 digits without changing the
    header's length (``numpy.lib.format.GROWTH_AXIS_MAX_DIGITS``), so the rewrite never moves the
    data. Nothing but the current chunk is held in memory.
    """

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_shape = tuple(int(s) for s in row_shape)
        self.rows = 0
        self._header_len = len(_npy_header(self.dtype, (0, *self.row_shape)))
        self._f: io.BufferedWriter | None = open(self.path, "wb")
        self._f.write(_npy_header(self.dtype, (0, *self.row_shape)))

    def append(self, rows: np.ndarray) -> None:
        """Append rows of shape ``(b, *row_shape)`` (already of the file's dtype)."""
        if self._f is None:
            raise RuntimeError(f"{self.path} is closed")
        arr = np.ascontiguousarray(rows, dtype=self.dtype)
        if arr.shape[1:] != self.row_shape:  # internal invariant: callers validate shapes
            raise RuntimeError(
                f"rows of shape {arr.shape[1:]} appended to {self.path} of rows {self.row_shape}"
            )
        if arr.size:
            self._f.write(memoryview(arr.reshape(-1)).cast("B"))
        self.rows += arr.shape[0]

    def close(self) -> int:
        """Finish the header with the final row count and close; returns the row count."""
        if self._f is None:
            return self.rows
        header = _npy_header(self.dtype, (self.rows, *self.row_shape))
        if len(header) != self._header_len:
            raise RuntimeError(f"npy header of {self.path} changed length; cannot finish it")
        self._f.seek(0)
        self._f.write(header)
        self._f.close()
        self._f = None
        return self.rows

    def discard(self) -> None:
        """Close without finishing (the caller removes the file)."""
        if self._f is not None:
            self._f.close()
            self._f = None


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` as ``.npy`` (little-endian, C order)."""
    arr = np.asarray(array)
    writer = NpyAppender(path, arr.dtype, arr.shape[1:])
    try:
        writer.append(arr)
    except BaseException:
        writer.discard()
        raise
    writer.close()
