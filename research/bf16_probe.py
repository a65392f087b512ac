#!/usr/bin/env python
"""Does the shipped reranker keep its accuracy with bf16 matrix multiplies on the CPU?

Runs ``crossrank eval`` in-process on shapes benchmark seeds (the indexes
``research/rerank_cost_eval.py`` reads: ``RUNS/benchS-negs.idx`` and ``RUNS/benchS/``) twice per
seed: as shipped (float32 on the CPU), and with every ``CrossAttentionReranker.score`` call run
under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (matrix multiplies and linears in bf16,
LayerNorm and softmax as autocast's CPU policy leaves them). Reports the goal figures of each and
the largest score difference on the first query, so that a run in which autocast never reached
the reranker cannot pass for "no change". The autocast way is what ``--precision bfloat16``
now runs (``research/rerank_cost_eval.py --precision bfloat16`` checks it through the flag);
this probe is what chose it. ``--time`` instead times one ``score`` call of the shipped reranker
at k = 100 and 1,000 (``bench_rerank_flops``'s call: 12 query tokens, fp16 patches) three ways:
float32, autocast, and ``hand``: bf16 placed by hand where the call spends most of its time
(the patch LayerNorm and the position add write bf16, and the folded attention's two batched
matrix multiplies and its softmax run in bf16; the query side, the value map and the heads
stay float32). Alternated with a square fp32 matmul for ``--rounds`` rounds, p50, and each way's
counted FLOP/s against that matmul's (``bench_rerank_flops``'s ratio). Run::

    python research/bf16_probe.py --runs runs --seeds 0 7 11 --out FILE.json
    python research/bf16_probe.py --time --out FILE.json
    python research/bf16_probe.py --profile 1000 --out FILE.json  # top operators, float32/hand
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # research/: rerank_cost_eval
from rerank_cost_eval import summarise

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _report import write_report
from bench_rerank_flops import _matmul_case, _rerank_case, time_rounds
from typer.testing import CliRunner

from crossrank.allocator import keep_large_allocations
from crossrank.cli import app
from crossrank.rerank.checkpoint import demo_reranker_dir, load_reranker
from crossrank.rerank.cross_attention import CrossAttentionReranker
from crossrank.rerank.folding import FoldedKV, folded_weights
from crossrank.rerank.kv_source import PatchStates

_FLOAT32_SCORE = CrossAttentionReranker.score
_first_call: dict[str, float] = {}


def _bf16_score(self: CrossAttentionReranker, *args: Any, **kwargs: Any) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _FLOAT32_SCORE(self, *args, **kwargs)
    if not _first_call:
        reference = _FLOAT32_SCORE(self, *args, **kwargs)
        _first_call["max_abs_diff"] = float((out - reference).abs().max())
        _first_call["score_std"] = float(reference.std())
    return out


def _eval(runs: Path, seed: int) -> dict[str, Any]:
    bench = runs / f"bench{seed}"
    args = [
        "eval", str(runs / f"bench{seed}-negs.idx"),
        "--queries", str(bench / "queries.parquet"),
        "--qrels", str(bench / "qrels.txt"),
        "--reranker", "auto", "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    if result.exit_code != 0:
        detail = f"{result.exception!r} {result.output[-2000:]}"
        raise SystemExit(f"crossrank eval failed ({result.exit_code}): {detail}")
    return summarise(json.loads(result.stdout))


def _hand_stream(self: CrossAttentionReranker, patches, patch_mask, keep) -> PatchStates:
    """The patch stream with x̃ in bf16: the LayerNorm reads and writes bf16, and the position
    embedding is added in bf16 (no padding mask: ``_rerank_case`` has none)."""
    norm = self.patch_norm
    normed = F.layer_norm(
        patches.to(torch.bfloat16), norm.normalized_shape, norm.weight, norm.bias, norm.eps
    )
    pos = self.patch_pos[: patches.shape[-2]].to(torch.bfloat16)
    return PatchStates(self.patch_in, normed, keep, pos=pos, owned=True)


def _hand_attend(self: FoldedKV, layer: Any, q: torch.Tensor, channels: Any = ()) -> Any:
    """:meth:`FoldedKV.attend` of one query (``score``) with the queries cast to bf16: the two
    batched matrix multiplies and the softmax run on x̃'s bf16; the value map stays float32."""
    attn = layer.cross_attn
    w_k, w_v, b_out = folded_weights(attn, self.patch_in, self.cache, layer.index)
    heads, head_dim, d_v = w_k.shape
    n = q.shape[-2]
    prepared = self.patches.prepared  # (1, k, P, d_v) bf16
    n_batch, k, n_patches = prepared.shape[:3]
    rows = n * heads
    q_fold = torch.einsum("...hnd,hde->...nhe", q, w_k * attn.scale).reshape(rows, d_v)
    flat = prepared.reshape(n_batch * k, n_patches, d_v)
    queries = q_fold.to(flat.dtype).expand(n_batch * k, rows, d_v)
    weights = torch.softmax(torch.bmm(queries, flat.transpose(1, 2)), dim=-1)  # (N, rows, P)
    out = torch.bmm(weights, flat).float()  # (N, rows, d_v)
    averages = None
    if channels:  # the pair head's coordinates only
        (coords,) = channels
        averages = (weights.view(-1, n_patches) @ coords.to(weights.dtype)).float()
        averages = averages.view(n_batch, k, n, heads, -1)
    out = torch.einsum("...nhe,hde->...nhd", out.view(n_batch, k, n, heads, d_v), w_v)
    out = out.reshape(*out.shape[:-2], heads * head_dim)
    return F.linear(out, attn.o.weight, b_out), averages


