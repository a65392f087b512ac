"""Export variant 'opt': the same model with two ONNX-friendly rewrites (process-local
monkeypatches, no crossrank file touched), then the same parity check as export.py.

- FoldedKV.attend: the post-attention value map einsum('...nhe,hde->...nhd') becomes a batched
  matmul over heads (ORT's Einsum kernel took 25 of 99 ms at k=1000);
- (--variant opt2) the folded logits as one (k*P, d_v) x (d_v, n*heads) GEMM, softmax over
  P on the transposed result, instead of bmm against an Expand'ed (k, n*heads, d_v) query copy;
- PairHead.forward (inference, all pairs real as score() trims padding): sum gelu(first_i +
  second_j) over pairs first, then the linear `out` (eager's _summed arithmetic, without its
  Python chunk loop), instead of the training branch's out() on every pair.

python export_opt.py [--shape demo|clip-b16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import MODELS, ScoreWrapper, export_onnx, inputs, load, parity, session

import crossrank.rerank.cross_attention as ca
from crossrank.rerank.folding import FoldedKV, folded_weights
from crossrank.rerank.layers import gate

VARIANT = "opt"


class MatmulFoldedKV(FoldedKV):
    def attend(self, layer, q, channels=()):
        attn = layer.cross_attn
        w_k, w_v, b_out = folded_weights(attn, self.patch_in, self.cache, layer.index)
        heads, head_dim, d_v = w_k.shape
        n = q.shape[-2]
        prepared = self.patches.prepared
        n_batch, k, n_patches = prepared.shape[:3]
        rows = n * heads
        q_fold = torch.einsum("...hnd,hde->...nhe", q, w_k * attn.scale)
        q_fold = q_fold.reshape(*q.shape[:-3], rows, d_v)
        flat = prepared.reshape(n_batch * k, n_patches, d_v)
        assert q_fold.shape[0] == 1 and q_fold.shape[1] == 1
        assert self.patches.keep is None and layer.top_m is None
        if VARIANT == "opt2":
            # one (N*P, d_v) x (d_v, rows) GEMM instead of an Expand'ed query tensor and a bmm
            logits_t = torch.matmul(flat, q_fold[0, 0].transpose(0, 1))  # (N, P, rows)
            weights = torch.softmax(logits_t, dim=1).transpose(1, 2)  # (N, rows, P)
        else:
            queries = q_fold[0, 0].expand(n_batch * k, rows, d_v)
            logits = torch.bmm(queries, flat.transpose(1, 2))
            weights = torch.softmax(logits, dim=-1)
        out = torch.bmm(weights, flat)  # (N, rows, d_v)
        averages = None
        if channels:
            parts = []
            for c in channels:
                assert c.ndim == 2
                part = weights.reshape(-1, n_patches) @ c.to(weights.dtype)
                parts.append(part.reshape(n_batch * k, rows, -1))
            averages = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
            averages = averages.reshape(n_batch, k, n, heads, -1)
        # (N, n, h, e) -> (N, h, n, e) @ (h, e, d) -> (N, h, n, d) -> (N, n, h*d)
        out = out.reshape(n_batch * k, n, heads, d_v).transpose(1, 2)
        out = torch.matmul(out, w_v.transpose(1, 2))  # (N, h, n, head_dim)
        out = out.transpose(1, 2).reshape(n_batch, k, n, heads * head_dim)
        return attn.drop(F.linear(out, attn.o.weight, b_out)), averages


def pair_forward(self, x, looked, keep):
    where = looked.flatten(-2).float()
    y = self.norm(x)
    moved = self.where(where)
    first, second = self.u(y) + moved, self.v(y) - moved  # (B, k, n, h)
    n = first.shape[-2]
    pairs = F.gelu(first.unsqueeze(-2) + second.unsqueeze(-3))  # (B, k, n, n, h)
    sums = pairs.sum(dim=(2, 3))  # (B, k, h): all pairs real (score() trims padding)
    total = sums @ self.out.weight[0] + (n * n) * self.out.bias[0]
    return gate(self.gate, total / (n * n))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="demo")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    p.add_argument(
        "--variant",
        choices=("opt", "opt2", "opt3"),
        default="opt",
        help="opt3: crossrank's own current FoldedKV and _patch_stream (the no-grad "
        "late-LayerNorm path of the working tree), only the pair head replaced",
    )
    a = p.parse_args()
    global VARIANT
    VARIANT = a.variant
    torch.set_num_threads(2)
    m, n_patches = load(a.shape)
    ref_m, _ = load(a.shape)  # unpatched reference
    for prm in m.parameters():
        prm.requires_grad_(False)
    if a.variant != "opt3":
        ca.FoldedKV = MatmulFoldedKV  # process-local
    if m.pair is not None:
        m.pair.forward = pair_forward.__get__(m.pair)
    w = ScoreWrapper(m, override_patch_stream=a.variant != "opt3").eval()
    tokens, _, patches = inputs(m, 37, n_patches, seed=1)
    MODELS.mkdir(parents=True, exist_ok=True)
    path = MODELS / f"{a.shape}_{a.exporter}_{a.variant}.onnx"
    t0 = time.perf_counter()
    with torch.no_grad():
        export_onnx(w, (tokens, patches), path, a.exporter == "dynamo")
    t_export = time.perf_counter() - t0
    t0 = time.perf_counter()
    sess = session(path)
    t_sess = time.perf_counter() - t0
    errs = parity(sess, ref_m, n_patches)
    res = {
        "path": str(path),
        "bytes": path.stat().st_size,
        "export_s": round(t_export, 2),
        "session_s": round(t_sess, 2),
        "max_abs_err": errs,
    }
    print(json.dumps(res))
    Path(str(path) + ".json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
