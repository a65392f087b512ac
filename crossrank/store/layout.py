"""The files of one generation folder and ``generation.json``, the record of what it holds.

``generation.json`` lists every file of the generation with its byte size, the row counts, the
patch shards and metadata parts in row order (with their row counts) and the feature shapes.
Readers take the layout from it rather than from globbing, so shards and parts may differ in size
(a later generation can reuse an earlier one's files and add new ones after them).

Format versions: 1 is the original layout. 2 adds ``tombstones.npy``, the sorted int64 ids of
removed images that every reader must exclude; a generation is written as version 2 only when it
has tombstones, so an older crossrank keeps reading every index it can read correctly and refuses
(with "upgrade crossrank") the ones where it would show removed images. ``next_id`` (the first
id never given yet) is an optional field that older readers ignore.

``checksums`` (``{"algorithm": "sha256", "files": {name: hex digest}}``, one digest per file of
``files``) is optional too, so it does not raise the format version: an older crossrank ignores
it and keeps reading the index, and this crossrank reads generations written without it
(``crossrank verify`` then checks structure and sizes and says that no checksums are recorded).
A format version is raised only for a change an older reader would misread, like tombstones.

3 adds patch codecs (:mod:`crossrank.store.codecs`): ``patches.codec`` names how the patch shards
are stored (``int8``, ``binary``, ``pq:16``; absent means fp16, as before), ``patches.dtype`` and
``patches.row_shape`` give the stored rows, and ``patches.codec_file`` the trained parameters (a
file listed, with its checksum, like every other one). A generation is written as version 3 only
when its codec is not fp16: an fp16 generation is byte for byte what it was, and an older
crossrank refuses a compressed one (with "upgrade crossrank") rather than misread its shards.
"""

from __future__ import annotations

import json
import re
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossrank.errors import IndexCorruptError, InvalidArgumentError
from crossrank.store.codecs import DEFAULT_CODEC, parse_codec

__all__ = [
    "FORMAT_VERSION",
    "GENERATION_INFO_NAME",
    "VECTORS_NAME",
    "IDS_NAME",
    "SKIPPED_NAME",
    "FIRST_STAGE_NAME",
    "TOMBSTONES_NAME",
    "CHECKSUM_ALGORITHM",
    "UNREADABLE",
    "format_version_for",
    "PartInfo",
    "GenerationInfo",
    "patch_shard_name",
    "metadata_part_name",
    "read_generation_info",
    "MANIFEST_NAME",
    "READERS_DIR",
    "STAGING_NAME",
    "STAGING_INFO_NAME",
    "STAGING_JOURNAL_NAME",
    "MANIFEST_TMP_RE",
    "TMP_DIR_RE",
    "TRASH_RE",
    "LOCK_NAME",
    "foreign_entries",
    "is_own_leftover",
]

FORMAT_VERSION = 3  # newest layout of manifest.json and generation.json this crossrank reads
MANIFEST_NAME = "manifest.json"  # which generation is committed (crossrank.store.manifest)
READERS_DIR = "readers"  # the reader pins (crossrank.store.pins)
LOCK_NAME = "writer.lock"  # the one writer's lock (crossrank.store.lock)
#: A build in progress: the chunks it wrote so far, so that a killed build resumes
#: (crossrank.write.streaming). Never read by a search; deleted by the store's garbage collection
#: once a commit makes it stale (crossrank.store.gc).
STAGING_NAME = ".build-staging"
#: What an interrupted writer leaves in an index folder (removed by crossrank.store.gc): a
#: generation moved aside for deletion, a manifest being written, a generation being written.
TRASH_RE = re.compile(r"^\.trash-gen-\d{6,}\.\d+$")
MANIFEST_TMP_RE = re.compile(r"^\.manifest\.json\.tmp-\d+$")
TMP_DIR_RE = re.compile(r"^\.gen-\d{6,}\.tmp-\d+$")
STAGING_INFO_NAME = "build.json"  # what the build was started with (source, model, codec, ...)
STAGING_JOURNAL_NAME = "journal.jsonl"  # one fsynced line per finished chunk
GENERATION_INFO_NAME = "generation.json"
VECTORS_NAME = "vectors.npy"
IDS_NAME = "ids.npy"
SKIPPED_NAME = "skipped.parquet"
FIRST_STAGE_NAME = "first_stage.faiss"
TOMBSTONES_NAME = "tombstones.npy"
#: The hash of the recorded file checksums: sha256, because OpenSSL computes it with the CPU's SHA
#: instructions (as fast as blake2b or faster on current x86 and ARM) and anyone can check a file by
#: hand with ``sha256sum``.
CHECKSUM_ALGORITHM = "sha256"


