"""The coordinator of a sharded search: open every shard, fan a search out, merge, fuse.

One search over N shards (each served by a :class:`~crossrank.shards.ShardSearcher`, or anything
with the same methods: a Ray actor's proxy) runs in three rounds, each fanned out over the shards
at once through an executor (threads by default):

1. every shard runs the filter and the first stage and returns its top ``rerank_k`` candidates
   (:meth:`ShardSearcher.first_stage`); the coordinator merges them into the global top
   ``rerank_k``, best score first (ties: the smaller id first);
2. every shard reranks its own candidates among those (:meth:`ShardSearcher.rerank`): patches
   never leave their shard; the coordinator fuses first-stage and reranker scores over the merged
   list exactly as an unsharded search does (:mod:`crossrank.rerank.fusion` is per candidate, and
   ties in the fused score keep the merged first-stage order) and cuts to ``k``;
3. every shard that holds some of the ``k`` hits joins their metadata (:meth:`ShardSearcher.hits`).

With exact first stages (Flat) on every shard the merged top ``rerank_k`` is the unsharded index's
top ``rerank_k``, so hits, order and scores equal the unsharded search's (scores to float rounding).

A :class:`ShardedView` is one committed generation of the sharded index (the set of shard
generations ``shards.json`` names), opened and pinned; :class:`crossrank.shards.ShardedIndex`
holds one and swaps it on refresh, as :class:`crossrank.Index` holds a snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from crossrank.errors import CrossrankError
from crossrank.hits import SearchResult
from crossrank.search.pipeline import query_result, timed
from crossrank.shards.layout import ShardRef, ShardsManifest, read_shards_manifest

if TYPE_CHECKING:
    from crossrank.hits import Hit
    from crossrank.rerank import Reranker
    from crossrank.store import Manifest
    from crossrank.store.filters import Filters

__all__ = [
    "ShardLike",
    "ShardFactory",
    "ShardedView",
    "ShardFilter",
    "fan_out",
    "merge_candidates",
    "search_shards",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class ShardLike(Protocol):
    """What the coordinator calls on a shard: :class:`~crossrank.shards.ShardSearcher`'s methods.

    A remote shard (a Ray actor) is served through a proxy with these methods that waits for the
    actor's answer; the coordinator runs the calls of one round on all shards at once through its
    executor.
    """

    def facts(self) -> dict[str, Any]: ...
    def check_filter(self, where: str | None, filters: Filters | None) -> int: ...
    def first_stage(
        self,
        xq: np.ndarray,
        k: int,
        where: str | None = None,
        filters: Filters | None = None,
        nprobe: int | None = None,
    ) -> Any: ...
    def rerank(
        self,
        reranker: Any,
        tokens: np.ndarray,
        mask: np.ndarray,
        ids: np.ndarray,
        input_ids: np.ndarray | None = None,
    ) -> np.ndarray: ...
    def hits(
        self,
        ids: np.ndarray,
        scores: np.ndarray,
        first_scores: np.ndarray,
        rerank_scores: np.ndarray | None,
    ) -> tuple[Hit, ...]: ...
    def explain(
        self,
        reranker: Any,
        tokens: np.ndarray | None,
        mask: np.ndarray | None,
        ids: np.ndarray,
        words: list[str | None] | None,
        input_ids: np.ndarray | None = None,
        label: str = "none",
    ) -> Any: ...
    # What ShardedIndex calls besides a search: Index.rerank, metadata, skipped, the checks.
    def stored_scores(self, xq: np.ndarray, ids: np.ndarray) -> np.ndarray: ...
    def unknown(self, ids: np.ndarray) -> np.ndarray: ...
    def metadata_table(
        self, columns: list[str] | None = None, where: str | None = None, filters: Any = None
    ) -> Any: ...
    def skipped(self) -> Any: ...
    def schema(self) -> Any: ...
    def check_where(self, where: str) -> None: ...
    def check_filters(self, filters: Any) -> None: ...
    def close(self) -> None: ...


#: Opens one shard: ``factory(ref) -> ShardLike``. The default opens a local ShardSearcher.
ShardFactory = Callable[[ShardRef], ShardLike]


def fan_out(executor: Executor | None, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(item) for item in items]``, run at once on ``executor`` (in order; None: serially).

    The first exception raised is re-raised after every call has finished.
    """
    items = list(items)
    if executor is None or len(items) <= 1:
        return [fn(item) for item in items]
    futures = [executor.submit(fn, item) for item in items]
    error: BaseException | None = None
    results: list[Any] = []
    for future in futures:
        try:
            results.append(future.result())
        except BaseException as e:  # wait for the others before raising
            error = error or e
            results.append(None)
    if error is not None:
        raise error
    return results


