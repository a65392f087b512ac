#!/usr/bin/env python
"""blip-itm: rerank latency per query at k candidates, cached vision tokens vs BLIP's full forward.

- ``cached``: what ``Index.search`` runs. The k candidates' vision tokens (``(k, 1 + P, hidden)``,
  gathered from the patch store, here already in memory as float32) go through the text encoder's
  cross-attention and ``itm_head`` in one batch: :meth:`BlipItmReranker.score`.
- ``full``: ``BlipForImageTextRetrieval(input_ids, pixel_values, use_itm_head=True)`` on the k
  preprocessed images, re-running the vision transformer for every candidate of every query.

Models are random (the latency does not depend on the weights): ``tiny`` is the test model (32 px,
patch 8, width 32, 2 + 2 layers); ``base`` has BLIP-base's widths (ViT-B/16 at 384 px: 577 vision
tokens of 768; BERT-base text of 768, vocabulary 30524) but ``--base-layers`` layers in each tower
instead of 12, so that a CPU run finishes in minutes. Both paths' costs grow linearly with depth
(text layers for ``cached``; text + vision layers for ``full``) and BLIP-base has 12 of each, so
the ratio at equal depth is the ratio of the full-depth model up to the embedding and head costs.

Queries have 12 tokens. One query at a time, under ``inference_mode``, float32 on the CPU, paths
interleaved per round; medians over rounds. Run::

    python benchmarks/bench_blip_itm.py               # k = 100, tiny and base (1 + 1 layers)
    python benchmarks/bench_blip_itm.py --out  # also writes results/bench_blip_itm/
    python benchmarks/bench_blip_itm.py --threads 4 --base-layers 2 --rounds 5 --json
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

from crossrank.rerank import BlipItmReranker

N_TOKENS = 12


def _config(name: str, layers: int) -> Any:
    from transformers import BlipConfig

    if name == "tiny":
        text = dict(
            vocab_size=128,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=2,
            sep_token_id=3,
            eos_token_id=3,
        )
        vision = dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            initializer_range=0.02,
        )
        return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)
    text = dict(
        vocab_size=30524,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
    )
    vision = dict(
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=384,
        patch_size=16,
        initializer_range=0.02,
    )
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=256)


def _measure(name: str, k: int, layers: int, rounds: int) -> dict[str, Any]:
    from transformers import BlipForImageTextRetrieval

    torch.manual_seed(0)
    config = _config(name, layers)
    model = BlipForImageTextRetrieval(config).eval()
    reranker = BlipItmReranker(model, "cpu", model_id=name)
    size = config.vision_config.image_size
    pixels = torch.randn(k, 3, size, size)
    ids = torch.randint(5, config.text_config.vocab_size, (N_TOKENS,))
    mask = torch.ones(N_TOKENS, dtype=torch.bool)
    with torch.inference_mode():
        patches = model.vision_model(
            pixel_values=pixels
        ).last_hidden_state  # (k, 1 + P, hidden), "the store"
        patches = patches.half().float()  # the store keeps fp16
    tokens = torch.zeros(N_TOKENS, config.text_config.hidden_size)

    def cached() -> torch.Tensor:
        return reranker.score(tokens, mask, patches, input_ids=ids)

    def full() -> torch.Tensor:
        with torch.inference_mode():
            logits = model(
                input_ids=ids[None].expand(k, -1),
                pixel_values=pixels,
                attention_mask=mask.long()[None].expand(k, -1),
                use_itm_head=True,
            ).itm_score
            return logits.softmax(-1)[:, 1]

    calls = {"cached": cached, "full": full}
    # Same numbers from both paths (fp16 rounding of the stored tokens aside).
    agree = float((calls["cached"]() - calls["full"]()).abs().max())
    times: dict[str, list[float]] = {path: [] for path in calls}
    for r in range(rounds):
        order = list(calls) if r % 2 == 0 else list(reversed(calls))
        for path in order:
            t0 = time.perf_counter()
            calls[path]()
            times[path].append((time.perf_counter() - t0) * 1e3)
    ratios = [f / c for f, c in zip(times["full"], times["cached"], strict=True)]
    return {
        "model": name,
        "k": k,
        "layers": "2 + 2" if name == "tiny" else f"{layers} + {layers}",
        "vision_tokens": int(patches.shape[1]),
        "hidden": int(patches.shape[2]),
        "cached_ms": round(statistics.median(times["cached"]), 2),
        "full_ms": round(statistics.median(times["full"]), 2),
        "full_over_cached": round(statistics.median(ratios), 2),
        "max_abs_diff": agree,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds for the tiny model")
    parser.add_argument(
        "--base-rounds", type=int, default=3, help="timed rounds for the base-width model"
    )
    parser.add_argument(
        "--base-layers",
        type=int,
        default=1,
        help="layers per tower of the base-width model (BLIP-base: 12)",
    )
    parser.add_argument("--skip-base", action="store_true")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    add_out_option(parser, "bench_blip_itm")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = [_measure("tiny", args.k, 2, args.rounds)]
    if not args.skip_base:
        rows.append(_measure("base", args.k, args.base_layers, args.base_rounds))
    env = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    write_report(args.out, {"env": env, "results": rows})
    if args.json:
        print(json.dumps({"env": env, "results": rows}, indent=2))
        return 0
    print(f"blip-itm rerank latency per query, k={args.k}, CPU float32, {args.threads} thread(s)")
    print(
        f"{'model':6} {'layers':>7} {'tokens':>6} {'cached ms':>10} {'full ms':>10} "
        f"{'full/cached':>12} "
        f"{'max|diff|':>10}"
    )
    for r in rows:
        print(
            f"{r['model']:6} {r['layers']:>7} {r['vision_tokens']:>6} {r['cached_ms']:>10.1f} "
            f"{r['full_ms']:>10.1f} "
            f"{r['full_over_cached']:>11.2f}x {r['max_abs_diff']:>10.1e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
