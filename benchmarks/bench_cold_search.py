#!/usr/bin/env python
"""What a cold text search costs against a bare ``python -c "import torch"``.

Every measurement is a fresh Python process, timed from start to exit by this script (wall clock),
so it includes the interpreter's start, every import, the model load and the query:

- ``python``: ``python -c pass``, the interpreter alone (for scale).
- ``torch``: ``python -c "import torch"``, the floor; every ratio is to it.
- ``light query``: import crossrank, ``load_text_encoder("crossrank-demo")`` (CLIP's text tower in
  plain torch, ``crossrank/encoders/text_tower.py``), encode one query.
- ``full query``: the same through ``load_encoder`` (transformers' ``CLIPModel``).
- ``cli search``: ``crossrank search IDX "a red circle" --json`` on a tiny demo index this script
  builds in a temporary folder (16 images), the whole command as a user runs it.

Each round runs every case once, in rotating order, after one warm-up round that is not counted
(it fills the page cache and the bytecode cache, as any earlier run would: the children run
without ``PYTHONDONTWRITEBYTECODE``); every figure is a median over the rounds,
and each ratio is the median of the per-round ratios to ``torch``, so a busy machine slows both
sides alike. The goal is a cold search at most 1.4x ``torch``. The light and full query processes
also report whether transformers was imported; the light one must not have imported it. Run::

    python benchmarks/bench_cold_search.py                # 5 rounds
    python benchmarks/bench_cold_search.py --rounds 9
    python benchmarks/bench_cold_search.py --quick --json  # a smoke test, not a measurement
    python benchmarks/bench_cold_search.py --out  # also writes results/bench_cold_search/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: _report
from _report import add_out_option, write_report

GOAL = 1.4  # a cold search costs at most this many times `python -c "import torch"`
QUERY = "a red circle left of a blue square"

# What the query processes run; they print one JSON line saying whether transformers came in.
_QUERY_CODE = """\
import json, sys
from crossrank.encoders import {loader}
enc = {loader}("crossrank-demo", device="cpu")
feats = enc.encode_text([{query!r}])
assert feats.pooled.shape == (1, enc.dim)
print(json.dumps({{"transformers": "transformers" in sys.modules,
                  "light": bool(getattr(enc, "light", False))}}))
"""


def _crossrank_command() -> list[str]:
    """The ``crossrank`` console script beside this interpreter, as a user runs it."""
    script = Path(sys.executable).with_name("crossrank")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "import sys; from crossrank.cli import main; sys.exit(main())"]


def _write_images(folder: Path, n: int) -> None:
    """``n`` small PNGs of coloured blocks (what they show does not matter here)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(np.kron(blocks, np.ones((16, 16, 1), dtype=np.uint8))).save(
            folder / f"img_{i:03d}.png"
        )


def _build_index(workdir: Path, n_images: int) -> Path:
    source, index = workdir / "images", workdir / "demo.idx"
    _write_images(source, n_images)
    proc = subprocess.run(
        [*_crossrank_command(), "build", str(source), "--index", str(index), "--device", "cpu"],
        capture_output=True,
        text=True,
        check=False,
        env=_user_env(),
    )
    if proc.returncode != 0:
        raise SystemExit(f"building the demo index failed:\n{proc.stdout}\n{proc.stderr}")
    return index


def _cases(index: Path) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "python": [py, "-c", "pass"],
        "torch": [py, "-c", "import torch"],
        "light query": [py, "-c", _QUERY_CODE.format(loader="load_text_encoder", query=QUERY)],
        "full query": [py, "-c", _QUERY_CODE.format(loader="load_encoder", query=QUERY)],
        "cli search": [*_crossrank_command(), "search", str(index), QUERY, "--json"],
    }


def _describe(name: str, command: list[str]) -> str:
    """The command, with the query scripts (several lines) told in words."""
    if name in ("light query", "full query"):
        loader = "load_text_encoder" if name == "light query" else "load_encoder"
        return f"python -c: import crossrank; {loader}('crossrank-demo'); encode_text([query])"
    return " ".join(command)


def _user_env() -> dict[str, str]:
    """The environment as a user's shell has it: Python writes and reads its bytecode cache.

    ``PYTHONDONTWRITEBYTECODE`` (set on some CI and sandbox machines) would make every run
    compile crossrank's sources again (an editable install has no ``.pyc`` until first run),
    while torch's were compiled by pip at install: the comparison would not be like for like.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _run(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=_user_env())
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... failed:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def measure(index: Path, rounds: int, warmup: bool) -> dict[str, Any]:
    """Run every case ``rounds`` times, interleaved; medians, ratios to ``torch``, imports."""
    cases = _cases(index)
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    imports: dict[str, Any] = {}
    for r in range(-1 if warmup else 0, rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:  # rotating order
            seconds, out = _run(cases[name])
            if name in ("light query", "full query"):
                imports[name] = json.loads(out.strip().splitlines()[-1])
            if r >= 0:
                times[name].append(seconds)
    results = []
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times["torch"], strict=True)]
        results.append(
            {
                "case": name,
                "command": _describe(name, cases[name]),
                "median_s": statistics.median(times[name]),
                "min_s": min(times[name]),
                "max_s": max(times[name]),
                "ratio_to_torch": statistics.median(ratios),
            }
        )
    return {"results": results, "imports": imports}


def _meta(rounds: int, n_images: int) -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "rounds": rounds,
        "index_images": n_images,
        "query": QUERY,
    }


def _table(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        f"cold start, medians of {meta['rounds']} round(s) (torch {meta['torch']}, "
        f"{meta['cores']} cores)",
        f"{'case':<12} {'median s':>9} {'min s':>7} {'max s':>7} {'x torch':>8}  goal     met?",
    ]
    for row in report["results"]:
        goal = met = ""
        if row["case"] in ("light query", "cli search"):
            goal = f"<= {GOAL}"
            met = "yes" if row["ratio_to_torch"] <= GOAL else "NO"
        lines.append(
            f"{row['case']:<12} {row['median_s']:>9.3f} {row['min_s']:>7.3f} {row['max_s']:>7.3f} "
            f"{row['ratio_to_torch']:>8.2f}  {goal:<8} {met}".rstrip()
        )
    imports = report["imports"]
    lines.append(
        "transformers imported: "
        + ", ".join(f"{k}: {'yes' if v['transformers'] else 'no'}" for k, v in imports.items())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument(
        "--quick", action="store_true", help="1 round, no warm-up, 4 images: a smoke test"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to build the temporary index"
    )
    add_out_option(parser, "bench_cold_search")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rounds = 1 if args.quick else args.rounds
    n_images = 4 if args.quick else 16
    workdir = Path(tempfile.mkdtemp(prefix="bench_cold_search_", dir=args.workdir))
    try:
        index = _build_index(workdir, n_images)
        measured = measure(index, rounds, warmup=not args.quick)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "meta": _meta(rounds, n_images),
        "goal_ratio_to_torch": GOAL,
        **measured,
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    light = report["imports"].get("light query", {})
    if light.get("transformers") or not light.get("light"):
        print("the light query path imported transformers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
