#!/usr/bin/env python
"""A million images on one machine: build and query costs of shapes corpora of growing size.

For each size (``--sizes``: 10k, 100k, 1m) the script writes a shapes dataset (``crossrank
dataset shapes --n-images N --seed 5``, its queries and qrels included) unless the work folder
already holds it, then for each patch codec (``--codecs``):

- **build**: ``crossrank build`` with the demo encoder, run in a child process: images per second
  (wall time, model loading included) and the child's peak RSS (``ru_maxrss`` from ``wait4``);
- **disk**: bytes per image of the committed generation, in total and per kind of file (patches,
  pooled vectors, first stage, metadata);
- **queries**: ``Index.search(text, k=10, rerank_k=R)`` for R = 100 and 1,000 with the index's
  default reranker, the dataset's text queries one at a time: p50 and p95 of every stage the
  search reports (encode, first_stage, rerank, metadata, total; ``filter`` only runs under a
  ``where``, which these queries have none of) plus ``gather``, measured apart (the rerank stage
  includes it): reading the patches of the R first-stage candidates, decoded, as the reranker
  gets them. Warm: every query once unmeasured, then timed. Cold: before each of
  ``--cold-queries`` queries the index's pages leave the page cache (``madvise(MADV_DONTNEED)`` on
  this process's maps of the index files, then ``posix_fadvise(POSIX_FADV_DONTNEED)`` on every
  file; no root needed; what DuckDB or FAISS hold in their own memory stays warm);
- **quality**: reranked R@1 and nDCG@10 on that size's queries, at both R.

``--synthetic`` measures sizes no real build reaches in the time at hand: the index is written
through the build's own chunk writer (:class:`crossrank.write.streaming.StreamingBuild`, pq
trained at the end, the first stage built from the memory-mapped vectors) from noisy copies of the
encoded rows of a smaller real index (``--rows-from``, default the 10k index), in a child process
that also holds what a real build holds (the demo encoder, loaded; a source listing of that many
files; every file's SHA-256 for finding copies). Its peak RSS and bytes per image are a real
build's less the decoder threads' few batches; its rows per second are writing alone (no
encoding). Its queries are the real dataset's (timings only: the relevant images are not in the
index, so no R@1).

Results go to ``--out`` as they come (one entry per size and codec); run again with the same
``--out``, it skips what is there, and a build killed half-way resumes (``crossrank build`` keeps
its finished chunks). Run::

    python benchmarks/bench_scale.py --sizes 10k 100k --codecs pq fp16 --out
    nice -n 15 python benchmarks/bench_scale.py --sizes 1m --codecs pq --work /tmp/scale --out
    python benchmarks/bench_scale.py --sizes 2k --codecs pq --queries 20 --json   # a smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
from _report import add_out_option, write_report

SCRIPT = "bench_scale"
SEED = 5
K = 10
RERANK_KS = (100, 1000)
STAGES = ("encode", "filter", "first_stage", "gather", "rerank", "metadata", "total")
GOALS_MS = {100: 25.0, 1000: 60.0}  # warm p50 total at 1M images with pq


def parse_size(text: str) -> int:
    t = text.strip().lower()
    mult = {"k": 1_000, "m": 1_000_000}.get(t[-1], 1)
    return int(float(t[:-1] if t[-1] in "km" else t) * mult)


def label_of(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from crossrank.cli import main; main()", *args]


def ensure_dataset(folder: Path, n: int, n_queries: int) -> dict[str, Any]:
    """The shapes dataset of ``n`` images in ``folder`` (written when missing)."""
    meta = folder / "dataset.json"
    if not meta.is_file():
        print(f"writing the {label_of(n)} shapes dataset to {folder} ...", file=sys.stderr)
        subprocess.run(
            _cli(
                "dataset",
                "shapes",
                "--out",
                str(folder),
                "--n-images",
                str(n),
                "--n-queries",
                str(n_queries),
                "--seed",
                str(SEED),
                "--overwrite",
                "--json",
            ),
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return json.loads(meta.read_text())


def run_build(
    images: Path, index_dir: Path, codec: str, batch_size: int, workers: int, log: Path
) -> dict[str, Any]:
    """``crossrank build`` in a child process: its JSON report, wall time and peak RSS.

    A build killed before (this script interrupted) resumes: the same command keeps its chunks.
    """
    argv = _cli(
        "build",
        str(images),
        "--index",
        str(index_dir),
        "--patch-codec",
        codec,
        "--batch-size",
        str(batch_size),
        "--workers",
        str(workers),
        "--device",
        "cpu",
        "--overwrite",
        "--json",
    )
    out_path = log.with_suffix(".json")
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"build of {index_dir} failed (exit {proc.returncode}); see {log}")
    report = json.loads(out_path.read_text())
    return {
        "indexed": report["indexed"],
        "skipped": report["skipped"],
        "resumed": report.get("resumed", 0),
        "factory": report["factory"],
        "seconds": report["seconds"],
        "wall_seconds": round(wall, 1),
        "images_per_second": round(report["indexed"] / report["seconds"], 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
    }


def disk_usage(index_dir: Path) -> dict[str, Any]:
    """Bytes per image of the committed generation, by kind of file."""
    from crossrank.store import Generation

    gen = Generation.current(index_dir)
    n = len(gen.ids())
    kinds = {"patches": 0, "vectors": 0, "first_stage": 0, "metadata": 0, "other": 0}
    for path in gen.path.iterdir():
        size = path.stat().st_size
        name = path.name
        if name.startswith("patches-") or name.startswith("patch_codec"):
            kinds["patches"] += size
        elif name == "vectors.npy":
            kinds["vectors"] += size
        elif name == "first_stage.faiss":
            kinds["first_stage"] += size
        elif name.endswith(".parquet"):
            kinds["metadata"] += size
        else:
            kinds["other"] += size
    total = sum(kinds.values())
    return {
        "bytes_per_image": round(total / n, 1),
        "by_kind": {k: round(v / n, 1) for k, v in kinds.items()},
        "total_gb": round(total / 1e9, 3),
        "patch_codec": gen.info.patch_codec,
    }


# -- synthetic rows, through the build's own chunk writer -----------------------------------------


def synthetic_child(rows_from: Path, out: Path, n: int, codec: str, result: Path) -> None:
    """Child process: write an ``n``-image index of noisy copies of ``rows_from``'s rows."""
    import hashlib

    from crossrank.encoders import load_encoder
    from crossrank.indexes import IndexConfig
    from crossrank.ingest import ImageRecord, SourceItem
    from crossrank.store import Generation, WriterLock
    from crossrank.store.codecs import parse_codec
    from crossrank.write.streaming import BuildSpec, EncodedBatch, StreamingBuild

    t0 = time.perf_counter()
    encoder = load_encoder(None, device="cpu")  # held, as a build holds it
    gen = Generation.current(rows_from)
    base_vectors = np.asarray(gen.vectors(), dtype=np.float32)
    base_patches = gen.patches().gather(np.arange(len(base_vectors))).astype(np.float16)
    items = [SourceItem(Path(f"/synthetic/{i // 1000:04d}/{i:07d}.png")) for i in range(n)]
    batch_size = 64
    spec = BuildSpec(
        source="/synthetic",
        listing_sha256=hashlib.sha256(f"synthetic {n}".encode()).hexdigest(),
        n_items=n,
        encoder=dict(encoder.info),
        patch_codec=parse_codec(codec).spec if codec == "fp16" else _configured(codec, encoder),
        batch_size=batch_size,
        chunk_items=BuildSpec.chunk_items_for(batch_size),
    )
    rng = np.random.default_rng(SEED)
    with WriterLock(out, create=True) as lock:
        build = StreamingBuild.open(out, lock, spec, resume=None)
        for start in range(build.kept_items, n, batch_size):
            b = min(batch_size, n - start)
            pick = rng.integers(0, len(base_vectors), b)
            pooled = base_vectors[pick] + 0.05 * rng.standard_normal(
                (b, base_vectors.shape[1]), dtype=np.float32
            )
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            patches = base_patches[pick] + (
                0.02 * rng.standard_normal(base_patches[pick].shape, dtype=np.float32)
            ).astype(np.float16)
            records = [
                ImageRecord(
                    item=items[start + j],
                    width=64,
                    height=64,
                    bytes=4000,
                    mtime=0.0,
                    sha256=hashlib.sha256((start + j).to_bytes(8, "little")).hexdigest(),
                )
                for j in range(b)
            ]
            build.add(EncodedBatch(pooled, patches, records, [], b))
        build.commit(IndexConfig(device="cpu"), source_label="synthetic")
    result.write_text(json.dumps({"seconds": time.perf_counter() - t0, "indexed": n}))


