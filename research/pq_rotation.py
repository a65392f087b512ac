#!/usr/bin/env python
"""How much of a patch vector each product quantiser loses, with and without an OPQ rotation.

The ``pq`` patch codec quantises each patch vector in M sub-spaces of d / M dims. The demo
encoder's patch features put their variance unevenly over the dims, so some sub-spaces get more
than their share of the error; an OPQ rotation (FAISS ``OPQMatrix``, trained with the quantiser)
evens that out. This probe trains each quantiser on a seeded sample of an index's stored patch
vectors (the sample size the codec uses: 65,536) and reports, on other vectors of the same
index, the relative squared error ``sum |x - decode(encode(x))|^2 / sum |x|^2`` and the training
time. The quantisers are the codecs' own (:func:`crossrank.store.codecs.parse_codec`), so this is
what ``--patch-codec`` stores.

    python research/pq_rotation.py INDEX --codecs pq opq pq:32 opq:32 \
        --out research/results/patch_codecs/pq_rotation.json

``INDEX`` is an fp16 index (e.g. ``crossrank build`` of a 2,000-image shapes corpus, seed 17).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # _report
from _report import write_report

from crossrank.store import Generation
from crossrank.store.codecs import parse_codec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("index", type=Path, help="an fp16 index folder")
    parser.add_argument("--codecs", nargs="+", default=["pq", "opq", "pq:32", "opq:32"])
    parser.add_argument("--train", type=int, default=65_536, help="training vectors")
    parser.add_argument("--test", type=int, default=20_000, help="held-out test vectors")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = parser.parse_args(argv)

    gen = Generation.current(args.index)
    store = gen.patches()
    if store.codec.spec != "fp16":
        parser.error(f"{args.index} stores {store.codec.spec} patches; give an fp16 index")
    x = store.gather(np.arange(len(store))).astype(np.float32)  # (n, P, d)
    n_patches, dim = x.shape[1:]
    flat = x.reshape(-1, dim)
    order = np.random.default_rng(0).permutation(len(flat))
    train = flat[order[: args.train]]
    test = flat[order[args.train : args.train + args.test]]
    rows = []
    for spec in args.codecs:
        codec = parse_codec(spec)
        codec.configure(int(n_patches), int(dim))
        t0 = time.perf_counter()
        codec.train(train)
        train_s = time.perf_counter() - t0
        decoded = codec.decode(codec.encode(test[:, None, :]), int(dim))[:, 0, :]
        error = float(np.square(decoded - test).sum() / np.square(test).sum())
        rows.append(
            {
                "codec": codec.spec,
                "bytes_per_patch": codec.bytes_per_patch(int(dim)),
                "relative_squared_error": error,
                "train_s": round(train_s, 1),
            }
        )
        print(
            f"{codec.spec:<8} {rows[-1]['bytes_per_patch']:>3} B/patch  rel. error {error:.4f}  "
            f"train {train_s:.1f} s",
            file=sys.stderr,
        )
    report = {
        "index": str(args.index),
        "n_images": len(store),
        "patches": [int(n_patches), int(dim)],
        "train_vectors": len(train),
        "test_vectors": len(test),
        "codecs": rows,
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
