"""Evaluating an index on queries + qrels: the first stage alone, and the first stage + reranker.

One search per query (``k = rerank_k``) gives both rankings: the reranked list as returned, and
the same candidates ordered by their first-stage score, which is exactly what a search without
the reranker returns. Doc ids are image paths relative to the qrels file's folder, so a benchmark
folder carries its own qrels (``images/000123.png``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import InvalidArgumentError
from crossrank.evaluate.metrics import METRIC_NAMES, MetricsReport, compute_metrics
from crossrank.evaluate.trec import read_qrels, write_run

if TYPE_CHECKING:
    from crossrank.api.index import Index
    from crossrank.rerank import Reranker

__all__ = ["EvalQuery", "EvalReport", "read_queries", "evaluate_index"]

logger = logging.getLogger(__name__)

#: Per-query ranking depth written to the run files and scored.
RUN_DEPTH = 100


@dataclass(frozen=True)
class EvalQuery:
    """One evaluation query: its id, its text and its groups (``kind``, ``heldout``)."""

    qid: str
    text: str
    groups: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EvalReport:
    """The outcome of :func:`evaluate_index`.

    Attributes:
        queries: queries evaluated (those with at least one relevant image).
        first_stage: metrics of the first-stage ranking.
        reranked: metrics after reranking (``None`` without a reranker).
        groups: ``"kind=pair"``-style group -> ``{"queries", "first_stage", "reranked"}`` metric
            values.
        latency_ms: stage -> ``{"p50", "p95"}`` per query, in milliseconds.
        excluded_qids: queries left out because the qrels give them no relevant image.
        reranker: what reranked, in the words of ``SearchResult.reranker`` (``"none"``,
            ``"maxsim"``, ``"cross-attention (index reranker/)"``, ...).
        fusion: how the final score was made (``SearchResult.fusion``; ``"none"`` without a
            reranker).
        encoder: the index's encoder (``{"model_id", "model_type", "demo", "note"}``).
        notes: one-line remarks to show with the report (the hint on how to train a reranker
            when ``auto`` found none).

    Metric values are kept at full precision here and in :meth:`to_dict` (the ``--json``
    output); only the tables round them.
    """

    queries: int
    first_stage: MetricsReport
    reranked: MetricsReport | None
    groups: dict[str, dict[str, Any]]
    latency_ms: dict[str, dict[str, float]]
    excluded_qids: list[str]
    reranker: str
    fusion: str = "none"
    encoder: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` shape: ``{"queries", "reranker", "fusion", "encoder", "first_stage",
        "reranked", "latency_ms", "groups", "excluded_qids", "notes"}``, metrics unrounded."""
        return {
            "queries": self.queries,
            "reranker": self.reranker,
            "fusion": self.fusion,
            "encoder": self.encoder,
            "first_stage": _exact(self.first_stage.values),
            "reranked": None if self.reranked is None else _exact(self.reranked.values),
            "latency_ms": self.latency_ms,
            "groups": self.groups,
            "excluded_qids": self.excluded_qids,
            "notes": list(self.notes),
        }


def _not_a_file(path: Path) -> str:
    """Why ``path``, which is not a regular file, cannot be read as one."""
    return "is a folder, not a file" if path.is_dir() else "does not exist"


