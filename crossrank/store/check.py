"""Checking generations and index directories for consistency (``crossrank verify``).

Two depths (see ``docs/design.md``, "Verifying an index"):

- quick (the default here): every file ``generation.json`` lists is present with its recorded
  size, the row counts of every per-image file agree, the ids are sorted and unique, the metadata
  holds the id table's ids in the same order, and the tombstones are sorted, unique ids of the id
  table. It reads headers, the id table, the tombstones and the metadata ids: fast at any size.
- full (``full=True``): the quick checks, then every byte of every file is hashed and compared
  with the checksum recorded at commit, which catches bytes changed in place (a flipped bit in
  the FAISS file, a patch shard, the vectors or a metadata part) that leave sizes and shapes
  intact. Generations written before checksums were recorded get a note saying so, not a problem.

Patch shards are checked against the generation's patch codec (:mod:`crossrank.store.codecs`):
its stored dtype and row shape, and its trained parameters (the pq quantiser) must load and fit.

Nothing here raises on a damaged file: each problem is one line of the report. The FAISS index's
count is checked by :func:`crossrank.api.verify.verify_index`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from crossrank.errors import CrossrankError, IndexCorruptError
from crossrank.store._files import load_npy, read_npy_header
from crossrank.store.codecs import open_codec, parse_codec
from crossrank.store.layout import (
    CHECKSUM_ALGORITHM,
    FIRST_STAGE_NAME,
    IDS_NAME,
    SKIPPED_NAME,
    TOMBSTONES_NAME,
    UNREADABLE,
    VECTORS_NAME,
    GenerationInfo,
    read_generation_info,
)
from crossrank.store.manifest import read_manifest

__all__ = [
    "CheckReport",
    "bytes_to_hash",
    "check_generation",
    "check_index",
    "file_digest",
    "inspect_generation",
    "inspect_index",
]

#: ``progress(n)``: a full check hashed ``n`` more bytes (for a progress bar).
Progress = Callable[[int], None]

_CHUNK = 1 << 20  # bytes read per hash update: large enough to stream at disk speed
_READ_ERRORS = UNREADABLE


@dataclass
class CheckReport:
    """What a check found.

    Attributes:
        problems: one line per problem, most basic first; empty when sound.
        notes: lines worth saying that are not problems (no checksums recorded).
        full: whether file contents were hashed.
        files_hashed: files whose checksum was compared.
        bytes_hashed: their total size.
        bad_files: the generation's files (relative names) found missing, of the wrong size or
            damaged; callers skip opening them (a garbled FAISS file must not be loaded).
    """

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    full: bool = False
    files_hashed: int = 0
    bytes_hashed: int = 0
    bad_files: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        """No problem was found."""
        return not self.problems


def file_digest(
    path: Path | str, algorithm: str = CHECKSUM_ALGORITHM, progress: Progress | None = None
) -> str:
    """The hex digest of a file's bytes, read in 1 MiB chunks (never the whole file at once).

    Args:
        path: the file.
        algorithm: a :mod:`hashlib` name.
        progress: called with the bytes of each chunk as it is hashed.

    Raises:
        OSError: the file cannot be read.
    """
    h = hashlib.new(algorithm)
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


def _check_npy(
    path: Path, shape: tuple[int, ...], dtype: str, label: str, problems: list[str]
) -> bool:
    try:
        got_shape, got_dtype = read_npy_header(path)
    except _READ_ERRORS as e:
        problems.append(f"{label} {path} is not a readable .npy file ({type(e).__name__}: {e})")
        return False
    if got_dtype != np.dtype(dtype):
        problems.append(f"{label} {path} has dtype {got_dtype}, expected {dtype}")
        return False
    if tuple(got_shape) != tuple(shape):
        problems.append(f"{label} {path} has shape {tuple(got_shape)}, expected {tuple(shape)}")
        return False
    return True


def _load_npy(path: Path, label: str, problems: list[str]) -> np.ndarray | None:
    """Memory-map a .npy file whose header was checked; None (and a problem) if it is short."""
    try:
        return load_npy(path)
    except _READ_ERRORS as e:
        problems.append(f"{label} {path} cannot be read ({type(e).__name__}: {e})")
        return None


def _plain_name(name: str) -> bool:
    """A relative path inside the generation folder (no ``..``, not absolute)."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def check_generation(gen_dir: Path | str, *, full: bool = False) -> list[str]:
    """Check that a generation folder is complete and self-consistent.

    The problems of :func:`inspect_generation`, which describes the checks.

    Args:
        gen_dir: the generation folder.
        full: also hash every file and compare it with its recorded checksum.

    Returns:
        One line per problem, most basic first; empty when the generation is sound.
    """
    return inspect_generation(gen_dir, full=full).problems


