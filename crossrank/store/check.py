"""Checking generations and index directories for consistency (``crossrank verify``).

A generation is sound when every file ``generation.json`` lists is present with its recorded
size, the row counts of every per-image file agree, the ids are sorted and unique, the metadata
holds the id table's ids in the same order, and the tombstones are sorted, unique ids of the id
table. The FAISS index's count is checked by :func:`crossrank.api.index.verify_index`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crossrank.errors import IndexCorruptError
from crossrank.store._files import read_npy_header
from crossrank.store.layout import (
    FIRST_STAGE_NAME,
    IDS_NAME,
    SKIPPED_NAME,
    TOMBSTONES_NAME,
    VECTORS_NAME,
    GenerationInfo,
    read_generation_info,
)
from crossrank.store.manifest import read_manifest

__all__ = ["check_generation", "check_index"]


def _check_npy(
    path: Path, shape: tuple[int, ...], dtype: str, label: str, problems: list[str]
) -> bool:
    try:
        got_shape, got_dtype = read_npy_header(path)
    except (OSError, ValueError) as e:
        problems.append(f"{label} {path} is not a readable .npy file ({e})")
        return False
    if got_dtype != np.dtype(dtype):
        problems.append(f"{label} {path} has dtype {got_dtype}, expected {dtype}")
        return False
    if tuple(got_shape) != tuple(shape):
        problems.append(f"{label} {path} has shape {tuple(got_shape)}, expected {tuple(shape)}")
        return False
    return True


def check_generation(gen_dir: Path | str) -> list[str]:
    """Check that a generation folder is complete and self-consistent.

    Checks every file ``generation.json`` lists is present with its recorded size; the row counts
    of vectors, ids, patch shards, metadata parts and skipped files agree with the recorded counts;
    the ids are sorted and unique and below ``next_id``; the metadata holds the id table's ids in
    the same order; the tombstones are sorted, unique ids of the id table. The FAISS index's count
    is the caller's to check (``crossrank.indexes``).

    Args:
        gen_dir: the generation folder.

    Returns:
        One line per problem, most basic first; empty when the generation is sound.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen_dir = Path(gen_dir)
    try:
        info = read_generation_info(gen_dir)
    except IndexCorruptError as e:
        return [str(e)]
    problems: list[str] = []
    present: set[str] = set()
    for name, size in info.files.items():
        path = gen_dir / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        present.add(name)
        actual = path.stat().st_size
        if actual != size:
            problems.append(f"{path} has {actual} bytes, generation.json records {size}")
    required = [VECTORS_NAME, IDS_NAME, SKIPPED_NAME, FIRST_STAGE_NAME]
    required += [s.file for s in info.patch_shards] + [p.file for p in info.metadata_parts]
    for name in required:
        if name not in info.files:
            problems.append(f"generation.json of {gen_dir} does not list {name}")

    n = info.n_images
    if VECTORS_NAME in present:
        _check_npy(gen_dir / VECTORS_NAME, (n, info.vector_dim), "float32", "vectors", problems)

    ids = None
    if IDS_NAME in present and _check_npy(gen_dir / IDS_NAME, (n,), "int64", "ids", problems):
        ids = np.load(gen_dir / IDS_NAME, mmap_mode="r")
        bad = np.flatnonzero(ids[1:] <= ids[:-1]) if n > 1 else np.zeros(0, np.int64)
        if bad.size:
            i = int(bad[0])
            problems.append(
                f"ids are not sorted and unique: ids[{i}] = {ids[i]}, ids[{i + 1}] = {ids[i + 1]}"
            )
            ids = None
    if ids is not None and n and info.next_id is not None and info.next_id <= int(ids[-1]):
        problems.append(
            f"generation.json has next_id {info.next_id}, but ids.npy already holds id "
            f"{int(ids[-1])}: a later add would give an id twice"
        )

    patch_rows = sum(s.rows for s in info.patch_shards)
    if patch_rows != n:
        problems.append(f"patch shards hold {patch_rows} rows in total, expected {n} images")
    for shard in info.patch_shards:
        if shard.file in present:
            shape = (shard.rows, info.n_patches, info.patch_dim)
            _check_npy(gen_dir / shard.file, shape, "float16", "patch shard", problems)

    meta_rows = sum(p.rows for p in info.metadata_parts)
    if meta_rows != n:
        problems.append(f"metadata parts hold {meta_rows} rows in total, expected {n} images")
    meta_ids = []
    for part in info.metadata_parts:
        if part.file not in present:
            continue
        path = gen_dir / part.file
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
            if rows != part.rows:
                problems.append(
                    f"metadata part {path} has {rows} rows, generation.json records {part.rows}"
                )
            meta_ids.append(pq.read_table(path, columns=["id"]).column("id").to_numpy())
        except (OSError, KeyError, pa.ArrowException) as e:
            problems.append(f"metadata part {path} cannot be read ({type(e).__name__}: {e})")
    if ids is not None and len(meta_ids) == len(info.metadata_parts):
        # Every per-image file shares the id table's row order; so must the metadata.
        all_meta = np.concatenate(meta_ids) if meta_ids else np.zeros(0, np.int64)
        if all_meta.shape == ids.shape:
            differ = np.flatnonzero(all_meta != ids)
            if differ.size:
                i = int(differ[0])
                problems.append(
                    f"metadata row {i} has id {all_meta[i]}, but ids.npy has {ids[i]} there: the "
                    f"metadata must hold the id table's ids in the same order"
                )

    if info.n_tombstones or TOMBSTONES_NAME in info.files:
        _check_tombstones(gen_dir, info, ids, present, problems)

    if SKIPPED_NAME in present:
        try:
            rows = pq.ParquetFile(gen_dir / SKIPPED_NAME).metadata.num_rows
            if rows != info.n_skipped:
                problems.append(
                    f"{gen_dir / SKIPPED_NAME} has {rows} rows, counts.skipped is {info.n_skipped}"
                )
        except (OSError, pa.ArrowException) as e:
            problems.append(f"{gen_dir / SKIPPED_NAME} cannot be read ({type(e).__name__}: {e})")
    return problems