def read_queries(path: str | Path) -> list[EvalQuery]:
    """Read queries from a ``.parquet`` (``query_id``, ``text`` and optional ``kind``/``heldout``)
    or a TSV file (``qid<TAB>text`` per line).

    Raises:
        InvalidArgumentError: the file is missing, unreadable, or lacks the columns.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(
            f"queries file {path} {_not_a_file(path)}; pass --queries FILE (.parquet or .tsv)"
        )
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:
            raise InvalidArgumentError(f"cannot read queries file {path}: {e}") from e
        missing = {"query_id", "text"} - set(table.column_names)
        if missing:
            raise InvalidArgumentError(
                f"queries file {path} lacks column(s) {sorted(missing)}; "
                f"it needs query_id and text (it has {table.column_names})"
            )
        group_cols = [c for c in ("kind", "heldout") if c in table.column_names]
        rows = table.select(["query_id", "text", *group_cols]).to_pylist()
        return [
            EvalQuery(
                str(r["query_id"]), str(r["text"]), {c: str(r[c]).lower() for c in group_cols}
            )
            for r in rows
        ]
    queries = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        qid, sep, text = line.partition("\t")
        if not sep or not text.strip():
            raise InvalidArgumentError(f"{path}:{n}: expected 'qid<TAB>text', got {line[:60]!r}")
        queries.append(EvalQuery(qid.strip(), text.strip()))
    return queries


def evaluate_index(
    index: Index,
    queries: str | Path | Sequence[EvalQuery],
    qrels: str | Path,
    *,
    rerank_k: int = 100,
    reranker: str | Reranker | None = "auto",
    fusion: str = "auto",
    run_out: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Evaluate ``index`` on ``queries`` against TREC ``qrels``.

    Args:
        index: an opened index.
        queries: a queries file (see :func:`read_queries`) or a list of :class:`EvalQuery`.
        qrels: a TREC qrels file; doc ids are image paths relative to its folder.
        rerank_k: first-stage candidates per query (also the depth of the first-stage run).
        reranker: the reranker to evaluate, or ``None``/``"none"`` for the first stage alone;
            ``"auto"`` as in :meth:`Index.search` (a trained reranker, else none: then only the
            first stage is reported, with a hint in ``notes``).
        fusion: score fusion, as in :meth:`Index.search`.
        run_out: a folder to write ``first_stage.run`` and ``reranked.run`` into.
        progress: called as ``progress(done, total)`` after each query.

    Returns:
        An :class:`EvalReport`.

    Raises:
        InvalidArgumentError: the qrels or queries do not match the index or each other.
    """
    qrels_path = Path(qrels)
    if not qrels_path.is_file():
        raise InvalidArgumentError(
            f"qrels file {qrels_path} {_not_a_file(qrels_path)}; pass --qrels FILE "
            "(TREC: qid 0 docid rel)"
        )
    judged = read_qrels(qrels_path)
    query_list = list(queries) if not isinstance(queries, (str, Path)) else read_queries(queries)
    if not query_list:
        raise InvalidArgumentError("no queries to evaluate: the queries file is empty")
    root = qrels_path.resolve().parent
    _check_match(index, query_list, judged, root, qrels_path)
    out = None if run_out is None else _run_folder(Path(run_out))  # before the whole evaluation
    if reranker == "none":
        reranker = None

    label, fusion_label, notes, encoder = "none", "none", (), None
    first_run: dict[str, list[tuple[str, float]]] = {}
    rerank_run: dict[str, list[tuple[str, float]]] = {}
    timings: dict[str, list[float]] = {}
    for n, query in enumerate(query_list, start=1):
        result = index.search(
            query.text, k=rerank_k, rerank_k=rerank_k, reranker=reranker, fusion=fusion
        )
        label, fusion_label, notes = result.reranker, result.fusion, result.notes
        encoder = result.encoder
        for stage, ms in result.timings_ms.items():
            timings.setdefault(stage, []).append(ms)
        docs = [(os.path.relpath(hit.path, root), hit) for hit in result]
        by_first = sorted(docs, key=lambda d: (-d[1].first_stage_score, d[1].id))
        first_run[query.qid] = [(doc, hit.first_stage_score) for doc, hit in by_first[:RUN_DEPTH]]
        if label != "none":  # what ran, not what was asked: auto may have found no reranker
            rerank_run[query.qid] = [(doc, hit.score) for doc, hit in docs[:RUN_DEPTH]]
        if progress is not None:
            progress(n, len(query_list))
    reranked = label != "none"
    # A long query's truncation note is per query; the report keeps the notes every query shares.
    notes = tuple(n for n in notes if "longer than the text encoder reads" not in n)

    asked = {q.qid for q in query_list}
    evaluated_qrels = {qid: docs for qid, docs in judged.items() if qid in asked}
    excluded = sorted(
        q.qid for q in query_list if not any(r >= 1 for r in judged.get(q.qid, {}).values())
    )
    first = compute_metrics(first_run, evaluated_qrels, METRIC_NAMES)
    second = compute_metrics(rerank_run, evaluated_qrels, METRIC_NAMES) if reranked else None

    groups: dict[str, dict[str, Any]] = {}
    for name in sorted({f"{key}={value}" for q in query_list for key, value in q.groups.items()}):
        key, value = name.split("=", 1)
        qids = {q.qid for q in query_list if q.groups.get(key) == value}
        sub_qrels = {
            qid: docs
            for qid, docs in evaluated_qrels.items()
            if qid in qids and any(r >= 1 for r in docs.values())
        }
        if not sub_qrels:
            continue
        entry: dict[str, Any] = {
            "queries": len(sub_qrels),
            "first_stage": _exact(
                compute_metrics({q: first_run.get(q, []) for q in sub_qrels}, sub_qrels).values
            ),
        }
        if reranked:
            entry["reranked"] = _exact(
                compute_metrics({q: rerank_run.get(q, []) for q in sub_qrels}, sub_qrels).values
            )
        groups[name] = entry

    latency = {
        stage: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}
        for stage, v in timings.items()
    }
    if out is not None:
        try:
            write_run(out / "first_stage.run", first_run, tag="first_stage")
            if reranked:
                write_run(out / "reranked.run", rerank_run, tag=_run_tag(label))
        except OSError as e:
            raise InvalidArgumentError(
                f"cannot write the run files into {out}: {e.strerror or e}; free some space or "
                "give another --run-out folder (the metrics were computed; run eval again)"
            ) from e
    return EvalReport(
        queries=first.n_queries,
        first_stage=first,
        reranked=second,
        groups=groups,
        latency_ms=latency,
        excluded_qids=excluded,
        reranker=label,
        fusion=fusion_label,
        encoder=None if encoder is None else encoder.to_dict(),
        notes=notes,
    )