def _configured(codec: str, encoder: Any) -> str:
    from crossrank.store.codecs import parse_codec

    c = parse_codec(codec)
    c.configure(encoder.n_patches, encoder.patch_dim)
    return c.spec


def run_synthetic(rows_from: Path, index_dir: Path, n: int, codec: str) -> dict[str, Any]:
    """:func:`synthetic_child` in a child process: wall time and peak RSS."""
    result = index_dir.with_name(index_dir.name + ".result.json")
    argv = [sys.executable, __file__, "--synthetic-child", str(rows_from), str(index_dir)]
    argv += [str(n), codec, str(result)]
    log = index_dir.with_name(index_dir.name + ".log")
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the synthetic build of {index_dir} failed; see {log}")
    done = json.loads(result.read_text())
    return {
        "indexed": n,
        "synthetic": True,
        "rows_from": str(rows_from),
        "seconds": round(done["seconds"], 1),
        "wall_seconds": round(wall, 1),
        "rows_per_second_writing_only": round(n / done["seconds"], 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


# -- the page cache ------------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_MADV_DONTNEED = 4


def drop_page_cache(index_dir: Path) -> int:
    """Evict ``index_dir``'s files from the page cache; returns the files advised.

    Pages this process maps are first dropped from its maps (``madvise(MADV_DONTNEED)``: a
    read-only file map refaults them from the file), since the kernel keeps mapped pages cached
    whatever ``posix_fadvise`` says.
    """
    root = str(index_dir.resolve())
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith(root):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    n = 0
    for path in index_dir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


# -- queries --------------------------------------------------------------------------------------


def _percentiles(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    out = {}
    for stage in STAGES:
        values = [r[stage] for r in rows if stage in r]
        if values:
            out[stage] = {
                "p50": round(float(np.percentile(values, 50)), 2),
                "p95": round(float(np.percentile(values, 95)), 2),
            }
    return out


@dataclass
class Target:
    """One index whose queries are timed: its folder, its dataset, whether R@1 means anything."""

    index_dir: Path
    data: Path
    quality: bool = True


def measure_queries(targets: list[Target], n_queries: int, n_cold: int) -> list[dict[str, Any]]:
    """Per-stage p50/p95 (warm and cold) and R@1, nDCG@10 at each rerank_k, for every target.

    With several targets the measurements interleave: query ``i`` runs on every index before
    query ``i + 1`` (the order rotating), so a machine that gets busier or quieter part-way slows
    every index alike and their differences stay the indexes'.
    """
    from contextlib import ExitStack

    from crossrank import Index
    from crossrank.evaluate.harness import read_queries
    from crossrank.evaluate.metrics import compute_metrics
    from crossrank.evaluate.trec import read_qrels

    queries = [read_queries(t.data / "queries.parquet")[:n_queries] for t in targets]
    nq = min(len(q) for q in queries)
    n_cold = min(n_cold, nq)
    qrels = []
    for t, qs in zip(targets, queries, strict=True):
        judged = read_qrels(t.data / "qrels.txt")
        qrels.append({q.qid: judged[q.qid] for q in qs[:nq] if q.qid in judged})
    outs: list[dict[str, Any]] = [{"queries": nq, "cold_queries": n_cold} for _ in targets]
    with ExitStack() as stack:
        indexes = [stack.enter_context(Index.open(t.index_dir, device="cpu")) for t in targets]
        stores = [(ix.stored, ix.stored.patches()) for ix in indexes]
        for out, ix in zip(outs, indexes, strict=True):
            out["first_stage"] = {
                "factory": ix.first_stage.factory,
                "nprobe": ix.first_stage.nprobe,
            }

        def one(j: int, text: str, rerank_k: int, cold: bool) -> tuple[dict[str, float], Any]:
            index, (gen, patches) = indexes[j], stores[j]
            if cold:
                drop_page_cache(targets[j].index_dir)
            result = index.search(text, k=K, rerank_k=rerank_k)
            timings = dict(result.timings_ms)
            hits = index.search(text, k=rerank_k, rerank_k=rerank_k, reranker="none")
            ids = np.array([h.id for h in hits])
            if cold:
                drop_page_cache(targets[j].index_dir)
            t0 = time.perf_counter()
            patches.gather(gen.rows_of_ids(ids))
            timings["gather"] = (time.perf_counter() - t0) * 1e3
            return timings, result

        order = list(range(len(targets)))
        for rerank_k in RERANK_KS:
            for i in range(nq):  # warm-up, unmeasured
                for j in order:
                    indexes[j].search(queries[j][i].text, k=K, rerank_k=rerank_k)
            warm: list[list[dict[str, float]]] = [[] for _ in targets]
            runs: list[dict[str, list[str]]] = [{} for _ in targets]
            for i in range(nq):
                for j in order[i % len(order) :] + order[: i % len(order)]:
                    q = queries[j][i]
                    timings, result = one(j, q.text, rerank_k, cold=False)
                    warm[j].append(timings)
                    runs[j][q.qid] = [_docid(h.path, targets[j].data) for h in result.hits]
            cold: list[list[dict[str, float]]] = [[] for _ in targets]
            for i in range(n_cold):
                for j in order[i % len(order) :] + order[: i % len(order)]:
                    cold[j].append(one(j, queries[j][i].text, rerank_k, cold=True)[0])
            for j, t in enumerate(targets):
                metrics: dict[str, Any] = {"R@1": None, "nDCG@10": None}
                if t.quality:
                    values = compute_metrics(runs[j], qrels[j], ["R@1", "nDCG@10"]).values
                    metrics = {name: round(values[name], 4) for name in metrics}
                outs[j][f"rerank_k={rerank_k}"] = {
                    "warm_ms": _percentiles(warm[j]),
                    "cold_ms": _percentiles(cold[j]),
                    **metrics,
                }
    return outs


def _docid(path: str, data: Path) -> str:
    p = Path(path)
    try:
        return p.relative_to(data).as_posix()
    except ValueError:
        return p.as_posix()


# -- main -----------------------------------------------------------------------------------------


def measure(n: int, codec: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    label = label_of(n)
    if args.synthetic:
        data = work / f"shapes-{label_of(args.queries_from)}"
        dataset = ensure_dataset(data, args.queries_from, args.n_queries)
        index_dir = work / f"synth-{label}-{codec.replace(':', '_')}"
    else:
        data = work / f"shapes-{label}"
        dataset = ensure_dataset(data, n, args.n_queries)
        index_dir = work / f"idx-{label}-{codec.replace(':', '_')}"
    built = index_dir.with_name(index_dir.name + ".build.json")
    if built.is_file():  # built by an earlier run of this script
        build = json.loads(built.read_text())
    elif args.synthetic:
        rows_from = args.rows_from or work / f"idx-{label_of(args.queries_from)}-fp16"
        print(f"writing {index_dir} (synthetic {label}, {codec}) ...", file=sys.stderr)
        build = run_synthetic(rows_from, index_dir, n, codec)
        built.write_text(json.dumps(build, indent=2))
    else:
        print(f"building {index_dir} ({label}, {codec}) ...", file=sys.stderr)
        build = run_build(
            data / "images",
            index_dir,
            codec,
            args.batch_size,
            args.workers,
            index_dir.with_name(index_dir.name + ".log"),
        )
        built.write_text(json.dumps(build, indent=2))
    print(f"querying {index_dir} ...", file=sys.stderr)
    return {
        "size": label,
        "n_images": n,
        "codec": codec,
        "synthetic": bool(args.synthetic),
        "dataset": str(data),
        "dataset_images": dataset.get("n_images", n),
        "build": build,
        "disk": disk_usage(index_dir),
        "index_dir": str(index_dir),
        "search": measure_queries(
            [Target(index_dir, data, quality=not args.synthetic)], args.queries, args.cold_queries
        )[0],
        "query_threads": args.threads or "default",
        "machine": machine(),
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'size':>5} {'codec':>6} {'img/s':>6} {'RSS MB':>7} {'B/img':>7} {'R':>5} "
        f"{'p50 warm':>9} {'p95 warm':>9} {'p50 cold':>9} {'rerank':>7} {'gather':>7} "
        f"{'first':>6} {'R@1':>6}"
    )
    for r in report["results"]:
        for rerank_k in RERANK_KS:
            s = r["search"][f"rerank_k={rerank_k}"]
            w, c = s["warm_ms"], s["cold_ms"]
            print(
                f"{r['size'] + ('*' if r.get('synthetic') else ''):>5} {r['codec']:>6} "
                f"{r['build'].get('images_per_second', float('nan')):>6.0f} "
                f"{r['build']['peak_rss_mb']:>7.0f} {r['disk']['bytes_per_image']:>7.0f} "
                f"{rerank_k:>5} {w['total']['p50']:>9.1f} {w['total']['p95']:>9.1f} "
                f"{c.get('total', {}).get('p50', float('nan')):>9.1f} "
                f"{w['rerank']['p50']:>7.1f} {w['gather']['p50']:>7.1f} "
                f"{w['first_stage']['p50']:>6.1f} "
                + (f"{s['R@1']:>6.3f}" if s["R@1"] is not None else f"{'-':>6}")
            )
    if any(r.get("synthetic") for r in report["results"]):
        print("* synthetic: noisy copies of a smaller index's rows (img/s: no encoding, not shown)")


def _order(r: dict[str, Any]) -> tuple[bool, int, str]:
    return (bool(r.get("synthetic")), r["n_images"], r["codec"])


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--synthetic-child":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        rows_from, out, n, codec, result = sys.argv[2:7]
        synthetic_child(Path(rows_from), Path(out), int(n), codec, Path(result))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sizes", nargs="+", default=["10k", "100k", "1m"])
    parser.add_argument("--codecs", nargs="+", default=["pq", "fp16"])
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/crossrank-bench-scale"),
        help="datasets and indexes (shapes-<size>/, idx-<size>-<codec>/) live here",
    )
    parser.add_argument("--n-queries", type=int, default=300, help="queries a dataset is made with")
    parser.add_argument("--queries", type=int, default=300, help="warm queries timed per rerank_k")
    parser.add_argument("--cold-queries", type=int, default=50, help="cold queries per rerank_k")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decoder threads of the build")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and FAISS threads of the queries (1: steadier on a busy machine; 0: default)",
    )
    parser.add_argument(
        "--synthetic",
        action="store_true",
        help="write each size from noisy copies of a smaller real index's rows (see above)",
    )
    parser.add_argument(
        "--rows-from", type=Path, default=None, help="the real index (default WORK/idx-10k-fp16)"
    )
    parser.add_argument(
        "--queries-from",
        type=parse_size,
        default=10_000,
        help="with --synthetic: the dataset whose queries are timed (default 10k)",
    )
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="time the queries of every index in --out again, interleaved (see measure_queries)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    add_out_option(parser, SCRIPT)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads > 0:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    out: Path | None = args.out
    previous: dict[str, Any] = {}
    if out is not None and out.is_file():
        previous = json.loads(out.read_text())
    results = {
        (r["size"], r["codec"], r.get("synthetic", False)): r for r in previous.get("results", [])
    }
    args.work.mkdir(parents=True, exist_ok=True)
    if args.remeasure:
        entries = sorted(results.values(), key=_order)
        targets = [
            Target(Path(r["index_dir"]), Path(r["dataset"]), quality=not r.get("synthetic"))
            for r in entries
        ]
        print(f"timing the queries of {len(targets)} indexes, interleaved ...", file=sys.stderr)
        measured = measure_queries(targets, args.queries, args.cold_queries)
        together = [f"{r['size']}{'*' if r.get('synthetic') else ''} {r['codec']}" for r in entries]
        for r, search in zip(entries, measured, strict=True):
            r["search"] = search
            r["query_threads"] = args.threads or "default"
            r["measured_together"] = together
            r["machine"] = machine()
        args.sizes = []
    for size in args.sizes:
        n = parse_size(size)
        for codec in args.codecs:
            key = (label_of(n), codec, bool(args.synthetic))
            if key in results:
                print(f"{key[0]} {codec}: measured already in {out}; skipped", file=sys.stderr)
                continue
            results[key] = measure(n, codec, args.work, args)
            report = {
                "script": SCRIPT,
                "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
                "goals_warm_p50_total_ms_at_1m_pq": {str(k): v for k, v in GOALS_MS.items()},
                "results": sorted(results.values(), key=_order),
            }
            write_report(out, report)
    report = {
        "script": SCRIPT,
        "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
        "goals_warm_p50_total_ms_at_1m_pq": {str(k): v for k, v in GOALS_MS.items()},
        "results": sorted(results.values(), key=_order),
    }
    if args.remeasure:
        write_report(out, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
