"""Usage errors (an unknown command or flag, a bad flag value) are one red line and exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossrank.cli import app


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--bogus"],
            "No such option: --bogus (Possible options: --verbose); see 'crossrank --help'",
        ),
        (["search", "--bogus"], "No such option: --bogus; see 'crossrank search --help'"),
        (["search", "idx", "q", "-k", "many"], "Invalid value for '-k' / '--k'"),
        (["searh"], "No such command 'searh'. Did you mean 'search'"),
        (["serve", "idx", "--port", "0"], "Invalid value for '--port'"),
        (["info"], "Missing argument"),
        (["rerank", "idx", "q"], "Missing option '--ids'; see 'crossrank rerank --help'"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert "╭" not in result.stderr and "Usage:" not in result.stderr


def test_user_text_in_a_usage_error_is_printed_literally() -> None:
    result = CliRunner().invoke(app, ["search", "--[bold]x[/]"])
    assert result.exit_code == 2
    assert "No such option: --[bold]x[/]" in result.stderr


def test_the_console_script_prints_one_line_and_exits_2() -> None:
    script = Path(sys.executable).with_name("crossrank")
    if not script.exists():
        pytest.skip("crossrank is not installed as a console script in this environment")
    done = subprocess.run(
        [str(script), "search", "--bogus"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == "error: No such option: --bogus; see 'crossrank search --help'\n"


def test_no_arguments_still_show_the_help() -> None:
    result = CliRunner().invoke(app, [])
    assert "Usage: crossrank" in result.output
    assert "Commands" in result.output


ROOT = Path(__file__).resolve().parents[2]


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_readme_demo_set_up_installs_what_serve_needs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    set_up = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    first = re.search(r"```bash\n(.*?)\n```", set_up, re.S)
    assert first is not None
    extras = re.search(r"pip install -e '\.\[([a-z,]+)\]'", first.group(1))
    assert extras is not None, first.group(1)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    installed = list(project["dependencies"])
    for extra in extras.group(1).split(","):
        installed += project["optional-dependencies"][extra]
    assert {"fastapi", "uvicorn"} <= _requirement_names(installed)
    assert "crossrank serve" in readme.split("## Quick start: CLI", 1)[1]


def test_the_readme_states_the_exit_codes() -> None:
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert (
        "Exit codes: 0 success, 1 error, 2 usage error (an unknown command or flag, a bad flag "
        "value: one line too), 130 interrupted (Ctrl-C)."
    ) in readme


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(monkeypatch, tmp_path) -> None:
    """A command that is not a writer (here `search`) stops on Ctrl-C as the writers do."""
    from typer.testing import CliRunner

    import crossrank.api.index
    from crossrank.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(crossrank.api.index.Index, "open", interrupted)
    result = CliRunner().invoke(app, ["search", str(tmp_path), "a query"])
    assert result.exit_code == 130
    assert result.stderr.strip().splitlines() == ["interrupted: stopped"]
