"""Usage errors (an unknown command or flag, a bad flag value) are one red line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
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
