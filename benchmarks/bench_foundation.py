#!/usr/bin/env python
"""Foundation benchmark: three costs of crossrank, each as a ratio to the floor it sits on.

1. Search overhead. ``Index.search_vectors`` (reranking off: the same filter, first-stage,
   metadata-join and Hit-building code that ``Index.search`` runs after encoding the query)
   against a raw ``faiss`` search of the very same FAISS index object (the flat index that
   ``index.first_stage`` searches), same query vector, same k, one query at a time.
   Goal: <= 1.10x the raw latency.
2. Build throughput. ``crossrank.write.build.build_index`` on a folder of PNGs (decode, preprocess,
   encode, patch store, FAISS, metadata, commit) against ``encoder.encode_pixels`` on the same
   images decoded and preprocessed beforehand, same batch size, same CPU. The model is loaded once
   and handed to both, so neither pays for loading it. Goal: >= 0.9x the encoder's images/s.
3. Patch-store gather. ``PatchStore.gather`` of k random rows (page cache warm) against
   ``np.copyto`` of the same number of contiguous bytes from the same memory map. Goal: >= 0.5x
   the copy's GB/s.

Search and gather run on one synthetic index, written straight through the store and indexes
APIs (random unit vectors, random fp16 patches, synthetic metadata): no image is encoded for it.

The machine may be busy, so the compared measurements are interleaved (A B B A A B ...: each
round runs both, alternating which goes first) and every ratio is the median of the per-round
ratios; absolute numbers are medians too. Run::

    python benchmarks/bench_foundation.py            # full sizes, a few minutes, ~5 GB of disk
    python benchmarks/bench_foundation.py --quick    # small sizes: a smoke test, not a measurement
    python benchmarks/bench_foundation.py --json     # one JSON object instead of the table
    python benchmarks/bench_foundation.py --out  # also writes results/bench_foundation/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
from _report import add_out_option, write_report

from crossrank.training.encoder import DEMO_SPEC

# Everything here is offline: the encoder is made from scratch, never fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is."""

    n_vectors: int  # images in the synthetic index (FAISS vectors, patch rows, metadata rows)
    dim: int  # pooled vector dim D
    n_patches: int  # patches per image P
    patch_dim: int  # patch feature dim d
    patch_shard_bytes: int  # patch shard payload, bytes (the store's default is 1 GiB)
    search_k: int  # hits per search
    search_rounds: int  # interleaved search pairs
    gather_k: int  # rows per gather
    gather_rounds: int  # interleaved gather / copy pairs
    build_images: int  # PNGs in the build folder
    image_size: int  # their side, px
    build_batch: int  # images per encoder forward pass
    build_workers: int  # decoder threads of the build
    build_rounds: int  # interleaved build / encode pairs
    clip: dict[str, int] = field(default_factory=dict)  # ClipSpec fields of the encoder


FULL = Sizes(
    n_vectors=100_000,
    dim=512,
    n_patches=49,
    patch_dim=512,
    patch_shard_bytes=1 << 30,
    search_k=10,
    search_rounds=300,
    gather_k=100,
    gather_rounds=300,
    build_images=400,
    image_size=64,
    build_batch=64,
    build_workers=4,
    build_rounds=7,
    clip=asdict(DEMO_SPEC),  # the demo model's architecture
)
QUICK = Sizes(
    n_vectors=2_000,
    dim=512,
    n_patches=49,
    patch_dim=512,
    patch_shard_bytes=16 << 20,
    search_k=10,
    search_rounds=20,
    gather_k=100,
    gather_rounds=20,
    build_images=24,
    image_size=64,
    build_batch=8,
    build_workers=2,
    build_rounds=2,
    clip=dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2),
)

TOKENIZER_WORDS = [
    "a red circle left of a blue square",
    "a green triangle above a yellow star",
    "a small purple square right of a large orange circle",
    "cyan grey white",
]


