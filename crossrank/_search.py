"""The stages of one search on one snapshot (private; :class:`crossrank.Index` is the entry point).

:func:`encode_queries` turns texts and images into the pooled vectors and token features;
:func:`search_snapshot` then runs the rest in DESIGN.md's order on the generation a search holds:
the ``where`` / ``filters`` pre-filter (DuckDB), the first stage (:func:`first_stage`), the reranker
on the candidates' stored patches (:func:`rerank`), fusion, the cut to ``k`` and the metadata join.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import InvalidArgumentError
from crossrank.hits import Hit, SearchCounts, SearchResult

if TYPE_CHECKING:
    from crossrank.encoders import Encoder
    from crossrank.filters import Filters
    from crossrank.index import Query
    from crossrank.rerank import Reranker
    from crossrank.snapshot import Snapshot

__all__ = ["check_k", "encode_queries", "first_stage", "rerank", "search_snapshot", "timed"]


def search_snapshot(snap: Snapshot, xq: np.ndarray, q_tokens: list[np.ndarray] | None,
                     q_masks: list[np.ndarray] | None, labels: list[str], *, k: int,
                     n_candidates: int, where: str | None, scorer: Reranker | None, fuse: Any,
                     timings: dict[str, float], q_ids: list[np.ndarray | None] | None,
                     filters: Filters | None) -> list[SearchResult]:
    """Filter, first stage, rerank (when ``scorer``), fuse, join metadata, on one snapshot.

    ``xq`` is ``(m, d)`` float32; ``q_tokens`` and ``q_masks`` hold each query's token features
    and mask, and ``q_ids`` its token ids (None for an image query); they are read only when
    ``scorer`` is given (the ids only by a scorer with ``needs_input_ids``). Removed images
    (tombstones) are excluded by the same pre-filter as ``where``: the allowed ids are the live
    ones. ``timings`` (milliseconds per stage so far) is copied into each query's result.
    """
    allowed: np.ndarray | None = None
    if where is not None or filters is not None:
        with timed(timings, "filter"):
            allowed = snap.without_tombstones(snap.metadata.allowed_ids(where, filters=filters))
    elif snap.live_ids is not None:
        allowed = snap.live_ids
    with timed(timings, "first_stage"):
        D, I = first_stage(snap, xq, n_candidates, allowed)

    results = []
    for qi, label in enumerate(labels):
        q_timings = dict(timings)
        keep = I[qi] >= 0
        ids, first_scores = I[qi][keep], D[qi][keep]
        rerank_scores: np.ndarray | None = None
        if scorer is not None and ids.size:
            assert q_tokens is not None and q_masks is not None and fuse is not None
            with timed(q_timings, "rerank"):
                rerank_scores = rerank(snap, scorer, q_tokens[qi], q_masks[qi], ids,
                                       None if q_ids is None else q_ids[qi])
                final = fuse(first_scores, rerank_scores)
                order = np.argsort(-final, kind="stable")[:k]  # ties keep the first-stage order
        else:
            final, order = first_scores, np.arange(min(k, ids.size))
        with timed(q_timings, "metadata"):
            rows = snap.metadata.rows(ids[order])
        hits = tuple(
            Hit(id=int(ids[j]), path=str(row.pop("path")), score=float(final[j]),
                first_stage_score=float(first_scores[j]),
                rerank_score=None if rerank_scores is None else float(rerank_scores[j]),
                metadata={key: value for key, value in row.items() if key != "id"})
            for j, row in zip(order, rows, strict=True)
        )
        counts = SearchCounts(requested=k, returned=len(hits),
                              filtered_out=0 if allowed is None else len(snap) - int(allowed.size),
                              candidates=int(ids.size))
        q_timings["total"] = sum(q_timings.values())
        results.append(SearchResult(query=label, hits=hits, counts=counts, timings_ms=q_timings,
                                    generation=snap.number))
    return results


def encode_queries(encoder: Encoder, dim: int, queries: Sequence[Query], token_embeddings: int = 0
                   ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray | None], list[str]]:
    """Encode texts and images with ``encoder``; returns pooled ``(m, dim)``, per-query token
    features, masks and token ids (None for images and for encoders without ids), and labels.

    With ``token_embeddings`` (a reranker's width of layer-0 token states, 0 = none) a text's
    token features are ``TextFeatures.reranker_tokens()``, and an image query's patches get that
    many zero channels in front (an image has no layer-0 text states)."""
    from PIL import Image as PILImage

    from crossrank.ingest import decode_image, to_rgb

    texts: list[tuple[int, str]] = []
    images: list[tuple[int, Any]] = []
    labels: list[str] = []
    for i, query in enumerate(queries):
        if isinstance(query, str):
            if not query.strip():
                raise InvalidArgumentError("query is empty; give a text to search for, or an image")
            texts.append((i, query))
            labels.append(query)
        elif isinstance(query, Path):
            if not query.is_file():
                raise InvalidArgumentError(f"query image {query} does not exist; give the path of an image file")
            image, _ = decode_image(query)
            images.append((i, image))
            labels.append(str(query))
        elif isinstance(query, PILImage.Image):
            images.append((i, to_rgb(query)))
            labels.append(f"<image {query.width}x{query.height}>")
        else:
            raise InvalidArgumentError(
                f"query must be a str (text), a pathlib.Path or a PIL image, got {type(query).__name__}"
            )
    m = len(queries)
    xq = np.empty((m, dim), dtype=np.float32)
    tokens: list[np.ndarray] = [np.empty(0)] * m
    masks: list[np.ndarray] = [np.empty(0)] * m
    input_ids: list[np.ndarray | None] = [None] * m
    if texts:
        # The keyword only when asked for: an Encoder need not take it (see Encoder.encode_text).
        extra = {"token_embeddings": True} if token_embeddings else {}
        feats = encoder.encode_text([t for _, t in texts], **extra)
        text_tokens = feats.reranker_tokens()  # feats.tokens without token embeddings
        for row, (i, _) in enumerate(texts):
            xq[i] = feats.pooled[row]
            tokens[i], masks[i] = text_tokens[row], feats.mask[row]
            if feats.input_ids is not None:
                input_ids[i] = feats.input_ids[row]
    if images:
        feats = encoder.encode_images([img for _, img in images])
        for row, (i, _) in enumerate(images):
            xq[i] = feats.pooled[row]
            tokens[i] = feats.patches[row]
            if token_embeddings:
                tokens[i] = np.concatenate(
                    [np.zeros((tokens[i].shape[0], token_embeddings), dtype=tokens[i].dtype), tokens[i]], axis=-1)
            masks[i] = np.ones(feats.patches.shape[1], dtype=bool)
    return xq, tokens, masks, input_ids, labels


def first_stage(snap: Snapshot, xq: np.ndarray, k: int,
                allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best (scores, ids) per query among ``allowed`` (None = all): FAISS, or exact
    scoring when the allowed set is small enough to beat it."""
    from crossrank.indexes import exact_search

    if allowed is not None and snap.first_stage.prefers_exact(int(allowed.size), k):
        rows = snap.generation.rows_of_ids(allowed)
        return exact_search(xq, np.asarray(snap.vectors[rows]), allowed, k)
    return snap.first_stage.search(xq, k, allowed_ids=allowed)


def rerank(snap: Snapshot, scorer: Reranker, tokens: np.ndarray, mask: np.ndarray, ids: np.ndarray,
           input_ids: np.ndarray | None = None) -> np.ndarray:
    """``scorer``'s float32 scores of one query's candidates ``ids`` from their stored patches."""
    import torch

    rows = snap.generation.rows_of_ids(ids)
    patches = snap.patches.gather(rows)  # (k, P, d) fp16
    # Only a reranker that declares needs_input_ids gets the keyword (None for an image query:
    # it says itself that it cannot rerank one); the others keep the four-argument protocol.
    extra: dict[str, Any] = {}
    if getattr(scorer, "needs_input_ids", False):
        extra["input_ids"] = None if input_ids is None else torch.from_numpy(input_ids)
    scores = scorer.score(torch.from_numpy(np.ascontiguousarray(tokens)), torch.from_numpy(mask),
                          torch.from_numpy(patches), **extra)
    return scores.numpy().astype(np.float32, copy=False)


def check_k(k: int, rerank_k: int) -> None:
    """Refuses a bad ``k`` or a ``rerank_k`` below it, saying what to change."""
    if not isinstance(k, int) or k <= 0:
        raise InvalidArgumentError(f"k must be a positive number of hits, got {k!r}")
    if not isinstance(rerank_k, int) or rerank_k < k:
        raise InvalidArgumentError(
            f"rerank_k must be >= k (the reranker can only return candidates it saw), got rerank_k={rerank_k!r} "
            f"and k={k}; raise --rerank-k or lower -k"
        )


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the milliseconds spent in the block to ``timings[stage]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t0) * 1e3