@dataclass(frozen=True)
class ShardFilter:
    """A search's filter once every shard has checked it (what ``allowed_ids`` gives a sharded
    view): the ``where`` and ``filters`` themselves, and how many images they allow in all."""

    where: str | None
    filters: Any
    allowed: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(sum(self.allowed))


@dataclass(frozen=True)
class FirstStageFacts:
    """What the facade reads of a sharded index's first stage: the dimension and sizes."""

    d: int
    ntotal: int
    factory: str


class _Metadata:
    """The metadata checks the facade runs before a search (every shard has the same schema)."""

    def __init__(self, view: ShardedView) -> None:
        self._view = view

    def check_where(self, where: str) -> None:
        self._view.shards[0].check_where(where)

    def check_filters(self, filters: Filters) -> None:
        self._view.shards[0].check_filters(filters)

    @property
    def schema(self) -> Any:
        return self._view.shards[0].schema()

    @property
    def columns(self) -> list[str]:
        return list(self.schema.names)


def default_factory(
    *, device: str = "cpu", nprobe: int | None = None, encoder: dict[str, Any] | None = None
) -> ShardFactory:
    """Open each shard as a local :class:`~crossrank.shards.ShardSearcher`."""
    from crossrank.shards.searcher import ShardSearcher

    def factory(ref: ShardRef) -> ShardLike:
        return ShardSearcher(ref, device=device, nprobe=nprobe, encoder=encoder)

    return factory


class ShardedView:
    """One committed generation of a sharded index: every shard it names, opened and pinned.

    Opening follows the readers' protocol of :mod:`crossrank.store.pins`, one level up: read
    ``shards.json``, open (and so pin) every shard generation it names, then read ``shards.json``
    again; if a writer committed meanwhile, close and start over. A writer switches
    ``shards.json`` before it collects old shard generations, so the pins are seen or the switch
    is.

    Args:
        root: the sharded index folder.
        factory: opens one shard (default: a local ShardSearcher on ``device``).
        executor: runs the shards' calls at once (default: a thread per shard, made here).
        device, nprobe: for the default factory.

    Attributes:
        top: the :class:`ShardsManifest` of this generation.
        shards: one opened shard per entry of ``top.shards``.
        manifest: a :class:`~crossrank.store.Manifest` describing the whole (generation = the top
            generation, counts summed), for the facade's ``manifest`` property.
    """

    def __init__(
        self,
        root: Path,
        *,
        factory: ShardFactory | None = None,
        executor: Executor | None = None,
        device: str = "cpu",
        nprobe: int | None = None,
        attempts: int = 20,
    ) -> None:
        self.root = Path(root)
        self._own_executor = executor is None
        for _ in range(attempts):
            top = read_shards_manifest(self.root)
            if executor is None:
                executor = ThreadPoolExecutor(
                    max_workers=max(1, top.n_shards), thread_name_prefix="crossrank-shard"
                )
            self.executor: Executor = executor
            make = factory or default_factory(device=device, nprobe=nprobe, encoder=top.encoder)
            try:
                shards = self._open_all(make, top.shards)
            except Exception:
                # A writer may have committed and collected a shard generation between the read
                # of shards.json and the pin (a missing folder, or files gone while loading):
                # then start over; else the error is the shard's own.
                if read_shards_manifest(self.root).generation != top.generation:
                    continue
                raise
            again = read_shards_manifest(self.root)
            if again.generation == top.generation:
                break
            for shard in shards:
                shard.close()
        else:
            raise CrossrankError(
                f"sharded index {self.root} changed {attempts} times while it was being opened; "
                "retry"
            )
        self.top: ShardsManifest = top
        self.shards: list[ShardLike] = shards
        facts = fan_out(self.executor, lambda s: s.facts(), shards)
        self.facts: list[dict[str, Any]] = facts
        self.sizes = [int(f["images"]) for f in facts]
        self.first_stage = FirstStageFacts(
            d=int(facts[0]["dim"]),
            ntotal=int(sum(int(f["ntotal"]) for f in facts)),
            factory=str(facts[0]["factory"]),
        )
        self.metadata = _Metadata(self)
        self.manifest: Manifest = self._facade_manifest()
        self.live_ids = None  # each shard excludes its own removed images
        self.users = 0
        self.retired = False
        self._closed = False

    def _open_all(self, make: ShardFactory, refs: Sequence[ShardRef]) -> list[ShardLike]:
        opened: list[ShardLike | None] = [None] * len(refs)

        def open_one(i: int) -> None:
            opened[i] = make(refs[i])

        try:
            fan_out(self.executor, open_one, range(len(refs)))
        except BaseException:
            for shard in opened:
                if shard is not None:
                    shard.close()
            raise
        return [s for s in opened if s is not None]

    def _facade_manifest(self) -> Manifest:
        from crossrank.store import Manifest

        top = self.top
        first = self.facts[0]
        return Manifest(
            root=self.root,
            format_version=int(top.shards[0].manifest.get("format_version", 1)),
            generation=top.generation,
            generation_dir="",
            created_at=top.created_at,
            updated_at=top.updated_at,
            encoder=dict(top.encoder),
            first_stage=dict(first["first_stage"]),
            counts=dict(top.counts),
            extra={"shards": top.n_shards, "routing": top.routing, **top.extra},
        )

    @property
    def number(self) -> int:
        """The top generation number."""
        return self.top.generation

    def __len__(self) -> int:
        return int(sum(self.sizes))

    def allowed_ids(self, where: str | None, filters: Filters | None) -> ShardFilter:
        """Check the filter on every shard (each caches its allowed ids) and count what it allows.

        Raises:
            FilterError: a malformed ``where`` / ``filters`` or an unknown column.
        """
        allowed = fan_out(self.executor, lambda s: s.check_filter(where, filters), self.shards)
        return ShardFilter(where, filters, tuple(int(a) for a in allowed))

    def close(self) -> None:
        """Close every shard (pins released) and the executor made here; idempotent."""
        if self._closed:
            return
        self._closed = True
        for shard in self.shards:
            try:
                shard.close()
            except Exception as e:
                logger.warning("closing a shard of %s failed: %s", self.root, e)
        if self._own_executor:
            self.executor.shutdown(wait=False)


