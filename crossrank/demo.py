"""``crossrank demo``: the whole pipeline on a generated benchmark, offline, in about a minute.

It generates the shapes test corpus (``crossrank dataset shapes``), indexes it with the shipped demo
encoder (``crossrank build``), shows a few queries ranked by the first stage and after reranking,
and evaluates both on every query (``crossrank eval``). Everything lands in one folder.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossrank.errors import InvalidArgumentError

__all__ = ["DemoReport", "run_demo"]

logger = logging.getLogger(__name__)

#: What the demo folder holds; anything else in it is left alone.
BENCHMARK_DIR, INDEX_DIR, RUNS_DIR = "benchmark", "index", "runs"


@dataclass(frozen=True)
class DemoReport:
    """What :func:`run_demo` did and measured.

    Attributes:
        out_dir: the demo folder.
        examples: per example query, its text, kind and the top hits of each stage with relevance.
        evaluation: the eval report (the ``crossrank eval --json`` dict).
        seconds: stage -> wall seconds (``dataset``, ``build``, ``eval``, ``total``).
    """

    out_dir: Path
    examples: list[dict[str, Any]]
    evaluation: dict[str, Any]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out_dir),
            "examples": self.examples,
            "eval": self.evaluation,
            "seconds": {k: round(v, 2) for k, v in self.seconds.items()},
        }


def _check_demo_args(n_queries: int, reranker: str) -> None:
    """What the evaluation at the end would refuse, refused first."""
    from crossrank.api.index import AUTO_RERANKER
    from crossrank.rerank.base import RerankerName

    if isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 1:
        raise InvalidArgumentError(
            f"the demo evaluates queries: n_queries must be at least 1, got {n_queries!r}"
        )
    names = {AUTO_RERANKER, *(m.value for m in RerankerName)}
    if reranker.strip().lower() not in names and not Path(reranker).expanduser().is_dir():
        raise InvalidArgumentError(
            f"reranker must be one of {', '.join(sorted(names))} or the folder of a trained "
            f"reranker, got {reranker!r} (no such folder)"
        )


def run_demo(
    out_dir: str | Path = "crossrank-demo",
    *,
    n_images: int = 2000,
    n_queries: int = 300,
    seed: int = 0,
    model: str | Path | None = None,
    reranker: str = "auto",
    device: str = "auto",
    n_examples: int = 3,
    progress: Callable[[str], None] | None = None,
    stage_progress: Callable[[str, int, int], None] | None = None,
) -> DemoReport:
    """Generate a benchmark, index it, show example queries and evaluate first stage vs reranked.

    Rerunning reuses the benchmark when its settings are the same and rebuilds the index.

    Args:
        out_dir: the folder to write into (``benchmark/``, ``index/``, ``runs/``).
        n_images: corpus size.
        n_queries: evaluation queries.
        seed: benchmark seed.
        model: encoder; ``None`` is the shipped demo model.
        reranker: the reranker to compare with the first stage; ``auto`` is the shipped demo
            reranker for the demo encoder, and none (the first stage alone) for a model without
            a trained reranker (see :attr:`Index.default_reranker`).
        device: ``auto``, ``cpu`` or ``cuda``.
        n_examples: example queries to show (one per query kind, in turn).
        progress: called with a short message as each stage starts.
        stage_progress: called as ``stage_progress(stage, done, total)`` as each stage advances
            (``dataset``: images rendered, ``build``: images indexed, ``eval``: queries
            evaluated), for progress bars.

    Returns:
        A :class:`DemoReport`.
    """
    import pyarrow.parquet as pq

    from crossrank.api.index import Index
    from crossrank.datasets import generate_shapes, open_shapes
    from crossrank.evaluate import evaluate_index, read_qrels
    from crossrank.write.build import build_index

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(
            f"demo output {out} exists and is not a folder; pass another --out"
        )
    _check_demo_args(n_queries, reranker)  # before minutes of generating and indexing
    say = progress or (lambda message: None)
    step = stage_progress or (lambda stage, done, total: None)
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()

    bench = out / BENCHMARK_DIR
    t0 = time.perf_counter()
    if _same_benchmark(bench, n_images=n_images, n_queries=n_queries, seed=seed):
        say(f"reusing the benchmark in {bench}")
        ds = open_shapes(bench)
    else:
        say(f"generating {n_images} images and {n_queries} queries (seed {seed})")
        ds = generate_shapes(
            bench,
            n_images=n_images,
            n_queries=n_queries,
            seed=seed,
            split="test",
            overwrite=True,
            progress=lambda done, total: step("dataset", done, total),
        )
    seconds["dataset"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"indexing the images with {'the demo encoder' if model is None else model}")
    build_index(
        ds.images_dir,
        out / INDEX_DIR,
        model=model,
        device=device,
        overwrite=True,
        progress=lambda done, total: step("build", done, total),
    )
    seconds["build"] = time.perf_counter() - t0
    index = Index.open(out / INDEX_DIR, device=device)

    t0 = time.perf_counter()
    say(f"evaluating {n_queries} queries: the first stage and reranker {reranker}")
    report = evaluate_index(
        index,
        ds.queries_path,
        ds.qrels_path,
        reranker=reranker,
        run_out=out / RUNS_DIR,
        progress=lambda done, total: step("eval", done, total),
    )
    seconds["eval"] = time.perf_counter() - t0

    qrels = read_qrels(ds.qrels_path)
    queries = pq.read_table(ds.queries_path, columns=["query_id", "text", "kind"]).to_pylist()
    # Show queries with a few relevant images: one-answer queries make poor illustrations.
    n_rel = {qid: sum(r >= 1 for r in docs.values()) for qid, docs in qrels.items()}
    queries = [q for q in queries if 3 <= n_rel.get(q["query_id"], 0) <= 40] or queries
    examples = [
        _example(index, q, qrels.get(q["query_id"], {}), ds.root, reranker)
        for q in _pick_examples(queries, n_examples)
    ]
    seconds["total"] = time.perf_counter() - t_start
    return DemoReport(out_dir=out, examples=examples, evaluation=report.to_dict(), seconds=seconds)


def _same_benchmark(root: Path, **settings: int) -> bool:
    """Whether ``root`` already holds a test benchmark made with these settings."""
    info = root / "dataset.json"
    if not info.is_file():
        return False
    try:
        config = json.loads(info.read_text())["config"]
    except (ValueError, KeyError):
        return False
    return config.get("split") == "test" and all(config.get(k) == v for k, v in settings.items())


def _pick_examples(queries: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The first query of each kind, relation and pair first (where binding matters), in turn."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for q in queries:
        by_kind.setdefault(q["kind"], []).append(q)
    order = [k for k in ("relation", "pair", "single") if k in by_kind]
    picked: list[dict[str, Any]] = []
    i = 0
    while len(picked) < n and any(i < len(by_kind[k]) for k in order):
        picked.extend(by_kind[k][i] for k in order if i < len(by_kind[k]) and len(picked) < n)
        i += 1
    return picked


def _example(
    index: Any,
    query: dict[str, Any],
    relevant: dict[str, int],
    root: Path,
    reranker: str,
    top: int = 5,
) -> dict[str, Any]:
    import os

    result = index.search(query["text"], k=100, rerank_k=100, reranker=reranker)
    hits = list(result)
    first = sorted(hits, key=lambda h: (-h.first_stage_score, h.id))[:top]

    def rows(ranked: list[Any], key: Callable[[Any], float]) -> list[dict[str, Any]]:
        out = []
        for hit in ranked:
            doc = os.path.relpath(hit.path, root)
            out.append(
                {
                    "path": doc,
                    "score": round(float(key(hit)), 4),
                    "relevant": relevant.get(doc, 0) >= 1,
                }
            )
        return out

    return {
        "query": query["text"],
        "kind": query["kind"],
        "relevant_in_corpus": sum(r >= 1 for r in relevant.values()),
        "first_stage": rows(first, lambda h: h.first_stage_score),
        "reranked": rows(hits[:top], lambda h: h.score),
    }
