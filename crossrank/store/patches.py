"""The patch store: per-image patch features as float16 ``.npy`` shards, memory-mapped for reading.

Row ``i`` of the store belongs to the image at position ``i`` of the generation's id table
(``row = np.searchsorted(ids, id)``). Shards are written one after another as rows arrive, so a
build never holds more than one batch of patch features, and the total count need not be known in
advance (files get skipped during a build).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from crossrank.errors import IndexCorruptError, InvalidArgumentError
from crossrank.store._files import NpyAppender
from crossrank.store.config import StoreConfig
from crossrank.store.layout import PartInfo, patch_shard_name, read_generation_info

__all__ = ["PatchWriter", "PatchStore"]

logger = logging.getLogger(__name__)

_DTYPE = np.dtype("<f2")
_SHARD_RE = re.compile(r"^patches-(\d+)\.npy$")
# Rows at least this large are copied one by one straight into the output: a vectorised take
# followed by a scatter would copy every byte twice, and the loop's ~1 us per row is small next to
# copying a row this size. Smaller rows go through the vectorised two-copy path.
_ROW_LOOP_MIN_BYTES = 16 * 1024


class PatchWriter:
    """Appends patch features to a generation folder, one float16 shard after another.

    A shard is finished (its ``.npy`` header rewritten with its row count) as soon as it holds
    ``config.shard_rows_for(P, d)`` rows; :meth:`close` finishes the last, partly filled one.

    Args:
        directory: the (temporary) generation folder to write into.
        config: shard sizes.
        first_shard: number of the first shard written (a later generation that keeps an earlier
            one's shards continues their numbering).

    Example:
        >>> writer = PatchWriter(tmp_dir)                          # doctest: +SKIP
        >>> writer.append(np.zeros((64, 50, 512), np.float32))     # doctest: +SKIP
        >>> shards = writer.close()                                # doctest: +SKIP
    """

    def __init__(
        self, directory: Path | str, *, config: StoreConfig | None = None, first_shard: int = 0
    ) -> None:
        self.dir = Path(directory)
        self.config = config if config is not None else StoreConfig()
        self._next_shard = first_shard
        self._shape: tuple[int, int] | None = None
        self._shard_rows = 0
        self._current: NpyAppender | None = None
        self._current_name = ""
        self._shards: list[PartInfo] = []
        self._rows = 0
        self._closed = False

    @property
    def rows(self) -> int:
        """Rows appended so far."""
        return self._rows

    @property
    def shape(self) -> tuple[int, int] | None:
        """``(P, d)`` once the first batch (possibly of 0 rows) was appended, else None."""
        return self._shape

    @property
    def shards(self) -> list[PartInfo]:
        """The finished shards, in row order."""
        return list(self._shards)

    def append(self, patches: np.ndarray) -> None:
        """Append the patch features of the next ``b`` images.

        Args:
            patches: float array ``(b, P, d)``; stored as float16. A ``(0, P, d)`` array declares
                the shape without adding rows (useful when every file of a build was skipped).

        Raises:
            InvalidArgumentError: not a 3-d float array, a ``(P, d)`` other than the first
                batch's, values that are not finite in float16 (|x| > 65504 overflows), or the
                writer is closed.
        """
        if self._closed:
            raise InvalidArgumentError("patch writer is closed; append before commit()")
        arr = np.asarray(patches)
        if arr.ndim != 3 or arr.dtype.kind != "f":
            raise InvalidArgumentError(
                f"patches must be a float array of shape (b, n_patches, dim), got {arr.dtype} "
                f"of shape {arr.shape}"
            )
        shape = (int(arr.shape[1]), int(arr.shape[2]))
        if self._shape is None:
            if shape[0] <= 0 or shape[1] <= 0:
                raise InvalidArgumentError(f"patches must have n_patches, dim > 0, got {shape}")
            self._shape = shape
            self._shard_rows = self.config.shard_rows_for(*shape)
        elif shape != self._shape:
            raise InvalidArgumentError(
                f"patches have (n_patches, dim) {shape}, but earlier batches had {self._shape}; "
                f"every image must be encoded by the same model"
            )
        # Cast the whole batch first so that a bad batch writes nothing.
        with np.errstate(over="ignore"):  # overflow is reported just below, as an error
            half = arr.astype(_DTYPE, copy=False)
        if not np.isfinite(half).all():
            raise InvalidArgumentError(
                "patches hold values that are not finite in float16 (NaN, inf, or |x| > 65504); "
                "store normalised features"
            )
        start, b = 0, half.shape[0]
        while start < b:
            if self._current is None:
                self._open_shard()
            assert self._current is not None
            take = min(b - start, self._shard_rows - self._current.rows)
            self._current.append(half[start : start + take])
            start += take
            self._rows += take
            if self._current.rows >= self._shard_rows:
                self._finish_shard()

    def link_shards(
        self, base_dir: Path | str, shards: list[PartInfo], shape: tuple[int, int]
    ) -> None:
        """Start with the shards of an earlier generation, hard-linked, then append after them.

        Args:
            base_dir: the earlier generation's folder.
            shards: its shards, in row order (``GenerationInfo.patch_shards``).
            shape: its ``(P, d)``; later batches must match it.

        Raises:
            InvalidArgumentError: rows were already appended, or the writer is closed.
        """
        from crossrank.store._files import link_or_copy

        if self._closed or self._rows or self._shards:
            raise InvalidArgumentError("link_shards() must come before any append()")
        shape = (int(shape[0]), int(shape[1]))
        if shape[0] > 0 and shape[1] > 0:
            self._shape = shape
            self._shard_rows = self.config.shard_rows_for(*shape)
        for part in shards:
            link_or_copy(Path(base_dir) / part.file, self.dir / part.file)
            self._shards.append(part)
            self._rows += part.rows
            m = _SHARD_RE.match(part.file)
            if m is not None:
                self._next_shard = max(self._next_shard, int(m.group(1)) + 1)

    def _open_shard(self) -> None:
        assert self._shape is not None
        self._current_name = patch_shard_name(self._next_shard)
        self._next_shard += 1
        self._current = NpyAppender(self.dir / self._current_name, _DTYPE, self._shape)

    def _finish_shard(self) -> None:
        assert self._current is not None
        rows = self._current.close()
        self._shards.append(PartInfo(file=self._current_name, rows=rows))
        logger.debug("finished patch shard %s with %d rows", self._current_name, rows)
        self._current = None

    def close(self) -> list[PartInfo]:
        """Finish the last shard; idempotent.

        Returns:
            Every shard, in row order.
        """
        if not self._closed:
            if self._current is not None:
                if self._current.rows > 0:
                    self._finish_shard()
                else:  # a shard only opens to take rows; stay clean should that ever change
                    self._current.discard()
                    (self.dir / self._current_name).unlink(missing_ok=True)
                    self._current = None
            self._closed = True
        return self.shards

    def discard(self) -> None:
        """Close the open shard without finishing it (the caller removes the folder)."""
        if self._current is not None:
            self._current.discard()
            self._current = None
        self._closed = True


class PatchStore:
    """Read-only, memory-mapped patch features of one generation.

    Thread-safe: :meth:`gather` only reads the memory maps.

    Args:
        shards: the shard arrays, float16 ``(rows_i, P, d)`` each, in row order.
        shape: ``(P, d)``; needed when there are no shards.
    """

    def __init__(self, shards: list[np.ndarray], shape: tuple[int, int]) -> None:
        self._shards = [np.asarray(s) for s in shards]  # plain ndarray views over the maps
        self._shape = (int(shape[0]), int(shape[1]))
        self._starts = np.cumsum([0] + [s.shape[0] for s in self._shards], dtype=np.int64)

    @classmethod
    def open(cls, gen_dir: Path | str) -> PatchStore:
        """Memory-map the patch shards of a generation folder.

        Args:
            gen_dir: the generation folder.

        Returns:
            The store; nothing is read until :meth:`gather`.

        Raises:
            IndexCorruptError: a shard is missing, unreadable, or not of the recorded shape.
        """
        info = read_generation_info(gen_dir)
        shape = (info.n_patches, info.patch_dim)
        shards = []
        for part in info.patch_shards:
            path = Path(gen_dir) / part.file
            try:
                mm = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise IndexCorruptError(
                    f"patch shard {path} cannot be opened ({type(e).__name__}: {e}); "
                    f"run `crossrank verify` on the index"
                ) from e
            if mm.dtype != _DTYPE or mm.shape != (part.rows, *shape):
                raise IndexCorruptError(
                    f"patch shard {path} holds {mm.dtype} {mm.shape}, generation.json records "
                    f"float16 {(part.rows, *shape)}; run `crossrank verify` on the index"
                )
            shards.append(mm)
        return cls(shards, shape)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, d)``: patches per image and feature dim."""
        return self._shape

    @property
    def n_shards(self) -> int:
        """Number of shard files."""
        return len(self._shards)

    def _check_rows(self, rows: np.ndarray) -> np.ndarray:
        arr = np.asarray(rows)
        if arr.ndim != 1:
            raise InvalidArgumentError(f"rows must be a 1-d integer array, got shape {arr.shape}")
        if arr.size == 0:
            return np.zeros(0, np.int64)
        if arr.dtype.kind not in "iu":
            raise InvalidArgumentError(f"rows must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        n = len(self)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise InvalidArgumentError(
                f"row {bad} is out of range for a patch store of {n} rows (valid 0..{n - 1}); "
                f"rows are positions in the id table: np.searchsorted(ids, id)"
            )
        return arr

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The patch features of the given rows, in the order given.

        Rows are read per shard in ascending order (sequential access on a cold page cache) and
        land in the output at the position asked for.

        Args:
            rows: int array ``(k,)`` of rows in ``[0, len(self))``; repeats allowed.

        Returns:
            float16 array ``(k, P, d)``, a fresh array (not a view of the maps).

        Raises:
            InvalidArgumentError: ``rows`` is not a 1-d integer array or holds a row out of range.
        """
        rows = self._check_rows(rows)
        k = rows.shape[0]
        out = np.empty((k, *self._shape), dtype=_DTYPE)  # (k, P, d)
        if k == 0:
            return out
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1  # (k,)
        local = rows - self._starts[shard_of]  # (k,) row within its shard
        first = int(shard_of[0])
        if (shard_of == first).all():
            # One shard (every small index, many queries): a single take straight into `out`.
            # mode="clip" because numpy buffers `out` under the default mode="raise" (a second
            # copy); the rows were range-checked above.
            np.take(self._shards[first], local, axis=0, out=out, mode="clip")
            return out
        order = np.argsort(rows, kind="stable")  # shards are contiguous ranges: also groups rows
        if out[0].nbytes >= _ROW_LOOP_MIN_BYTES:
            shards = self._shards
            for i, s, r in zip(
                order.tolist(), shard_of[order].tolist(), local[order].tolist(), strict=True
            ):
                out[i] = shards[s][r]
            return out
        sorted_shard = shard_of[order]
        bounds = np.flatnonzero(np.diff(sorted_shard)) + 1
        for group in np.split(order, bounds):
            s = int(shard_of[group[0]])
            out[group] = np.take(self._shards[s], local[group], axis=0, mode="clip")
        return out

    def close(self) -> None:
        """Drop the memory maps (they are unmapped once no gathered view refers to them)."""
        self._shards = []
        self._starts = np.zeros(1, np.int64)
