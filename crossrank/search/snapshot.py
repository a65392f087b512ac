"""One opened generation of an index: everything a search reads, pinned against deletion.

An :class:`~crossrank.Index` holds one :class:`Snapshot` at a time and each search takes the
snapshot it starts with to its end, so every result comes from one generation even while
``Index.refresh()`` swaps in a newer one. A snapshot pins its generation (see
:mod:`crossrank.store.pins`) until it is closed, so a writer never deletes it underneath.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from crossrank.indexes import AllowedSelector, FirstStage
    from crossrank.store import Generation, Manifest, MetadataStore, PatchStore, ReaderPin
    from crossrank.store.filters import Filters

__all__ = ["Snapshot", "FILTER_CACHE_ENTRIES", "FILTER_CACHE_BYTES", "filter_key"]

logger = logging.getLogger(__name__)

#: Allowed-id sets a snapshot keeps, one per distinct ``where`` / ``filters`` (least recently
#: used dropped first).
FILTER_CACHE_ENTRIES = 32
#: Bytes of allowed ids a snapshot keeps at most, with their FAISS selectors (8 bytes an id,
#: 8 more for its position, and a bitmap of one bit per indexed vector: 1M ids of a 1M-vector
#: index are about 16 MB).
FILTER_CACHE_BYTES = 64 << 20


class _Allowed:
    """One cached filter: its allowed ids and, once a FAISS search used them, their selector."""

    __slots__ = ("ids", "selector")

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self.selector: AllowedSelector | None = None

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes) + (0 if self.selector is None else self.selector.nbytes)


def _plain(value: object) -> bool:
    """Whether ``value`` is plain JSON (str-keyed dicts, lists, tuples, str, numbers, bool, None):
    only then does its JSON text say everything the filter compiler sees."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _normalise_where(where: str) -> str:
    """``where`` stripped, with runs of whitespace outside quotes made one space (a comment is
    left as it is: there a newline ends it)."""
    where = where.strip()
    if "--" in where or "/*" in where:
        return where
    out: list[str] = []
    quote = ""
    space = False
    for ch in where:
        if quote:
            out.append(ch)
            if ch == quote:  # a doubled quote closes and reopens: still inside
                quote = ""
            continue
        if ch.isspace():
            space = True
            continue
        if space:
            out.append(" ")
            space = False
        if ch in "'\"":
            quote = ch
        out.append(ch)
    return "".join(out)


