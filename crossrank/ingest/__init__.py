"""Ingestion: list the images of a folder or manifest, decode them robustly, batch them to encode.

    source = discover("photos/")                      # or a .parquet / .csv manifest with `path`
    for batch in iter_batches(source.items, batch_size=64, preprocess=encoder.preprocess):
        ...                                           # batch.records, batch.pixels, batch.skipped

A bad file never aborts a build: it becomes a :class:`SkippedFile` with a short reason.
:func:`plan_add` compares a source with an index by content for ``crossrank add``.
"""

from crossrank.ingest.changes import INDEXED_COLUMNS, AddPlan, file_sha256, plan_add
from crossrank.ingest.config import DEFAULT_MAX_PIXELS, IngestConfig
from crossrank.ingest.decode import ImageRecord, SkippedFile, decode_image, to_rgb
from crossrank.ingest.pipeline import Batch, Preprocess, iter_batches
from crossrank.ingest.sources import (
    IMAGE_EXTENSIONS,
    MANIFEST_EXTENSIONS,
    RESERVED_COLUMNS,
    Source,
    SourceItem,
    SourceKind,
    discover,
)

__all__ = [
    "AddPlan",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "INDEXED_COLUMNS",
    "MANIFEST_EXTENSIONS",
    "RESERVED_COLUMNS",
    "Batch",
    "ImageRecord",
    "IngestConfig",
    "Preprocess",
    "SkippedFile",
    "Source",
    "SourceItem",
    "SourceKind",
    "decode_image",
    "discover",
    "file_sha256",
    "iter_batches",
    "plan_add",
    "to_rgb",
]
