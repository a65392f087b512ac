"""Opening a committed generation for reading: :class:`Generation`.

A generation is an immutable folder ``DIR/gen-NNNNNN/`` (vectors, ids, patch shards, metadata
parts, tombstones, the FAISS first stage and ``generation.json``); it is written by
:class:`~crossrank.store.generation_writer.GenerationWriter` and never modified once committed.

Because it never changes, a :class:`Generation` opens each of its arrays once (``np.load`` parses
the ``.npy`` header with Python's ``ast``, which is slow and, under many threads at once, was seen
to fail with ``SystemError: AST constructor recursion depth mismatch``) and hands every caller the
same read-only array afterwards.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossrank.errors import IndexCorruptError, InvalidArgumentError
from crossrank.store._files import load_npy
from crossrank.store.layout import (
    FIRST_STAGE_NAME,
    IDS_NAME,
    TOMBSTONES_NAME,
    UNREADABLE,
    VECTORS_NAME,
    read_generation_info,
)
from crossrank.store.manifest import read_manifest
from crossrank.store.metadata import MetadataStore
from crossrank.store.patches import PatchStore

__all__ = ["Generation"]


class Generation:
    """One committed generation, opened for reading.

    Thread-safe: the id table, vectors, tombstones and live ids are loaded on first use, once, and
    shared (read-only) by every caller and thread after that.

    Args:
        path: the generation folder.

    Attributes:
        path: the generation folder.
        info: its parsed ``generation.json``.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.info = read_generation_info(self.path)
        self._arrays: dict[str, np.ndarray] = {}
        self._lock = threading.RLock()  # live_ids() loads ids() while holding it

    def _once(self, key: str, make: Callable[[], np.ndarray]) -> np.ndarray:
        """``make()`` the first time ``key`` is asked for (under the lock), the same array after."""
        arr = self._arrays.get(key)
        if arr is None:
            with self._lock:
                arr = self._arrays.get(key)
                if arr is None:
                    arr = make()
                    arr.flags.writeable = False  # shared by every caller: nobody may change it
                    self._arrays[key] = arr
        return arr

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

        Unpinned: a writer may delete it once it is no longer current. A reader that keeps it open
        should pin it first (:func:`~crossrank.store.pins.pin_current`, as ``Index`` does).

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
        """Rows of the id table (removed images included; see :meth:`live_ids`)."""
        return self.info.n_images

    @property
    def next_id(self) -> int:
        """The smallest id never given in this index directory."""
        if self.info.next_id is not None:
            return self.info.next_id
        ids = self.ids()
        return int(ids[-1]) + 1 if ids.size else 0

    @property
    def first_stage_path(self) -> Path:
        """The FAISS index file."""
        return self.path / FIRST_STAGE_NAME

    def _load(self, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        path = self.path / name
        try:
            arr = load_npy(path)
        except UNREADABLE as e:
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
        """Pooled vectors, memory-mapped: float32 ``(n, D)``, row order of :meth:`ids`; read-only,
        loaded once."""
        return self._once(
            "vectors",
            lambda: self._load(VECTORS_NAME, (len(self), self.info.vector_dim), "float32"),
        )

    def ids(self) -> np.ndarray:
        """The id table, memory-mapped: int64 ``(n,)``, sorted ascending; read-only, loaded once.

        It is also the row map of :meth:`rows_of_ids`: the row of an id is its position here.
        """
        return self._once("ids", lambda: self._load(IDS_NAME, (len(self),), "int64"))

    def tombstones(self) -> np.ndarray:
        """The removed ids: int64 ``(t,)``, sorted; empty when nothing was removed; read-only,
        loaded once."""
        return self._once("tombstones", self._load_tombstones)

    def _load_tombstones(self) -> np.ndarray:
        if not self.info.n_tombstones:
            return np.zeros(0, np.int64)
        return np.asarray(self._load(TOMBSTONES_NAME, (self.info.n_tombstones,), "int64"))

    def live_ids(self) -> np.ndarray:
        """The ids a search can return: the id table minus the tombstones; int64, sorted;
        read-only, computed once."""
        return self._once("live_ids", self._compute_live_ids)

    def _compute_live_ids(self) -> np.ndarray:
        ids = np.asarray(self.ids())
        dead = self.tombstones()
        return ids if not dead.size else ids[~np.isin(ids, dead, assume_unique=True)]

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
