"""Building a sharded index: decode and encode once, write N shards, commit them in one step.

The files of the source are listed, decoded and encoded exactly as :func:`crossrank.build_index`
does (the same skips and duplicates), and get the same ids: ``0, 1, 2, ...`` in source order
(after every id the folder ever gave, with ``overwrite``). Image ``id`` goes to shard
``id % N`` (:func:`crossrank.shards.shard_of`); each batch's patch rows stream into their shards'
patch stores as they are encoded. Each shard is then a whole crossrank index folder
(``ROOT/shard-000/`` ...): its FAISS first stage over its own vectors, ``vectors.npy``, ids,
patches in the index's patch codec, and metadata; the files no image could be made of are
recorded by shard 0. Every shard commits its generation, then ``shards.json`` names them all: the
sharded index's single commit point (:mod:`crossrank.shards.write`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import InvalidArgumentError, SourceError, some_of
from crossrank.shards.layout import SHARDS_NAME, is_sharded, shard_dir_name, shard_of

if TYPE_CHECKING:
    from crossrank.write.build import BuildReport, ProgressFn

__all__ = ["build_sharded", "build_sharded_from_arrays", "check_shards", "ShardedBuilder"]

logger = logging.getLogger(__name__)


def check_shards(shards: object) -> int:
    """``shards`` as an int >= 1, or one line saying what to pass."""
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise InvalidArgumentError(
            f"--shards must be a whole number of shards >= 1, got {shards!r}; use --shards 1 "
            "for one shard, or leave --shards out for an unsharded index"
        )
    return shards


def _own_root_entry(name: str) -> bool:
    """What a sharded index folder may hold besides the user's nothing."""
    from crossrank.store.lock import LOCK_NAME
    from crossrank.store.pins import READERS_DIR

    return (
        name in (SHARDS_NAME, LOCK_NAME, READERS_DIR)
        or name.startswith(f".{SHARDS_NAME}.tmp-")
        or (name.startswith("shard-") and name[6:].isdigit())
    )


def _check_root(root: Path, shards: int, overwrite: bool) -> None:
    """Refuse a folder that is not (or not yet) a sharded index of ours, or a rebuild that
    would change the number of shards."""
    from crossrank.shards.layout import read_shards_manifest
    from crossrank.store.manifest import MANIFEST_NAME

    if not root.is_dir():
        return
    names = sorted(e.name for e in root.iterdir())
    if MANIFEST_NAME in names:
        raise InvalidArgumentError(
            f"--index {root} holds an unsharded crossrank index; build the sharded one into a "
            "new folder (or rebuild this one without --shards)"
        )
    if is_sharded(root):
        top = read_shards_manifest(root)
        if not overwrite:
            raise InvalidArgumentError(
                f"{root} already holds a sharded index ({top.counts.get('images', '?')} images in "
                f"{top.n_shards} shards); pass --overwrite to rebuild it, or add new files with "
                f"`crossrank add SOURCE --index {root}`"
            )
        if top.n_shards != shards:
            raise InvalidArgumentError(
                f"{root} has {top.n_shards} shards, not {shards}; rebuild with --shards "
                f"{top.n_shards}, or build {shards} shards into a new folder"
            )
        return
    foreign = [n for n in names if not _own_root_entry(n)]
    if foreign:
        shown = some_of(foreign)
        raise InvalidArgumentError(
            f"--index {root} is a folder that is not a crossrank index and is not empty (it holds "
            f"{shown}); crossrank never writes into it: choose an empty or new folder"
        )


