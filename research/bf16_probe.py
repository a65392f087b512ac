#!/usr/bin/env python
"""Does the shipped reranker keep its accuracy with bf16 matrix multiplies on the CPU?

Runs ``crossrank eval`` in-process on shapes benchmark seeds (the indexes
``research/rerank_cost_eval.py`` reads: ``RUNS/benchS-negs.idx`` and ``RUNS/benchS/``) twice per
seed: as shipped (float32 on the CPU), and with every ``CrossAttentionReranker.score`` call run
under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (matrix multiplies and linears in bf16,
LayerNorm and softmax as autocast's CPU policy leaves them). Reports the goal figures of each and
the largest score difference on the first query, so that a run in which autocast never reached
the reranker cannot pass for "no change". A probe, not a feature: crossrank has no bf16 CPU
path. ``--time`` instead times one ``score`` call of the shipped reranker both ways at k = 100
and 1,000 (``bench_rerank_flops``'s call: 12 query tokens, fp16 patches), alternated for
``--rounds`` rounds, p50. Run::

    python research/bf16_probe.py --runs runs --seeds 0 7 11 --out FILE.json
    python research/bf16_probe.py --time --out FILE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # research/: rerank_cost_eval
from rerank_cost_eval import summarise

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _report import write_report
from bench_rerank_flops import _rerank_case, time_rounds
from typer.testing import CliRunner

from crossrank.allocator import keep_large_allocations
from crossrank.cli import app
from crossrank.rerank.checkpoint import demo_reranker_dir, load_reranker
from crossrank.rerank.cross_attention import CrossAttentionReranker

_FLOAT32_SCORE = CrossAttentionReranker.score
_first_call: dict[str, float] = {}


def _bf16_score(self: CrossAttentionReranker, *args: Any, **kwargs: Any) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _FLOAT32_SCORE(self, *args, **kwargs)
    if not _first_call:
        reference = _FLOAT32_SCORE(self, *args, **kwargs)
        _first_call["max_abs_diff"] = float((out - reference).abs().max())
        _first_call["score_std"] = float(reference.std())
    return out


def _eval(runs: Path, seed: int) -> dict[str, Any]:
    bench = runs / f"bench{seed}"
    args = [
        "eval", str(runs / f"bench{seed}-negs.idx"),
        "--queries", str(bench / "queries.parquet"),
        "--qrels", str(bench / "qrels.txt"),
        "--reranker", "auto", "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        detail = f"{result.exception!r} {result.output[-2000:]}"
        raise SystemExit(f"crossrank eval failed ({result.exit_code}): {detail}")
    return summarise(json.loads(result.stdout))


def _timings(rounds: int) -> list[dict[str, Any]]:
    """p50 ms of the shipped reranker's ``score`` in float32 and under bf16 autocast."""
    keep_large_allocations()
    model = load_reranker(demo_reranker_dir(), device="cpu")
    calls = {}
    for k in (100, 1000):
        call, _ = _rerank_case(model, k)
        calls[(k, "float32")] = call

        def bf16(call: Any = call) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return call()

        bf16()
        calls[(k, "bf16")] = bf16
    times = time_rounds(calls, rounds)
    return [
        {"k": k, "precision": precision, "p50_ms": 1e3 * statistics.median(seconds)}
        for (k, precision), seconds in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of benchS*")
    parser.add_argument("--seeds", type=int, nargs="+", default=[])
    parser.add_argument("--time", action="store_true", help="time the two ways instead")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.time and not args.seeds:
        parser.error("give --seeds (accuracy) or --time")
    results: dict[str, Any] = {"seeds": {}}
    if args.time:
        results.update(threads=torch.get_num_threads(), timings=_timings(args.rounds))
        for row in results["timings"]:
            print(f"k {row['k']:>5} {row['precision']:>7}: {row['p50_ms']:.2f} ms", flush=True)
    for seed in args.seeds:
        row = {"float32": _eval(args.runs, seed)}
        _first_call.clear()
        CrossAttentionReranker.score = _bf16_score
        try:
            row["bf16"] = _eval(args.runs, seed)
        finally:
            CrossAttentionReranker.score = _FLOAT32_SCORE
        row["first_query"] = dict(_first_call)
        results["seeds"][str(seed)] = row
        for name in ("float32", "bf16"):
            s = row[name]
            print(
                f"seed {seed} {name:>7}: R@1 {s['R@1']:.3f}, {s['removed']:.0%} removed, "
                f"held-out {s['heldout_R@1']:.3f}, goals {'met' if s['goals_met'] else 'MISSED'}",
                flush=True,
            )
        print(f"seed {seed} first query: {row['first_query']}", flush=True)
    write_report(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
