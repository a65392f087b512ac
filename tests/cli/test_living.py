"""`crossrank add`, `remove`, `compact` end to end: exit codes, --json shapes, one-line errors."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from crossrank.cli import app
from crossrank.store import WriterLock

from ..conftest import committed_state, write_images


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def living_images() -> tuple[int, int]:
    """The root conftest's living-index fixtures build over 5 images here (seed 70)."""
    return 5, 70


def _json(runner: CliRunner, *args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def _one_red_line(result, match: str) -> None:
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(match, lines[0]), lines[0]


def test_add_remove_compact_round_trip(living, runner):
    source, index = living
    write_images(source / "new", 2, seed=71)
    added = _json(
        runner, "add", str(source), "--index", str(index), "--device", "cpu", "--workers", "1"
    )
    assert set(added) == {
        "index",
        "generation",
        "committed",
        "added",
        "moved",
        "replaced",
        "unchanged",
        "duplicates",
        "skipped",
        "still_skipped",
        "images",
        "seconds",
    }
    assert (added["added"], added["unchanged"], added["images"], added["generation"]) == (
        2,
        5,
        7,
        2,
    )
    removed = _json(runner, "remove", str(index), "--ids", "1, 6")
    assert (removed["removed"], removed["images"], removed["tombstones"]) == ([1, 6], 5, 2)
    by_where = _json(runner, "remove", str(index), "--where", "id = 0")
    assert by_where["removed"] == [0] and by_where["generation"] == 4
    info = _json(runner, "info", str(index))
    assert (info["counts"]["images"], info["tombstones"], info["generation"]) == (4, 3, 4)
    compacted = _json(runner, "compact", str(index))
    assert (compacted["committed"], compacted["dropped"], compacted["images"]) == (True, 3, 4)
    assert compacted["deleted_generations"] == [4]
    assert _json(runner, "verify", str(index))["ok"] is True
    search = _json(runner, "search", str(index), "a red circle", "-k", "10", "--device", "cpu")
    assert sorted(h["id"] for h in search["hits"]) == [2, 3, 4, 5]


def test_human_output_says_what_happened(index_only, runner):
    source, index = index_only
    again = runner.invoke(app, ["add", str(source), "--index", str(index), "--device", "cpu"])
    assert again.exit_code == 0 and "nothing to add: 5 files already indexed" in again.stdout
    removed = runner.invoke(app, ["remove", str(index), "--ids", "2"])
    assert removed.exit_code == 0 and "removed 1 images" in removed.stdout
    assert "crossrank compact" in " ".join(removed.stdout.split())
    info = runner.invoke(app, ["info", str(index)])
    assert re.search(r"removed\s+1 ", info.stdout)
    compacted = runner.invoke(app, ["compact", str(index)])
    assert compacted.exit_code == 0 and "compacted: dropped 1 removed images" in compacted.stdout


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["add", "{tmp}/missing", "--index", "{idx}"], r"SOURCE .*missing does not exist"),
        (["add", "{src}", "--index", "{tmp}/none.idx"], r"no committed index in .*none\.idx"),
        (
            ["remove", "{idx}", "--ids", "1,42"],
            r"1 of the 2 ids are not in index .*: 42; nothing was removed",
        ),
        (["remove", "{idx}", "--where", "nope > 1"], r'unknown column "nope"'),
        (["compact", "{tmp}/none.idx"], r"no committed index in"),
    ],
    ids=["missing-source", "missing-index", "unknown-ids", "bad-where", "compact-missing-index"],
)
def test_bad_input_is_one_red_line_and_changes_nothing(index_only, tmp_path, runner, args, match):
    source, index = index_only
    before = committed_state(index)
    result = runner.invoke(app, [a.format(tmp=tmp_path, idx=index, src=source) for a in args])
    _one_red_line(result, match)
    assert committed_state(index) == before


def test_a_locked_index_is_one_red_line_naming_the_writer(index_only, runner):
    _, index = index_only
    with WriterLock(index, command="crossrank add elsewhere --index photos.idx"):
        result = runner.invoke(app, ["remove", str(index), "--ids", "1"])
    _one_red_line(result, r"being written by another writer of this process .*one writer at a time")


@pytest.mark.parametrize(
    "args",
    [
        ["--ids", "1", "--where", "id = 1"],
        [],
        ["--ids", "1,x"],
        ["--ids", " "],
        ["--ids", ","],
        ["--ids", "1,,2"],
    ],
    ids=["both", "neither", "not-an-int", "empty", "only-a-comma", "an-id-missing"],
)
def test_remove_usage_errors(index_only, runner, args):
    result = runner.invoke(app, ["remove", str(index_only[1]), *args])
    assert result.exit_code == 2
    assert re.search(
        r"--where SQL or --ids|--ids must be integer ids separated by commas|--ids is empty",
        " ".join(result.stderr.split()),
    )