class ShardedBuilder:
    """Writes a new sharded index from encoded images given in source order; a context manager.

    What :func:`build_sharded` uses after its encoder, and what another engine (the Ray build)
    feeds with the batches its workers encoded: the images must arrive in source order, since
    the ``i``-th image added gets id ``first_id + i`` and goes to shard ``id % N``. Each shard's
    patch rows stream into its patch store as they come; pooled vectors and records are kept
    until :meth:`commit` builds each shard's first stage and metadata. Leaving the block without
    :meth:`commit` (or by an exception) discards every shard's uncommitted generation.

    Args:
        index_dir: the sharded index folder (new, empty, or a sharded index with ``overwrite``).
        shards: N, the number of shards.
        patch_codec: as ``build_index``'s (each shard trains its own pq, if any).
        overwrite: replace the sharded index in ``index_dir`` (same N; ids continue after every
            id it gave).
        shard_paths: where the shards go (see :func:`build_sharded`).

    Example:
        >>> with ShardedBuilder("photos.idx", shards=4) as builder:  # doctest: +SKIP
        ...     for batch in encoded_batches:  # in source order
        ...         builder.add(batch.pooled, batch.patches, batch.records, batch.skipped)
        ...     builder.commit(encoder_info=encoder.info, index_config=IndexConfig())

    Raises:
        InvalidArgumentError: see :func:`build_sharded`.
        IndexLockedError: another process is writing ``index_dir``.
    """

    def __init__(
        self,
        index_dir: str | Path,
        *,
        shards: int,
        patch_codec: str | None = None,
        overwrite: bool = False,
        shard_paths: list[str | Path] | None = None,
    ) -> None:
        from crossrank.store.codecs import parse_codec
        from crossrank.write._common import check_index_path

        self.n = check_shards(shards)
        self.codec = parse_codec(patch_codec)
        self.root = Path(index_dir)
        check_index_path(self.root)
        paths = [str(p) for p in shard_paths] if shard_paths is not None else None
        if paths is not None and len(paths) != self.n:
            raise InvalidArgumentError(
                f"shard_paths names {len(paths)} folders for {self.n} shards"
            )
        self.paths = paths or [shard_dir_name(i) for i in range(self.n)]
        self.overwrite = overwrite
        _check_root(self.root, self.n, overwrite)
        self.pooled: list[np.ndarray] = []
        self.records: list[Any] = []
        self.skipped: list[Any] = []
        self.duplicates = 0
        self.patches = self  # encode_items appends patch rows to ``writer.patches``
        self._rows = 0  # patch rows routed so far
        self._created = not self.root.exists()
        self._stack: Any = None
        self._writers: list[Any] = []
        self.first_id = 0
        self.result: Any = None

    def __enter__(self) -> ShardedBuilder:
        from contextlib import ExitStack

        from crossrank.shards.write import sharded_write
        from crossrank.store import GenerationWriter

        stack = ExitStack()
        try:
            w = stack.enter_context(sharded_write(self.root, create=True))
            if w.top is not None:  # a rebuild keeps the shards where they are
                dirs = [ref.path for ref in w.top.shards]
                self.first_id = w.top.next_id
            else:
                dirs = [p if Path(p).is_absolute() else str(self.root / p) for p in self.paths]
                w.refs = [None] * self.n  # type: ignore[list-item]
                w.paths = list(self.paths)
            self._dirs = dirs
            for d in dirs:
                writer = GenerationWriter(d, patch_codec=self.codec.spec, gc=False)
                stack.callback(writer.abort)  # a no-op once committed
                self._writers.append(writer)
        except BaseException:
            stack.close()
            self._cleanup()
            raise
        self._write = w
        self._stack = stack
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._stack.__exit__(exc_type, exc, tb)
        finally:
            if self.result is None:
                self._cleanup()

    def _cleanup(self) -> None:
        if self._created:
            _remove_unused_root(self.root)

    def append(self, rows: np.ndarray) -> None:
        """Route patch rows ``(b, P, d)`` of the next ``b`` images to their shards' stores."""
        ids = np.arange(self.first_id + self._rows, self.first_id + self._rows + rows.shape[0])
        self._rows += rows.shape[0]
        dest = shard_of(ids, self.n)
        for s in np.unique(dest):
            self._writers[int(s)].patches.append(rows[dest == s])

    def add_encoded(
        self, pooled: np.ndarray, records: list[Any], skipped: list[Any] = (), duplicates: int = 0
    ) -> None:
        """The pooled vectors ``(b, D)`` and records of images whose patches were appended."""
        if len(records):
            self.pooled.append(np.asarray(pooled, dtype=np.float32))
            self.records.extend(records)
        self.skipped.extend(skipped)
        self.duplicates += duplicates

    def add(
        self,
        pooled: np.ndarray,
        patches: np.ndarray,
        records: list[Any],
        skipped: list[Any] = (),
        duplicates: int = 0,
    ) -> None:
        """The next encoded images, in source order: pooled ``(b, D)``, patches ``(b, P, d)``,
        one :class:`~crossrank.ingest.ImageRecord` each, and the files skipped among them."""
        if len(records):
            self.append(np.asarray(patches))
        self.add_encoded(pooled, records, skipped, duplicates)

    def commit(
        self,
        *,
        encoder_info: dict[str, Any],
        index_config: Any,
        extra_schema: Any = None,
        source: str | None = None,
    ) -> Any:
        """Write every shard's first stage, vectors, ids and metadata, commit each, then name them
        all in ``shards.json``. Returns the :class:`~crossrank.shards.ShardsManifest`.

        Raises:
            SourceError: no image was added.
            InvalidArgumentError: fewer images than shards.
        """
        from crossrank.indexes import FirstStage
        from crossrank.write.build import metadata_table, skipped_table

        n, records, skipped = self.n, self.records, self.skipped
        if len(records) < n:
            reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
            if not records:
                raise SourceError(
                    f"none of the {len(skipped)} files of {source or 'the source'} could be "
                    f"decoded ({reasons}); check that SOURCE holds images"
                )
            raise InvalidArgumentError(
                f"--shards {n} is more than the {len(records)} images that could be indexed "
                f"({len(skipped)} files skipped); use --shards {len(records)} or fewer"
            )
        xb = np.concatenate(self.pooled).astype(np.float32, copy=False)
        ids = self.first_id + np.arange(len(records), dtype=np.int64)
        dest = shard_of(ids, n)
        self.first_info: dict[str, Any] = {}
        for s, writer in enumerate(self._writers):
            rows = np.flatnonzero(dest == s)
            xs = np.ascontiguousarray(xb[rows])
            first_stage = FirstStage.build(xs, ids[rows], index_config)
            first_stage.save(writer.first_stage_path)
            writer.write_vectors(xs)
            writer.write_ids(ids[rows])
            writer.write_metadata(
                metadata_table(ids[rows], [records[i] for i in rows], extra_schema)
            )
            writer.write_skipped(skipped_table(skipped if s == 0 else []))
            info = {
                **first_stage.info,
                "metric": "inner_product",
                "auto": index_config.factory is None,
            }
            self.first_info = self.first_info or info
            fields: dict[str, Any] = {"shard": {"index": s, "of": n}}
            if source is not None:
                fields["source"] = source
            writer.commit(encoder=encoder_info, first_stage=info, **fields)
            self._write.committed_at(s, self._dirs[s])
        self.result = self._write.commit(
            encoder=dict(encoder_info),
            next_id=int(ids[-1]) + 1,
            extra={"source": source} if source is not None else {},
        )
        return self.result


