#!/usr/bin/env python
"""The reranker ablation: first stage, MaxSim, and cross-attention with each option on and off.

Every cross-attention row is the base configuration (the shipped demo reranker's architecture with
2 layers, and its recipe: caption-negative steps first, then residual training over the first
stage) with one change, trained with the same settings, seed and step budget on the shapes train
split, then evaluated on the fixed benchmark (test split), and on a second benchmark seed if
given: R@1, R@5 and nDCG@10 overall, per query kind and on the held-out compositions, and the
rerank latency per query at k = 100 on the CPU (median of ``reranker.score`` on one query's 100
candidates, one thread, the same random inputs for every row; the speed does not depend on the
weights).

Rows train one after another (``crossrank.training.train_reranker``, each preparing the same
training set: encoding and mining are repeated per row) and each is resumable: a row whose folder
holds a finished reranker is evaluated again without training; an interrupted one resumes from its
checkpoint. Run from the repository root (after preparing the data as "The shipped demo
reranker" in docs/training.md does)::

    python research/ablation.py --train runs/shapes-train/pairs.parquet \\
        --train-index runs/train-negs.idx --bench runs/bench --bench-index runs/bench-negs.idx \\
        --out runs/ablation --steps 2000 --caption-only-steps 1200 --first-stage-weight 35.9 \\
        --second-bench runs/bench7 --second-bench-index runs/bench7-negs.idx   # also on seed 7
    python research/ablation.py ... --rows base layers=1   # only some rows

Rows may train in several processes at once (``--rows`` splits them, same ``--out``: each process
writes only its own rows into ``ablation.json``); a last run with every row then evaluates them all
again without training and times them together.

It writes ``OUT/ablation.json`` (beside each row's reranker folder) and prints the markdown
table research/README.md quotes. The results are in ``research/results/ablation/``, each an
``OUT/ablation.json`` copied there
(``cp runs/ablation/ablation.json research/results/ablation/ablation_<what>.json``; its
``_meta`` gives steps, caption-only steps and threads, ``_meta_second_bench`` the second
benchmark): ``ablation_seed0.json`` (800 steps, no caption-only steps, seed 0 only),
``ablation_negclip_seed0_seed7.json`` (the command above: 2000 steps, 1200 caption-only, seeds 0
and 7) and ``ablation_negclip_init_bert.json`` (its ``init=bert`` row, same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from crossrank import Index
from crossrank.evaluate import evaluate_index
from crossrank.rerank import CrossAttentionReranker, load_reranker, read_reranker_config
from crossrank.rerank.checkpoint import demo_reranker_dir
from crossrank.training import RerankTrainConfig, train_reranker

#: The base architecture: the shipped demo reranker's (width 128, 4 heads, no gates, LeCun init,
#: 64 patch positions) with 2 layers and without the options the relation-reading demo reranker
#: added (query self-attention, pair head, layer-0 token states), as it was when the table in
#: research/README.md was measured; the ``layers=1`` row is the reranker shipped between the two
#: (the full recipe's run).
BASE = replace(
    read_reranker_config(demo_reranker_dir()),
    layers=2,
    query_self_attention=False,
    pair_head=False,
    token_embeddings=0,
)
#: One change each from BASE.
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {},
    "gate=on": {"gated": True},
    "prenorm=off": {"prenorm": False},
    "query_tokens=8": {"n_query_tokens": 8},
    "bidirectional=on": {"bidirectional": True},
    "sparse_m=16": {"sparse_top_m": 16},
    "layers=1": {"layers": 1},
    "layers=4": {"layers": 4},
    "init=bert": {"init": "bert"},
    "positions=off": {"patch_positions": None},
    "query_self_attention=on": {"query_self_attention": True},
    "patch_self_attention=on": {"patch_self_attention": True},
}
GROUPS = ("all", "kind=single", "kind=pair", "kind=relation", "heldout=true")
METRICS = ("R@1", "R@5", "nDCG@10")


def _latencies_ms(
    rerankers: dict[str, Any], dim: int, n_patches: int, k: int = 100, rounds: int = 21
) -> dict[str, float]:
    """Median ``score`` time per query at ``k`` of each reranker, rounds interleaved (order
    rotated)."""
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
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                rerankers[name].score(tokens, mask, patches)
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _metrics(report: Any, reranked: bool) -> dict[str, dict[str, float]]:
    stage = "reranked" if reranked else "first_stage"
    out = {
        "all": {m: (report.reranked if reranked else report.first_stage).values[m] for m in METRICS}
    }
    for group, values in report.groups.items():
        if group in GROUPS:
            out[group] = {m: values[stage][m] for m in METRICS}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--train", type=Path, required=True, help="training pairs (shapes train split)"
    )
    parser.add_argument("--train-index", type=Path, required=True)
    parser.add_argument(
        "--bench", type=Path, required=True, help="benchmark folder (queries.parquet, qrels.txt)"
    )
    parser.add_argument("--bench-index", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument(
        "--first-stage-weight",
        type=float,
        default=35.9,
        help="W of the residual training (the shipped encoder's exp(logit_scale))",
    )
    parser.add_argument("--caption-negatives", type=int, default=6)
    parser.add_argument(
        "--caption-only-steps",
        type=int,
        default=0,
        help="steps on caption negatives alone before the residual steps",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for training and timing"
    )
    parser.add_argument("--rows", nargs="+", default=None, help=f"a subset of {list(VARIANTS)}")
    parser.add_argument(
        "--second-bench",
        type=Path,
        default=None,
        help="another benchmark folder (another seed): every row is evaluated there too",
    )
    parser.add_argument("--second-bench-index", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = args.rows or list(VARIANTS)
    unknown = sorted(set(rows) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "ablation.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}

    if (args.second_bench is None) != (args.second_bench_index is None):
        parser.error("--second-bench and --second-bench-index go together")
    bench = Index.open(args.bench_index, device="cpu")
    queries, qrels = args.bench / "queries.parquet", args.bench / "qrels.txt"
    n_patches, dim = bench.patches.shape  # per image: (P, d)
    second = None
    if args.second_bench is not None:
        second = (
            Index.open(args.second_bench_index, device="cpu"),
            args.second_bench / "queries.parquet",
            args.second_bench / "qrels.txt",
        )

    mine: set[str] = set()  # the keys this process wrote

    def save(*keys: str) -> None:
        # Other processes may be training other rows into the same file: keep their rows.
        mine.update(keys)
        merged = json.loads(results_path.read_text()) if results_path.exists() else {}
        merged.update({key: results[key] for key in mine})
        tmp = results_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(merged, indent=2))
        os.replace(tmp, results_path)

    if "first stage" not in results or "maxsim" not in results:
        report = evaluate_index(bench, queries, qrels, reranker="maxsim", fusion="rerank")
        results["first stage"] = {"metrics": _metrics(report, False), "latency_ms": 0.0}
        results["maxsim"] = {"metrics": _metrics(report, True)}
        save("first stage", "maxsim")
    if second is not None and "second_bench" not in results["first stage"]:
        report = evaluate_index(*second, reranker="maxsim", fusion="rerank")
        results["first stage"]["second_bench"] = _metrics(report, False)
        results["maxsim"]["second_bench"] = _metrics(report, True)
        save("first stage", "maxsim")

    train_config = RerankTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        n_candidates=args.candidates,
        loss="listwise",
        lr=1e-3,
        hard_fraction=0.5,
        curriculum=0.0,
        mine_k=50,
        eval_every=250,
        checkpoint_every=250,
        warmup=min(100, max(1, args.steps // 20)),
        seed=0,
        device="cpu",
        first_stage_weight=args.first_stage_weight,
        caption_negatives=args.caption_negatives,
        caption_only_steps=args.caption_only_steps,
    )
    train_index = None
    for name in rows:
        folder = args.out / name.replace("=", "-")
        key = f"cross-attention {name}"
        config = replace(BASE, **VARIANTS[name])
        done = (folder / "model.safetensors").exists() and not (folder / "checkpoint.pt").exists()
        if not done:
            train_index = train_index or Index.open(args.train_index, device="cpu")
            t0 = time.perf_counter()
            report = train_reranker(
                train_index, args.train, folder, model_config=config, config=train_config
            )
            (folder / "checkpoint.pt").unlink()  # finished: the exported reranker is what counts
            results.setdefault(key, {})["train"] = {
                "seconds": round(time.perf_counter() - t0, 1),
                "val_r1": report.final.get("val_r1"),
                "first_stage_val_r1": report.first_stage.get("r1"),
            }
        reranker = load_reranker(folder, device="cpu", encoder_info=bench.manifest.encoder)
        report = evaluate_index(bench, queries, qrels, reranker=reranker)  # fusion auto: as trained
        results.setdefault(key, {}).update(
            metrics=_metrics(report, True),
            config=VARIANTS[name],
            steps=args.steps,
            params=sum(p.numel() for p in CrossAttentionReranker(config).parameters()),
        )
        if second is not None:
            reranker = load_reranker(folder, device="cpu", encoder_info=second[0].manifest.encoder)
            results[key]["second_bench"] = _metrics(
                evaluate_index(*second, reranker=reranker), True
            )
        save(key)
        print(f"{key}: R@1 {results[key]['metrics']['all']['R@1']:.3f}", file=sys.stderr)

    # Latency last, every row in one interleaved measurement: a busy machine slows all alike.
    from crossrank.rerank import MaxSimReranker

    if results_path.exists():  # every row so far, this process's and the others'
        results = {**json.loads(results_path.read_text()), **{key: results[key] for key in mine}}
    timed: dict[str, Any] = {"maxsim": MaxSimReranker(device="cpu")}
    for key in results:
        folder = args.out / key.removeprefix("cross-attention ").replace("=", "-")
        if key.startswith("cross-attention ") and (folder / "model.safetensors").exists():
            timed[key] = load_reranker(folder, device="cpu")
    for key, ms in _latencies_ms(timed, dim, n_patches).items():
        results[key]["latency_ms"] = ms
    if second is not None:
        results["_meta_second_bench"] = str(args.second_bench)
    results["_meta"] = {
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "caption_only_steps": args.caption_only_steps,
        "torch": torch.__version__,
    }
    save(*[key for key in results if key in timed or key.startswith("_meta")])
    print(_table(results))
    return 0


def _table(results: dict[str, Any]) -> str:
    label = {
        "all": "all",
        "kind=single": "single",
        "kind=pair": "pair",
        "kind=relation": "relation",
        "heldout=true": "held-out",
    }
    head = ["row"] + [
        f"{m} {label[g]}" for g in GROUPS for m in (METRICS if g == "all" else ("R@1",))
    ]
    head += ["nDCG@10 held-out"]
    second = "_meta_second_bench" in results
    if second:
        name = Path(results["_meta_second_bench"]).name
        head += [f"R@1 all ({name})", f"nDCG@10 all ({name})", f"R@1 relation ({name})"]
    head += ["ms/query k=100"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        if name.startswith("_"):
            continue
        m = row["metrics"]
        cells = [name]
        for g in GROUPS:
            for metric in METRICS if g == "all" else ("R@1",):
                cells.append(f"{m.get(g, {}).get(metric, float('nan')):.3f}")
        cells.append(f"{m.get('heldout=true', {}).get('nDCG@10', float('nan')):.3f}")
        if second:
            m2 = row.get("second_bench", {})
            cells += [
                f"{m2.get(g, {}).get(metric, float('nan')):.3f}"
                for g, metric in (("all", "R@1"), ("all", "nDCG@10"), ("kind=relation", "R@1"))
            ]
        cells.append(f"{row['latency_ms']:.1f}" if row.get("latency_ms") else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