@dataclass
class Row:
    """One line of the result table."""

    measurement: str
    value: float
    baseline: float
    unit: str  # of value and baseline
    baseline_name: str
    ratio: float  # median of the per-round value / baseline ratios
    ratio_iqr: tuple[float, float]  # 25th and 75th percentiles of the per-round ratios
    goal: str  # "<= 1.10" or ">= 0.9"
    met: bool
    rounds: int
    details: dict[str, Any] = field(default_factory=dict)


# -- measuring ----------------------------------------------------------------------------------


def interleaved(fns: list[Callable[[int], Any]], rounds: int, warmup: int = 1) -> list[list[float]]:
    """Seconds per call of each ``fn(r)``, all run once per round, rotating which goes first.

    Each round ``r`` runs every callable once on the same input (they take the round number), so
    a slow spell of the machine hits all sides of a round; ``warmup`` unrecorded rounds run first.

    Returns:
        One list of ``rounds`` timings per callable, in the order of ``fns``.
    """
    times: list[list[float]] = [[] for _ in fns]
    for r in range(-warmup, rounds):
        shift = r % len(fns)
        for i in [*range(shift, len(fns)), *range(shift)]:
            t0 = time.perf_counter()
            fns[i](r)
            dt = time.perf_counter() - t0
            if r >= 0:
                times[i].append(dt)
    return times


def quantiles(x: list[float]) -> tuple[float, float]:
    """25th and 75th percentiles."""
    if len(x) < 2:
        return (x[0], x[0])
    q = statistics.quantiles(x, n=4, method="inclusive")
    return (q[0], q[2])


def median_ratio(num: list[float], den: list[float]) -> tuple[float, tuple[float, float]]:
    ratios = [n / d for n, d in zip(num, den, strict=True)]
    return statistics.median(ratios), quantiles(ratios)


# -- the synthetic index ------------------------------------------------------------------------


