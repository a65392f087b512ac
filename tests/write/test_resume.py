"""Resuming a killed build: finished chunks are kept, the result is an uninterrupted build's."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from crossrank import InvalidArgumentError
from crossrank.store import Generation
from crossrank.store.layout import STAGING_INFO_NAME, STAGING_JOURNAL_NAME, STAGING_NAME
from crossrank.write.build import build_index

from .._living import writer_context
from ..conftest import write_images
from .test_streaming_build import assert_same_index

BATCH, CHUNK = 2, 4


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """22 images, an undecodable file, and a late byte-identical copy of an early image."""
    root = tmp_path_factory.mktemp("resume") / "photos"
    paths = write_images(root, 14, seed=50)
    write_images(root / "z-late", 8, seed=51)
    shutil.copyfile(paths[1], root / "z-late" / "copy-of-1.png")
    (root / "m-broken.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def uninterrupted(source: Path, tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.idx"
    _build(source, out, tiny_clip)
    return out


def _build(source: Path, out: Path, model: Path, **kw):
    kw = {"batch_size": BATCH, "chunk_items": CHUNK, **kw}
    return build_index(source, out, model=model, device="cpu", workers=1, **kw)


def _build_target(source: str, out: str, model: str, crash_at: str, kw: dict) -> None:
    """Process target: a build killed by SIGKILL at ``crash_at``."""
    os.environ["CROSSRANK_CRASH_AT"] = crash_at
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(1)
    _build(Path(source), Path(out), Path(model), **kw)


def _killed_build(source: Path, out: Path, model: Path, crash_at: str, **kw) -> None:
    proc = writer_context().Process(
        target=_build_target, args=(str(source), str(out), str(model), crash_at, kw)
    )
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL, proc.exitcode


def _journal(index_dir: Path) -> list[dict]:
    text = (index_dir / STAGING_NAME / STAGING_JOURNAL_NAME).read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_killed_build_resumes_to_the_uninterrupted_index(
    source, uninterrupted, tmp_path, tiny_clip
):
    out = tmp_path / "killed.idx"
    _killed_build(source, out, tiny_clip, "encoded@7")  # 7 batches of 2: 3 chunks of 4 written
    chunks = _journal(out)
    assert [c["items"] for c in chunks] == [[0, 4], [4, 8], [8, 12]]
    kept = sum(c["rows"] for c in chunks)
    calls: list[tuple[int, int]] = []
    report = _build(source, out, tiny_clip, resume=True, progress=lambda d, t: calls.append((d, t)))
    assert report.resumed == kept > 0
    assert calls[0] == (12, 24)  # progress starts at the files kept
    assert report.to_dict()["resumed"] == kept
    assert (report.indexed, report.skipped, report.duplicates) == (22, 2, 1)
    assert_same_index(uninterrupted, out)
    assert not (out / STAGING_NAME).exists()


def test_duplicate_of_a_kept_chunk_is_found_after_resume(source, tmp_path, tiny_clip):
    out = tmp_path / "dup.idx"
    _killed_build(source, out, tiny_clip, "encoded@3")  # the original (img_001) is in chunk 0
    assert len(_journal(out)) == 1
    _build(source, out, tiny_clip)  # the same command again resumes
    skipped = pq.read_table(Generation.current(out).path / "skipped.parquet").to_pylist()
    assert {
        "path": str(source / "z-late" / "copy-of-1.png"),
        "reason": "duplicate of " + str(source / "img_001.png"),
    } in skipped


def test_a_torn_journal_line_is_redone(source, uninterrupted, tmp_path, tiny_clip):
    out = tmp_path / "torn.idx"
    _killed_build(source, out, tiny_clip, "encoded@5")
    journal = out / STAGING_NAME / STAGING_JOURNAL_NAME
    with open(journal, "a") as f:
        f.write('{"chunk": 2, "items": [8, 1')  # killed while appending
    kept = _journal_lines(journal.read_text())
    assert len(kept) == 2
    report = _build(source, out, tiny_clip, resume=True)
    assert report.resumed == sum(c["rows"] for c in kept)
    assert_same_index(uninterrupted, out)


def _journal_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


@pytest.fixture()
def interrupted(source: Path, tmp_path: Path, tiny_clip: Path) -> Path:
    """An index folder holding a killed build with two finished chunks."""
    out = tmp_path / "int.idx"
    _killed_build(source, out, tiny_clip, "encoded@5")
    assert len(_journal(out)) == 2
    return out


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (
            {"patch_codec": "int8"},
            "it stores patches as fp16, this build asks for --patch-codec int8",
        ),
        ({"batch_size": 4}, "--batch-size 2, this build has 4"),
    ],
)
def test_resume_with_other_settings_is_refused(interrupted, source, tiny_clip, change, words):
    before = sorted(p.name for p in (interrupted / STAGING_NAME).iterdir())
    with pytest.raises(InvalidArgumentError) as e:
        _build(source, interrupted, tiny_clip, resume=True, **change)
    message = str(e.value)
    assert "\n" not in message and words in message and "without --resume" in message
    assert sorted(p.name for p in (interrupted / STAGING_NAME).iterdir()) == before


def test_resume_with_another_model_or_source_is_refused(
    interrupted, source, tmp_path, tiny_clip, other_clip
):
    with pytest.raises(InvalidArgumentError, match="started with model .* other weights|uses"):
        _build(source, interrupted, other_clip, resume=True)
    other = tmp_path / "other"
    write_images(other, 3, seed=9)
    with pytest.raises(InvalidArgumentError, match="started from SOURCE"):
        _build(other, interrupted, tiny_clip, resume=True)
    assert len(_journal(interrupted)) == 2  # nothing was deleted


def test_without_resume_a_different_build_starts_over(interrupted, source, tiny_clip):
    report = _build(source, interrupted, tiny_clip, patch_codec="int8")
    assert report.resumed == 0 and report.indexed == 22 and report.patch_codec == "int8"


def test_no_resume_starts_over(interrupted, source, uninterrupted, tiny_clip):
    report = _build(source, interrupted, tiny_clip, resume=False)
    assert report.resumed == 0
    assert_same_index(uninterrupted, interrupted)


def test_resume_with_nothing_in_progress_is_one_line_before_the_model_loads(source, tmp_path):
    with pytest.raises(InvalidArgumentError) as e:
        build_index(source, tmp_path / "none.idx", model=tmp_path / "no-model", resume=True)
    assert "holds no build in progress" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "none.idx").exists()


def test_a_changed_file_is_not_kept(source, tmp_path, tiny_clip):
    copy = tmp_path / "photos"
    shutil.copytree(source, copy)
    out = tmp_path / "changed.idx"
    _killed_build(copy, out, tiny_clip, "encoded@5")
    os.utime(copy / "img_000.png", (1, 1))  # its modification time changed after it was encoded
    with pytest.raises(InvalidArgumentError, match="img_000.png changed since it was encoded"):
        _build(copy, out, tiny_clip, resume=True)
    assert _build(copy, out, tiny_clip).resumed == 0  # the same command starts over


def test_overwrite_killed_keeps_the_old_generation_and_gc_keeps_the_staging(
    source, uninterrupted, tmp_path, tiny_clip
):
    """The committed generation stays readable; a commit by another writer abandons the build."""
    from crossrank import Index
    from crossrank.store.gc import staging_is_stale
    from crossrank.write import remove_images

    out = tmp_path / "over.idx"
    shutil.copytree(uninterrupted, out)
    _killed_build(source, out, tiny_clip, "encoded@5", overwrite=True)
    with Index.open(out, device="cpu") as index:  # the previous generation, untouched
        assert index.generation == 1 and len(index) == 22
    assert not staging_is_stale(out)
    info = json.loads((out / STAGING_NAME / STAGING_INFO_NAME).read_text())
    assert info["base_generation"] == 1 and info["first_id"] == 22
    # another writer commits: the build can no longer resume, and its staging goes
    remove_images(out, ids=[0])
    assert not (out / STAGING_NAME).exists()
    with pytest.raises(InvalidArgumentError, match="holds no build in progress"):
        _build(source, out, tiny_clip, resume=True, overwrite=True)


def test_resume_after_overwrite_gives_ids_after_the_old_ones(
    source, uninterrupted, tmp_path, tiny_clip
):
    out = tmp_path / "over.idx"
    shutil.copytree(uninterrupted, out)
    _killed_build(source, out, tiny_clip, "encoded@5", overwrite=True)
    report = _build(source, out, tiny_clip, resume=True)  # --resume implies the overwrite
    assert report.resumed > 0 and report.generation == 2
    ids = np.asarray(Generation.current(out).ids())
    assert ids.tolist() == list(range(22, 44))


def test_cli_resume_reports_the_images_kept(source, tmp_path, tiny_clip):
    """A build killed while committing has every chunk journaled: the resume encodes nothing."""
    from crossrank.cli import app

    out = tmp_path / "cli.idx"
    _killed_build(source, out, tiny_clip, "segments-written", chunk_items=1 << 14)
    argv = ["build", str(source), "--index", str(out), "--model", str(tiny_clip)]
    argv += ["--device", "cpu", "--batch-size", "2", "--resume", "--json"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    report = json.loads(result.stdout)
    assert report["resumed"] == report["indexed"] == 22
    again = CliRunner().invoke(app, argv)  # committed: nothing is in progress any more
    assert again.exit_code != 0 and "holds no build in progress" in again.stderr
