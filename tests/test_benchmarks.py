"""Smoke test of the benchmark scripts: they run end to end at small sizes and report every figure.

Marked ``bench`` (excluded from the default run; ``pytest -m bench`` runs it). It checks that the
script works, never how fast anything is: speed is measured by the benchmarks themselves. The
research probes (``research/``) are only checked to start (``--help``): they train for minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from crossrank.cli import app
from crossrank.datasets.language import ObjectSpec

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(
    str(p.relative_to(ROOT))
    for p in [*BENCHMARKS.glob("*.py"), *BENCHMARKS.glob("gpu/*.py"), *ROOT.glob("research/*.py")]
    if not p.name.startswith("_")
)


def _load(path: Path, name: str):
    """Imports a script as a module (its ``if __name__ == "__main__"`` part does not run)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_out_option_defaults_to_the_scripts_results_folder(tmp_path: Path) -> None:
    report = _load(BENCHMARKS / "_report.py", "_report")
    parser = argparse.ArgumentParser()
    report.add_out_option(parser, "bench_x")
    default = BENCHMARKS / "results" / "bench_x" / "bench_x.json"
    assert parser.parse_args([]).out is None  # nothing written unless asked
    assert parser.parse_args(["--out"]).out == default
    assert parser.parse_args(["--out", str(tmp_path / "a.json")]).out == tmp_path / "a.json"
    report.write_report(tmp_path / "sub" / "a.json", {"rows": [1.5]})
    assert json.loads((tmp_path / "sub" / "a.json").read_text()) == {"rows": [1.5]}


@pytest.mark.bench
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_starts_from_the_repository_root(script: str) -> None:
    # Every import (moved modules, another script's helpers) resolves, run as the READMEs say.
    proc = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "usage:" in proc.stdout


