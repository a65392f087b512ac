#!/usr/bin/env python
"""Does an encoder's text side still tell "left of" from "right of"? A probe of its token features.

A reranker reads the query's token features from the frozen text encoder. If the encoder maps
"a red circle left of a blue square" and "a red circle right of a blue square" to the same
features, no reranker can tell them apart, however long it trains. For caption pairs that differ
only in the relation word (left/right, above/below; every colour-shape pair of the shapes world),
this prints the mean cosine similarity, after a LayerNorm (as the reranker's pre-norm sees them):

- at the relation word and at the last token, for the token embeddings (layer 0) and after each
  text transformer layer;
- of the features the reranker reads (``encode_text(...).tokens``) and of the pooled vectors.

1.0 means the words are indistinguishable. Run from the repository root (the shipped demo
encoder, then a fine-tune; ``--json`` prints one JSON object instead of the table)::

    python research/relation_words.py
    python research/relation_words.py --model runs/enc-neg
    python research/relation_words.py --json > research/results/relation_words/demo_encoder.json

No result of it is committed: it runs in seconds, and research/README.md quotes its table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F

from crossrank.datasets import Colour, Shape
from crossrank.encoders import ClipEncoder, load_encoder

PAIRS = (("left of", "right of"), ("above", "below"))


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = F.layer_norm(a, a.shape[-1:]), F.layer_norm(b, b.shape[-1:])
    return F.cosine_similarity(a, b, dim=-1)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="a model directory or hub id (default: the demo encoder)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    encoder = load_encoder(args.model, device="cpu")
    if not isinstance(encoder, ClipEncoder):
        raise SystemExit("this probe reads a CLIP text transformer's layers; pass a CLIP model")
    objects = [f"a {c.value} {s.value}" for c in Colour for s in Shape]
    report: dict[str, dict[str, float]] = {}
    for one, other in PAIRS:
        pairs = [
            (f"{a} {one} {b}", f"{a} {other} {b}") for a, b in itertools.permutations(objects, 2)
        ]
        left = [p[0] for p in pairs]
        right = [p[1] for p in pairs]
        batch = encoder.tokenizer(left + right, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
        n = len(pairs)
        # The relation word's position: the first token where the two captions differ.
        word = (ids[:n] != ids[n:]).int().argmax(dim=1)  # (n,)
        last = mask[:n].sum(dim=1) - 1  # (n,) the end-of-text token
        rows = torch.arange(n)
        with torch.no_grad():
            hidden = encoder.model.text_model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True
            ).hidden_states
        entry: dict[str, float] = {}
        for layer, h in enumerate(hidden):  # (2n, L, width)
            sim = _cos(h[:n], h[n:])  # (n, L)
            entry[f"layer{layer}_word"] = round(float(sim[rows, word].mean()), 4)
            entry[f"layer{layer}_last"] = round(float(sim[rows, last].mean()), 4)
        feats = encoder.encode_text(left + right)
        tokens = torch.from_numpy(np.asarray(feats.tokens, dtype=np.float32))
        sim = _cos(tokens[:n], tokens[n:])
        entry["reranker_tokens_word"] = round(float(sim[rows, word].mean()), 4)
        pooled = F.normalize(torch.from_numpy(np.asarray(feats.pooled, dtype=np.float32)), dim=-1)
        entry["pooled"] = round(float((pooled[:n] * pooled[n:]).sum(-1).mean()), 4)
        report[f"{one} / {other}"] = entry
    if args.json:
        print(json.dumps({"model": encoder.model_id, "cosine": report}, indent=1))
        return 0
    print(
        f"model {encoder.model_id}: mean cosine (after LayerNorm) between captions that differ "
        "only in the relation word; 1.0 = indistinguishable"
    )
    keys = list(next(iter(report.values())))
    print("| feature | " + " | ".join(report) + " |")
    print("|---|" + "---|" * len(report))
    for key in keys:
        print(f"| {key} | " + " | ".join(f"{report[p][key]:.4f}" for p in report) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
