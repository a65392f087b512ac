"""Retrieval metrics in the image-retrieval sense, equal to ranx's on the same run and qrels.

A run maps each query id to its ranked doc ids, best first: the rank of a doc is its position in
the list (crossrank never re-sorts a run by score here; see :mod:`crossrank.evaluate.trec` for how
scores and ranks are kept consistent in run files). Qrels map each query id to ``{doc_id: rel}``;
a doc is relevant when ``rel >= 1`` (ranx's default ``rel_lvl=1``, trec_eval's default too), and
its gain in nDCG is ``rel`` (graded) or 1 (binary qrels).

The metrics, for a cutoff K (first K docs of the list; fewer when the list is shorter):

- ``R@K``: 1 if at least one relevant doc is in the top K, else 0. Image-retrieval "recall@K"
  (one relevant image is enough); ranx ``hit_rate@K``, trec_eval ``success_K``.
- ``MRR@K``: 1 / rank of the first relevant doc in the top K, 0 if none. ranx ``mrr@K``.
- ``nDCG@K``: DCG@K / IDCG@K with Järvelin & Kekäläinen's linear gain and log2 discount,
  ``DCG@K = sum_{i=1..K} rel_i / log2(i + 1)``; IDCG@K is the DCG@K of the qrels' relevant docs
  sorted by rel. ranx ``ndcg@K`` (not ``ndcg_burges``, whose gain is ``2**rel - 1``).
- ``P@K``: relevant docs in the top K divided by K, even when the list holds fewer than K docs
  (ranx ``precision@K``, trec_eval ``P_K``).

Each metric is averaged over the evaluated queries, which are the qrels queries with at least one
relevant doc. Which queries count, and where crossrank differs from a plain ``ranx.evaluate``:

- A qrels query with no relevant doc cannot be scored; it is left out of every mean and listed in
  ``excluded_qids``. (ranx would score it 0 and average the zero in.)
- An evaluated query absent from the run scores 0 on every metric and is listed in
  ``missing_qids`` (ranx does the same with ``make_comparable=True``).
- A run query absent from the qrels is ignored and listed in ``unjudged_qids`` (ranx with
  ``make_comparable=True`` drops it too).
"""

from __future__ import annotations

import logging
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from crossrank.errors import InvalidArgumentError

__all__ = [
    "METRIC_NAMES",
    "MetricKind",
    "MetricsReport",
    "compute_metrics",
    "ranx_name",
]

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "P@10")
"""The metrics ``crossrank eval`` reports, in this order."""

_RELEVANT = 1  # a doc is relevant when its qrels rel >= this (ranx's rel_lvl, trec_eval's default)


class MetricKind(StrEnum):
    """The metric families; a metric name is ``KIND@K``, e.g. ``nDCG@10``."""

    RECALL = "R"
    MRR = "MRR"
    NDCG = "nDCG"
    PRECISION = "P"


_RANX_KIND = {
    MetricKind.RECALL: "hit_rate",
    MetricKind.MRR: "mrr",
    MetricKind.NDCG: "ndcg",
    MetricKind.PRECISION: "precision",
}
_METRIC_RE = re.compile(r"^(R|MRR|nDCG|P)@([1-9][0-9]*)$")


def _parse_metric(name: str) -> tuple[MetricKind, int]:
    match = _METRIC_RE.match(name) if isinstance(name, str) else None
    if match is None:
        raise InvalidArgumentError(
            "metric must be R@K, MRR@K, nDCG@K or P@K with K >= 1 "
            f"(e.g. {', '.join(METRIC_NAMES)}), got {name!r}"
        )
    return MetricKind(match.group(1)), int(match.group(2))


def ranx_name(metric: str) -> str:
    """The name ranx gives a crossrank metric.

    Args:
        metric: a crossrank metric name, e.g. ``"R@5"``.

    Returns:
        The ranx metric name, e.g. ``"hit_rate@5"``.

    Raises:
        InvalidArgumentError: the name is not ``R@K``, ``MRR@K``, ``nDCG@K`` or ``P@K``.

    Example:
        >>> [ranx_name(m) for m in METRIC_NAMES]
        ['hit_rate@1', 'hit_rate@5', 'hit_rate@10', 'mrr@10', 'ndcg@10', 'precision@10']
    """
    kind, k = _parse_metric(metric)
    return f"{_RANX_KIND[kind]}@{k}"