def write_synthetic_index(root: Path, sizes: Sizes, seed: int = 0) -> Path:
    """Commit one generation of random unit vectors, random fp16 patches and metadata.

    The same path a build takes after encoding (GenerationWriter + FirstStage.build), minus the
    encoder: the manifest records a made-up model, which only a text or image query would load.
    """
    import pyarrow as pa

    from crossrank.indexes import FirstStage, IndexConfig
    from crossrank.store import GenerationWriter, StoreConfig

    rng = np.random.default_rng(seed)
    n, D, P, d = sizes.n_vectors, sizes.dim, sizes.n_patches, sizes.patch_dim
    xb = rng.standard_normal((n, D), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    # Gather speed does not depend on the values: one random block, written over and over.
    block_rows = min(n, 1024)
    block = rng.standard_normal((block_rows, P, d), dtype=np.float32) / np.sqrt(d)
    block = block.astype(np.float16)  # (block_rows, P, d)
    t0 = np.datetime64("2024-01-01T00:00:00", "us")
    metadata = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "path": pa.array(
                [f"/photos/{i // 1000:03d}/img_{i:06d}.jpg" for i in ids], pa.string()
            ),
            "sha256": pa.array([f"{i:064x}" for i in ids], pa.string()),
            "width": pa.array(rng.integers(64, 4096, n), pa.int32()),
            "height": pa.array(rng.integers(64, 4096, n), pa.int32()),
            "bytes": pa.array(rng.integers(10_000, 5_000_000, n), pa.int64()),
            "mtime": pa.array(
                t0 + rng.integers(0, 10**13, n).astype("timedelta64[us]"),
                pa.timestamp("us", tz="UTC"),
            ),
            "label": pa.array(rng.choice(["cat", "dog", "bird", "car"], n), pa.string()),
        }
    )
    first_stage = FirstStage.build(xb, ids, IndexConfig(factory="Flat", device="cpu"))
    config = StoreConfig(patch_shard_bytes=sizes.patch_shard_bytes)
    with GenerationWriter(root, config=config) as writer:
        for start in range(0, n, block_rows):
            writer.patches.append(block[: min(block_rows, n - start)])
        writer.write_vectors(xb)
        writer.write_ids(ids)
        writer.write_metadata(metadata)
        writer.write_skipped(
            pa.table({"path": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
        )
        first_stage.save(writer.first_stage_path)
        writer.commit(
            encoder={
                "model_id": "synthetic-benchmark-vectors",
                "dim": D,
                "patch_dim": d,
                "n_patches": P,
            },
            first_stage={**first_stage.info, "metric": "inner_product"},
        )
    return root


# -- 1. search vs raw faiss ---------------------------------------------------------------------


def bench_search(index: Any, sizes: Sizes, seed: int = 1) -> Row:
    """``Index.search_vectors`` (one query, reranking off) vs raw faiss on the same index."""
    rng = np.random.default_rng(seed)
    k = sizes.search_k
    n_queries = max(sizes.search_rounds + 1, 2)
    xq = rng.standard_normal((n_queries, sizes.dim), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    queries = [np.ascontiguousarray(xq[i : i + 1]) for i in range(n_queries)]  # (1, D) each
    # The baseline is the FAISS index that index.first_stage searches: the flat index inside the
    # IndexIDMap of first_stage.faiss (FirstStage maps positions to ids itself, on the host).
    # The IndexIDMap's own search is timed too, for reference: it maps ids in an OpenMP loop, which
    # costs milliseconds on a busy machine.
    base = index.first_stage._base
    id_map = index.first_stage._index

    stage_ms: dict[str, list[float]] = {}

    def ours(r: int) -> None:
        result = index.search_vectors(queries[r % n_queries], k=k)[0]
        for stage, ms in result.timings_ms.items():
            stage_ms.setdefault(stage, []).append(ms)

    def raw(r: int) -> None:
        base.search(queries[r % n_queries], k)

    def raw_id_map(r: int) -> None:
        id_map.search(queries[r % n_queries], k)

    # All sides must find the same thing, or the comparison means nothing.
    got = [h.id for h in index.search_vectors(queries[0], k=k)[0]]
    _, P = base.search(queries[0], k)
    _, I = id_map.search(queries[0], k)
    if not (got == index.first_stage._id_map[P[0]].tolist() == I[0].tolist()):
        raise RuntimeError(f"search_vectors and raw faiss disagree: {got} vs {I[0].tolist()}")

    t_ours, t_raw, t_id_map = interleaved([ours, raw, raw_id_map], sizes.search_rounds)
    ratio, iqr = median_ratio(t_ours, t_raw)
    ms_ours, ms_raw = 1e3 * statistics.median(t_ours), 1e3 * statistics.median(t_raw)
    return Row(
        measurement=f"search k={k} batch 1, rerank off ({sizes.n_vectors:,} x {sizes.dim} Flat)",
        value=ms_ours,
        baseline=ms_raw,
        unit="ms/query",
        baseline_name=f"faiss {type(base).__name__}",
        ratio=ratio,
        ratio_iqr=iqr,
        goal="<= 1.10",
        met=ratio <= 1.10,
        rounds=len(t_ours),
        details={
            "overhead_ms": ms_ours - ms_raw,
            "raw_id_map_ms": 1e3 * statistics.median(t_id_map),
            "ratio_to_id_map": median_ratio(t_ours, t_id_map)[0],
            "stage_ms_median": {s: statistics.median(v) for s, v in stage_ms.items()},
            "faiss_omp_threads": _faiss_threads(),
        },
    )


# -- 2. build vs encoder only -------------------------------------------------------------------


def bench_build(work: Path, sizes: Sizes) -> Row:
    """``build_index`` on a PNG folder vs ``encode_pixels`` on the same pre-decoded images."""
    import crossrank.encoders
    from crossrank.datasets import generate_shapes
    from crossrank.encoders import load_encoder
    from crossrank.encoders.factory import ClipSpec, make_clip
    from crossrank.ingest import decode_image, discover
    from crossrank.write.build import build_index

    n, batch = sizes.build_images, sizes.build_batch
    generate_shapes(
        work / "shapes", n_images=n, n_queries=0, image_size=sizes.image_size, seed=0, workers=1
    )
    folder = work / "shapes" / "images"
    model_dir = make_clip(work / "clip", TOKENIZER_WORDS, ClipSpec(**sizes.clip), seed=0)

    # Model loading is excluded from both sides: load it once (timed, for the record) and hand
    # that encoder to build_index, which looks `load_encoder` up when it is called.
    load_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        encoder = load_encoder(model_dir, device="cpu", batch_size=batch)
        load_s.append(time.perf_counter() - t0)

    # The encoder-only side starts from decoded, preprocessed pixels: (n, 3, H, W) float32.
    paths = [item.path for item in discover(folder).items]
    pixels = encoder.preprocess([decode_image(p)[0] for p in paths])
    if len(paths) != n:
        raise RuntimeError(f"expected {n} images in {folder}, found {len(paths)}")

    handed_out = []

    def preloaded(model: Any = None, device: str = "auto", batch_size: int = 64, **_: Any) -> Any:
        if batch_size != encoder.batch_size or str(device) != "cpu":
            raise RuntimeError("build_index asked for another encoder than the preloaded one")
        handed_out.append(model)
        return encoder

    reports = []

    def build(r: int) -> None:
        out = work / f"built-{r + 1}.idx"  # round -1 is the warm-up
        reports.append(
            build_index(
                folder,
                out,
                model=model_dir,
                batch_size=batch,
                device="cpu",
                workers=sizes.build_workers,
            )
        )

    def encode(r: int) -> None:
        encoder.encode_pixels(pixels)

    def decode(r: int) -> None:  # for the record: the CPU work a build adds to encoding
        encoder.preprocess([decode_image(p)[0] for p in paths])

    original = crossrank.encoders.load_encoder
    crossrank.encoders.load_encoder = preloaded
    try:
        t_build, t_encode, t_decode = interleaved([build, encode, decode], sizes.build_rounds)
    finally:
        crossrank.encoders.load_encoder = original
        for r in range(-1, sizes.build_rounds):
            shutil.rmtree(work / f"built-{r + 1}.idx", ignore_errors=True)
    if len(handed_out) != len(reports):  # build_index found load_encoder some other way
        raise RuntimeError(
            "build_index did not take the preloaded encoder: model loading would "
            "be timed; update how bench_build hands it over"
        )
    if any(rep.indexed != n for rep in reports):
        raise RuntimeError(f"a build indexed {[rep.indexed for rep in reports]} of {n} images")

    # images/s is n / seconds, so the throughput ratio is the inverse time ratio.
    ratio, (q1, q3) = median_ratio(t_encode, t_build)
    return Row(
        measurement=(
            f"build {n} PNGs {sizes.image_size}px, batch {batch}, cpu (model load excluded)"
        ),
        value=n / statistics.median(t_build),
        baseline=n / statistics.median(t_encode),
        unit="images/s",
        baseline_name="encode_pixels",
        ratio=ratio,
        ratio_iqr=(q1, q3),
        goal=">= 0.90",
        met=ratio >= 0.90,
        rounds=len(t_build),
        details={
            "model_load_s_median": statistics.median(load_s),
            "build_s_median": statistics.median(t_build),
            "encode_s_median": statistics.median(t_encode),
            "decode_preprocess_s_median": statistics.median(t_decode),
            "workers": sizes.build_workers,
            "torch_threads": _torch_threads(),
            "clip_spec": sizes.clip,
        },
    )


# -- 3. gather vs memcpy ------------------------------------------------------------------------


def bench_gather(index: Any, sizes: Sizes, seed: int = 2) -> Row:
    """``PatchStore.gather`` of random rows vs ``np.copyto`` of as many contiguous bytes."""
    from crossrank.store import read_generation_info

    store = index.patches
    n, k = len(store), sizes.gather_k
    if n < 2 * k:
        raise RuntimeError(f"the patch store has {n} rows; the gather benchmark needs >= {2 * k}")
    # Warm the page cache and this process's page tables for every row, once, untimed.
    for start in range(0, n, 1024):
        store.gather(np.arange(start, min(start + 1024, n)))
    rng = np.random.default_rng(seed)
    n_inputs = sizes.gather_rounds + 1
    rows = [rng.choice(n, size=k, replace=False) for _ in range(n_inputs)]
    # The copy reads k consecutive rows of the same shard files, from a random place, into a
    # buffer allocated once: the same bytes, from the same warm pages, with no gathering at all.
    shards = [
        np.load(index.generation_dir / part.file, mmap_mode="r")
        for part in read_generation_info(index.generation_dir).patch_shards
        if part.rows >= k
    ]
    blocks = []
    for _ in range(n_inputs):
        shard = shards[int(rng.integers(len(shards)))]
        start = int(rng.integers(0, shard.shape[0] - k + 1))
        blocks.append(shard[start : start + k])  # (k, P, d) view of the map, contiguous
    dst = np.empty((k, *store.shape), dtype=np.float16)  # (k, P, d)
    nbytes = dst.nbytes

    def gather(r: int) -> None:
        store.gather(rows[r % n_inputs])

    def copy(r: int) -> None:
        np.copyto(dst, blocks[r % n_inputs])

    t_gather, t_copy = interleaved([gather, copy], sizes.gather_rounds)
    ratio, iqr = median_ratio(t_copy, t_gather)  # GB/s ratio = inverse time ratio
    P, d = store.shape
    return Row(
        measurement=f"patch gather k={k} random rows, P={P} d={d} fp16, warm cache",
        value=nbytes / statistics.median(t_gather) / 1e9,
        baseline=nbytes / statistics.median(t_copy) / 1e9,
        unit="GB/s",
        baseline_name="np.copyto",
        ratio=ratio,
        ratio_iqr=iqr,
        goal=">= 0.50",
        met=ratio >= 0.50,
        rounds=len(t_gather),
        details={
            "bytes_per_call": nbytes,
            "store_rows": n,
            "store_gib": n * P * d * 2 / 2**30,
            "shards": store.n_shards,
            "gather_ms_median": 1e3 * statistics.median(t_gather),
            "copy_ms_median": 1e3 * statistics.median(t_copy),
        },
    )


# -- reporting ----------------------------------------------------------------------------------


def _faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def machine() -> dict[str, Any]:
    import faiss
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": load,
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "torch": torch.__version__,
    }


def _fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def render_table(rows: list[Row], sizes_name: str, info: dict[str, Any]) -> str:
    header = ("measurement", "value", "baseline", "ratio", "goal", "met?")
    lines = [
        (
            r.measurement,
            f"{_fmt(r.value)} {r.unit}",
            f"{_fmt(r.baseline)} {r.unit} ({r.baseline_name})",
            f"{r.ratio:.3f}",
            r.goal,
            "yes" if r.met else "NO",
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [
        f"crossrank foundation benchmark ({sizes_name}); ratios are medians of "
        f"interleaved per-round ratios"
    ]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.append("")
    search, build, gather = rows
    sd, bd, gd = search.details, build.details, gather.details
    out.append(
        f"search:  {search.rounds} rounds, ratio IQR {_iqr(search)}; median difference "
        f"{sd['overhead_ms']:.3f} ms/query; Index stages (median ms): "
        + ", ".join(f"{stage} {ms:.3f}" for stage, ms in sd["stage_ms_median"].items())
        + f"; faiss OpenMP threads {sd['faiss_omp_threads']}; the IndexIDMap around the flat index "
        f"takes {sd['raw_id_map_ms']:.3f} ms (ratio to it {sd['ratio_to_id_map']:.3f})"
    )
    out.append(
        f"build:   {build.rounds} rounds, ratio IQR {_iqr(build)}; "
        f"build {bd['build_s_median']:.2f} s vs encode {bd['encode_s_median']:.2f} s "
        f"(decode + preprocess alone, one thread: {bd['decode_preprocess_s_median']:.2f} s); "
        f"model load ({bd['model_load_s_median']:.2f} s) "
        f"excluded from both: one loaded encoder is handed to build_index; "
        f"{bd['workers']} decode threads, torch threads {bd['torch_threads']}"
    )
    out.append(
        f"gather:  {gather.rounds} rounds, ratio IQR {_iqr(gather)}; "
        f"{gd['bytes_per_call'] / 1e6:.2f} MB per call from a {gd['store_gib']:.2f} GiB store in "
        f"{gd['shards']} shard(s); gather {gd['gather_ms_median']:.3f} ms vs copy "
        f"{gd['copy_ms_median']:.3f} ms"
    )
    out.append(
        f"machine: {info['cpus']} CPUs, load average {_load(info['load_average'])} at the end; "
        f"python {info['python']}, numpy {info['numpy']}, faiss {info['faiss']}, "
        f"torch {info['torch']}"
    )
    return "\n".join(out)


def _quiet() -> None:
    """Keep transformers' advice and progress bars off the benchmark's output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import logging

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("crossrank").setLevel(logging.ERROR)


def _iqr(row: Row) -> str:
    return f"{row.ratio_iqr[0]:.3f}-{row.ratio_iqr[1]:.3f}"


def _load(load: Any) -> str:
    return "n/a" if load is None else " ".join(f"{x:.2f}" for x in load)


@contextlib.contextmanager
def workdir(parent: str | None, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="crossrank-bench-", dir=parent))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--json", action="store_true", help="print one JSON object, not a table")
    parser.add_argument(
        "--workdir",
        default=None,
        help="where to write the index and images (default: the system temp dir)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--only",
        choices=["search", "build", "gather"],
        action="append",
        help="run only these measurements (repeatable); default all three",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads and faiss OpenMP threads (default: each "
        "library's own, one per core); 1 is steadier on a busy machine",
    )
    add_out_option(parser, "bench_foundation")
    args = parser.parse_args(argv)
    _quiet()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        import faiss
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)

    from crossrank import Index

    sizes = QUICK if args.quick else FULL
    wanted = args.only or ["search", "build", "gather"]
    rows: list[Row] = []
    t0 = time.perf_counter()
    with workdir(args.workdir, args.keep) as work:
        if {"search", "gather"} & set(wanted):
            index = Index.open(write_synthetic_index(work / "synthetic.idx", sizes), device="cpu")
            if "search" in wanted:
                rows.append(bench_search(index, sizes))
        if "build" in wanted:
            rows.append(bench_build(work, sizes))
        if "gather" in wanted:
            rows.append(bench_gather(index, sizes))
    info = machine()
    seconds = time.perf_counter() - t0
    name = "quick" if args.quick else "full"
    report = {
        "sizes": name,
        "config": asdict(sizes),
        "seconds": round(seconds, 1),
        "machine": info,
        "results": [asdict(r) for r in rows],
    }
    write_report(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
    elif len(rows) == 3:
        print(render_table(rows, name, info))
    else:
        for r in rows:
            verdict = "met" if r.met else "NOT met"
            print(
                f"{r.measurement}: {_fmt(r.value)} vs {_fmt(r.baseline)} {r.unit} "
                f"({r.baseline_name}); ratio {r.ratio:.3f} (goal {r.goal}: {verdict})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
