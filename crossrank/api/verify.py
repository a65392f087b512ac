"""``crossrank verify``: check an index directory without opening it for search."""

from __future__ import annotations

from pathlib import Path

__all__ = ["verify_index"]


def verify_index(path: str | Path) -> list[str]:
    """Check an index directory without opening it for search, so a damaged one can be diagnosed.

    Checks that the manifest and the current generation agree, that every file the generation
    lists is present with its recorded size, that the vectors, ids, patch rows and metadata rows
    agree, that ids are unique, that the tombstones are ids of the index, and that the first stage
    holds one vector per image. The generation is pinned while it is checked.

    Args:
        path: the index directory.

    Returns:
        One line per problem, the first disagreement first; empty when the index is sound.

    Raises:
        IndexNotFoundError: no committed index in ``path``.
    """
    from crossrank.errors import IndexCorruptError
    from crossrank.store import pin_current

    try:
        _, pin = pin_current(path)  # a writer committing meanwhile must not delete what is checked
    except IndexCorruptError:
        pin = None  # a damaged manifest: check_index reports it
    try:
        return _verify(path)
    finally:
        if pin is not None:
            pin.release()


def _verify(path: str | Path) -> list[str]:
    from crossrank.errors import CrossrankError
    from crossrank.indexes import FirstStage, IndexConfig
    from crossrank.store import check_index, read_generation_info, read_manifest

    problems = list(check_index(path))
    try:
        manifest = read_manifest(path)
        info = read_generation_info(manifest.generation_path)
        first = FirstStage.load(
            manifest.first_stage_path,
            IndexConfig(factory=manifest.first_stage.get("factory"), device="cpu"),
        )
    except CrossrankError as e:
        # Already reported by check_index (a missing or damaged file) unless nothing else was wrong.
        return problems or [str(e)]
    if first.ntotal != info.n_images:
        removed = f" ({info.n_tombstones} removed ones included)" if info.n_tombstones else ""
        problems.append(
            f"first stage holds {first.ntotal} vectors, but the generation has {info.n_images} "
            f"images{removed}"
        )
    return problems
