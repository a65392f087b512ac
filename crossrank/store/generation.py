"""Generations: writing one atomically, opening one, and checking one for consistency.

A writer builds ``DIR/.gen-000004.tmp-<pid>/``, fsyncs every file and the folder, renames the
folder to ``DIR/gen-000004`` and only then switches ``manifest.json`` (see
:func:`~crossrank.store.manifest.write_manifest`). A crash before the rename leaves a temporary
folder that no reader looks at; a crash between the rename and the manifest switch leaves a
complete but uncommitted generation; in both cases readers still get the previous generation.
Generations are never modified once renamed; the previous one is kept on commit.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import CrossrankError, IndexCorruptError, InvalidArgumentError
from crossrank.store._files import fsync_dir, fsync_file, read_npy_header, save_npy
from crossrank.store.config import StoreConfig
from crossrank.store.layout import (
    FIRST_STAGE_NAME,
    FORMAT_VERSION,
    GENERATION_INFO_NAME,
    IDS_NAME,
    SKIPPED_NAME,
    VECTORS_NAME,
    GenerationInfo,
    read_generation_info,
)
from crossrank.store.manifest import (
    MANIFEST_NAME,
    RESERVED_KEYS,
    Manifest,
    generation_dir_name,
    next_generation_number,
    read_manifest,
    write_manifest,
)
from crossrank.store.metadata import MetadataStore
from crossrank.store.metadata_writer import MetadataWriter, check_skipped_table, write_skipped
from crossrank.store.patches import PatchStore, PatchWriter

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["GenerationWriter", "Generation", "check_generation", "check_index"]

logger = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class GenerationWriter:
    """Writes the next generation of an index directory; a context manager.

    Leaving the ``with`` block by an exception, or without :meth:`commit`, removes the temporary
    folder and leaves the committed generation and ``manifest.json`` untouched.

    Args:
        root: the index directory (created if missing).
        config: shard and part sizes.

    Attributes:
        root: the index directory.
        generation: the number this generation will get.
        dir: the temporary folder being written.
        patches: the :class:`PatchWriter`; ``append((b, P, d))`` in id-table order.

    Example:
        >>> with GenerationWriter("my-index") as w:                           # doctest: +SKIP
        ...     for batch in batches:
        ...         w.patches.append(batch.patches)
        ...     w.write_vectors(xb); w.write_ids(ids); w.write_metadata(table)
        ...     first_stage.save(w.first_stage_path)
        ...     w.commit({"encoder": encoder.info, "first_stage": {...}})
    """

    def __init__(self, root: Path | str, *, config: StoreConfig | None = None) -> None:
        self.root = Path(root)
        self.config = config if config is not None else StoreConfig()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise InvalidArgumentError(
                f"index path {self.root} exists and is not a directory"
            ) from e
        self.generation = next_generation_number(self.root)
        self.dir = self.root / f".{generation_dir_name(self.generation)}.tmp-{os.getpid()}"
        self.dir.mkdir()
        self.patches = PatchWriter(self.dir, config=self.config)
        self._metadata = MetadataWriter(self.dir, config=self.config)
        self._vectors_shape: tuple[int, int] | None = None
        self._ids_rows: int | None = None
        self._skipped: list[pa.Table] = []
        self._state = "open"
        logger.debug("writing generation %d in %s", self.generation, self.dir)

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

    def write_vectors(self, xb: np.ndarray) -> None:
        """Store the pooled vectors, one row per image in id-table order.

        Args:
            xb: float array ``(n, D)``; stored as float32.

        Raises:
            InvalidArgumentError: not 2-d float, not finite, or written twice.
        """
        self._require_open()
        arr = np.asarray(xb)
        if self._vectors_shape is not None:
            raise InvalidArgumentError("vectors were already written for this generation")
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise InvalidArgumentError(
                f"vectors must be a float array of shape (n, dim), got {arr.dtype} "
                f"of shape {arr.shape}"
            )
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise InvalidArgumentError("vectors hold NaN or inf")
        save_npy(self.dir / VECTORS_NAME, arr)
        self._vectors_shape = (int(arr.shape[0]), int(arr.shape[1]))

    def write_ids(self, ids: np.ndarray) -> None:
        """Store the id table: row ``i`` of every per-image file belongs to ``ids[i]``.

        Args:
            ids: int array ``(n,)``, strictly increasing (sorted and unique).

        Raises:
            InvalidArgumentError: not 1-d integers, not strictly increasing, or written twice.
        """
        self._require_open()
        arr = np.asarray(ids)
        if self._ids_rows is not None:
            raise InvalidArgumentError("ids were already written for this generation")
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InvalidArgumentError(
                f"ids must be a 1-d integer array, got {arr.dtype} of shape {arr.shape}"
            )
        arr = arr.astype(np.int64, copy=False)
        if arr.size > 1:
            bad = np.flatnonzero(arr[1:] <= arr[:-1])
            if bad.size:
                i = int(bad[0])
                raise InvalidArgumentError(
                    f"ids must be sorted ascending and unique, but ids[{i}] = {arr[i]} and "
                    f"ids[{i + 1}] = {arr[i + 1]}"
                )
        save_npy(self.dir / IDS_NAME, arr)
        self._ids_rows = int(arr.shape[0])

    def write_metadata(self, table: pa.Table) -> None:
        """Append metadata rows in id-table order, one per id (see :meth:`MetadataWriter.write`)."""
        self._require_open()
        self._metadata.write(table)

    def write_skipped(self, table: pa.Table) -> None:
        """Append skipped files: a table with string columns ``path`` and ``reason``.

        Raises:
            InvalidArgumentError: the table lacks ``path`` or ``reason``.
        """
        self._require_open()
        check_skipped_table(table)
        self._skipped.append(table)

    def _finish_files(self) -> GenerationInfo:
        """Close every writer and write generation.json."""
        if self._vectors_shape is None:
            raise InvalidArgumentError("write_vectors() was not called before commit()")
        if self._ids_rows is None:
            raise InvalidArgumentError("write_ids() was not called before commit()")
        if not self.first_stage_path.is_file():
            raise InvalidArgumentError(
                f"the first-stage index was not saved to {self.first_stage_path} before commit()"
            )
        shards = self.patches.close()
        parts = self._metadata.close()
        n_skipped = write_skipped(self.dir / SKIPPED_NAME, self._skipped)
        files = {
            p.relative_to(self.dir).as_posix(): p.stat().st_size
            for p in sorted(self.dir.rglob("*"))
            if p.is_file() and p.name != GENERATION_INFO_NAME
        }
        n_patches, patch_dim = self.patches.shape or (0, 0)
        schema = self._metadata.schema
        info = GenerationInfo(
            path=self.dir,
            format_version=FORMAT_VERSION,
            generation=self.generation,
            created_at=_now(),
            counts={"images": self._ids_rows, "skipped": n_skipped},
            vector_dim=self._vectors_shape[1],
            n_patches=n_patches,
            patch_dim=patch_dim,
            patch_shards=tuple(shards),
            metadata_parts=tuple(parts),
            metadata_columns=tuple(schema.names) if schema is not None else ("id",),
            files=files,
        )
        with open(self.dir / GENERATION_INFO_NAME, "w", encoding="utf-8") as f:
            json.dump(info.to_dict(), f, indent=2)
            f.write("\n")
        return info

    def commit(self, manifest_fields: Mapping[str, Any] | None = None, /, **fields: Any) -> int:
        """Make this generation the index's current one, atomically.

        Checks the generation with :func:`check_generation` first: an inconsistent generation is
        never committed.

        Args:
            manifest_fields: ``encoder``, ``first_stage``, ``counts`` and any other top-level
                manifest keys. ``counts.images`` and ``counts.skipped`` are filled in from what was
                written (a value given for them must agree). ``format_version``, ``generation``,
                ``generation_dir``, ``created_at`` and ``updated_at`` belong to the writer.
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
        fields = {**(manifest_fields or {}), **fields}
        reserved = [k for k in fields if k in RESERVED_KEYS]
        try:
            if reserved:
                raise InvalidArgumentError(
                    f"manifest_fields must not set {', '.join(reserved)}; the writer sets them"
                )
            info = self._finish_files()
            counts = dict(fields.pop("counts", None) or {})
            for key, value in (("images", info.n_images), ("skipped", info.n_skipped)):
                if key in counts and counts[key] != value:
                    raise InvalidArgumentError(
                        f"counts.{key} is {counts[key]}, but the generation holds {value}"
                    )
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
            os.rename(self.dir, self.final_dir)
            fsync_dir(self.root)
        except BaseException:
            self.abort()
            raise
        # From here the generation is complete and durable; a failure while switching the
        # manifest leaves it uncommitted beside the previous one, exactly like a crash would.
        self._state = "committed"
        now = _now()
        manifest = Manifest(
            root=self.root,
            format_version=FORMAT_VERSION,
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
        logger.info(
            "committed generation %d of %s: %d images, %d skipped",
            self.generation, self.root, info.n_images, info.n_skipped,
        )
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


def _previous_created_at(root: Path) -> str | None:
    try:
        data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    value = data.get("created_at") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


class Generation:
    """One committed generation, opened for reading.

    Args:
        path: the generation folder.

    Attributes:
        path: the generation folder.
        info: its parsed ``generation.json``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.info = read_generation_info(self.path)

    @classmethod
    def open(cls, gen_dir: Path | str) -> Generation:
        """Open a generation folder (``DIR/gen-000003``), current or not.

        Raises:
            IndexCorruptError: its ``generation.json`` is missing or damaged.
        """
        return cls(gen_dir)

    @classmethod
    def current(cls, root: Path | str) -> Generation:
        """Open the generation ``manifest.json`` of an index directory names.

        Raises:
            IndexNotFoundError: no committed index in ``root``.
            IndexCorruptError: the manifest or ``generation.json`` is damaged.
        """
        return cls(read_manifest(root).generation_path)

    @property
    def number(self) -> int:
        """The generation number."""
        return self.info.generation

    def __len__(self) -> int:
        return self.info.n_images

    @property
    def first_stage_path(self) -> Path:
        """The FAISS index file."""
        return self.path / FIRST_STAGE_NAME

    def _load(self, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        path = self.path / name
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise IndexCorruptError(
                f"{path} cannot be opened ({type(e).__name__}: {e}); run `crossrank verify`"
            ) from e
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise IndexCorruptError(
                f"{path} holds {arr.dtype} {arr.shape}, generation.json records {dtype} {shape}; "
                f"run `crossrank verify`"
            )
        return arr

    def vectors(self) -> np.ndarray:
        """Pooled vectors, memory-mapped: float32 ``(n, D)``, row order of :meth:`ids`."""
        return self._load(VECTORS_NAME, (len(self), self.info.vector_dim), "float32")

    def ids(self) -> np.ndarray:
        """The id table, memory-mapped: int64 ``(n,)``, sorted ascending."""
        return self._load(IDS_NAME, (len(self),), "int64")

    def rows_of_ids(self, ids: np.ndarray) -> np.ndarray:
        """Rows (positions in the id table) of the given ids.

        Args:
            ids: int array ``(k,)``.

        Returns:
            int64 array ``(k,)``.

        Raises:
            InvalidArgumentError: an id is not in this generation.
        """
        arr = np.asarray(ids)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InvalidArgumentError(
                f"ids must be a 1-d integer array, got {arr.dtype} of shape {arr.shape}"
            )
        arr = arr.astype(np.int64, copy=False)
        table = self.ids()
        rows = np.searchsorted(table, arr)
        ok = rows < table.shape[0]
        ok[ok] = table[rows[ok]] == arr[ok]
        if not ok.all():
            missing = np.unique(arr[~ok])
            shown = ", ".join(str(i) for i in missing[:10]) + (" ..." if missing.size > 10 else "")
            raise InvalidArgumentError(
                f"{missing.size} id(s) not in generation {self.number}: {shown}"
            )
        return rows.astype(np.int64, copy=False)

    def patches(self) -> PatchStore:
        """The memory-mapped patch store."""
        return PatchStore.open(self.path)

    def metadata(self, *, in_memory: bool | None = None, sandbox: bool = True) -> MetadataStore:
        """The metadata store (its own DuckDB connection; close it when done).

        Args:
            in_memory: see :class:`MetadataStore`.
            sandbox: see :class:`MetadataStore`.
        """
        return MetadataStore.open(self.path, in_memory=in_memory, sandbox=sandbox)


def _check_npy(
    path: Path, shape: tuple[int, ...], dtype: str, label: str, problems: list[str]
) -> bool:
    try:
        got_shape, got_dtype = read_npy_header(path)
    except (OSError, ValueError) as e:
        problems.append(f"{label} {path} is not a readable .npy file ({e})")
        return False
    if got_dtype != np.dtype(dtype):
        problems.append(f"{label} {path} has dtype {got_dtype}, expected {dtype}")
        return False
    if tuple(got_shape) != tuple(shape):
        problems.append(f"{label} {path} has shape {tuple(got_shape)}, expected {tuple(shape)}")
        return False
    return True


def check_generation(gen_dir: Path | str) -> list[str]:
    """Check that a generation folder is complete and self-consistent.

    Checks every file ``generation.json`` lists is present with its recorded size; the row counts
    of vectors, ids, patch shards, metadata parts and skipped files agree with the recorded counts;
    the ids are sorted and unique; the metadata holds the id table's ids in the same order. The
    FAISS index's count is the caller's to check (``crossrank.indexes``).

    Args:
        gen_dir: the generation folder.

    Returns:
        One line per problem, most basic first; empty when the generation is sound.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen_dir = Path(gen_dir)
    try:
        info = read_generation_info(gen_dir)
    except IndexCorruptError as e:
        return [str(e)]
    problems: list[str] = []
    present: set[str] = set()
    for name, size in info.files.items():
        path = gen_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        present.add(name)
        actual = path.stat().st_size
        if actual != size:
            problems.append(f"{path} has {actual} bytes, generation.json records {size}")
    required = [VECTORS_NAME, IDS_NAME, SKIPPED_NAME, FIRST_STAGE_NAME]
    required += [s.file for s in info.patch_shards] + [p.file for p in info.metadata_parts]
    for name in required:
        if name not in info.files:
            problems.append(f"generation.json of {gen_dir} does not list {name}")

    n = info.n_images
    if VECTORS_NAME in present:
        _check_npy(gen_dir / VECTORS_NAME, (n, info.vector_dim), "float32", "vectors", problems)

    ids = None
    if IDS_NAME in present and _check_npy(gen_dir / IDS_NAME, (n,), "int64", "ids", problems):
        ids = np.load(gen_dir / IDS_NAME, mmap_mode="r")
        bad = np.flatnonzero(ids[1:] <= ids[:-1]) if n > 1 else np.zeros(0, np.int64)
        if bad.size:
            i = int(bad[0])
            problems.append(
                f"ids are not sorted and unique: ids[{i}] = {ids[i]}, ids[{i + 1}] = {ids[i + 1]}"
            )
            ids = None

    patch_rows = sum(s.rows for s in info.patch_shards)
    if patch_rows != n:
        problems.append(f"patch shards hold {patch_rows} rows in total, expected {n} images")
    for shard in info.patch_shards:
        if shard.file in present:
            shape = (shard.rows, info.n_patches, info.patch_dim)
            _check_npy(gen_dir / shard.file, shape, "float16", "patch shard", problems)

    meta_rows = sum(p.rows for p in info.metadata_parts)
    if meta_rows != n:
        problems.append(f"metadata parts hold {meta_rows} rows in total, expected {n} images")
    meta_ids = []
    for part in info.metadata_parts:
        if part.file not in present:
            continue
        path = gen_dir / part.file
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
            if rows != part.rows:
                problems.append(
                    f"metadata part {path} has {rows} rows, generation.json records {part.rows}"
                )
            meta_ids.append(pq.read_table(path, columns=["id"]).column("id").to_numpy())
        except (OSError, KeyError, pa.ArrowException) as e:
            problems.append(f"metadata part {path} cannot be read ({type(e).__name__}: {e})")
    if ids is not None and len(meta_ids) == len(info.metadata_parts):
        # Every per-image file shares the id table's row order; so must the metadata.
        all_meta = np.concatenate(meta_ids) if meta_ids else np.zeros(0, np.int64)
        if all_meta.shape == ids.shape:
            differ = np.flatnonzero(all_meta != ids)
            if differ.size:
                i = int(differ[0])
                problems.append(
                    f"metadata row {i} has id {all_meta[i]}, but ids.npy has {ids[i]} there: the "
                    f"metadata must hold the id table's ids in the same order"
                )

    if SKIPPED_NAME in present:
        try:
            rows = pq.ParquetFile(gen_dir / SKIPPED_NAME).metadata.num_rows
            if rows != info.n_skipped:
                problems.append(
                    f"{gen_dir / SKIPPED_NAME} has {rows} rows, counts.skipped is {info.n_skipped}"
                )
        except (OSError, pa.ArrowException) as e:
            problems.append(f"{gen_dir / SKIPPED_NAME} cannot be read ({type(e).__name__}: {e})")
    return problems


def check_index(root: Path | str) -> list[str]:
    """Check an index directory's manifest and current generation (not the FAISS count).

    Args:
        root: the index directory.

    Returns:
        One line per problem; empty when sound.

    Raises:
        IndexNotFoundError: no committed index in ``root``.
    """
    try:
        manifest = read_manifest(root)
    except IndexCorruptError as e:
        return [str(e)]
    problems = check_generation(manifest.generation_path)
    try:
        info = read_generation_info(manifest.generation_path)
    except IndexCorruptError:
        return problems
    for key in ("images", "skipped"):
        if key in manifest.counts and manifest.counts[key] != info.counts[key]:
            problems.append(
                f"manifest counts.{key} is {manifest.counts[key]}, generation "
                f"{manifest.generation_dir} holds {info.counts[key]}"
            )
    return problems
