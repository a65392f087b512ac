#!/usr/bin/env python
"""What each patch codec costs: reranked quality, bytes per image, gather-and-decode time.

Two measurements (see ``crossrank/store/codecs.py`` for the codecs):

1. Shapes. For each seed (default 17 and 23: the shipped reranker was chosen on seeds 0, 7 and 11
   and confirmed on 13, so these are seeds it never saw), a shapes corpus is generated
   (``crossrank dataset shapes``: 2,000 images, 300 queries) and built once per codec with the
   demo encoder (``build_index(..., patch_codec=CODEC)``, the same path as ``crossrank build
   --patch-codec``). Each index is evaluated with the default reranker (``auto``: the shipped
   cross-attention reranker), rerank_k 100: reranked R@1 and nDCG@10, and the first stage's R@1
   (which the codec cannot change: a check). Bytes per image are the patch bytes one image takes
   (``patch_bytes_per_image``) and on disk (every patch shard and the codec's file, divided by the
   images). Gather-and-decode is ``PatchStore.gather`` of 100 and 1,000 random rows, page cache
   warm: it returns ``(k, P, d)`` features, exactly what the reranker gets (float16 for fp16, the
   stored rows; float32 decoded for the others).
2. CLIP ViT-B/16 dimensions (P = 196, d = 512). Synthetic unit-norm features (random: their
   values change no byte count or timing) are written straight through the store API
   (``GenerationWriter(..., patch_codec=CODEC)``), then the same bytes and gather-and-decode
   times are measured (``opq`` left out: :data:`CLIP_SKIP`). Goal there: at most 16 KB of
   patches per image (fp16: 196 KiB).

Timings run in interleaved rounds (each round times every codec once, in rotating order, after
one warm-up round), and every figure is a median over the rounds. The reranker is not retrained
on decoded patches: each codec is measured with the reranker as shipped.

Goals: ``pq`` loses at most 0.01 of reranked R@1 at >= 8x fewer bytes than fp16 (checked for each
of ``pq``, ``pq:32``, ``opq`` and ``opq:32``: ``opq`` is pq after a learned rotation), ``int8`` at
most 0.005; at CLIP ViT-B/16 dimensions pq stores at most 16 KB per image. Run::

    python benchmarks/bench_codecs.py                    # ~6 minutes on 2 CPU cores
    python benchmarks/bench_codecs.py --quick --json     # a smoke test, not a measurement
    python benchmarks/bench_codecs.py --out              # also writes results/bench_codecs/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
from _report import add_out_option, write_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SCRIPT = "bench_codecs"
# pq:32 and opq:32: 8x at d = 128, the goal's bound
CODECS = ("fp16", "int8", "pq", "pq:32", "opq", "opq:32", "binary")
_PQ_GOAL = {"max_r1_loss": 0.01, "min_ratio": 8.0}
GOALS = {
    **{codec: _PQ_GOAL for codec in ("pq", "pq:32", "opq", "opq:32")},
    "int8": {"max_r1_loss": 0.005},
}
#: Left out at CLIP dims: training an OPQ rotation on 65,536 vectors of 512 takes tens of minutes
#: on 2 cores (PQ alone about 3); its bytes are pq's.
CLIP_SKIP = ("opq",)
CLIP_GOAL_BYTES = 16 * 1024  # patches per image at CLIP ViT-B/16 dimensions, with pq
GATHER_KS = (100, 1000)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def _disk_bytes(gen: Any) -> int:
    """Bytes of every patch shard and the codec's parameters file of a generation."""
    names = [s.file for s in gen.info.patch_shards]
    if gen.info.patch_codec_file:
        names.append(gen.info.patch_codec_file)
    return sum(gen.info.files[n] for n in names)


