#!/usr/bin/env python
"""How fast can a reranker architecture learn binding? A probe on caption negatives alone.

Each step takes 32 training pairs and ranks each pair's true caption against 6 rewrites that are
false of its image (swapped colours, shapes or objects, another relation, one object changed;
see ``crossrank.datasets.caption_perturbations``) on that image, with the listwise loss and no
first-stage residual: the only way to do better than chance (1/7) is to read the patches. Every
variant trains from scratch with the same seed, batches and rewrites; the script prints the mean
loss and accuracy (the true caption ranked first, ties counted as chance) per 100 steps, overall and
on pair and relation captions separately (with the first stage's on the same lists).

Run from the repository root, after preparing the shapes train split and its index as the
"The shipped demo reranker" in docs/training.md does; ``--json FILE`` also writes the curves::

    python research/caption_probe.py --train runs/shapes-train/pairs.parquet \\
        --train-index runs/train.idx --steps 600 gated nogate \\
        --json research/results/caption_probe/caption_probe_gates.json

The results are in ``research/results/caption_probe/``, one ``caption_probe_<what>.json`` per run
(its ``steps`` and variant names inside: e.g. ``caption_probe_relations_only.json`` is
``--steps 1500 nogate-lecun-qsa-embcat-coords-relations``, ``caption_probe_relations_oracle.json``
``--steps 800 nogate-lecun-qsa-embcat-coords-relations-oracle``);
``caption_probe_structural.txt`` is the console output of one run, with its command.

A variant is words joined by ``-``: ``gated`` / ``nogate`` (Flamingo tanh gates at 0, or plain
residuals), ``lecun`` (every linear map at std 1/sqrt(fan_in) instead of 0.02, ``init="lecun"``;
``xavier`` is its older name), ``qsa`` (query self-attention), ``psa`` (patch self-attention),
``lr3e-3`` (peak learning rate; default 1e-3), ``structural`` (only the structural rewrites:
swapped colours, shapes or objects, another relation; single-object captions, which have none, drop
out), ``embcat`` (the reranker also reads the text encoder's layer-0 states, its token plus
position embeddings, so that words its last layer merges, such as "left" and "right", stay apart),
``relations`` (only relation captions, each against its rewrites that keep both objects: another
relation, or the objects swapped around it; every bit of signal is then about the relation, chance
about 1/4), ``coords`` (two fixed channels, the patch's column and row in the grid at unit scale,
appended to every stored patch, so that where a patch is needs no learning), ``oracle`` (the stored
patches replaced by what the scene graph says is in each patch's grid cell: one-hot colour and
shape and an occupancy bit, zeros for an empty cell; perfect, noise-free patch features, to tell a
weak image encoder from a hard learning problem), ``demo`` (start from the shipped demo reranker's
weights instead of from scratch: a reranker that already finds and binds objects; only with its
architecture, ``nogate-lecun`` and no extra inputs). All use 2 layers of width 128, 4 heads and 64
patch positions. Chance is about 1/7 (1/(1 + rewrites) per caption with fewer false rewrites);
``first stage`` rows give the pooled encoder's accuracy on the same lists for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import numpy as np
import torch

from crossrank import Index
from crossrank.datasets import Relation
from crossrank.rerank import CrossAttentionReranker, RerankerConfig, load_reranker
from crossrank.rerank.checkpoint import demo_reranker_dir
from crossrank.training import RerankTrainConfig
from crossrank.training.data import prepare_training_set
from crossrank.training.reranker import make_optimizer, rerank_loss
from crossrank.training.steps import Banks, forward_captions, top1_accuracy

N_REWRITES = 6
BATCH = 32


# -- what the probes share (relation_probe.py and benchmarks/relation_caption_accuracy.py import
# these). The steps themselves are the training package's public ones (Banks, forward_captions,
# top1_accuracy, make_optimizer, cell_patches): each does what ``crossrank train`` does.


def caption_logits(
    model: CrossAttentionReranker, banks: Banks, rows: np.ndarray, image: np.ndarray
) -> torch.Tensor:
    """``(B, 1 + M)`` logits of each image ``(B,)`` against its caption bank rows ``(B, 1 + M)``:
    the reranker's own (no first-stage residual), as ``crossrank train`` scores caption negatives
    (:func:`crossrank.training.steps.forward_captions` on the CPU)."""
    return forward_captions(model, banks, rows, image, torch.device("cpu"), residual=False)


def parse_variant(name: str) -> tuple[dict, float]:
    words = name.split("-")
    fields: dict = {"gated": "nogate" not in words}
    lr = 1e-3
    for word in words:
        if word in ("structural", "embcat", "relations", "coords", "oracle", "demo"):
            continue  # handled by the caller
        if word in ("lecun", "xavier"):  # "xavier": this option's name in the committed results
            fields["init"] = "lecun"
        elif word == "qsa":
            fields["query_self_attention"] = True
        elif word == "psa":
            fields["patch_self_attention"] = True
        elif word.startswith("lr"):
            lr = float(word[2:])
        elif word not in ("gated", "nogate"):
            raise SystemExit(
                f"unknown variant word {word!r} in {name!r}: use gated, nogate, qsa, psa, lecun, "
                "lrX, structural, embcat, relations, coords, oracle, demo"
            )
    return fields, lr


def bank_texts(data) -> list[str]:
    """The text of every caption bank row: the captions, then the rewrites appended after them
    (``TrainingSet`` keeps only the captions' texts; the rewrites are re-derived in bank order)."""
    from crossrank.datasets import parse_query, perturbation_rows

    _, _, extra = perturbation_rows(data.captions, [parse_query(c) for c in data.captions])
    return data.captions + [spec.text for spec in extra]


def relations_only(data):
    """The caption bank cut to each relation caption's rewrites that keep both of its objects
    (another relation, or the objects swapped around it; ``TrainingSet.relation_negatives``, what
    ``crossrank train --relation-share`` draws from), and the training pairs whose caption has
    one."""
    bank = data.relation_negatives
    return bank, np.flatnonzero(bank.n_structural[data.train_caption] > 0)


def _with_coordinates(patches: torch.Tensor) -> torch.Tensor:
    """``(N, P, d)`` -> ``(N, P, d + 2)``: each patch's grid column and row, standardised."""
    n, p, _ = patches.shape
    side = round(p**0.5)
    rows, cols = np.divmod(np.arange(p), side)
    coords = np.stack([cols, rows], axis=-1).astype(np.float32)
    coords = (coords - coords.mean(0)) / coords.std(0)
    return torch.cat([patches, torch.from_numpy(coords).to(patches.dtype).expand(n, p, 2)], dim=-1)


def oracle_patches(scenes, n_patches: int) -> torch.Tensor:
    """``(N, P, colours + shapes + 1)`` float16: for each image of ``scenes`` (a ``SceneArrays``)
    and each patch of its ``side x side`` grid, the object in the grid cell under the patch's
    centre as one-hot colour and shape plus an occupancy bit (all zero for an empty cell)."""
    from crossrank.datasets.config import GRID, Colour, Shape

    side = round(n_patches**0.5)
    cell = ((2 * np.arange(side) + 1) * GRID) // (2 * side)  # grid cell under each patch row/column
    n_colours, n_shapes = len(Colour), len(Shape)
    feats = np.zeros((len(scenes), side, side, n_colours + n_shapes + 1), dtype=np.float32)
    for j in range(scenes.colour.shape[1]):  # object slot
        present = scenes.colour[:, j] >= 0
        for r in range(side):
            for c in range(side):
                hit = np.flatnonzero(
                    present & (scenes.row[:, j] == cell[r]) & (scenes.col[:, j] == cell[c])
                )
                feats[hit, r, c, scenes.colour[hit, j]] = 1.0
                feats[hit, r, c, n_colours + scenes.shape[hit, j]] = 1.0
                feats[hit, r, c, -1] = 1.0
    return torch.from_numpy(feats.reshape(len(scenes), side * side, -1)).half()


def _kind(caption: str) -> str:
    if any(f" {r.value} " in caption for r in Relation):
        return "relation"
    return "pair" if " and " in caption else "single"


def _by_kind(kinds: list, hits: list, fs_hits: list) -> dict[str, float]:
    """Accuracy (and the first stage's) on pair and relation captions separately."""
    k, h, f = np.concatenate(kinds), np.concatenate(hits), np.concatenate(fs_hits)
    out = {}
    for name in ("pair", "relation"):
        if (k == name).any():
            out[name] = round(float(h[k == name].mean()), 4)
            out[f"{name}_first_stage"] = round(float(f[k == name].mean()), 4)
    return out


def probe_args(description: str, steps: int) -> argparse.Namespace:
    """The probes' command line: ``--train``, ``--train-index``, ``--steps``, ``--json`` and the
    variants."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", required=True, help="pairs.parquet of a shapes train split")
    parser.add_argument("--train-index", required=True, help="an index over its images")
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--json", help="also write the curves here")
    parser.add_argument("variants", nargs="+")
    return parser.parse_args()


def probe_data(args: argparse.Namespace, token_embeddings: bool = False):
    """``(index, data, layer0)``: the index, its training set with ``N_REWRITES`` caption negatives
    (seed 0), and with ``token_embeddings`` the caption bank's token features with the text
    encoder's layer-0 states (token plus position embeddings, before any attention) in front,
    ``(rows, L, width + d)`` float16, as ``crossrank train --token-embeddings`` encodes them (else
    None). ``data.tokens`` holds the last layer's features alone either way."""
    index = Index.open(args.train_index, device="cpu")
    config = RerankTrainConfig(caption_negatives=N_REWRITES, seed=0)
    data = prepare_training_set(index, args.train, config, token_embeddings=token_embeddings)
    layer0 = None
    if token_embeddings:  # the layer-0 states come first: cut them off for the plain bank
        width = index.encoder.token_embedding_dim
        layer0 = torch.from_numpy(data.tokens)
        data = replace(data, tokens=np.ascontiguousarray(data.tokens[..., width:]))
    return index, data, layer0


def main() -> int:
    args = probe_args(__doc__, steps=600)
    variants = {name: parse_variant(name) for name in args.variants}
    words = {word for name in variants for word in name.split("-")}

    index, data, layer0 = probe_data(args, token_embeddings="embcat" in words)
    banks = Banks(
        torch.from_numpy(data.tokens),
        torch.from_numpy(data.token_mask),
        torch.from_numpy(data.patches),
    )
    if layer0 is not None:
        with_embeddings = Banks(layer0, banks.token_mask, banks.patches)
    if "relations" in words:
        relations_bank = relations_only(data)  # (bank, pool), for every variant
    kind = np.array([_kind(c) for c in data.captions])  # per caption bank row
    curves: dict[str, list[dict]] = {}
    for name, (fields, lr) in variants.items():
        torch.manual_seed(0)
        use = with_embeddings if "embcat" in name.split("-") else banks
        if "oracle" in name.split("-"):
            use = Banks(
                use.tokens,
                use.token_mask,
                oracle_patches(data.negatives.scenes, use.patches.shape[1]),
            )
        if "coords" in name.split("-"):
            use = Banks(use.tokens, use.token_mask, _with_coordinates(use.patches))
        model = CrossAttentionReranker(
            RerankerConfig(
                text_dim=use.tokens.shape[-1],
                patch_dim=use.patches.shape[-1],
                width=128,
                layers=2,
                heads=4,
                patch_positions=index.patches.shape[0],
                **fields,
            )
        ).train()
        if "demo" in name.split("-"):
            shipped = load_reranker(demo_reranker_dir(), device="cpu")
            if shipped.config != model.config:
                raise SystemExit(
                    f"{name}: `demo` starts from the shipped reranker, so the variant must have "
                    "its architecture: nogate-lecun, without embcat, coords, oracle, qsa or psa"
                )
            model.load_state_dict(
                {key: value.float() for key, value in shipped.state_dict().items()}
            )
        schedule = RerankTrainConfig(lr=lr, steps=args.steps, warmup=50)
        optimizer = make_optimizer(model, schedule)
        rng = np.random.default_rng(0)
        bank, pool = data.negatives, np.arange(data.train_caption.size)
        if "structural" in name.split("-"):
            bank = replace(
                bank, offsets=[o[:k] for o, k in zip(bank.offsets, bank.n_structural, strict=True)]
            )
            pool = pool[bank.n_structural[data.train_caption] > 0]
        if "relations" in name.split("-"):
            bank, pool = relations_bank
        q_vec, i_vec = torch.from_numpy(data.query_vectors), torch.from_numpy(data.image_vectors)
        first_stage_hits, kinds, hits, fs_hits = [], [], [], []
        losses, accuracies, chances, curve = [], [], [], []
        t0 = time.perf_counter()
        for step in range(args.steps):
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr_at(step)
            batch = rng.choice(pool, BATCH, replace=False)
            caption, image = data.train_caption[batch], data.train_image[batch]
            rows, valid = bank.sample(caption, image, N_REWRITES, rng)
            keep = torch.from_numpy(valid)
            chances.append(float((1.0 / valid.sum(1)).mean()))
            cosine = (q_vec[torch.from_numpy(rows)] * i_vec[torch.from_numpy(image)][:, None]).sum(
                -1
            )
            fs = top1_accuracy(cosine.masked_fill(~keep, float("-inf"))).numpy()
            first_stage_hits.append(float(fs.mean()))
            logits = caption_logits(model, use, rows, image)
            loss = rerank_loss(logits, "listwise", keep)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            hit = top1_accuracy(logits.detach().masked_fill(~keep, float("-inf"))).numpy()
            accuracies.append(float(hit.mean()))
            kinds.append(kind[caption])
            hits.append(hit)
            fs_hits.append(fs)
            if (step + 1) % 100 == 0:
                entry = {
                    "step": step + 1,
                    "loss": round(float(np.mean(losses[-100:])), 4),
                    "accuracy": round(float(np.mean(accuracies[-100:])), 4),
                    "first_stage_accuracy": round(float(np.mean(first_stage_hits[-100:])), 4),
                    "chance": round(float(np.mean(chances[-100:])), 4),
                    **_by_kind(kinds[-100:], hits[-100:], fs_hits[-100:]),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                curve.append(entry)
                print(name, entry, flush=True)
        curves[name] = curve
    print("\n| step | " + " | ".join(curves) + " |")
    print("|---|" + "---|" * len(curves))
    for i, entry in enumerate(next(iter(curves.values()))):
        print(
            f"| {entry['step']} | "
            + " | ".join(
                f"{c[i]['accuracy']:.3f} (first stage {c[i]['first_stage_accuracy']:.3f})"
                for c in curves.values()
            )
            + " |"
        )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {"steps": args.steps, "batch": BATCH, "rewrites": N_REWRITES, "curves": curves},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
