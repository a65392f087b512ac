"""Evaluation: retrieval metrics (equal to ranx's) and TREC qrels / run files.

:func:`evaluate_index` runs an index over a query set and reports the first stage against the
first stage + reranker, overall, per query group and with per-stage latency.
"""

from crossrank.evaluate.harness import EvalQuery, EvalReport, evaluate_index, read_queries
from crossrank.evaluate.metrics import (
    METRIC_NAMES,
    MetricKind,
    MetricsReport,
    compute_metrics,
    ranx_name,
)
from crossrank.evaluate.trec import read_qrels, read_run, write_qrels, write_run

__all__ = [
    "EvalQuery",
    "EvalReport",
    "evaluate_index",
    "read_queries",
    "METRIC_NAMES",
    "MetricKind",
    "MetricsReport",
    "compute_metrics",
    "ranx_name",
    "read_qrels",
    "read_run",
    "write_qrels",
    "write_run",
]
