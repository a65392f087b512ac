"""Bad input to a sharded index: each a one-line error that says what to do, and nothing of the
user's is touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import crossrank
from crossrank.cli import app
from crossrank.errors import (
    IndexCorruptError,
    IndexNotFoundError,
    InvalidArgumentError,
    ModelMismatchError,
)
from crossrank.shards import build_sharded, verify_sharded

from ..conftest import write_images


def _one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("shards", [0, -2, True, 2.5])
def test_a_bad_number_of_shards_is_refused_before_anything_loads(tmp_path, shards) -> None:
    with pytest.raises(InvalidArgumentError, match="--shards must be a whole number of shards"):
        build_sharded(tmp_path / "no-source", tmp_path / "idx", shards=shards)
    assert not (tmp_path / "idx").exists()


def test_the_cli_refuses_shards_0_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["build", str(tmp_path), "--index", str(tmp_path / "i"), "--shards", "0"]
    )
    assert result.exit_code == 2
    assert "--shards" in _one_line(result.output) and "whole number" in result.output


def test_more_shards_than_images(tmp_path: Path, tiny_clip: Path) -> None:
    source = tmp_path / "src"
    write_images(source, 3, seed=5)
    (source / "broken.png").write_bytes(b"no")
    with pytest.raises(InvalidArgumentError, match="--shards 5 is more than the 4 files"):
        build_sharded(source, tmp_path / "a.idx", shards=5, model=tiny_clip, device="cpu")
    # 4 files but only 3 images: found once decoding is done; nothing is left behind
    with pytest.raises(InvalidArgumentError, match="--shards 4 is more than the 3 images"):
        build_sharded(source, tmp_path / "b.idx", shards=4, model=tiny_clip, device="cpu")
    assert not (tmp_path / "a.idx").exists() and not (tmp_path / "b.idx").exists()
    result = CliRunner().invoke(
        app,
        [
            "build",
            str(source),
            "--index",
            str(tmp_path / "c.idx"),
            "--shards",
            "9",
            "--model",
            str(tiny_clip),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1 and "use --shards 4 or fewer" in _one_line(result.output)


def test_folders_that_are_not_a_sharded_index(
    pair, tmp_path: Path, shard_source, tiny_clip
) -> None:
    flat, sharded = pair
    with pytest.raises(InvalidArgumentError, match="holds an unsharded crossrank index"):
        build_sharded(shard_source, flat, shards=2, model=tiny_clip, overwrite=True)
    with pytest.raises(InvalidArgumentError, match="already holds a sharded index"):
        build_sharded(shard_source, sharded, shards=3, model=tiny_clip)
    with pytest.raises(InvalidArgumentError, match="has 3 shards, not 2"):
        build_sharded(shard_source, sharded, shards=2, model=tiny_clip, overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="not a crossrank index and is not empty"):
        build_sharded(shard_source, mine, shards=2, model=tiny_clip)
    assert (mine / "notes.txt").read_text() == "keep me"


def _broken_copy(pair, tmp_path: Path) -> Path:
    return Path(
        shutil.copytree(pair[1], tmp_path / "s.idx", ignore=shutil.ignore_patterns("*.pin"))
    )


def test_a_missing_shard_folder_is_named_by_open_search_and_verify(pair, tmp_path: Path) -> None:
    index_dir = _broken_copy(pair, tmp_path)
    shutil.rmtree(index_dir / "shard-001")
    with pytest.raises(IndexNotFoundError, match=r"shard 1 \(.*shard-001\) is missing; put"):
        crossrank.open(index_dir, device="cpu")
    problems = verify_sharded(index_dir)
    assert len(problems) == 1 and "shard 1" in problems[0] and "is missing" in problems[0]
    result = CliRunner().invoke(app, ["search", str(index_dir), "a cat", "--device", "cpu"])
    assert result.exit_code == 1 and "shard 1" in _one_line(result.output)
    result = CliRunner().invoke(app, ["verify", str(index_dir), "--quick"])
    assert result.exit_code == 1 and "shard 1" in _one_line(result.output)
    with pytest.raises(IndexNotFoundError, match="shard 1"):  # writers refuse too
        crossrank.shards.remove_sharded(index_dir, ids=[1])


def test_a_shard_of_another_model_is_named(pair, tmp_path: Path, shard_source, other_clip) -> None:
    index_dir = _broken_copy(pair, tmp_path)
    other = tmp_path / "other.idx"
    build_sharded(shard_source, other, shards=3, model=other_clip, device="cpu", batch_size=16)
    shutil.rmtree(index_dir / "shard-002")
    shutil.copytree(other / "shard-002", index_dir / "shard-002")
    with pytest.raises(ModelMismatchError, match=r"shard 2 \(.*\) was built with model"):
        crossrank.open(index_dir, device="cpu")
    problems = verify_sharded(index_dir)
    assert len(problems) == 1 and problems[0].startswith("shard 2") and "model" in problems[0]
    result = CliRunner().invoke(app, ["search", str(index_dir), "a cat", "--device", "cpu"])
    assert result.exit_code == 1 and "shard 2" in _one_line(result.output)


def test_a_damaged_shards_json_is_one_line(pair, tmp_path: Path) -> None:
    index_dir = _broken_copy(pair, tmp_path)
    (index_dir / "shards.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="shards.json cannot be read.*crossrank verify"):
        crossrank.open(index_dir, device="cpu")
    data = json.loads((pair[1] / "shards.json").read_text())
    data["format_version"] = 99
    (index_dir / "shards.json").write_text(json.dumps(data))
    with pytest.raises(IndexCorruptError, match="upgrade crossrank"):
        crossrank.open(index_dir, device="cpu")


def test_a_pq_codec_too_big_for_each_shard_is_refused_before_encoding(
    shard_source: Path, tiny_clip: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgumentError, match="cannot be trained on each shard's 21 files"):
        build_sharded(
            shard_source, tmp_path / "pq.idx", shards=2, model=tiny_clip, patch_codec="pq:4x4"
        )
    assert not (tmp_path / "pq.idx").exists()


def test_index_open_of_a_sharded_folder_says_how_to_open_it(pair) -> None:
    from crossrank import Index

    with pytest.raises(InvalidArgumentError, match=r"is a sharded index; open it with crossrank"):
        Index.open(pair[1])


def test_an_unsharded_rebuild_into_a_sharded_folder_is_refused(pair_copy, shard_source) -> None:
    from crossrank.write import build_index

    sharded = pair_copy[1]
    before = (sharded / "shards.json").read_bytes()
    with pytest.raises(InvalidArgumentError, match=r"is a sharded index; rebuild it with --shards"):
        build_index(shard_source, sharded, overwrite=True, device="cpu")
    assert (sharded / "shards.json").read_bytes() == before
