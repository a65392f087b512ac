"""Helpers the write operations share: the manifest fields a new generation carries over, and
operating-system errors turned into one line."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossrank.errors import CrossrankError, IndexWriteError

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


_HINTS = {
    errno.ENOSPC: "free some disk space (or choose another --index) and run it again",
    errno.EDQUOT: "free some space within your disk quota and run it again",
    errno.EACCES: "make the folder writable, or choose another --index",
    errno.EPERM: "make the folder writable, or choose another --index",
    errno.EROFS: "the file system is read-only: choose another --index",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another --index",
    errno.EEXIST: "a part of the path is a file, not a folder: choose another --index",
}


def os_error_message(e: OSError, index_dir: Path, action: str) -> str:
    """One line for an ``OSError`` met while writing ``index_dir``: what, where, what to do."""
    what = e.strerror or type(e).__name__
    where = f" ({e.filename})" if e.filename else ""
    hint = _HINTS.get(e.errno or 0, "fix the cause and run it again")
    return (
        f"cannot {action} index {index_dir}: {what}{where}; nothing was committed and the last "
        f"committed generation, if any, is intact; {hint}"
    )


@contextmanager
def writing(index_dir: Path, action: str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into :class:`IndexWriteError` ``from`` it.

    Enter it before the writer lock and the generation writer, so that they have released the
    lock and removed their temporary folder by the time the error is raised.
    """
    try:
        yield
    except CrossrankError:
        raise
    except OSError as e:
        raise IndexWriteError(os_error_message(e, index_dir, action)) from e


def check_index_path(index_dir: Path) -> None:
    """Refuse an ``--index`` path under a regular file (``photos.jpg/idx``) with one line."""
    from crossrank.errors import InvalidArgumentError

    for parent in [index_dir, *index_dir.absolute().parents]:
        try:
            if parent.exists() or parent.is_symlink():
                if not parent.is_dir():
                    if parent == index_dir:
                        raise InvalidArgumentError(
                            f"--index {index_dir} is a file, not a folder; choose an empty or new "
                            "folder"
                        )
                    raise InvalidArgumentError(
                        f"--index {index_dir} lies under {parent}, which is a file, not a folder; "
                        "choose a folder path"
                    )
                return
        except OSError:
            return
