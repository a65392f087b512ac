"""Interleaved eager-vs-ORT timing of the reranker score call, plus parity.

python bench.py --shape demo --models models/demo_dynamo_gradon.onnx [...] --ks 100 1000 --rounds 30
Eager: m.score(tokens, mask, patches) (unpatched model, torch.set_num_threads(2), after
keep_large_allocations()). ORT: sess.run with tokens.numpy(), patches.numpy() (fp16) conversion
inside the timed region. Each round calls every contestant once, order rotating each round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from common import inputs, load, session

from crossrank.allocator import keep_large_allocations


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="demo")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--ks", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--nospin", action="store_true", help="also time each model with spinning off")
    p.add_argument("--out", default=None)
    p.add_argument(
        "--spin",
        choices=("on", "off"),
        default="on",
        help="ORT intra-op thread spinning (on = ORT's default)",
    )
    a = p.parse_args()
    tuned = keep_large_allocations()
    torch.set_num_threads(2)
    m, n_patches = load(a.shape)  # a fresh, unpatched model
    import onnxruntime as ort

    sessions = {}
    for path in a.models:
        name = path.rsplit("/", 1)[-1].removesuffix(".onnx")
        sessions[f"ort:{name}"] = session(path, spin=a.spin == "on")
        if a.nospin:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[f"ort-nospin:{name}"] = ort.InferenceSession(
                path, so, providers=["CPUExecutionProvider"]
            )

    report = {
        "spin": a.spin,
        "shape": a.shape,
        "allocator_tuned": tuned,
        "torch": torch.__version__,
        "ort": ort.__version__,
        "threads": torch.get_num_threads(),
        "parity": {},
        "timing": {},
    }
    # parity: 3 seeds per k
    for k in a.ks:
        for name, s in sessions.items():
            errs = []
            for seed in (0, 1, 2):
                tk, mk, pt = inputs(m, k, n_patches, seed=1000 * seed + k)
                ref = m.score(tk, mk, pt)
                got = s.run(None, {"tokens": tk.numpy(), "patches": pt.numpy()})[0]
                errs.append(float(np.abs(got - ref.numpy()).max()))
            report["parity"][f"{name}|k{k}"] = {
                "max_abs": max(errs),
                "ref_scale": float(ref.abs().max()),
            }
    for k in a.ks:
        tokens, mask, patches = inputs(m, k, n_patches)

        def eager(tokens=tokens, mask=mask, patches=patches):
            return m.score(tokens, mask, patches)

        calls = {"eager": eager}
        for name, s in sessions.items():
            calls[name] = lambda s=s, tokens=tokens, patches=patches: s.run(
                None, {"tokens": tokens.numpy(), "patches": patches.numpy()}
            )[0]
        for f in calls.values():
            f()
            f()  # warm-up
        names = list(calls)
        times = {n: [] for n in names}
        for r in range(a.rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                calls[n]()
                times[n].append(time.perf_counter() - t0)
        rows = {
            n: {"p50_ms": round(1e3 * statistics.median(t), 2), "min_ms": round(1e3 * min(t), 2)}
            for n, t in times.items()
        }
        report["timing"][f"k{k}"] = rows
        for n, row in rows.items():
            print(
                f"{a.shape:9s} k={k:5d} {n:40s} p50 {row['p50_ms']:8.2f}  min {row['min_ms']:8.2f}",
                flush=True,
            )
    print(json.dumps(report["parity"], indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