def inspect_generation(
    gen_dir: Path | str, *, full: bool = False, progress: Progress | None = None
) -> CheckReport:
    """Check a generation folder and say what was found.

    Checks every file ``generation.json`` lists is present with its recorded size; the row counts
    of vectors, ids, patch shards, metadata parts and skipped files agree with the recorded counts;
    the ids are sorted and unique and below ``next_id``; the metadata holds the id table's ids in
    the same order; the tombstones are sorted, unique ids of the id table. With ``full``, every
    file of the right size is also hashed and compared with the checksum recorded at commit. The
    FAISS index's count is the caller's to check (``crossrank.indexes``).

    Args:
        gen_dir: the generation folder.
        full: hash every file (reads every byte of the generation).
        progress: with ``full``, called with the bytes of each chunk hashed.

    Returns:
        The :class:`CheckReport`; it never raises for a damaged file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    gen_dir = Path(gen_dir)
    report = CheckReport(full=full)
    problems = report.problems
    try:
        info = read_generation_info(gen_dir)
    except IndexCorruptError as e:
        problems.append(str(e))
        return report
    present: set[str] = set()
    for name, size in info.files.items():
        path = gen_dir / name
        if not _plain_name(name):
            problems.append(f"generation.json of {gen_dir} lists {name!r}, outside the folder")
            report.bad_files.add(name)
            continue
        if not path.is_file():
            problems.append(f"{path} is missing")
            report.bad_files.add(name)
            continue
        present.add(name)
        actual = path.stat().st_size
        if actual != size:
            problems.append(f"{path} has {actual} bytes, generation.json records {size}")
            report.bad_files.add(name)
    required = [VECTORS_NAME, IDS_NAME, SKIPPED_NAME, FIRST_STAGE_NAME]
    codec_file = _codec_file(info)
    if codec_file is not None:
        required.append(codec_file)
    required += [s.file for s in info.patch_shards] + [p.file for p in info.metadata_parts]
    for name in required:
        if name not in info.files:
            problems.append(f"generation.json of {gen_dir} does not list {name}")

    n = info.n_images
    if VECTORS_NAME in present:
        _check_npy(gen_dir / VECTORS_NAME, (n, info.vector_dim), "float32", "vectors", problems)

    ids = None
    if IDS_NAME in present and _check_npy(gen_dir / IDS_NAME, (n,), "int64", "ids", problems):
        ids = _load_npy(gen_dir / IDS_NAME, "ids", problems)
    if ids is not None:
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
    row_shape, stored_dtype = info.patch_stored_shape  # (P, d) float16, or the codec's rows
    for shard in info.patch_shards:
        if shard.file in present:
            shape = (shard.rows, *row_shape)
            _check_npy(gen_dir / shard.file, shape, stored_dtype, "patch shard", problems)
    if codec_file is not None and codec_file in present:
        try:
            open_codec(info.patch_codec, gen_dir, info.n_patches, info.patch_dim)
        except CrossrankError as e:
            problems.append(str(e))
            report.bad_files.add(codec_file)

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
        except (pa.ArrowException, *_READ_ERRORS) as e:
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
        except (pa.ArrowException, *_READ_ERRORS) as e:
            problems.append(f"{gen_dir / SKIPPED_NAME} cannot be read ({type(e).__name__}: {e})")

    if full:
        _check_checksums(gen_dir, info, present, report, progress)
    return report


def _codec_file(info: GenerationInfo) -> str | None:
    """The file of the codec's trained parameters a generation must hold (pq), or None."""
    if not info.patch_dim:
        return None
    return parse_codec(info.patch_codec).params_file


