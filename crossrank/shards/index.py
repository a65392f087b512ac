""":class:`ShardedIndex`: a sharded index behind the :class:`crossrank.Index` interface.

``crossrank.open(path)`` returns one for a folder holding ``shards.json``; search, search_batch,
search_vectors, rerank, metadata, skipped, info, verify, add, remove, compact and refresh work as
they do on one index, and give the same results (see docs/sharding.md). The query is encoded once,
here; the shards' first stages, rerankers and metadata joins run where the shards are (threads of
this process by default, or whatever ``factory`` and ``executor`` provide).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.api.index import Index
from crossrank.device import Precision
from crossrank.errors import CrossrankError, InvalidArgumentError
from crossrank.hits import SearchResult
from crossrank.shards.coordinator import (
    ShardedView,
    ShardFactory,
    fan_out,
    search_shards,
)
from crossrank.shards.layout import read_shards_manifest, shard_of

if TYPE_CHECKING:
    import pyarrow as pa

    from crossrank.rerank import Reranker
    from crossrank.store.filters import Filters
    from crossrank.write import AddReport, CompactReport, PhaseProgressFn, RemoveReport

__all__ = ["ShardedIndex", "open_index"]

logger = logging.getLogger(__name__)


def open_index(path: str | Path, **kwargs: Any) -> Index:
    """Open an index folder: a :class:`ShardedIndex` when it holds ``shards.json``, else an
    :class:`~crossrank.Index`. Keyword arguments as :meth:`Index.open` (and, for a sharded index,
    :meth:`ShardedIndex.open`). What ``crossrank.open`` and the command line call.

    Raises:
        IndexNotFoundError: no committed index in ``path``.
    """
    from crossrank.shards.layout import is_sharded

    if is_sharded(path):
        return ShardedIndex.open(path, **kwargs)
    return Index.open(path, **kwargs)


class ShardedIndex(Index):
    """An opened sharded index: one committed set of shard generations, searched as one index.

    Args:
        path: the sharded index folder (holding ``shards.json``).
        device: where queries are encoded and shards search and rerank.
        model: the query encoder's model (default the index's).
        nprobe: IVF lists probed per query in each shard (default: each shard's own).
        factory: opens one shard (default: a :class:`~crossrank.shards.ShardSearcher` in this
            process). The Ray engine passes one that starts an actor per shard.
        executor: runs one round of shard calls at once (default: a thread per shard).
        remote: the shards run in other processes: they are sent the reranker's name or folder
            rather than the loaded reranker (and load it at the ``precision`` their factory was
            given).
        precision: what the rerankers it loads compute in (as :meth:`Index.open`).
    """

    def __init__(
        self,
        path: Path,
        *,
        device: str = "auto",
        model: str | Path | None = None,
        nprobe: int | None = None,
        factory: ShardFactory | None = None,
        executor: Executor | None = None,
        remote: bool = False,
        precision: Precision | str = Precision.AUTO,
    ) -> None:
        self._factory = factory
        self._executor = executor
        self._remote = remote
        self._specs: dict[int, str] = {}  # id of a loaded reranker -> its name or folder
        super().__init__(path, device=device, model=model, nprobe=nprobe, precision=precision)

    def _open_snapshot(self) -> Any:
        return self._open_view()

    def _open_view(self) -> ShardedView:
        return ShardedView(
            self.path,
            factory=self._factory,
            executor=self._executor,
            device="cpu" if self.device == "auto" else self.device,
            nprobe=self._nprobe,
        )

    @classmethod
    def open(  # type: ignore[override]
        cls,
        path: str | Path,
        *,
        device: str = "auto",
        model: str | Path | None = None,
        nprobe: int | None = None,
        factory: ShardFactory | None = None,
        executor: Executor | None = None,
        remote: bool = False,
        precision: Precision | str = Precision.AUTO,
    ) -> ShardedIndex:
        """Open the committed generation of a sharded index (see the class arguments)."""
        return cls(
            Path(path),
            device=device,
            model=model,
            nprobe=nprobe,
            factory=factory,
            executor=executor,
            remote=remote,
            precision=precision,
        )

    @classmethod
    def build(  # type: ignore[override]
        cls,
        source: str | Path,
        path: str | Path,
        *,
        shards: int,
        device: str = "auto",
        **kwargs: Any,
    ) -> ShardedIndex:
        """Build a sharded index (:func:`crossrank.shards.build_sharded`) and open it."""
        from crossrank.shards.build import build_sharded

        report = build_sharded(source, path, shards=shards, device=device, **kwargs)
        index = cls.open(path, device=device, model=kwargs.get("model"))
        index.build_report = report
        return index

    # -- the generation held --------------------------------------------------------------------

    @property
    def view(self) -> ShardedView:
        """The opened shards of the generation held."""
        return self._current()  # type: ignore[return-value]

    @property
    def n_shards(self) -> int:
        return self.view.top.n_shards

    @property
    def generation_dir(self) -> Path:
        """The sharded index folder (each shard has its own generation folders)."""
        return self.path

    @property
    def first_stage(self) -> Any:  # type: ignore[override]
        """The first stages' facts (``d``, ``ntotal``, ``factory``); each shard has its own."""
        return self.view.first_stage

    def _no_single(self, what: str) -> CrossrankError:
        return CrossrankError(
            f"index {self.path} is sharded: it has no single {what}; open a shard folder "
            f"({self.path}/shard-000) to read one shard's"
        )

    @property
    def patches(self) -> Any:  # type: ignore[override]
        raise self._no_single("patch store")

    @property
    def stored(self) -> Any:  # type: ignore[override]
        raise self._no_single("stored generation")

    @property
    def metadata_store(self) -> Any:  # type: ignore[override]
        """The metadata schema and filter checks (every shard has the same columns)."""
        return self.view.metadata

    def refresh(self) -> bool:
        """Move to the newest committed set of shard generations, if a writer committed one."""
        from crossrank.shards.layout import SHARDS_NAME

        with self._refresh_lock:
            old = self.view
            try:
                number = read_shards_manifest(self.path).generation
            except CrossrankError:
                return False
            if number == old.number:
                return False
            new = self._open_view()
            with self._snap_lock:
                closed = self._snap is None
                if not closed:
                    self._snap = new  # type: ignore[assignment]
            if closed:
                new.close()
                return False
            self._retire(old)  # type: ignore[arg-type]
            if new.manifest.encoder != old.manifest.encoder:
                with self._lock:
                    self._encoder, self._rerankers = None, {}
            logger.debug("%s/%s refreshed to %d", self.path, SHARDS_NAME, new.number)
            return True

    # -- changing the index ---------------------------------------------------------------------

    def add(  # type: ignore[override]
        self,
        source: str | Path,
        *,
        batch_size: int = 64,
        workers: int = 4,
        rehash: bool = False,
        retry_skipped: bool = False,
        progress: PhaseProgressFn | None = None,
    ) -> AddReport:
        """Index the new files of ``source`` into their shards (id % N), atomically; refresh."""
        from crossrank.shards.write import add_sharded

        report = add_sharded(
            source,
            self.path,
            model=self._model_override,
            encoder=self._encoder,
            batch_size=batch_size,
            device=self.device,
            workers=workers,
            rehash=rehash,
            retry_skipped=retry_skipped,
            progress=progress,
        )
        self._after_write()
        return report

    def remove(  # type: ignore[override]
        self, ids: Sequence[int] | np.ndarray | None = None, *, where: str | None = None
    ) -> RemoveReport:
        """Remove images by id or ``where`` from every shard, atomically; refresh."""
        from crossrank.shards.write import remove_sharded

        report = remove_sharded(self.path, ids=ids, where=where)
        self._after_write()
        return report

    def compact(self, *, progress: PhaseProgressFn | None = None) -> CompactReport:  # type: ignore[override]
        """Compact every shard, atomically; refresh."""
        from crossrank.shards.write import compact_sharded

        report = compact_sharded(self.path, progress=progress)
        self._after_write()
        return report

    def _collect_garbage(self) -> None:
        from crossrank.shards.write import collect_shards

        collect_shards(self.path)  # repairs, then collects every shard under the index lock

    # -- facts ----------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"ShardedIndex({str(self.path)!r}, shards={self.n_shards}, images={len(self)}, "
            f"generation={self.generation})"
        )

    def info(self) -> dict[str, Any]:
        """As :meth:`Index.info`, for the whole index, with a ``shards`` list (one per shard)."""
        view = self.view
        top = view.top
        first = view.facts[0]
        return {
            "path": str(self.path.resolve()),
            "format_version": self.manifest.format_version,
            "generation": top.generation,
            "created_at": top.created_at,
            "updated_at": top.updated_at,
            "counts": dict(top.counts),
            "tombstones": int(sum(int(f["tombstones"]) for f in view.facts)),
            "encoder": dict(top.encoder),
            "first_stage": {**first["first_stage"], "ntotal": view.first_stage.ntotal},
            "patches": {
                "n_patches": int(first["patches"][0]),
                "dim": int(first["patches"][1]),
                "dtype": "float16",
            },
            "patch_codec": first["patch_codec"],
            "patch_bytes_per_image": first["patch_bytes_per_image"],
            "metadata_columns": list(first["metadata_columns"]),
            "default_reranker": self.default_reranker,
            "routing": {"rule": top.routing, "n_shards": top.n_shards},
            "shards": [
                {
                    "shard": f["shard"],
                    "path": f["path"],
                    "generation": f["generation"],
                    "images": f["images"],
                    "tombstones": f["tombstones"],
                    "factory": f["factory"],
                }
                for f in view.facts
            ],
        }

    def metadata(
        self,
        columns: Sequence[str] | None = None,
        where: str | None = None,
        *,
        filters: Filters | None = None,
    ) -> pa.Table:
        """The metadata of every shard, in id order (see :meth:`Index.metadata`)."""
        import pyarrow as pa

        with self._use() as view:
            wanted = list(columns) if columns else None
            parts = fan_out(
                view.executor,  # type: ignore[attr-defined]
                lambda s: s.metadata_table(
                    None if wanted is None else (wanted if "id" in wanted else ["id", *wanted]),
                    where,
                    filters,
                ),
                view.shards,  # type: ignore[attr-defined]
            )
        table = pa.concat_tables(parts, promote_options="default")
        table = table.take(pa.array(np.argsort(table.column("id").to_numpy(), kind="stable")))
        return table if wanted is None else table.select(wanted)

    def skipped(self) -> pa.Table:
        """The files the build and adds could not index (recorded by shard 0)."""
        import pyarrow as pa

        with self._use() as view:
            parts = fan_out(view.executor, lambda s: s.skipped(), view.shards)  # type: ignore[attr-defined]
        return pa.concat_tables(parts)

    def verify(self, *, full: bool = False) -> list[str]:
        """Check ``shards.json`` and every shard (see :func:`crossrank.shards.verify_sharded`)."""
        from crossrank.shards.verify import verify_sharded

        return verify_sharded(self.path, full=full)

    # -- search ---------------------------------------------------------------------------------

    def _search_snapshot(self, view: Any, *args: Any, **kwargs: Any) -> list[SearchResult]:  # type: ignore[override]
        scorer = kwargs.get("scorer")
        ref = None
        if self._remote and scorer is not None:
            ref = self._spec_of(scorer)
        return search_shards(view, *args, reranker_ref=ref, **kwargs)

    def _spec_of(self, scorer: Reranker) -> str:
        spec = self._specs.get(id(scorer))
        if spec is None:
            raise InvalidArgumentError(
                f"the shards of {self.path} run in other processes, so the reranker must be "
                "given by name or folder (e.g. 'maxsim' or a trained reranker's folder), not as "
                "a Reranker object"
            )
        return spec

    def _load_choice(self, key: str, spec: Any) -> Any:
        choice = super()._load_choice(key, spec)
        if choice.scorer is not None:
            resolved = self.default_reranker if key == "auto" else str(spec)
            self._specs[id(choice.scorer)] = str(resolved)
        return choice

    # Index.rerank, with each candidate checked, scored and reranked in its own shard.

    def _rerank_groups(self, view: Any, cand: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """``(shard, positions in cand)`` of every shard holding candidates."""
        src = shard_of(cand, len(view.shards))
        groups = [(s, np.flatnonzero(src == s)) for s in range(len(view.shards))]
        return [(s, pos) for s, pos in groups if pos.size]

    def _check_rerank_ids(self, snap: Any, cand: np.ndarray) -> None:
        shards, executor = snap.shards, snap.executor
        groups = self._rerank_groups(snap, cand)
        bad = np.concatenate(
            [np.empty(0, np.int64)]
            + fan_out(executor, lambda g: shards[g[0]].unknown(cand[g[1]]), groups)
        )
        if bad.size:
            shown = ", ".join(str(i) for i in np.sort(bad)[:10]) + (
                f" and {bad.size - 10} more" if bad.size > 10 else ""
            )
            raise InvalidArgumentError(
                f"{bad.size} id(s) not in index {self.path} (never added, or removed): "
                f"{shown}; rerank only ids the index holds (refresh the backend's view of it)"
            )

    def _stored_scores(self, snap: Any, cand: np.ndarray, xq: np.ndarray) -> np.ndarray:
        shards, executor = snap.shards, snap.executor
        groups = self._rerank_groups(snap, cand)
        first = np.zeros(cand.shape, np.float32)
        got = fan_out(executor, lambda g: shards[g[0]].stored_scores(xq, cand[g[1]]), groups)
        for (_, pos), scores in zip(groups, got, strict=True):
            first[pos] = scores
        return first

    def _rank_given(
        self,
        snap: Any,
        cand: np.ndarray,
        first: np.ndarray,
        query_features: tuple,
        *,
        requested: int,
        choice: Any,
        fuse: Any,
        encoder_desc: Any,
        timings: dict[str, float],
    ) -> SearchResult:
        xq, q_tokens, q_masks, q_ids, labels, cut = query_features
        scorer = choice.scorer
        return search_shards(
            snap,
            xq,
            q_tokens,
            q_masks,
            labels,
            k=requested,
            n_candidates=cand.size,
            allowed=None,
            scorer=scorer,
            fuse=fuse,
            timings=timings,
            q_ids=q_ids,
            requested=requested,
            encoder=encoder_desc,
            reranker=choice.label,
            fusion=str(fuse),
            notes={0: [n for n in (cut.get(0), choice.note) if n]},
            reranker_ref=self._spec_of(scorer) if self._remote and scorer else None,
            given=(cand, first, shard_of(cand, len(snap.shards))),
        )[0]
