"""``crossrank verify``: check an index directory without opening it for search.

Two depths (``docs/design.md``, "Verifying an index"): quick checks the structure (every file
present with its recorded size, headers, row counts, ids, tombstones, metadata ids, the FAISS
count); full adds a sha256 of every byte of every file, compared with the checksums recorded at
commit, which is what catches bytes changed in place.
"""

from __future__ import annotations

from pathlib import Path

from crossrank.store.check import CheckReport, Progress

__all__ = ["CheckReport", "verify_index", "verify_report"]


def verify_index(path: str | Path, *, full: bool = False) -> list[str]:
    """Check an index directory without opening it for search, so a damaged one can be diagnosed.

    Checks that the manifest and the current generation agree, that every file the generation
    lists is present with its recorded size, that the vectors, ids, patch rows and metadata rows
    agree, that ids are unique, that the tombstones are ids of the index, and that the first stage
    holds one vector per image. With ``full``, also that every file still has the checksum
    recorded at commit (it reads every byte: seconds per GB). The generation is pinned while it
    is checked.

    The quick check is the default here because programs call this often (after a crash, in a
    health check) and it costs the same at any index size; ``crossrank verify`` runs the full one
    unless told ``--quick``. :func:`verify_report` also returns the notes (for example that an
    index written by an older crossrank records no checksums).

    Args:
        path: the index directory.
        full: also hash every file of the current generation.

    Returns:
        One line per problem, the first disagreement first; empty when the index is sound.

    Raises:
        IndexNotFoundError: no committed index in ``path``.
    """
    return verify_report(path, full=full).problems


def verify_report(
    path: str | Path, *, full: bool = False, progress: Progress | None = None
) -> CheckReport:
    """Like :func:`verify_index`, with everything the check found: problems, notes, bytes hashed.

    Args:
        path: the index directory.
        full: also hash every file of the current generation.
        progress: with ``full``, called with the number of bytes of each chunk hashed.

    Returns:
        The :class:`~crossrank.store.check.CheckReport`; never raises for a damaged file.

    Raises:
        IndexNotFoundError: no committed index in ``path``.
    """
    from crossrank.errors import IndexCorruptError
    from crossrank.store import pin_current

    try:
        _, pin = pin_current(path)  # a writer committing meanwhile must not delete what is checked
    except IndexCorruptError:
        pin = None  # a damaged manifest: inspect_index reports it
    try:
        return _verify(path, full, progress)
    finally:
        if pin is not None:
            pin.release()


def _verify(path: str | Path, full: bool, progress: Progress | None) -> CheckReport:
    from crossrank.errors import CrossrankError
    from crossrank.indexes import FirstStage, IndexConfig
    from crossrank.store import read_generation_info, read_manifest
    from crossrank.store.check import inspect_index
    from crossrank.store.layout import FIRST_STAGE_NAME

    report = inspect_index(path, full=full, progress=progress)
    if FIRST_STAGE_NAME in report.bad_files:
        return report  # missing or damaged: already reported, and a garbled one is not loaded
    where = Path(path)
    try:
        manifest = read_manifest(path)
        where = manifest.first_stage_path
        info = read_generation_info(manifest.generation_path)
        first = FirstStage.load(
            manifest.first_stage_path,
            IndexConfig(factory=manifest.first_stage.get("factory"), device="cpu"),
        )
    except CrossrankError as e:
        # Already reported by inspect_index (a missing or damaged file) unless nothing else was.
        if not report.problems:
            report.problems.append(str(e))
        return report
    except Exception as e:  # FAISS on a garbled file: one line, like every other problem
        report.problems.append(f"the first stage {where} cannot be read ({type(e).__name__}: {e})")
        return report
    if first.ntotal != info.n_images:
        removed = f" ({info.n_tombstones} removed ones included)" if info.n_tombstones else ""
        report.problems.append(
            f"first stage holds {first.ntotal} vectors, but the generation has {info.n_images} "
            f"images{removed}"
        )
    return report