@dataclass(frozen=True)
class MetricsReport:
    """Metrics over a set of queries, with the queries that were left out or scored 0 named.

    Attributes:
        values: metric name -> mean over the evaluated queries, in the order asked.
        n_queries: how many queries were evaluated (qrels queries with a relevant doc).
        excluded_qids: qrels queries with no relevant doc, left out of every mean (sorted).
        missing_qids: evaluated queries absent from the run, scored 0 on every metric (sorted).
        unjudged_qids: run queries absent from the qrels, ignored (sorted).
        per_query: query id -> metric name -> value, for the evaluated queries.
    """

    values: dict[str, float]  # metric -> mean over the n_queries evaluated queries
    n_queries: int  # evaluated queries: in the qrels with >= 1 relevant doc
    excluded_qids: list[str] = field(default_factory=list)  # no relevant doc: not in any mean
    missing_qids: list[str] = field(default_factory=list)  # not in the run: counted as 0
    unjudged_qids: list[str] = field(default_factory=list)  # not in the qrels: ignored
    per_query: dict[str, dict[str, float]] = field(default_factory=dict)  # qid -> metric -> value

    def to_dict(self, *, per_query: bool = False) -> dict[str, Any]:
        """A JSON-able dict of the report.

        Args:
            per_query: include the per-query values too.

        Returns:
            ``{"values", "n_queries", "excluded_qids", "missing_qids", "unjudged_qids"}`` plus
            ``"per_query"`` when asked.
        """
        out: dict[str, Any] = {
            "values": dict(self.values),
            "n_queries": self.n_queries,
            "excluded_qids": list(self.excluded_qids),
            "missing_qids": list(self.missing_qids),
            "unjudged_qids": list(self.unjudged_qids),
        }
        if per_query:
            out["per_query"] = {q: dict(v) for q, v in self.per_query.items()}
        return out


def _check_qrels(qrels: Mapping[str, Mapping[str, int]]) -> None:
    if not isinstance(qrels, Mapping):
        raise InvalidArgumentError(
            f"qrels must be a dict {{qid: {{docid: rel}}}}, got {type(qrels).__name__}"
        )
    for qid, judged in qrels.items():
        if not isinstance(qid, str):
            raise InvalidArgumentError(
                f"qrels query ids must be str, got {qid!r} ({type(qid).__name__})"
            )
        if not isinstance(judged, Mapping):
            raise InvalidArgumentError(
                f"qrels[{qid!r}] must be a dict {{docid: rel}}, got {type(judged).__name__}"
            )
        for docid, rel in judged.items():
            if not isinstance(docid, str):
                raise InvalidArgumentError(
                    f"qrels[{qid!r}] doc ids must be str, got {docid!r} ({type(docid).__name__})"
                )
            if not isinstance(rel, numbers.Integral) or isinstance(rel, bool):
                raise InvalidArgumentError(
                    f"qrels[{qid!r}][{docid!r}] must be an int relevance, got {rel!r}"
                )


def _ranked_docids(qid: str, ranked: Sequence[Any]) -> list[str]:
    if isinstance(ranked, (str, bytes)) or not isinstance(ranked, Sequence):
        raise InvalidArgumentError(
            f"run[{qid!r}] must be a list of doc ids (or (doc id, score) pairs) best first, "
            f"got {type(ranked).__name__}"
        )
    docids = [entry[0] if isinstance(entry, (tuple, list)) and entry else entry for entry in ranked]
    for rank, docid in enumerate(docids, start=1):
        if not isinstance(docid, str):
            raise InvalidArgumentError(
                f"run[{qid!r}] rank {rank}: doc ids must be str, "
                f"got {docid!r} ({type(docid).__name__})"
            )
    if len(set(docids)) != len(docids):
        seen: set[str] = set()
        for rank, docid in enumerate(docids, start=1):
            if docid in seen:
                raise InvalidArgumentError(
                    f"run[{qid!r}] lists doc {docid!r} twice (again at rank {rank}); "
                    "a ranking holds each doc once"
                )
            seen.add(docid)
    return docids


