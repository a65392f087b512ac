"""`crossrank build`, `add`, `remove` on hostile input: one line, exit codes, literal text."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from crossrank.cli import app
from crossrank.store import WriterLock, read_lock_holder

from ..conftest import committed_state, write_images


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def living_images() -> tuple[int, int]:
    return 4, 120


def _one_line(result, code: int, match: str) -> str:
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    # A progress bar may have been drawn above it (on stderr); the error is the last line, alone.
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines, result.stderr
    assert match in lines[-1], lines[-1]
    assert lines[-1].startswith(("error: ", "interrupted: ")), lines[-1]
    return lines[-1]


@pytest.mark.parametrize("command", ["build", "add"])
def test_ctrl_c_is_one_line_and_exit_130(living, runner, monkeypatch, command):
    import crossrank.write as write
    import crossrank.write.build as build

    source, index_dir = living
    before = committed_state(index_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "build_index", interrupted)
    monkeypatch.setattr(write, "add_images", interrupted)
    args = [command, str(source), "--index", str(index_dir), "--device", "cpu"]
    result = runner.invoke(app, args + (["--overwrite"] if command == "build" else []))
    _one_line(result, 130, "interrupted: stopped; the last committed generation of")
    assert committed_state(index_dir) == before


def test_a_real_sigint_stops_add_with_130_and_keeps_the_index(living, tmp_path):
    """A real process, a real SIGINT while decoder threads are busy: exit 130, lock released."""
    source, index_dir = living
    write_images(source / "new", 6, seed=121)
    before = committed_state(index_dir)
    # Decoder threads are slowed down (1 s a chunk, one image a chunk), and the main thread says
    # when it takes its second batch: by then it has loaded the encoder and encoded a batch (a
    # signal that lands in a third-party import can be swallowed by a bare `except:` there), and
    # four chunks are still to decode. A fixed wait raced a fast machine and lost to a busy one.
    # Ctrl-C's default handler is set explicitly: a child inherits an ignored SIGINT.
    started = tmp_path / "decoding"
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import crossrank.ingest.pipeline as p\n"
        "real_chunk, real_assemble, taken = p._run_chunk, p._assemble, []\n"
        "def slow(*a, **k):\n"
        "    time.sleep(1.0)\n"
        "    return real_chunk(*a, **k)\n"
        "def assemble(*a, **k):\n"
        "    taken.append(1)\n"
        "    if len(taken) == 2:\n"
        "        open(os.environ['DECODING_MARKER'], 'a').close()\n"
        "    return real_assemble(*a, **k)\n"
        "p._run_chunk, p._assemble = slow, assemble\n"
        "from crossrank.cli import main\n"
        "sys.argv = ['crossrank'] + sys.argv[1:]\n"
        "main()\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "DECODING_MARKER": str(started),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "add", str(source), "--index", str(index_dir)]
        + ["--device", "cpu", "--batch-size", "1", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not started.exists():
        time.sleep(0.02)
    assert started.exists(), "the add never took its second batch"
    assert read_lock_holder(index_dir)["pid"] == proc.pid  # it holds the writer lock meanwhile
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("crossrank add did not stop on SIGINT") from None
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped"), err
    assert "Traceback" not in err
    assert committed_state(index_dir) == before
    with WriterLock(index_dir, create=False):
        pass  # released


def test_build_into_a_user_folder_is_one_red_line(runner, tmp_path, living):
    source, _ = living
    target = tmp_path / "mine"
    (target / "gen-000005").mkdir(parents=True)
    (target / "gen-000005" / "thesis.txt").write_text("keep")
    result = runner.invoke(app, ["build", str(source), "--index", str(target), "--overwrite"])
    _one_line(result, 1, "choose an empty or new folder")
    assert (target / "gen-000005" / "thesis.txt").read_text() == "keep"


def test_index_under_a_file_and_disk_full_are_one_red_line(runner, tmp_path, living, monkeypatch):
    source, index_dir = living
    (tmp_path / "f.txt").write_text("x")
    result = runner.invoke(app, ["build", str(source), "--index", str(tmp_path / "f.txt" / "i")])
    _one_line(result, 1, "which is a file, not a folder")

    from crossrank.store import _files

    def full(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_files.NpyAppender, "append", full)
    write_images(source / "new", 1, seed=122)
    before = committed_state(index_dir)
    result = runner.invoke(app, ["add", str(source), "--index", str(index_dir), "--device", "cpu"])
    _one_line(result, 1, "No space left on device")
    assert committed_state(index_dir) == before


def test_remove_an_id_beyond_int64_names_it(runner, index_only):
    _, index_dir = index_only
    result = runner.invoke(app, ["remove", str(index_dir), "--ids", "99999999999999999999999"])
    line = _one_line(result, 1, "id 99999999999999999999999 is out of range")
    assert "9223372036854775807 (int64)" in line and "shape" not in line


def test_info_names_a_first_build_in_progress(runner, tmp_path):
    target = tmp_path / "new.idx"
    with WriterLock(target, command="crossrank build photos --index new.idx"):
        for args in (["info", str(target)], ["verify", str(target)]):
            result = runner.invoke(app, args)
            _one_line(result, 1, f"being built by pid {os.getpid()}")


@pytest.mark.parametrize("name", ["[bold]m.idx", "[/x].idx"])
def test_paths_are_printed_literally(runner, tmp_path, living, name):
    source, _ = living
    target = tmp_path / name
    result = runner.invoke(app, ["build", str(source), "--index", str(target), "--device", "cpu"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert name in result.stdout
    write_images(source / "more", 1, seed=123)
    result = runner.invoke(app, ["add", str(source), "--index", str(target), "--device", "cpu"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert name in result.stdout
    result = runner.invoke(app, ["remove", str(target), "--ids", "0"])
    assert result.exit_code == 0 and name in result.stdout
    result = runner.invoke(app, ["compact", str(target)])
    assert result.exit_code == 0 and name in result.stdout


def test_add_retry_skipped_flag(runner, living):
    source, index_dir = living
    (source / "broken.png").write_bytes(b"nope")
    args = ["add", str(source), "--index", str(index_dir), "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, args)
    assert result.exit_code == 0
    assert "1 skipped before (--retry-skipped tries them again)" in " ".join(result.stdout.split())
    result = runner.invoke(app, [*args, "--retry-skipped", "--json"])
    assert result.exit_code == 0, result.stderr
    assert '"still_skipped": 0' in result.stdout


# -- patch codecs ---------------------------------------------------------------------------------


def test_an_unknown_patch_codec_is_a_usage_error_that_lists_the_codecs(runner, tmp_path, living):
    source, _ = living
    target = tmp_path / "idx"
    result = runner.invoke(
        app, ["build", str(source), "--index", str(target), "--patch-codec", "zstd"]
    )
    line = _one_line(result, 2, "unknown codec 'zstd'")
    assert "fp16" in line and "int8" in line and "pq:MxB" in line
    assert not target.exists()


def test_pq_on_a_few_images_says_what_works_instead(runner, tmp_path, living, tiny_clip):
    source, _ = living  # 4 images of 16 patches: plain pq needs 624
    args = ["build", str(source), "--index", str(tmp_path / "idx"), "--model", str(tiny_clip)]
    result = runner.invoke(app, [*args, "--device", "cpu", "--patch-codec", "pq"])
    line = _one_line(result, 1, "cannot be trained on SOURCE's 4 files")
    assert "624 images" in line and "--patch-codec int8" in line
    assert not (tmp_path / "idx").exists()


def test_build_with_a_patch_codec_reports_it(runner, tmp_path, living, tiny_clip):
    source, _ = living
    index = tmp_path / "idx"
    args = ["build", str(source), "--index", str(index), "--model", str(tiny_clip)]
    result = runner.invoke(app, [*args, "--device", "cpu", "--patch-codec", "int8"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert "patches int8" in " ".join(result.stdout.split())
    result = runner.invoke(app, ["info", str(index), "--json"])
    assert '"patch_codec": "int8"' in result.stdout
