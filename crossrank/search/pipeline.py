"""The stages of one search on one snapshot, in the order they run.

:class:`crossrank.Index` checks every input first, before any model loads (:func:`check_k`,
:func:`crossrank.search.encode.prepare_queries`, the fusion spec, and the filter, run as
:func:`allowed_ids`), then loads the reranker and the encoder, encodes the queries
(:mod:`crossrank.search.encode`) and calls :func:`search_snapshot` on the generation it holds,
which runs the rest, one function per stage:

1. :func:`allowed_ids`: the ``where`` / ``filters`` pre-filter, DuckDB over the metadata Parquet
   (:meth:`crossrank.store.MetadataStore.allowed_ids`), minus removed images (run first, by the
   Index);
2. :func:`first_stage`: the ``rerank_k`` best candidates by pooled vector (FAISS,
   :mod:`crossrank.indexes`, or exact scoring of a small allowed set);
3. :func:`rerank`: gather the candidates' stored patches (:meth:`crossrank.store.PatchStore.gather`)
   and score them with the reranker (:mod:`crossrank.rerank`);
4. fuse (:mod:`crossrank.rerank.fusion`) and cut to ``k``;
5. :func:`join_metadata`: the hits' metadata rows (:meth:`crossrank.store.MetadataStore.rows`).
"""

from __future__ import annotations

import math
import numbers
import operator
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import InvalidArgumentError
from crossrank.hits import Explanation, Hit, SearchCounts, SearchResult

if TYPE_CHECKING:
    from crossrank.rerank import Reranker
    from crossrank.search.snapshot import Snapshot
    from crossrank.store.filters import Filters

__all__ = [
    "allowed_ids",
    "rank",
    "cap_at",
    "check_k",
    "explain",
    "patch_grid",
    "first_stage",
    "join_metadata",
    "rerank",
    "search_snapshot",
    "timed",
]

#: ``fuse(first_stage_scores, rerank_scores) -> final scores``, all ``(k,)`` float32.
FuseFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def search_snapshot(
    snap: Snapshot,
    xq: np.ndarray,
    q_tokens: list[np.ndarray] | None,
    q_masks: list[np.ndarray] | None,
    labels: list[str],
    *,
    k: int,
    n_candidates: int,
    allowed: np.ndarray | None,
    scorer: Reranker | None,
    fuse: FuseFn | None,
    timings: dict[str, float],
    q_ids: list[np.ndarray | None] | None,
    requested: int | None = None,
    encoder: Any = None,
    reranker: str = "none",
    fusion: str = "none",
    notes: Mapping[int, Sequence[str]] | None = None,
    words: Sequence[Sequence[str | None] | None] | None = None,
    nprobe: int | None = None,
) -> list[SearchResult]:
    """First stage, rerank (when ``scorer``), fuse, join metadata, on one snapshot.

    ``xq`` is ``(m, d)`` float32; ``q_tokens`` and ``q_masks`` hold each query's token features
    and mask, and ``q_ids`` its token ids (None for an image query); they are read only when
    ``scorer`` is given (the ids only by a scorer with ``needs_input_ids``). ``allowed`` is what
    :func:`allowed_ids` returned for the filter (computed before any model loads). ``k`` and
    ``n_candidates`` are already capped at the index size (:func:`cap_at`); ``requested`` is the
    ``k`` that was asked for (reported in the counts, default ``k``). ``timings`` (milliseconds
    per stage so far) is copied into each query's result; ``encoder``, ``reranker``, ``fusion``
    and ``notes`` (position -> lines) describe the search in each result.

    ``words`` asks for explanations (:func:`explain`): per query, the text of each token row
    (:func:`crossrank.search.encode.token_strings`; None for an image query); None = do not
    explain. Only the returned hits are explained, after they are ranked.

    ``nprobe`` sets the IVF lists probed for this search (None: the index's own; a filter scales
    it up, see :func:`first_stage`); it is ignored by index types without lists.
    """
    with timed(timings, "first_stage"):
        D, I = first_stage(snap, xq, n_candidates, allowed, nprobe=nprobe)

    results = []
    for qi, label in enumerate(labels):
        q_timings = dict(timings)
        keep = I[qi] >= 0
        ids, first_scores = I[qi][keep], D[qi][keep]
        hits, order = rank(
            snap,
            ids,
            first_scores,
            k=k,
            scorer=scorer,
            fuse=fuse,
            tokens=None if q_tokens is None else q_tokens[qi],
            mask=None if q_masks is None else q_masks[qi],
            input_ids=None if q_ids is None else q_ids[qi],
            timings=q_timings,
        )
        q_notes = tuple((notes or {}).get(qi, ()))
        if words is not None and hits:
            with timed(q_timings, "explain"):
                maps, note = explain(
                    snap,
                    scorer,
                    None if q_tokens is None else q_tokens[qi],
                    None if q_masks is None else q_masks[qi],
                    ids[order],
                    words[qi],
                    None if q_ids is None else q_ids[qi],
                    reranker,
                )
            if note:
                q_notes += (note,)
            else:
                hits = tuple(replace(hit, explain=m) for hit, m in zip(hits, maps, strict=True))
        results.append(
            query_result(
                label,
                hits,
                requested=k if requested is None else requested,
                filtered_out=0 if allowed is None else len(snap) - int(allowed.size),
                candidates=int(ids.size),
                timings=q_timings,
                generation=snap.number,
                encoder=encoder,
                reranker=reranker if scorer is not None else "none",
                fusion=fusion if scorer is not None else "none",
                notes=q_notes,
            )
        )
    return results


