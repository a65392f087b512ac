"""The write pipeline: build an index, then add, remove and compact, each as one new generation.

**build** (:func:`build_index`, :mod:`crossrank.write.build`) discovers the source's files, decodes
and encodes them (:mod:`crossrank.ingest`, :mod:`crossrank.encoders`) and writes the first
generation: vectors, patch shards, metadata parts and the FAISS first stage
(:mod:`crossrank.store`). **build_from_arrays** (:mod:`crossrank.write.arrays`) writes the same
generation from pooled vectors, patches and a metadata table a search backend already has.

Every operation holds the index's writer lock (a second writer gets :class:`IndexLockedError`
naming the first), writes a complete generation beside the current one and commits it by the
atomic manifest switch of :class:`~crossrank.store.GenerationWriter`. Readers are never blocked:
an open :class:`~crossrank.Index` keeps the generation it holds until it calls ``refresh()``.

* **add** compares the source with the index by content (:func:`~crossrank.ingest.plan_add`),
  encodes only the new files and gives them new ids. The new generation hard-links the previous
  one's patch shards and metadata parts and appends new ones; the FAISS index, ``vectors.npy`` and
  ``ids.npy`` are rewritten (FAISS has no append-in-place file format: O(n) bytes, a few KB per
  image, versus the patches' tens of KB per image). A moved file keeps its id: the metadata part
  holding it is rewritten with the new path.
* **remove** writes a generation that links every file of the previous one and adds the removed
  ids to ``tombstones.npy``: one small file. Searches, metadata and counts exclude tombstones.
* **compact** rewrites patches, vectors, metadata and the FAISS index (retrained, for IVF) without
  the tombstones and with full shards and parts, then deletes the old generations no reader holds.

An interrupted operation leaves the last committed generation as it was; running it again does
the whole job once (add finds what is already indexed, remove what is already removed).
Ids are never reused: a generation records the next free id.
"""

from crossrank.write.add import add_images
from crossrank.write.arrays import build_from_arrays
from crossrank.write.build import BuildReport, build_index
from crossrank.write.compact import compact_index
from crossrank.write.remove import remove_images
from crossrank.write.reports import AddReport, CompactReport, PhaseProgressFn, RemoveReport

__all__ = [
    "AddReport",
    "BuildReport",
    "build_index",
    "build_from_arrays",
    "RemoveReport",
    "CompactReport",
    "PhaseProgressFn",
    "add_images",
    "remove_images",
    "compact_index",
]