def build_sharded(
    source: str | Path,
    index_dir: str | Path,
    *,
    shards: int,
    model: str | Path | None = None,
    batch_size: int = 64,
    device: str = "auto",
    factory: str | None = None,
    nprobe: int | None = None,
    workers: int = 4,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    patch_codec: str | None = None,
    shard_paths: list[str | Path] | None = None,
) -> BuildReport:
    """Index every image of ``source`` into a new sharded index of ``shards`` shards.

    Arguments as :func:`crossrank.write.build.build_index`, and:

    Args:
        shards: the number of shards N (>= 1, at most the number of images).
        shard_paths: where each shard folder goes (N paths; relative ones are under
            ``index_dir``); default ``index_dir/shard-000`` .... ``shards.json`` records them as
            given, so a shard may sit on another disk.

    Returns:
        A :class:`~crossrank.write.BuildReport` (``generation`` is the top generation).

    Raises:
        InvalidArgumentError: ``shards`` below 1 or above the number of images, a folder that
            is not a sharded index, a rebuild with another number of shards; and everything
            ``build_index`` raises.

    Example:
        >>> build_sharded("photos/", "photos.idx", shards=4)  # doctest: +SKIP
    """
    from crossrank.encoders import load_encoder
    from crossrank.ingest import discover
    from crossrank.write._common import writing
    from crossrank.write.build import (
        BuildReport,
        check_counts,
        check_factory,
        checked_index_config,
        encode_items,
    )

    n = check_shards(shards)
    check_counts(batch_size=batch_size, workers=workers)
    index_config = checked_index_config(factory, device, nprobe)
    root = Path(index_dir)
    builder = ShardedBuilder(
        root, shards=n, patch_codec=patch_codec, overwrite=overwrite, shard_paths=shard_paths
    )
    start = time.perf_counter()
    src = discover(source)
    total = len(src.items)
    if n > total:
        raise InvalidArgumentError(
            f"--shards {n} is more than the {total} files in {source}; every shard needs at "
            f"least one image: use --shards {max(1, total)} or fewer"
        )
    encoder = load_encoder(model, device=device, batch_size=batch_size)
    if index_config.factory is not None:
        check_factory(index_config.factory, encoder.dim)
    codec = builder.codec
    codec.configure(encoder.n_patches, encoder.patch_dim)
    if codec.needs_training:  # each shard trains its own: on its share of the images
        per_shard = total // n
        codec.check_trainable(
            per_shard * encoder.n_patches,
            encoder.n_patches,
            f"each shard's {per_shard:,} files (SOURCE's {total:,} in {n} shards)",
        )
    with writing(root, "build"), builder:
        pooled, records, skipped, duplicates = encode_items(
            builder, encoder, src.items, batch_size=batch_size, workers=workers, progress=progress
        )
        builder.add_encoded(
            np.concatenate(pooled) if pooled else np.zeros((0, encoder.dim), np.float32),
            records,
            skipped,
            duplicates,
        )
        top = builder.commit(
            encoder_info=encoder.info,
            index_config=index_config,
            extra_schema=src.extra_schema,
            source=str(Path(source).resolve()),
        )
    logger.info("built %s: %d images in %d shards", root, len(records), n)
    return BuildReport(
        index_dir=root,
        generation=top.generation,
        indexed=len(records),
        skipped=len(skipped),
        seconds=time.perf_counter() - start,
        factory=str(builder.first_info.get("factory", "")),
        model=encoder.model_id,
        duplicates=duplicates,
        patch_codec=builder.codec.spec,
    )


