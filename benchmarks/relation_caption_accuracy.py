#!/usr/bin/env python
"""How well trained rerankers read relations alone: ``caption_probe.py``'s ``relations`` task, scored.

Each relation caption of the shapes train split is ranked, on one of its images, against its
rewrites that keep both objects (another relation, or the objects swapped around it;
``TrainingSet.relation_negatives``), by the reranker's own logits (no first stage). A blind scorer
gets about 0.23 (printed as chance). 30 batches of 64 training pairs, drawn with a fixed seed, so
every reranker is scored on the same lists. Run::

    python benchmarks/relation_caption_accuracy.py --train runs/shapes-train/pairs.parquet \\
        --train-index runs/train-negs.idx crossrank/assets/demo-reranker runs/rr-te1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caption_probe import _bank_texts, _relations_only, _with_token_embeddings

from crossrank import Index
from crossrank.rerank import load_reranker
from crossrank.training import RerankTrainConfig
from crossrank.training.data import prepare_training_set
from crossrank.training.reranker import _Banks, _forward_captions, _top1_accuracy

BATCHES, BATCH, REWRITES = 30, 64, 6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True, help="pairs.parquet of a shapes train split")
    parser.add_argument("--train-index", required=True, help="an index over its images")
    parser.add_argument("rerankers", nargs="+", help="reranker folders")
    args = parser.parse_args()
    torch.set_num_threads(1)
    index = Index.open(args.train_index, device="cpu")
    data = prepare_training_set(
        index, args.train, RerankTrainConfig(caption_negatives=REWRITES, seed=0)
    )
    bank, pool = _relations_only(data)
    plain = _Banks(
        torch.from_numpy(data.tokens),
        torch.from_numpy(data.token_mask),
        torch.from_numpy(data.patches),
    )
    layer0 = None
    for path in args.rerankers:
        model = load_reranker(path, device="cpu").eval()
        if model.config.token_embeddings and layer0 is None:
            layer0 = _Banks(
                _with_token_embeddings(index, data, _bank_texts(data)),
                plain.token_mask,
                plain.patches,
            )
        use = layer0 if model.config.token_embeddings else plain
        rng = np.random.default_rng(1)
        hits, chance = [], []
        with torch.no_grad():
            for _ in range(BATCHES):
                batch = rng.choice(pool, BATCH, replace=False)
                caption, image = data.train_caption[batch], data.train_image[batch]
                rows, valid = bank.sample(caption, image, REWRITES, rng)
                keep = torch.from_numpy(valid)
                logits = _forward_captions(model, use, rows, image, torch.device("cpu"))
                hits.append(float(_top1_accuracy(logits.masked_fill(~keep, float("-inf"))).mean()))
                chance.append(float((1.0 / valid.sum(1)).mean()))
        print(
            f"{path}: relation-only caption accuracy {np.mean(hits):.3f} (chance {np.mean(chance):.3f})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
