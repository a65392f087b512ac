#!/usr/bin/env python
"""The rerank stage's achieved FLOP/s against the machine's fp32 matrix-multiply FLOP/s, and its
p50 latency per query at k = 100 and k = 1000.

The rerank stage is what ``Index.search`` calls: ``reranker.score(tokens, mask, patches)`` on one
query and its k candidates' fp16 patches as ``PatchStore.gather`` returns them (the fp16 -> fp32
cast, the attention path ``score`` picks, the pooling and the head are all timed; the folded
key/value maps, which depend only on the weights, are made by the warm-up call and kept, as in a
search process). Its FLOPs are
counted by ``torch.utils.flop_counter.FlopCounterMode`` on the same call: matrix multiplies and
attention (2 FLOPs per multiply-add; the CPU flash-attention kernel is registered with torch's own
SDPA formula, which the counter lacks for it); LayerNorm, GELU, softmax and the like are not
counted, so the figure is the usual model-FLOPs utilisation, a lower bound on the arithmetic done.

The process allocator is tuned as the ``crossrank`` command line tunes it
(:func:`crossrank.allocator.keep_large_allocations`); ``--allocator default`` leaves glibc's
defaults, to measure what that tuning is worth.

``--ceiling`` also records the kernels that FLOP count is made of (every matrix multiply and
attention call of one forward, after the counter's own decompositions, with copies of their
inputs) and times each alone: ``matmul_ms`` is their sum and ``ceiling_vs_matmul`` the ratio the
call would reach if nothing else took any time (no LayerNorm, GELU, softmax, cast, copy or Python
between them). No schedule of the same kernels at the same shapes can beat it, so a ceiling below
the goal says the goal needs other kernels (fused, lower precision) or other shapes, not a leaner
forward.

The floor is a square fp32 ``torch.mm`` (the largest of 1024, 1536 and 2048 that is fastest per
FLOP), measured in the same run with the same threads; each round times the matmul and every
rerank case, in rotating order, and every figure is a median. The goal is a ratio >= 0.5.

The reranker is the shipped demo reranker (``crossrank/assets/demo-reranker``, its weights: the
speed does not depend on them, but the scores are the ones search computes) or each ``--reranker
DIR`` (several are timed in the same rounds, against the same matmul), or the default
:class:`~crossrank.rerank.RerankerConfig`. The shapes (``--shapes``) are the demo encoder's (d =
128, 64 patches) and, with ``clip-b16``, CLIP ViT-B/16's (d = 512, 196 patches; the reranker's
architecture with its input dims, patch positions and layer-0 width made CLIP's, random weights);
12 query tokens. Run::

    python benchmarks/bench_rerank_flops.py                 # k = 100 and 1000
    python benchmarks/bench_rerank_flops.py --threads 1
    python benchmarks/bench_rerank_flops.py --reranker OLD_DIR crossrank/assets/demo-reranker
    python benchmarks/bench_rerank_flops.py --shapes demo clip-b16
    python benchmarks/bench_rerank_flops.py --ceiling       # + each call's matmul-only ceiling
    python benchmarks/bench_rerank_flops.py --precision auto bfloat16  # both, same rounds
    python benchmarks/bench_rerank_flops.py --quick --json  # a smoke test, not a measurement
    python benchmarks/bench_rerank_flops.py --out  # also writes results/bench_rerank_flops/
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
from _report import add_out_option, write_report

from crossrank.allocator import keep_large_allocations
from crossrank.device import Precision
from crossrank.rerank import CrossAttentionReranker, RerankerConfig, read_reranker_config
from crossrank.rerank.checkpoint import demo_reranker_dir, load_reranker

K = TypeVar("K")
DEMO_RERANKER = demo_reranker_dir()
N_TOKENS = 12
DIM, N_PATCHES = 128, 64  # the demo encoder's features
#: Feature width and patch count per ``--shapes`` value.
SHAPES = {"demo": (DIM, N_PATCHES), "clip-b16": (512, 196)}


def _model(reranker: Path | None, shape: str) -> tuple[CrossAttentionReranker, str]:
    """The reranker to time at ``shape``: a folder's own weights at its own dims, else its
    architecture with random weights at the shape's dims."""
    folder = reranker or (DEMO_RERANKER if (DEMO_RERANKER / "config.json").is_file() else None)
    dim, n_patches = SHAPES[shape]
    if folder is None:
        return CrossAttentionReranker(RerankerConfig(text_dim=dim, patch_dim=dim)), "defaults"
    config = read_reranker_config(folder)
    if (config.patch_dim, config.patch_positions) == (dim, n_patches):
        return load_reranker(folder, device="cpu"), str(folder)
    config = dataclasses.replace(
        config,
        text_dim=dim,
        patch_dim=dim,
        token_embeddings=dim if config.token_embeddings else 0,
        patch_positions=n_patches if config.patch_positions else None,
    )
    return CrossAttentionReranker(config), f"{folder} (architecture, random weights)"


