"""What an ``add`` has to do: which files of a source are new, moved or changed, judged by content.

Every indexed image carries the SHA-256 of its file's bytes. For each file of the source:

* its content is indexed at its path: **unchanged**;
* its content is indexed at another path that no longer holds it: the file **moved**; that image
  keeps its id and takes the new path;
* its content is indexed at a path that still holds it (a copy), or appeared earlier in this
  source: a **duplicate**, not indexed twice;
* otherwise it is **new**: decoded, encoded and given a new id.

An indexed image whose path is in the source but now holds other content, and whose own content
moved nowhere, was **replaced**: the add removes it (the new content at that path is new).
Indexed files that are gone from disk and from the source stay indexed: ``add`` never removes
what it does not see replaced (``crossrank remove`` does).

Hashing reads every byte, so a file whose size and modification time equal what the index
recorded at the same path is taken to be unchanged without reading it (what ``git status`` and
``rsync`` do); ``rehash=True`` reads everything. Like theirs, the shortcut misses a rewrite that
keeps the size and lands in the same tick of the file system's clock as the write the index saw
(milliseconds on ext4; seconds on some network and FAT file systems): use ``rehash`` where files
are rewritten in place that fast.

Removing an image removes it from the index, not from disk: a later add of a source that still
holds the file indexes it again, under a new id.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crossrank.errors import InvalidArgumentError
from crossrank.ingest.sources import SourceItem

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["AddPlan", "plan_add", "file_sha256", "INDEXED_COLUMNS"]

logger = logging.getLogger(__name__)

#: The metadata columns :func:`plan_add` reads from the index.
INDEXED_COLUMNS = ("id", "path", "sha256", "bytes", "mtime")


@dataclass
class AddPlan:
    """What an add does, decided before any image is decoded.

    Attributes:
        new: files whose content the index lacks, in source (path) order: to index under new ids.
        moved: ``{id: item}``, images whose file moved: they keep the id and take ``item.path``.
        replaced: ids whose path now holds other content (their own content is nowhere in the
            source): removed by the add.
        unchanged: files indexed at their path with their content.
        duplicates: files whose content is already indexed at a path that still holds it, or
            that appear earlier in the source.
        hashed: files whose bytes were read to hash them (the others matched on size and mtime).
    """

    new: list[SourceItem] = field(default_factory=list)
    moved: dict[int, SourceItem] = field(default_factory=dict)
    replaced: list[int] = field(default_factory=list)
    unchanged: int = 0
    duplicates: list[SourceItem] = field(default_factory=list)
    hashed: int = 0

    @property
    def changes_index(self) -> bool:
        """Whether there is anything to commit (new, moved or replaced images)."""
        return bool(self.new or self.moved or self.replaced)


def _mtime_us(st: os.stat_result) -> int:
    return int(
        st.st_mtime * 1e6
    )  # exactly how the build records it (crossrank.write.build.metadata_table)


def file_sha256(path: str | os.PathLike[str]) -> tuple[str, int, int] | None:
    """Hash one file without holding it in memory.

    Returns:
        ``(hex sha256, size in bytes, mtime in microseconds)`` of the bytes read, or None when the
        file cannot be read (the decode step then says why).
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            digest = hashlib.file_digest(f, "sha256").hexdigest()  # releases the GIL
    except OSError:
        return None
    return digest, st.st_size, _mtime_us(st)


class _Index:
    """The indexed files, by path and by content."""

    def __init__(self, indexed: pa.Table) -> None:
        import pyarrow as pa

        missing = [c for c in INDEXED_COLUMNS if c not in indexed.column_names]
        if missing:
            raise InvalidArgumentError(
                f"the index metadata lacks the column(s) {', '.join(missing)} that add compares "
                "files by; rebuild the index with `crossrank build SOURCE --index DIR --overwrite`"
            )
        self.ids = indexed.column("id").to_pylist()
        self.paths = indexed.column("path").to_pylist()
        self.shas = indexed.column("sha256").to_pylist()
        self.sizes = indexed.column("bytes").to_pylist()
        mtime = indexed.column("mtime")
        if pa.types.is_timestamp(mtime.type):
            mtime = mtime.cast(pa.timestamp("us", tz=mtime.type.tz)).cast(pa.int64())
        self.mtimes = mtime.to_pylist()
        self.by_path = {p: r for r, p in enumerate(self.paths)}
        self.by_sha: dict[str, list[int]] = {}
        for r, sha in enumerate(self.shas):
            if sha is not None:
                self.by_sha.setdefault(sha, []).append(r)

    def trusted_sha(self, path: str, st: os.stat_result) -> str | None:
        """The recorded content of ``path`` if its size and mtime are the recorded ones."""
        r = self.by_path.get(path)
        if r is None or self.sizes[r] != st.st_size or self.mtimes[r] != _mtime_us(st):
            return None
        return self.shas[r]


