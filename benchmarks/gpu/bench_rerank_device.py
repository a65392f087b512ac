#!/usr/bin/env python
"""Rerank latency per query on one device, as the search path calls it (``reranker.score``).

For MaxSim and the default cross-attention reranker, at k = 100 and k = 1000 candidates, one query
at a time: the candidates' fp16 patches arrive from host memory (as ``PatchStore.gather`` returns
them, so the host-to-device copy is timed) or are already resident on the device (the ceiling a
GPU-resident patch cache would reach). Also the demo-size CLIP encoder's images/s in fp16 on the
device. Medians over rounds, with the card's name. Run::

    python benchmarks/gpu/bench_rerank_device.py --device cuda --json
    python benchmarks/gpu/bench_rerank_device.py --device cpu --quick
    python benchmarks/gpu/bench_rerank_device.py --device cuda \\
        --out benchmarks/results/bench_rerank_device/bench_rerank_cuda_h200.json
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _report
from _report import add_out_option, write_report

from crossrank.encoders.factory import new_clip
from crossrank.rerank import CrossAttentionReranker, MaxSimReranker, RerankerConfig
from crossrank.training.encoder import DEMO_SPEC

SHAPES = {"demo": {"dim": 128, "n_patches": 64}, "clip-b32": {"dim": 512, "n_patches": 49}}
N_TOKENS = 12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, rounds: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_rerank(device: torch.device, ks: list[int], rounds: int) -> list[dict[str, Any]]:
    rows = []
    for shape, dims in SHAPES.items():
        d, p = dims["dim"], dims["n_patches"]
        g = torch.Generator().manual_seed(0)
        tokens = torch.randn(N_TOKENS, d, generator=g)
        mask = torch.ones(N_TOKENS, dtype=torch.bool)
        rerankers = {
            "maxsim": MaxSimReranker(device=str(device)),
            "cross-attention": CrossAttentionReranker(RerankerConfig(text_dim=d, patch_dim=d))
            .to(device)
            .eval(),
        }
        for k in ks:
            host = torch.from_numpy(
                np.random.default_rng(k).standard_normal((k, p, d)).astype(np.float16)
            )
            resident = host.to(device)
            for name, reranker in rerankers.items():
                row = {
                    "shape": shape,
                    "k": k,
                    "reranker": name,
                    "host_ms": round(
                        _median_ms(
                            lambda r=reranker, t=tokens, m=mask, x=host: r.score(t, m, x),
                            device,
                            rounds,
                        ),
                        3,
                    ),
                }
                if device.type == "cuda":
                    row["resident_ms"] = round(
                        _median_ms(
                            lambda r=reranker, t=tokens, m=mask, x=resident: r.score(t, m, x),
                            device,
                            rounds,
                        ),
                        3,
                    )
                rows.append(row)
    return rows


def bench_encoder(device: torch.device, batch: int, rounds: int) -> dict[str, Any]:
    model = new_clip(DEMO_SPEC, vocab_size=DEMO_SPEC.vocab_size).to(device)  # the demo model's size
    if device.type == "cuda":
        model = model.half()
    side = DEMO_SPEC.image_size
    pixels = torch.randn(batch, 3, side, side, device=device, dtype=next(model.parameters()).dtype)

    @torch.inference_mode()
    def encode() -> None:
        model.vision_model(pixel_values=pixels)

    ms = _median_ms(encode, device, rounds)
    return {
        "batch": batch,
        "ms_per_batch": round(ms, 3),
        "images_per_s": round(batch / ms * 1e3, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer rounds, k = 100 only")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    add_out_option(parser, "bench_rerank_device")
    args = parser.parse_args()
    device = torch.device(args.device)
    rounds = 5 if args.quick else 30
    ks = [100] if args.quick else [100, 1000]
    card = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    out = {
        "device": str(device),
        "card": card,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rerank": bench_rerank(device, ks, rounds),
        "encoder": bench_encoder(device, 256 if device.type == "cuda" else 64, rounds),
    }
    write_report(args.out, out)
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return
    print(f"{out['card']} ({out['device']}, torch {out['torch']})")
    print(f"{'shape':9} {'k':>5} {'reranker':16} {'host ms':>9} {'resident ms':>12}")
    for r in out["rerank"]:
        print(
            f"{r['shape']:9} {r['k']:>5} {r['reranker']:16} {r['host_ms']:>9.3f} "
            f"{r.get('resident_ms', float('nan')):>12.3f}"
        )
    e = out["encoder"]
    print(f"demo CLIP image encoder: {e['images_per_s']:,.0f} images/s (batch {e['batch']})")


if __name__ == "__main__":
    main()
