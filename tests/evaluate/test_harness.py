"""The eval harness on a tiny shapes corpus: report shape, run files, ranx agreement, refusals."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossrank import Index, InvalidArgumentError
from crossrank.cli import app
from crossrank.evaluate import METRIC_NAMES, EvalQuery, evaluate_index, read_queries, read_run

METRICS = ["R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "P@10"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> tuple[Path, Path]:
    """A 60-image, 12-query shapes corpus and its index (built from its images/ folder)."""
    from crossrank.datasets import generate_shapes
    from crossrank.write.build import build_index

    root = generate_shapes(
        tmp_path_factory.mktemp("shapes") / "ds", n_images=60, n_queries=12, seed=0, workers=1
    ).root
    index = tmp_path_factory.mktemp("shapes-idx") / "shapes.idx"
    build_index(root / "images", index, model=tiny_clip, device="cpu", batch_size=30, workers=2)
    return root, index


@pytest.fixture(scope="module")
def cli_eval(shapes, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    root, index = shapes
    runs = tmp_path_factory.mktemp("runs")
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(index),
            "--queries",
            str(root / "queries.parquet"),
            "--qrels",
            str(root / "qrels.txt"),
            "--run-out",
            str(runs),
            "--reranker",
            "maxsim",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout), runs


def test_eval_json_has_the_documented_shape(cli_eval):
    report, _ = cli_eval
    assert {"queries", "first_stage", "reranked", "latency_ms"} <= set(report)
    assert (
        report["queries"] == 12 and report["excluded_qids"] == [] and report["reranker"] == "maxsim"
    )
    assert report["fusion"] == "rerank" and report["notes"] == []
    assert report["encoder"]["model_id"] == str(report["encoder"]["model_id"])
    assert report["encoder"]["demo"] is False
    for stage in ("first_stage", "reranked"):
        assert list(report[stage]) == METRICS
        assert all(0.0 <= v <= 1.0 for v in report[stage].values())
    assert {"encode", "first_stage", "rerank", "total"} <= set(report["latency_ms"])
    for lat in report["latency_ms"].values():
        assert set(lat) == {"p50", "p95"} and 0.0 <= lat["p50"] <= lat["p95"]
    # shapes queries carry kind and heldout: each group reports its own metrics
    assert {"kind=single", "kind=pair", "kind=relation"} <= set(report["groups"])
    assert (
        sum(report["groups"][f"kind={k}"]["queries"] for k in ("single", "pair", "relation")) == 12
    )


def test_run_files_name_images_as_the_qrels_do(cli_eval, shapes):
    _, runs = cli_eval
    root, _ = shapes
    qids = [q.qid for q in read_queries(root / "queries.parquet")]
    for name in ("first_stage.run", "reranked.run"):
        run = read_run(runs / name)
        assert list(run) == qids
        for docs in run.values():
            assert len(docs) == 60  # rerank_k (100) is more than the corpus: every image, once
            assert len({d for d, _ in docs}) == 60
            assert all(
                re.fullmatch(r"images/\d{6}\.png", d) and (root / d).is_file() for d, _ in docs
            )


@pytest.mark.parametrize(
    ("stage", "run_file"), [("first_stage", "first_stage.run"), ("reranked", "reranked.run")]
)
def test_reported_metrics_equal_ranx_on_the_run_files(cli_eval, shapes, stage, run_file):
    from ranx import Qrels, Run, evaluate

    from crossrank.evaluate import ranx_name

    report, runs = cli_eval
    root, _ = shapes
    qrels = Qrels.from_file(
        str(root / "qrels.txt"), kind="trec"
    )  # every shapes query has a relevant image
    run = Run.from_file(str(runs / run_file), kind="trec")
    theirs = evaluate(qrels, run, [ranx_name(m) for m in METRIC_NAMES])
    for metric in METRIC_NAMES:
        # --json carries full precision: equal to ranx up to float summation order, not rounding
        assert report[stage][metric] == pytest.approx(theirs[ranx_name(metric)], abs=1e-12), metric


def test_run_files_are_the_two_stages_of_search(cli_eval, shapes):
    _, runs = cli_eval
    root, index_dir = shapes
    index = Index.open(index_dir, device="cpu")
    first, reranked = read_run(runs / "first_stage.run"), read_run(runs / "reranked.run")
    for query in read_queries(root / "queries.parquet")[:4]:
        plain = index.search(query.text, k=10, reranker=None)
        assert [d for d, _ in first[query.qid][:10]] == [
            os.path.relpath(h.path, root) for h in plain
        ]
        full = index.search(query.text, k=10, rerank_k=100, reranker="maxsim")
        assert [d for d, _ in reranked[query.qid][:10]] == [
            os.path.relpath(h.path, root) for h in full
        ]


def test_queries_without_a_relevant_image_are_excluded(shapes, tmp_path):
    root, index_dir = shapes
    index = Index.open(index_dir, device="cpu")
    base = evaluate_index(
        index, root / "queries.parquet", root / "qrels.txt", rerank_k=20, reranker="maxsim"
    )
    qrels = (
        root / "qrels-with-unjudged.txt"
    )  # beside the images: doc ids stay relative to this folder
    qrels.write_text((root / "qrels.txt").read_text() + "qzero 0 images/000001.png 0\n")
    queries = read_queries(root / "queries.parquet") + [
        EvalQuery("qzero", "a red circle"),
        EvalQuery("qnone", "a blue square"),
    ]
    report = evaluate_index(index, queries, qrels, rerank_k=20, reranker="maxsim", run_out=tmp_path)
    qrels.unlink()
    assert report.excluded_qids == ["qnone", "qzero"]
    assert report.queries == base.queries == 12
    assert report.first_stage.values == base.first_stage.values
    assert report.reranked.values == base.reranked.values


def test_eval_without_reranker(shapes, tmp_path):
    root, index_dir = shapes
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(index_dir),
            "--queries",
            str(root / "queries.parquet"),
            "--qrels",
            str(root / "qrels.txt"),
            "--reranker",
            "none",
            "--run-out",
            str(tmp_path),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["reranked"] is None and report["reranker"] == "none"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first_stage.run"]


def test_human_report_renders(shapes):
    root, index_dir = shapes
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(index_dir),
            "--queries",
            str(root / "queries.parquet"),
            "--qrels",
            str(root / "qrels.txt"),
            "--rerank-k",
            "10",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert "12 queries" in result.stdout and "nDCG@10" in result.stdout
    assert all(m in result.stdout for m in ("R@1", "R@5", "R@10", "MRR@10", "nDCG@10", "P@10"))


def test_a_report_piped_to_a_narrow_console_keeps_every_number_whole(cli_eval, monkeypatch):
    import io

    from rich.console import Console

    from crossrank.cli import render

    report, _ = cli_eval
    out = io.StringIO()  # not a terminal, as in a CI log or `> report.txt`
    monkeypatch.setattr(render, "console", Console(file=out, width=50))
    render.render_eval(report)
    text = out.getvalue()
    assert "…" not in text
    assert f"{report['reranked']['nDCG@10']:.3f}" in text and "MRR@10" in text


# -- refusals: exit 1 and one clear line --------------------------------------------------------


def _tsv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


MISMATCH = {
    "qrels-elsewhere": (  # right qids and doc ids, but relative to a folder that holds no images
        lambda root, tmp: (
            "{root}/queries.parquet",
            _tsv(tmp / "qrels.txt", (root / "qrels.txt").read_text()),
        ),
        r"no doc id of .*qrels\.txt is an image of index .*; doc "
        r"ids must be image paths relative to the qrels",
    ),
    "foreign-queries": (
        lambda root, tmp: (
            _tsv(tmp / "q.tsv", "zz1\ta red circle\nzz2\ta blue square\n"),
            "{root}/qrels.txt",
        ),
        r"none of the 2 query ids \(e\.g\. 'zz1'\) appear in .*qrels\.txt",
    ),
    "duplicate-qid": (
        lambda root, tmp: (
            _tsv(tmp / "q.tsv", "q00000\ta red circle\nq00000\ta blue square\n"),
            "{root}/qrels.txt",
        ),
        r"query id 'q00000' appears twice",
    ),
    "malformed-queries": (
        lambda root, tmp: (_tsv(tmp / "q.tsv", "q00000 a red circle\n"), "{root}/qrels.txt"),
        r"q\.tsv:1: expected 'qid<TAB>text'",
    ),
    "missing-qrels": (
        lambda root, tmp: ("{root}/queries.parquet", tmp / "nope.txt"),
        r"qrels file .*nope\.txt does not exist",
    ),
    "missing-queries": (
        lambda root, tmp: (tmp / "nope.parquet", "{root}/qrels.txt"),
        r"queries file .*nope\.parquet does not exist",
    ),
    "qrels-is-a-folder": (
        lambda root, tmp: ("{root}/queries.parquet", "{root}"),
        r"qrels file .* is a folder, not a file; pass --qrels FILE",
    ),
    "queries-is-a-folder": (
        lambda root, tmp: (tmp, "{root}/qrels.txt"),
        r"queries file .* is a folder, not a file; pass --queries FILE",
    ),
}


@pytest.mark.parametrize("case", list(MISMATCH))
def test_eval_refuses_queries_or_qrels_that_do_not_match(shapes, tmp_path, case):
    root, index_dir = shapes
    make, match = MISMATCH[case]
    queries, qrels = (str(p).format(root=root) for p in make(root, tmp_path))
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(index_dir),
            "--queries",
            queries,
            "--qrels",
            qrels,
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 1, (result.stdout, result.exception)
    assert isinstance(result.exception, SystemExit)  # handled, no traceback
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(match, lines[0]), lines[0]


def test_evaluate_index_api_raises_invalid_argument(shapes):
    root, index_dir = shapes
    with pytest.raises(InvalidArgumentError, match="no queries to evaluate"):
        evaluate_index(Index.open(index_dir, device="cpu"), [], root / "qrels.txt")


def test_json_metrics_are_not_rounded(cli_eval):
    report, _ = cli_eval
    values = [v for stage in ("first_stage", "reranked") for v in report[stage].values()]
    values += [
        v
        for g in report["groups"].values()
        for s in ("first_stage", "reranked")
        for v in g[s].values()
    ]
    # 12 queries: MRR and nDCG are sums of reciprocals and logs, rarely 4-decimal numbers
    assert any(round(v, 4) != v for v in values)


def test_eval_auto_without_a_trained_reranker_reports_the_first_stage_alone(shapes, tmp_path):
    root, index_dir = shapes
    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(index_dir),
            "--queries",
            str(root / "queries.parquet"),
            "--qrels",
            str(root / "qrels.txt"),
            "--run-out",
            str(tmp_path),
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["reranker"] == "none" and report["fusion"] == "none"
    assert report["reranked"] is None
    assert len(report["notes"]) == 1 and "crossrank train" in report["notes"][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first_stage.run"]


def test_the_table_names_reranker_fusion_and_encoder_and_fits_80_columns(cli_eval, monkeypatch):
    import io

    from rich.console import Console

    from crossrank.cli import render

    report, _ = cli_eval
    out = io.StringIO()
    terminal = Console(file=out, width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(render, "console", terminal)
    render.render_eval(report)
    text = out.getvalue()
    assert "…" not in text
    assert f"{report['reranked']['nDCG@10']:.3f}" in text
    assert "reranker maxsim" in text and "fusion rerank" in text
    assert report["encoder"]["model_id"] in text.replace("\n", "")  # a long path may wrap
    assert max(len(line) for line in text.splitlines()) <= 80


def test_a_run_out_that_is_a_file_is_refused_before_any_query_runs(
    shapes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crossrank import Index
    from crossrank.errors import InvalidArgumentError
    from crossrank.evaluate import evaluate_index

    root, index_dir = shapes
    index = Index.open(index_dir, device="cpu")

    def no_search(*args, **kwargs):
        raise AssertionError("a query ran before run_out was checked")

    monkeypatch.setattr(index, "search", no_search)
    (tmp_path / "runs").write_text("not a folder")
    queries, qrels = root / "queries.parquet", root / "qrels.txt"
    with pytest.raises(InvalidArgumentError, match=r"run_out .*runs is a file; give a folder"):
        evaluate_index(index, queries, qrels, run_out=tmp_path / "runs")
    with pytest.raises(InvalidArgumentError, match=r"cannot create the run_out folder"):
        evaluate_index(index, queries, qrels, run_out=tmp_path / "runs" / "under-a-file")
