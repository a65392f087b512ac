#!/usr/bin/env python
"""How much a rerank call's latency depends on what ran before it.

``benchmarks/bench_rerank_flops.py`` times each rerank call between large matrix multiplies (its
matmul floor, measured in the same rounds), so its p50 is that of a call whose weights and inputs
were evicted from the caches; ``crossrank demo`` times the rerank stage inside a search loop. This
probe times the shipped demo reranker's ``score`` at one k (2 threads, allocator tuned as the CLI
does) after each of: nothing (back to back), a 2048 x 2048 fp32 matmul, a pass over 64 MB, a
20 ms sleep (the OpenMP workers park), a 256 x 256 matmul. Run::

    python research/rerank_warmth.py [--k 100] [--rounds 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from crossrank.allocator import keep_large_allocations
from crossrank.rerank.checkpoint import demo_reranker_dir, load_reranker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tuned = keep_large_allocations()
    torch.set_num_threads(args.threads)
    model = load_reranker(demo_reranker_dir(), device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(12, model.config.token_input_dim, generator=g)
    mask = torch.ones(12, dtype=torch.bool)
    patches = torch.randn(args.k, 64, model.config.patch_dim, generator=g).half()
    a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
    big, small = torch.randn(16 << 20, generator=g), torch.randn(256, 256, generator=g)
    before = {
        "nothing": lambda: None,
        "mm2048": lambda: torch.mm(a, b),
        "touch_64mb": lambda: big.mul_(1.0),
        "sleep_20ms": lambda: time.sleep(0.02),
        "mm256": lambda: torch.mm(small, small),
    }
    with torch.inference_mode():
        for _ in range(5):
            model.score(tokens, mask, patches)
        p50 = {}
        for name, fn in before.items():
            times = []
            for _ in range(args.rounds):
                fn()
                start = time.perf_counter()
                model.score(tokens, mask, patches)
                times.append(time.perf_counter() - start)
            p50[name] = round(1e3 * statistics.median(times), 3)
    report = {"k": args.k, "threads": args.threads, "allocator_tuned": tuned, "p50_ms": p50}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, ms in p50.items():
            print(f"after {name:12s} {ms:7.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
