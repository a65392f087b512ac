"""A text search from the command line imports only what it uses (its cold start).

``benchmarks/bench_cold_search.py`` measures the time; this checks the imports it depends on in a
fresh interpreter: no DuckDB without a ``--where``, no ``pyarrow.compute``, no PIL for a text, no
writer and no checksum verifier.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_CODE = """\
import contextlib, io, json, sys
from crossrank.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main()
    except SystemExit as e:
        assert not e.code, e.code
print(json.dumps({"hits": len(json.loads(out.getvalue())["hits"]),
                  "modules": sorted(m for m in sys.modules if m.partition(".")[0] in
                                    ("duckdb", "pyarrow", "PIL", "crossrank", "transformers"))}))
"""

NOT_ON_A_TEXT_SEARCH = (
    "duckdb",
    "pyarrow.compute",
    "PIL",
    "transformers",
    "crossrank.write",
    "crossrank.ingest",
    "crossrank.api.verify",
)


def _search(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _CODE, "search", *args, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_text_search_imports_no_sql_engine_writer_or_image_library(built_index: Path) -> None:
    got = _search(str(built_index), "a photo", "-k", "3")
    assert got["hits"] == 3
    modules = set(got["modules"])
    imported = sorted(m for m in NOT_ON_A_TEXT_SEARCH if m in modules)
    assert not imported, f"a text search imported {imported}"


def test_a_where_still_runs_through_duckdb(built_index: Path) -> None:
    got = _search(str(built_index), "a photo", "-k", "2", "--where", "width > 0")
    assert got["hits"] == 2
    assert "duckdb" in got["modules"]