def _check_match(
    index: Index,
    queries: list[EvalQuery],
    judged: dict[str, dict[str, int]],
    root: Path,
    qrels_path: Path,
) -> None:
    """Refuse qrels and queries that cannot belong to this index, in one clear line."""
    qids = [q.qid for q in queries]
    if len(set(qids)) != len(qids):
        dup = next(q for q in qids if qids.count(q) > 1)
        raise InvalidArgumentError(
            f"query id {dup!r} appears twice in the queries; ids must be unique"
        )
    if not set(qids) & set(judged):
        raise InvalidArgumentError(
            f"none of the {len(qids)} query ids (e.g. {qids[0]!r}) appear in {qrels_path}; "
            "pass the qrels that belong to these queries"
        )
    paths = index.metadata(columns=["path"])["path"].to_pylist()
    known = {os.path.relpath(p, root) for p in paths}
    docs = {doc for rels in judged.values() for doc in rels}
    if docs and not docs & known:
        example = next(iter(sorted(docs)))
        raise InvalidArgumentError(
            f"no doc id of {qrels_path} is an image of index {index.path} (e.g. {example!r} is not "
            f"{root / example}); doc ids must be image paths relative to the qrels file's folder"
        )
    unknown = docs - known
    if unknown:
        logger.warning(
            "%d qrels doc ids are not in the index (e.g. %s); they can never be retrieved",
            len(unknown),
            next(iter(sorted(unknown))),
        )


def _run_tag(label: str) -> str:
    """A TREC run tag (one word) from a reranker label: ``cross-attention (x/)`` -> its name."""
    return label.split(" ", 1)[0] or "reranked"


def _exact(values: dict[str, float]) -> dict[str, float]:
    """Metric values as plain floats, unrounded: ``--json`` is machine-readable, so exact."""
    return {k: float(v) for k, v in values.items()}


def _run_folder(out: Path) -> Path:
    """The ``run_out`` folder, created now: a file in its place, or a folder that cannot be made,
    is refused before any query runs rather than after the whole evaluation."""
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(
            f"run_out {out} is a file; give a folder for the run files (first_stage.run, "
            "reranked.run)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(
            f"cannot create the run_out folder {out}: {e.strerror or e}; give a folder you can "
            "write"
        ) from e
    return out
