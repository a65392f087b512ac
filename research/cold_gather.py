#!/usr/bin/env python
"""Cold and warm gathers of a large patch store, with and without the read-ahead hint.

``PatchStore.gather_stored`` hints every row of a large patch file before reading
(``posix_fadvise(WILLNEED)``, ``crossrank/store/patches.py``). This probe measures what that buys
on an index bigger than the page cache holds: for each seed, a fresh process drops the patch
files from the page cache, opens the store and gathers ``k`` random rows once, without the hint
and then with it; then, in one process, the warm cost of the hint (median of 50).

    python research/cold_gather.py GEN_DIR --k 100 1000 --seeds 1 2 3 \
        --out research/results/cold_gather/cold_gather.json

``GEN_DIR`` is a generation folder (``INDEX/gen-000001``), e.g. the synthetic 1M pq index that
``benchmarks/bench_scale.py --synthetic --sizes 1m --codecs pq`` writes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_ONE = """
import glob, os, sys, time
import numpy as np
import crossrank.store.patches as P
gen, hint, k, seed = sys.argv[1], sys.argv[2] == "hint", int(sys.argv[3]), int(sys.argv[4])
if not hint:
    P._HINT_MIN_BYTES = 1 << 62
for f in glob.glob(os.path.join(gen, "patches*.npy")):
    fd = os.open(f, os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
store = P.PatchStore.open(gen)
rows = np.sort(np.random.default_rng(seed).choice(len(store), k, replace=False))
t = time.perf_counter(); out = store.gather_stored(rows); dt = time.perf_counter() - t
print(dt * 1000, int(out.astype(np.int64).sum()))
"""


def cold(gen: str, hint: bool, k: int, seed: int) -> tuple[float, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _ONE, gen, "hint" if hint else "none", str(k), str(seed)],
        capture_output=True,
        text=True,
        check=True,
    )
    ms, total = proc.stdout.split()
    return float(ms), int(total)


def warm(gen: str, k: int) -> dict[str, float]:
    import numpy as np

    import crossrank.store.patches as P

    default = P._HINT_MIN_BYTES
    store = P.PatchStore.open(gen)
    rows = np.sort(np.random.default_rng(0).choice(len(store), k, replace=False))
    store.gather_stored(rows)
    out: dict[str, list[float]] = {"hint": [], "none": []}
    for mode in ("hint", "none", "hint", "none"):
        P._HINT_MIN_BYTES = default if mode == "hint" else 1 << 62
        ts = []
        for _ in range(50):
            t = time.perf_counter()
            store.gather_stored(rows)
            ts.append(time.perf_counter() - t)
        out[mode].append(float(np.median(ts)) * 1000)
    P._HINT_MIN_BYTES = default
    return {m: min(v) for m, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gen_dir")
    ap.add_argument("--k", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not glob.glob(os.path.join(args.gen_dir, "patches*.npy")):
        raise SystemExit(f"{args.gen_dir} holds no patches-*.npy: give a generation folder")
    results = []
    for k in args.k:
        for seed in args.seeds:
            row = {"k": k, "seed": seed}
            for hint in (False, True):
                ms, total = cold(args.gen_dir, hint, k, seed)
                row["hint_ms" if hint else "none_ms"], row["checksum"] = ms, total
            results.append(row)
            print(f"cold k={k} seed={seed}: {row['none_ms']:.1f} ms -> {row['hint_ms']:.1f} ms")
        w = warm(args.gen_dir, k)
        results.append({"k": k, "warm_hint_ms": w["hint"], "warm_none_ms": w["none"]})
        print(f"warm k={k}: {w['none']:.3f} ms without, {w['hint']:.3f} ms with the hint")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"gen_dir": args.gen_dir, "results": results}, indent=2))


if __name__ == "__main__":
    main()
