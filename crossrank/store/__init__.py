"""The index directory: manifest + immutable generations, the patch store, the metadata store.

    DIR/manifest.json          which generation is current (switched by atomic rename)
    DIR/gen-000003/            vectors.npy, ids.npy, patches-000.npy ..., metadata-000.parquet ...,
                               skipped.parquet, first_stage.faiss, generation.json

Write with :class:`GenerationWriter`; read with ``Generation.current(DIR)`` (or
:func:`read_manifest` + :class:`PatchStore` / :class:`MetadataStore` directly); check with
:func:`check_index` / :func:`check_generation`.
"""

from crossrank.store.config import StoreConfig
from crossrank.store.generation import Generation, GenerationWriter, check_generation, check_index
from crossrank.store.layout import FORMAT_VERSION, GenerationInfo, PartInfo, read_generation_info
from crossrank.store.manifest import (
    GenerationDir,
    Manifest,
    has_index,
    list_generations,
    list_tmp_dirs,
    read_manifest,
    write_manifest,
)
from crossrank.store.metadata import WHERE_HINT, MetadataStore, read_skipped
from crossrank.store.metadata_writer import MetadataWriter
from crossrank.store.patches import PatchStore, PatchWriter

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
    "MetadataWriter",
    "MetadataStore",
    "has_index",
    "read_manifest",
    "write_manifest",
    "read_generation_info",
    "read_skipped",
    "list_generations",
    "list_tmp_dirs",
    "check_generation",
    "check_index",
]