def _matmul_case(n: int) -> tuple[Any, float]:
    g = torch.Generator().manual_seed(n)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n**3


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's SDPA formula, for the CPU flash kernel the counter has none for."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: The CPU flash-attention kernel, counted with torch's SDPA formula (see :func:`_sdpa_flops`).
SDPA_CPU = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


class _CountedKernels(TorchDispatchMode):
    """Records the calls :class:`FlopCounterMode` counts, after the same decompositions (a
    ``linear`` becomes its ``addmm``, an ``einsum`` its ``bmm``), with copies of their inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.registry = FlopCounterMode(display=False, custom_mapping=SDPA_CPU).flop_registry
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._overloadpacket in self.registry:
            self.calls.append((func, tree_map(_copy, args), tree_map(_copy, kwargs)))
        elif func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


def _ceiling(call: Any, repeats: int, clock: Any) -> tuple[float, float]:
    """The counted FLOPs of ``call`` and the seconds its counted kernels take, each timed alone
    (median of ``repeats``) and summed: the call's time if nothing else took any."""
    recorder = _CountedKernels()
    with recorder:
        call()
    flops, seconds = 0.0, 0.0
    for func, args, kwargs in recorder.calls:
        with FlopCounterMode(display=False, custom_mapping=SDPA_CPU) as counter:
            func(*args, **kwargs)  # also the warm-up
        times = []
        for _ in range(repeats):
            start = clock()
            func(*args, **kwargs)
            times.append(clock() - start)
        flops += counter.get_total_flops()
        seconds += statistics.median(times)
    return flops, seconds


