#!/usr/bin/env python
"""Why a reranker misses relation queries: each miss's top-1 image checked on its scene graph.

For every relation query of a shapes benchmark (``crossrank dataset shapes``), the script searches
the benchmark's index with the given reranker (k = rerank_k = 100, as ``crossrank eval`` does)
and sorts each R@1 miss by what the top image gets wrong:

- ``both objects, relation false``: the top image holds both named objects (colour, shape and, when
  the query names one, size), but not in the named relation: the comparison failed;
- ``an object missing: WHAT``: the top image lacks one of the named objects as described: finding
  or binding failed. WHAT says how the first such object is wrong: ``size`` (its colour and shape
  are there, in the other size), ``colour`` (its shape is there, only in other colours), ``shape``
  (its colour is there, only on other shapes), ``colour and shape apart`` (both are there, on
  different objects: a binding error) or ``absent`` (neither);
- ``no positive in top 100``: the first stage lost it.

It also prints where the first relevant image ranked. Run::

    python benchmarks/relation_misses.py --bench runs/bench11 --index runs/bench11-negs.idx \\
        --reranker auto
    python benchmarks/relation_misses.py --bench runs/bench --index runs/bench-negs.idx \\
        --reranker none --json
    python benchmarks/relation_misses.py --bench runs/bench11 --index runs/bench11-negs.idx \\
        --out benchmarks/results/relation_misses/relation_misses_bench11.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
from _report import add_out_option, write_report

from crossrank import Index
from crossrank.datasets import open_shapes, parse_query
from crossrank.datasets.language import satisfies


def _has(scene, obj) -> bool:
    return any(
        x.colour == obj.colour and x.shape == obj.shape and (obj.size is None or x.size == obj.size)
        for x in scene.objects
    )


def _how_missing(scene, obj) -> str:
    """How ``scene`` fails to hold ``obj``: see the module docstring."""
    if any(x.colour == obj.colour and x.shape == obj.shape for x in scene.objects):
        return "size"
    colour = any(x.colour == obj.colour for x in scene.objects)
    shape = any(x.shape == obj.shape for x in scene.objects)
    return {
        (False, True): "colour",
        (True, False): "shape",
        (True, True): "colour and shape apart",
    }.get((colour, shape), "absent")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bench", required=True, help="a shapes benchmark folder (crossrank dataset shapes --out)"
    )
    parser.add_argument("--index", required=True, help="an index built over its images")
    parser.add_argument(
        "--reranker", default="auto", help="auto, none, maxsim or a reranker folder"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the line")
    add_out_option(parser, "relation_misses")
    args = parser.parse_args()

    dataset = open_shapes(args.bench)
    paths = pq.read_table(dataset.metadata_path, columns=["path"]).column("path").to_pylist()
    scenes = dataset.scenes() if callable(dataset.scenes) else dataset.scenes
    scene_of = {
        os.path.abspath(os.path.join(args.bench, p)): s for p, s in zip(paths, scenes, strict=True)
    }
    index = Index.open(args.index, device="cpu")
    counts: Counter[str] = Counter()
    for row in pq.read_table(dataset.queries_path).to_pylist():
        if row["kind"] != "relation":
            continue
        spec = parse_query(row["text"])
        hits = index.search(row["text"], k=100, rerank_k=100, reranker=args.reranker)
        top = scene_of[hits[0].path]
        rank = next((i for i, h in enumerate(hits) if satisfies(scene_of[h.path], spec)), None)
        counts["queries"] += 1
        if satisfies(top, spec):
            counts["right"] += 1
            continue
        if rank is None:
            counts["no positive in top 100"] += 1
            continue
        if _has(top, spec.a) and _has(top, spec.b):
            counts["both objects, relation false"] += 1
        else:
            missing = spec.a if not _has(top, spec.a) else spec.b
            counts["an object missing: " + _how_missing(top, missing)] += 1
        counts["first positive at rank " + ("2" if rank == 1 else "3-5" if rank < 5 else "6+")] += 1
    result = {"bench": args.bench, "reranker": args.reranker, **counts}
    write_report(args.out, result)
    print(json.dumps(result) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