def _check_tombstones(
    gen_dir: Path,
    info: GenerationInfo,
    ids: np.ndarray | None,
    present: set[str],
    problems: list[str],
) -> None:
    """Tombstones: listed when counted, int64 of the counted length, sorted, unique, in ids."""
    path = gen_dir / TOMBSTONES_NAME
    if TOMBSTONES_NAME not in info.files:
        problems.append(
            f"generation.json of {gen_dir} counts {info.n_tombstones} tombstones, but "
            f"does not list {TOMBSTONES_NAME}"
        )
        return
    if TOMBSTONES_NAME not in present:  # reported as missing already
        return
    if not _check_npy(path, (info.n_tombstones,), "int64", "tombstones", problems):
        return
    dead = np.load(path, mmap_mode="r")
    if dead.size > 1 and not (dead[1:] > dead[:-1]).all():
        problems.append(f"tombstones {path} are not sorted and unique")
    elif ids is not None and dead.size:
        pos = np.searchsorted(ids, dead)
        ok = pos < ids.size
        ok[ok] = ids[np.minimum(pos, ids.size - 1)][ok] == dead[ok]
        if not ok.all():
            problems.append(
                f"tombstones {path} hold id {int(dead[~ok][0])}, which is not in ids.npy"
            )


def check_index(root: Path | str) -> list[str]:
    """Check an index directory's manifest and current generation (not the FAISS count).

    Args:
        root: the index directory.

    Returns:
        One line per problem; empty when sound.

    Raises:
        IndexNotFoundError: no committed index in ``root``.
    """
    try:
        manifest = read_manifest(root)
    except IndexCorruptError as e:
        return [str(e)]
    problems = check_generation(manifest.generation_path)
    try:
        info = read_generation_info(manifest.generation_path)
    except IndexCorruptError:
        return problems
    # The manifest counts the images a search can return; generation.json counts rows.
    for key, value in (
        ("images", info.n_live),
        ("skipped", info.n_skipped),
        ("tombstones", info.n_tombstones),
    ):
        if manifest.counts.get(key, 0 if key == "tombstones" else value) != value:
            problems.append(
                f"manifest counts.{key} is {manifest.counts[key]}, generation "
                f"{manifest.generation_dir} holds {value}"
            )
    return problems
