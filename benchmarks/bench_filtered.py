#!/usr/bin/env python
"""Filtered vector search: crossrank against a hand-written FAISS + DuckDB script.

Both sides search the same index: ``N`` synthetic clustered, L2-normalised vectors written with
``Index.build_from_arrays`` (the FAISS factory crossrank picks for ``N``, e.g. ``IVF1265,Flat`` at
100k, trained on a seeded sample), with a ``bucket`` column (0..999, random, independent of the
vectors) in the metadata. A ``where`` of ``bucket < t`` keeps ``t / 1000`` of the images:
selectivities 100 %, 10 %, 1 % and 0.1 % (``--kept`` names others).

- ``crossrank``: ``Index.search_vectors(xq[i:i+1], k=10, where=...)``, one query per call, the
  whole call timed (filter, first stage, metadata join of the 10 hits). Repeated filters hit the
  per-generation cache of allowed ids.
- ``script``: what one writes by hand: ``faiss.read_index`` of the same file into memory, the
  metadata Parquet loaded into a DuckDB table, and per query ``SELECT id FROM metadata WHERE ...``
  then ``index.search`` with an ``IDSelectorBatch`` and the index's nprobe. It joins no metadata.
- ``script FAISS only``: the script's ``index.search`` alone, its selector built once per filter
  (what the script would cost had it cached its filter as crossrank does).

FAISS runs one OpenMP thread on both sides (``--threads 1``, the default): one query per call
gains nothing from more, and on a busy machine an OpenMP barrier whose thread is descheduled costs
a scheduler slice (the script's ``IndexIDMap`` maps its 10 ids in a parallel loop: 7 ms a query on
2 loaded cores, 0.3 ms with one thread). ``--threads 0`` keeps FAISS's default.

Each side runs every query once unmeasured (warm caches), then ``--queries`` queries timed one by
one; the report gives the median and p95 per query in milliseconds, the ratio of medians
(crossrank / script; the goal is at most 1.2) and recall@10 of each side against exact search
over the allowed vectors (the goal is at least 0.99). Run::

    python benchmarks/bench_filtered.py                     # 100k vectors of dim 512
    python benchmarks/bench_filtered.py --n 20000 --dim 128
    python benchmarks/bench_filtered.py --nprobe 128         # both sides probe 128 lists
    python benchmarks/bench_filtered.py --seed 1             # other data, same generator
    python benchmarks/bench_filtered.py --kept 1,0.5,0.1,0.03,0.01,0.001
    python benchmarks/bench_filtered.py --quick --json       # a smoke test, not a measurement
    python benchmarks/bench_filtered.py --out                # also writes results/bench_filtered/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
from _report import add_out_option, write_report

GOAL_RATIO = 1.2  # crossrank's filtered search costs at most this many times the script's
GOAL_RECALL = 0.99  # recall@10 against exact search over the allowed vectors
K = 10
SELECTIVITIES = (1.0, 0.1, 0.01, 0.001)  # the default --kept


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, dim: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` vectors around ``n // 100`` centres, ``m`` queries near them, a bucket per vector."""
    rng = np.random.default_rng(seed)
    n_centres = max(10, n // 100)
    centres = rng.standard_normal((n_centres, dim)).astype(np.float32)
    xb = np.empty((n, dim), np.float32)
    for i0 in range(0, n, 8192):  # in blocks: no (n, dim) float64 temporary
        b = min(8192, n - i0)
        noise = rng.standard_normal((b, dim), dtype=np.float32)
        xb[i0 : i0 + b] = _unit(centres[rng.integers(0, n_centres, b)] + 0.9 * noise)
    xq = _unit(xb[rng.integers(0, n, m)] + 0.3 * rng.standard_normal((m, dim), dtype=np.float32))
    bucket = rng.permutation(n) % 1000
    return xb, xq, bucket


def build(path: Path, xb: np.ndarray, bucket: np.ndarray) -> Any:
    """The crossrank index of ``xb`` (ids 0..n-1), searched by vectors only."""
    import pyarrow as pa

    from crossrank import Index

    n = len(xb)
    return Index.build_from_arrays(
        path,
        xb,
        np.zeros((n, 1, 4), np.float16),  # patches are not read by a vector search
        pa.table({"bucket": pa.array(bucket, pa.int64())}),
        ids=np.arange(n, dtype=np.int64),
        encoder_info={"model_id": "synthetic", "dim": int(xb.shape[1])},
        device="cpu",
    )


def _stats(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {"p50_ms": float(np.median(arr)), "p95_ms": float(np.percentile(arr, 95))}


def _recall(got: np.ndarray, want: np.ndarray) -> float:
    per = [
        len(set(g[g >= 0].tolist()) & set(w[w >= 0].tolist())) / max(1, int((w >= 0).sum()))
        for g, w in zip(got, want, strict=True)
    ]
    return float(np.mean(per))


class Script:
    """The hand-written FAISS + DuckDB search over the same files."""

    def __init__(self, faiss_path: Path, parts: list[Path], nprobe: int) -> None:
        import duckdb
        import faiss

        self.faiss = faiss
        self.index = faiss.read_index(str(faiss_path))
        self.nprobe = nprobe
        self.con = duckdb.connect(":memory:")
        files = ", ".join(f"'{p}'" for p in parts)
        self.con.execute(f"CREATE TABLE metadata AS SELECT * FROM read_parquet([{files}])")

    def params(self, where: str) -> Any:
        """DuckDB's ids for ``where`` as the search parameters of a FAISS selector."""
        faiss = self.faiss
        ids = self.con.execute(f"SELECT id FROM metadata WHERE {where}").fetchnumpy()["id"]
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        sel = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
        if faiss.try_extract_index_ivf(self.index) is None:
            return faiss.SearchParameters(sel=sel)
        return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)

    def search(self, xq: np.ndarray, where: str) -> np.ndarray:
        """Filter (DuckDB) and search (FAISS): one query as a script runs it."""
        _, I = self.index.search(xq, K, params=self.params(where))
        return I


def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import faiss

    from crossrank.indexes import exact_search
    from crossrank.store import Generation

    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    xb, xq, bucket = make_data(args.n, args.dim, args.queries, args.seed)
    t0 = time.perf_counter()
    index = build(workdir / "filtered.idx", xb, bucket)
    build_s = time.perf_counter() - t0
    if args.nprobe is not None:  # the same index, searched with more (or fewer) lists
        from crossrank import Index

        index.close()
        index = Index.open(workdir / "filtered.idx", device="cpu", nprobe=args.nprobe)
    gen = Generation.current(index.path)
    stage = index.first_stage
    parts = [gen.path / p.file for p in gen.info.metadata_parts]
    script = Script(gen.first_stage_path, parts, stage.nprobe)
    ids = np.arange(args.n, dtype=np.int64)
    rows = []
    for fraction in args.kept:
        t = max(1, round(1000 * fraction))
        where = f"bucket < {t}"
        keep = bucket < t
        _, Iexact = exact_search(xq, xb[keep], ids[keep], K)
        sides: dict[str, dict[str, Any]] = {}
        cached = script.params(where)
        for name in ("crossrank", "script", "script_faiss"):
            if name == "crossrank":

                def run(i: int, where: str = where) -> np.ndarray:
                    hits = index.search_vectors(xq[i : i + 1], k=K, where=where)[0]
                    got = np.full(K, -1, np.int64)
                    got[: len(hits)] = [h.id for h in hits]
                    return got

            elif name == "script":

                def run(i: int, where: str = where) -> np.ndarray:
                    return script.search(xq[i : i + 1], where)[0]

            else:

                def run(i: int, params: Any = cached) -> np.ndarray:
                    return script.index.search(xq[i : i + 1], K, params=params)[1][0]

            for i in range(len(xq)):  # warm-up: caches, page cache, allocator
                run(i)
            ms, found = [], []
            for i in range(len(xq)):
                t1 = time.perf_counter()
                found.append(run(i))
                ms.append((time.perf_counter() - t1) * 1e3)
            sides[name] = {**_stats(ms), "recall_at_10": _recall(np.stack(found), Iexact)}
        probe = stage.filtered_nprobe(int(keep.sum()))
        rows.append(
            {
                "selectivity": fraction,
                "allowed": int(keep.sum()),
                "crossrank_path": "exact" if stage.prefers_exact(int(keep.sum()), K) else "faiss",
                "crossrank_nprobe": probe,
                **{f"{side}_{key}": value for side, d in sides.items() for key, value in d.items()},
                "ratio_p50": sides["crossrank"]["p50_ms"] / sides["script"]["p50_ms"],
            }
        )
    index.close()
    return {
        "factory": stage.factory,
        "nprobe": stage.nprobe,
        "index_in_memory": not stage.mapped,
        "build_s": build_s,
        "rows": rows,
    }


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import duckdb
    import faiss

    return {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": K,
        "seed": args.seed,
        "nprobe_asked": args.nprobe,
        "kept": list(args.kept),
        "faiss_threads": args.threads or None,
        "load_average": os.getloadavg(),
        "faiss": faiss.__version__,
        "duckdb": duckdb.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def _table(report: dict[str, Any]) -> str:
    r = report["result"]
    lines = [
        f"{report['meta']['n']} vectors of dim {report['meta']['dim']} (seed "
        f"{report['meta']['seed']}), {r['factory']}, nprobe {r['nprobe']}, index in memory: "
        f"{r['index_in_memory']}; {report['meta']['queries']} queries, k = {K}; FAISS threads "
        f"{report['meta']['faiss_threads'] or 'default'}; load average "
        + " ".join(f"{x:.2f}" for x in report["meta"]["load_average"]),
        "",
        "| kept | allowed | crossrank path (nprobe) | crossrank p50 / p95 ms | script p50 / p95 ms "
        "| script FAISS only p50 ms | ratio p50 | recall@10 crossrank / script |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        path = row["crossrank_path"]
        if path == "faiss":
            path = f"faiss ({row['crossrank_nprobe']})"
        lines.append(
            f"| {row['selectivity']:.1%} | {row['allowed']} | {path} | "
            f"{row['crossrank_p50_ms']:.3f} / "
            f"{row['crossrank_p95_ms']:.3f} | {row['script_p50_ms']:.3f} / "
            f"{row['script_p95_ms']:.3f} | {row['script_faiss_p50_ms']:.3f} | "
            f"{row['ratio_p50']:.2f} | "
            f"{row['crossrank_recall_at_10']:.3f} / {row['script_recall_at_10']:.3f} |"
        )
    return "\n".join(lines)


def _fractions(text: str) -> tuple[float, ...]:
    """``--kept``: comma-separated fractions, each a whole number of thousandths in (0, 1]."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from e
    for v in values:
        if not 0 < v <= 1 or abs(v * 1000 - round(v * 1000)) > 1e-9:
            raise argparse.ArgumentTypeError(
                f"{v} is not a fraction in (0, 1] that bucket < t keeps (t / 1000, t whole)"
            )
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors (default 100000)")
    parser.add_argument("--dim", type=int, default=512, help="vector dim (default 512)")
    parser.add_argument("--queries", type=int, default=200, help="timed queries (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument(
        "--nprobe",
        type=int,
        default=None,
        help="IVF lists probed unfiltered, by both sides (default: the index's, 16)",
    )
    parser.add_argument(
        "--kept",
        type=_fractions,
        default=SELECTIVITIES,
        help="fractions of the images the filters keep, comma-separated, each a multiple of "
        "0.001 in (0, 1] (default 1,0.1,0.01,0.001)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads on both sides (default 1; 0 keeps FAISS's default)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="20000 vectors of dim 16, 10 queries: a smoke test"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--workdir", type=Path, default=None, help="where to build the index")
    add_out_option(parser, "bench_filtered")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.dim, args.queries = 20_000, 16, 10  # 20000: the smallest IVF crossrank builds
    if args.n < 1000 or args.dim < 1 or args.queries < 1 or (args.nprobe or 1) < 1:
        parser.error(
            "--n must be >= 1000 (0.1 % of it is one image), --dim, --queries and --nprobe >= 1"
        )
    if args.threads < 0:
        parser.error("--threads must be >= 0 (0: FAISS's default)")
    workdir = Path(tempfile.mkdtemp(prefix="bench_filtered_", dir=args.workdir))
    try:
        result = measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "meta": _meta(args),
        "goal_ratio": GOAL_RATIO,
        "goal_recall_at_10": GOAL_RECALL,
        "result": result,
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
