#!/usr/bin/env python
"""Cross-attention reranker: per-query latency of the three ways to get the patches' keys/values.

- ``plain``: project the k candidates' stored patches to keys/values in every query (reference);
- ``folded``: W_k folded into the query side, W_v applied after the attention; attention runs over
  the layer-normalised stored patches, nothing is projected per query;
- ``precomputed``: keys/values computed once per image (index time, not timed here), the query
  reads them.

Each input is already on hand as the search path has it (the k candidates' patches gathered; the
cache rows of the same candidates for ``precomputed``), so only the reranker's forward is timed:
``model(tokens, token_mask, patches | cache, patch_mask, path=...)`` under ``inference_mode``,
one query at a time, float32 on the CPU. The machine may be busy, so the paths are interleaved
within each round (order rotated every round) and every number is a median; the ratios are medians
of per-round ratios to ``plain``.

Shapes: ``demo`` is the demo encoder (d = 128, 64 patches of 8 px on 64 px images), ``clip-b32``
is CLIP ViT-B/32 (d = 512, 49 patches); queries have 12 tokens (``score()`` drops padding tokens
before the forward, so none are timed). The reranker is
the default :class:`~crossrank.rerank.RerankerConfig` (width 128, 2 layers, 4 heads). Run::

    python benchmarks/bench_rerank_paths.py                  # k = 100 and 1000, both shapes
    python benchmarks/bench_rerank_paths.py --threads 1      # one intra-op thread
    python benchmarks/bench_rerank_paths.py --bidirectional  # a config folding only layer 1
    python benchmarks/bench_rerank_paths.py --quick --json
    python benchmarks/bench_rerank_paths.py --out  # also writes results/bench_rerank_paths/
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
from _report import add_out_option, write_report

from crossrank.rerank import CrossAttentionReranker, RerankerConfig

SHAPES = {"demo": {"dim": 128, "n_patches": 64}, "clip-b32": {"dim": 512, "n_patches": 49}}
PATHS = ("plain", "folded", "precomputed")
N_TOKENS = 12


def _inputs(dim: int, n_patches: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randn(N_TOKENS, dim, generator=g),
        "token_mask": torch.ones(N_TOKENS, dtype=torch.bool),
        # The store keeps fp16; the reranker computes in float32 on the CPU.
        "patches": torch.randn(k, n_patches, dim, generator=g).half().float(),
    }


def _measure(
    model: CrossAttentionReranker, x: dict[str, torch.Tensor], rounds: int
) -> dict[str, Any]:
    cache = model.precompute_kv(x["patches"])
    calls = {
        "plain": lambda: model(x["tokens"], x["token_mask"], x["patches"], path="plain"),
        "folded": lambda: model(x["tokens"], x["token_mask"], x["patches"], path="folded"),
        "precomputed": lambda: model(x["tokens"], x["token_mask"], cache),
    }
    reference = calls["plain"]()
    for name, call in calls.items():  # warm-up, and the three must agree
        torch.testing.assert_close(call(), reference, atol=1e-4, rtol=1e-4, msg=f"{name} != plain")
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for r in range(rounds):
        order = PATHS[r % 3 :] + PATHS[: r % 3]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    out: dict[str, Any] = {f"{n}_ms": 1e3 * statistics.median(t) for n, t in times.items()}
    for name in ("folded", "precomputed"):
        out[f"{name}_vs_plain"] = statistics.median(
            a / b for a, b in zip(times[name], times["plain"], strict=True)
        )
    n_patches, cfg = x["patches"].shape[1], model.config
    out["cache_floats_per_image"] = sum(
        t[0].numel() + v[0].numel() for t, v in zip(cache.keys, cache.values, strict=True)
    )
    out["patch_floats_per_image"] = n_patches * x["patches"].shape[2]
    out["layers_cached"], out["layers_folded"] = len(cache.keys), cfg.foldable_layers
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds (default 30, 7 at k >= 1000)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--bidirectional", action="store_true", help="bench a bidirectional reranker"
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds: a smoke test, not a measurement"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    add_out_option(parser, "bench_rerank_paths")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    rows = []
    with torch.inference_mode():
        for shape in args.shapes:
            dim, n_patches = SHAPES[shape]["dim"], SHAPES[shape]["n_patches"]
            config = RerankerConfig(text_dim=dim, patch_dim=dim, bidirectional=args.bidirectional)
            model = CrossAttentionReranker(config).eval()
            for k in args.ks:
                rounds = 3 if args.quick else args.rounds or (7 if k >= 1000 else 30)
                result = _measure(model, _inputs(dim, n_patches, k), rounds)
                rows.append(
                    {
                        "shape": shape,
                        "dim": dim,
                        "n_patches": n_patches,
                        "k": k,
                        "rounds": rounds,
                        **result,
                    }
                )

    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "bidirectional": args.bidirectional,
    }
    write_report(args.out, {"meta": meta, "rows": rows})
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(
        f"# torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}, "
        f"bidirectional={args.bidirectional}"
    )
    print(
        f"{'shape':9} {'k':>5} {'plain ms':>9} {'folded ms':>10} {'precomp ms':>11} "
        f"{'folded/plain':>13} {'precomp/plain':>14} {'cache/patch storage':>20}"
    )
    for r in rows:
        print(
            f"{r['shape']:9} {r['k']:>5} {r['plain_ms']:>9.2f} {r['folded_ms']:>10.2f} "
            f"{r['precomputed_ms']:>11.2f} "
            f"{r['folded_vs_plain']:>13.2f} {r['precomputed_vs_plain']:>14.2f} "
            f"{r['cache_floats_per_image'] / r['patch_floats_per_image']:>19.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
