"""Export the reranker's score forward to ONNX: dynamo first, then the TorchScript exporter.

python export.py [--shape demo|clip-b16] [--grad on|off] [--exporter dynamo|legacy|both]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch
from common import MODELS, ScoreWrapper, export_onnx, inputs, load, parity, session

OUT = MODELS


def export(wrapper, args, path, dynamo: bool, grad: bool):
    with torch.enable_grad() if grad else torch.no_grad():
        export_onnx(wrapper, args, path, dynamo)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="demo")
    p.add_argument("--grad", choices=("on", "off"), default="on")
    p.add_argument("--exporter", choices=("dynamo", "legacy", "both"), default="both")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    m, n_patches = load(a.shape)
    t_load = time.perf_counter() - t0
    for prm in m.parameters():
        prm.requires_grad_(False)
    w = ScoreWrapper(m).eval()
    tokens, mask, patches = inputs(m, 37, n_patches, seed=1)
    exporters = ["dynamo", "legacy"] if a.exporter == "both" else [a.exporter]
    results = {}
    for ex in exporters:
        path = OUT / f"{a.shape}_{ex}_grad{a.grad}.onnx"
        t0 = time.perf_counter()
        try:
            export(w, (tokens, patches), path, ex == "dynamo", a.grad == "on")
        except Exception as e:
            traceback.print_exc()
            results[ex] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[:2000]}"}
            continue
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        sess = session(path)
        t_sess = time.perf_counter() - t0
        errs = parity(sess, m, n_patches)
        results[ex] = {
            "ok": True,
            "path": str(path),
            "bytes": path.stat().st_size,
            "export_s": round(t_export, 2),
            "session_s": round(t_sess, 2),
            "load_s": round(t_load, 2),
            "max_abs_err": errs,
        }
        print(ex, json.dumps(results[ex]), flush=True)
    print(json.dumps(results, indent=1))
    (OUT / f"export_{a.shape}_grad{a.grad}_{a.exporter}.json").write_text(
        json.dumps(results, indent=1)
    )


if __name__ == "__main__":
    main()
