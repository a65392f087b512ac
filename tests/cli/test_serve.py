"""`crossrank serve` builds the app from its flags and hands it to uvicorn; errors are one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossrank.cli import app


@pytest.fixture()
def served(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Capture uvicorn.run instead of listening on a port."""
    uvicorn = pytest.importorskip("uvicorn")
    calls: dict = {}

    def run(api, **kwargs) -> None:
        calls.update(api=api, **kwargs)

    monkeypatch.setattr(uvicorn, "run", run)
    return calls


def test_serve_runs_the_app_of_the_index(built_index: Path, served: dict) -> None:
    result = CliRunner().invoke(
        app,
        [
            "serve",
            str(built_index),
            "--port",
            "8123",
            "--host",
            "0.0.0.0",
            "--allow-where",
            "--device",
            "cpu",
            "--rerank-k",
            "7",
        ],
    )
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert (served["host"], served["port"]) == ("0.0.0.0", 8123)
    api = served["api"]
    assert api.state.allow_where is True
    assert len(api.state.index) == 24
    assert "on http://0.0.0.0:8123/ · API docs at /docs · raw where allowed" in result.stderr

    from fastapi.testclient import TestClient

    body = (
        TestClient(api)
        .post("/search", json={"query": "a red circle", "k": 2, "where": "width > 0"})
        .json()
    )
    assert body["counts"]["candidates"] == 7  # --rerank-k is the default of requests


def test_serve_defaults_to_localhost_8000_without_where(built_index: Path, served: dict) -> None:
    result = CliRunner().invoke(app, ["serve", str(built_index), "--device", "cpu"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert (served["host"], served["port"]) == ("127.0.0.1", 8000)
    assert served["api"].state.allow_where is False


def test_serve_without_an_index_is_one_line(tmp_path: Path, served: dict) -> None:
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.idx")])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert served == {}


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_extra_names_the_install_command(
    built_index: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    for name in [
        m for m in sys.modules if m == "crossrank.serve" or m.startswith("crossrank.serve.")
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, missing, None)  # `import fastapi` raises ImportError
    result = CliRunner().invoke(app, ["serve", str(built_index), "--device", "cpu"])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: ") and result.stderr.rstrip().endswith(
        "pip install 'crossrank[serve]'"
    )
    assert missing in result.stderr
