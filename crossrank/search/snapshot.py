"""One opened generation of an index: everything a search reads, pinned against deletion.

An :class:`~crossrank.Index` holds one :class:`Snapshot` at a time and each search takes the
snapshot it starts with to its end, so every result comes from one generation even while
``Index.refresh()`` swaps in a newer one. A snapshot pins its generation (see
:mod:`crossrank.store.pins`) until it is closed, so a writer never deletes it underneath.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from crossrank.indexes import FirstStage
    from crossrank.store import Generation, Manifest, MetadataStore, PatchStore, ReaderPin

__all__ = ["Snapshot"]

logger = logging.getLogger(__name__)


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
        self, root: Path, *, device: str, nprobe: int | None, reuse: Snapshot | None = None
    ) -> None:
        from crossrank.indexes import FirstStage, IndexConfig
        from crossrank.store import Generation, pin_current

        manifest, pin = pin_current(root)
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

    def close(self) -> None:
        """Close the metadata store and the patch maps and release the pin; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.metadata.close()
        self.patches.close()
        self.pin.release()
        logger.debug("closed generation %d of %s", self.number, self.manifest.root)
