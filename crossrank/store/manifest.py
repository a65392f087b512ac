"""``manifest.json``: which generation of an index directory is the committed one.

An index directory holds immutable generation folders (``gen-000001``, ``gen-000002``, ...) and
one ``manifest.json`` naming the current one. The manifest is only ever replaced atomically
(:func:`write_manifest`), so a reader sees the previous generation or the next one, never a mix.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossrank.errors import IndexBusyError, IndexCorruptError, IndexNotFoundError
from crossrank.store._files import atomic_write_json
from crossrank.store.layout import FIRST_STAGE_NAME, FORMAT_VERSION, MANIFEST_NAME

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "Manifest",
    "GenerationDir",
    "has_index",
    "read_manifest",
    "write_manifest",
    "list_generations",
    "list_tmp_dirs",
    "generation_dir_name",
    "current_generation_number",
    "next_generation_number",
    "no_index_message",
]

logger = logging.getLogger(__name__)


_GEN_RE = re.compile(r"^gen-(\d{6,})$")
_TMP_RE = re.compile(r"^\.gen-(\d{6,})\.tmp-(\d+)$")
# Keys the writer owns; everything else a caller passes to commit() is kept as given.
RESERVED_KEYS = ("format_version", "generation", "generation_dir", "created_at", "updated_at")


def generation_dir_name(number: int) -> str:
    """The folder name of generation ``number``: ``gen-000003``."""
    return f"gen-{number:06d}"


def no_index_message(root: Path | str) -> str:
    """The one-line error for a directory without a committed index.

    Building into ``root`` is suggested only where a build would accept it: not for a file, nor
    for a folder of other files (a build refuses to write into those).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        return (
            f"{root} is a file, not an index folder; give the folder an index was built into "
            "(`crossrank build SOURCE --index DIR` makes one)"
        )
    if root.is_dir() and _holds_foreign_files(root):
        return (
            f"no committed index in {root}: it is a folder of other files, not a crossrank index; "
            "give the folder an index was built into, or build one into a new folder with "
            "`crossrank build SOURCE --index NEW_DIR`"
        )
    return f"no committed index in {root}; build one with `crossrank build SOURCE --index {root}`"


def _holds_foreign_files(root: Path) -> bool:
    """Whether a build would refuse ``root`` as a folder of other files."""
    from crossrank.store.layout import foreign_entries

    try:
        return bool(foreign_entries(root))
    except OSError:
        return False


def _no_index_error(root: Path) -> IndexNotFoundError:
    """:class:`IndexBusyError` naming the build while a first build runs, else "no index"."""
    from crossrank.store.lock import live_lock_holder

    holder = live_lock_holder(root) if root.is_dir() else None
    if holder is None:
        return IndexNotFoundError(no_index_message(root))
    since = f" (started {holder['since']})" if holder.get("since") else ""
    command = f", running `{holder['command']}`" if holder.get("command") else ""
    return IndexBusyError(
        f"index {root} is being built by pid {holder['pid']}{since}{command}; "
        "wait for it to finish and run this again"
    )


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json`` of an index directory.

    Attributes:
        root: the index directory.
        format_version: layout version the index was written with.
        generation: number of the committed generation.
        generation_dir: its folder name, relative to ``root``.
        created_at: ISO 8601 UTC time the index was first committed.
        updated_at: ISO 8601 UTC time of the last commit.
        encoder: ``Encoder.info`` of the model the index was built with.
        first_stage: the first stage's settings (factory, nprobe, ...).
        counts: ``images``, ``skipped`` and whatever else the builder recorded.
        extra: any other top-level keys, kept verbatim.
    """

    root: Path
    format_version: int
    generation: int
    generation_dir: str
    created_at: str
    updated_at: str
    encoder: dict[str, Any] = field(default_factory=dict)
    first_stage: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """``root / "manifest.json"``."""
        return self.root / MANIFEST_NAME

    @property
    def generation_path(self) -> Path:
        """The folder of the committed generation."""
        return self.root / self.generation_dir

    @property
    def first_stage_path(self) -> Path:
        """The FAISS index file of the committed generation."""
        return self.generation_path / FIRST_STAGE_NAME

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``manifest.json`` (``root`` is not stored)."""
        return {
            "format_version": self.format_version,
            "generation": self.generation,
            "generation_dir": self.generation_dir,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "encoder": self.encoder,
            "first_stage": self.first_stage,
            "counts": self.counts,
            **self.extra,
        }


def _corrupt(root: Path, what: str) -> IndexCorruptError:
    return IndexCorruptError(
        f"{root / MANIFEST_NAME} {what}; the index is damaged: run `crossrank verify {root}` "
        f"or rebuild it with `crossrank build SOURCE --index {root}`"
    )


def has_index(root: Path | str) -> bool:
    """Whether ``root`` holds a committed index (a ``manifest.json``); validates nothing."""
    return (Path(root) / MANIFEST_NAME).is_file()


