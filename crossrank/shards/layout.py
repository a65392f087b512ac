"""``shards.json``: the top manifest of a sharded index, the routing rule, and the shard references.

A sharded index is a folder holding ``shards.json`` and N shard folders (``shard-000/``, ...), each
a whole crossrank index with its own generations, vectors, patches (in the index's patch codec)
and metadata. ``shards.json`` names, for every shard, its folder (relative to the root, or
absolute: a shard may sit on another disk) and the one generation of it that is committed, with
that generation's shard manifest. It is replaced atomically (temporary file, fsync, rename), so a
reader sees the previous set of shard generations or the next one, never a mix: the shards'
own ``manifest.json`` files are not what a reader of the sharded index follows (a writer killed
half-way may have switched some of them; the next writer switches them back).

Routing: an image's id is global (assigned in source order, as an unsharded build assigns them)
and it lives in shard ``id % N``. ``add`` sends new images to shards by the same rule.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.errors import IndexCorruptError, IndexNotFoundError, InvalidArgumentError

__all__ = [
    "SHARDS_NAME",
    "SHARDS_FORMAT_VERSION",
    "ROUTING_RULE",
    "ShardRef",
    "ShardsManifest",
    "is_sharded",
    "read_shards_manifest",
    "write_shards_manifest",
    "shard_dir_name",
    "shard_of",
    "manifest_from_dict",
]

logger = logging.getLogger(__name__)

#: The top manifest of a sharded index; its presence is what makes a folder a sharded index.
SHARDS_NAME = "shards.json"
#: The newest layout of ``shards.json`` this crossrank reads.
SHARDS_FORMAT_VERSION = 1
#: The routing rule recorded in ``shards.json``: image ``id`` lives in shard ``id % N``.
ROUTING_RULE = "id_mod_n"


def shard_dir_name(index: int) -> str:
    """The folder name of shard ``index`` under the root: ``shard-000``."""
    return f"shard-{index:03d}"


def shard_of(ids: np.ndarray | int, n_shards: int) -> np.ndarray:
    """The shard of each id under the routing rule: ``id % n_shards`` (int64 array)."""
    return np.asarray(ids, dtype=np.int64) % int(n_shards)


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is the root of a sharded index (it holds ``shards.json``)."""
    return (Path(path) / SHARDS_NAME).is_file()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ShardRef:
    """One shard generation, as the top manifest names it: everything a shard server needs.

    Small and picklable: the coordinator hands it to whatever serves the shard (a thread here, a
    Ray actor on another machine), which opens it with :class:`crossrank.shards.ShardSearcher`.

    Attributes:
        index: the shard's number, 0 to N-1.
        path: the shard folder, absolute.
        generation: the shard generation committed in the sharded index.
        manifest: that generation's shard ``manifest.json`` (as a dict), recorded at the commit:
            the shard's own ``manifest.json`` may name a newer, uncommitted generation.
    """

    index: int
    path: str
    generation: int
    manifest: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        """``shard 2 (/data/photos.idx/shard-002)``: how errors name the shard."""
        return f"shard {self.index} ({self.path})"