def query_result(
    label: str,
    hits: tuple[Hit, ...],
    *,
    requested: int,
    filtered_out: int,
    candidates: int,
    timings: dict[str, float],
    generation: int,
    encoder: str,
    reranker: str,
    fusion: str,
    notes: tuple[str, ...],
) -> SearchResult:
    """One query's :class:`SearchResult`; ``timings`` gets its ``total`` (the stages' sum)."""
    timings["total"] = sum(timings.values())
    return SearchResult(
        query=label,
        hits=hits,
        counts=SearchCounts(
            requested=requested,
            returned=len(hits),
            filtered_out=filtered_out,
            candidates=candidates,
        ),
        timings_ms=timings,
        generation=generation,
        encoder=encoder,
        reranker=reranker,
        fusion=fusion,
        notes=notes,
    )


def rank(
    snap: Snapshot,
    ids: np.ndarray,
    first_scores: np.ndarray,
    *,
    k: int,
    scorer: Reranker | None,
    fuse: FuseFn | None,
    tokens: np.ndarray | None,
    mask: np.ndarray | None,
    input_ids: np.ndarray | None,
    timings: dict[str, float],
) -> tuple[tuple[Hit, ...], np.ndarray]:
    """Rerank one query's candidates (when ``scorer``), fuse, cut to ``k``, join metadata.

    ``ids`` and ``first_scores`` are the candidates in first-stage order (ties in the fused score
    keep it). Adds the ``rerank`` and ``metadata`` stages to ``timings``.

    Returns:
        The hits, best first, and the positions in ``ids`` they came from.
    """
    rerank_scores: np.ndarray | None = None
    if scorer is not None and ids.size:
        assert tokens is not None and mask is not None and fuse is not None
        with timed(timings, "rerank"):
            rerank_scores = rerank(snap, scorer, tokens, mask, ids, input_ids)
            final = fuse(first_scores, rerank_scores)
            order = np.argsort(-final, kind="stable")[:k]  # ties keep the first-stage order
    else:
        final, order = first_scores, np.arange(min(k, ids.size))
    with timed(timings, "metadata"):
        hits = join_metadata(
            snap,
            ids[order],
            final[order],
            first_scores[order],
            None if rerank_scores is None else rerank_scores[order],
        )
    return hits, order


def cap_at(n: int, size: int) -> int:
    """``n`` hits or candidates, but never more than the ``size`` images the index holds (at
    least 1): memory follows the index, not the request."""
    return max(1, min(n, size))


def allowed_ids(
    snap: Snapshot, where: str | None, filters: Filters | None, timings: dict[str, float]
) -> np.ndarray | None:
    """The ids a search may return: those matching ``where`` and ``filters`` (DuckDB), without
    removed images (tombstones); None = every image (no filter, nothing removed).

    The set is cached per snapshot and filter (:meth:`Snapshot.allowed_ids`): repeating a filter
    on the same generation costs a dictionary look-up, not a DuckDB query. The array returned is
    read-only."""
    if where is None and filters is None:
        return snap.live_ids
    with timed(timings, "filter"):
        return snap.allowed_ids(where, filters)


