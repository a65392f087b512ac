"""`crossrank rerank IDX QUERY --ids 3,17,42`: reranking a backend's candidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossrank import Index
from crossrank.cli import app

QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def test_json_equals_the_library(runner: CliRunner, built_index: Path) -> None:
    args = ["rerank", str(built_index), QUERY, "--ids", "3, 17,5,11", "--reranker", "maxsim"]
    result = runner.invoke(app, [*args, "--device", "cpu", "--json", "-k", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    with Index.open(built_index, device="cpu") as index:
        expected = index.rerank(QUERY, [3, 17, 5, 11], k=3, reranker="maxsim")
    assert [h["id"] for h in data["hits"]] == [h.id for h in expected]
    assert data["counts"]["candidates"] == 4 and data["reranker"] == "maxsim"


def test_table(runner: CliRunner, built_index: Path) -> None:
    result = runner.invoke(
        app, ["rerank", str(built_index), QUERY, "--ids", "1,2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert "2 of 2 requested" in result.stdout and "2 candidates" in result.stdout


@pytest.mark.parametrize(
    ("ids", "code", "text"),
    [
        ("1,x", 2, "--ids must be integer ids separated by commas, e.g. 3,17,42; got 'x'"),
        ("1,,2", 2, "got an empty item in '1,,2'"),
        ("1,999", 1, "1 id(s) not in index"),
        ("1,1", 1, "ids must each appear once"),
    ],
)
def test_bad_ids(runner: CliRunner, built_index: Path, ids: str, code: int, text: str) -> None:
    result = runner.invoke(
        app, ["rerank", str(built_index), QUERY, "--ids", ids, "--device", "cpu"]
    )
    assert result.exit_code == code
    assert text in " ".join(result.output.split())


def test_query_or_image(runner: CliRunner, built_index: Path, image_folder: Path) -> None:
    result = runner.invoke(app, ["rerank", str(built_index), "--ids", "1"])
    assert result.exit_code == 2 and "QUERY text or --image" in " ".join(result.output.split())
    image = str(image_folder / "img_000.png")
    result = runner.invoke(
        app, ["rerank", str(built_index), "--image", image, "--ids", "0,1,2", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["hits"]) == 3
