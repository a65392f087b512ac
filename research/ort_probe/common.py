"""Shared helpers for the ORT probe (not part of crossrank)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # _model, SHAPES

#: Where the exported models go (not committed: 1.6-2.6 MB each).
MODELS = Path(os.environ.get("ORT_PROBE_MODELS", "/tmp/crossrank-ort-probe"))

N_TOKENS = 12


def load(shape: str = "demo"):
    from crossrank.rerank.checkpoint import demo_reranker_dir, load_reranker

    if shape == "demo":
        m = load_reranker(demo_reranker_dir(), device="cpu").eval()
        n_patches = 64
    else:
        from bench_rerank_flops import SHAPES, _model

        torch.manual_seed(0)
        m, _ = _model(None, shape)
        m = m.eval()
        n_patches = SHAPES[shape][1]
    return m, n_patches


class ScoreWrapper(nn.Module):
    """forward(tokens (L, d_t) f32, patches (k, P, d_v) f16) -> (k,) f32 logits, as m.score."""

    def __init__(self, m, grad_branch: bool = True, override_patch_stream: bool = True) -> None:
        super().__init__()
        self.m = m
        self.grad_branch = grad_branch
        if not override_patch_stream:
            return
        # Workaround 1: _patch_stream compares storage data pointers (owned = may add the position
        # embedding in place), which fake tensors refuse. Instance-level override, owned=False:
        # x~ = normed + pos out of place (the same values).
        from crossrank.rerank.kv_source import PatchStates

        def _patch_stream(patches, patch_mask, keep, _m=m):
            patches = patches.to(_m.patch_in.weight.dtype)
            if patch_mask is not None:
                patches = patches.masked_fill(~patch_mask[..., None], 0.0)
            normed = _m.patch_norm(patches)
            pos = None if _m.patch_pos is None else _m.patch_pos[: patches.shape[-2]]
            return PatchStates(_m.patch_in, normed, keep, pos=pos, owned=False)

        m._patch_stream = _patch_stream

    def forward(self, tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        return self.m.forward(tokens, mask, patches.float(), None, path=self.m.path)


def inputs(m, k: int, n_patches: int, seed: int | None = None):
    g = torch.Generator().manual_seed(k if seed is None else seed)
    tokens = torch.randn(N_TOKENS, m.config.token_input_dim, generator=g)
    mask = torch.ones(N_TOKENS, dtype=torch.bool)
    patches = torch.randn(k, n_patches, m.config.patch_dim, generator=g).half()
    return tokens, mask, patches


def session(path: str | Path, threads: int = 2, spin: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_onnx(wrapper: nn.Module, args: tuple, path: Path, dynamo: bool) -> None:
    """``wrapper(tokens, patches)`` to ONNX at ``path`` with k (``patches`` dim 0) dynamic."""
    if dynamo:
        k = torch.export.Dim("k", min=2, max=100000)
        how = {"dynamic_shapes": {"tokens": None, "patches": {0: k}}, "external_data": False}
    else:
        how = {"dynamic_axes": {"patches": {0: "k"}, "logits": {0: "k"}}, "opset_version": 17}
    torch.onnx.export(
        wrapper,
        args,
        str(path),
        dynamo=dynamo,
        input_names=["tokens", "patches"],
        output_names=["logits"],
        **how,
    )


def parity(sess, model, n_patches: int, ks=(37, 100, 1000)) -> dict[int, float]:
    """max |ORT - eager score| at each k (k = 37 is the export example; the others prove a
    dynamic k)."""
    errs = {}
    for k in ks:
        tk, mk, pt = inputs(model, k, n_patches, seed=100 + k)
        ref = model.score(tk, mk, pt)
        got = sess.run(None, {"tokens": tk.numpy(), "patches": pt.numpy()})[0]
        errs[k] = float((torch.from_numpy(got) - ref).abs().max())
    return errs