def filter_key(where: str | None, filters: Filters | None) -> tuple[str, str] | None:
    """The cache key of a filter: the normalised ``where`` and the canonical JSON of ``filters``
    (sorted keys); None when the filter is not plain enough to be keyed safely (a ``where`` that
    is not a string, filters holding anything but JSON values): such a filter is not cached."""
    if where is not None and not isinstance(where, str):
        return None
    if filters is not None and not _plain(filters):
        return None
    try:
        text = "" if filters is None else json.dumps(filters, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None
    # A leading marker keeps "no where" apart from any where text, and "no filters" from {}.
    return (
        "-" if where is None else "w" + _normalise_where(where),
        "-" if filters is None else "f" + text,
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class Snapshot:
    """The current generation of an index directory, opened for searching and pinned.

    Args:
        root: the index directory.
        device: where the first stage searches (``auto`` uses a GPU copy when there is one).
        nprobe: IVF lists probed per query; None: the index's own.
        reuse: an earlier snapshot of the same directory: its first stage is kept when the new
            generation hard-links the same FAISS file (after a removal) instead of being loaded
            again.
        pinned: ``(manifest, pin)`` of a generation the caller chose and pinned, opened instead
            of the current one; the snapshot owns the pin from then on (released on failure).

    Attributes:
        manifest: the manifest naming this generation.
        generation: the :class:`~crossrank.store.Generation`.
        first_stage: the FAISS first stage (removed images included: searches exclude them).
        patches: the memory-mapped patch store.
        metadata: the metadata store.
        ids: the id table, int64 ``(rows,)``; vectors: float32 ``(rows, D)``, memory-mapped.
        tombstones: the removed ids, int64 sorted.
        live_ids: the ids a search may return, sorted; None when nothing was removed (all rows).
        users: searches using the snapshot now (kept by the Index).
        retired: the Index moved on; the last user closes the snapshot.

    Raises:
        IndexNotFoundError: no committed index in ``root``.
        IndexCorruptError: the current generation cannot be opened.
    """

    def __init__(
        self,
        root: Path,
        *,
        device: str,
        nprobe: int | None,
        reuse: Snapshot | None = None,
        pinned: tuple[Manifest, ReaderPin] | None = None,
    ) -> None:
        from crossrank.indexes import FirstStage, IndexConfig
        from crossrank.store import Generation, pin_current

        # A shard of a sharded index opens the generation shards.json names, not its current one.
        manifest, pin = pinned if pinned is not None else pin_current(root)
        try:
            generation = Generation.open(manifest.generation_path)
            if reuse is not None and _same_file(
                reuse.generation.first_stage_path, generation.first_stage_path
            ):
                first_stage = reuse.first_stage  # immutable and shared: the same FAISS file
            else:
                first = manifest.first_stage
                config = IndexConfig(
                    factory=first.get("factory"),
                    device=device,
                    nprobe=nprobe or int(first.get("nprobe") or 16),
                )
                first_stage = FirstStage.load(generation.first_stage_path, config)
            patches = generation.patches()
            metadata = generation.metadata()
            try:
                ids, vectors = generation.ids(), generation.vectors()
                tombstones = generation.tombstones()
            except BaseException:
                metadata.close()
                raise
        except BaseException:
            pin.release()
            raise
        self.manifest: Manifest = manifest
        self.generation: Generation = generation
        self.first_stage: FirstStage = first_stage
        self.patches: PatchStore = patches
        self.metadata: MetadataStore = metadata
        self.ids: np.ndarray = ids
        self.vectors: np.ndarray = vectors
        self.tombstones: np.ndarray = tombstones
        self.live_ids: np.ndarray | None = (
            np.asarray(ids)[~np.isin(ids, tombstones, assume_unique=True)]
            if tombstones.size
            else None
        )
        self.pin: ReaderPin = pin
        self.users = 0
        self.retired = False
        self._closed = False
        # Allowed ids (and their selectors) per filter, for this generation only: a new snapshot
        # starts empty. _by_array finds an entry from the array allowed_ids() handed out.
        self._allowed: OrderedDict[tuple[str, str], _Allowed] = OrderedDict()
        self._by_array: dict[int, _Allowed] = {}
        self._allowed_bytes = 0
        self._allowed_lock = threading.Lock()
        self._live_selector: AllowedSelector | None = None

    @property
    def number(self) -> int:
        """The generation number."""
        return self.manifest.generation

    def __len__(self) -> int:
        """Images a search can return (removed ones excluded)."""
        return int(self.ids.shape[0] if self.live_ids is None else self.live_ids.shape[0])

    def without_tombstones(self, ids: np.ndarray) -> np.ndarray:
        """``ids`` (sorted) minus the removed ones."""
        if not self.tombstones.size or not ids.size:
            return ids
        return ids[~np.isin(ids, self.tombstones, assume_unique=True)]

    def allowed_ids(self, where: str | None, filters: Filters | None) -> np.ndarray:
        """The ids matching ``where`` and ``filters``, removed images excluded, sorted.

        The first call for a filter asks DuckDB (:meth:`MetadataStore.allowed_ids`); later calls
        with the same filter (same :func:`filter_key`) return the same read-only array from a
        small least-recently-used cache (``FILTER_CACHE_ENTRIES`` sets, ``FILTER_CACHE_BYTES``
        in all, selectors included) that lives and dies with this snapshot. A filter that fails
        is not cached.

        Raises:
            FilterError: as :meth:`MetadataStore.allowed_ids`.
        """
        key = filter_key(where, filters)
        if key is not None:
            with self._allowed_lock:
                entry = self._allowed.get(key)
                if entry is not None:
                    self._allowed.move_to_end(key)
                    return entry.ids
        ids = self.without_tombstones(self.metadata.allowed_ids(where, filters=filters))
        ids.flags.writeable = False  # shared by every search with this filter
        if key is not None and ids.nbytes <= FILTER_CACHE_BYTES:
            with self._allowed_lock:
                raced = self._allowed.get(key)
                if raced is not None:  # another thread asked DuckDB too: share its array
                    self._allowed.move_to_end(key)
                    return raced.ids
                entry = _Allowed(ids)
                self._allowed[key] = entry
                self._by_array[id(ids)] = entry
                self._allowed_bytes += entry.nbytes
                self._shrink(keep=entry)
        return ids

    def selector(self, allowed: np.ndarray) -> AllowedSelector:
        """``allowed`` made ready for the first stage (:meth:`FirstStage.select`), made once per
        cached filter.

        ``allowed`` is what :meth:`allowed_ids` returned (or :attr:`live_ids`): while that filter
        is in the cache, its selector is made by the first search that needs one and kept with
        its ids (counted in ``FILTER_CACHE_BYTES``, dropped with them). Any other array gets a
        selector made for this call. Thread-safe: threads racing on a new filter may each make
        one, and all of them get the one kept.
        """
        with self._allowed_lock:
            if allowed is self.live_ids and self._live_selector is not None:
                return self._live_selector
            entry = self._by_array.get(id(allowed))
            if entry is not None and entry.ids is allowed and entry.selector is not None:
                return entry.selector
        made = self.first_stage.select(allowed)
        with self._allowed_lock:
            if allowed is self.live_ids:
                if self._live_selector is None:
                    self._live_selector = made
                return self._live_selector
            entry = self._by_array.get(id(allowed))
            if entry is None or entry.ids is not allowed:  # not cached (or dropped meanwhile)
                return made
            if entry.selector is None:
                entry.selector = made
                self._allowed_bytes += made.nbytes
                self._shrink(keep=entry)
                return made
            return entry.selector

    def _drop(self, entry: _Allowed | None) -> None:
        """Forget a cache entry's bytes and array (the lock held)."""
        if entry is None:
            return
        self._allowed_bytes -= entry.nbytes
        if self._by_array.get(id(entry.ids)) is entry:
            del self._by_array[id(entry.ids)]

    def _shrink(self, keep: _Allowed | None = None) -> None:
        """Drop least recently used entries until the cache is within its bounds (the lock
        held), never ``keep`` (the entry just added to); if ``keep`` alone is over the byte
        bound, its selector goes (it is made per call then)."""
        while len(self._allowed) > FILTER_CACHE_ENTRIES or self._allowed_bytes > FILTER_CACHE_BYTES:
            victim = next((key for key, e in self._allowed.items() if e is not keep), None)
            if victim is None:
                break
            self._drop(self._allowed.pop(victim))
        over = self._allowed_bytes > FILTER_CACHE_BYTES
        if over and keep is not None and keep.selector is not None:
            self._allowed_bytes -= keep.selector.nbytes
            keep.selector = None

    def close(self) -> None:
        """Close the metadata store and the patch maps and release the pin; idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._allowed_lock:
            self._allowed.clear()
            self._by_array.clear()
            self._allowed_bytes = 0
            self._live_selector = None
        self.metadata.close()
        self.patches.close()
        self.pin.release()
        logger.debug("closed generation %d of %s", self.number, self.manifest.root)