def _profiles(k: int, calls: int = 10) -> dict[str, list[dict[str, Any]]]:
    """torch.profiler's top operators (self CPU ms per call, with input shapes) of the float32
    and the ``hand`` call at ``k``: where the bf16 time goes."""
    from torch.profiler import ProfilerActivity, profile

    keep_large_allocations()
    model = load_reranker(demo_reranker_dir(), device="cpu")
    call, _ = _rerank_case(model, k)
    plain_stream, plain_attend = CrossAttentionReranker._patch_stream, FoldedKV.attend
    tops = {}
    for name, (stream, attend) in {
        "float32": (plain_stream, plain_attend),
        "hand": (_hand_stream, _hand_attend),
    }.items():
        CrossAttentionReranker._patch_stream, FoldedKV.attend = stream, attend
        try:
            for _ in range(calls):  # warm: the allocator keeps its blocks after these
                call()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(calls):
                    call()
        finally:
            CrossAttentionReranker._patch_stream, FoldedKV.attend = plain_stream, plain_attend
        events = prof.key_averages(group_by_input_shape=True)
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
        tops[name] = [
            {
                "op": e.key,
                "ms_per_call": e.self_cpu_time_total / 1e3 / calls,
                "shapes": e.input_shapes,
            }
            for e in top
        ]
    return tops


def _timings(rounds: int) -> dict[str, Any]:
    """p50 ms of the shipped reranker's ``score`` in float32, under bf16 autocast and with bf16
    placed by hand; each one's counted GFLOP/s against a square fp32 matmul's, same rounds."""
    keep_large_allocations()
    model = load_reranker(demo_reranker_dir(), device="cpu")
    plain_stream, plain_attend = CrossAttentionReranker._patch_stream, FoldedKV.attend
    calls, flops, diffs = {}, {}, {}
    for k in (100, 1000):
        call, flops[k] = _rerank_case(model, k)
        calls[(k, "float32")] = call

        def bf16(call: Any = call) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return call()

        def hand(call: Any = call) -> Any:
            CrossAttentionReranker._patch_stream, FoldedKV.attend = _hand_stream, _hand_attend
            try:
                return call()
            finally:
                CrossAttentionReranker._patch_stream, FoldedKV.attend = plain_stream, plain_attend

        reference = call()
        for name, way in (("bf16", bf16), ("hand", hand)):
            calls[(k, name)] = way
            diffs[(k, name)] = float((way() - reference).abs().max())
    matmul, matmul_flops = _matmul_case(1536)
    calls[(0, "matmul")] = matmul
    times = {key: statistics.median(s) for key, s in time_rounds(calls, rounds).items()}
    floor = matmul_flops / times.pop((0, "matmul"))
    rows = [
        {
            "k": k,
            "precision": precision,
            "p50_ms": 1e3 * seconds,
            "vs_float32": seconds / times[(k, "float32")],
            "vs_matmul": flops[k] / seconds / floor,
            "max_abs_diff": diffs.get((k, precision), 0.0),
        }
        for (k, precision), seconds in times.items()
    ]
    return {"matmul_gflops": floor / 1e9, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of benchS*")
    parser.add_argument("--seeds", type=int, nargs="+", default=[])
    parser.add_argument("--time", action="store_true", help="time the three ways instead")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--profile", type=int, default=None, metavar="K", help="profile float32 and hand at k=K"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.time and not args.seeds and args.profile is None:
        parser.error("give --seeds (accuracy), --time or --profile K")
    results: dict[str, Any] = {"seeds": {}}
    if args.time:
        results.update(threads=torch.get_num_threads(), timings=_timings(args.rounds))
        print(f"fp32 matmul: {results['timings']['matmul_gflops']:.0f} GFLOP/s", flush=True)
        for row in results["timings"]["rows"]:
            print(
                f"k {row['k']:>5} {row['precision']:>7}: {row['p50_ms']:.2f} ms "
                f"({row['vs_float32']:.2f}x float32, {row['vs_matmul']:.2f} of the matmul rate, "
                f"scores within {row['max_abs_diff']:.3f})",
                flush=True,
            )
    if args.profile is not None:
        results["profile"] = {"k": args.profile, "top": _profiles(args.profile)}
        for name, top in results["profile"]["top"].items():
            for op in top:
                print(f"{name:>7} {op['ms_per_call']:6.2f} ms  {op['op']} {op['shapes']}")
    for seed in args.seeds:
        row = {"float32": _eval(args.runs, seed)}
        _first_call.clear()
        CrossAttentionReranker.score = _bf16_score
        try:
            row["bf16"] = _eval(args.runs, seed)
        finally:
            CrossAttentionReranker.score = _FLOAT32_SCORE
        row["first_query"] = dict(_first_call)
        results["seeds"][str(seed)] = row
        for name in ("float32", "bf16"):
            s = row[name]
            print(
                f"seed {seed} {name:>7}: R@1 {s['R@1']:.3f}, {s['removed']:.0%} removed, "
                f"held-out {s['heldout_R@1']:.3f}, goals {'met' if s['goals_met'] else 'MISSED'}",
                flush=True,
            )
        print(f"seed {seed} first query: {row['first_query']}", flush=True)
    write_report(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