def merge_candidates(
    candidates: Sequence[Any], qi: int, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The global top ``n`` of query ``qi`` over every shard's candidates.

    Best score first; equal scores in id order. Returns ``(ids, scores, shard of each)``.
    """
    ids = np.concatenate([np.asarray(c.ids[qi], np.int64) for c in candidates])
    scores = np.concatenate([np.asarray(c.scores[qi], np.float32) for c in candidates])
    src = np.concatenate(
        [np.full(np.asarray(c.ids[qi]).shape[0], c.shard, np.int64) for c in candidates]
    )
    keep = ids >= 0
    ids, scores, src = ids[keep], scores[keep], src[keep]
    order = np.lexsort((ids, -scores))[:n]
    return ids[order], scores[order], src[order]


def _by_shard(src: np.ndarray) -> dict[int, np.ndarray]:
    """Positions of each shard's entries, in list order."""
    return {int(s): np.flatnonzero(src == s) for s in np.unique(src)}


def search_shards(
    view: ShardedView,
    xq: np.ndarray,
    q_tokens: list[np.ndarray] | None,
    q_masks: list[np.ndarray] | None,
    labels: list[str],
    *,
    k: int,
    n_candidates: int,
    allowed: ShardFilter | None,
    scorer: Reranker | None,
    fuse: Any,
    timings: dict[str, float],
    q_ids: list[np.ndarray | None] | None,
    requested: int | None = None,
    encoder: Any = None,
    reranker: str = "none",
    fusion: str = "none",
    notes: Mapping[int, Sequence[str]] | None = None,
    words: Sequence[Sequence[str | None] | None] | None = None,
    nprobe: int | None = None,
    reranker_ref: Any = None,
    given: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> list[SearchResult]:
    """:func:`crossrank.search.pipeline.search_snapshot` over the shards of ``view``.

    Same arguments and results, except ``allowed`` (the :class:`ShardFilter` of
    :meth:`ShardedView.allowed_ids`, or None) and ``reranker_ref``: what the shards are sent to
    name the reranker (default ``scorer`` itself: right for shards in this process; a shard in
    another process needs the reranker's name or folder). ``given`` (one query): its candidates
    ``(ids, first-stage scores, shard of each)`` in first-stage order, chosen elsewhere (a
    backend's, for ``Index.rerank``); no first stage runs then.
    """
    executor, shards = view.executor, view.shards
    where = None if allowed is None else allowed.where
    filters = None if allowed is None else allowed.filters
    ref = scorer if reranker_ref is None else reranker_ref
    if given is not None:
        total = n_allowed = 0
        merged = [given]
    else:
        with timed(timings, "first_stage"):
            cands = fan_out(
                executor,
                lambda s: s.first_stage(xq, n_candidates, where, filters, nprobe),
                shards,
            )
        total = sum(int(c.size) for c in cands)
        n_allowed = sum(int(c.allowed) for c in cands)
        merged = [merge_candidates(cands, qi, n_candidates) for qi in range(len(labels))]

    results: list[SearchResult] = []
    rerank_scores: list[np.ndarray | None] = [None] * len(labels)
    rerank_ms = 0.0
    if scorer is not None:
        r_timings: dict[str, float] = {}
        with timed(r_timings, "rerank"):
            jobs = [
                (qi, s, pos)
                for qi, (_, _, src) in enumerate(merged)
                for s, pos in _by_shard(src).items()
            ]

            def run(job: tuple[int, int, np.ndarray]) -> np.ndarray:
                qi, s, pos = job
                assert q_tokens is not None and q_masks is not None
                return shards[s].rerank(
                    ref,
                    q_tokens[qi],
                    q_masks[qi],
                    merged[qi][0][pos],
                    None if q_ids is None else q_ids[qi],
                )

            scored = fan_out(executor, run, jobs)
            for qi, (ids, _, _) in enumerate(merged):
                rerank_scores[qi] = np.zeros(ids.shape, np.float32)
            for (qi, _, pos), got in zip(jobs, scored, strict=True):
                rerank_scores[qi][pos] = np.asarray(got, np.float32)  # type: ignore[index]
        rerank_ms = r_timings["rerank"]

    ranked = []
    for qi, (ids, first, _) in enumerate(merged):
        rr = rerank_scores[qi]
        if rr is not None and ids.size:
            final = np.asarray(fuse(first, rr), np.float32)
            order = np.argsort(-final, kind="stable")[:k]  # ties keep the merged order
        else:
            final, order = first, np.arange(min(k, ids.size))
        ranked.append((final, order))

    m_timings: dict[str, float] = {}
    with timed(m_timings, "metadata"):
        jobs2 = []
        for qi, (ids, first, src) in enumerate(merged):
            final, order = ranked[qi]
            rr = rerank_scores[qi]
            for s, pos in _by_shard(src[order]).items():
                take = order[pos]
                jobs2.append(
                    (
                        qi,
                        pos,
                        s,
                        ids[take],
                        final[take],
                        first[take],
                        None if rr is None else rr[take],
                    )
                )
        got_hits = fan_out(executor, lambda j: shards[j[2]].hits(*j[3:]), jobs2)
        per_query: list[list[Hit | None]] = [
            [None] * len(ranked[qi][1]) for qi in range(len(labels))
        ]
        for (qi, pos, *_), hits in zip(jobs2, got_hits, strict=True):
            for p, hit in zip(pos, hits, strict=True):
                per_query[qi][int(p)] = hit
    metadata_ms = m_timings["metadata"]

    n_queries = max(1, len(labels))
    for qi, label in enumerate(labels):
        ids, first, src = merged[qi]
        final, order = ranked[qi]
        hits = tuple(h for h in per_query[qi] if h is not None)
        q_timings = dict(timings)
        if scorer is not None and ids.size:
            q_timings["rerank"] = q_timings.get("rerank", 0.0) + rerank_ms / n_queries
        q_timings["metadata"] = q_timings.get("metadata", 0.0) + metadata_ms / n_queries
        q_notes = tuple((notes or {}).get(qi, ()))
        if words is not None and hits:
            with timed(q_timings, "explain"):
                hits, note = _explain(
                    view,
                    ref,
                    scorer,
                    q_tokens,
                    q_masks,
                    q_ids,
                    qi,
                    ids[order],
                    src[order],
                    words[qi],
                    reranker,
                    hits,
                )
            if note:
                q_notes += (note,)
        results.append(
            query_result(
                label,
                hits,
                requested=k if requested is None else requested,
                filtered_out=total - n_allowed,
                candidates=int(ids.size),
                timings=q_timings,
                generation=view.number,
                encoder=encoder,
                reranker=reranker if scorer is not None else "none",
                fusion=fusion if scorer is not None else "none",
                notes=q_notes,
            )
        )
    return results


def _explain(
    view: ShardedView,
    ref: Any,
    scorer: Reranker | None,
    q_tokens: list[np.ndarray] | None,
    q_masks: list[np.ndarray] | None,
    q_ids: list[np.ndarray | None] | None,
    qi: int,
    hit_ids: np.ndarray,
    hit_src: np.ndarray,
    words: Sequence[str | None] | None,
    label: str,
    hits: tuple[Hit, ...],
) -> tuple[tuple[Hit, ...], str | None]:
    """Each shard explains its own hits; the maps go back in hit order."""
    tokens = None if q_tokens is None else q_tokens[qi]
    mask = None if q_masks is None else q_masks[qi]
    input_ids = None if q_ids is None else q_ids[qi]
    groups = list(_by_shard(hit_src).items())
    got = fan_out(
        view.executor,
        lambda g: view.shards[g[0]].explain(
            None if scorer is None else ref,
            tokens,
            mask,
            hit_ids[g[1]],
            None if words is None else list(words),
            input_ids,
            label,
        ),
        groups,
    )
    maps: list[Any] = [None] * len(hits)
    for (_, pos), (shard_maps, note) in zip(groups, got, strict=True):
        if note:
            return hits, note
        for p, m in zip(pos, shard_maps, strict=True):
            maps[int(p)] = m
    return tuple(replace(h, explain=m) for h, m in zip(hits, maps, strict=True)), None
