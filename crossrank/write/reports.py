"""What add, remove and compact report (their ``--json`` shapes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AddReport", "RemoveReport", "CompactReport", "PhaseProgressFn"]

#: ``progress(phase, done, total)``: ``phase`` is ``"hashing"`` or ``"indexing"`` (add) or
#: ``"rewriting"`` (compact).
PhaseProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class AddReport:
    """What an add did.

    Attributes:
        index_dir: the index directory.
        generation: the current generation afterwards (the previous one if nothing changed).
        committed: whether a new generation was committed.
        added: new images indexed.
        moved: images whose file moved (same id, new path).
        replaced: images removed because their path now holds other content.
        unchanged: source files already indexed at their path.
        duplicates: source files whose content is already indexed elsewhere (not indexed twice).
        skipped: new files that could not be indexed (``crossrank info --skipped``): undecodable,
            not a regular file, or a name that is not valid UTF-8.
        images: images in the index afterwards.
        seconds: wall time.
        still_skipped: files the index skipped before, not tried again (``retry_skipped``).
    """

    index_dir: Path
    generation: int
    committed: bool
    added: int
    moved: int
    replaced: int
    unchanged: int
    duplicates: int
    skipped: int
    images: int
    seconds: float
    still_skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.index_dir),
            "generation": self.generation,
            "committed": self.committed,
            "added": self.added,
            "moved": self.moved,
            "replaced": self.replaced,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "still_skipped": self.still_skipped,
            "images": self.images,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class RemoveReport:
    """What a removal did.

    Attributes:
        index_dir: the index directory.
        generation: the current generation afterwards.
        committed: whether a new generation was committed (False when nothing was left to remove).
        removed: the ids removed now, sorted.
        already_removed: ids asked for that an earlier removal (or rebuild) removed already.
        images: images in the index afterwards.
        tombstones: removed images still stored until ``compact``.
    """

    index_dir: Path
    generation: int
    committed: bool
    removed: tuple[int, ...]
    already_removed: tuple[int, ...]
    images: int
    tombstones: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.index_dir),
            "generation": self.generation,
            "committed": self.committed,
            "removed": list(self.removed),
            "already_removed": list(self.already_removed),
            "images": self.images,
            "tombstones": self.tombstones,
        }


@dataclass(frozen=True)
class CompactReport:
    """What a compaction did.

    Attributes:
        index_dir: the index directory.
        generation: the current generation afterwards.
        committed: whether the index was rewritten (False: no tombstones, nothing fragmented).
        images: images in the index.
        dropped: tombstoned images whose data was dropped.
        deleted_generations: old generations deleted.
        kept_generations: old generations kept because live readers hold them.
        factory: the FAISS factory of the first stage afterwards.
        seconds: wall time.
    """

    index_dir: Path
    generation: int
    committed: bool
    images: int
    dropped: int
    deleted_generations: tuple[int, ...]
    kept_generations: tuple[int, ...]
    factory: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": str(self.index_dir),
            "generation": self.generation,
            "committed": self.committed,
            "images": self.images,
            "dropped": self.dropped,
            "deleted_generations": list(self.deleted_generations),
            "kept_generations": list(self.kept_generations),
            "factory": self.factory,
            "seconds": round(self.seconds, 3),
        }
