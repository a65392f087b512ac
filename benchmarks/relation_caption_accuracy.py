#!/usr/bin/env python
"""How well trained rerankers read relations alone: ``caption_probe.py``'s ``relations`` task.

Each relation caption of the shapes train split is ranked, on one of its images, against its
rewrites that keep both objects (another relation, or the objects swapped around it;
``TrainingSet.relation_negatives``), by the reranker's own logits (no first stage). A blind scorer
gets about 0.23 (printed as chance). 30 batches of 64 training pairs, drawn with a fixed seed, so
every reranker is scored on the same lists. The task and its helpers are
``research/caption_probe.py``'s. Run from the repository root::

    python benchmarks/relation_caption_accuracy.py --train runs/shapes-train/pairs.parquet \\
        --train-index runs/train-negs.idx crossrank/assets/demo-reranker runs/rr-te1
    python benchmarks/relation_caption_accuracy.py ... --json   # one JSON object instead
    python benchmarks/relation_caption_accuracy.py ... --out    # also writes
                                   # benchmarks/results/relation_caption_accuracy/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/: _report
sys.path.insert(0, str(HERE.parent / "research"))  # research/: caption_probe
from _report import add_out_option, write_report
from caption_probe import (
    N_REWRITES,
    caption_logits,
    probe_data,
    relations_only,
)

from crossrank.rerank import load_reranker
from crossrank.training.steps import Banks, top1_accuracy

BATCHES, BATCH, REWRITES = 30, 64, N_REWRITES  # probe_data's training set has N_REWRITES


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True, help="pairs.parquet of a shapes train split")
    parser.add_argument("--train-index", required=True, help="an index over its images")
    parser.add_argument("rerankers", nargs="+", help="reranker folders")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the lines")
    add_out_option(parser, "relation_caption_accuracy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {path: load_reranker(path, device="cpu").eval() for path in args.rerankers}
    need_layer0 = any(model.config.token_embeddings for model in models.values())
    _, data, layer0 = probe_data(args, token_embeddings=need_layer0)  # seed 0
    bank, pool = relations_only(data)
    plain = Banks(
        torch.from_numpy(data.tokens),
        torch.from_numpy(data.token_mask),
        torch.from_numpy(data.patches),
    )
    with_layer0 = None if layer0 is None else Banks(layer0, plain.token_mask, plain.patches)
    rows = []
    for path, model in models.items():
        use = with_layer0 if model.config.token_embeddings else plain
        rng = np.random.default_rng(1)
        hits, chance = [], []
        with torch.no_grad():
            for _ in range(BATCHES):
                batch = rng.choice(pool, BATCH, replace=False)
                caption, image = data.train_caption[batch], data.train_image[batch]
                lists, valid = bank.sample(caption, image, REWRITES, rng)
                keep = torch.from_numpy(valid)
                logits = caption_logits(model, use, lists, image)
                hits.append(float(top1_accuracy(logits.masked_fill(~keep, float("-inf"))).mean()))
                chance.append(float((1.0 / valid.sum(1)).mean()))
        row = {"reranker": path, "accuracy": float(np.mean(hits)), "chance": float(np.mean(chance))}
        rows.append(row)
        if not args.json:
            print(
                f"{path}: relation-only caption accuracy {row['accuracy']:.3f} "
                f"(chance {row['chance']:.3f})",
                flush=True,
            )
    report = {
        "train": args.train,
        "train_index": args.train_index,
        "batches": BATCHES,
        "batch": BATCH,
        "rewrites": REWRITES,
        "torch": torch.__version__,
        "rows": rows,
    }
    write_report(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