def plan_add(
    items: Sequence[SourceItem],
    indexed: pa.Table,
    *,
    workers: int = 4,
    rehash: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AddPlan:
    """Compare a source with the images an index holds (see the module docstring).

    Args:
        items: the source's files, sorted by path (``discover(source).items``).
        indexed: the live images of the index, with columns ``id``, ``path``, ``sha256``,
            ``bytes`` and ``mtime`` (:data:`INDEXED_COLUMNS`).
        workers: threads hashing files.
        rehash: hash every file, even those whose size and mtime match the index.
        progress: ``progress(done, len(items))`` while files are looked at.

    Returns:
        The :class:`AddPlan`.

    Raises:
        InvalidArgumentError: ``indexed`` lacks a needed column (an index from another tool).
    """
    index = _Index(indexed)
    content: dict[str, str | None] = {}  # path -> sha256 of what it holds now (None: unreadable)
    to_hash: list[str] = []
    for item in items:
        path = str(item.path)
        try:
            st = os.stat(path)
        except OSError:
            content[path] = None
            continue
        sha = None if rehash else index.trusted_sha(path, st)
        if sha is None:
            to_hash.append(path)
        content[path] = sha
    done = len(items) - len(to_hash)
    if progress is not None:
        progress(done, len(items))
    plan = AddPlan(hashed=len(to_hash))
    if to_hash:
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="crossrank-hash") as pool:
            for path, result in zip(to_hash, pool.map(file_sha256, to_hash), strict=True):
                content[path] = None if result is None else result[0]
                done += 1
                if progress is not None and (done % 64 == 0 or done == len(items)):
                    progress(done, len(items))

    def content_at(path: str) -> str | None:
        """What an indexed path outside the source holds now (cached)."""
        if path not in content:
            try:
                st = os.stat(path)
            except OSError:
                content[path] = None
            else:
                sha = None if rehash else index.trusted_sha(path, st)
                if sha is None:
                    result = file_sha256(path)
                    sha = None if result is None else result[0]
                content[path] = sha
        return content[path]

    claimed: set[int] = set()  # rows whose image moved to a source path
    first_new: set[str] = set()  # content of the new files so far
    for item in items:
        path = str(item.path)
        sha = content[path]
        if sha is None:  # unreadable: the decoder records why
            plan.new.append(item)
            continue
        rows = index.by_sha.get(sha, [])
        if any(index.paths[r] == path for r in rows):
            plan.unchanged += 1
            continue
        movable = [r for r in rows if r not in claimed and content_at(index.paths[r]) != sha]
        if movable:
            claimed.add(movable[0])
            plan.moved[int(index.ids[movable[0]])] = item
        elif rows or sha in first_new:
            plan.duplicates.append(item)
        else:
            first_new.add(sha)
            plan.new.append(item)
    source_paths = {str(item.path) for item in items}
    for r, (path, sha) in enumerate(zip(index.paths, index.shas, strict=True)):
        now = content.get(path)
        if r not in claimed and path in source_paths and now is not None and now != sha:
            plan.replaced.append(int(index.ids[r]))
    logger.info(
        "add plan: %d new, %d moved, %d replaced, %d unchanged, %d duplicates (%d files hashed)",
        len(plan.new),
        len(plan.moved),
        len(plan.replaced),
        plan.unchanged,
        len(plan.duplicates),
        plan.hashed,
    )
    return plan