def is_own_leftover(name: str) -> bool:
    """Whether ``name`` is one crossrank gives what an interrupted writer leaves behind."""
    return name == STAGING_NAME or any(
        r.match(name) for r in (TRASH_RE, MANIFEST_TMP_RE, TMP_DIR_RE)
    )


def foreign_entries(root: Path) -> list[str]:
    """The entries of the folder ``root`` crossrank did not write, sorted: a build refuses a
    folder holding any (it could delete the user's files, e.g. a folder of theirs named
    ``gen-000005``).

    Empty when ``root`` holds ``manifest.json`` (a committed index) or ``writer.lock`` (crossrank
    took its lock there: a first build that was interrupted).

    Raises:
        OSError: ``root`` cannot be listed.
    """
    names = sorted(e.name for e in root.iterdir())
    if MANIFEST_NAME in names or LOCK_NAME in names:
        return []
    return [n for n in names if not (n == READERS_DIR or is_own_leftover(n))]


#: What opening a damaged ``.npy`` or Parquet file can raise besides Arrow's own errors: an
#: unreadable file (OSError), a short one under a memory map (ValueError), a garbled ``.npy``
#: header (ValueError, SyntaxError, or tokenize.TokenError from numpy's header parser), a garbled
#: shape too large to allocate (MemoryError). Readers turn each into one line, never a traceback.
UNREADABLE = (
    OSError,
    ValueError,
    TypeError,
    SyntaxError,
    tokenize.TokenError,
    MemoryError,
    KeyError,
    IndexError,
)


def format_version_for(n_tombstones: int, patch_codec: str = DEFAULT_CODEC) -> int:
    """The oldest format version that describes a generation: 3 with a patch codec other than
    fp16, else 2 with tombstones, else 1.

    Optional fields (``next_id``, ``checksums``) do not count: older readers ignore them.
    """
    if patch_codec != DEFAULT_CODEC:
        return 3
    return 2 if n_tombstones > 0 else 1


def patch_shard_name(index: int) -> str:
    """``patches-000.npy`` for shard 0 (more digits past 999)."""
    return f"patches-{index:03d}.npy"


def metadata_part_name(index: int) -> str:
    """``metadata-000.parquet`` for part 0 (more digits past 999)."""
    return f"metadata-{index:03d}.parquet"


@dataclass(frozen=True)
class PartInfo:
    """One patch shard or metadata part: its file name in the generation folder and its rows."""

    file: str
    rows: int


