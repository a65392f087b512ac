#!/usr/bin/env python
"""The Ray build against the one-process build: the same images, the same machine, one run.

Writes a shapes corpus of ``--n-images`` images (``crossrank dataset shapes --seed 11``) unless
``--work`` holds it, starts a local Ray runtime of every CPU of the machine (timed apart: a
cluster is started once and serves many builds), warms this process (the imports and one load of
the model), then builds the corpus ``--repeats`` times with each engine, alternating (local, ray,
local, ray, ...) so that both see the same load:

- **local**: :func:`crossrank.write.build_index` (``--workers`` decoder threads, torch's own
  intra-op threads);
- **ray**: :func:`crossrank.distributed.build_on_ray` on that runtime (decode tasks, encoder
  actors: ``--num-encoders``, default one per two CPUs).

For each build: wall seconds from the call to the commit (model loading, and for Ray the actors'
start, included), the headline; the seconds until the first batch of results came back (the
start-up: for Ray, the encoder actors' start and model load, while the decode tasks already run
ahead); and the rate after it, images per second from the first to the last progress call (for
Ray this flatters the pipeline: files decoded during the start-up come out at the encoder's
pace). The report gives the medians and the ratios ray / local, and checks that both builds gave
the same ids and vectors (to 1e-5).

Then the fan-out's cost per query: the corpus built on Ray into ``--shards`` shards, and the same
text queries (``k=10``, the index's default reranker) timed, interleaved, on the unsharded index,
on the sharded one with its shards on threads of this process, and on the sharded one with one
Ray actor per shard (:func:`crossrank.distributed.open_on_ray`): p50 and p95 of the wall time per
query. A sharded search makes three rounds of calls to its shards (first stage, rerank, hits);
the actors' extra cost over threads is those rounds' round trips through Ray. Run::

    python benchmarks/bench_ray_build.py --n-images 2000 --repeats 2 --json --out
    python benchmarks/bench_ray_build.py --n-images 200 --repeats 1 --json     # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: crossrank
from _report import add_out_option, write_report

SCRIPT = "bench_ray_build"
SEED = 11


class _Clock:
    """``progress(done, total)``: when the first and the last call came, and how far it got."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
        self.last = (now, done)

    def first_seconds(self, start: float) -> float | None:
        return None if self.first is None else self.first[0] - start

    def steady_rate(self) -> float | None:
        if self.first is None or self.last is None or self.last[0] <= self.first[0]:
            return None
        return (self.last[1] - self.first[1]) / (self.last[0] - self.first[0])


def _dataset(work: Path, n: int) -> Path:
    from crossrank.datasets.shapes import generate_shapes

    root = work / f"shapes-{n}"
    if not (root / "dataset.json").is_file():
        generate_shapes(root, n_images=n, n_queries=0, seed=SEED, overwrite=True)
    return root / "images"


