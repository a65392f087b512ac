"""Checksums of a committed generation: recorded at commit, reused for linked files, checked by
a full check; damaged files are one line each, never a traceback."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import crossrank.store.generation_writer as writer_module
from crossrank.store import (
    FORMAT_VERSION,
    Generation,
    GenerationWriter,
    check_generation,
    inspect_generation,
    inspect_index,
    read_generation_info,
)
from crossrank.store.check import bytes_to_hash, file_digest

GEN = "gen-000001"


def _flip(path: Path, at: float = 0.75) -> None:
    """Change one byte inside ``path`` (past any header), keeping its size."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_commit_records_the_sha256_of_every_file(written) -> None:
    gen_dir = written.root / GEN
    info = read_generation_info(gen_dir)
    assert info.checksum_algorithm == "sha256"
    assert set(info.checksums) == set(info.files)
    for name, digest in info.checksums.items():
        assert digest == _sha256(gen_dir / name), name
    raw = json.loads((gen_dir / "generation.json").read_text())
    assert raw["checksums"]["algorithm"] == "sha256"
    # An optional field: no new format version, so an older crossrank still reads the index.
    assert raw["format_version"] == 1 and FORMAT_VERSION == 3


def test_a_full_check_of_a_sound_generation_hashes_every_byte(written) -> None:
    gen_dir = written.root / GEN
    report = inspect_generation(gen_dir, full=True)
    assert report.ok and report.notes == [] and report.full
    info = read_generation_info(gen_dir)
    assert report.files_hashed == len(info.files)
    assert report.bytes_hashed == sum(info.files.values()) == bytes_to_hash(gen_dir)


@pytest.mark.parametrize(
    "name", ["first_stage.faiss", "patches-001.npy", "vectors.npy", "metadata-001.parquet"]
)
def test_a_flipped_byte_is_caught_by_the_full_check_only(written, name: str) -> None:
    gen_dir = written.root / GEN
    _flip(gen_dir / name)
    assert check_generation(gen_dir) == []  # quick: sizes and shapes are intact
    report = inspect_index(written.root, full=True)
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(f"{gen_dir / name} is damaged: its bytes changed")
    assert report.bad_files == {name}


def test_a_generation_without_checksums_verifies_with_a_note(written) -> None:
    """An index written before checksums were recorded: structure checked, and said so."""
    gen_dir = written.root / GEN
    raw = json.loads((gen_dir / "generation.json").read_text())
    del raw["checksums"]
    (gen_dir / "generation.json").write_text(json.dumps(raw))
    assert read_generation_info(gen_dir).checksums == {}
    report = inspect_index(written.root, full=True)
    assert report.problems == [] and report.files_hashed == 0
    assert len(report.notes) == 1 and "checksums are not recorded in gen-000001" in report.notes[0]
    assert np.array_equal(Generation(gen_dir).ids(), written.ids)  # still opens for search


def test_a_checksum_missing_for_one_file_is_a_problem(written) -> None:
    gen_dir = written.root / GEN
    raw = json.loads((gen_dir / "generation.json").read_text())
    del raw["checksums"]["files"]["ids.npy"]
    (gen_dir / "generation.json").write_text(json.dumps(raw))
    assert check_generation(gen_dir, full=True) == [
        f"generation.json of {gen_dir} records no checksum for ids.npy"
    ]


def _corrupt(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbled header":
        data = bytearray(path.read_bytes())
        data[10:60] = b"{'descr': <f4', 'shape': ((((((((((((((((((((((("[:50]
        path.write_bytes(bytes(data))
    elif how == "not numpy":
        path.write_bytes(b"\x00" * path.stat().st_size)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbled header", "not numpy"])
@pytest.mark.parametrize(
    "name", ["ids.npy", "vectors.npy", "patches-000.npy", "metadata-000.parquet", "skipped.parquet"]
)
@pytest.mark.parametrize("full", [False, True])
def test_a_damaged_file_is_a_line_per_problem_never_a_traceback(
    written, name: str, how: str, full: bool
) -> None:
    path = written.root / GEN / name
    _corrupt(path, how)
    report = inspect_index(written.root, full=full)
    assert report.problems, (name, how)
    assert all(isinstance(p, str) and "\n" not in p for p in report.problems)
    assert any(str(path) in p for p in report.problems)


def test_tombstones_truncated_are_reported(written) -> None:
    base = Generation.current(written.root)
    with GenerationWriter(written.root, base=base) as w:
        w.link_patches()
        for part in base.info.metadata_parts:
            w.link_metadata_part(part)
        for name in ("vectors.npy", "ids.npy", "first_stage.faiss", "skipped.parquet"):
            w.link(name)
        w.write_tombstones(np.array([2, 4, 6]))
        w.commit({})
    path = written.root / "gen-000002" / "tombstones.npy"
    path.write_bytes(path.read_bytes()[:-9])
    problems = inspect_index(written.root, full=True).problems
    assert any(p.startswith(f"tombstones {path} cannot be read") for p in problems), problems


def test_linked_files_keep_their_recorded_checksum_without_being_read(written, monkeypatch) -> None:
    hashed: list[str] = []

    def counting(path, *args, **kwargs):
        hashed.append(Path(path).name)
        return file_digest(path, *args, **kwargs)

    monkeypatch.setattr(writer_module, "file_digest", counting)
    base = Generation.current(written.root)
    with GenerationWriter(written.root, base=base) as w:
        w.link_patches()
        for part in base.info.metadata_parts:
            w.link_metadata_part(part)
        for name in ("vectors.npy", "ids.npy", "first_stage.faiss", "skipped.parquet"):
            w.link(name)
        w.write_tombstones(np.array([2, 4]))
        w.commit({})
    assert hashed == ["tombstones.npy"]  # the one file this generation wrote
    new = read_generation_info(written.root / "gen-000002")
    assert set(new.checksums) == set(new.files)
    for name, digest in base.info.checksums.items():
        assert new.checksums[name] == digest
    assert inspect_index(written.root, full=True).problems == []


def test_a_base_without_checksums_gets_them_on_the_next_commit(written) -> None:
    gen_dir = written.root / GEN
    raw = json.loads((gen_dir / "generation.json").read_text())
    del raw["checksums"]
    (gen_dir / "generation.json").write_text(json.dumps(raw))
    base = Generation.current(written.root)
    with GenerationWriter(written.root, base=base) as w:
        w.link_patches()
        for part in base.info.metadata_parts:
            w.link_metadata_part(part)
        for name in ("vectors.npy", "ids.npy", "first_stage.faiss", "skipped.parquet"):
            w.link(name)
        w.commit({})
    report = inspect_index(written.root, full=True)
    assert report.ok and report.notes == [] and report.files_hashed == len(base.info.files)


def test_a_file_name_outside_the_generation_is_refused(written) -> None:
    gen_dir = written.root / GEN
    raw = json.loads((gen_dir / "generation.json").read_text())
    raw["files"]["../manifest.json"] = 10
    (gen_dir / "generation.json").write_text(json.dumps(raw))
    problems = check_generation(gen_dir, full=True)
    assert f"generation.json of {gen_dir} lists '../manifest.json', outside the folder" in problems