@pytest.mark.bench
def test_bench_foundation_quick_reports_three_finite_ratios(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_foundation.py"),
            "--quick",
            "--json",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert report["sizes"] == "quick"
    results = {r["measurement"].split()[0]: r for r in report["results"]}
    assert sorted(results) == ["build", "patch", "search"]
    for r in results.values():
        for key in ("value", "baseline", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["measurement"], key, r[key])
        assert r["rounds"] >= 1
        assert r["met"] in (True, False)
    assert list(tmp_path.iterdir()) == []  # the work directory is removed


@pytest.mark.bench
def test_bench_foundation_quick_table_has_one_row_per_measurement(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_foundation.py"),
            "--quick",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["measurement", "value", "baseline", "ratio", "goal", "met?"]
    rows = lines[3:6]
    assert [row.split()[0] for row in rows] == ["search", "build", "patch"]


@pytest.mark.bench
def test_bench_rerank_paths_quick_reports_every_path(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_rerank_paths.py"),
            "--quick",
            "--json",
            "--ks",
            "8",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "paths.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads((tmp_path / "paths.json").read_text()) == report  # --out writes the same
    assert [(r["shape"], r["k"]) for r in report["rows"]] == [("demo", 8), ("clip-b32", 8)]
    for r in report["rows"]:
        for key in (
            "plain_ms",
            "folded_ms",
            "precomputed_ms",
            "folded_vs_plain",
            "precomputed_vs_plain",
        ):
            assert math.isfinite(r[key]) and r[key] > 0, (r["shape"], key, r[key])


@pytest.mark.bench
def test_bench_blip_itm_tiny_reports_cached_and_full_latency() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_blip_itm.py"),
            "--skip-base",
            "--rounds",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads(proc.stdout)["results"]
    assert row["model"] == "tiny" and row["k"] == 100
    assert row["cached_ms"] > 0 and row["full_ms"] > 0
    assert row["max_abs_diff"] < 1e-5  # the two sides score the same


@pytest.mark.bench
def test_bench_rerank_flops_quick_reports_finite_ratios_and_ceilings() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_rerank_flops.py"),
            "--quick",
            "--json",
            "--ks",
            "8",
            "16",
            "--threads",
            "1",
            "--ceiling",
            "--precision",
            "auto",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert [(r["k"], r["precision"]) for r in report["rows"]] == [
        (8, "auto"),
        (8, "bfloat16"),
        (16, "auto"),
        (16, "bfloat16"),
    ]
    for r in report["rows"]:
        for key in ("p50_ms", "gflop_per_query", "gflop_per_s", "vs_matmul", "ceiling_vs_matmul"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["k"], key, r[key])
        # the recorded kernels are the whole count, and alone they take less than the call
        assert r["matmul_gflop"] == pytest.approx(r["gflop_per_query"], rel=1e-9)
        assert 0 < r["matmul_ms"] < r["p50_ms"]
    # bf16 runs the same matrix multiplies: the same count
    assert report["rows"][0]["gflop_per_query"] == report["rows"][1]["gflop_per_query"]
    # twice the candidates, about twice the counted work (the query side is shared)
    assert 1.5 < report["rows"][2]["gflop_per_query"] / report["rows"][0]["gflop_per_query"] <= 2.0


@pytest.mark.bench
def test_bench_rerank_device_quick_on_the_cpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "gpu" / "bench_rerank_device.py"),
            "--device",
            "cpu",
            "--quick",
            "--json",
            "--out",
            str(tmp_path / "device.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads((tmp_path / "device.json").read_text()) == report
    assert report["device"] == "cpu"
    assert {(r["shape"], r["reranker"]) for r in report["rerank"]} == {
        (shape, name) for shape in ("demo", "clip-b32") for name in ("maxsim", "cross-attention")
    }
    for r in report["rerank"]:
        assert r["k"] == 100 and math.isfinite(r["host_ms"]) and r["host_ms"] > 0
    assert report["encoder"]["images_per_s"] > 0


def _crossrank(*args: str) -> None:
    """Runs a ``crossrank`` command in this process, as the CLI tests do."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)


def test_relation_misses_says_how_an_object_is_missing() -> None:
    module = _load(BENCHMARKS / "relation_misses.py", "relation_misses")

    def scene(*objects: tuple[str, str, str]) -> SimpleNamespace:
        return SimpleNamespace(
            objects=[SimpleNamespace(size=z, colour=c, shape=h) for z, c, h in objects]
        )

    wanted = ObjectSpec("red", "circle", "large")
    assert module._how_missing(scene(("small", "red", "circle")), wanted) == "size"
    assert module._how_missing(scene(("large", "blue", "circle")), wanted) == "colour"
    assert module._how_missing(scene(("large", "red", "square")), wanted) == "shape"
    assert (
        module._how_missing(scene(("large", "red", "square"), ("large", "blue", "circle")), wanted)
        == "colour and shape apart"
    )
    assert module._how_missing(scene(("large", "blue", "square")), wanted) == "absent"


@pytest.mark.bench
def test_relation_misses_sorts_every_relation_query(tmp_path: Path) -> None:
    bench, index = tmp_path / "bench", tmp_path / "bench.idx"
    _crossrank(
        "dataset",
        "shapes",
        "--out",
        str(bench),
        "--n-images",
        "120",
        "--n-queries",
        "30",
        "--seed",
        "3",
    )
    _crossrank("build", str(bench / "images"), "--index", str(index))
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "relation_misses.py"),
            "--bench",
            str(bench),
            "--index",
            str(index),
            "--reranker",
            "none",
            "--json",
            "--out",
            str(tmp_path / "misses.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads((tmp_path / "misses.json").read_text()) == report
    assert report["reranker"] == "none" and report["queries"] > 0
    kinds = {"both objects, relation false", "no positive in top 100"} | {
        f"an object missing: {how}"
        for how in ("size", "colour", "shape", "colour and shape apart", "absent")
    }
    misses = {
        k: v
        for k, v in report.items()
        if k not in ("bench", "reranker", "queries", "right")
        and not k.startswith("first positive at rank")
    }
    assert set(misses) <= kinds, misses
    # every relation query is either right or sorted into exactly one kind of miss
    assert report.get("right", 0) + sum(misses.values()) == report["queries"]
    ranked = sum(v for k, v in report.items() if k.startswith("first positive at rank"))
    assert ranked == report["queries"] - report.get("right", 0) - report.get(
        "no positive in top 100", 0
    )


@pytest.mark.bench
def test_relation_caption_accuracy_scores_the_shipped_reranker(tmp_path: Path) -> None:
    train, index = tmp_path / "train", tmp_path / "train.idx"
    _crossrank(
        "dataset",
        "shapes",
        "--out",
        str(train),
        "--split",
        "train",
        "--n-images",
        "300",
        "--n-queries",
        "10",
        "--seed",
        "3",
    )
    _crossrank("build", str(train / "images"), "--index", str(index))
    shipped = ROOT / "crossrank" / "assets" / "demo-reranker"
    command = [
        sys.executable,
        str(BENCHMARKS / "relation_caption_accuracy.py"),
        "--train",
        str(train / "pairs.parquet"),
        "--train-index",
        str(index),
        str(shipped),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = proc.stdout.splitlines()
    accuracy, chance = (
        float(x) for x in line.split("accuracy ")[1].replace("(chance ", "").rstrip(")").split()
    )
    assert 0.0 < chance < 0.5 and 0.0 <= accuracy <= 1.0
    assert accuracy > chance  # the shipped reranker reads relations (1.000 on the full train split)

    out = tmp_path / "accuracy.json"
    proc = subprocess.run(
        [*command, "--json", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    (row,) = report["rows"]
    assert row["reranker"] == str(shipped)
    assert (round(row["accuracy"], 3), round(row["chance"], 3)) == (accuracy, chance)


@pytest.mark.bench
def test_bench_cold_search_quick_reports_every_case_and_a_light_path_without_transformers(
    tmp_path: Path,
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_cold_search.py"),
            "--quick",
            "--json",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    cases = {r["case"]: r for r in report["results"]}
    assert list(cases) == ["python", "torch", "light query", "full query", "cli search"]
    for r in cases.values():
        for key in ("median_s", "min_s", "max_s", "ratio_to_torch"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["case"], key, r[key])
    assert cases["torch"]["ratio_to_torch"] == 1.0
    assert report["imports"]["light query"] == {"transformers": False, "light": True}
    assert report["imports"]["full query"]["transformers"] is True
    assert list(tmp_path.iterdir()) == []  # the temporary index is removed


@pytest.mark.bench
def test_bench_codecs_quick_reports_every_codec_and_goal(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_codecs.py"),
            "--quick",
            "--json",
            "--codecs",
            "int8",
            "pq",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    (shapes,) = report["shapes"]
    assert list(shapes["codecs"]) == ["fp16", "int8", "pq"]
    for row in shapes["codecs"].values():
        for key in ("reranked_R@1", "reranked_nDCG@10", "gather_ms_100", "gather_ms_1000"):
            assert math.isfinite(row[key]), key
        assert row["reranker"].startswith("cross-attention")
        # the codec changes the patches, never the first stage
        assert row["first_stage_R@1"] == shapes["codecs"]["fp16"]["first_stage_R@1"]
    assert shapes["codecs"]["pq"]["bytes_ratio_vs_fp16"] == 16.0
    clip = report["clip_dims"]["codecs"]
    assert clip["fp16"]["patch_bytes_per_image"] == 196 * 512 * 2
    assert clip["pq"]["patch_bytes_per_image"] == 196 * 64
    assert [g["goal"].split(":")[0] for g in report["summary"]["goals"]] == [
        "pq",
        "int8",
        "pq at CLIP ViT-B/16 dims",
    ]


@pytest.mark.bench
def test_bench_filtered_quick_reports_every_selectivity(tmp_path: Path) -> None:
    out = tmp_path / "filtered.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCHMARKS / "bench_filtered.py"),
            "--quick",
            "--json",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    result = report["result"]
    assert result["factory"].startswith("IVF") and result["index_in_memory"]
    rows = result["rows"]
    assert [r["selectivity"] for r in rows] == [1.0, 0.1, 0.01, 0.001]
    assert [r["allowed"] for r in rows] == [20_000, 2_000, 200, 20]
    for row in rows:
        for side in ("crossrank", "script"):
            assert math.isfinite(row[f"{side}_p50_ms"]) and row[f"{side}_p50_ms"] > 0
            assert 0.0 <= row[f"{side}_recall_at_10"] <= 1.0
        assert math.isfinite(row["script_faiss_p50_ms"]) and math.isfinite(row["ratio_p50"])
    # filtered rows are at least as good as the unfiltered one: probing scales with the filter
    assert min(r["crossrank_recall_at_10"] for r in rows[1:]) >= rows[0]["crossrank_recall_at_10"]