def _one(engine: str, images: Path, index: Path, args: argparse.Namespace) -> dict[str, Any]:
    clock = _Clock()
    start = time.perf_counter()
    if engine == "local":
        from crossrank.write import build_index

        report = build_index(
            images,
            index,
            batch_size=args.batch_size,
            device=args.device,
            workers=args.workers,
            overwrite=True,
            progress=clock,
        )
    else:
        from crossrank.distributed import build_on_ray

        report = build_on_ray(
            images,
            index,
            batch_size=args.batch_size,
            device=args.device,
            num_encoders=args.num_encoders,
            overwrite=True,
            progress=clock,
        )
    seconds = time.perf_counter() - start
    steady = clock.steady_rate()
    return {
        "engine": engine,
        "images": report.indexed,
        "seconds": round(seconds, 3),
        "images_per_second": round(report.indexed / seconds, 2),
        "first_result_seconds": round(clock.first_seconds(start) or 0.0, 3),
        "images_per_second_after_first_result": None if steady is None else round(steady, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _same_index(a: Path, b: Path) -> dict[str, Any]:
    from crossrank.store import Generation

    ga, gb = Generation.current(a), Generation.current(b)
    same_ids = bool(np.array_equal(ga.ids(), gb.ids()))
    diff = float(np.abs(np.asarray(ga.vectors()) - np.asarray(gb.vectors())).max())
    return {"same_ids": same_ids, "max_vector_difference": diff, "equal": same_ids and diff < 1e-5}


QUERIES = (
    "a red circle",
    "a blue square left of a green triangle",
    "a large yellow star",
    "a small purple triangle above an orange circle",
    "a green square",
)


def _search_latency(work: Path, images: Path, args: argparse.Namespace) -> dict[str, Any]:
    """p50 / p95 ms per query: unsharded, sharded on threads, sharded on Ray actors."""
    import crossrank
    from crossrank.distributed import build_on_ray, open_on_ray

    sharded = work / "sharded.idx"
    build_on_ray(
        images,
        sharded,
        shards=args.shards,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=True,
    )
    indexes = {
        "unsharded": crossrank.open(work / "local.idx", device="cpu"),
        "sharded_threads": crossrank.open(sharded, device="cpu"),
        "sharded_ray_actors": open_on_ray(sharded, device="cpu"),
    }
    times: dict[str, list[float]] = {name: [] for name in indexes}
    same = True
    try:
        for index in indexes.values():  # warm: models loaded, pages in
            for q in QUERIES:
                index.search(q, k=10)
        for _ in range(args.query_rounds):
            for q in QUERIES:
                ids = []
                for name, index in indexes.items():
                    t = time.perf_counter()
                    result = index.search(q, k=10)
                    times[name].append((time.perf_counter() - t) * 1e3)
                    # Paths, not ids: a rebuild with overwrite gives new ids, never reused.
                    ids.append([h.path for h in result.hits])
                same = same and all(i == ids[0] for i in ids)
    finally:
        for index in indexes.values():
            index.close()
    out: dict[str, Any] = {
        name: {
            "p50_ms": round(float(np.percentile(t, 50)), 2),
            "p95_ms": round(float(np.percentile(t, 95)), 2),
        }
        for name, t in times.items()
    }
    out["queries"] = len(times["unsharded"])
    out["shards"] = args.shards
    out["same_hits_by_path"] = same
    out["ray_actors_over_threads_p50_ms"] = round(
        out["sharded_ray_actors"]["p50_ms"] - out["sharded_threads"]["p50_ms"], 2
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2, help="builds per engine, alternating")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decoder threads of the local build")
    parser.add_argument("--num-encoders", type=int, default=None, help="encoder actors (Ray)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the Ray runtime")
    parser.add_argument("--shards", type=int, default=2, help="shards of the search test")
    parser.add_argument("--query-rounds", type=int, default=10, help="rounds of the 5 queries")
    parser.add_argument("--work", type=Path, default=Path("/tmp/crossrank-bench-ray"))
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    add_out_option(parser, SCRIPT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import ray

    from crossrank.distributed import require_ray

    require_ray()
    images = _dataset(args.work, args.n_images)
    t0 = time.perf_counter()
    ray.init(
        num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR"
    )
    ray_start = time.perf_counter() - t0
    # Warm this process (imports, the model's files in the page cache) so that the first local
    # build is not charged for them; each Ray build starts its own actors either way.
    from crossrank.encoders import load_encoder

    load_encoder(None, device="cpu")
    runs: list[dict[str, Any]] = []
    try:
        for _ in range(args.repeats):
            for engine in ("local", "ray"):
                run = _one(engine, images, args.work / f"{engine}.idx", args)
                print(json.dumps(run), file=sys.stderr)
                runs.append(run)
        equality = _same_index(args.work / "local.idx", args.work / "ray.idx")
        search = _search_latency(args.work, images, args)
    finally:
        cpus = ray.cluster_resources().get("CPU")
        ray.shutdown()

    def median(engine: str, key: str) -> float | None:
        values = [r[key] for r in runs if r["engine"] == engine and r[key] is not None]
        return round(statistics.median(values), 2) if values else None

    summary = {
        engine: {
            "seconds": median(engine, "seconds"),
            "images_per_second": median(engine, "images_per_second"),
            "first_result_seconds": median(engine, "first_result_seconds"),
            "images_per_second_after_first_result": median(
                engine, "images_per_second_after_first_result"
            ),
        }
        for engine in ("local", "ray")
    }

    def ratio(key: str) -> float | None:
        a, b = summary["ray"][key], summary["local"][key]
        return round(a / b, 3) if a and b else None

    report = {
        "script": SCRIPT,
        "command": "python benchmarks/bench_ray_build.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "ray_cpus": cpus,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "ray": ray.__version__,
        },
        "settings": {
            "n_images": args.n_images,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "num_encoders": args.num_encoders,
            "device": args.device,
            "model": "crossrank-demo",
            "repeats": args.repeats,
        },
        "ray_start_seconds": round(ray_start, 2),
        "runs": runs,
        "median": summary,
        "ratio_ray_over_local": {
            "images_per_second": ratio("images_per_second"),
            "images_per_second_after_first_result": ratio("images_per_second_after_first_result"),
        },
        "same_index": equality,
        "search": search,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