def _remove_unused_root(root: Path) -> None:
    """A first build that failed before its commit leaves no folder behind (only what it made)."""
    import shutil

    if is_sharded(root) or not root.is_dir():
        return
    if all(_own_root_entry(e.name) for e in root.iterdir()):
        shutil.rmtree(root, ignore_errors=True)


def build_sharded_from_arrays(
    index_dir: str | Path,
    vectors: Any,
    patches: Any,
    metadata: Any = None,
    *,
    shards: int,
    ids: Any = None,
    model: str | Path | None = None,
    encoder_info: dict[str, Any] | None = None,
    factory: str | None = None,
    nprobe: int | None = None,
    patch_codec: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    shard_paths: list[str | Path] | None = None,
) -> BuildReport:
    """A sharded index from a backend's pooled vectors, patches and metadata (nothing encoded).

    Row ``i`` gets id ``ids[i]`` (default ``0..n-1``, after every id the index gave with
    ``overwrite``) and goes to shard ``ids[i] % shards``; each shard is written by
    :func:`crossrank.write.build_from_arrays` (every argument is checked there, in one line),
    then ``shards.json`` names them all. With the default ids a shard's rows are a strided view
    of ``vectors`` and ``patches`` (a memory map is read a chunk at a time); explicit ids gather
    each shard's rows into memory first.

    Args:
        shards: the number of shards N (>= 1, at most the number of rows).
        shard_paths: where the shards go (see :func:`build_sharded`).
        The others: as :func:`crossrank.write.build_from_arrays`.

    Returns:
        A :class:`~crossrank.write.BuildReport` (``generation`` is the top generation).

    Raises:
        InvalidArgumentError: a bad ``shards``, more shards than rows, ids that leave a shard
            empty, and everything ``build_from_arrays`` raises.
    """
    import pyarrow as pa

    from crossrank.shards.write import sharded_write
    from crossrank.store import has_index
    from crossrank.write._common import check_index_path, writing
    from crossrank.write.arrays import build_from_arrays
    from crossrank.write.build import BuildReport

    n_shards = check_shards(shards)
    root = Path(index_dir)
    check_index_path(root)
    n = int(getattr(vectors, "shape", (len(vectors),))[0])
    if n_shards > n:
        raise InvalidArgumentError(
            f"--shards {n_shards} is more than the {n} images given; use {n} shards or fewer"
        )
    table = None
    if metadata is not None:
        table = metadata if isinstance(metadata, pa.Table) else pa.table(metadata)
    paths = [str(p) for p in shard_paths] if shard_paths is not None else None
    if paths is not None and len(paths) != n_shards:
        raise InvalidArgumentError(f"shard_paths names {len(paths)} folders for {n_shards} shards")
    paths = paths or [shard_dir_name(i) for i in range(n_shards)]
    _check_root(root, n_shards, overwrite)
    start = time.perf_counter()
    created = not root.exists()
    try:
        with writing(root, "build"), sharded_write(root, create=True) as w:
            given = ids
            if given is None and table is not None and "id" in table.column_names:
                given = table.column("id").to_numpy()
            first_id = w.top.next_id if w.top is not None else 0
            strided = given is None
            all_ids = (
                first_id + np.arange(n, dtype=np.int64)
                if strided
                else np.asarray(given).astype(np.int64, copy=False)
            )
            if all_ids.ndim != 1 or all_ids.shape[0] != n:
                raise InvalidArgumentError(
                    f"ids must be {n} integers (one per row), got shape {all_ids.shape}"
                )
            dest = shard_of(all_ids, n_shards)
            if w.top is not None:
                dirs = [ref.path for ref in w.top.shards]
            else:
                dirs = [p if Path(p).is_absolute() else str(root / p) for p in paths]
                w.refs = [None] * n_shards  # type: ignore[list-item]
                w.paths = list(paths)
            reports = []
            for s in range(n_shards):
                if strided:  # id = first_id + row: shard s holds every N-th row, a view
                    rows: Any = slice((s - first_id) % n_shards, None, n_shards)
                    shard_ids = all_ids[rows]
                else:
                    rows = np.flatnonzero(dest == s)
                    shard_ids = all_ids[rows]
                if not shard_ids.size:
                    raise InvalidArgumentError(
                        f"no id falls to shard {s} (id % {n_shards} == {s}); every shard needs an "
                        f"image: use fewer shards or ids that spread over them"
                    )
                reports.append(
                    build_from_arrays(
                        dirs[s],
                        vectors[rows],
                        patches[rows],
                        None if table is None else _take(table, rows, n),
                        ids=shard_ids,
                        model=model,
                        encoder_info=encoder_info,
                        factory=factory,
                        nprobe=nprobe,
                        patch_codec=patch_codec,
                        overwrite=has_index(dirs[s]),
                        device=device,
                    )
                )
                w.committed_at(s, dirs[s])
            from crossrank.store import read_manifest

            encoder = read_manifest(dirs[0]).encoder
            next_id = max(int(all_ids.max()) + 1, w.top.next_id if w.top is not None else 0)
            top = w.commit(encoder=encoder, next_id=next_id, extra={"source": "<arrays>"})
    except BaseException:
        if created:
            _remove_unused_root(root)
        raise
    return BuildReport(
        index_dir=root,
        generation=top.generation,
        indexed=n,
        skipped=0,
        seconds=time.perf_counter() - start,
        factory=reports[0].factory,
        model=reports[0].model,
        duplicates=0,
        patch_codec=reports[0].patch_codec,
    )


def _take(table: Any, rows: Any, n: int) -> Any:
    """The metadata rows of one shard (``rows`` a slice or positions)."""
    import pyarrow as pa

    if isinstance(rows, slice):
        rows = np.arange(n)[rows]
    return table.take(pa.array(rows))