def read_manifest(root: Path | str) -> Manifest:
    """Read and validate the manifest of an index directory.

    Args:
        root: the index directory.

    Returns:
        The :class:`Manifest`; its generation folder exists.

    Raises:
        IndexNotFoundError: ``root`` holds no ``manifest.json`` (nothing was ever committed there,
            or only an interrupted build's temporary folder); :class:`IndexBusyError`, naming the
            builder's pid, while a first build holds the writer lock there.
        IndexCorruptError: the manifest is unreadable, malformed, names a missing generation, or
            was written by a newer crossrank (the message says to upgrade).
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise _no_index_error(root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(root, f"cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise _corrupt(root, f"holds a {type(data).__name__}, expected a JSON object")

    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _corrupt(root, f"has format_version {version!r}, expected an integer >= 1")
    if version > FORMAT_VERSION:
        raise IndexCorruptError(
            f"index {root} has format_version {version}, but this crossrank reads up to "
            f"{FORMAT_VERSION}; it was written by a newer crossrank: upgrade crossrank "
            f"(pip install -U crossrank) to open it"
        )

    generation = data.get("generation")
    if not isinstance(generation, int) or isinstance(generation, bool) or generation < 1:
        raise _corrupt(root, f"has generation {generation!r}, expected an integer >= 1")
    gen_dir = data.get("generation_dir")
    if not isinstance(gen_dir, str) or _GEN_RE.match(gen_dir) is None:
        raise _corrupt(root, f"has generation_dir {gen_dir!r}, expected a name like 'gen-000001'")
    if int(_GEN_RE.match(gen_dir).group(1)) != generation:
        raise _corrupt(root, f"names generation {generation} but generation_dir {gen_dir!r}")
    for key in ("created_at", "updated_at"):
        if not isinstance(data.get(key), str):
            raise _corrupt(root, f"has {key} {data.get(key)!r}, expected an ISO 8601 string")
    for key in ("encoder", "first_stage", "counts"):
        if not isinstance(data.get(key), dict):
            raise _corrupt(root, f"has {key} {data.get(key)!r}, expected a JSON object")
    if not (root / gen_dir).is_dir():
        raise _corrupt(root, f"names generation folder {gen_dir}, which is missing")

    known = set(RESERVED_KEYS) | {"encoder", "first_stage", "counts"}
    return Manifest(
        root=root,
        format_version=version,
        generation=generation,
        generation_dir=gen_dir,
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        encoder=data["encoder"],
        first_stage=data["first_stage"],
        counts=data["counts"],
        extra={k: v for k, v in data.items() if k not in known},
    )


def write_manifest(manifest: Manifest) -> None:
    """Atomically replace ``manifest.root / "manifest.json"`` with ``manifest``.

    temp file + fsync + ``os.replace`` + directory fsync: a crash at any moment leaves either the
    old manifest or the new one, whole. The generation it names must already be durable.

    Args:
        manifest: what to write; its generation folder must exist.

    Raises:
        IndexCorruptError: the generation folder it names is missing (a writer bug).
    """
    if not manifest.generation_path.is_dir():
        raise IndexCorruptError(
            f"refusing to write {manifest.path}: generation folder {manifest.generation_path} "
            f"is missing"
        )
    atomic_write_json(manifest.path, manifest.to_dict(), before_replace="manifest-written")
    logger.debug("manifest %s now points to %s", manifest.path, manifest.generation_dir)


@dataclass(frozen=True)
class GenerationDir:
    """A committed generation folder found in an index directory.

    Attributes:
        number: the generation number.
        path: the folder.
        current: whether ``manifest.json`` names it.
    """

    number: int
    path: Path
    current: bool


def current_generation_number(root: Path | str) -> int | None:
    """The generation ``manifest.json`` names, read without validating anything else; None if
    there is no readable manifest. Cheap enough to poll (``Index.refresh``)."""
    return _current_generation(Path(root))


def _current_generation(root: Path) -> int | None:
    try:
        data = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        number = data.get("generation") if isinstance(data, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return number if isinstance(number, int) else None


def list_generations(root: Path | str) -> list[GenerationDir]:
    """The generation folders of an index directory, oldest first.

    A writer deletes old generations after its commit unless live readers pin them
    (:mod:`crossrank.store.gc`); this is how it finds them. A folder newer than the current one is
    left over from a writer that crashed between renaming its generation and switching the
    manifest.

    Args:
        root: the index directory (a missing one has no generations).

    Returns:
        One :class:`GenerationDir` per ``gen-NNNNNN`` folder, sorted by number.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    current = _current_generation(root)
    found = []
    for entry in root.iterdir():
        m = _GEN_RE.match(entry.name)
        if m is not None and entry.is_dir():
            number = int(m.group(1))
            found.append(GenerationDir(number=number, path=entry, current=number == current))
    return sorted(found, key=lambda g: g.number)


def list_tmp_dirs(root: Path | str) -> list[Path]:
    """Temporary generation folders (``.gen-NNNNNN.tmp-PID``) left by interrupted writers."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _TMP_RE.match(p.name) is not None and p.is_dir())


def next_generation_number(root: Path) -> int:
    """One past every generation named by the manifest, committed, or being written."""
    numbers = [g.number for g in list_generations(root)]
    numbers += [int(_TMP_RE.match(p.name).group(1)) for p in list_tmp_dirs(root)]
    current = _current_generation(root)
    if current is not None:
        numbers.append(current)
    return max(numbers, default=0) + 1