def _check_checksums(
    gen_dir: Path,
    info: GenerationInfo,
    present: set[str],
    report: CheckReport,
    progress: Progress | None,
) -> None:
    """Hash every present file of the recorded size; compare with ``generation.json``."""
    if not info.checksums:
        report.notes.append(
            f"checksums are not recorded in {gen_dir.name} (written by an older crossrank): "
            "structure and sizes were checked, file contents were not; the next add, remove or "
            "compact records them"
        )
        return
    algorithm = info.checksum_algorithm or CHECKSUM_ALGORITHM
    if algorithm not in hashlib.algorithms_available:
        report.notes.append(
            f"{gen_dir.name} records {algorithm!r} checksums, which this Python cannot compute: "
            "file contents were not checked"
        )
        return
    for name in info.files:
        if name in present and name not in info.checksums:
            report.problems.append(f"generation.json of {gen_dir} records no checksum for {name}")
            report.bad_files.add(name)
    for name in info.checksums:
        if name not in info.files:
            report.problems.append(
                f"generation.json of {gen_dir} records a checksum for {name}, which it does not "
                "list"
            )
    for name in info.files:
        want = info.checksums.get(name)
        if want is None or name not in present or name in report.bad_files:
            continue  # reported above: missing, of the wrong size, or without a checksum
        path = gen_dir / name
        try:
            got = file_digest(path, algorithm, progress)
        except OSError as e:
            report.problems.append(f"{path} cannot be read ({type(e).__name__}: {e})")
            report.bad_files.add(name)
            continue
        report.files_hashed += 1
        report.bytes_hashed += info.files[name]
        if got != want.lower():
            report.problems.append(
                f"{path} is damaged: its bytes changed after commit ({algorithm} {got[:16]}..., "
                f"generation.json records {want[:16]}...)"
            )
            report.bad_files.add(name)


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
    dead = _load_npy(path, "tombstones", problems)
    if dead is None:
        return
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


def bytes_to_hash(gen_dir: Path | str) -> int:
    """Bytes a full check of a generation hashes (0 when no checksums are recorded), for a
    progress bar's total."""
    try:
        info = read_generation_info(gen_dir)
    except IndexCorruptError:
        return 0
    return sum(size for name, size in info.files.items() if name in info.checksums)


def check_index(root: Path | str, *, full: bool = False) -> list[str]:
    """Check an index directory's manifest and current generation (not the FAISS count).

    Args:
        root: the index directory.
        full: also hash every file of the current generation (see :func:`inspect_generation`).

    Returns:
        One line per problem; empty when sound.

    Raises:
        IndexNotFoundError: no committed index in ``root``.
    """
    return inspect_index(root, full=full).problems


def inspect_index(
    root: Path | str, *, full: bool = False, progress: Progress | None = None
) -> CheckReport:
    """Check an index directory's manifest and current generation and say what was found.

    Args:
        root: the index directory.
        full: hash every file of the current generation.
        progress: with ``full``, called with the bytes of each chunk hashed.

    Returns:
        The :class:`CheckReport` (problems, notes, what was hashed).

    Raises:
        IndexNotFoundError: no committed index in ``root``.
    """
    try:
        manifest = read_manifest(root)
    except IndexCorruptError as e:
        return CheckReport(problems=[str(e)], full=full)
    report = inspect_generation(manifest.generation_path, full=full, progress=progress)
    try:
        info = read_generation_info(manifest.generation_path)
    except IndexCorruptError:
        return report
    # The manifest counts the images a search can return; generation.json counts rows.
    for key, value in (
        ("images", info.n_live),
        ("skipped", info.n_skipped),
        ("tombstones", info.n_tombstones),
    ):
        if manifest.counts.get(key, 0 if key == "tombstones" else value) != value:
            report.problems.append(
                f"manifest counts.{key} is {manifest.counts[key]}, generation "
                f"{manifest.generation_dir} holds {value}"
            )
    return report
