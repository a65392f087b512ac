#!/usr/bin/env python
"""What makes "left of" learnable? A relation-only probe with a small standalone reranker.

The task is ``caption_probe.py``'s ``relations``: each relation caption of the shapes train split
ranked, on its image, against its rewrites that keep both objects and are false of the image
(another relation, or the objects swapped around it), listwise loss, no first stage. A blind
scorer gets about 0.23. Every factor of the answer (which object a word names, where that object
is, how the relation word reads the two positions) is useless alone: no single input, and no pair
of inputs, correlates with the label. This probe measures what it takes to learn it anyway.

A variant is words joined by ``-``:

- ``mlp``: no attention; an MLP over the caption's structured spec (one-hot colours, shapes and
  relation of both objects) concatenated with the scene graph's 3 x 3 grid (one-hot colour and
  shape per cell). ``mlp-loc`` gives it the two named objects' grid row and column instead of the
  grid: the objects already found, only the comparison left to learn.
- otherwise a 2-layer cross-attention reranker of width 128 (text tokens attend to the patches,
  a position embedding per patch, mean pooling), with options: ``oracle`` (scene-graph patches
  instead of the encoder's, ``caption_probe.py``'s), ``embcat`` (the text encoder's layer-0 states
  beside its last layer's, so that "left" and "right" stay apart), ``qsa`` (query self-attention),
  ``pair`` (a pairwise spatial head: every pair of tokens (i, j) is scored from their states and
  the difference of their last-layer attention-weighted patch coordinates, mean-pooled and added
  to the logit), ``mix`` (half of each batch is every caption kind against all its rewrites,
  colour and shape swaps included: signal for finding objects), ``sup`` (attention supervision
  from the scene graph: on the true captions of relation groups, the last layer's attention of
  each object's shape word, averaged over heads, is pulled onto the patches of that object's grid
  cell, weight 0.5).

The probe reads the index's encoder and patches; the standalone reranker is not
``CrossAttentionReranker`` (whose attention kernels do not return their weights). Run from the
repository root, after preparing the shapes train split and its index as "The shipped demo
reranker" in docs/training.md does::

    python research/relation_probe.py --train runs/shapes-train/pairs.parquet \\
        --train-index runs/train-negs.idx --steps 3000 embcat-qsa-pair-mix-sup qsa-pair-mix-sup \\
        --json runs/relation_probe.json

It prints, per 250 steps, the loss, the accuracy on the relation groups (the true caption ranked
first, ties counted as chance), the first stage's on the same lists, chance, and the attention
mass on the supervised cells; ``--json FILE`` also writes the curves (after every variant, so an
interrupted run keeps the finished ones). The results are in
``research/results/relation_probe/relation_probe.json``: the curves of three such runs merged
(``--steps 2500 mlp mlp-loc oracle-embcat-qsa-pair-mix-sup``, the last stopped at step 2250;
``--steps 3000 embcat-qsa-pair-mix-sup qsa-pair-mix-sup``; ``--steps 2000
oracle-embcat-qsa-pair-mix oracle-embcat-qsa-mix-sup``), as its ``description`` says.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # research/: caption_probe
from caption_probe import (
    bank_texts,
    oracle_patches,
    probe_args,
    probe_data,
    relations_only,
)

from crossrank.datasets.config import GRID, Colour, Shape
from crossrank.training import RerankTrainConfig
from crossrank.training.attention_targets import cell_patches, object_token_positions
from crossrank.training.reranker import make_optimizer, rerank_loss
from crossrank.training.steps import top1_accuracy

BATCH, N_NEG, EVERY, SUP_WEIGHT = 32, 4, 250, 0.5
WORDS = {"mlp", "loc", "oracle", "embcat", "qsa", "pair", "mix", "sup"}


class _Attention(nn.Module):
    """Multi-head attention that also returns its weights ``(N, heads, n, S)``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x, source, keep=None):
        n_rows, n, width = x.shape
        split = lambda t: t.view(n_rows, -1, self.heads, width // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(source)), split(self.v(source))
        logits = q @ k.transpose(-1, -2) / math.sqrt(width // self.heads)  # (N, heads, n, S)
        if keep is not None:
            logits = logits.masked_fill(~keep[:, None, None, :], float("-inf"))
        weights = logits.softmax(-1)
        return self.o((weights @ v).transpose(1, 2).reshape(n_rows, n, width)), weights


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, qsa: bool) -> None:
        super().__init__()
        self.self_norm, self.self_attn = (
            (nn.LayerNorm(width), _Attention(width, heads)) if qsa else (None, None)
        )
        self.cross_norm, self.cross_attn = nn.LayerNorm(width), _Attention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )


