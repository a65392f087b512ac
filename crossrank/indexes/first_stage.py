"""The first stage: a FAISS inner-product index over the pooled image vectors, with int64 ids."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.errors import IndexCorruptError, IndexNotFoundError, InvalidArgumentError
from crossrank.indexes._checks import PAD_ID, PAD_SCORE, as_ids, as_vectors, check_k, finish_results
from crossrank.indexes._faiss import faiss_reason, import_faiss
from crossrank.indexes.config import IndexConfig
from crossrank.indexes.factory import auto_factory, create_index, describe_index
from crossrank.indexes.gpu import GPU_MAX_K, GPU_MAX_NPROBE, GpuCopy, gpu_device_for, to_gpu
from crossrank.indexes.selectors import make_selector, search_params, selector_bytes

__all__ = [
    "FirstStage",
    "AllowedSelector",
    "IN_MEMORY_MAX_BYTES",
    "EXACT_MAX_BYTES",
    "FILTER_LIST_FACTOR",
    "FILTER_MAX_LIST_SHARE",
    "EXACT_SCAN_RATIO",
    "in_memory_limit",
]

logger = logging.getLogger(__name__)

#: Vectors converted to float32 and added per call at build (bounds the copy of a memory-mapped xb).
_ADD_BLOCK = 1 << 16

#: An index file up to this size is read into memory by :meth:`FirstStage.load` (unless a quarter
#: of the machine's memory is less); a larger one is memory-mapped. A read index searches about
#: ten times faster than a mapped one whose pages are faulted in as lists are probed.
IN_MEMORY_MAX_BYTES = 2 << 30

#: Bytes of allowed vectors (float32) that :meth:`FirstStage.prefers_exact` lets an exact search
#: gather at most (4,096 vectors of dim 512); a larger allowed set is always searched by FAISS.
#: At 100k vectors of dim 512, gathering and scoring 4,000 rows costs about what an IVF1265
#: search of every list does.
EXACT_MAX_BYTES = 8 << 20

#: Under a filter keeping a fraction ``f`` of the vectors, an IVF search probes
#: ``FILTER_LIST_FACTOR * nprobe / f`` lists (see :meth:`FirstStage.filtered_nprobe`) ...
FILTER_LIST_FACTOR = 2.5
#: ... but never more than this share of the lists (unless ``nprobe`` itself is more). Chosen on
#: ``benchmarks/bench_filtered.py`` (seed 0, 100k vectors, IVF1265): 2.5 * 16 / 10 % = 400 lists
#: give recall@10 0.995 where 160 gave 0.970; half the lists give 0.999 at 10 % kept and 0.996 at
#: 1 % kept, where every list costs twice as much for 1.000.
FILTER_MAX_LIST_SHARE = 0.5
#: An IVF search under a filter scores the allowed vectors exactly instead when they are at most
#: ``1 / EXACT_SCAN_RATIO`` of the list entries FAISS would test (see
#: :meth:`FirstStage.prefers_exact`).
EXACT_SCAN_RATIO = 32


class AllowedSelector:
    """A filter's allowed ids made ready for one :class:`FirstStage`: the sorted internal
    positions and the FAISS ``IDSelector`` over them (:mod:`crossrank.indexes.selectors`).

    Made by :meth:`FirstStage.select`; pass it as ``allowed_ids`` to :meth:`FirstStage.search`
    to skip the id-to-position look-up and the selector construction a plain id array costs on
    every call. It is immutable and may be shared by threads: searches only read the selector.

    Attributes:
        positions: int64 sorted internal positions of the allowed ids found in the index
            (read-only).
        selector: the ``IDSelector``; None when every vector is allowed or none is.
        nbytes: bytes it holds (positions and any bitmap), for cache accounting.
    """

    __slots__ = ("_stage", "positions", "selector", "nbytes")

    def __init__(self, stage: FirstStage, positions: np.ndarray, selector: Any | None) -> None:
        positions.flags.writeable = False
        self._stage = stage
        self.positions = positions
        self.selector = selector
        self.nbytes = int(positions.nbytes) + selector_bytes(selector, len(positions))

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    def __repr__(self) -> str:
        kind = "none" if self.selector is None else type(self.selector).__name__
        return f"AllowedSelector({len(self)} positions, {kind})"


class FirstStage:
    """A FAISS inner-product index over L2-normalised vectors, searched by external int64 ids.

    The index is an ``IndexIDMap`` around the factory's index (see :func:`auto_factory` for the
    choice by size). Searches map positions to ids on the host, so that a pre-filter can be handed
    to the innermost index as a selector over positions (see :mod:`crossrank.indexes.selectors`).

    With faiss-gpu and a CUDA device (``config.device`` ``auto`` or ``cuda[:N]``), unfiltered
    searches run on a GPU copy; filtered searches, ``k`` or ``nprobe`` above 2048, and index types
    without a GPU implementation run on the CPU index, which is always kept. Results are the same
    either way, up to float rounding.

    Thread safety: any number of threads may call :meth:`search` at once. Search settings
    (``nprobe``, ``ef_search``, the selector) travel in per-call ``SearchParameters``; nothing is
    written to the shared FAISS index after it is built or loaded.

    Use :meth:`build` or :meth:`load` to make one.

    Example:
        >>> xb = np.eye(4, dtype=np.float32)
        >>> stage = FirstStage.build(xb, np.array([10, 11, 12, 13]))
        >>> D, I = stage.search(xb[:1], k=2, allowed_ids=np.array([11, 13]))
        >>> I.tolist(), D.tolist()
        ([[11, 13]], [[0.0, 0.0]])
    """

    def __init__(
        self, index: Any, config: IndexConfig, factory: str, faiss: Any, *, mapped: bool = False
    ) -> None:
        """Wrap a built ``IndexIDMap`` (use :meth:`build` or :meth:`load` instead)."""
        self._faiss = faiss
        self._index = index  # the CPU IndexIDMap: what save() writes; owns _base
        self._base = faiss.downcast_index(index.index)  # searched directly: positions, not ids
        self._mapped = mapped  # loaded with IO_FLAG_MMAP: parts of it are read-only file maps
        self._map_ids()
        self.config = config
        self._factory = factory
        self._nprobe = config.nprobe
        self._gpu: GpuCopy | None = None
        device = gpu_device_for(config.device, faiss)
        if device is not None and index.ntotal > 0:
            self._gpu = to_gpu(faiss, self._base, device)

    def _map_ids(self) -> None:
        # (ntotal,) int64: the external id of each internal position
        self._id_map = self._faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
        if np.all(self._id_map[1:] > self._id_map[:-1]):
            self._sorted_ids, self._order = self._id_map, None
        else:
            self._order = np.argsort(self._id_map, kind="stable")
            self._sorted_ids = self._id_map[self._order]

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls, xb: np.ndarray, ids: np.ndarray, config: IndexConfig | None = None
    ) -> FirstStage:
        """Build the index over ``xb``, trained on a seeded sample when the index type needs it.

        Args:
            xb: float ``(n, d)`` L2-normalised vectors (coerced to float32; a memory map is read in
                blocks while adding).
            ids: int64 ``(n,)`` unique, non-negative id of each row.
            config: index type, training and device settings; ``IndexConfig()`` when ``None``.

        Returns:
            The built first stage.

        Raises:
            InvalidArgumentError: bad shapes, non-finite values, duplicate or negative ids, a bad
                factory string, or an index FAISS cannot train on this many vectors.
            DependencyError: faiss is not installed.
        """
        config = config or IndexConfig()
        faiss = import_faiss()
        xb = _as_database(xb)
        n, d = xb.shape
        ids = as_ids(ids, "ids", n)
        if n > 1 and not np.all(ids[1:] > ids[:-1]) and len(np.unique(ids)) != n:
            raise InvalidArgumentError("ids must be unique, but some id appears twice")
        _warn_unnormalised(xb)
        factory = auto_factory(n, config)
        index = create_index(faiss, d, factory)
        if not index.is_trained:
            _train(faiss, index, xb, factory, config)
        try:
            for i0 in range(0, n, _ADD_BLOCK):
                block = np.ascontiguousarray(xb[i0 : i0 + _ADD_BLOCK], dtype=np.float32)
                index.add_with_ids(block, ids[i0 : i0 + _ADD_BLOCK])
        except RuntimeError as e:
            raise InvalidArgumentError(
                f"FAISS could not add {n} vectors to a {factory!r} index: {faiss_reason(e)}"
            ) from e
        logger.info("built a %s first stage over %d vectors of dim %d", factory, n, d)
        return cls(index, config, factory, faiss)

    @classmethod
    def load(
        cls, path: str | Path, config: IndexConfig | None = None, *, mmap: bool | None = None
    ) -> FirstStage:
        """Read an index written by :meth:`save`.

        By default a file up to :func:`in_memory_limit` bytes (2 GiB, or a quarter of the
        machine's memory if that is less) is read into memory, where a search runs about ten
        times faster than on a mapped file; a larger one has its IVF inverted lists memory-mapped
        (``IO_FLAG_MMAP``), so opening is fast, memory holds only the lists probed, and the file
        must stay in place (index generations are immutable, so it does).

        Args:
            path: the ``.faiss`` file.
            config: search settings (``nprobe``, ``device``, ``ef_search``); its ``factory`` names
                the index when given, else the name is read off the index structure.
            mmap: ``True`` memory-maps what FAISS can; ``False`` reads the whole index into
                memory, which :meth:`add` needs (a mapped index is read-only); ``None`` decides by
                the file's size (see above).

        Returns:
            The loaded first stage.

        Raises:
            IndexNotFoundError: there is no file at ``path``.
            IndexCorruptError: the file is not a FAISS index with ids and inner-product metric.
            DependencyError: faiss is not installed.
        """
        config = config or IndexConfig()
        faiss = import_faiss()
        path = Path(path)
        if not path.is_file():
            raise IndexNotFoundError(
                f"no first-stage index at {path}; build one with `crossrank build`"
            )
        if mmap is None:
            mmap = path.stat().st_size > in_memory_limit()
        mapped = mmap
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        except RuntimeError:
            mapped = False
            try:  # an index type the mmap reader does not handle: read it whole
                index = faiss.read_index(str(path))
            except RuntimeError as e:
                raise IndexCorruptError(
                    f"cannot read the first stage {path}: {faiss_reason(e)}"
                ) from e
        if not isinstance(index, faiss.IndexIDMap):
            raise IndexCorruptError(
                f"{path} holds a FAISS {type(index).__name__} without "
                "ids (expected an IndexIDMap); rebuild the index"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise IndexCorruptError(
                f"{path} uses FAISS metric {index.metric_type}, "
                "not inner product; rebuild the index"
            )
        factory = config.factory.strip() if config.factory else describe_index(faiss, index)
        return cls(index, config, factory, faiss, mapped=mapped)

    def add(self, xb: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under new ids, with the index's existing training (IVF centroids, codes).

        Adding does not retrain: after many additions an IVF index built on other data balances
        its lists worse; a rebuild (``crossrank compact``) retrains it.

        Args:
            xb: float ``(n, d)`` L2-normalised vectors (a memory map is read in blocks).
            ids: int64 ``(n,)`` unique ids, none already in the index.

        Raises:
            InvalidArgumentError: bad shapes or values, ids already present, or an index loaded
                with ``mmap=True`` (load it with ``mmap=False`` to add to it).
        """
        if self._mapped:
            raise InvalidArgumentError(
                "this first stage was loaded memory-mapped, which is read-only; "
                "load it with FirstStage.load(path, mmap=False) to add vectors"
            )
        xb = _as_database(xb)
        n = len(xb)
        ids = as_ids(ids, "ids", n)
        as_vectors(xb[:1], "xb", self.d)  # the dim check and its message
        if n > 1 and len(np.unique(ids)) != n:
            raise InvalidArgumentError("ids must be unique, but some id appears twice")
        taken = np.isin(ids, self._sorted_ids)
        if taken.any():
            raise InvalidArgumentError(
                f"id {int(ids[taken][0])} is already in the first stage; ids are never reused"
            )
        _warn_unnormalised(xb)
        try:
            for i0 in range(0, n, _ADD_BLOCK):
                block = np.ascontiguousarray(xb[i0 : i0 + _ADD_BLOCK], dtype=np.float32)
                self._index.add_with_ids(block, ids[i0 : i0 + _ADD_BLOCK])
        except RuntimeError as e:
            raise InvalidArgumentError(
                f"FAISS could not add {n} vectors to a {self.factory!r} index: {faiss_reason(e)}"
            ) from e
        self._map_ids()
        if self._gpu is not None:  # the GPU copy is a snapshot: make a new one
            self._gpu = to_gpu(self._faiss, self._base, self._gpu.device)

    def save(self, path: str | Path) -> None:
        """Write the CPU index (ids included) to ``path`` with ``faiss.write_index``.

        Raises:
            InvalidArgumentError: the file cannot be written (FAISS's reason in the message).
        """
        try:
            self._faiss.write_index(self._index, str(path))
        except RuntimeError as e:
            raise InvalidArgumentError(
                f"cannot write the first stage to {path}: {faiss_reason(e)}"
            ) from e

    # -- properties -----------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Vectors in the index."""
        return int(self._index.ntotal)

    @property
    def d(self) -> int:
        """Vector dimension."""
        return int(self._index.d)

    @property
    def factory(self) -> str:
        """The FAISS factory string of the index (without the ``IDMap``)."""
        return self._factory

    @property
    def on_gpu(self) -> bool:
        """Whether unfiltered searches run on a GPU copy."""
        return self._gpu is not None

    @property
    def mapped(self) -> bool:
        """Whether the index was loaded memory-mapped (read-only) rather than read into memory."""
        return self._mapped

    @property
    def nlist(self) -> int | None:
        """IVF lists, or ``None`` for an index without inverted lists."""
        ivf = self._faiss.try_extract_index_ivf(self._base)
        return None if ivf is None else int(ivf.nlist)

    @property
    def nprobe(self) -> int:
        """Default IVF lists scanned per query (``search(..., nprobe=)`` overrides it per call)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = check_nprobe(value)

    @property
    def info(self) -> dict[str, Any]:
        """A JSON-able description for the index manifest."""
        return {
            "factory": self.factory,
            "metric": "inner_product",
            "d": self.d,
            "ntotal": self.ntotal,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "faiss_version": self._faiss.__version__,
        }

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        where = f"cuda:{self._gpu.device}" if self._gpu else "cpu"
        return (
            f"FirstStage(factory={self.factory!r}, ntotal={self.ntotal}, d={self.d}, "
            f"nprobe={self.nprobe}, on={where})"
        )

    # -- search ---------------------------------------------------------------------------------

    def select(self, allowed_ids: np.ndarray) -> AllowedSelector:
        """The allowed ids as positions and a FAISS selector, ready for many searches.

        A search given ``allowed_ids`` as an array does this on every call (a search-sorted
        look-up of each id, and a bitmap of :attr:`ntotal` bits); a caller that repeats a filter
        makes it once and passes the result instead (:mod:`crossrank.search.snapshot` keeps one
        per cached filter).

        Args:
            allowed_ids: int64 ids that may be returned (any order; ids not in the index are
                ignored).

        Returns:
            An :class:`AllowedSelector` that only this first stage accepts.

        Raises:
            InvalidArgumentError: ``allowed_ids`` is not a 1-d array of integer ids.
        """
        positions = self._positions(allowed_ids)
        selector = None
        if len(positions):
            selector = make_selector(self._faiss, positions, self.ntotal)
        return AllowedSelector(self, positions, selector)

    def search(
        self,
        xq: np.ndarray,
        k: int,
        *,
        allowed_ids: np.ndarray | AllowedSelector | None = None,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best vectors by inner product for each query, optionally among allowed ids.

        Args:
            xq: float ``(m, d)`` normalised queries (coerced to float32, C-contiguous).
            k: results per query, >= 1.
            allowed_ids: int64 ``(s,)`` ids that may be returned (sorted ascending is fastest;
                ids not in the index are ignored), or what :meth:`select` made of them (no
                per-call look-up); ``None`` allows all. On IVF indexes only the probed lists are
                searched, so a selective filter can leave fewer than ``k`` hits: for small
                allowed sets, :func:`exact_search` over their vectors is exact and faster.
            nprobe: IVF lists to scan for this call; ``None`` uses :attr:`nprobe`.

        Returns:
            ``(D, I)``: float32 ``(m, k)`` scores and int64 ``(m, k)`` ids, best first, ties by id;
            where fewer than ``k`` vectors qualify the row is padded with id ``-1``, score ``-inf``.

        Raises:
            InvalidArgumentError: ``xq`` of the wrong shape or dim, ``k < 1``, ``nprobe < 1``, bad
                ``allowed_ids`` (or a selector made by another first stage), or an index type
                that cannot search with a selector.
        """
        k = check_k(k)
        xq = as_vectors(xq, "xq", self.d)
        nprobe = self._nprobe if nprobe is None else check_nprobe(nprobe)
        m = len(xq)
        empty = (
            np.full((m, k), PAD_SCORE, dtype=np.float32),
            np.full((m, k), PAD_ID, dtype=np.int64),
        )
        positions = None
        sel = None
        if allowed_ids is not None:
            if not isinstance(allowed_ids, AllowedSelector):
                allowed_ids = self.select(allowed_ids)
            elif allowed_ids._stage is not self:
                raise InvalidArgumentError(
                    "allowed_ids was selected on another first stage (its positions would not "
                    "match this index); make it with this stage's select()"
                )
            positions, sel = allowed_ids.positions, allowed_ids.selector
            if len(positions) == 0:
                return empty
        if m == 0 or self.ntotal == 0:
            return empty
        if sel is None and self._gpu is not None and k <= GPU_MAX_K and nprobe <= GPU_MAX_NPROBE:
            params = search_params(
                self._faiss, self._base, nprobe=nprobe, ef_search=None, sel=None, gpu=True
            )
            with self._gpu.lock:
                D, P = self._gpu.index.search(xq, k, params=params)
        else:
            params = search_params(
                self._faiss, self._base, nprobe=nprobe, ef_search=self.config.ef_search, sel=sel
            )
            try:
                D, P = self._base.search(xq, k, params=params)
            except RuntimeError as e:
                what = "a filtered search" if sel is not None else "this search"
                raise InvalidArgumentError(
                    f"the {self.factory!r} index cannot run {what}: {faiss_reason(e)}; "
                    "use exact_search over the allowed vectors, or an index type such as 'Flat' "
                    "or 'IVF256,Flat'"
                ) from e
        if sel is not None:
            P = self._drop_outside(P, positions)
        I = np.where(P >= 0, self._id_map[np.maximum(P, 0)], PAD_ID)
        return finish_results(D, I)

    def filtered_nprobe(self, n_allowed: int, *, nprobe: int | None = None) -> int:
        """IVF lists to probe for a search among ``n_allowed`` of the :attr:`ntotal` vectors.

        A filter that allows a fraction ``f`` of the vectors leaves about ``f`` of each probed
        list to score, and the ``k`` best allowed vectors lie about ``1 / f`` times deeper in the
        ranking than the ``k`` best of all, so a filtered search must probe more lists than an
        unfiltered one. It probes ``FILTER_LIST_FACTOR * nprobe / f`` lists (2.5 times the lists
        that scan as many allowed vectors as the unfiltered search scans vectors), at most
        ``FILTER_MAX_LIST_SHARE`` of :attr:`nlist` (half), never fewer than ``nprobe``.

        Deeper neighbours need more lists, but fewer than in proportion: on the synthetic data of
        ``benchmarks/bench_filtered.py`` (IVF1265, 100k vectors) recall@10 0.99 takes about 160
        lists unfiltered, 300 to 400 under a filter keeping 10 %, 500 under one keeping 1 %.
        The factor lifts a small ``nprobe`` to that depth (16 lists: 400 under a 10 % filter,
        recall 0.995 where ``nprobe / f`` gave 0.970); the cap keeps a large one from probing
        every list for recall it already has (half the lists: 0.999 at 10 %). Indexes without
        lists return ``nprobe`` unchanged.

        Args:
            n_allowed: ids the filter allows.
            nprobe: the unfiltered nprobe; ``None`` uses :attr:`nprobe`.

        Returns:
            The lists to probe, from ``nprobe`` (at most :attr:`nlist`) to :attr:`nlist`.
        """
        base = self._nprobe if nprobe is None else check_nprobe(nprobe)
        nlist = self.nlist
        if nlist is None:
            return base
        if n_allowed <= 0 or n_allowed >= self.ntotal:
            return min(base, nlist)
        scaled = math.ceil(FILTER_LIST_FACTOR * base * self.ntotal / n_allowed)
        cap = math.ceil(FILTER_MAX_LIST_SHARE * nlist)
        return max(1, min(nlist, max(base, min(scaled, cap))))

    def prefers_exact(self, n_allowed: int, k: int, *, nprobe: int | None = None) -> bool:
        """Whether :func:`exact_search` over the allowed vectors beats a filtered :meth:`search`.

        * Flat: never; its filtered search is already exact and scores only the allowed rows.
        * IVF: when the allowed vectors are at most ``1 / EXACT_SCAN_RATIO`` (a 32nd) of the
          list entries the filtered search (:meth:`filtered_nprobe` lists) would test against
          its selector: gathering and scoring a vector costs about what testing 32 entries and
          scoring the allowed ones among them does (measured on the data of
          ``benchmarks/bench_filtered.py``: at 100k vectors of dim 512 and 633 of 1265 lists,
          the first stage costs 0.43 ms exact and 0.56 ms by FAISS at 1,000 allowed vectors,
          1.03 and 0.74 ms at 3,000; they cross between 1,500 and 2,000, and a 32nd of the 50,000
          entries is 1,582). Also when the allowed vectors expected in the probed lists are
          fewer than ``4 * k`` (the filtered search would likely come back short). Never when
          the allowed vectors, as float32, exceed ``EXACT_MAX_BYTES`` (8 MB): gathering them
          costs more than FAISS scanning every list.
        * HNSW: when fewer than 10 % of the vectors are allowed: a filtered graph walk stalls
          among disallowed nodes and comes back short.
        * Other types (PQ codes, types without selector support): always.

        Args:
            n_allowed: ids the filter allows.
            k: results wanted per query.
            nprobe: the unfiltered nprobe the search would use; ``None`` uses :attr:`nprobe`.

        Returns:
            True when the caller should score the allowed vectors exactly.
        """
        faiss = self._faiss
        if isinstance(self._base, faiss.IndexFlat):
            return False
        ivf = faiss.try_extract_index_ivf(self._base)
        if ivf is not None:
            if n_allowed * self.d * 4 > EXACT_MAX_BYTES:
                return False
            probed = self.filtered_nprobe(n_allowed, nprobe=nprobe)
            tested = probed * self.ntotal / ivf.nlist  # list entries the selector would test
            if n_allowed * EXACT_SCAN_RATIO <= tested:
                return True
            return n_allowed * probed / ivf.nlist < 4 * k
        if isinstance(self._base, faiss.IndexHNSW):
            return n_allowed < 0.1 * self.ntotal
        return True

    def _positions(self, allowed_ids: np.ndarray) -> np.ndarray:
        """Sorted internal positions of the allowed ids that are in the index."""
        ids = as_ids(allowed_ids, "allowed_ids")
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            ids = np.unique(ids)
        pos = np.searchsorted(self._sorted_ids, ids)
        found = pos < len(self._sorted_ids)
        found[found] = self._sorted_ids[pos[found]] == ids[found]
        pos = pos[found]
        if self._order is not None:
            pos = np.sort(self._order[pos])
        return pos

    def _drop_outside(self, P: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Blank hits outside the allowed positions: guards index types that ignore selectors."""
        j = np.minimum(np.searchsorted(positions, P), len(positions) - 1)
        outside = (P >= 0) & (positions[j] != P)
        if outside.any():
            logger.warning(
                "the %r index ignored the id selector for %d hits; they were dropped",
                self.factory,
                int(outside.sum()),
            )
            P = np.where(outside, PAD_ID, P)
        return P


def _as_database(xb: np.ndarray) -> np.ndarray:
    """``xb`` checked as an ``(n, d)`` matrix of finite floats, without copying a float32 memmap."""
    arr = np.asarray(xb)
    if arr.ndim != 2 or arr.shape[1] < 1:
        raise InvalidArgumentError(f"xb must have shape (n, d) with d >= 1, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise InvalidArgumentError(f"xb must hold floats, got {arr.dtype}")
    for i0 in range(0, len(arr), _ADD_BLOCK):
        if not np.isfinite(arr[i0 : i0 + _ADD_BLOCK]).all():
            raise InvalidArgumentError("xb holds NaN or infinite values")
    return arr


def _warn_unnormalised(xb: np.ndarray) -> None:
    """Log a warning when the vectors are not unit length: inner product then is not cosine."""
    rows = xb[: min(len(xb), 1024)].astype(np.float32)
    if len(rows) and np.abs(np.linalg.norm(rows, axis=1) - 1.0).max() > 1e-3:
        logger.warning(
            "xb is not L2-normalised: inner-product scores will not be cosine similarities"
        )


def _train(faiss: Any, index: Any, xb: np.ndarray, factory: str, config: IndexConfig) -> None:
    """Train on a seeded random sample of at most ``config.train_size`` rows of ``xb``."""
    n = len(xb)
    n_train = min(n, config.train_size)
    if n_train < n:
        # Sorted rows: a memory-mapped xb is then read front to back.
        rows = np.sort(np.random.default_rng(config.seed).choice(n, size=n_train, replace=False))
        xt = np.ascontiguousarray(xb[rows], dtype=np.float32)
    else:
        xt = np.ascontiguousarray(xb, dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(faiss.downcast_index(index.index))
    if ivf is not None:
        ivf.cp.seed = config.seed
    try:
        index.train(xt)
    except RuntimeError as e:
        raise InvalidArgumentError(
            f"FAISS could not train a {factory!r} index on {n_train} vectors: {faiss_reason(e)}; "
            "use fewer IVF lists (e.g. 'IVF64,Flat') or 'Flat' for small corpora"
        ) from e


def in_memory_limit() -> int:
    """The largest index file :meth:`FirstStage.load` reads into memory by default:
    ``IN_MEMORY_MAX_BYTES``, or a quarter of the machine's physical memory if that is less."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not a POSIX system: the fixed cap alone
        return IN_MEMORY_MAX_BYTES
    return min(IN_MEMORY_MAX_BYTES, total // 4) if total > 0 else IN_MEMORY_MAX_BYTES


def check_nprobe(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise InvalidArgumentError(
            f"nprobe must be an int >= 1 (IVF lists scanned per query), got {value!r}"
        )
    return int(value)
