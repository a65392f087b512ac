"""The patch store: per-image patch features in ``.npy`` shards, memory-mapped for reading.

Row ``i`` of the store belongs to the image at position ``i`` of the generation's id table
(``row = np.searchsorted(ids, id)``). Shards are written one after another as rows arrive, so a
build never holds more than one batch of patch features, and the total count need not be known in
advance (files get skipped during a build).

How a row is stored is the generation's patch codec (:mod:`crossrank.store.codecs`): float16
``(P, d)`` by default, or int8, binary or PQ codes. :meth:`PatchStore.gather` always returns
decoded ``(k, P, d)`` features (float16 for fp16, float32 for the others: the rerankers take
either), so that nothing past the store knows the codec. A codec that must
be trained (pq) and is not yet (a new build) has its rows staged as float16 beside the shards; on
:meth:`PatchWriter.close` it is trained on a seeded sample of them, the staged rows are encoded
into the real shards a block at a time, and the staging files are deleted: memory stays bounded
by a block whatever the build's size.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from crossrank.errors import IndexCorruptError, InvalidArgumentError
from crossrank.store._files import NpyAppender, load_npy
from crossrank.store.codecs import PQ_SEED, Fp16Codec, PatchCodec, open_codec, parse_codec
from crossrank.store.config import StoreConfig
from crossrank.store.layout import PartInfo, patch_shard_name, read_generation_info

__all__ = ["PatchWriter", "PatchStore", "shard_rows_for"]

logger = logging.getLogger(__name__)

_DTYPE = np.dtype("<f2")
_SHARD_RE = re.compile(r"^patches-(\d+)\.npy$")
_STAGE_PREFIX = ".staged-patches-"  # float16 rows waiting for a codec's training (never listed)
_ENCODE_ROWS_BYTES = 64 << 20  # float16 bytes of staged rows encoded per step
# Rows at least this large are copied one by one straight into the output: a vectorised take
# followed by a scatter would copy every byte twice, and the loop's ~1 us per row is small next to
# copying a row this size. Smaller rows go through the vectorised two-copy path.
_ROW_LOOP_MIN_BYTES = 16 * 1024
#: Patch files from this size on get a read-ahead hint for the rows a gather is about to read
#: (:meth:`PatchStore.gather_stored`): past the page cache, a gather's rows are otherwise read by
#: one page fault after another.
_HINT_MIN_BYTES = 256 << 20


def shard_rows_for(config: StoreConfig, codec: PatchCodec, n_patches: int, patch_dim: int) -> int:
    """Rows per patch shard of a codec: ``config.patch_shard_rows``, else as many stored rows as
    fit ``config.patch_shard_bytes`` (for fp16, ``config.shard_rows_for``)."""
    if isinstance(codec, Fp16Codec) or config.patch_shard_rows is not None:
        return config.shard_rows_for(n_patches, patch_dim)
    row_bytes = max(1, codec.bytes_per_image(n_patches, patch_dim))
    return max(1, config.patch_shard_bytes // row_bytes)


class PatchWriter:
    """Appends patch features to a generation folder, one shard after another.

    A shard is finished (its ``.npy`` header rewritten with its row count) as soon as it holds
    :func:`shard_rows_for` rows; :meth:`close` finishes the last, partly filled one (and, for a
    codec that trains, trains it and encodes the staged rows first).

    Args:
        directory: the (temporary) generation folder to write into.
        config: shard sizes.
        first_shard: number of the first shard written (a later generation that keeps an earlier
            one's shards continues their numbering).
        codec: how rows are stored (:mod:`crossrank.store.codecs`): a codec, its name, or None
            for fp16. A trained codec (loaded from an earlier generation) encodes as rows come.

    Example:
        >>> writer = PatchWriter(tmp_dir)                          # doctest: +SKIP
        >>> writer.append(np.zeros((64, 50, 512), np.float32))     # doctest: +SKIP
        >>> shards = writer.close()                                # doctest: +SKIP
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        config: StoreConfig | None = None,
        first_shard: int = 0,
        codec: PatchCodec | str | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.config = config if config is not None else StoreConfig()
        self.codec: PatchCodec = parse_codec(codec)
        self._fp16 = isinstance(self.codec, Fp16Codec)
        self._next_shard = first_shard
        self._shape: tuple[int, int] | None = None
        self._row_shape: tuple[int, ...] = ()
        self._shard_rows = 0
        self._current: NpyAppender | None = None
        self._current_name = ""
        self._shards: list[PartInfo] = []
        self._staged: list[tuple[Path, int]] = []  # float16 rows waiting for the codec's training
        self._stage: NpyAppender | None = None
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

    def _set_shape(self, shape: tuple[int, int]) -> None:
        self.codec.configure(*shape)
        self._shape = shape
        self._shard_rows = shard_rows_for(self.config, self.codec, *shape)
        self._row_shape = self.codec.row_shape(*shape)

    def append(self, patches: np.ndarray) -> None:
        """Append the patch features of the next ``b`` images.

        Args:
            patches: float array ``(b, P, d)``; cast to float16, then stored with the codec. A
                ``(0, P, d)`` array declares the shape without adding rows (useful when every
                file of a build was skipped).

        Raises:
            InvalidArgumentError: not a 3-d float array, a ``(P, d)`` other than the first
                batch's, values that are not finite in float16 (|x| > 65504 overflows), a ``d``
                the codec cannot store, or the writer is closed.
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
            self._set_shape(shape)
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
        if self._fp16:
            self._write_stored(half)
        elif self.codec.needs_training:
            self._stage_rows(half)
        elif half.shape[0]:
            self._write_stored(self.codec.encode(half))
        self._rows += half.shape[0]

    def append_stored(self, stored: np.ndarray) -> None:
        """Append rows already stored with this writer's codec (a compaction copies them as they
        are: no decode, no second rounding).

        Args:
            stored: ``(b, *row_shape)`` of the codec's stored dtype, after the shape was declared
                (an ``append`` of ``(0, P, d)``, or :meth:`link_shards`).

        Raises:
            InvalidArgumentError: no shape declared, another shape or dtype, an untrained codec,
                or the writer is closed.
        """
        if self._closed:
            raise InvalidArgumentError("patch writer is closed; append before commit()")
        arr = np.asarray(stored)
        if self._shape is None or self.codec.needs_training:
            raise InvalidArgumentError(
                "append_stored() needs the shape declared and the codec trained first"
            )
        if arr.dtype != self.codec.stored_dtype or tuple(arr.shape[1:]) != self._row_shape:
            raise InvalidArgumentError(
                f"stored rows must be {self.codec.stored_dtype} (b, {self._row_shape}) for codec "
                f"{self.codec.spec}, got {arr.dtype} {arr.shape}"
            )
        self._write_stored(arr.astype(self.codec.stored_dtype.newbyteorder("<"), copy=False))
        self._rows += arr.shape[0]

    def _write_stored(self, stored: np.ndarray) -> None:
        start, b = 0, stored.shape[0]
        while start < b:
            if self._current is None:
                self._open_shard()
            assert self._current is not None
            take = min(b - start, self._shard_rows - self._current.rows)
            self._current.append(stored[start : start + take])
            start += take
            if self._current.rows >= self._shard_rows:
                self._finish_shard()

    def _stage_rows(self, half: np.ndarray) -> None:
        """Keep float16 rows in staging files until the codec is trained (see :meth:`close`)."""
        assert self._shape is not None
        per_file = self.config.shard_rows_for(*self._shape)
        start, b = 0, half.shape[0]
        while start < b:
            if self._stage is None:
                path = self.dir / f"{_STAGE_PREFIX}{len(self._staged):03d}.npy"
                self._stage = NpyAppender(path, _DTYPE, self._shape)
            take = min(b - start, per_file - self._stage.rows)
            self._stage.append(half[start : start + take])
            start += take
            if self._stage.rows >= per_file:
                self._finish_stage()

    def _finish_stage(self) -> None:
        assert self._stage is not None
        self._staged.append((self._stage.path, self._stage.close()))
        self._stage = None

    def _train_and_encode_staged(self) -> None:
        """Train the codec on a seeded sample of the staged rows, then encode them into shards."""
        if self._stage is not None:
            self._finish_stage()
        assert self._shape is not None
        n_patches, d = self._shape
        n_rows = sum(rows for _, rows in self._staged)
        n_vec = n_rows * n_patches
        self.codec.check_trainable(n_vec, n_patches, f"{n_rows:,} images")
        m = min(n_vec, self.codec.max_train_vectors())
        pick = np.sort(np.random.default_rng(PQ_SEED).choice(n_vec, size=m, replace=False))
        sample = np.empty((m, d), np.float32)
        first = 0  # the first vector of the file at hand
        for path, rows in self._staged:
            flat = load_npy(path).reshape(rows * n_patches, d)
            lo, hi = np.searchsorted(pick, [first, first + rows * n_patches])
            sample[lo:hi] = flat[pick[lo:hi] - first]
            first += rows * n_patches
            del flat
        self.codec.train(sample)
        del sample
        step = max(1, _ENCODE_ROWS_BYTES // (n_patches * d * 2))
        for path, rows in self._staged:
            mm = load_npy(path)
            for i0 in range(0, rows, step):
                self._write_stored(self.codec.encode(mm[i0 : i0 + step]))
            del mm
            path.unlink()
        logger.debug("trained %s on %d patch vectors, encoded %d rows", self.codec, m, n_rows)
        self._staged = []

    def link_shards(
        self, base_dir: Path | str, shards: list[PartInfo], shape: tuple[int, int]
    ) -> None:
        """Start with the shards of an earlier generation, hard-linked, then append after them.

        The writer's codec must be the earlier generation's (loaded from it, trained).

        Args:
            base_dir: the earlier generation's folder.
            shards: its shards, in row order (``GenerationInfo.patch_shards``).
            shape: its ``(P, d)``; later batches must match it.

        Raises:
            InvalidArgumentError: rows were already appended, or the writer is closed.
        """
        from crossrank.store._files import link_or_copy

        if self._closed or self._rows or self._shards or self._staged or self._stage:
            raise InvalidArgumentError("link_shards() must come before any append()")
        shape = (int(shape[0]), int(shape[1]))
        if shape[0] > 0 and shape[1] > 0:
            self._set_shape(shape)
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
        self._current = NpyAppender(
            self.dir / self._current_name, self.codec.stored_dtype, self._row_shape
        )

    def _finish_shard(self) -> None:
        assert self._current is not None
        rows = self._current.close()
        self._shards.append(PartInfo(file=self._current_name, rows=rows))
        logger.debug("finished patch shard %s with %d rows", self._current_name, rows)
        self._current = None

    @property
    def codec_file(self) -> str | None:
        """The codec's parameters file, once :meth:`close` wrote it; else None."""
        name = self.codec.params_file
        return name if name is not None and (self.dir / name).is_file() else None

    def close(self) -> list[PartInfo]:
        """Train and encode staged rows, finish the last shard, save the codec; idempotent.

        Returns:
            Every shard, in row order.

        Raises:
            InvalidArgumentError: a codec that trains got too few patch vectors to train on.
        """
        if not self._closed:
            if self._staged or self._stage is not None:
                self._train_and_encode_staged()
            elif self.codec.needs_training and self._shape is not None:
                self.codec.check_trainable(0, self._shape[0], "0 images")
            if self._current is not None:
                if self._current.rows > 0:
                    self._finish_shard()
                else:  # a shard only opens to take rows; stay clean should that ever change
                    self._current.discard()
                    (self.dir / self._current_name).unlink(missing_ok=True)
                    self._current = None
            if self.codec.params_file is not None and self._shape is not None:
                self.codec.save(self.dir)
            self._closed = True
        return self.shards

    def discard(self) -> None:
        """Close the open shard without finishing it (the caller removes the folder)."""
        for appender in (self._current, self._stage):
            if appender is not None:
                appender.discard()
        self._current = self._stage = None
        self._closed = True


