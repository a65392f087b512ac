#!/usr/bin/env python
"""The reranker ablation: first stage, MaxSim, and cross-attention with each option on and off.

Every cross-attention row is the base configuration (the shipped demo reranker's architecture,
residual training over the first stage) with one change, trained with the same settings, seed and
step budget on the shapes train split, then evaluated on the fixed benchmark (test split): R@1,
R@5 and nDCG@10 overall, per query kind and on the held-out compositions, and the rerank latency
per query at k = 100 on the CPU (median of ``reranker.score`` on one query's 100 candidates, one
thread, the same random inputs for every row; the speed does not depend on the weights).

Rows train one after another and each is resumable: a row whose folder holds a finished reranker
is evaluated again without training; an interrupted one resumes from its checkpoint. Run (after
preparing the data as the README's "Reproducing the reranker" section does)::

    python benchmarks/ablation.py --train runs/shapes-train/pairs.parquet --train-index runs/train.idx \\
        --bench runs/bench --bench-index runs/bench.idx --out runs/ablation --steps 800 --batch-size 16 \\
        --candidates 8
    python benchmarks/ablation.py ... --rows base layers=1   # only some rows

It writes ``OUT/ablation.json`` and prints the markdown table the README quotes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from crossrank import Index
from crossrank.evaluate import evaluate_index
from crossrank.rerank import CrossAttentionReranker, RerankerConfig, RerankTrainConfig, load_reranker, train_reranker

#: The base architecture: the shipped demo reranker's.
BASE = RerankerConfig(layers=2, width=128, heads=4, patch_self_attention=True, query_self_attention=True,
                      patch_positions=64)
#: One change each from BASE.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "gate=off": {"gated": False},
    "prenorm=off": {"prenorm": False},
    "query_tokens=8": {"n_query_tokens": 8},
    "bidirectional=on": {"bidirectional": True},
    "sparse_m=16": {"sparse_top_m": 16},
    "patch_self_attention=off": {"patch_self_attention": False},
    "query_self_attention=off": {"query_self_attention": False},
    "layers=1": {"layers": 1},
    "layers=4": {"layers": 4},
}
GROUPS = ("all", "kind=single", "kind=pair", "kind=relation", "heldout=true")
METRICS = ("R@1", "R@5", "nDCG@10")


def _latencies_ms(rerankers: dict[str, Any], dim: int, n_patches: int, k: int = 100,
                  rounds: int = 21) -> dict[str, float]:
    """Median ``score`` time per query at ``k`` of each reranker, rounds interleaved (order rotated)."""
    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.randn(12, dim, generator=g), torch.ones(12, dtype=torch.bool)
    patches = torch.randn(k, n_patches, dim, generator=g).half()
    names = list(rerankers)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for reranker in rerankers.values():
            for _ in range(3):
                reranker.score(tokens, mask, patches)
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                rerankers[name].score(tokens, mask, patches)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _metrics(report: Any, reranked: bool) -> dict[str, dict[str, float]]:
    stage = "reranked" if reranked else "first_stage"
    out = {"all": {m: (report.reranked if reranked else report.first_stage).values[m] for m in METRICS}}
    for group, values in report.groups.items():
        if group in GROUPS:
            out[group] = {m: values[stage][m] for m in METRICS}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="training pairs (shapes train split)")
    parser.add_argument("--train-index", type=Path, required=True)
    parser.add_argument("--bench", type=Path, required=True, help="benchmark folder (queries.parquet, qrels.txt)")
    parser.add_argument("--bench-index", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--first-stage-weight", type=float, default=33.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training and timing")
    parser.add_argument("--rows", nargs="+", default=None, help=f"a subset of {list(VARIANTS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = args.rows or list(VARIANTS)
    unknown = sorted(set(rows) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "ablation.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}

    bench = Index.open(args.bench_index, device="cpu")
    queries, qrels = args.bench / "queries.parquet", args.bench / "qrels.txt"
    n_patches, dim = bench.patches.shape  # per image: (P, d)

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    if "first stage" not in results or "maxsim" not in results:
        report = evaluate_index(bench, queries, qrels, reranker="maxsim", fusion="rerank")
        results["first stage"] = {"metrics": _metrics(report, False), "latency_ms": 0.0}
        results["maxsim"] = {"metrics": _metrics(report, True)}
        save()

    train_config = RerankTrainConfig(steps=args.steps, batch_size=args.batch_size, n_candidates=args.candidates,
                                     loss="listwise", lr=1e-3,
                                     hard_fraction=0.5, curriculum=0.1, mine_k=50, eval_every=250,
                                     checkpoint_every=250, warmup=min(100, max(1, args.steps // 20)), seed=0,
                                     device="cpu", first_stage_weight=args.first_stage_weight)
    _share_training_set()
    train_index = None
    for name in rows:
        folder = args.out / name.replace("=", "-")
        key = f"cross-attention {name}"
        config = replace(BASE, **VARIANTS[name])
        done = (folder / "model.safetensors").exists() and not (folder / "checkpoint.pt").exists()
        if not done:
            train_index = train_index or Index.open(args.train_index, device="cpu")
            t0 = time.perf_counter()
            report = train_reranker(train_index, args.train, folder, model_config=config, config=train_config)
            (folder / "checkpoint.pt").unlink()  # finished: the exported reranker is what counts
            results.setdefault(key, {})["train"] = {"seconds": round(time.perf_counter() - t0, 1),
                                                    "val_r1": report.final.get("val_r1"),
                                                    "first_stage_val_r1": report.first_stage.get("r1")}
        reranker = load_reranker(folder, device="cpu", encoder_info=bench.manifest.encoder)
        report = evaluate_index(bench, queries, qrels, reranker=reranker)  # fusion auto: as trained
        results.setdefault(key, {}).update(
            metrics=_metrics(report, True), config=VARIANTS[name], steps=args.steps, params=sum(p.numel() for p in CrossAttentionReranker(config).parameters()))
        save()
        print(f"{key}: R@1 {results[key]['metrics']['all']['R@1']:.3f}", file=sys.stderr)

    # Latency last, every row in one interleaved measurement, so that a busy machine slows all alike.
    from crossrank.rerank import MaxSimReranker

    timed: dict[str, Any] = {"maxsim": MaxSimReranker(device="cpu")}
    for key in results:
        folder = args.out / key.removeprefix("cross-attention ").replace("=", "-")
        if key.startswith("cross-attention ") and (folder / "model.safetensors").exists():
            timed[key] = load_reranker(folder, device="cpu")
    for key, ms in _latencies_ms(timed, dim, n_patches).items():
        results[key]["latency_ms"] = ms
    results["_meta"] = {"threads": torch.get_num_threads(), "steps": args.steps, "torch": torch.__version__}
    save()
    print(_table(results))
    return 0


def _share_training_set() -> None:
    """Every row trains on the same data with the same settings: encode and mine it once."""
    from crossrank.rerank import _train_data

    prepare, memo = _train_data.prepare_training_set, {}

    def shared(index: Any, pairs_path: Any, config: RerankTrainConfig) -> Any:
        key = (str(index.path), str(pairs_path), config.mine_k, config.val_fraction, config.max_val_captions,
               config.seed)
        if key not in memo:
            memo[key] = prepare(index, pairs_path, config)
        return memo[key]

    _train_data.prepare_training_set = shared


def _table(results: dict[str, Any]) -> str:
    label = {"all": "all", "kind=single": "single", "kind=pair": "pair", "kind=relation": "relation",
             "heldout=true": "held-out"}
    head = ["row"] + [f"{m} {label[g]}" for g in GROUPS for m in (METRICS if g == "all" else ("R@1",))]
    head += ["nDCG@10 held-out", "ms/query k=100"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        if name.startswith("_"):
            continue
        m = row["metrics"]
        cells = [name]
        for g in GROUPS:
            for metric in (METRICS if g == "all" else ("R@1",)):
                cells.append(f"{m.get(g, {}).get(metric, float('nan')):.3f}")
        cells.append(f"{m.get('heldout=true', {}).get('nDCG@10', float('nan')):.3f}")
        cells.append(f"{row['latency_ms']:.1f}" if row.get("latency_ms") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