class ProbeReranker(nn.Module):
    """Text tokens cross-attend to patches (2 layers); optional query self-attention and pair
    head."""

    def __init__(
        self,
        text_dim: int,
        patch_dim: int,
        n_patches: int,
        *,
        qsa: bool,
        pair: bool,
        width: int = 128,
        heads: int = 4,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.text_norm, self.text_in = nn.LayerNorm(text_dim), nn.Linear(text_dim, width)
        self.patch_norm, self.patch_in = nn.LayerNorm(patch_dim), nn.Linear(patch_dim, width)
        self.patch_pos = nn.Parameter(torch.randn(n_patches, patch_dim) * 0.02)
        self.layers = nn.ModuleList(_Layer(width, heads, qsa) for _ in range(layers))
        self.out_norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
        side = round(n_patches**0.5)
        rows, cols = np.divmod(np.arange(n_patches), side)
        coords = np.stack([cols, rows], -1).astype(np.float32)
        self.register_buffer("coords", torch.from_numpy((coords - coords.mean(0)) / coords.std(0)))
        self.pair = pair
        if pair:
            self.pair_norm = nn.LayerNorm(width)
            self.pair_u, self.pair_v = nn.Linear(width, width), nn.Linear(width, width)
            self.pair_r = nn.Linear(2 * heads, width)
            self.pair_out = nn.Sequential(nn.GELU(), nn.Linear(width, 1))

    def forward(self, tokens, token_mask, patches):
        """``(N, L, d_t)``, ``(N, L)`` bool, ``(N, P, d_v)`` -> logits ``(N,)`` and the last
        layer's cross-attention weights ``(N, heads, L, P)``."""
        x = self.text_in(self.text_norm(tokens.masked_fill(~token_mask[..., None], 0.0)))
        p = self.patch_in(self.patch_norm(patches) + self.patch_pos)
        for layer in self.layers:
            if layer.self_attn is not None:
                h = layer.self_norm(x)
                x = x + layer.self_attn(h, h, token_mask)[0]
            out, weights = layer.cross_attn(layer.cross_norm(x), p)
            x = x + out
            x = x + layer.mlp(layer.mlp_norm(x))
        keep = token_mask[..., None].float()
        score = self.head(self.out_norm((x * keep).sum(1) / keep.sum(1))).squeeze(-1)
        if self.pair:
            where = (weights @ self.coords).transpose(1, 2).flatten(2)  # (N, L, heads * 2)
            y = self.pair_norm(x)
            z = (
                self.pair_u(y)[:, :, None]
                + self.pair_v(y)[:, None, :]
                + self.pair_r(where[:, :, None] - where[:, None, :])
            )  # (N, L, L, width)
            both = (token_mask[:, :, None] & token_mask[:, None, :]).float()
            score = score + (self.pair_out(z).squeeze(-1) * both).sum((1, 2)) / both.sum((1, 2))
        return score, weights


def _one_hot(values: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((len(values), size), dtype=np.float32)
    out[np.arange(len(values)), np.maximum(values, 0)] = values >= 0
    return out


def _spec_features(specs) -> torch.Tensor:
    """A bank's ``SpecArrays`` as one-hot colour, shape (both objects) and relation."""
    n_c, n_s = len(Colour), len(Shape)
    parts = [
        _one_hot(specs.a_colour, n_c),
        _one_hot(specs.a_shape, n_s),
        _one_hot(specs.b_colour, n_c),
        _one_hot(specs.b_shape, n_s),
        _one_hot(specs.relation, 4),
    ]
    return torch.from_numpy(np.concatenate(parts, 1))


def _grid_features(scenes) -> torch.Tensor:
    """``(images, GRID * GRID * (colours + shapes))``: the scene graph's cells, one-hot."""
    n_c = len(Colour)
    grid = np.zeros((len(scenes), GRID, GRID, n_c + len(Shape)), dtype=np.float32)
    for j in range(scenes.colour.shape[1]):
        has = np.flatnonzero(scenes.colour[:, j] >= 0)
        grid[has, scenes.row[has, j], scenes.col[has, j], scenes.colour[has, j]] = 1.0
        grid[has, scenes.row[has, j], scenes.col[has, j], n_c + scenes.shape[has, j]] = 1.0
    return torch.from_numpy(grid.reshape(len(scenes), -1))


def _find(scenes, image: int, colour: int, shape: int) -> int | None:
    """The slot of the first object of ``image`` with this colour and shape, or None."""
    hit = np.flatnonzero((scenes.colour[image] == colour) & (scenes.shape[image] == shape))
    return int(hit[0]) if hit.size else None


def _located(specs, scenes, rows: np.ndarray, images: np.ndarray) -> torch.Tensor:
    """``(n, 4)``: grid row and column of the objects each row's spec names (-9 if absent)."""
    out = np.full((rows.size, 4), -9.0, dtype=np.float32)
    for t, (r, image) in enumerate(zip(rows.tolist(), images.tolist(), strict=True)):
        for k, (colour, shape) in enumerate(
            ((specs.a_colour[r], specs.a_shape[r]), (specs.b_colour[r], specs.b_shape[r]))
        ):
            slot = _find(scenes, image, colour, shape)
            if slot is not None:
                out[t, 2 * k : 2 * k + 2] = scenes.row[image, slot], scenes.col[image, slot]
    return torch.from_numpy(out)


def _targets(scenes, specs, shape_tok, rows, images, length, cells):
    """Attention targets for the supervised rows: ``(n, L, P)`` float and ``(n, L)`` bool."""
    target = np.zeros((rows.size, length, cells.shape[-1]), dtype=np.float32)
    use = np.zeros((rows.size, length), dtype=bool)
    for t, (r, image) in enumerate(zip(rows.tolist(), images.tolist(), strict=True)):
        for k, (colour, shape) in enumerate(
            ((specs.a_colour[r], specs.a_shape[r]), (specs.b_colour[r], specs.b_shape[r]))
        ):
            slot, tok = _find(scenes, image, colour, shape), shape_tok[r, k]
            if slot is None or tok < 0 or tok >= length:
                continue
            target[t, tok] = cells[scenes.row[image, slot], scenes.col[image, slot]]
            use[t, tok] = True
    return torch.from_numpy(target), torch.from_numpy(use)


def run_variant(name: str, data, index, steps: int, texts: list[str], extras: dict) -> list[dict]:
    words = set(name.split("-"))
    unknown = words - WORDS
    if unknown:
        raise SystemExit(
            f"unknown variant word(s) {sorted(unknown)} in {name!r}: use {sorted(WORDS)}"
        )
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    bank = data.negatives
    rel_bank, rel_pool = extras["relations"]
    all_pool = np.arange(data.train_caption.size)
    specs, scenes = bank.specs, bank.scenes
    q_vec, i_vec = torch.from_numpy(data.query_vectors), torch.from_numpy(data.image_vectors)
    if "mlp" in words:
        text = _spec_features(specs)
        n_in = text.shape[1] + (4 if "loc" in words else extras["grid"].shape[1])
        model = nn.Sequential(
            nn.Linear(n_in, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1)
        )
    else:
        tokens = extras["embcat"] if "embcat" in words else torch.from_numpy(data.tokens)
        patches = extras["oracle"] if "oracle" in words else torch.from_numpy(data.patches)
        token_mask = torch.from_numpy(data.token_mask)
        model = ProbeReranker(
            tokens.shape[-1],
            patches.shape[-1],
            patches.shape[1],
            qsa="qsa" in words,
            pair="pair" in words,
        )
    schedule = RerankTrainConfig(lr=1e-3, steps=steps, warmup=50)
    optimizer = make_optimizer(model, schedule)
    n_rel = BATCH // 2 if "mix" in words else BATCH
    history: dict[str, list] = {k: [] for k in ("loss", "hit", "fs", "chance", "mass")}
    curve, t0 = [], time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        pick = rng.choice(rel_pool, n_rel, replace=False)
        caption, image = data.train_caption[pick], data.train_image[pick]
        rows, valid = rel_bank.sample(caption, image, N_NEG, rng)
        if n_rel < BATCH:
            other = rng.choice(all_pool, BATCH - n_rel, replace=False)
            o_rows, o_valid = bank.sample(
                data.train_caption[other], data.train_image[other], N_NEG, rng
            )
            rows, valid = np.concatenate([rows, o_rows]), np.concatenate([valid, o_valid])
            image = np.concatenate([image, data.train_image[other]])
        keep = torch.from_numpy(valid)
        flat_rows, flat_images = rows.reshape(-1), np.repeat(image, 1 + N_NEG)
        if "mlp" in words:
            side = (
                _located(specs, scenes, flat_rows, flat_images)
                if "loc" in words
                else extras["grid"][torch.from_numpy(flat_images)]
            )
            logits = model(torch.cat([text[torch.from_numpy(flat_rows)], side], 1)).view(BATCH, -1)
            loss = rerank_loss(logits, "listwise", keep)
        else:
            r = torch.from_numpy(flat_rows)
            logits, weights = model(
                tokens[r].float(), token_mask[r], patches[torch.from_numpy(flat_images)].float()
            )
            logits = logits.view(BATCH, -1)
            loss = rerank_loss(logits, "listwise", keep)
            positive = weights.view(BATCH, 1 + N_NEG, *weights.shape[1:])[:n_rel, 0].mean(
                1
            )  # (n_rel, L, P)
            target, use = _targets(
                scenes,
                specs,
                extras["shape_tokens"],
                rows[:n_rel, 0],
                image[:n_rel],
                tokens.shape[1],
                extras["cells"],
            )
            if use.any():
                mass = (positive * target).sum(-1)  # (n_rel, L)
                history["mass"].append(float(mass.detach()[use].mean()))
                if "sup" in words:
                    loss = loss + SUP_WEIGHT * -(mass.clamp_min(1e-6).log() * use).sum() / use.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        masked = logits.detach().masked_fill(~keep, float("-inf"))[:n_rel]
        cosine = (
            q_vec[torch.from_numpy(rows[:n_rel])] * i_vec[torch.from_numpy(image[:n_rel])][:, None]
        ).sum(-1)
        history["loss"].append(loss.item())
        history["hit"].append(top1_accuracy(masked).numpy())
        history["fs"].append(
            top1_accuracy(cosine.masked_fill(~keep[:n_rel], float("-inf"))).numpy()
        )
        history["chance"].append(1.0 / valid[:n_rel].sum(1))
        if (step + 1) % EVERY == 0:
            tail = {k: v[-EVERY:] for k, v in history.items()}
            entry = {
                "step": step + 1,
                "loss": round(float(np.mean(tail["loss"])), 4),
                "relation_accuracy": round(float(np.concatenate(tail["hit"]).mean()), 4),
                "first_stage_accuracy": round(float(np.concatenate(tail["fs"]).mean()), 4),
                "chance": round(float(np.concatenate(tail["chance"]).mean()), 4),
                "attention_mass_on_object": (
                    round(float(np.mean(tail["mass"])), 4) if tail["mass"] else None
                ),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            curve.append(entry)
            print(name, json.dumps(entry), flush=True)
    return curve


def main() -> int:
    args = probe_args(__doc__, steps=3000)
    words = {w for name in args.variants for w in name.split("-")}
    index, data, layer0 = probe_data(args, token_embeddings="embcat" in words)
    texts = bank_texts(data)
    if len(texts) != data.tokens.shape[0]:
        raise SystemExit(
            f"caption bank mismatch: {len(texts)} texts for {data.tokens.shape[0]} rows"
        )
    extras = {
        "relations": relations_only(data),
        "grid": _grid_features(data.negatives.scenes),
        "cells": cell_patches(data.patches.shape[1]),
        "shape_tokens": object_token_positions(
            index.encoder.tokenizer, texts, index.encoder.max_text_len
        ),
    }
    if layer0 is not None:
        extras["embcat"] = layer0
    if "oracle" in words:
        extras["oracle"] = oracle_patches(data.negatives.scenes, data.patches.shape[1])
    curves: dict[str, list[dict]] = {}
    for name in args.variants:
        curves[name] = run_variant(name, data, index, args.steps, texts, extras)
        if args.json:  # after every variant: an interrupted run keeps the finished ones
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(
                    {"steps": args.steps, "batch": BATCH, "negatives": N_NEG, "curves": curves},
                    f,
                    indent=1,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
