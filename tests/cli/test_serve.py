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
            "--reranker",
            "maxsim",
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


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("999.1.1.1", "'999.1.1.1' is not a valid IP address"),
        ("1.2.3", "'1.2.3' is not a valid IP address"),
        ("", "'' is not a valid IP address"),
        ("no such host", "is not a valid IP address"),
        ("no-such-host.invalid", "'no-such-host.invalid' cannot be resolved"),
    ],
)
def test_a_host_that_cannot_be_listened_on_is_one_line_before_anything_loads(
    tmp_path: Path, served: dict, host: str, why: str
) -> None:
    # The index does not even exist: the host is checked first, and nothing is announced.
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.idx"), "--host", host])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: Invalid value for --host: ")
    assert result.stderr.count("\n") == 1 and why in result.stderr
    assert "serving" not in result.stderr and served == {}


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_a_bad_port_is_one_line_and_exit_2(built_index: Path, served: dict, port: str) -> None:
    result = CliRunner().invoke(app, ["serve", str(built_index), "--port", port])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "serving" not in result.stderr and served == {}


def test_a_bad_log_level_is_one_line_and_exit_2(built_index: Path, served: dict) -> None:
    result = CliRunner().invoke(app, ["serve", str(built_index), "--log-level", "loud"])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith("error: Invalid value for --log-level: unknown log level")
    assert result.stderr.count("\n") == 1 and "debug" in result.stderr
    assert "serving" not in result.stderr and served == {}


@pytest.mark.parametrize("flag", [["--reranker", "colbert"], ["--fusion", "max"]])
def test_a_reranker_or_fusion_that_fails_every_request_is_one_line_at_start(
    built_index: Path, served: dict, flag: list[str]
) -> None:
    result = CliRunner().invoke(app, ["serve", str(built_index), "--device", "cpu", *flag])
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert repr(flag[1]) in result.stderr
    assert "serving" not in result.stderr and served == {}


@pytest.mark.parametrize("host", ["::1", "localhost"])
def test_ipv6_and_names_are_served(built_index: Path, served: dict, host: str) -> None:
    result = CliRunner().invoke(app, ["serve", str(built_index), "--host", host, "--port", "9"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert served["host"] == host
    url = "http://[::1]:9/" if host == "::1" else "http://localhost:9/"
    assert f"on {url} · API docs" in result.stderr


def test_the_announcement_prints_the_index_path_literally(
    built_index: Path, tmp_path: Path, served: dict
) -> None:
    import shutil

    odd = Path(shutil.copytree(built_index, tmp_path / "[bold]m[/]" / "[/x].idx"))
    result = CliRunner().invoke(app, ["serve", str(odd), "--device", "cpu"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert f"serving {odd.resolve()} (24 images" in result.stderr or (
        f"serving {odd} (24 images" in result.stderr
    )


def test_ray_address_without_engine_ray_is_a_usage_error(built_index: Path, served: dict) -> None:
    result = CliRunner().invoke(app, ["serve", str(built_index), "--ray-address", "127.0.0.1:1"])
    assert result.exit_code == 2 and "--engine ray" in result.stderr
    assert result.stderr.count("\n") == 1 and served == {}


def test_engine_ray_serves_the_index_open_on_ray_gives(
    built_index: Path, served: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The actors themselves are tested in tests/distributed; here: serve hands what
    # crossrank.distributed.open_on_ray opened to the app, with the flags given.
    import crossrank.distributed
    from crossrank.shards import open_index

    opened: dict = {}

    def open_on_ray(index, **kwargs):
        opened.update(index=index, **kwargs)
        return open_index(index, device="cpu")

    monkeypatch.setattr(crossrank.distributed, "open_on_ray", open_on_ray)
    result = CliRunner().invoke(
        app,
        ["serve", str(built_index), "--engine", "ray", "--ray-address", "127.0.0.1:6379"],
    )
    assert result.exit_code == 0, result.stderr
    assert opened["index"] == built_index and opened["ray_address"] == "127.0.0.1:6379"
    assert served["api"].state.index.path == built_index