def time_gathers(
    stores: dict[str, Any], n_rows: int, ks: tuple[int, ...], rounds: int, seed: int
) -> dict[str, dict[str, float]]:
    """Median ms of ``store.gather(rows)`` per codec and k: interleaved rounds, one warm-up."""
    rng = np.random.default_rng(seed)
    names = list(stores)
    times: dict[str, dict[int, list[float]]] = {c: {k: [] for k in ks} for c in names}
    for r in range(rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in ks:
            rows = rng.choice(n_rows, size=min(k, n_rows), replace=False)
            for codec in order:
                t0 = time.perf_counter()
                out = stores[codec].gather(rows)
                ms = (time.perf_counter() - t0) * 1e3
                assert out.dtype in (np.float16, np.float32) and out.shape[0] == rows.size
                if r:  # round 0 warms the page cache and the allocator
                    times[codec][k].append(ms)
    return {c: {f"gather_ms_{k}": _median(times[c][k]) for k in ks} for c in names}


# -- 1. shapes ---------------------------------------------------------------------------------


def shapes_seed(
    workdir: Path, seed: int, codecs: tuple[str, ...], args: argparse.Namespace
) -> dict[str, Any]:
    """Generate one shapes corpus, build it once per codec, evaluate and time each."""
    from crossrank import Index
    from crossrank.datasets.shapes import generate_shapes
    from crossrank.evaluate.harness import evaluate_index
    from crossrank.store import Generation
    from crossrank.write.build import build_index

    root = workdir / f"shapes-{seed}"
    generate_shapes(root, n_images=args.n_images, n_queries=args.n_queries, seed=seed)
    rows: dict[str, dict[str, Any]] = {}
    stores: dict[str, Any] = {}
    for codec in codecs:
        index_dir = workdir / f"shapes-{seed}-{codec}.idx"
        report = build_index(
            root / "images", index_dir, device="cpu", batch_size=64, patch_codec=codec
        )
        with Index.open(index_dir, device="cpu") as index:
            ev = evaluate_index(
                index, root / "queries.parquet", root / "qrels.txt", rerank_k=100, reranker="auto"
            )
        gen = Generation.current(index_dir)
        assert ev.reranked is not None, "the default reranker did not run"
        rows[codec] = {
            "codec": gen.info.patch_codec,
            "patch_bytes_per_image": gen.info.patch_bytes_per_image,
            "disk_patch_bytes_per_image": _disk_bytes(gen) / gen.info.n_images,
            "reranked_R@1": ev.reranked.values["R@1"],
            "reranked_nDCG@10": ev.reranked.values["nDCG@10"],
            "first_stage_R@1": ev.first_stage.values["R@1"],
            "reranker": ev.reranker,
            "build_s": report.seconds,
            "queries": ev.queries,
        }
        stores[codec] = gen.patches()
        print(
            f"seed {seed} {codec}: R@1 {rows[codec]['reranked_R@1']:.4f} "
            f"({report.seconds:.1f} s build)",
            file=sys.stderr,
        )
    n = min(len(s) for s in stores.values())
    gathers = time_gathers(stores, n, GATHER_KS, args.rounds, seed)
    base = rows.get("fp16")
    for codec, row in rows.items():
        row.update(gathers[codec])
        if base is not None:
            row["bytes_ratio_vs_fp16"] = (
                base["patch_bytes_per_image"] / row["patch_bytes_per_image"]
            )
            row["delta_R@1"] = row["reranked_R@1"] - base["reranked_R@1"]
            row["delta_nDCG@10"] = row["reranked_nDCG@10"] - base["reranked_nDCG@10"]
    return {
        "seed": seed,
        "n_images": args.n_images,
        "n_queries": args.n_queries,
        "codecs": rows,
    }


# -- 2. CLIP ViT-B/16 dimensions -------------------------------------------------------------------


def clip_dims(workdir: Path, codecs: tuple[str, ...], args: argparse.Namespace) -> dict[str, Any]:
    """Synthetic P = 196, d = 512 stores written through the store API: bytes and gather time."""
    import pyarrow as pa

    from crossrank.store import Generation, GenerationWriter

    n, n_patches, dim = args.clip_images, 196, 512
    rng = np.random.default_rng(0)
    stores: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    block_rows = 256
    for codec in codecs:
        root = workdir / f"clip-{codec}.idx"
        t0 = time.perf_counter()
        with GenerationWriter(root, patch_codec=codec) as w:
            for i0 in range(0, n, block_rows):
                b = min(block_rows, n - i0)
                x = rng.standard_normal((b, n_patches, dim), dtype=np.float32)
                x /= np.linalg.norm(x, axis=-1, keepdims=True)
                w.patches.append(x.astype(np.float16))
            ids = np.arange(n, dtype=np.int64)
            w.write_vectors(np.zeros((n, 4), np.float32))
            w.write_ids(ids)
            w.write_metadata(pa.table({"id": pa.array(ids, pa.int64())}))
            w.write_skipped(
                pa.table({"path": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
            )
            w.first_stage_path.write_bytes(b"not searched")
            w.commit(encoder={"model_id": "synthetic-clip-vit-b16-dims"})
        write_s = time.perf_counter() - t0
        gen = Generation.current(root)
        stores[codec] = gen.patches()
        rows[codec] = {
            "codec": gen.info.patch_codec,
            "patch_bytes_per_image": gen.info.patch_bytes_per_image,
            "disk_patch_bytes_per_image": _disk_bytes(gen) / n,
            "write_s": write_s,
        }
        print(f"clip dims {codec}: written in {write_s:.1f} s", file=sys.stderr)
    gathers = time_gathers(stores, n, GATHER_KS, args.rounds, 1)
    fp16 = n_patches * dim * 2
    for codec, row in rows.items():
        row.update(gathers[codec])
        row["bytes_ratio_vs_fp16"] = fp16 / row["patch_bytes_per_image"]
    return {"n_images": n, "n_patches": n_patches, "patch_dim": dim, "codecs": rows}


# -- report ---------------------------------------------------------------------------------------


def summarise(shapes: list[dict[str, Any]], clip: dict[str, Any] | None) -> dict[str, Any]:
    """Means over the seeds, and each goal: met or missed, with the number measured."""
    codecs = list(shapes[0]["codecs"]) if shapes else []
    mean: dict[str, dict[str, float]] = {}
    for codec in codecs:
        keys = [k for k, v in shapes[0]["codecs"][codec].items() if isinstance(v, (int, float))]
        mean[codec] = {
            k: float(np.mean([s["codecs"][codec][k] for s in shapes]))
            for k in keys
            if all(k in s["codecs"][codec] for s in shapes)
        }
    goals: list[dict[str, Any]] = []
    for codec, goal in GOALS.items():
        m = mean.get(codec)
        if not m or "delta_R@1" not in m:
            continue
        worst = min(s["codecs"][codec]["delta_R@1"] for s in shapes)
        met = -worst <= goal["max_r1_loss"] + 1e-12
        text = f"{codec}: loses at most {goal['max_r1_loss']} of reranked R@1"
        if "min_ratio" in goal:
            met = met and m["bytes_ratio_vs_fp16"] >= goal["min_ratio"]
            text += f" at >= {goal['min_ratio']:g}x fewer bytes"
        goals.append(
            {
                "goal": text,
                "met": bool(met),
                "worst_seed_delta_R@1": worst,
                "mean_delta_R@1": m["delta_R@1"],
                "bytes_ratio_vs_fp16": m["bytes_ratio_vs_fp16"],
            }
        )
    if clip is not None and "pq" in clip["codecs"]:
        got = clip["codecs"]["pq"]["patch_bytes_per_image"]
        goals.append(
            {
                "goal": "pq at CLIP ViT-B/16 dims: at most 16 KB (16,384 bytes) per image",
                "met": got <= CLIP_GOAL_BYTES,
                "patch_bytes_per_image": got,
            }
        )
    return {"mean_over_seeds": mean, "goals": goals}


def table(report: dict[str, Any]) -> str:
    lines = []
    head = (
        f"{'codec':<8} {'B/image':>8} {'x fp16':>7} {'R@1':>7} {'dR@1':>8} {'nDCG@10':>8} "
        f"{'dnDCG':>8} {'gather100':>10} {'gather1000':>11}"
    )
    for s in report["shapes"]:
        lines.append(f"shapes seed {s['seed']} ({s['n_images']} images, {s['n_queries']} queries)")
        lines.append(head)
        for codec, r in s["codecs"].items():
            lines.append(
                f"{codec:<8} {r['patch_bytes_per_image']:>8,} "
                f"{r.get('bytes_ratio_vs_fp16', 1):>6.1f}x "
                f"{r['reranked_R@1']:>7.4f} {r.get('delta_R@1', 0):>+8.4f} "
                f"{r['reranked_nDCG@10']:>8.4f} {r.get('delta_nDCG@10', 0):>+8.4f} "
                f"{r['gather_ms_100']:>8.2f}ms {r['gather_ms_1000']:>9.2f}ms"
            )
    clip = report.get("clip_dims")
    if clip:
        lines.append(f"CLIP ViT-B/16 dims (P=196, d=512), {clip['n_images']} synthetic images")
        lines.append(
            f"{'codec':<8} {'B/image':>8} {'x fp16':>7} {'gather100':>10} {'gather1000':>11}"
        )
        for codec, r in clip["codecs"].items():
            lines.append(
                f"{codec:<8} {r['patch_bytes_per_image']:>8,} {r['bytes_ratio_vs_fp16']:>6.1f}x "
                f"{r['gather_ms_100']:>8.2f}ms {r['gather_ms_1000']:>9.2f}ms"
            )
    for g in report["summary"]["goals"]:
        lines.append(
            f"{'met ' if g['met'] else 'MISSED'} {g['goal']}: "
            + ", ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                for k, v in g.items()
                if k not in ("goal", "met")
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[17, 23])
    parser.add_argument("--codecs", nargs="+", default=list(CODECS))
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--n-queries", type=int, default=300)
    parser.add_argument("--clip-images", type=int, default=2000, help="synthetic CLIP-dim rows")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds")
    parser.add_argument("--skip-clip", action="store_true", help="leave out measurement 2")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the indexes here")
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    add_out_option(parser, SCRIPT)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.n_images, args.n_queries = args.seeds[:1], 240, 30
        args.clip_images, args.rounds = 120, 2
    codecs = tuple(args.codecs)
    if "fp16" not in codecs:
        codecs = ("fp16", *codecs)  # every delta is against fp16
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-codecs-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        shapes = [shapes_seed(workdir, seed, codecs, args) for seed in args.seeds]
        clip_codecs = tuple(c for c in codecs if not c.startswith(CLIP_SKIP))
        clip = None if args.skip_clip else clip_dims(workdir, clip_codecs, args)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "benchmark": SCRIPT,
        "quick": bool(args.quick),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "settings": {
            "seeds": args.seeds,
            "rerank_k": 100,
            "reranker": "auto (the shipped cross-attention reranker, not retrained)",
            "rounds": args.rounds,
            "gather": "PatchStore.gather of k random rows, page cache warm; (k, P, d) out, "
            "float16 for fp16, float32 decoded for the others",
        },
        "shapes": shapes,
        "clip_dims": clip,
    }
    report["summary"] = summarise(shapes, clip)
    write_report(args.out, report)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
