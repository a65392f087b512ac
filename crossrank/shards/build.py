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

from crossrank.errors import InvalidArgumentError, SourceError
from crossrank.shards.layout import SHARDS_NAME, is_sharded, shard_dir_name, shard_of

if TYPE_CHECKING:
    from crossrank.write.build import BuildReport, ProgressFn

__all__ = ["build_sharded", "check_shards"]

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
        shown = ", ".join(foreign[:3]) + (
            f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        )
        raise InvalidArgumentError(
            f"--index {root} is a folder that is not a crossrank index and is not empty (it holds "
            f"{shown}); crossrank never writes into it: choose an empty or new folder"
        )


class _Router:
    """``writer.patches.append(rows)`` for :func:`encode_items`: row ``i`` of the build gets id
    ``start + i`` and goes to its shard's patch store."""

    def __init__(self, writers: list[Any], start: int) -> None:
        self.writers = writers
        self.next = start
        self.patches = self

    def append(self, rows: np.ndarray) -> None:
        ids = np.arange(self.next, self.next + rows.shape[0], dtype=np.int64)
        self.next += rows.shape[0]
        dest = shard_of(ids, len(self.writers))
        for s in np.unique(dest):
            self.writers[int(s)].patches.append(rows[dest == s])


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
    from crossrank.indexes import FirstStage, IndexConfig
    from crossrank.ingest import discover
    from crossrank.shards.write import sharded_write
    from crossrank.store import GenerationWriter
    from crossrank.store.codecs import parse_codec
    from crossrank.write._common import check_index_path, writing
    from crossrank.write.build import (
        BuildReport,
        check_factory,
        encode_items,
        metadata_table,
        skipped_table,
    )

    n = check_shards(shards)
    codec = parse_codec(patch_codec)
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
    root = Path(index_dir)
    check_index_path(root)
    paths = [str(p) for p in shard_paths] if shard_paths is not None else None
    if paths is not None and len(paths) != n:
        raise InvalidArgumentError(f"shard_paths names {len(paths)} folders for {n} shards")
    paths = paths or [shard_dir_name(i) for i in range(n)]
    try:
        index_config = IndexConfig(
            factory=factory, device=device, **({"nprobe": nprobe} if nprobe else {})
        )
    except ValueError as e:
        raise InvalidArgumentError(str(e)) from e
    if index_config.factory is not None:
        check_factory(index_config.factory)
    _check_root(root, n, overwrite)
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
    codec.configure(encoder.n_patches, encoder.patch_dim)
    created = not root.exists()
    with writing(root, "build"):
        try:
            with sharded_write(root, create=True) as w:
                first_id = w.top.next_id if w.top is not None else 0
                dirs = [p if Path(p).is_absolute() else str(root / p) for p in paths]
                if w.top is not None:  # a rebuild keeps the shards where they are
                    dirs = [ref.path for ref in w.top.shards]
                else:
                    w.refs = [None] * n  # type: ignore[list-item]
                    w.paths = list(paths)
                writers: list[Any] = []
                try:
                    for d in dirs:
                        writers.append(GenerationWriter(d, patch_codec=codec.spec, gc=False))
                    pooled, records, skipped, duplicates = encode_items(
                        _Router(writers, first_id),
                        encoder,
                        src.items,
                        batch_size=batch_size,
                        workers=workers,
                        progress=progress,
                    )
                    if len(records) < n:
                        reasons = "; ".join(f"{s.path}: {s.reason}" for s in skipped[:3])
                        if not records:
                            raise SourceError(
                                f"none of the {total} files in {source} could be decoded "
                                f"({reasons}); check that SOURCE holds images"
                            )
                        raise InvalidArgumentError(
                            f"--shards {n} is more than the {len(records)} images of {source} "
                            f"that could be indexed ({len(skipped)} skipped); use --shards "
                            f"{len(records)} or fewer"
                        )
                    xb = np.concatenate(pooled).astype(np.float32, copy=False)
                    ids = first_id + np.arange(len(records), dtype=np.int64)
                    dest = shard_of(ids, n)
                    first_info: dict[str, Any] = {}
                    for s, writer in enumerate(writers):
                        rows = np.flatnonzero(dest == s)
                        xs = np.ascontiguousarray(xb[rows])
                        first_stage = FirstStage.build(xs, ids[rows], index_config)
                        first_stage.save(writer.first_stage_path)
                        writer.write_vectors(xs)
                        writer.write_ids(ids[rows])
                        writer.write_metadata(
                            metadata_table(ids[rows], [records[i] for i in rows], src.extra_schema)
                        )
                        writer.write_skipped(skipped_table(skipped if s == 0 else []))
                        info = {
                            **first_stage.info,
                            "metric": "inner_product",
                            "auto": index_config.factory is None,
                        }
                        first_info = first_info or info
                        writer.commit(
                            encoder=encoder.info,
                            first_stage=info,
                            counts={
                                "images": int(rows.size),
                                "skipped": len(skipped) if s == 0 else 0,
                            },
                            source=str(Path(source).resolve()),
                            shard={"index": s, "of": n},
                        )
                        w.committed_at(s, dirs[s])
                finally:
                    for writer in writers:
                        writer.abort()  # no-op for the committed ones
                top = w.commit(
                    encoder=encoder.info,
                    next_id=int(ids[-1]) + 1,
                    extra={"source": str(Path(source).resolve())},
                )
        except BaseException:
            if created:
                _remove_unused_root(root)
            raise
    logger.info("built %s: %d images in %d shards", root, len(records), n)
    return BuildReport(
        index_dir=root,
        generation=top.generation,
        indexed=len(records),
        skipped=len(skipped),
        seconds=time.perf_counter() - start,
        factory=str(first_info.get("factory", "")),
        model=encoder.model_id,
        duplicates=duplicates,
        patch_codec=codec.spec,
    )


def _remove_unused_root(root: Path) -> None:
    """A first build that failed before its commit leaves no folder behind (only what it made)."""
    import shutil

    if is_sharded(root) or not root.is_dir():
        return
    if all(_own_root_entry(e.name) for e in root.iterdir()):
        shutil.rmtree(root, ignore_errors=True)
