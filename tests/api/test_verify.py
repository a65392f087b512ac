"""verify_index / verify_report: quick and full checks of real indexes, damaged on purpose, and
the checksums that build, add, remove and compact record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossrank.api.verify import verify_index, verify_report
from crossrank.store import read_generation_info, read_manifest

from ..conftest import write_images


def _current(index_dir: Path) -> Path:
    return read_manifest(index_dir).generation_path


def _flip(path: Path, at: float = 0.6) -> None:
    """Change one byte well inside ``path``, keeping its size (what a bad disk sector does)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x41
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name", ["first_stage.faiss", "patches-000.npy", "vectors.npy", "metadata-000.parquet"]
)
def test_full_verify_names_a_file_whose_bytes_changed(index_copy: Path, name: str) -> None:
    path = _current(index_copy) / name
    _flip(path)
    assert verify_index(index_copy) == []  # quick: structure and sizes cannot see it
    problems = verify_index(index_copy, full=True)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path} is damaged: its bytes changed after commit (sha256 ")


def test_full_verify_of_a_sound_index_hashes_every_file(index_copy: Path) -> None:
    report = verify_report(index_copy, full=True)
    info = read_generation_info(_current(index_copy))
    assert report.ok and report.notes == []
    assert report.files_hashed == len(info.files) and report.bytes_hashed == sum(
        info.files.values()
    )
    assert verify_report(index_copy).files_hashed == 0  # quick hashes nothing


def test_an_index_without_recorded_checksums_verifies_with_a_note(index_copy: Path) -> None:
    gen_json = _current(index_copy) / "generation.json"
    raw = json.loads(gen_json.read_text())
    del raw["checksums"]
    gen_json.write_text(json.dumps(raw))
    report = verify_report(index_copy, full=True)
    assert report.problems == []
    assert report.notes == [
        "checksums are not recorded in gen-000001 (written by an older crossrank): structure "
        "and sizes were checked, file contents were not; the next add, remove or compact "
        "records them"
    ]


@pytest.mark.parametrize("full", [False, True])
def test_a_truncated_id_table_is_one_line_per_problem(index_copy: Path, full: bool) -> None:
    path = _current(index_copy) / "ids.npy"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 40])
    problems = verify_index(index_copy, full=full)
    assert problems[:2] == [
        f"{path} has {size - 40} bytes, generation.json records {size}",
        f"ids {path} cannot be read (ValueError: mmap length is greater than file size)",
    ]


@pytest.mark.parametrize("damage", ["zeros", "truncated", "empty"])
@pytest.mark.parametrize("full", [False, True])
def test_a_garbled_first_stage_is_a_line_not_a_crash(
    index_copy: Path, damage: str, full: bool
) -> None:
    path = _current(index_copy) / "first_stage.faiss"
    data = path.read_bytes()
    path.write_bytes(
        {"zeros": bytes(len(data)), "truncated": data[: len(data) // 3], "empty": b""}[damage]
    )
    problems = verify_index(index_copy, full=full)
    assert problems and all("\n" not in p for p in problems)
    assert any(str(path) in p for p in problems)


def _assert_checksummed(index_dir: Path) -> None:
    gen = _current(index_dir)
    info = read_generation_info(gen)
    assert info.checksum_algorithm == "sha256"
    assert set(info.checksums) == set(info.files)
    assert verify_report(index_dir, full=True).problems == []


def test_build_add_remove_and_compact_all_record_checksums(living: tuple[Path, Path]) -> None:
    from crossrank.write import add_images, compact_index, remove_images

    source, index_dir = living
    _assert_checksummed(index_dir)  # build
    write_images(source / "more", 2, seed=77)
    assert add_images(source, index_dir, device="cpu", workers=1).committed
    _assert_checksummed(index_dir)
    added = read_generation_info(_current(index_dir))
    remove_images(index_dir, ids=[0, 1])
    _assert_checksummed(index_dir)
    removed = read_generation_info(_current(index_dir))
    assert removed.generation == added.generation + 1
    for name in ("vectors.npy", "ids.npy", "first_stage.faiss"):  # linked, checksum carried over
        assert removed.checksums[name] == added.checksums[name]
    compact_index(index_dir)
    _assert_checksummed(index_dir)
    assert read_generation_info(_current(index_dir)).n_tombstones == 0
