"""Writing a generation atomically: :class:`GenerationWriter`.

A writer holds the index's writer lock (:mod:`crossrank.store.lock`), builds
``DIR/.gen-000004.tmp-<pid>/``, fsyncs every file and the folder, renames the folder to
``DIR/gen-000004`` and only then switches ``manifest.json`` (see
:func:`~crossrank.store.manifest.write_manifest`). A crash before the rename leaves a temporary
folder that no reader looks at; a crash between the rename and the manifest switch leaves a
complete but uncommitted generation; in both cases readers still get the previous generation, and
the next writer deletes the leftovers. Generations are never modified once renamed. After the
switch, the writer deletes the generations no live reader pins (:mod:`crossrank.store.gc`).

A generation may start from an earlier one (``base``): its unchanged files (patch shards, metadata
parts, the vectors of a removal, ...) are hard-linked rather than copied, so adding ten images to
a large index writes ten images' worth of patches, and a removal writes one small file.

``generation.json`` records the size and the sha256 of every file (``crossrank verify`` compares
them). A file hard-linked from the base keeps the base's recorded checksum without being read
again, so a commit hashes only the bytes it wrote.

The patch codec (:mod:`crossrank.store.codecs`) is the writer's: a new index gets the one asked
for (fp16 by default), a generation written from a base keeps the base's, with its trained
parameters (a PQ is never retrained, so the base's codes stay valid beside the new ones).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import CrossrankError, IndexCorruptError, InvalidArgumentError
from crossrank.store._crash import crash_point
from crossrank.store._files import NpyAppender, fsync_dir, fsync_file, link_or_copy, save_npy
from crossrank.store.check import check_generation, file_digest
from crossrank.store.codecs import PatchCodec, open_codec, parse_codec
from crossrank.store.config import StoreConfig
from crossrank.store.gc import clean_interrupted, collect_garbage
from crossrank.store.generation import Generation
from crossrank.store.layout import (
    CHECKSUM_ALGORITHM,
    FIRST_STAGE_NAME,
    GENERATION_INFO_NAME,
    IDS_NAME,
    SKIPPED_NAME,
    TOMBSTONES_NAME,
    VECTORS_NAME,
    GenerationInfo,
    PartInfo,
    format_version_for,
)
from crossrank.store.lock import WriterLock
from crossrank.store.manifest import (
    MANIFEST_NAME,
    RESERVED_KEYS,
    Manifest,
    generation_dir_name,
    next_generation_number,
    write_manifest,
)
from crossrank.store.metadata_writer import MetadataWriter, check_skipped_table, write_skipped
from crossrank.store.patches import PatchWriter
from crossrank.store.pins import READERS_DIR

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["GenerationWriter", "next_free_id"]

logger = logging.getLogger(__name__)

#: Files a generation may take over from its base unchanged (with :meth:`GenerationWriter.link`).
LINKABLE = (VECTORS_NAME, IDS_NAME, FIRST_STAGE_NAME, SKIPPED_NAME, TOMBSTONES_NAME)
_NUMBERED = re.compile(r"^[a-z]+-(\d+)\.[a-z]+$")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _after(parts: Sequence[PartInfo]) -> int:
    """One past the highest number in the file names of ``parts`` (``metadata-004.parquet``)."""
    numbers = [int(m.group(1)) for p in parts if (m := _NUMBERED.match(p.file)) is not None]
    return max(numbers, default=-1) + 1


def _as_int64_ids(ids: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise InvalidArgumentError(
            f"{what} must be a 1-d integer array, got {arr.dtype} of shape {arr.shape}"
        )
    arr = arr.astype(np.int64, copy=False)
    if arr.size > 1:
        bad = np.flatnonzero(arr[1:] <= arr[:-1])
        if bad.size:
            i = int(bad[0])
            raise InvalidArgumentError(
                f"{what} must be sorted ascending and unique, but {what}[{i}] = {arr[i]} and "
                f"{what}[{i + 1}] = {arr[i + 1]}"
            )
    return arr


class GenerationWriter:
    """Writes the next generation of an index directory; a context manager.

    Leaving the ``with`` block by an exception, or without :meth:`commit`, removes the temporary
    folder and leaves the committed generation and ``manifest.json`` untouched.

    Args:
        root: the index directory (created if missing).
        config: shard and part sizes.
        lock: the held writer lock of ``root``; when None the writer takes it itself and releases
            it when it commits or aborts (raising :class:`IndexLockedError` if another writer
            holds it).
        base: the generation this one starts from, for :meth:`link_patches`,
            :meth:`link_metadata_part` and :meth:`link`. Ids continue after the base's ``next_id``
            either way (see :meth:`take_ids`).
        gc: delete old generations no reader pins right after the commit (their numbers are
            then in ``collected``).
        patch_codec: how patch shards are stored (:mod:`crossrank.store.codecs`): a codec name
            (``int8``, ``pq``, ...) or a codec (a trained one is used as it is). None: the base's
            codec with its trained parameters, or fp16 without a base. A name other than the
            base's codec is refused by :meth:`link_patches`.

    Attributes:
        root: the index directory.
        generation: the number this generation will get.
        dir: the temporary folder being written.
        patches: the :class:`PatchWriter`; ``append((b, P, d))`` in id-table order.
        next_id: the first id :meth:`take_ids` gives: one past every id ever given in ``root``.

    Example:
        >>> with GenerationWriter("my-index") as w:                           # doctest: +SKIP
        ...     for batch in batches:
        ...         w.patches.append(batch.patches)
        ...     w.write_vectors(xb); w.write_ids(ids); w.write_metadata(table)
        ...     first_stage.save(w.first_stage_path)
        ...     w.commit({"encoder": encoder.info, "first_stage": {...}})
    """

    def __init__(
        self,
        root: Path | str,
        *,
        config: StoreConfig | None = None,
        lock: WriterLock | None = None,
        base: Generation | None = None,
        gc: bool = True,
        patch_codec: str | PatchCodec | None = None,
    ) -> None:
        self.root = Path(root)
        self.config = config if config is not None else StoreConfig()
        self._own_lock = lock is None
        if lock is None:
            lock = WriterLock(self.root, create=True).acquire()
        elif not lock.held or lock.root.resolve() != self.root.resolve():
            raise CrossrankError(
                f"a generation writer for {self.root} needs that directory's held "
                f"writer lock, got {lock!r}"
            )
        self.lock = lock
        self.base = base
        self.gc = gc
        self._state = "open"
        try:
            # Numbered before the leftovers go, so that numbers only ever grow.
            self.generation = next_generation_number(self.root)
            clean_interrupted(self.root, lock)
            crash_point("lock-acquired")
            self.next_id = self._first_free_id()
            codec = self._codec_for(patch_codec)  # before any file: a bad name leaves nothing
            self.dir = self.root / f".{generation_dir_name(self.generation)}.tmp-{os.getpid()}"
            self.dir.mkdir()
        except BaseException:
            self._state = "aborted"
            self._release_lock()
            raise
        first_shard = first_part = 0
        if base is not None:
            first_shard = _after(base.info.patch_shards)
            first_part = _after(base.info.metadata_parts)
        self.patches = PatchWriter(
            self.dir, config=self.config, first_shard=first_shard, codec=codec
        )
        self._metadata = MetadataWriter(self.dir, config=self.config, first_part=first_part)
        self._vectors_shape: tuple[int, int] | None = None
        self._ids: np.ndarray | None = None
        self._skipped: list[pa.Table] = []
        self._skipped_linked: int | None = None  # rows of a linked skipped.parquet
        self._tombstones: int | None = None  # rows of tombstones.npy, once written or linked
        self.collected: list[int] = []  # the old generations the commit deleted
        logger.debug("writing generation %d in %s", self.generation, self.dir)

    def _codec_for(self, patch_codec: str | PatchCodec | None) -> PatchCodec:
        """The codec asked for; without one, the base's (trained, loaded from it) or fp16.

        A name that resolves to the base's codec gets the base's trained one too: a second
        quantiser would make the base's codes unreadable beside the new ones.
        """
        if self.base is None or isinstance(patch_codec, PatchCodec):
            return parse_codec(patch_codec)
        info = self.base.info
        if patch_codec is not None:
            asked = parse_codec(patch_codec)
            if info.patch_dim > 0:
                asked.configure(info.n_patches, info.patch_dim)
            if asked.spec != info.patch_codec:
                return asked  # link_patches() refuses it; a writer that links nothing may use it
        return open_codec(info.patch_codec, self.base.path, info.n_patches, info.patch_dim)

    def _first_free_id(self) -> int:
        """One past every id given so far: the base's (or the current generation's) next_id."""
        return self.base.next_id if self.base is not None else next_free_id(self.root)

    @property
    def final_dir(self) -> Path:
        """Where the generation lands on commit: ``root / "gen-NNNNNN"``."""
        return self.root / generation_dir_name(self.generation)

    @property
    def first_stage_path(self) -> Path:
        """Where the caller saves the FAISS index before :meth:`commit`."""
        return self.dir / FIRST_STAGE_NAME

    def __enter__(self) -> GenerationWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._state == "open":
            if exc is None:
                logger.warning("generation %d left without commit(); discarded", self.generation)
            self.abort()

    def _require_open(self) -> None:
        if self._state != "open":
            raise CrossrankError(f"generation writer for {self.root} is already {self._state}")

    def _require_base(self, what: str) -> Generation:
        if self.base is None:
            raise InvalidArgumentError(
                f"{what} needs a base generation: GenerationWriter(..., base=)"
            )
        return self.base

    @property
    def metadata_schema(self) -> pa.Schema | None:
        """The metadata schema fixed by the first part linked or table written, or None."""
        return self._metadata.schema

    # -- ids ------------------------------------------------------------------------------------

    def take_ids(self, n: int) -> np.ndarray:
        """Reserve ``n`` new ids: int64 ``(n,)``, consecutive, above every id ever given here.

        Ids are never reused, even after the images that had them were removed and compacted
        away, nor after ``build --overwrite``.
        """
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        return ids

    # -- linking the base's files ---------------------------------------------------------------

    def link_patches(self) -> None:
        """Start the patch store with every shard of the base, hard-linked; append after them."""
        self._require_open()
        base = self._require_base("link_patches()")
        info = base.info
        if self.patches.codec.spec != info.patch_codec and info.patch_dim > 0:
            raise InvalidArgumentError(
                f"the base generation stores its patches as {info.patch_codec}, this writer as "
                f"{self.patches.codec.spec}; a generation keeps its base's patch codec (omit "
                "patch_codec)"
            )
        self.patches.link_shards(
            base.path, list(info.patch_shards), (info.n_patches, info.patch_dim)
        )

    def link_metadata_part(self, part: PartInfo) -> None:
        """Add one metadata part of the base, hard-linked, after the rows written so far."""
        self._require_open()
        base = self._require_base("link_metadata_part()")
        self._metadata.link_part(base.path, part)

    def adopt_patch_shards(
        self, directory: Path | str, shards: Sequence[PartInfo], shape: tuple[int, int]
    ) -> None:
        """Start the patch store with finished shards written elsewhere, hard-linked.

        For a streaming build (:mod:`crossrank.write.streaming`), whose chunks are written as
        shards of this writer's codec, named as this generation's shards (``patches-003.npy``),
        before the generation is opened. Nothing may have been appended or linked before.

        Args:
            directory: the folder holding the shard files.
            shards: the shards in row order, each stored with this writer's (trained) codec.
            shape: ``(P, d)`` of the patches.

        Raises:
            InvalidArgumentError: rows were already appended, or the codec is untrained.
        """
        self._require_open()
        if self.patches.codec.needs_training:
            raise InvalidArgumentError(
                "adopt_patch_shards() needs a trained codec; append the rows instead"
            )
        self.patches.link_shards(directory, list(shards), shape)

    def adopt_metadata_parts(self, directory: Path | str, parts: Sequence[PartInfo]) -> None:
        """Add finished metadata parts written elsewhere, hard-linked, after the rows so far.

        Each part is a Parquet file written by a :class:`MetadataWriter` (same schema rules),
        named as this generation's parts (``metadata-003.parquet``).
        """
        self._require_open()
        for part in parts:
            self._metadata.link_part(directory, part)

    def link(self, name: str) -> None:
        """Take one file of the base over unchanged, hard-linked.

        Args:
            name: ``vectors.npy``, ``ids.npy``, ``first_stage.faiss``, ``skipped.parquet`` or
                ``tombstones.npy`` (ignored when the base has no tombstones).

        Raises:
            InvalidArgumentError: another name, or that file was already written.
        """
        self._require_open()
        base = self._require_base("link()")
        if name not in LINKABLE:
            raise InvalidArgumentError(
                f"cannot link {name!r}; linkable files are {', '.join(LINKABLE)}"
            )
        info = base.info
        if name == TOMBSTONES_NAME and not info.n_tombstones:
            return
        if (self.dir / name).exists():
            raise InvalidArgumentError(f"{name} was already written for this generation")
        link_or_copy(base.path / name, self.dir / name)
        if name == VECTORS_NAME:
            self._vectors_shape = (info.n_images, info.vector_dim)
        elif name == IDS_NAME:
            self._ids = np.asarray(base.ids())
        elif name == SKIPPED_NAME:
            self._skipped_linked = info.n_skipped
        elif name == TOMBSTONES_NAME:
            self._tombstones = info.n_tombstones

    # -- writing --------------------------------------------------------------------------------

    def write_vectors(self, xb: np.ndarray | Iterable[np.ndarray]) -> None:
        """Store the pooled vectors, one row per image in id-table order.

        Args:
            xb: float array ``(n, D)``, or an iterable of ``(n_i, D)`` blocks written one after
                another (a memory map of the base's vectors, then the new rows: neither is held in
                memory twice); stored as float32.

        Raises:
            InvalidArgumentError: not 2-d float, not finite, or written twice.
        """
        self._require_open()
        if self._vectors_shape is not None:
            raise InvalidArgumentError("vectors were already written for this generation")
        blocks: Iterable[Any] = (
            [xb] if isinstance(xb, np.ndarray) or not isinstance(xb, Iterable) else xb
        )
        writer: NpyAppender | None = None
        try:
            for block in blocks:
                arr = np.asarray(block)
                dim = arr.shape[1] if arr.ndim == 2 else -1
                if (
                    arr.ndim != 2
                    or arr.dtype.kind != "f"
                    or (writer is not None and dim != writer.row_shape[0])
                ):
                    raise InvalidArgumentError(
                        f"vectors must be a float array of shape (n, dim), got {arr.dtype} "
                        f"of shape {arr.shape}"
                    )
                if writer is None:
                    writer = NpyAppender(self.dir / VECTORS_NAME, np.dtype(np.float32), (dim,))
                for i0 in range(0, arr.shape[0], 1 << 16):  # bounded copies of a memory map
                    rows = np.asarray(arr[i0 : i0 + (1 << 16)], dtype=np.float32)
                    if not np.isfinite(rows).all():
                        raise InvalidArgumentError("vectors hold NaN or inf")
                    writer.append(rows)
            if writer is None:
                raise InvalidArgumentError(
                    "vectors must be a float array of shape (n, dim), got no blocks"
                )
        except BaseException:
            if writer is not None:
                writer.discard()
            (self.dir / VECTORS_NAME).unlink(missing_ok=True)
            raise
        self._vectors_shape = (writer.close(), int(writer.row_shape[0]))

    def write_ids(self, ids: np.ndarray) -> None:
        """Store the id table: row ``i`` of every per-image file belongs to ``ids[i]``.

        Args:
            ids: int array ``(n,)``, strictly increasing (sorted and unique).

        Raises:
            InvalidArgumentError: not 1-d integers, not strictly increasing, or written twice.
        """
        self._require_open()
        arr = np.asarray(ids)
        if self._ids is not None:
            raise InvalidArgumentError("ids were already written for this generation")
        arr = _as_int64_ids(arr, "ids")
        save_npy(self.dir / IDS_NAME, arr)
        self._ids = arr

    def write_tombstones(self, ids: np.ndarray) -> None:
        """Store the removed ids: images every reader excludes until a compaction drops them.

        Args:
            ids: int array ``(t,)``, sorted and unique, each an id of the id table.

        Raises:
            InvalidArgumentError: not 1-d sorted unique integers, or written twice.
        """
        self._require_open()
        if self._tombstones is not None:
            raise InvalidArgumentError("tombstones were already written for this generation")
        arr = _as_int64_ids(ids, "tombstones")
        if arr.size:
            save_npy(self.dir / TOMBSTONES_NAME, arr)
        self._tombstones = int(arr.size)

    def write_metadata(self, table: pa.Table) -> None:
        """Append metadata rows in id-table order, one per id (see :meth:`MetadataWriter.write`)."""
        self._require_open()
        self._metadata.write(table)

    def write_skipped(self, table: pa.Table) -> None:
        """Append skipped files: a table with string columns ``path`` and ``reason``.

        Raises:
            InvalidArgumentError: the table lacks ``path`` or ``reason``, or skipped.parquet was
                linked from the base.
        """
        self._require_open()
        if self._skipped_linked is not None:
            raise InvalidArgumentError("skipped.parquet was linked from the base generation")
        check_skipped_table(table)
        self._skipped.append(table)

    # -- commit ---------------------------------------------------------------------------------

    def _finish_files(self) -> GenerationInfo:
        """Close every writer and write generation.json."""
        if self._vectors_shape is None:
            raise InvalidArgumentError("write_vectors() was not called before commit()")
        if self._ids is None:
            raise InvalidArgumentError("write_ids() was not called before commit()")
        if not self.first_stage_path.is_file():
            raise InvalidArgumentError(
                f"the first-stage index was not saved to {self.first_stage_path} before commit()"
            )
        shards = self.patches.close()
        parts = self._metadata.close()
        if self._skipped_linked is None:
            n_skipped = write_skipped(self.dir / SKIPPED_NAME, self._skipped)
        else:
            n_skipped = self._skipped_linked
        n_tombstones = self._tombstones or 0
        crash_point("segments-written")
        files = {
            p.relative_to(self.dir).as_posix(): p.stat().st_size
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and p.name != GENERATION_INFO_NAME
        }
        checksums = self._checksums(files)
        n_patches, patch_dim = self.patches.shape or (0, 0)
        codec = self.patches.codec.spec if patch_dim else "fp16"
        schema = self._metadata.schema
        counts = {"images": int(self._ids.shape[0]), "skipped": n_skipped}
        if n_tombstones:
            counts["tombstones"] = n_tombstones
        ids = self._ids
        info = GenerationInfo(
            path=self.dir,
            format_version=format_version_for(n_tombstones, codec),
            generation=self.generation,
            created_at=_now(),
            counts=counts,
            vector_dim=self._vectors_shape[1],
            n_patches=n_patches,
            patch_dim=patch_dim,
            patch_shards=tuple(shards),
            metadata_parts=tuple(parts),
            metadata_columns=tuple(schema.names) if schema is not None else ("id",),
            files=files,
            next_id=max(self.next_id, int(ids[-1]) + 1 if ids.size else 0),
            checksums=checksums,
            checksum_algorithm=CHECKSUM_ALGORITHM,
            patch_codec=codec,
            patch_codec_file=self.patches.codec_file if patch_dim else None,
        )
        with open(self.dir / GENERATION_INFO_NAME, "w", encoding="utf-8") as f:
            json.dump(info.to_dict(), f, indent=2)
            f.write("\n")
        crash_point("generation-written")
        return info

    def _checksums(self, files: Mapping[str, int]) -> dict[str, str]:
        """The checksum of every written file: the base's recorded one for a file hard-linked from
        it (same inode and size: its bytes are the base's, not read again), else hashed now."""
        base = self.base
        usable = (
            base is not None
            and bool(base.info.checksums)
            and base.info.checksum_algorithm in (None, CHECKSUM_ALGORITHM)
        )
        out: dict[str, str] = {}
        for name, size in files.items():
            path = self.dir / name
            if usable and base is not None:
                recorded = base.info.checksums.get(name)
                if (
                    recorded is not None
                    and base.info.files.get(name) == size
                    and _same_inode(path, base.path / name)
                ):
                    out[name] = recorded
                    continue
            out[name] = file_digest(path, CHECKSUM_ALGORITHM)
        return out

    def commit(self, manifest_fields: Mapping[str, Any] | None = None, /, **fields: Any) -> int:
        """Make this generation the index's current one, atomically; then collect old ones.

        Checks the generation with :func:`check_generation` first: an inconsistent generation is
        never committed. After the manifest switch, generations that are neither current nor
        pinned by a live reader are deleted (unless ``gc=False``), and a lock the writer took
        itself is released.

        Args:
            manifest_fields: ``encoder``, ``first_stage``, ``counts`` and any other top-level
                manifest keys. ``counts.images`` (the images a search can return: rows minus
                tombstones), ``counts.skipped`` and ``counts.tombstones`` are filled in from what
                was written (a value given for them must agree). ``format_version``,
                ``generation``, ``generation_dir``, ``created_at`` and ``updated_at`` belong to
                the writer.
            **fields: more manifest keys, as keywords (``commit(encoder=info, counts={...})``);
                they win over the same keys in ``manifest_fields``.

        Returns:
            The committed generation number.

        Raises:
            InvalidArgumentError: a reserved manifest key was given, something was not written,
                or a given count disagrees with what was written.
            IndexCorruptError: the written files disagree with each other (rows, ids).
        """
        self._require_open()
        try:
            return self._commit({**(manifest_fields or {}), **fields})
        finally:
            self._release_lock()

    def _commit(self, fields: dict[str, Any]) -> int:
        reserved = [k for k in fields if k in RESERVED_KEYS]
        try:
            if reserved:
                raise InvalidArgumentError(
                    f"manifest_fields must not set {', '.join(reserved)}; the writer sets them"
                )
            info = self._finish_files()
            counts = dict(fields.pop("counts", None) or {})
            for key, value in (
                ("images", info.n_live),
                ("skipped", info.n_skipped),
                ("tombstones", info.n_tombstones),
            ):
                if key in counts and counts[key] != value:
                    raise InvalidArgumentError(
                        f"counts.{key} is {counts[key]}, but the generation holds {value}"
                    )
                if value or key != "tombstones":
                    counts[key] = value
            problems = check_generation(self.dir)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                raise IndexCorruptError(
                    f"refusing to commit generation {self.generation}: {problems[0]}{more}"
                )
            for name in info.files:
                fsync_file(self.dir / name)
            fsync_file(self.dir / GENERATION_INFO_NAME)
            for sub in sorted(p for p in self.dir.rglob("*") if p.is_dir()):
                fsync_dir(sub)
            fsync_dir(self.dir)
            # Where readers pin generations; made before the first commit so that opening an
            # index never has to create anything in it.
            (self.root / READERS_DIR).mkdir(exist_ok=True)
            crash_point("before-rename")
            os.rename(self.dir, self.final_dir)
            fsync_dir(self.root)
        except BaseException:
            self.abort()
            raise
        # From here the generation is complete and durable; a failure while switching the
        # manifest leaves it uncommitted beside the previous one, exactly like a crash would.
        self._state = "committed"
        crash_point("after-rename")
        now = _now()
        manifest = Manifest(
            root=self.root,
            format_version=info.format_version,
            generation=self.generation,
            generation_dir=self.final_dir.name,
            created_at=_previous_created_at(self.root) or now,
            updated_at=now,
            encoder=dict(fields.pop("encoder", None) or {}),
            first_stage=dict(fields.pop("first_stage", None) or {}),
            counts=counts,
            extra=fields,
        )
        write_manifest(manifest)
        crash_point("after-manifest")
        logger.info(
            "committed generation %d of %s: %d images (%d removed), %d skipped",
            self.generation,
            self.root,
            info.n_live,
            info.n_tombstones,
            info.n_skipped,
        )
        if self.gc:
            try:
                self.collected = collect_garbage(self.root, self.lock)
            except OSError as e:  # the commit stands; the next writer collects what is left
                logger.warning("could not delete old generations of %s: %s", self.root, e)
        return self.generation

    def abort(self) -> None:
        """Discard the temporary folder; idempotent. Nothing committed is touched."""
        if self._state != "open":
            return
        self._state = "aborted"
        self.patches.discard()
        self._metadata.discard()
        shutil.rmtree(self.dir, ignore_errors=True)
        logger.debug("discarded %s", self.dir)
        self._release_lock(remove_unused_root=True)

    def _release_lock(self, *, remove_unused_root: bool = False) -> None:
        if self._own_lock and self.lock.held:
            if remove_unused_root:
                self.lock.remove_root_if_unused()
            self.lock.release()


def next_free_id(root: Path | str) -> int:
    """The first id a writer without a base gives in ``root``: the current generation's
    ``next_id``, or 0 where nothing is committed (or the manifest cannot be read)."""
    try:
        return Generation.current(Path(root)).next_id
    except CrossrankError:
        return 0


def _same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _previous_created_at(root: Path) -> str | None:
    try:
        data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = data.get("created_at") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
