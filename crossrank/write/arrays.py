"""Building an index from arrays a search backend already has: no image is decoded or encoded.

A backend with its own embeddings gives :func:`build_from_arrays` its pooled vectors ``(n, D)``,
its patch features ``(n, P, d)`` and a metadata table, and says which encoder queries will be
encoded with: ``model=`` (a Hugging Face id or folder; its ``info`` is recorded exactly as
``crossrank build`` records it, so text and image queries work) or ``encoder_info=`` (a backend that
only ever searches by vectors: text queries are then refused in one line, pointing to
:meth:`crossrank.Index.search_vectors` and :meth:`crossrank.Index.rerank`).

Every input is checked before anything is written (shapes, dtypes, ids, NaN), each in one line.
The generation is written through :class:`~crossrank.store.GenerationWriter` as a build writes
it: the FAISS first stage over the pooled vectors, ``vectors.npy``, ``ids.npy``, patch shards
(fp16, or the ``patch_codec`` asked for) and metadata parts, committed atomically. The patches
are read in chunks of ``chunk_rows`` images (a memory-mapped array is never loaded whole).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.encoders.config import VECTORS_ONLY_KEY
from crossrank.errors import InvalidArgumentError
from crossrank.write._common import check_index_path, writing
from crossrank.write.build import BuildReport, checked_index_config, refuse_foreign_folder

__all__ = ["build_from_arrays", "VECTORS_ONLY_KEY", "ARRAYS_SOURCE"]

logger = logging.getLogger(__name__)


#: The manifest ``source`` of an index built from arrays.
ARRAYS_SOURCE = "<arrays>"


def build_from_arrays(
    index_dir: str | Path,
    vectors: Any,
    patches: Any,
    metadata: Any = None,
    *,
    ids: Any = None,
    model: str | Path | None = None,
    encoder_info: Mapping[str, Any] | None = None,
    factory: str | None = None,
    nprobe: int | None = None,
    patch_codec: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    chunk_rows: int = 1024,
) -> BuildReport:
    """Write a new index from pooled vectors, patch features and a metadata table.

    Args:
        index_dir: the index directory (created if missing; new, empty, or a crossrank index).
        vectors: float ``(n, D)`` pooled vectors, L2-normalised (the first stage scores by inner
            product); any float dtype, stored as float32. A memory map is fine.
        patches: float16 or float32 ``(n, P, d)`` patch features, row ``i`` the image of
            ``vectors[i]``; read ``chunk_rows`` images at a time (a memory map is fine).
        metadata: one row per image: a ``pyarrow.Table`` or anything ``pyarrow.table()`` takes
            (a dict of columns, a pandas DataFrame); None for none. A ``path`` column (strings)
            is what hits show as their path (``""`` without one); an ``id`` column gives the ids
            when ``ids`` is not passed (and must equal it when it is); every other column can be
            filtered on with ``where``.
        ids: int64 ``(n,)`` unique non-negative ids, the ids searches return; default
            ``0..n-1`` in a new folder (after every id the folder ever gave, with ``overwrite``).
        model: the encoder queries will be encoded with (a Hugging Face id or folder, None for
            the demo model when ``encoder_info`` is None too); it is loaded once to record its
            ``info`` and check ``D``, ``P`` and ``d`` against it.
        encoder_info: instead of ``model``, for a backend that searches by vectors only: a
            mapping with at least ``model_id`` (a name for the backend's encoder), recorded with
            ``vectors_only: true``. ``Index.search`` of a text or image then refuses in one line.
        factory: a FAISS factory string; None picks Flat or IVF by corpus size, as a build does.
        nprobe: IVF lists probed per search, recorded as the index's default.
        patch_codec: ``fp16`` (None), ``int8``, ``binary``, ``pq``, ``pq:M``, ``pq:MxB``, or
            ``opq`` in the same forms (see :mod:`crossrank.store.codecs`).
        overwrite: replace an index that already exists in ``index_dir``.
        device: where ``model`` is loaded to read its info (``cpu`` by default).
        chunk_rows: images per chunk read from ``patches``.

    Returns:
        A :class:`~crossrank.write.BuildReport` (``skipped`` 0).

    Raises:
        InvalidArgumentError: a bad shape, dtype, NaN or inf, bad ids, a metadata table of
            another length or with a non-string ``path``, both or a bad ``encoder_info``, sizes
            that differ from the model's, an unknown patch codec or one that cannot be trained on
            ``n`` images, a bad factory, or an existing index without ``overwrite``.
        ModelError: ``model`` cannot be loaded.
        IndexLockedError: another process is writing ``index_dir``.
        IndexWriteError: the operating system refused a write; nothing was committed.

    Example:
        >>> build_from_arrays(  # doctest: +SKIP
        ...     "shop.idx", xb, patches, {"path": urls, "price": prices},
        ...     ids=product_ids, model="openai/clip-vit-base-patch32",
        ... )
    """
    from crossrank.store.codecs import parse_codec

    start = time.perf_counter()
    codec = parse_codec(patch_codec)
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise InvalidArgumentError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    index_dir = Path(index_dir)
    check_index_path(index_dir)
    xb = _check_vectors(vectors)
    n, dim = xb.shape
    pt = _check_patches(patches, n, chunk_rows)
    table = _check_metadata(metadata, n)
    ids = _check_ids(ids, table, n)
    index_config = _index_config(factory, nprobe, dim)
    info = _encoder_info(model, encoder_info, device, dim, pt.shape[1:])
    codec.configure(int(pt.shape[1]), int(pt.shape[2]))
    if codec.needs_training:
        codec.check_trainable(n * int(pt.shape[1]), int(pt.shape[1]), f"the {n:,} images given")

    from crossrank.store import WriterLock

    with writing(index_dir, "build"):
        refuse_foreign_folder(index_dir)
        with WriterLock(index_dir) as lock:
            try:
                generation, first_info = _write(
                    index_dir,
                    lock,
                    xb,
                    pt,
                    table,
                    ids,
                    info,
                    index_config,
                    codec,
                    chunk_rows=chunk_rows,
                    overwrite=overwrite,
                )
            except BaseException:
                lock.remove_root_if_unused()  # a first build that failed leaves no folder behind
                raise
    logger.info("built %s from arrays: %d images, %s patches", index_dir, n, codec.spec)
    return BuildReport(
        index_dir=index_dir,
        generation=generation,
        indexed=n,
        skipped=0,
        seconds=time.perf_counter() - start,
        factory=first_info["factory"],
        model=str(info["model_id"]),
        duplicates=0,
        patch_codec=codec.spec,
    )


def _write(
    index_dir: Path,
    lock: Any,
    xb: np.ndarray,
    pt: np.ndarray,
    table: Any,
    ids: np.ndarray | None,
    info: dict[str, Any],
    index_config: Any,
    codec: Any,
    *,
    chunk_rows: int,
    overwrite: bool,
) -> tuple[int, dict[str, Any]]:
    import pyarrow as pa

    from crossrank.indexes import FirstStage
    from crossrank.store import GenerationWriter, has_index, read_manifest
    from crossrank.write.build import skipped_table

    if has_index(index_dir) and not overwrite:
        count = read_manifest(index_dir).counts.get("images", "?")
        raise InvalidArgumentError(
            f"{index_dir} already holds an index ({count} images); pass overwrite=True to "
            "replace it (the current generation stays readable until the new one commits)"
        )
    n = xb.shape[0]
    with GenerationWriter(index_dir, lock=lock, patch_codec=codec) as writer:
        if ids is None:
            ids = writer.take_ids(n)
            order = None  # already ascending: rows are written as given
        else:
            order = np.argsort(ids, kind="stable")
            if np.array_equal(order, np.arange(n)):
                order = None
            ids = ids if order is None else ids[order]
        # Rows go in id order (the order every per-image file of a generation shares).
        xs = np.ascontiguousarray(xb if order is None else xb[order], dtype=np.float32)
        first_stage = FirstStage.build(xs, ids, index_config)
        first_stage.save(writer.first_stage_path)
        writer.write_vectors(xs)
        del xs
        writer.write_ids(ids)
        for i0 in range(0, n, chunk_rows):
            rows = slice(i0, i0 + chunk_rows) if order is None else order[i0 : i0 + chunk_rows]
            writer.patches.append(pt[rows])
        columns: dict[str, Any] = {"id": pa.array(ids, type=pa.int64())}
        if table is not None and order is not None:
            table = table.take(pa.array(order))
        if table is None or "path" not in table.column_names:
            columns["path"] = pa.array([""] * n, type=pa.string())
        if table is not None:
            for name in table.column_names:
                if name != "id":
                    columns[name] = table.column(name)
        writer.write_metadata(pa.table(columns))
        writer.write_skipped(skipped_table([]))
        first_info = {
            **first_stage.info,
            "metric": "inner_product",
            "auto": index_config.factory is None,
        }
        generation = writer.commit(
            encoder=info,
            first_stage=first_info,
            counts={"images": n, "skipped": 0},
            source=ARRAYS_SOURCE,
        )
    return generation, first_info


# -- checks, each one line, before anything is written ---------------------------------------------


def _check_vectors(vectors: Any) -> np.ndarray:
    arr = np.asarray(vectors) if not isinstance(vectors, np.ndarray) else vectors
    if arr.ndim != 2 or arr.dtype.kind != "f" or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise InvalidArgumentError(
            f"vectors must be a float array of shape (n, D) with n, D >= 1, got {arr.dtype} of "
            f"shape {arr.shape}; pass the pooled vectors as a 2-d float32 array"
        )
    for i0 in range(0, arr.shape[0], 1 << 16):
        bad = ~np.isfinite(arr[i0 : i0 + (1 << 16)]).all(axis=1)
        if bad.any():
            raise InvalidArgumentError(
                f"vectors[{i0 + int(np.flatnonzero(bad)[0])}] holds NaN or inf; every pooled "
                "vector must be finite"
            )
    return arr


def _check_patches(patches: Any, n: int, chunk_rows: int) -> np.ndarray:
    arr = np.asarray(patches) if not isinstance(patches, np.ndarray) else patches
    if arr.ndim != 3 or arr.dtype not in (np.float16, np.float32):
        raise InvalidArgumentError(
            f"patches must be a float16 or float32 array of shape (n, P, d), got {arr.dtype} of "
            f"shape {arr.shape}"
        )
    if arr.shape[0] != n:
        raise InvalidArgumentError(
            f"patches hold {arr.shape[0]} images but vectors hold {n}; row i of both must be "
            "the same image"
        )
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise InvalidArgumentError(f"patches must have P, d >= 1, got shape {arr.shape}")
    for i0 in range(0, n, chunk_rows):
        with np.errstate(over="ignore"):
            half = np.asarray(arr[i0 : i0 + chunk_rows]).astype(np.float16, copy=False)
        bad = ~np.isfinite(half).all(axis=(1, 2))
        if bad.any():
            raise InvalidArgumentError(
                f"patches[{i0 + int(np.flatnonzero(bad)[0])}] holds values that are not finite "
                "in float16 (NaN, inf, or |x| > 65504); store normalised features"
            )
    return arr


def _check_metadata(metadata: Any, n: int) -> Any:
    import pyarrow as pa

    if metadata is None:
        return None
    if not isinstance(metadata, pa.Table):
        try:
            metadata = pa.table(metadata)
        except (TypeError, ValueError, pa.ArrowException) as e:
            raise InvalidArgumentError(
                f"metadata must be a pyarrow.Table or anything pyarrow.table() takes (a dict of "
                f"columns, a DataFrame), got {type(metadata).__name__}: {str(e).splitlines()[0]}"
            ) from e
    names = metadata.column_names
    if len(set(names)) != len(names):
        dupes = sorted({c for c in names if names.count(c) > 1})
        raise InvalidArgumentError(f"metadata has duplicate columns: {', '.join(dupes)}")
    if metadata.num_rows != n:
        raise InvalidArgumentError(
            f"metadata has {metadata.num_rows} rows but vectors hold {n} images; give one row "
            "per image, in the same order"
        )
    if "path" in names:
        col = metadata.column("path")
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise InvalidArgumentError(
                f"metadata column `path` must hold strings, got {col.type}; hits show it as "
                "their path"
            )
        if col.null_count:
            raise InvalidArgumentError(
                "metadata column `path` holds nulls; give every image a path (or '')"
            )
    return metadata


def _check_ids(ids: Any, table: Any, n: int) -> np.ndarray | None:
    from_table = None
    if table is not None and "id" in table.column_names:
        col = table.column("id")
        if col.null_count:
            raise InvalidArgumentError("metadata column `id` holds nulls; every image needs an id")
        from_table = col.to_numpy()
    if ids is None and from_table is None:
        return None
    arr = np.asarray(ids if ids is not None else from_table)
    what = "ids" if ids is not None else "metadata column `id`"
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.shape[0] != n:
        raise InvalidArgumentError(
            f"{what} must be {n} integers (one per image), got {arr.dtype} of shape {arr.shape}"
        )
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InvalidArgumentError(f"{what} must be >= 0, got {int(arr.min())}")
    uniq, counts = np.unique(arr, return_counts=True)
    if uniq.size != n:
        dupes = uniq[counts > 1]
        shown = ", ".join(str(i) for i in dupes[:10]) + (" ..." if dupes.size > 10 else "")
        raise InvalidArgumentError(f"{what} must be unique, but these appear twice: {shown}")
    if ids is not None and from_table is not None and not np.array_equal(arr, from_table):
        raise InvalidArgumentError(
            "ids and metadata column `id` differ; pass the ids once (either one)"
        )
    return arr


def _index_config(factory: str | None, nprobe: int | None, dim: int) -> Any:
    return checked_index_config(factory, "cpu", nprobe, dim)


def _encoder_info(
    model: str | Path | None,
    encoder_info: Mapping[str, Any] | None,
    device: str,
    dim: int,
    patch_shape: tuple[int, ...],
) -> dict[str, Any]:
    """The manifest's ``encoder`` record, after checking the arrays' sizes against it."""
    if encoder_info is not None:
        if model is not None:
            raise InvalidArgumentError(
                "give either model= (queries are encoded with it) or encoder_info= (queries are "
                "vectors only), not both"
            )
        if not isinstance(encoder_info, Mapping) or not isinstance(
            encoder_info.get("model_id"), str
        ):
            raise InvalidArgumentError(
                "encoder_info must be a mapping with a string `model_id` (a name for the "
                f"backend's encoder), got {encoder_info!r}"
            )
        info = {**dict(encoder_info), VECTORS_ONLY_KEY: True}
        info.setdefault("dim", dim)
        info.setdefault("n_patches", int(patch_shape[0]))
        info.setdefault("patch_dim", int(patch_shape[1]))
        _check_sizes(info, dim, patch_shape, "encoder_info")
        return info
    from crossrank.encoders import load_encoder

    encoder = load_encoder(model, device=device)
    info = dict(encoder.info)
    _check_sizes(info, dim, patch_shape, f"model {encoder.model_id}")
    return info


def _check_sizes(info: Mapping[str, Any], dim: int, patch_shape: tuple[int, ...], who: str) -> None:
    expected = (info.get("dim"), info.get("n_patches"), info.get("patch_dim"))
    got = (dim, int(patch_shape[0]), int(patch_shape[1]))
    if expected != got:
        raise InvalidArgumentError(
            f"{who} gives (D, P, d) = {expected}, but the arrays have vectors (n, {got[0]}) and "
            f"patches (n, {got[1]}, {got[2]}); pass the features of the model queries will be "
            "encoded with"
        )
