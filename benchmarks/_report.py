"""Where a benchmark's results go: ``benchmarks/results/<script>/``, written by ``--out``.

Every benchmark builds one JSON report (what ``--json`` prints). ``--out FILE`` also writes it to
FILE; ``--out`` alone writes it to ``benchmarks/results/<script>/<script>.json``, the folder
``benchmarks/README.md`` links.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def default_out(script: str) -> Path:
    """``benchmarks/results/<script>/<script>.json`` (absolute, whatever the working directory)."""
    return RESULTS / script / f"{script}.json"


def add_out_option(parser: argparse.ArgumentParser, script: str) -> None:
    """``--out [FILE]``: also write the JSON report to FILE (default :func:`default_out`)."""
    parser.add_argument(
        "--out",
        nargs="?",
        type=Path,
        const=default_out(script),
        default=None,
        metavar="FILE",
        help=f"also write the JSON report to FILE (FILE left out: benchmarks/results/{script}/"
        f"{script}.json)",
    )


def write_report(path: Path | None, report: dict[str, Any]) -> None:
    """Write ``report`` as indented JSON to ``path`` (its folder made); nothing when None."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)