@dataclass(frozen=True)
class GenerationInfo:
    """The parsed ``generation.json`` of a generation folder.

    Attributes:
        path: the generation folder.
        format_version: layout version.
        generation: the generation number.
        created_at: ISO 8601 UTC commit time.
        counts: ``images`` (rows of every per-image file, removed images included),
            ``skipped`` and, when there are any, ``tombstones`` (removed images).
        vector_dim: D of ``vectors.npy`` (float32 ``(n, D)``).
        n_patches: P of the patch shards; 0 if no patches were declared.
        patch_dim: d of the patch features (decoded: float16 ``(rows, P, d)``).
        patch_shards: the shards in row order.
        metadata_parts: the Parquet parts in row order.
        metadata_columns: the metadata column names, ``id`` first.
        files: every file of the generation (relative POSIX path) with its size in bytes.
        next_id: the smallest id never given in this index directory; None for generations
            written before ids were tracked (then ``max(ids) + 1``).
        checksums: every file of ``files`` with the hex digest of its bytes at commit; empty for
            generations written before checksums were recorded.
        checksum_algorithm: the :mod:`hashlib` name of the digests (:data:`CHECKSUM_ALGORITHM`);
            None when no checksums are recorded.
        patch_codec: how the patch shards are stored (:mod:`crossrank.store.codecs`): ``fp16``
            (also for every generation written before codecs), ``int8``, ``binary``, ``pq:M``...
        patch_codec_file: the codec's trained parameters in the folder (``patch_codec.faiss``
            for pq), or None.
    """

    path: Path
    format_version: int
    generation: int
    created_at: str
    counts: dict[str, int]
    vector_dim: int
    n_patches: int
    patch_dim: int
    patch_shards: tuple[PartInfo, ...]
    metadata_parts: tuple[PartInfo, ...]
    metadata_columns: tuple[str, ...]
    files: dict[str, int] = field(default_factory=dict)
    next_id: int | None = None
    checksums: dict[str, str] = field(default_factory=dict)
    checksum_algorithm: str | None = None
    patch_codec: str = DEFAULT_CODEC
    patch_codec_file: str | None = None

    @property
    def patch_stored_shape(self) -> tuple[tuple[int, int], str]:
        """One stored row's shape and dtype name: ``((P, d), "float16")`` for fp16."""
        codec = parse_codec(self.patch_codec)
        if self.patch_dim > 0:
            codec.configure(self.n_patches, self.patch_dim)
        return codec.row_shape(self.n_patches, self.patch_dim), codec.stored_dtype.name

    @property
    def patch_bytes_per_image(self) -> int:
        """Stored bytes of one image's patches (``P * 2 * d`` for fp16)."""
        codec = parse_codec(self.patch_codec)
        if self.patch_dim > 0:
            codec.configure(self.n_patches, self.patch_dim)
        return codec.bytes_per_image(self.n_patches, self.patch_dim)

    @property
    def n_images(self) -> int:
        """Rows of the vectors, ids, patches and metadata (removed images included)."""
        return int(self.counts["images"])

    @property
    def n_tombstones(self) -> int:
        """Removed images: rows that every reader excludes until a compaction drops them."""
        return int(self.counts.get("tombstones", 0))

    @property
    def n_live(self) -> int:
        """Images a search can return: rows minus tombstones."""
        return self.n_images - self.n_tombstones

    @property
    def n_skipped(self) -> int:
        """Rows of ``skipped.parquet``."""
        return int(self.counts["skipped"])

    def to_dict(self) -> dict[str, Any]:
        """The JSON object stored in ``generation.json`` (``path`` is not stored)."""
        n = self.n_images
        extra: dict[str, Any] = {}
        if self.n_tombstones:
            extra["tombstones"] = {
                "file": TOMBSTONES_NAME,
                "rows": self.n_tombstones,
                "dtype": "int64",
            }
        if self.next_id is not None:
            extra["next_id"] = self.next_id
        if self.checksums:
            extra["checksums"] = {
                "algorithm": self.checksum_algorithm or CHECKSUM_ALGORITHM,
                "files": dict(self.checksums),
            }
        patches: dict[str, Any] = {
            "n_patches": self.n_patches,
            "dim": self.patch_dim,
            "dtype": "float16",
        }
        if self.patch_codec != DEFAULT_CODEC:
            row_shape, dtype = self.patch_stored_shape
            patches["dtype"] = dtype
            patches["codec"] = self.patch_codec
            patches["row_shape"] = list(row_shape)
            if self.patch_codec_file is not None:
                patches["codec_file"] = self.patch_codec_file
        patches["shards"] = [{"file": s.file, "rows": s.rows} for s in self.patch_shards]
        return {
            "format_version": self.format_version,
            "generation": self.generation,
            "created_at": self.created_at,
            "counts": dict(self.counts),
            "vectors": {
                "file": VECTORS_NAME,
                "rows": n,
                "dim": self.vector_dim,
                "dtype": "float32",
            },
            "ids": {"file": IDS_NAME, "rows": n, "dtype": "int64"},
            "patches": patches,
            "metadata": {
                "columns": list(self.metadata_columns),
                "parts": [{"file": p.file, "rows": p.rows} for p in self.metadata_parts],
            },
            "skipped": {"file": SKIPPED_NAME, "rows": self.n_skipped},
            "first_stage": {"file": FIRST_STAGE_NAME},
            **extra,
            "files": dict(self.files),
        }