@dataclass(frozen=True)
class ShardsManifest:
    """The parsed ``shards.json`` of a sharded index.

    Attributes:
        root: the sharded index folder.
        generation: the top generation: one more on every commit of the sharded index.
        created_at, updated_at: ISO 8601 UTC times of the first and the last commit.
        encoder: ``Encoder.info`` of the model every shard was built with.
        counts: ``images`` (searchable), ``skipped``, ``tombstones`` over all shards.
        next_id: the smallest id never given in this index (ids are global).
        shards: one :class:`ShardRef` per shard, in shard order.
        routing: the routing rule (:data:`ROUTING_RULE`).
        paths: each shard's folder as written in ``shards.json`` (relative or absolute).
        extra: any other keys (``source``...), kept verbatim.
    """

    root: Path
    generation: int
    created_at: str
    updated_at: str
    encoder: dict[str, Any]
    counts: dict[str, int]
    next_id: int
    shards: tuple[ShardRef, ...]
    routing: str = ROUTING_RULE
    paths: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def path(self) -> Path:
        return self.root / SHARDS_NAME

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``shards.json``."""
        paths = self.paths or tuple(s.path for s in self.shards)
        return {
            "format": "crossrank-shards",
            "format_version": SHARDS_FORMAT_VERSION,
            "generation": self.generation,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "routing": {"rule": self.routing, "n_shards": self.n_shards},
            "next_id": self.next_id,
            "encoder": self.encoder,
            "counts": self.counts,
            "shards": [
                {"path": p, "generation": s.generation, "manifest": s.manifest}
                for p, s in zip(paths, self.shards, strict=True)
            ],
            **self.extra,
        }


def _corrupt(root: Path, what: str) -> IndexCorruptError:
    return IndexCorruptError(
        f"{root / SHARDS_NAME} {what}; the sharded index is damaged: run `crossrank verify "
        f"{root}` or rebuild it with `crossrank build SOURCE --index {root} --shards N --overwrite`"
    )


def _resolve(root: Path, raw: str) -> Path:
    p = Path(raw)
    return p if p.is_absolute() else (root / p).absolute()


def read_shards_manifest(root: str | Path) -> ShardsManifest:
    """Read and check ``shards.json`` of a sharded index.

    Raises:
        IndexNotFoundError: ``root`` holds no ``shards.json``.
        IndexCorruptError: it is unreadable, malformed, or newer than this crossrank reads.
    """
    root = Path(root)
    path = root / SHARDS_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexNotFoundError(
            f"no sharded index in {root}; build one with `crossrank build SOURCE --index {root} "
            "--shards N`"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(root, f"cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise _corrupt(root, "is not a JSON object")
    version = data.get("format_version")
    if isinstance(version, int) and version > SHARDS_FORMAT_VERSION:
        raise IndexCorruptError(
            f"{path} has format_version {version}, but this crossrank reads sharded indexes up to "
            f"{SHARDS_FORMAT_VERSION}; upgrade crossrank (pip install -U crossrank)"
        )
    try:
        routing = data["routing"]
        if routing["rule"] != ROUTING_RULE:
            raise _corrupt(root, f"has routing rule {routing['rule']!r}, expected {ROUTING_RULE}")
        raw = data["shards"]
        if len(raw) != int(routing["n_shards"]) or not raw:
            raise _corrupt(root, f"names {len(raw)} shards but routing says {routing['n_shards']}")
        shards = tuple(
            ShardRef(
                index=i,
                path=str(_resolve(root, str(s["path"]))),
                generation=int(s["generation"]),
                manifest=dict(s["manifest"]),
            )
            for i, s in enumerate(raw)
        )
        known = {
            "format",
            "format_version",
            "generation",
            "created_at",
            "updated_at",
            "routing",
            "next_id",
            "encoder",
            "counts",
            "shards",
        }
        return ShardsManifest(
            root=root,
            generation=int(data["generation"]),
            created_at=str(data["created_at"]),
            updated_at=str(data["updated_at"]),
            encoder=dict(data["encoder"]),
            counts={str(k): int(v) for k, v in data["counts"].items()},
            next_id=int(data["next_id"]),
            shards=shards,
            routing=ROUTING_RULE,
            paths=tuple(str(s["path"]) for s in raw),
            extra={k: v for k, v in data.items() if k not in known},
        )
    except IndexCorruptError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _corrupt(root, f"is malformed (bad or missing {e})") from e


def write_shards_manifest(manifest: ShardsManifest) -> None:
    """Atomically replace ``shards.json``: the commit point of every sharded write.

    Every shard generation it names must already be durable (committed in its shard).
    """
    from crossrank.store._files import atomic_write_json

    for ref in manifest.shards:
        gen_dir = ref.manifest.get("generation_dir", "")
        if not (Path(ref.path) / gen_dir).is_dir():
            raise IndexCorruptError(
                f"refusing to write {manifest.path}: {ref.name} misses generation folder "
                f"{gen_dir!r}"
            )
    atomic_write_json(manifest.path, manifest.to_dict(), before_replace="shards-manifest-written")
    logger.debug(
        "%s now names shard generations %s",
        manifest.path,
        [ref.generation for ref in manifest.shards],
    )


def new_shards_manifest(
    root: Path,
    previous: ShardsManifest | None,
    *,
    encoder: dict[str, Any],
    shards: list[ShardRef],
    paths: list[str],
    next_id: int,
    extra: dict[str, Any] | None = None,
) -> ShardsManifest:
    """The next ``shards.json``: counts summed from the shard manifests, generation + 1."""
    counts = {"images": 0, "skipped": 0, "tombstones": 0}
    for ref in shards:
        for key in counts:
            counts[key] += int(ref.manifest.get("counts", {}).get(key, 0))
    now = _now()
    return ShardsManifest(
        root=root,
        generation=(previous.generation + 1) if previous is not None else 1,
        created_at=previous.created_at if previous is not None else now,
        updated_at=now,
        encoder=dict(encoder),
        counts=counts,
        next_id=int(next_id),
        shards=tuple(shards),
        paths=tuple(paths),
        extra=dict(extra if extra is not None else (previous.extra if previous else {})),
    )


def manifest_from_dict(root: Path | str, data: dict[str, Any]):  # -> crossrank.store.Manifest
    """A shard's :class:`~crossrank.store.Manifest` from the dict ``shards.json`` recorded."""
    from crossrank.store import Manifest
    from crossrank.store.manifest import RESERVED_KEYS

    known = set(RESERVED_KEYS) | {"encoder", "first_stage", "counts"}
    try:
        return Manifest(
            root=Path(root),
            format_version=int(data["format_version"]),
            generation=int(data["generation"]),
            generation_dir=str(data["generation_dir"]),
            created_at=str(data["created_at"]),
            updated_at=str(data["updated_at"]),
            encoder=dict(data["encoder"]),
            first_stage=dict(data["first_stage"]),
            counts=dict(data["counts"]),
            extra={k: v for k, v in data.items() if k not in known},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgumentError(f"a shard manifest record lacks {e}") from e
