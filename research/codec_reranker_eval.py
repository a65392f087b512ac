#!/usr/bin/env python
"""Reranked quality of each patch codec with each reranker: the shipped one, and fine-tunes.

For each seed a 2,000-image shapes corpus (300 queries) is generated in ``--work`` and built once
per codec with the demo encoder (skipped when already there), then evaluated at rerank_k 100 with
every reranker named (``NAME=FOLDER``, or ``shipped=auto``: the index's default, the shipped
reranker). Seeds 17 and 23 are where codecs and fine-tunes were compared; seed 31 was made
afterwards to confirm on data no choice saw.

    python research/codec_reranker_eval.py --work /tmp/codec-eval --seeds 17 23 31 \
        --codecs fp16 pq pq:32 opq opq:32 --reranker shipped=auto ft-pq=runs/rr-pq-ft \
        --out research/results/patch_codecs/codec_reranker_eval.json

A fine-tune on decoded patches is made with ``crossrank train --init-from`` over an index of the
training split built with that codec (docs/training.md), e.g.::

    crossrank build runs/shapes-train/images --index runs/train-pq.idx --patch-codec pq
    crossrank train runs/shapes-train/pairs.parquet --index runs/train-pq.idx --out runs/rr-pq-ft \
        --config crossrank/assets/demo-reranker --init-from crossrank/assets/demo-reranker \
        --steps 1500 --caption-only-steps 0 --lr 2e-4 --seed 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _report
from _report import write_report

from crossrank import Index
from crossrank.datasets.shapes import generate_shapes
from crossrank.evaluate.harness import evaluate_index
from crossrank.write.build import build_index


def _index(work: Path, seed: int, codec: str) -> Path:
    root = work / f"shapes-{seed}"
    if not (root / "dataset.json").is_file():
        generate_shapes(root, n_images=2000, n_queries=300, seed=seed)
    folder = work / f"shapes-{seed}-{codec.replace(':', '_')}.idx"
    if not (folder / "manifest.json").is_file():
        build_index(root / "images", folder, device="cpu", batch_size=64, patch_codec=codec)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="datasets and indexes go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[17, 23, 31])
    parser.add_argument("--codecs", nargs="+", default=["fp16", "pq", "pq:32", "opq", "opq:32"])
    parser.add_argument(
        "--reranker", nargs="+", default=["shipped=auto"], help="NAME=FOLDER (or NAME=auto)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)
    rerankers = dict(item.split("=", 1) for item in args.reranker)
    rows = []
    for seed in args.seeds:
        data = args.work / f"shapes-{seed}"
        for codec in args.codecs:
            with Index.open(_index(args.work, seed, codec), device="cpu") as index:
                for name, spec in rerankers.items():
                    ev = evaluate_index(
                        index,
                        data / "queries.parquet",
                        data / "qrels.txt",
                        rerank_k=100,
                        reranker=spec,
                    )
                    assert ev.reranked is not None, f"{spec} did not rerank"
                    rows.append(
                        {
                            "seed": seed,
                            "codec": codec,
                            "reranker": name,
                            "R@1": ev.reranked.values["R@1"],
                            "nDCG@10": ev.reranked.values["nDCG@10"],
                            "first_stage_R@1": ev.first_stage.values["R@1"],
                        }
                    )
                    print(
                        f"seed {seed} {codec:<7} {name:<10} R@1 {rows[-1]['R@1']:.4f} "
                        f"nDCG@10 {rows[-1]['nDCG@10']:.4f}",
                        file=sys.stderr,
                    )
    base = {(r["seed"], r["reranker"]): r for r in rows if r["codec"] == "fp16"}
    shipped = {r["seed"]: r for r in rows if r["codec"] == "fp16" and r["reranker"] == "shipped"}
    for r in rows:
        ref = shipped.get(r["seed"]) or base.get((r["seed"], r["reranker"]))
        if ref is not None:  # against fp16 with the shipped reranker: what a user has today
            r["delta_R@1_vs_fp16_shipped"] = r["R@1"] - ref["R@1"]
    report = {"seeds": args.seeds, "rerankers": rerankers, "rerank_k": 100, "rows": rows}
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