def _query_metrics(
    docids: list[str], judged: Mapping[str, int], metrics: list[tuple[str, MetricKind, int]]
) -> dict[str, float]:
    gains = [rel if (rel := judged.get(d, 0)) >= _RELEVANT else 0 for d in docids]
    ideal = sorted((rel for rel in judged.values() if rel >= _RELEVANT), reverse=True)
    out: dict[str, float] = {}
    for name, kind, k in metrics:
        top = gains[:k]
        if kind == MetricKind.RECALL:
            out[name] = 1.0 if any(top) else 0.0
        elif kind == MetricKind.MRR:
            out[name] = next((1.0 / rank for rank, g in enumerate(top, start=1) if g), 0.0)
        elif kind == MetricKind.PRECISION:
            out[name] = sum(1 for g in top if g) / k
        else:
            dcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(top, start=1))
            idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal[:k], start=1))
            out[name] = dcg / idcg
    return out


def compute_metrics(
    run: Mapping[str, Sequence[str] | Sequence[tuple[str, float]]],
    qrels: Mapping[str, Mapping[str, int]],
    metrics: Sequence[str] = METRIC_NAMES,
) -> MetricsReport:
    """Compute retrieval metrics of a run against qrels (definitions in the module docstring).

    Args:
        run: query id -> doc ids best first; ``(doc id, score)`` pairs are accepted too (as
            :func:`~crossrank.evaluate.trec.read_run` returns them) and are taken in list order,
            the scores unused.
        qrels: query id -> ``{doc id: rel}``, rel an int; ``rel >= 1`` is relevant.
        metrics: metric names, ``R@K``, ``MRR@K``, ``nDCG@K`` or ``P@K``; by default
            :data:`METRIC_NAMES`.

    Returns:
        A :class:`MetricsReport`: the mean of each metric over the qrels queries that have a
        relevant doc, and the query ids left out (no relevant doc), scored 0 (not in the run) or
        ignored (not in the qrels).

    Raises:
        InvalidArgumentError: a metric name is unknown; an id is not a str or a rel not an int; a
            ranking lists a doc twice; or no qrels query has a relevant doc.

    Example:
        >>> report = compute_metrics({"q1": ["b", "a"]}, {"q1": {"a": 1}})
        >>> report.values["R@1"], report.values["MRR@10"]
        (0.0, 0.5)
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    parsed = [(name, *_parse_metric(name)) for name in metrics]
    if not parsed:
        raise InvalidArgumentError("metrics is empty; ask for at least one, e.g. R@1")
    _check_qrels(qrels)
    if not isinstance(run, Mapping):
        raise InvalidArgumentError(
            f"run must be a dict {{qid: [docid, ...]}}, got {type(run).__name__}"
        )

    excluded = sorted(
        q for q, judged in qrels.items() if not any(r >= _RELEVANT for r in judged.values())
    )
    excluded_set = set(excluded)
    evaluated = [q for q in qrels if q not in excluded_set]
    if not evaluated:
        raise InvalidArgumentError(
            f"no query in the qrels has a relevant doc (rel >= {_RELEVANT}) among {len(qrels)} "
            "queries; nothing to evaluate"
        )
    missing = sorted(q for q in evaluated if q not in run)
    unjudged = sorted(q for q in run if q not in qrels)
    if excluded:
        logger.warning("%d qrels queries have no relevant doc and are left out", len(excluded))
    if missing:
        logger.warning("%d evaluated queries are not in the run and score 0", len(missing))

    per_query: dict[str, dict[str, float]] = {}
    for qid in evaluated:
        docids = _ranked_docids(qid, run[qid]) if qid in run else []
        per_query[qid] = _query_metrics(docids, qrels[qid], parsed)
    for qid in unjudged:
        _ranked_docids(qid, run[qid])  # a malformed ranking is an error even where it is unused

    n = len(evaluated)
    # math.fsum: the mean does not depend on the order the queries come in.
    values = {name: math.fsum(per_query[q][name] for q in evaluated) / n for name, _, _ in parsed}
    return MetricsReport(
        values=values,
        n_queries=n,
        excluded_qids=excluded,
        missing_qids=missing,
        unjudged_qids=unjudged,
        per_query=per_query,
    )
