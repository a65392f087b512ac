"""What an ``add`` has to do: which files of a source are new, moved or changed, judged by content.

Every indexed image carries the SHA-256 of its file's bytes. For each file of the source:

* its content is indexed at its path: **unchanged**;
* its content is indexed at another path that no longer holds it: the file **moved**; that image
  keeps its id and takes the new path;
* its content is indexed at a path that still holds it (a copy), or appeared earlier in this
  source: a **duplicate**, not indexed twice;
* otherwise it is **new**: decoded, encoded and given a new id.

A file the index skipped before (listed in ``crossrank info --skipped``) is **still skipped**: it
is not read, decoded or retried, so an add with nothing new never loads the model; pass
``retry_skipped=True`` (``crossrank add --retry-skipped``) to try such files again, e.g. after
fixing them. A file that can never be indexed is **skipped** by the plan itself, without being
opened: one that is not a regular file (a FIFO, socket or device, or a symlink to one) and one
whose name is not valid UTF-8. Copies a build skipped as ``duplicate of ...`` are judged again by
content every time (they take over the id when the original is gone).

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
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crossrank.errors import InvalidArgumentError
from crossrank.ingest.decode import (
    BAD_NAME_REASON,
    SkippedFile,
    _Unreadable,
    non_regular_reason,
    open_regular,
    path_text,
    valid_name,
)
from crossrank.ingest.sources import SourceItem

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["AddPlan", "plan_add", "file_sha256", "INDEXED_COLUMNS", "DUPLICATE_PREFIX"]

logger = logging.getLogger(__name__)

#: The metadata columns :func:`plan_add` reads from the index.
INDEXED_COLUMNS = ("id", "path", "sha256", "bytes", "mtime")
#: How the reason of a copy a build did not index starts: ``duplicate of /photos/a.png``.
DUPLICATE_PREFIX = "duplicate of "


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
        skipped: files the plan itself skips, never opened: not a regular file, or a name that is
            not valid UTF-8 (their ``path`` is :func:`~crossrank.ingest.decode.path_text`).
        still_skipped: files the index skipped before, not tried again (see ``retry_skipped``).
    """

    new: list[SourceItem] = field(default_factory=list)
    moved: dict[int, SourceItem] = field(default_factory=dict)
    replaced: list[int] = field(default_factory=list)
    unchanged: int = 0
    duplicates: list[SourceItem] = field(default_factory=list)
    hashed: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    still_skipped: list[SourceItem] = field(default_factory=list)

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
        fd, st = open_regular(path)  # never blocks on a FIFO or a device
        with open(fd, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()  # releases the GIL
    except (OSError, _Unreadable):
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
    skipped_before: Collection[str] = (),
    retry_skipped: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> AddPlan:
    """Compare a source with the images an index holds (see the module docstring).

    Args:
        items: the source's files, sorted by path (``discover(source).items``).
        indexed: the live images of the index, with columns ``id``, ``path``, ``sha256``,
            ``bytes`` and ``mtime`` (:data:`INDEXED_COLUMNS`).
        workers: threads hashing files.
        rehash: hash every file, even those whose size and mtime match the index.
        skipped_before: the paths the index lists as skipped (``skipped.parquet``), except the
            copies a build skipped as duplicates; those files are still skipped, not read.
        retry_skipped: read and plan the files of ``skipped_before`` like any other.
        progress: ``progress(done, len(items))`` while files are looked at.

    Returns:
        The :class:`AddPlan`.

    Raises:
        InvalidArgumentError: ``indexed`` lacks a needed column (an index from another tool).
    """
    index = _Index(indexed)
    plan = AddPlan()
    skip_set = set() if retry_skipped else set(skipped_before)
    planned: list[SourceItem] = []
    content: dict[str, str | None] = {}  # path -> sha256 of what it holds now (None: unreadable)
    to_hash: list[str] = []
    for item in items:
        path = str(item.path)
        if path_text(path) in skip_set:
            plan.still_skipped.append(item)
            continue
        if not valid_name(path):
            plan.skipped.append(SkippedFile(path=path_text(path), reason=BAD_NAME_REASON))
            continue
        try:
            st = os.stat(path)
        except OSError:
            content[path] = None
            planned.append(item)
            continue
        reason = non_regular_reason(st.st_mode)
        if reason is not None:  # never opened, never given to the decoder
            plan.skipped.append(SkippedFile(path=path, reason=reason))
            continue
        planned.append(item)
        sha = None if rehash else index.trusted_sha(path, st)
        if sha is None:
            to_hash.append(path)
        content[path] = sha
    done = len(items) - len(to_hash)
    if progress is not None:
        progress(done, len(items))
    plan.hashed = len(to_hash)
    if to_hash:
        pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="crossrank-hash")
        try:
            for path, result in zip(to_hash, pool.map(file_sha256, to_hash), strict=True):
                content[path] = None if result is None else result[0]
                done += 1
                if progress is not None and (done % 64 == 0 or done == len(items)):
                    progress(done, len(items))
        except BaseException:
            # Ctrl-C: drop the files not hashed yet instead of hashing all of them first.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)

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
    for item in planned:
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
    source_paths = {str(item.path) for item in planned}
    for r, (path, sha) in enumerate(zip(index.paths, index.shas, strict=True)):
        now = content.get(path)
        if r not in claimed and path in source_paths and now is not None and now != sha:
            plan.replaced.append(int(index.ids[r]))
    logger.info(
        "add plan: %d new, %d moved, %d replaced, %d unchanged, %d duplicates, %d skipped, "
        "%d still skipped (%d files hashed)",
        len(plan.new),
        len(plan.moved),
        len(plan.replaced),
        plan.unchanged,
        len(plan.duplicates),
        len(plan.skipped),
        len(plan.still_skipped),
        plan.hashed,
    )
    return plan