def time_rounds(
    calls: Mapping[K, Callable[[], Any]],
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[K, list[float]]:
    """Seconds of each call, timed once a round for ``rounds`` rounds; each round starts one call
    later than the one before (so no call always runs right after the same other one)."""
    times: dict[K, list[float]] = {key: [] for key in calls}
    keys = list(calls)
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            start = clock()
            calls[key]()
            times[key].append(clock() - start)
    return times


def _at(model: CrossAttentionReranker, precision: Precision, call: Any) -> Any:
    """``call`` with ``model`` set to ``precision`` first (one model, several precisions)."""

    def at() -> Any:
        model.precision = precision
        return call()

    return at


def _rerank_case(
    model: CrossAttentionReranker, k: int, n_patches: int = N_PATCHES
) -> tuple[Any, float]:
    g = torch.Generator().manual_seed(k)
    tokens = torch.randn(N_TOKENS, model.config.token_input_dim, generator=g)
    mask = torch.ones(N_TOKENS, dtype=torch.bool)
    patches = torch.randn(k, n_patches, model.config.patch_dim, generator=g).half()  # as gathered

    def call() -> torch.Tensor:
        return model.score(tokens, mask, patches)

    call()  # warm-up outside the counter
    with FlopCounterMode(display=False, custom_mapping=SDPA_CPU) as counter:
        call()
    return call, float(counter.get_total_flops())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--reranker",
        type=Path,
        nargs="+",
        default=[None],
        help="reranker folders to time in the same rounds (default: the shipped demo reranker)",
    )
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=["demo"],
        help="feature shapes: demo (d = 128, 64 patches), clip-b16 (d = 512, 196 patches)",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=[p.value for p in Precision],
        default=["auto"],
        help="precisions to time each reranker at, in the same rounds (auto: float32 on the CPU)",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--allocator",
        choices=("tuned", "default"),
        default="tuned",
        help="tuned: as the CLI runs (keep_large_allocations); default: glibc's own",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="wall: elapsed time (latency); thread: the calling thread's CPU time, with "
        "--threads 1 only (robust to other processes on a shared machine; not a latency)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds, small matmuls: a smoke test"
    )
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also time each call's counted kernels alone: the ratio it would reach if nothing "
        "else took any time",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    add_out_option(parser, "bench_rerank_flops")
    args = parser.parse_args(argv)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread measures one thread's CPU time: add --threads 1")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    tuned = args.allocator == "tuned" and keep_large_allocations()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = 3 if args.quick else args.rounds
    timed = []  # (name, source, shape, k, config)
    sizes = [256, 512] if args.quick else [1024, 1536, 2048]
    cases: dict[str, tuple[Any, float]] = {f"mm{n}": _matmul_case(n) for n in sizes}
    with torch.inference_mode():
        for folder in args.reranker:
            for shape in args.shapes:
                model, source = _model(folder, shape)
                model.eval()
                for k, precision in itertools.product(args.ks, args.precision):
                    name = f"{source}|{shape}|k{k}|{precision}"
                    model.precision = Precision(precision)
                    call, flops = _rerank_case(model, k, SHAPES[shape][1])
                    cases[name] = (_at(model, Precision(precision), call), flops)
                    timed.append((name, source, shape, k, model.config, precision))
        for fn, _ in cases.values():
            fn()  # warm-up
        times = time_rounds({name: fn for name, (fn, _) in cases.items()}, rounds, clock)

        ceilings = {
            name: _ceiling(cases[name][0], rounds, clock) for name, *_ in timed if args.ceiling
        }

    flops_per_s = {name: cases[name][1] / statistics.median(t) for name, t in times.items()}
    peak_name = max((n for n in cases if n.startswith("mm")), key=lambda n: flops_per_s[n])
    peak = flops_per_s[peak_name]
    rows = []
    for name, source, shape, k, _, precision in timed:
        t = times[name]
        rows.append(
            {
                "reranker": source,
                "shapes": shape,
                "k": k,
                "precision": precision,
                "p50_ms": 1e3 * statistics.median(t),
                "min_ms": 1e3 * min(t),
                "gflop_per_query": cases[name][1] / 1e9,
                "gflop_per_s": flops_per_s[name] / 1e9,
                "vs_matmul": flops_per_s[name] / peak,
            }
        )
        if name in ceilings:
            flops, seconds = ceilings[name]
            rows[-1].update(
                matmul_gflop=flops / 1e9,
                matmul_ms=1e3 * seconds,
                ceiling_vs_matmul=flops / seconds / peak,
            )
    configs = {source: config.to_dict() for _, source, _, _, config, _ in timed}
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "rounds": rounds,
        "clock": args.clock,
        "allocator_tuned": tuned,
        "reranker": timed[0][1],
        "config": timed[0][4].to_dict(),
        "configs": configs,
        "n_tokens": N_TOKENS,
        "shapes": {
            shape: dict(zip(("dim", "n_patches"), SHAPES[shape], strict=True))
            for shape in args.shapes
        },
        "n_patches": SHAPES[args.shapes[0]][1],
        "matmul": {
            "best": peak_name,
            **{n: flops_per_s[n] / 1e9 for n in cases if n.startswith("mm")},
        },
    }
    write_report(args.out, {"meta": meta, "rows": rows})
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return 0
    print(
        f"# torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}, {rounds} rounds, "
        f"{args.clock} clock, allocator {'tuned' if tuned else 'default'}, {N_TOKENS} query tokens"
    )
    print(
        "# fp32 matmul GFLOP/s: "
        + ", ".join(f"{n} {v:.1f}" for n, v in meta["matmul"].items() if n != "best")
        + f" (floor: {peak_name})"
    )
    last = None
    for r in rows:
        if (r["reranker"], r["shapes"]) != last:
            last = (r["reranker"], r["shapes"])
            print(f"# {r['reranker']} at {r['shapes']} shapes")
            print(
                f"{'k':>5} {'precision':>9} {'p50 ms':>9} {'GFLOP/query':>12} {'GFLOP/s':>9} "
                f"{'vs matmul':>10}"
                + (f" {'matmul ms':>10} {'ceiling':>8}" if args.ceiling else "")
                + "  goal >= 0.50"
            )
        print(
            f"{r['k']:>5} {r['precision']:>9} {r['p50_ms']:>9.2f} {r['gflop_per_query']:>12.3f} "
            f"{r['gflop_per_s']:>9.1f} {r['vs_matmul']:>10.2f}"
            + (f" {r['matmul_ms']:>10.2f} {r['ceiling_vs_matmul']:>8.2f}" if args.ceiling else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
