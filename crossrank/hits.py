"""What a search returns: ranked :class:`Hit` objects inside a :class:`SearchResult`."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, overload

__all__ = ["Explanation", "Hit", "SearchCounts", "SearchResult"]

#: Decimals kept per weight in the JSON of an explanation (the library keeps float32).
EXPLAIN_DECIMALS = 5


@dataclass(frozen=True)
class Explanation:
    """Where each word of a text query looked in one hit (``search(..., explain=True)``).

    Attributes:
        tokens: the query's tokens as the tokenizer cut it (special tokens left out), e.g.
            ``("a", "red", "circle")``.
        grid: ``(rows, cols)`` of the hit's patch grid; patch ``j`` is row ``j // cols``,
            column ``j % cols``, in reading order from the image's top left.
        maps: ``(len(tokens), rows * cols)`` float32, one map per token: for the cross-attention
            reranker the last layer's attention weights over the patches, heads averaged (each
            row sums to 1); for MaxSim 1 at the token's best patch, 0 elsewhere; for BLIP ITM the
            text encoder's last cross-attention layer, heads averaged, without the class token
            (a row sums to 1 minus the token's weight on it).
    """

    tokens: tuple[str, ...]
    grid: tuple[int, int]
    maps: Any  # numpy (n_tokens, rows * cols) float32; typed loosely to keep hits numpy-free

    def to_dict(self) -> dict[str, Any]:
        """``{"tokens": [...], "grid": [rows, cols], "maps": [[P floats] per token]}``, the
        weights rounded to :data:`EXPLAIN_DECIMALS` decimals to keep 100 hits' JSON small."""
        return {
            "tokens": list(self.tokens),
            "grid": [int(self.grid[0]), int(self.grid[1])],
            "maps": [[round(float(w), EXPLAIN_DECIMALS) for w in row] for row in self.maps],
        }


@dataclass(frozen=True)
class Hit:
    """One image found for a query.

    Attributes:
        id: the image's stable int64 id in the index.
        path: absolute path of the image file.
        score: the final score the hits are ranked by (the fused score when a reranker ran).
        first_stage_score: inner product of the pooled query and image vectors.
        rerank_score: the reranker's raw score, or ``None`` when no reranker ran.
        metadata: the image's metadata columns (``sha256``, ``width``, ... and the manifest's own).
        explain: where each query word looked in this image (:class:`Explanation`), when the
            search was asked to explain and its reranker can; else None.
    """

    id: int
    path: str
    score: float
    first_stage_score: float
    rerank_score: float | None
    metadata: dict[str, Any] = field(default_factory=dict)
    explain: Explanation | None = None

    def to_dict(self) -> dict[str, Any]:
        """A hit as JSON: ``{"id", "path", "score", "scores": {...}, "metadata": {...}}``, and
        ``"explain"`` (:meth:`Explanation.to_dict`) when the hit carries one."""
        out: dict[str, Any] = {
            "id": self.id,
            "path": self.path,
            "score": _json_float(self.score),
            "scores": {
                "first_stage": _json_float(self.first_stage_score),
                "rerank": None if self.rerank_score is None else _json_float(self.rerank_score),
            },
            "metadata": {key: _json_value(value) for key, value in self.metadata.items()},
        }
        if self.explain is not None:
            out["explain"] = self.explain.to_dict()
        return out


@dataclass(frozen=True)
class SearchCounts:
    """How a result list came to have the length it has.

    Attributes:
        requested: ``k``, the number of hits asked for (as asked, even beyond the index size: a
            search never looks for more hits than the index holds).
        returned: the number of hits in the result.
        filtered_out: images of the index that the ``where`` filter excluded (0 without a filter).
        candidates: first-stage candidates that reached the reranker (or the top-k without one).
    """

    requested: int
    returned: int
    filtered_out: int
    candidates: int

    def to_dict(self) -> dict[str, int]:
        return {
            "requested": self.requested,
            "returned": self.returned,
            "filtered_out": self.filtered_out,
            "candidates": self.candidates,
        }


@dataclass(frozen=True)
class SearchResult(Sequence[Hit]):
    """The ranked hits of one query, with the counts and per-stage timings.

    A ``SearchResult`` is a sequence of :class:`Hit`: ``result[0]``, ``len(result)`` and
    ``for hit in result`` work as on a list.

    Attributes:
        query: the query's label: its text, the image path, or ``<image WxH>``.
        hits: the hits, best first.
        counts: how many hits were asked for, returned, filtered out and reranked.
        timings_ms: stage -> milliseconds.
        generation: the index generation every stage of the search read (None when not searched
            through an :class:`~crossrank.Index`).
        encoder: the model that encoded the query and the index
            (:class:`~crossrank.encoders.describe.ModelDescription`; its ``note`` is the one line
            said about the demo encoder), or None.
        reranker: what ranked the candidates after the first stage, in words:
            ``"none"`` (the first stage alone), ``"maxsim"``, ``"blip-itm"``,
            ``"cross-attention (index reranker/)"``, ``"cross-attention (shipped for
            crossrank-demo)"``, ``"cross-attention (FOLDER)"``, or a custom reranker's name.
        fusion: how the final score was made: ``"rerank"``, ``"sum"``, ``"weighted:ALPHA"``, or
            ``"none"`` when no reranker ran (the final score is the first-stage score).
        notes: one-line remarks about this search a user should see: a query cut at the text
            encoder's positions, how to train a reranker when ``auto`` found none.
    """

    query: str
    hits: tuple[Hit, ...]
    counts: SearchCounts
    timings_ms: dict[str, float]
    generation: int | None = None
    # A crossrank.encoders.describe.ModelDescription (typed loosely: hits imports no encoders).
    encoder: Any = None
    reranker: str = "none"
    fusion: str = "none"
    notes: tuple[str, ...] = ()

    @overload
    def __getitem__(self, i: int) -> Hit: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Hit]: ...
    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        return self.hits[i]

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` shape: ``{"query", "hits", "counts", "timings_ms", "generation",
        "encoder", "reranker", "fusion", "notes"}``; ``encoder`` is
        ``{"model_id", "model_type", "demo", "note"}`` (None when unknown)."""
        return {
            "query": self.query,
            "hits": [hit.to_dict() for hit in self.hits],
            "counts": self.counts.to_dict(),
            "timings_ms": {stage: round(ms, 3) for stage, ms in self.timings_ms.items()},
            "generation": self.generation,
            "encoder": None if self.encoder is None else self.encoder.to_dict(),
            "reranker": self.reranker,
            "fusion": self.fusion,
            "notes": list(self.notes),
        }


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _json_value(value: Any) -> Any:
    """Turn a metadata value from DuckDB/Arrow into something ``json.dumps`` accepts."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _json_value(value.item())
    return value
