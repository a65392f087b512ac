#!/usr/bin/env python
"""The reranker accuracy goals on shapes benchmark seeds, from ``crossrank eval --json``.

For each reranker and seed it runs ``crossrank eval runs/benchS-negs.idx --queries
runs/benchS/queries.parquet --qrels runs/benchS/qrels.txt --reranker R --json`` and reports R@1
(first stage and reranked), R@1 by group, and the share of the first stage's R@1 misses on pair
and relation queries that the reranker removes. The goals: reranked R@1 >= 0.95, >= 80% of those
misses removed, held-out compositions R@1 >= 0.80. ``--precision`` is passed to ``crossrank
eval`` (the label each report names, ``reranker_label``, says what ran). Run::

    python research/rerank_cost_eval.py --runs runs --seeds 0 7 11 \\
        --reranker shipped=auto --reranker pair32=runs/rr-pair32-export --out FILE.json
    python research/rerank_cost_eval.py --runs runs --seeds 17 --reranker shipped=auto \\
        --precision bfloat16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _report
from _report import write_report

GOALS = {"R@1": 0.95, "removed": 0.80, "heldout_R@1": 0.80}


def _misses(group: dict[str, Any], stage: str) -> int:
    return round(group["queries"] * (1.0 - group[stage]["R@1"]))


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The goal figures of one ``crossrank eval --json`` report."""
    groups = report["groups"]
    first = sum(_misses(groups[g], "first_stage") for g in ("kind=pair", "kind=relation"))
    after = sum(_misses(groups[g], "reranked") for g in ("kind=pair", "kind=relation"))
    out = {
        "first_stage_R@1": report["first_stage"]["R@1"],
        "R@1": report["reranked"]["R@1"],
        "nDCG@10": report["reranked"]["nDCG@10"],
        "groups_R@1": {g: v["reranked"]["R@1"] for g, v in groups.items()},
        "pair_relation_misses": {"first_stage": first, "reranked": after},
        "removed": (first - after) / first if first else 1.0,
        "heldout_R@1": groups["heldout=true"]["reranked"]["R@1"],
        "rerank_latency_ms": report.get("latency_ms", {}).get("rerank"),
    }
    out["goals_met"] = all(out[key] >= goal for key, goal in GOALS.items())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of benchS*")
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument(
        "--reranker", action="append", required=True, metavar="NAME=SPEC", help="--reranker value"
    )
    parser.add_argument(
        "--precision", default="auto", help="crossrank eval --precision (auto, float32, bfloat16)"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"goals": GOALS, "precision": args.precision, "runs": {}}
    for item in args.reranker:
        name, _, spec = item.partition("=")
        for seed in args.seeds:
            bench = args.runs / f"bench{seed}"
            cmd = [
                "crossrank", "eval", str(args.runs / f"bench{seed}-negs.idx"),
                "--queries", str(bench / "queries.parquet"),
                "--qrels", str(bench / "qrels.txt"),
                "--reranker", spec, "--precision", args.precision, "--json",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                return proc.returncode
            report = json.loads(proc.stdout)
            summary = summarise(report)
            summary["reranker_label"] = report.get("reranker")
            results["runs"].setdefault(name, {"reranker": spec})[f"seed {seed}"] = summary
            print(
                f"{name} seed {seed}: R@1 {summary['first_stage_R@1']:.3f} -> {summary['R@1']:.3f}"
                f", misses {summary['pair_relation_misses']['first_stage']} -> "
                f"{summary['pair_relation_misses']['reranked']} ({summary['removed']:.0%} removed)"
                f", held-out {summary['heldout_R@1']:.3f}, goals "
                f"{'met' if summary['goals_met'] else 'MISSED'}",
                flush=True,
            )
    write_report(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
