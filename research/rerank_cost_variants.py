#!/usr/bin/env python
"""Time architecture variants of the shipped reranker (random weights) in the same rounds.

Each variant is the shipped ``config.json`` with some fields replaced (``heads``, ``mlp_ratio``,
``pair_width``, ...); the call timed is ``bench_rerank_flops``'s: ``reranker.score`` on one query
of 12 tokens and k fp16 candidates at the demo's shapes. Speed does not depend on the weights, so
this says what a variant would cost before anyone trains it. Run::

    python research/rerank_cost_variants.py --variant heads=2,mlp_ratio=2 \\
        --variant heads=1,mlp_ratio=2
    python research/rerank_cost_variants.py --variant heads=2 --ks 100 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # bench_rerank_flops: the timed call
from bench_rerank_flops import _rerank_case, time_rounds

from crossrank.allocator import keep_large_allocations
from crossrank.rerank import CrossAttentionReranker, read_reranker_config
from crossrank.rerank.checkpoint import demo_reranker_dir


def _parse(text: str, shipped: Any) -> dict[str, Any]:
    """``heads=2,mlp_ratio=2`` -> ``{"heads": 2, "mlp_ratio": 2.0}`` (types from ``shipped``)."""
    fields = {f.name for f in dataclasses.fields(shipped)}
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in fields:
            raise SystemExit(f"unknown config field {name!r}; one of {', '.join(sorted(fields))}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare word: pooling=first, init=bert
        current = getattr(shipped, name)
        out[name] = parsed if current is None else type(current)(parsed)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE,...")
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    keep_large_allocations()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shipped = read_reranker_config(demo_reranker_dir())
    variants = {"shipped": {}} | {v: _parse(v, shipped) for v in args.variant}
    cases = {}
    with torch.inference_mode():
        for name, fields in variants.items():
            model = CrossAttentionReranker(dataclasses.replace(shipped, **fields)).eval()
            for k in args.ks:
                cases[(name, k)] = _rerank_case(model, k)
        times = time_rounds({key: call for key, (call, _) in cases.items()}, args.rounds)
        keys = list(cases)
    rows = []
    for name, k in keys:
        p50 = statistics.median(times[(name, k)])
        base = statistics.median(times[("shipped", k)])
        rows.append(
            {
                "variant": name,
                "k": k,
                "p50_ms": 1e3 * p50,
                "vs_shipped": p50 / base,
                "gflop_per_query": cases[(name, k)][1] / 1e9,
            }
        )
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": args.rounds}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(f"# torch {meta['torch']}, {meta['threads']} threads, {args.rounds} rounds")
    print(f"{'variant':<32} {'k':>5} {'p50 ms':>8} {'vs shipped':>11} {'GFLOP':>7}")
    for r in rows:
        print(
            f"{r['variant']:<32} {r['k']:>5} {r['p50_ms']:>8.2f} {r['vs_shipped']:>11.2f} "
            f"{r['gflop_per_query']:>7.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