class PatchStore:
    """Read-only, memory-mapped patch features of one generation.

    Thread-safe: :meth:`gather` only reads the memory maps (and the codec's read-only tables).

    Args:
        shards: the shard arrays, ``(rows_i, *row_shape)`` each in the codec's stored dtype
            (float16 ``(rows_i, P, d)`` for fp16), in row order.
        shape: ``(P, d)``; needed when there are no shards.
        codec: how the shards are stored; None for fp16.
    """

    def __init__(
        self,
        shards: list[np.ndarray],
        shape: tuple[int, int],
        codec: PatchCodec | None = None,
        *,
        files: list[tuple[Path, int]] | None = None,
    ) -> None:
        self._shards = [np.asarray(s) for s in shards]  # plain ndarray views over the maps
        # Each shard's file and the byte offset of its first row, for read-ahead hints (open()).
        self._files = files if files is not None and len(files) == len(shards) else None
        self._shape = (int(shape[0]), int(shape[1]))
        self._codec: PatchCodec = codec if codec is not None else Fp16Codec()
        self._fp16 = isinstance(self._codec, Fp16Codec)
        self._row_shape: tuple[int, ...] = (
            tuple(self._shards[0].shape[1:])
            if self._shards
            else self._codec.row_shape(*self._shape)
        )
        self._starts = np.cumsum([0] + [s.shape[0] for s in self._shards], dtype=np.int64)

    @classmethod
    def open(cls, gen_dir: Path | str) -> PatchStore:
        """Memory-map the patch shards of a generation folder.

        Args:
            gen_dir: the generation folder.

        Returns:
            The store; nothing is read until :meth:`gather`.

        Raises:
            IndexCorruptError: a shard is missing, unreadable, or not of the recorded shape, or
                the codec's parameters are missing or damaged.
        """
        info = read_generation_info(gen_dir)
        shape = (info.n_patches, info.patch_dim)
        codec = open_codec(info.patch_codec, gen_dir, *shape)
        row_shape = codec.row_shape(*shape)
        dtype = codec.stored_dtype
        shards, files = [], []
        for part in info.patch_shards:
            path = Path(gen_dir) / part.file
            try:
                mm = load_npy(path)
            except (OSError, ValueError) as e:
                raise IndexCorruptError(
                    f"patch shard {path} cannot be opened ({type(e).__name__}: {e}); "
                    f"run `crossrank verify` on the index"
                ) from e
            if mm.dtype != dtype or mm.shape != (part.rows, *row_shape):
                raise IndexCorruptError(
                    f"patch shard {path} holds {mm.dtype} {mm.shape}, generation.json records "
                    f"{dtype} {(part.rows, *row_shape)}; run `crossrank verify` on the index"
                )
            shards.append(mm)
            files.append((path, int(mm.offset)))
        return cls(shards, shape, codec, files=files)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(P, d)``: patches per image and feature dim."""
        return self._shape

    @property
    def codec(self) -> PatchCodec:
        """How the rows are stored."""
        return self._codec

    @property
    def bytes_per_image(self) -> int:
        """Stored bytes of one image's patches."""
        return self._codec.bytes_per_image(*self._shape)

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
        """The patch features of the given rows, in the order given, decoded.

        Rows are read per shard in ascending order (sequential access on a cold page cache) and
        land in the output at the position asked for; a codec's rows are then decoded a few at a
        time (see :meth:`gather_stored` for the stored rows themselves).

        Args:
            rows: int array ``(k,)`` of rows in ``[0, len(self))``; repeats allowed.

        Returns:
            ``(k, P, d)``, a fresh array (not a view of the maps): float16 for the fp16 codec
            (the stored rows themselves), float32 decoded for the others (numpy's float32 to
            float16 cast alone costs twice the int8 decode; the rerankers take either).

        Raises:
            InvalidArgumentError: ``rows`` is not a 1-d integer array or holds a row out of range.
        """
        stored = self.gather_stored(rows)
        if self._fp16:
            return stored
        return self._codec.decode(stored, self._shape[1])

    def gather_stored(self, rows: np.ndarray) -> np.ndarray:
        """The stored rows, as the codec wrote them: ``(k, *row_shape)`` of its stored dtype
        (float16 ``(k, P, d)`` for fp16, where this is :meth:`gather`).

        Raises:
            InvalidArgumentError: ``rows`` is not a 1-d integer array or holds a row out of range.
        """
        rows = self._check_rows(rows)
        k = rows.shape[0]
        out = np.empty((k, *self._row_shape), dtype=self._codec.stored_dtype)
        if k == 0:
            return out
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1  # (k,)
        local = rows - self._starts[shard_of]  # (k,) row within its shard
        self._read_ahead(shard_of, local)
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

    def _read_ahead(self, shard_of: np.ndarray, local: np.ndarray) -> None:
        """Ask the kernel to read the rows about to be gathered from large patch files, all at
        once (``posix_fadvise(WILLNEED)``): reads queued together instead of one page fault
        after another. Rows already in the page cache cost a system call each, no read."""
        if self._files is None or not hasattr(os, "posix_fadvise"):
            return
        row_bytes = self._shards[0][0].nbytes if self._shards else 0
        for s in np.unique(shard_of).tolist():
            if self._shards[s].nbytes < _HINT_MIN_BYTES:
                continue
            path, start = self._files[s]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue  # only a hint: the gather itself reports a missing file
            try:
                for r in local[shard_of == s].tolist():
                    os.posix_fadvise(fd, start + r * row_bytes, row_bytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass
            finally:
                os.close(fd)

    def close(self) -> None:
        """Drop the memory maps (they are unmapped once no gathered view refers to them)."""
        self._shards = []
        self._starts = np.zeros(1, np.int64)