def first_stage(
    snap: Snapshot,
    xq: np.ndarray,
    k: int,
    allowed: np.ndarray | None,
    *,
    nprobe: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (scores, ids) per query among ``allowed`` (None = all): FAISS, or exact
    scoring when the allowed set is small enough to beat it.

    Under a filter an IVF index probes more lists the fewer images are allowed
    (:meth:`FirstStage.filtered_nprobe`: 2.5 times ``nprobe`` divided by the fraction kept, at
    most half the lists); where the allowed vectors are few next to the list entries that would
    be tested, they are scored exactly (:meth:`FirstStage.prefers_exact`). The FAISS selector of
    a cached filter is made once and kept with its ids (:meth:`Snapshot.selector`). A query whose
    filtered FAISS search still comes back short of ``k`` (or of the allowed count) is searched
    again over every list. A filter that allows every row is searched unfiltered.

    Args:
        snap: the snapshot searched.
        xq: float32 ``(m, d)`` queries.
        k: candidates per query.
        allowed: sorted ids a hit may have (:func:`allowed_ids`); None = all.
        nprobe: IVF lists probed for this call (before the filter's scaling); None = the index's.
    """
    from crossrank.indexes import exact_search

    stage = snap.first_stage
    if allowed is not None and allowed.size == snap.ids.shape[0]:
        allowed = None  # every row: a selector would only slow FAISS down
    if allowed is None:
        return stage.search(xq, k, nprobe=nprobe)
    n_allowed = int(allowed.size)
    if stage.prefers_exact(n_allowed, k, nprobe=nprobe):
        rows = snap.generation.rows_of_ids(allowed)
        return exact_search(xq, np.asarray(snap.vectors[rows]), allowed, k)
    probe = stage.filtered_nprobe(n_allowed, nprobe=nprobe)
    selector = snap.selector(allowed)
    D, I = stage.search(xq, k, allowed_ids=selector, nprobe=probe)
    nlist = stage.nlist
    short = (I[:, : min(k, n_allowed)] < 0).any(axis=1)
    if nlist is not None and probe < nlist and short.any():
        # Uneven lists, or a filter that follows the clusters: what the probed lists held was not
        # enough. Every list holds every allowed vector, so the second try is complete.
        D2, I2 = stage.search(xq[short], k, allowed_ids=selector, nprobe=nlist)
        D, I = D.copy(), I.copy()
        D[short], I[short] = D2, I2
    return D, I


def rerank(
    snap: Snapshot,
    scorer: Reranker,
    tokens: np.ndarray,
    mask: np.ndarray,
    ids: np.ndarray,
    input_ids: np.ndarray | None = None,
) -> np.ndarray:
    """``scorer``'s float32 scores of one query's candidates ``ids`` from their stored patches."""
    import torch

    rows = snap.generation.rows_of_ids(ids)
    patches = snap.patches.gather(rows)  # (k, P, d): fp16 as stored, float32 decoded from a codec
    # Only a reranker that declares needs_input_ids gets the keyword (None for an image query:
    # it says itself that it cannot rerank one); the others keep the four-argument interface.
    extra: dict[str, Any] = {}
    if scorer.needs_input_ids:
        extra["input_ids"] = None if input_ids is None else torch.from_numpy(input_ids)
    scores = scorer.score(
        torch.from_numpy(np.ascontiguousarray(tokens)),
        torch.from_numpy(mask),
        torch.from_numpy(patches),
        **extra,
    )
    return scores.numpy().astype(np.float32, copy=False)


def explain(
    snap: Snapshot,
    scorer: Reranker | None,
    tokens: np.ndarray | None,
    mask: np.ndarray | None,
    ids: np.ndarray,
    words: Sequence[str | None] | None,
    input_ids: np.ndarray | None = None,
    reranker: str = "none",
) -> tuple[list[Explanation], str | None]:
    """Where each word of one query looked in each of the hits ``ids`` (the returned hits only).

    Calls :meth:`Reranker.explain` on the hits' stored patches; keeps the rows of the words
    (``words[i]`` not None: special tokens and padding are left out) and cuts each map to the
    patch grid (:func:`patch_grid`).

    Returns:
        One :class:`Explanation` per hit and None, or no explanations and the one line that says
        why there are none (no reranker ran, an image query, a reranker that cannot explain).
    """
    import torch

    if scorer is None or tokens is None or mask is None:
        return [], (
            "explain: no reranker ran, so no word looked at any patch; use a reranker "
            "(e.g. --reranker maxsim, or a trained one)"
        )
    if words is None:
        return [], "explain: an image query has no words whose attention could be shown"
    rows = snap.generation.rows_of_ids(ids)
    patches = snap.patches.gather(rows)  # (k, P, d): fp16 as stored, float32 decoded from a codec
    extra: dict[str, Any] = {}
    if scorer.needs_input_ids:
        extra["input_ids"] = None if input_ids is None else torch.from_numpy(input_ids)
    maps = scorer.explain(
        torch.from_numpy(np.ascontiguousarray(tokens)),
        torch.from_numpy(mask),
        torch.from_numpy(patches),
        **extra,
    )
    if maps is None:
        return [], f"explain: the {reranker} reranker cannot show where words looked"
    maps = maps.numpy().astype(np.float32, copy=False)  # (k, n_tokens, P)
    keep = [i for i, w in enumerate(words) if w is not None]
    if not keep:  # only special tokens are real: show them rather than nothing
        keep = [i for i in range(len(words)) if mask[i]]
    names = tuple(words[i] or f"#{i}" for i in keep)
    (rows_, cols), skip = patch_grid(maps.shape[-1])
    return [
        Explanation(tokens=names, grid=(rows_, cols), maps=hit_maps[keep, skip:])
        for hit_maps in maps
    ], None


def patch_grid(n_patches: int) -> tuple[tuple[int, int], int]:
    """The ``(rows, cols)`` patch grid of ``n_patches`` stored patches, and how many leading
    slots are not grid cells: a square grid, or a class token in front of one (BLIP stores
    ``1 + s * s`` vision tokens; the class slot has no place on the image and is left out of
    the map). Anything else is shown as one row."""
    side = math.isqrt(n_patches)
    if side * side == n_patches:
        return (side, side), 0
    side = math.isqrt(n_patches - 1)
    if n_patches > 1 and side * side == n_patches - 1:
        return (side, side), 1
    return (1, n_patches), 0


def join_metadata(
    snap: Snapshot,
    ids: np.ndarray,
    scores: np.ndarray,
    first_scores: np.ndarray,
    rerank_scores: np.ndarray | None,
) -> tuple[Hit, ...]:
    """The hits of ``ids`` in order, each with its metadata row and its scores."""
    rows = snap.metadata.rows(ids)
    return tuple(
        Hit(
            id=int(ids[j]),
            path=str(row.pop("path")),
            score=float(scores[j]),
            first_stage_score=float(first_scores[j]),
            rerank_score=None if rerank_scores is None else float(rerank_scores[j]),
            metadata={key: value for key, value in row.items() if key != "id"},
        )
        for j, row in zip(range(ids.size), rows, strict=True)
    )


#: The largest ``k`` or ``rerank_k`` accepted: ids and counts are int64.
INT64_MAX = int(np.iinfo(np.int64).max)


def _whole(value: object) -> int | None:
    """``value`` as an int when it is a whole number (Python or numpy integer, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return operator.index(value)


def check_k(k: int, rerank_k: int) -> tuple[int, int]:
    """Refuses a bad ``k`` or a ``rerank_k`` below it, saying what to change.

    Both must be whole numbers (``int`` or a numpy integer; not a bool, not a float) from 1 to
    2**63 - 1. Values beyond the index size are accepted: the search caps them (:func:`cap_at`).

    Returns:
        ``(k, rerank_k)`` as Python ints.
    """
    n = _whole(k)
    if n is None or n <= 0:
        raise InvalidArgumentError(f"k must be a positive number of hits, got {k!r}")
    if n > INT64_MAX:
        raise InvalidArgumentError(
            f"k must be at most {INT64_MAX} (2**63 - 1), got {k!r}; a search returns at most "
            "the images the index holds anyway"
        )
    r = _whole(rerank_k)
    if r is None:
        raise InvalidArgumentError(
            f"rerank_k must be a whole number of candidates (>= k), got {rerank_k!r}"
        )
    if r > INT64_MAX:
        raise InvalidArgumentError(
            f"rerank_k must be at most {INT64_MAX} (2**63 - 1), got {rerank_k!r}; a search "
            "reranks at most the images the index holds anyway"
        )
    if r < n:
        raise InvalidArgumentError(
            f"rerank_k must be >= k (the reranker can only return candidates it saw), got "
            f"rerank_k={rerank_k!r} and k={k!r}; raise --rerank-k or lower -k"
        )
    return n, r


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the milliseconds spent in the block to ``timings[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3
