"""A streaming, resumable build: encoded batches go to disk in chunks as they come.

A build's memory stays bounded whatever the corpus size: nothing of an image is held past the
chunk it belongs to. The source's items are cut into chunks of :data:`CHUNK_ITEMS` files (a
multiple of the batch size); each chunk's pooled vectors, patch rows, metadata rows and skipped
files are written to ``DIR/.build-staging/`` as it fills, and when it is complete its files are
fsynced and one line is appended (and fsynced) to the staging journal. At the end the chunks
become one generation: the patch shards and metadata parts are hard-linked (each chunk's are
already named and shaped as the generation's), the vectors are concatenated into ``vectors.npy``,
and the FAISS first stage is trained on a seeded sample of them and filled in blocks from the
memory-mapped file. A pq codec is trained at the end as before, on a seeded sample of every
chunk's float16 rows, and each chunk is then encoded a block at a time.

A build that is killed (SIGKILL, Ctrl-C, power loss) keeps every chunk its journal lists. Run
again with the same source, model, codec and batch size, it checks the staging against them
(:class:`BuildSpec`), re-reads the kept chunks' hashes (so a file identical to a kept one is still
a ``duplicate of`` it) and encodes only the rest. The result is the one an uninterrupted build
gives: the same ids, vectors, patches, metadata, skipped files and first stage.

The staging folder records the generation the build started from; the store's garbage collection
keeps it while that generation is the committed one and deletes it once another is committed (the
build's own commit, or an ``add``/``remove``/``compact`` that abandoned it): see
:mod:`crossrank.store.gc`.

Staging layout (``DIR/.build-staging/``)::

    build.json               BuildSpec, base generation, first id (written once, atomically)
    journal.jsonl            one line per finished chunk: items, rows, skipped, file sizes
    vectors-000000.npy       float32 (rows, D) of chunk 0
    patches-000.npy          chunk 0's patch rows: the codec's stored rows (float16 for pq)
    metadata-000.parquet     chunk 0's metadata rows, ids included
    skipped-000000.parquet   chunk 0's skipped files (path, reason)

Using it from another engine (each chunk encoded anywhere, fed here in order)::

    build = StreamingBuild.open(index_dir, lock, spec, extra_schema=src.extra_schema)
    for batch in batches_from(src.items[build.kept_items:]):    # chunk boundaries respected
        build.add(EncodedBatch(pooled, patches, records, skipped, n_items))
    generation, first_stage = build.commit(index_config, source_label=str(source))
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.errors import CrossrankError, InvalidArgumentError, SourceError
from crossrank.store._files import (
    NpyAppender,
    atomic_write_json,
    fsync_dir,
    fsync_file,
    load_npy,
)
from crossrank.store.codecs import PQ_SEED, PatchCodec, parse_codec
from crossrank.store.config import StoreConfig
from crossrank.store.layout import (
    STAGING_INFO_NAME,
    STAGING_JOURNAL_NAME,
    STAGING_NAME,
    VECTORS_NAME,
    PartInfo,
    metadata_part_name,
    patch_shard_name,
)

__all__ = [
    "CHUNK_ITEMS",
    "BuildSpec",
    "EncodedBatch",
    "Duplicates",
    "StreamingBuild",
    "listing_fingerprint",
    "staging_dir",
    "resumable_build",
    "metadata_table",
    "skipped_table",
]

logger = logging.getLogger(__name__)

#: Source files per chunk (rounded down to a multiple of the batch size): what a crash can cost.
#: At 300-500 images/s on a CPU that is under a minute of work, and a chunk's records (the only
#: per-image Python objects a build holds) stay a few megabytes.
CHUNK_ITEMS = 16_384
_STAGING_FORMAT = 1
_ENCODE_ROWS_BYTES = 64 << 20  # float16 bytes of staged patch rows encoded per step (pq)
# One part / shard per chunk, whatever its size.
_CHUNK_CONFIG = StoreConfig(
    patch_shard_bytes=1 << 62, metadata_part_rows=1 << 62, patch_shard_rows=1 << 62
)


def staging_dir(index_dir: Path | str) -> Path:
    """The staging folder of a build in progress in ``index_dir``."""
    return Path(index_dir) / STAGING_NAME


def _vectors_name(k: int) -> str:
    return f"vectors-{k:06d}.npy"


def _skipped_name(k: int) -> str:
    return f"skipped-{k:06d}.parquet"


def listing_fingerprint(source: Any) -> str:
    """SHA-256 of a :class:`~crossrank.ingest.Source`'s listing: kind, root, every path in order
    and a manifest's values. The files' bytes are not read (a kept image is checked by its size and
    modification time on resume instead)."""
    h = hashlib.sha256()
    h.update(f"{source.kind}\0{source.root}\0".encode())
    if source.extra_schema is not None:
        h.update(str(source.extra_schema).encode())
    for item in source.items:
        h.update(os.fsencode(str(item.path)))
        if item.extra:
            h.update(json.dumps(item.extra, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class BuildSpec:
    """What a build is started with; a resume must match every field.

    Attributes:
        source: the resolved SOURCE (folder or manifest).
        listing_sha256: :func:`listing_fingerprint` of its listing.
        n_items: files listed.
        encoder: the encoder's ``info`` (compared by its config and weight fingerprints).
        patch_codec: the codec's spec, configured for the model (``pq`` resolves to ``pq:16``).
        batch_size: images per forward pass (a chunk is a whole number of batches).
        chunk_items: files per chunk.
    """

    source: str
    listing_sha256: str
    n_items: int
    encoder: dict[str, Any]
    patch_codec: str
    batch_size: int
    chunk_items: int

    @staticmethod
    def chunk_items_for(batch_size: int, chunk_items: int = CHUNK_ITEMS) -> int:
        """``chunk_items`` rounded down to a multiple of ``batch_size`` (at least one batch)."""
        return max(batch_size, chunk_items // batch_size * batch_size)

    def difference(self, other: BuildSpec) -> str | None:
        """How a build in progress (``self``) differs from ``other``, in words; None if it does
        not."""
        from crossrank.encoders.fingerprint import same_model

        if self.source != other.source:
            return f"it was started from SOURCE {self.source}, this build is from {other.source}"
        if self.listing_sha256 != other.listing_sha256:
            return (
                f"SOURCE {self.source} lists other files than when it was started "
                f"({self.n_items:,} then, {other.n_items:,} now)"
            )
        if not same_model(self.encoder, other.encoder) or any(
            self.encoder.get(k) != other.encoder.get(k) for k in ("dim", "n_patches", "patch_dim")
        ):
            return (
                f"it was started with model {self.encoder.get('model_id')}, this build uses "
                f"{other.encoder.get('model_id')}"
                + (
                    " (other weights)"
                    if self.encoder.get("model_id") == other.encoder.get("model_id")
                    else ""
                )
            )
        if self.patch_codec != other.patch_codec:
            return (
                f"it stores patches as {self.patch_codec}, this build asks for "
                f"--patch-codec {other.patch_codec}"
            )
        if self.batch_size != other.batch_size:
            return (
                f"it was started with --batch-size {self.batch_size}, this build has "
                f"{other.batch_size}"
            )
        if self.chunk_items != other.chunk_items:
            return (
                f"it was started with chunks of {self.chunk_items} files, this build asks for "
                f"{other.chunk_items}"
            )
        return None


@dataclass
class EncodedBatch:
    """One batch of consecutive source files, encoded: what :meth:`StreamingBuild.add` takes.

    Attributes:
        pooled: float32 ``(b, D)``, one row per record.
        patches: float ``(b, P, d)``, one row per record (stored as float16, then the codec).
        records: the :class:`~crossrank.ingest.ImageRecord` of each row.
        skipped: the batch's files that were not indexed (:class:`~crossrank.ingest.SkippedFile`),
            duplicates found before encoding included.
        n_items: source files the batch accounts for (``len(records) + len(skipped)``).
        duplicates: how many of ``skipped`` are ``duplicate of`` skips.
    """

    pooled: np.ndarray
    patches: np.ndarray
    records: list[Any]
    skipped: list[Any]
    n_items: int
    duplicates: int = 0


class Duplicates:
    """The first path of every file content (SHA-256) seen: byte-identical copies are indexed once.

    The later copy, in source order, becomes a skip with the reason ``duplicate of <first path>``.
    Digests are held as 32 bytes each (about 150 MB for a million images).
    """

    def __init__(self) -> None:
        self._first: dict[bytes, str] = {}

    def __len__(self) -> int:
        return len(self._first)

    def remember(self, sha256: str, path: str) -> str:
        """Record ``path`` as the first file with these bytes unless one is; returns the first."""
        return self._first.setdefault(bytes.fromhex(sha256), path)

    def split(self, records: Sequence[Any]) -> tuple[list[int], list[Any]]:
        """``(rows to keep, duplicate skips)`` of ``records``, remembering the kept ones."""
        from crossrank.ingest import SkippedFile
        from crossrank.ingest.changes import DUPLICATE_PREFIX

        keep: list[int] = []
        dups: list[Any] = []
        for i, record in enumerate(records):
            path = str(record.item.path)
            first = self.remember(record.sha256, path)
            if first == path:
                keep.append(i)
            else:
                dups.append(SkippedFile(path, DUPLICATE_PREFIX + first))
        return keep, dups


@dataclass(frozen=True)
class _Chunk:
    """One finished chunk, as its journal line records it."""

    chunk: int
    items: tuple[int, int]
    rows: int
    skipped: int
    duplicates: int
    files: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["items"] = list(self.items)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> _Chunk:
        data = json.loads(line)
        return cls(
            chunk=int(data["chunk"]),
            items=(int(data["items"][0]), int(data["items"][1])),
            rows=int(data["rows"]),
            skipped=int(data["skipped"]),
            duplicates=int(data["duplicates"]),
            files={str(k): int(v) for k, v in data["files"].items()},
        )


def _read_staging(staging: Path) -> tuple[dict[str, Any], list[_Chunk], bool] | None:
    """``(build.json, the chunks the journal proves complete, journal intact)``, or None when
    there is no readable staging."""
    try:
        recorded = json.loads((staging / STAGING_INFO_NAME).read_text(encoding="utf-8"))
        if not isinstance(recorded, dict) or recorded.get("format") != _STAGING_FORMAT:
            return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    chunks: list[_Chunk] = []
    intact = True
    try:
        raw = (staging / STAGING_JOURNAL_NAME).read_bytes()
    except FileNotFoundError:
        raw = b""
    except OSError:
        return None
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            chunk = _Chunk.from_json(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError):
            intact = False  # a torn last line (killed while appending): the chunk is redone
            break
        expected_start = chunks[-1].items[1] if chunks else 0
        files_ok = all(
            (staging / name).is_file() and (staging / name).stat().st_size == size
            for name, size in chunk.files.items()
        )
        if chunk.chunk != len(chunks) or chunk.items[0] != expected_start or not files_ok:
            intact = False
            break
        chunks.append(chunk)
    return recorded, chunks, intact


def resumable_build(index_dir: Path | str) -> BuildSpec | None:
    """The :class:`BuildSpec` of a build in progress in ``index_dir`` that can resume, or None.

    Cheap (reads the staging's ``build.json`` and journal, loads nothing): for refusing
    ``--resume`` before a model loads.
    """
    from crossrank.store.gc import staging_is_stale

    staging = staging_dir(index_dir)
    if not staging.is_dir() or staging_is_stale(index_dir):
        return None
    found = _read_staging(staging)
    if found is None:
        return None
    try:
        return BuildSpec(**found[0]["spec"])
    except (KeyError, TypeError):
        return None


def _no_build_message(index_dir: Path) -> str:
    return (
        f"--resume: {index_dir} holds no build in progress (nothing to resume); run the build "
        "without --resume"
    )


class StreamingBuild:
    """The staging of one build: encoded batches in, one committed generation out.

    Use :meth:`open` (it resumes a matching build in progress), feed the batches of the files
    from :attr:`kept_items` on with :meth:`add`, in source order, then :meth:`commit`. A batch
    must not cross a chunk boundary (a multiple of :attr:`chunk_items` files from the start): with
    batches of ``spec.batch_size`` files it never does. The caller holds the index's writer lock
    throughout.

    Attributes:
        index_dir: the index directory.
        spec: what the build was started with.
        kept_items: source files covered by the chunks kept from an interrupted build (0 on a
            fresh start); encoding resumes at ``items[kept_items:]``.
        kept_images: images of those chunks (the ``resumed`` of a build report).
        duplicates: the contents seen so far, for dropping byte-identical copies before encoding.
        first_id: the id of the build's first image.
    """

    def __init__(
        self,
        index_dir: Path,
        lock: Any,
        spec: BuildSpec,
        recorded: dict[str, Any],
        chunks: list[_Chunk],
        extra_schema: Any,
    ) -> None:
        self.index_dir = index_dir
        self.lock = lock
        self.spec = spec
        self.dir = staging_dir(index_dir)
        self.first_id = int(recorded["first_id"])
        self.base_generation: int | None = recorded["base_generation"]
        self._extra_schema = extra_schema
        self._chunks = chunks
        self.kept_items = chunks[-1].items[1] if chunks else 0
        self.kept_images = sum(c.rows for c in chunks)
        self.duplicates = Duplicates()
        self._rows = self.kept_images  # rows of every finished chunk
        self._cur: _OpenChunk | None = None
        self._committed = False

    # -- opening ---------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        index_dir: Path | str,
        lock: Any,
        spec: BuildSpec,
        *,
        extra_schema: Any = None,
        resume: bool | None = None,
    ) -> StreamingBuild:
        """Start a build, or resume the one in progress in ``index_dir``.

        Args:
            index_dir: the index directory; its writer lock is held by the caller.
            lock: that held :class:`~crossrank.store.WriterLock`.
            spec: what this build is (source listing, model, codec, batch and chunk sizes).
            extra_schema: the manifest's own columns (``Source.extra_schema``).
            resume: None resumes a build in progress with the same spec and starts over (deleting
                its staging) otherwise; True refuses to start over; False always starts over.

        Raises:
            InvalidArgumentError: ``resume=True`` and no build is in progress, or the one in
                progress differs (one line saying how).
        """
        from crossrank.store.gc import clean_interrupted
        from crossrank.store.generation_writer import next_free_id
        from crossrank.store.manifest import current_generation_number

        index_dir = Path(index_dir)
        clean_interrupted(index_dir, lock)  # also deletes a staging no build can resume
        staging = staging_dir(index_dir)
        found = _read_staging(staging) if staging.is_dir() else None
        base = current_generation_number(index_dir)
        first_id = next_free_id(index_dir)
        if found is not None:
            recorded, chunks, intact = found
            try:
                theirs = BuildSpec(**recorded["spec"])
                why = theirs.difference(spec)
            except (KeyError, TypeError):
                why = "its build.json cannot be read"
            if why is None and (
                recorded.get("first_id") != first_id or recorded.get("base_generation") != base
            ):
                why = "the index changed since it was started"
            if why is None:
                why = _changed_file(staging, chunks)
            if why is not None:
                if resume:
                    raise InvalidArgumentError(
                        f"--resume: the build in progress in {index_dir} differs: {why}; run it "
                        "as it was started, or without --resume to start over"
                    )
                logger.warning(
                    "starting the build of %s over: the one in progress differs (%s)",
                    index_dir,
                    why,
                )
            elif resume is False:
                logger.info("starting the build of %s over (resume=False)", index_dir)
            else:
                build = cls(index_dir, lock, spec, recorded, chunks, extra_schema)
                build._adopt(intact)
                logger.info(
                    "resuming the build of %s: kept %d images (%d of %d files)",
                    index_dir,
                    build.kept_images,
                    build.kept_items,
                    spec.n_items,
                )
                return build
        elif resume:
            raise InvalidArgumentError(_no_build_message(index_dir))
        if staging.exists() or staging.is_symlink():
            _remove_staging(staging)
        recorded = {
            "format": _STAGING_FORMAT,
            "spec": asdict(spec),
            "base_generation": base,
            "first_id": first_id,
        }
        staging.mkdir()
        atomic_write_json(staging / STAGING_INFO_NAME, recorded)
        # The journal exists (empty, its name durable) before any line is appended to it.
        (staging / STAGING_JOURNAL_NAME).touch()
        fsync_file(staging / STAGING_JOURNAL_NAME)
        fsync_dir(staging)
        fsync_dir(index_dir)
        return cls(index_dir, lock, spec, recorded, [], extra_schema)

    def _adopt(self, intact: bool) -> None:
        """Delete what the journal does not list (a chunk cut short), re-read the kept hashes."""
        import pyarrow.parquet as pq

        keep = {STAGING_INFO_NAME, STAGING_JOURNAL_NAME}
        for chunk in self._chunks:
            keep.update(chunk.files)
        for entry in sorted(self.dir.iterdir()):
            if entry.name not in keep:
                if entry.is_dir() and not entry.is_symlink():
                    _remove_staging(entry)
                else:
                    entry.unlink()
        if not intact:  # drop the torn or unproven tail, so that appends follow whole lines
            _rewrite_journal(self.dir, self._chunks)
        for chunk in self._chunks:
            if chunk.rows:
                table = pq.read_table(
                    self.dir / metadata_part_name(chunk.chunk), columns=["path", "sha256"]
                )
                for path, sha in zip(
                    table.column("path").to_pylist(),
                    table.column("sha256").to_pylist(),
                    strict=True,
                ):
                    self.duplicates.remember(sha, path)

    # -- writing ---------------------------------------------------------------------------------

    @property
    def chunk_items(self) -> int:
        """Source files per chunk."""
        return self.spec.chunk_items

    @property
    def items_done(self) -> int:
        """Source files accounted for so far (kept chunks included)."""
        done = self._chunks[-1].items[1] if self._chunks else 0
        return done + (self._cur.items if self._cur is not None else 0)

    @property
    def images(self) -> int:
        """Images written so far (kept chunks included)."""
        return self._rows + (self._cur.rows if self._cur is not None else 0)

    def add(self, batch: EncodedBatch) -> None:
        """Write one encoded batch: the next ``batch.n_items`` source files.

        Records whose bytes equal an earlier file's are dropped here too (with their rows), so an
        engine that encodes elsewhere need not know the other chunks' hashes.

        Raises:
            InvalidArgumentError: rows of pooled, patches and records differ, or the batch crosses
                a chunk boundary.
        """
        pooled = np.asarray(batch.pooled, dtype=np.float32)
        patches = np.asarray(batch.patches)
        n = len(batch.records)
        if pooled.shape[0] != n or patches.shape[0] != n or pooled.ndim != 2 or patches.ndim != 3:
            raise InvalidArgumentError(
                f"an encoded batch needs one pooled (b, D) and patch (b, P, d) row per record; got "
                f"{n} records, pooled {pooled.shape}, patches {patches.shape}"
            )
        keep, dups = self.duplicates.split(batch.records)
        records = batch.records
        if len(keep) != n:
            pooled, patches = pooled[keep], patches[keep]
            records = [records[i] for i in keep]
        if self._cur is None:
            self._cur = _OpenChunk(self, len(self._chunks), self.items_done)
        cur = self._cur
        if cur.items + batch.n_items > self.chunk_items:
            raise InvalidArgumentError(
                f"an encoded batch of {batch.n_items} files crosses the chunk boundary at "
                f"{cur.start + self.chunk_items} (chunks of {self.chunk_items} files)"
            )
        cur.append(pooled, patches, records, [*batch.skipped, *dups], batch.n_items)
        cur.duplicates += batch.duplicates + len(dups)
        if cur.items >= self.chunk_items:
            self._finish_chunk()

    def _finish_chunk(self) -> None:
        assert self._cur is not None
        chunk = self._cur.finish(self._rows)
        with open(self.dir / STAGING_JOURNAL_NAME, "a", encoding="utf-8") as f:
            f.write(chunk.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._chunks.append(chunk)
        self._rows += chunk.rows
        self._cur = None
        logger.debug("build chunk %d written: %d images", chunk.chunk, chunk.rows)

    def discard_open_chunk(self) -> None:
        """Close the chunk being filled without journaling it (a build that stops)."""
        if self._cur is not None:
            self._cur.discard()
            self._cur = None

    # -- committing ------------------------------------------------------------------------------

    def first_skips(self, n: int = 3) -> list[tuple[str, str]]:
        """The first ``n`` skipped files, as ``(path, reason)``."""
        import pyarrow.parquet as pq

        out: list[tuple[str, str]] = []
        for chunk in self._chunks:
            if len(out) >= n:
                break
            if chunk.skipped:
                t = pq.read_table(self.dir / _skipped_name(chunk.chunk))
                out += list(
                    zip(t.column("path").to_pylist(), t.column("reason").to_pylist(), strict=True)
                )
        return out[:n]

    @property
    def n_skipped(self) -> int:
        """Files skipped in the finished chunks."""
        return sum(c.skipped for c in self._chunks)

    @property
    def n_duplicates(self) -> int:
        """Of them, byte-identical copies."""
        return sum(c.duplicates for c in self._chunks)

    def commit(self, index_config: Any, *, source_label: str, **manifest_fields: Any) -> Any:
        """Finish the last chunk and turn the chunks into the index's next generation.

        Args:
            index_config: the first stage's :class:`~crossrank.indexes.IndexConfig`.
            source_label: SOURCE as the user gave it, for the error when nothing decoded.
            **manifest_fields: more manifest keys (``source=``...).

        Returns:
            ``(generation number, the FirstStage)``.

        Raises:
            SourceError: not one file decoded.
            InvalidArgumentError: a pq codec got too few patch vectors to train on.
        """
        from crossrank.indexes import FirstStage
        from crossrank.store import GenerationWriter

        if self._cur is not None:
            self._finish_chunk()
        n = self._rows
        if n == 0:
            reasons = "; ".join(f"{p}: {r}" for p, r in self.first_skips())
            raise SourceError(
                f"none of the {self.spec.n_items} files in {source_label} could be decoded "
                f"({reasons}); check that SOURCE holds images"
            )
        encoder = self.spec.encoder
        shape = (int(encoder["n_patches"]), int(encoder["patch_dim"]))
        codec = parse_codec(self.spec.patch_codec)
        codec.configure(*shape)
        full = [c for c in self._chunks if c.rows]
        shards = [PartInfo(patch_shard_name(c.chunk), c.rows) for c in full]
        if codec.needs_training:
            _train_codec(codec, self.dir, shards, shape)
        with GenerationWriter(self.index_dir, lock=self.lock, patch_codec=codec) as writer:
            if writer.next_id != self.first_id:
                raise CrossrankError(
                    f"the build in progress in {self.index_dir} gave ids from {self.first_id}, "
                    f"but the index's next id is {writer.next_id}; run the build again"
                )
            ids = writer.take_ids(n)
            writer.write_vectors(load_npy(self.dir / _vectors_name(c.chunk)) for c in full)
            if self.spec_codec_trains:
                writer.patches.append(np.zeros((0, *shape), np.float16))  # declares the shape
                step = max(1, _ENCODE_ROWS_BYTES // (shape[0] * shape[1] * 2))
                for part in shards:
                    mm = load_npy(self.dir / part.file)
                    for i0 in range(0, part.rows, step):
                        writer.patches.append_stored(codec.encode(mm[i0 : i0 + step]))
                    del mm
            else:
                writer.adopt_patch_shards(self.dir, shards, shape)
            writer.adopt_metadata_parts(
                self.dir, [PartInfo(metadata_part_name(c.chunk), c.rows) for c in full]
            )
            _write_skipped(writer, self.dir, self._chunks)
            writer.write_ids(ids)
            vectors = load_npy(writer.dir / VECTORS_NAME)
            first_stage = FirstStage.build(vectors, ids, index_config)
            del vectors
            first_stage.save(writer.first_stage_path)
            generation = writer.commit(
                encoder=encoder,
                # `auto`: the factory was chosen by size, so a compaction may choose again.
                first_stage={
                    **first_stage.info,
                    "metric": "inner_product",
                    "auto": index_config.factory is None,
                },
                counts={"images": n, "skipped": self.n_skipped},
                **manifest_fields,
            )
        self._committed = True
        self.remove_if_stale()
        return generation, first_stage

    @property
    def spec_codec_trains(self) -> bool:
        """Whether the build's codec is trained at commit (its chunks hold float16 rows)."""
        return parse_codec(self.spec.patch_codec).needs_training

    def remove_if_stale(self) -> None:
        """Delete the staging folder once no build can resume from it (after the commit)."""
        from crossrank.store.gc import staging_is_stale

        try:
            if staging_is_stale(self.index_dir):
                _remove_staging(self.dir)
        except OSError as e:  # the commit stands; the next writer deletes it
            logger.warning("could not delete %s: %s", self.dir, e)

    def abandon(self) -> None:
        """Delete the staging folder: the build cannot succeed and there is nothing to resume."""
        self.discard_open_chunk()
        if self.dir.is_dir():
            _remove_staging(self.dir)

    def abandon_if_empty(self) -> None:
        """Delete the staging folder of a build that stopped before finishing any chunk."""
        self.discard_open_chunk()
        if not self._chunks and self.dir.is_dir():
            _remove_staging(self.dir)


class _OpenChunk:
    """The chunk being filled: its vectors and patches stream to files, its records are held."""

    def __init__(self, build: StreamingBuild, k: int, start: int) -> None:
        self.build = build
        self.k = k
        self.start = start
        self.items = 0
        self.rows = 0
        self.duplicates = 0
        self.records: list[Any] = []
        self.skipped: list[Any] = []
        self._vectors: NpyAppender | None = None
        codec = "fp16" if build.spec_codec_trains else build.spec.patch_codec
        self._patches: Any = None
        self._codec = codec

    def append(
        self,
        pooled: np.ndarray,
        patches: np.ndarray,
        records: list[Any],
        skipped: Iterable[Any],
        n_items: int,
    ) -> None:
        from crossrank.store.patches import PatchWriter

        if records:
            if self._vectors is None:
                self._vectors = NpyAppender(
                    self.build.dir / _vectors_name(self.k), np.dtype(np.float32), pooled.shape[1:]
                )
                self._patches = PatchWriter(
                    self.build.dir, config=_CHUNK_CONFIG, first_shard=self.k, codec=self._codec
                )
            self._patches.append(patches)  # checks shape and finiteness before writing
            if not np.isfinite(pooled).all():
                raise InvalidArgumentError("pooled vectors hold NaN or inf")
            self._vectors.append(pooled)
            self.records.extend(records)
            self.rows += len(records)
        self.skipped.extend(skipped)
        self.items += n_items

    def finish(self, rows_before: int) -> _Chunk:
        """Write the metadata and skipped files, fsync everything; returns the journal entry."""
        from crossrank.store.metadata_writer import MetadataWriter, write_skipped

        build = self.build
        names: list[str] = []
        if self.rows:
            assert self._vectors is not None
            self._vectors.close()
            shards = self._patches.close()
            names += [_vectors_name(self.k), *(s.file for s in shards)]
            ids = np.arange(
                build.first_id + rows_before,
                build.first_id + rows_before + self.rows,
                dtype=np.int64,
            )
            meta = MetadataWriter(build.dir, config=_CHUNK_CONFIG, first_part=self.k)
            meta.write(metadata_table(ids, self.records, build._extra_schema))
            names += [p.file for p in meta.close()]
        write_skipped(build.dir / _skipped_name(self.k), [skipped_table(self.skipped)])
        names.append(_skipped_name(self.k))
        for name in names:
            fsync_file(build.dir / name)
        fsync_dir(build.dir)
        return _Chunk(
            chunk=self.k,
            items=(self.start, self.start + self.items),
            rows=self.rows,
            skipped=len(self.skipped),
            duplicates=self.duplicates,
            files={name: (build.dir / name).stat().st_size for name in names},
        )

    def discard(self) -> None:
        if self._vectors is not None:
            self._vectors.discard()
        if self._patches is not None:
            self._patches.discard()


def _train_codec(
    codec: PatchCodec, directory: Path, shards: list[PartInfo], shape: tuple[int, int]
) -> None:
    """Train ``codec`` on a seeded sample of the float16 rows of every chunk, in row order.

    The sample is the one :class:`~crossrank.store.patches.PatchWriter` draws from its staged
    rows (the same seed over the same rows), so a streamed build trains the same quantiser as a
    build that held its patches in one writer.
    """
    n_patches, d = shape
    n_rows = sum(p.rows for p in shards)
    n_vec = n_rows * n_patches
    codec.check_trainable(n_vec, n_patches, f"{n_rows:,} images")
    m = min(n_vec, codec.max_train_vectors())
    pick = np.sort(np.random.default_rng(PQ_SEED).choice(n_vec, size=m, replace=False))
    sample = np.empty((m, d), np.float32)
    first = 0
    for part in shards:
        flat = load_npy(directory / part.file).reshape(part.rows * n_patches, d)
        lo, hi = np.searchsorted(pick, [first, first + part.rows * n_patches])
        sample[lo:hi] = flat[pick[lo:hi] - first]
        first += part.rows * n_patches
        del flat
    codec.train(sample)
    logger.debug("trained %s on %d patch vectors of %d images", codec, m, n_rows)


def _write_skipped(writer: Any, directory: Path, chunks: Sequence[_Chunk]) -> None:
    import pyarrow.parquet as pq

    tables = [pq.read_table(directory / _skipped_name(c.chunk)) for c in chunks if c.skipped]
    for table in tables or [skipped_table([])]:
        writer.write_skipped(table)


def _changed_file(staging: Path, chunks: Sequence[_Chunk]) -> str | None:
    """A kept image whose file changed since it was encoded (size or modification time)."""
    import pyarrow.parquet as pq

    for chunk in chunks:
        if not chunk.rows:
            continue
        t = pq.read_table(
            staging / metadata_part_name(chunk.chunk), columns=["path", "bytes", "mtime"]
        )
        paths = t.column("path").to_pylist()
        sizes = t.column("bytes").to_numpy()
        mtimes = t.column("mtime").cast("int64").to_numpy()
        for path, size, mtime in zip(paths, sizes, mtimes, strict=True):
            try:
                st = os.stat(path)
            except OSError:
                return f"{path} is gone or unreadable since it was encoded"
            if st.st_size != size or int(st.st_mtime * 1e6) != mtime:
                return f"{path} changed since it was encoded (size or modification time)"
    return None


def _rewrite_journal(staging: Path, chunks: Sequence[_Chunk]) -> None:
    tmp = staging / f".{STAGING_JOURNAL_NAME}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for chunk in chunks:
            f.write(chunk.to_json() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, staging / STAGING_JOURNAL_NAME)
    fsync_dir(staging)


def _remove_staging(path: Path) -> None:
    import shutil

    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def skipped_table(skipped: Sequence[Any]) -> Any:
    """The ``path``, ``reason`` table of :class:`~crossrank.ingest.SkippedFile` objects."""
    import pyarrow as pa

    return pa.table(
        {"path": [s.path for s in skipped], "reason": [s.reason for s in skipped]},
        schema=pa.schema([("path", pa.string()), ("reason", pa.string())]),
    )


def metadata_table(ids: np.ndarray, records: Sequence[Any], extra_schema: Any) -> Any:
    """One metadata row per indexed image, in id order: the fixed columns, then the manifest's."""
    import pyarrow as pa

    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, type=pa.int64()),
        "path": pa.array([str(r.item.path) for r in records], type=pa.string()),
        "sha256": pa.array([r.sha256 for r in records], type=pa.string()),
        "width": pa.array([r.width for r in records], type=pa.int32()),
        "height": pa.array([r.height for r in records], type=pa.int32()),
        "bytes": pa.array([r.bytes for r in records], type=pa.int64()),
        "mtime": pa.array([int(r.mtime * 1e6) for r in records], type=pa.timestamp("us", tz="UTC")),
    }
    if extra_schema is not None:
        for fld in extra_schema:
            columns[fld.name] = pa.array(
                [r.item.extra.get(fld.name) for r in records], type=fld.type
            )
    return pa.table(columns)
