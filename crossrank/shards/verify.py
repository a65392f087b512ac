"""``crossrank verify`` of a sharded index: ``shards.json`` and every shard it names.

Each shard generation ``shards.json`` names is checked as ``crossrank verify`` checks one index
(structure, sizes, ids, the FAISS count; with ``full``, every file's sha256), and besides: the
shard folder exists, was built with the index's model, holds only ids routed to it
(``id % N``), and the shards' counts add up to ``shards.json``'s. Every problem names its shard.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crossrank.errors import CrossrankError
from crossrank.shards.layout import ShardRef, ShardsManifest, read_shards_manifest, shard_of
from crossrank.shards.searcher import check_shard_folder
from crossrank.store.check import CheckReport, Progress

__all__ = ["verify_sharded", "verify_sharded_report", "bytes_to_hash_sharded"]


def verify_sharded(path: str | Path, *, full: bool = False) -> list[str]:
    """Check a sharded index without opening it for search; one line per problem.

    Args:
        path: the sharded index folder.
        full: also hash every file of every shard generation.

    Returns:
        The problems, each naming its shard; empty when the index is sound.

    Raises:
        IndexNotFoundError: no ``shards.json`` in ``path``.
        IndexCorruptError: ``shards.json`` is unreadable or malformed.
    """
    return verify_sharded_report(path, full=full).problems


def verify_sharded_report(
    path: str | Path, *, full: bool = False, progress: Progress | None = None
) -> CheckReport:
    """Like :func:`verify_sharded`, with the notes and what was hashed, over every shard.

    A write committed while the check ran (``shards.json`` changed) makes it check again the set
    of shard generations now named, a few times at most.
    """
    for _ in range(3):
        top = read_shards_manifest(path)
        report = _verify_top(top, full, progress)
        if not report.problems or read_shards_manifest(path).generation == top.generation:
            return report
    return report


def _verify_top(top: ShardsManifest, full: bool, progress: Progress | None) -> CheckReport:
    from crossrank.store import ReaderPin

    report = CheckReport(full=full)
    totals = {"images": 0, "skipped": 0}
    for ref in top.shards:
        root = Path(ref.path)
        try:
            check_shard_folder(ref, top.encoder)
        except CrossrankError as e:
            report.problems.append(str(e))
            continue
        pin = ReaderPin(root, ref.generation)
        try:
            got = _verify_shard(ref, top.encoder, top.n_shards, full, progress)
        finally:
            pin.release()
        report.problems += [f"{ref.name}: {p}" for p in got.problems]
        report.notes += [f"{ref.name}: {n}" for n in got.notes]
        report.files_hashed += got.files_hashed
        report.bytes_hashed += got.bytes_hashed
        counts = ref.manifest.get("counts", {})
        for key in totals:
            totals[key] += int(counts.get(key, 0))
    for key, value in totals.items():
        if not report.problems and int(top.counts.get(key, 0)) != value:
            report.problems.append(
                f"shards.json counts {top.counts.get(key)} {key}, but its shards hold {value}"
            )
    return report


def bytes_to_hash_sharded(path: str | Path) -> int:
    """Bytes a full check of every shard generation hashes (for a progress bar's total)."""
    from crossrank.store.check import bytes_to_hash

    top = read_shards_manifest(path)
    return sum(
        bytes_to_hash(Path(ref.path) / str(ref.manifest.get("generation_dir", "")))
        for ref in top.shards
        if Path(ref.path).is_dir()
    )


def _verify_shard(
    ref: ShardRef, encoder: dict, n_shards: int, full: bool, progress: Progress | None
) -> CheckReport:
    from crossrank.api.verify import verify_report
    from crossrank.encoders import same_model
    from crossrank.indexes import FirstStage, IndexConfig
    from crossrank.store import Generation, current_generation_number, read_generation_info
    from crossrank.store.check import inspect_generation

    root = Path(ref.path)
    own = dict(ref.manifest.get("encoder", {}))
    if own and not same_model(encoder, own):
        return CheckReport(
            problems=[
                f"shards.json records model {own.get('model_id')!r} for it, not the index's "
                f"{encoder.get('model_id')!r}; rebuild the index"
            ]
        )
    gen_dir = root / str(ref.manifest.get("generation_dir", ""))
    if not gen_dir.is_dir():
        return CheckReport(
            problems=[
                f"generation {ref.generation} ({gen_dir.name}) that shards.json names is missing"
            ]
        )
    if current_generation_number(root) == ref.generation:
        report = verify_report(root, full=full, progress=progress)
    else:  # an interrupted write left the shard's manifest ahead: check the named generation
        report = inspect_generation(gen_dir, full=full, progress=progress)
        if not report.problems:
            try:
                info = read_generation_info(gen_dir)
                first = FirstStage.load(
                    gen_dir / "first_stage.faiss",
                    IndexConfig(factory=ref.manifest.get("first_stage", {}).get("factory")),
                )
                if first.ntotal != info.n_images:
                    report.problems.append(
                        f"first stage holds {first.ntotal} vectors, but the generation has "
                        f"{info.n_images} images"
                    )
            except Exception as e:  # FAISS on a garbled file: one line
                report.problems.append(f"the first stage cannot be read ({type(e).__name__}: {e})")
    if report.problems:
        return report
    ids = np.asarray(Generation(gen_dir).ids())
    wrong = ids[shard_of(ids, n_shards) != ref.index]
    if wrong.size:
        report.problems.append(
            f"holds {wrong.size} id(s) that belong to other shards (id % {n_shards}), e.g. "
            f"{int(wrong[0])}"
        )
    return report