def _parts(raw: Any) -> tuple[PartInfo, ...]:
    return tuple(PartInfo(file=str(p["file"]), rows=int(p["rows"])) for p in raw)


def _checksums(raw: Any) -> tuple[dict[str, str], str | None]:
    """The optional ``checksums`` field: ``({name: hex digest}, algorithm)``; empty when absent."""
    if raw is None:
        return {}, None
    files = {str(k): str(v) for k, v in raw["files"].items()}
    return files, str(raw["algorithm"])


def _codec(path: Path, patches: Any) -> tuple[str, str | None]:
    """The optional ``patches.codec`` (fp16 when absent) and ``patches.codec_file``."""
    raw = patches.get("codec")
    if raw is None:
        return DEFAULT_CODEC, None
    try:
        codec = parse_codec(str(raw))
        if int(patches["dim"]) > 0:
            codec.configure(int(patches["n_patches"]), int(patches["dim"]))
        spec = codec.spec
    except InvalidArgumentError as e:
        raise IndexCorruptError(
            f"{path} records patch codec {raw!r}, which this crossrank does not know; it was "
            "written by a newer crossrank: upgrade crossrank (pip install -U crossrank)"
        ) from e
    file = patches.get("codec_file")
    return spec, (str(file) if file is not None else None)


def read_generation_info(gen_dir: Path | str) -> GenerationInfo:
    """Read ``generation.json`` of a generation folder.

    Args:
        gen_dir: the generation folder (``DIR/gen-000003``).

    Returns:
        Its :class:`GenerationInfo`.

    Raises:
        IndexCorruptError: the file is missing, unreadable or lacks a field.
    """
    gen_dir = Path(gen_dir)
    path = gen_dir / GENERATION_INFO_NAME
    root = gen_dir.parent
    hint = (
        f"the index is damaged: `crossrank verify {root}` lists what is wrong; rebuild it with "
        f"`crossrank build SOURCE --index {root} --overwrite`"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise IndexCorruptError(f"{path} is missing; {hint}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexCorruptError(f"{path} cannot be read ({type(e).__name__}: {e}); {hint}") from e
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise IndexCorruptError(
            f"{path} has format_version {version}, but this crossrank reads up to "
            f"{FORMAT_VERSION}; it was written by a newer crossrank: upgrade crossrank "
            f"(pip install -U crossrank)"
        )
    try:
        checksums, algorithm = _checksums(data.get("checksums"))
        codec, codec_file = _codec(path, data["patches"])
        counts = {str(k): int(v) for k, v in data["counts"].items()}
        if "images" not in counts or "skipped" not in counts:
            raise KeyError("counts.images / counts.skipped")
        return GenerationInfo(
            path=gen_dir,
            format_version=int(data["format_version"]),
            generation=int(data["generation"]),
            created_at=str(data["created_at"]),
            counts=counts,
            vector_dim=int(data["vectors"]["dim"]),
            n_patches=int(data["patches"]["n_patches"]),
            patch_dim=int(data["patches"]["dim"]),
            patch_shards=_parts(data["patches"]["shards"]),
            metadata_parts=_parts(data["metadata"]["parts"]),
            metadata_columns=tuple(str(c) for c in data["metadata"]["columns"]),
            files={str(k): int(v) for k, v in data["files"].items()},
            next_id=int(data["next_id"]) if data.get("next_id") is not None else None,
            checksums=checksums,
            checksum_algorithm=algorithm,
            patch_codec=codec,
            patch_codec_file=codec_file,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise IndexCorruptError(f"{path} is malformed (bad or missing {e}); {hint}") from e
