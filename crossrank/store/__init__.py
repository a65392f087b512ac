"""The index directory: manifest + immutable generations, the patch store, the metadata store.

    DIR/manifest.json          which generation is current (switched by atomic rename)
    DIR/gen-000003/            vectors.npy, ids.npy, patches-000.npy ..., metadata-000.parquet ...,
                               skipped.parquet, first_stage.faiss, generation.json,
                               tombstones.npy (removed ids, when there are any),
                               patch_codec.faiss (the pq patch codec's quantiser)
    DIR/writer.lock            the writer lock (flock): one build/add/remove/compact at a time
    DIR/readers/               reader pins: the generations live readers hold

Write with :class:`GenerationWriter` (it takes the :class:`WriterLock`); read with
``Generation.current(DIR)`` (or :func:`pin_current` + :class:`Generation` to keep writers from
deleting it); check with :func:`check_index` / :func:`check_generation` (``full=True`` also
compares every file with the sha256 recorded at commit; :func:`inspect_index` returns the notes
and what was hashed too). How patches are stored is the generation's patch codec
(:mod:`crossrank.store.codecs`; ``GenerationWriter(..., patch_codec="pq")``).
"""

from crossrank.store.check import (
    CheckReport,
    check_generation,
    check_index,
    inspect_generation,
    inspect_index,
)
from crossrank.store.codecs import PatchCodec, parse_codec
from crossrank.store.config import StoreConfig
from crossrank.store.gc import clean_interrupted, collect_garbage
from crossrank.store.generation import Generation
from crossrank.store.generation_writer import GenerationWriter
from crossrank.store.layout import FORMAT_VERSION, GenerationInfo, PartInfo, read_generation_info
from crossrank.store.lock import WriterLock, read_lock_holder
from crossrank.store.manifest import (
    GenerationDir,
    Manifest,
    current_generation_number,
    has_index,
    list_generations,
    list_tmp_dirs,
    read_manifest,
    write_manifest,
)
from crossrank.store.metadata import WHERE_HINT, MetadataStore, read_skipped
from crossrank.store.metadata_writer import MetadataWriter
from crossrank.store.patches import PatchStore, PatchWriter
from crossrank.store.pins import ReaderPin, live_pins, pin_current

__all__ = [
    "FORMAT_VERSION",
    "WHERE_HINT",
    "StoreConfig",
    "Manifest",
    "GenerationDir",
    "GenerationInfo",
    "PartInfo",
    "GenerationWriter",
    "Generation",
    "PatchWriter",
    "PatchStore",
    "PatchCodec",
    "parse_codec",
    "MetadataWriter",
    "MetadataStore",
    "WriterLock",
    "ReaderPin",
    "has_index",
    "current_generation_number",
    "read_manifest",
    "write_manifest",
    "read_generation_info",
    "read_skipped",
    "list_generations",
    "list_tmp_dirs",
    "CheckReport",
    "check_generation",
    "check_index",
    "inspect_generation",
    "inspect_index",
    "collect_garbage",
    "clean_interrupted",
    "live_pins",
    "pin_current",
    "read_lock_holder",
]
