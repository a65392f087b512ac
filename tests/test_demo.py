"""``crossrank demo`` and the dataset / train-encoder commands, end to end on tiny sizes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossrank.cli import app
from crossrank.demo import run_demo

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "crossrank-demo"
    report = run_demo(
        out, n_images=60, n_queries=12, seed=0, model=tiny_clip, reranker="maxsim", device="cpu"
    )
    return out, report.to_dict()


def test_demo_writes_benchmark_index_and_runs(demo_dir) -> None:
    out, report = demo_dir
    assert (out / "benchmark" / "qrels.txt").is_file()
    assert (out / "index" / "manifest.json").is_file()
    assert (out / "runs" / "first_stage.run").is_file() and (
        out / "runs" / "reranked.run"
    ).is_file()
    assert report["eval"]["queries"] == 12
    assert set(report["eval"]["first_stage"]) == {"R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "P@10"}
    assert report["eval"]["reranked"] is not None


def test_demo_examples_mark_relevance_from_the_qrels(demo_dir) -> None:
    out, report = demo_dir
    qrels: dict[str, set[str]] = {}
    for line in (out / "benchmark" / "qrels.txt").read_text().splitlines():
        qid, _, doc, rel = line.split()
        if int(rel) >= 1:
            qrels.setdefault(qid, set()).add(doc)
    import pyarrow.parquet as pq

    qid_of = {
        r["text"]: r["query_id"]
        for r in pq.read_table(out / "benchmark" / "queries.parquet").to_pylist()
    }
    assert 1 <= len(report["examples"]) <= 3
    for ex in report["examples"]:
        relevant = qrels[qid_of[ex["query"]]]
        assert ex["relevant_in_corpus"] == len(relevant)
        for row in ex["first_stage"] + ex["reranked"]:
            assert row["relevant"] == (row["path"] in relevant)
        first_scores = [row["score"] for row in ex["first_stage"]]
        assert first_scores == sorted(first_scores, reverse=True)


def test_demo_rerun_reuses_the_benchmark(demo_dir, tiny_clip: Path) -> None:
    out, _ = demo_dir
    before = (out / "benchmark" / "qrels.txt").stat().st_mtime_ns
    report = run_demo(out, n_images=60, n_queries=12, seed=0, model=tiny_clip, device="cpu")
    assert (out / "benchmark" / "qrels.txt").stat().st_mtime_ns == before
    assert report.evaluation["queries"] == 12
    # auto over a model without a trained reranker: the first stage alone, said so, with a hint
    assert report.evaluation["reranker"] == "none" and report.evaluation["reranked"] is None
    assert "crossrank train" in report.evaluation["notes"][0]


def test_demo_cli_json(tmp_path: Path, tiny_clip: Path) -> None:
    result = runner.invoke(
        app,
        [
            "demo",
            "--out",
            str(tmp_path / "d"),
            "--n-images",
            "40",
            "--n-queries",
            "6",
            "--model",
            str(tiny_clip),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["eval"]["queries"] == 6 and report["out"] == str(tmp_path / "d")


def test_demo_refuses_a_file_as_output(tmp_path: Path, tiny_clip: Path) -> None:
    (tmp_path / "file").write_text("x")
    result = runner.invoke(
        app, ["demo", "--out", str(tmp_path / "file"), "--model", str(tiny_clip)]
    )
    assert result.exit_code == 1
    assert "exists and is not a folder" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-queries", "0"], "n_queries must be at least 1, got 0"),
        (["--reranker", "bogus"], "reranker must be one of auto, blip-itm, maxsim, none"),
    ],
)
def test_demo_refuses_what_its_evaluation_would_before_generating(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "d"), "--json", *args])
    assert result.exit_code == 1
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "d").exists()  # nothing generated, nothing built


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n-images", "0"], "n_images must be an integer >= 1, got 0"),
        (["--image-size", "20"], "image_size"),
        (["--split", "validation"], "split"),
    ],
)
def test_dataset_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["dataset", "shapes", "--out", str(tmp_path / "ds"), *args])
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_dataset_refuses_a_non_empty_folder_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "mine.txt").write_text("keep me")
    result = runner.invoke(
        app,
        ["dataset", "shapes", "--out", str(tmp_path / "ds"), "--n-images", "5", "--n-queries", "2"],
    )
    assert result.exit_code == 1
    assert "overwrite" in result.stderr
    assert (tmp_path / "ds" / "mine.txt").read_text() == "keep me"


def test_dataset_cli_json(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "dataset",
            "shapes",
            "--out",
            str(tmp_path / "ds"),
            "--n-images",
            "12",
            "--n-queries",
            "4",
            "--seed",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["images"] == 12 and summary["queries"] == 4 and summary["split"] == "test"
    assert len(list((tmp_path / "ds" / "images").glob("*.png"))) == 12


def test_train_encoder_refuses_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train-encoder", "--data", str(tmp_path), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 1
    assert "dataset" in result.stderr


def test_train_encoder_bad_learning_rate_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["train-encoder", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--lr", "-1"]
    )
    assert result.exit_code == 2
    assert "lr must be > 0" in result.output


def test_train_encoder_missing_init_model_is_one_line_before_any_data_loads(tmp_path: Path) -> None:
    # The data folder is not a dataset either: the init model is checked first, so that a typo
    # costs no minute of image loading.
    result = runner.invoke(
        app,
        [
            "train-encoder",
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "m"),
            "--init-from",
            str(tmp_path / "nope"),
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.count("error:") == 1 and "does not exist" in result.stderr


def test_demo_cli_shows_a_bar_per_stage_and_fits_80_columns(
    tmp_path: Path, tiny_clip: Path, monkeypatch
) -> None:
    import io

    from rich.console import Console

    from crossrank.cli import render

    bars, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(
        render, "err_console", Console(file=bars, width=80, force_terminal=True, color_system=None)
    )
    monkeypatch.setattr(
        render, "console", Console(file=out, width=80, force_terminal=True, color_system=None)
    )
    result = runner.invoke(
        app,
        [
            "demo",
            "--out",
            str(tmp_path / "d"),
            "--n-images",
            "40",
            "--n-queries",
            "6",
            "--model",
            str(tiny_clip),
            "--reranker",
            "maxsim",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    shown = bars.getvalue()
    for stage, total in (("dataset", 40), ("build", 40), ("eval", 6)):
        assert re.search(rf"{stage}\s.*━.*{total}/{total}", shown), (stage, shown)
    text = out.getvalue()
    assert "nDCG@10" in text and "reranker maxsim" in text
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
