"""`crossrank info` and `crossrank verify`: the encoder named, user text printed literally, full
and quick verification, one line per problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crossrank.cli import app
from crossrank.encoders.describe import DEMO_NOTE

# A folder name rich would read as markup: "[/x]" crashes a markup parse, "[bold]" vanishes.
ODD = "[/x] [bold]m"


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def odd_copy(built_index: Path, tmp_path: Path) -> Path:
    """A private copy of ``built_index`` under a folder whose name looks like rich markup."""
    return Path(shutil.copytree(built_index, tmp_path / ODD / "photos.idx"))


def _gen(index_dir: Path) -> Path:
    return index_dir / json.loads((index_dir / "manifest.json").read_text())["generation_dir"]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * 0.6)] ^= 0x41
    path.write_bytes(bytes(data))


def _as_demo(index_dir: Path) -> None:
    """Make the manifest say the index was built with the demo encoder (info opens no model)."""
    path = index_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["encoder"].update(model_id="crossrank-demo", source="demo")
    path.write_text(json.dumps(manifest))


# -- info ---------------------------------------------------------------------------------------


def test_info_prints_user_text_literally_and_names_the_model(odd_copy, tiny_clip, runner) -> None:
    result = runner.invoke(app, ["info", str(odd_copy)])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    text = " ".join(result.stdout.split())
    assert str(odd_copy.resolve()) in text  # brackets and all
    assert f"model {tiny_clip} (clip)" in text
    assert "note:" not in text  # not the demo encoder


def test_info_says_in_one_line_what_the_demo_encoder_is(odd_copy, runner) -> None:
    _as_demo(odd_copy)
    result = runner.invoke(app, ["info", str(odd_copy)], terminal_width=80)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert f"note: {DEMO_NOTE}" in result.stdout.splitlines()
    assert "model crossrank-demo (clip)" in " ".join(result.stdout.split())
    out = json.loads(runner.invoke(app, ["info", str(odd_copy), "--json"]).stdout)
    assert out["encoder_description"] == {
        "model_id": "crossrank-demo",
        "model_type": "clip",
        "demo": True,
        "note": DEMO_NOTE,
    }
    assert out["encoder"]["model_id"] == "crossrank-demo"  # the manifest's record, unchanged
    assert out["default_reranker"] == "none"  # the weights are not the demo encoder's


def test_info_names_the_shipped_reranker_of_the_demo_encoder(odd_copy, runner) -> None:
    from crossrank.rerank.checkpoint import demo_reranker_dir

    shipped = json.loads((demo_reranker_dir() / "config.json").read_text())
    path = odd_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["encoder"]["weights_sha256"] = shipped["metadata"]["data"]["encoder"]
    path.write_text(json.dumps(manifest))
    out = json.loads(runner.invoke(app, ["info", str(odd_copy), "--json"]).stdout)
    assert out["default_reranker"] == str(demo_reranker_dir())  # what --init-from can start from


def test_info_skipped_prints_paths_literally(built_index, runner) -> None:
    result = runner.invoke(app, ["info", str(built_index), "--skipped"])
    assert result.exit_code == 0
    assert "broken.png" in result.stdout


@pytest.mark.parametrize("name", ["ids.npy", "vectors.npy", "patches-000.npy"])
def test_info_and_search_of_an_emptied_array_file_are_one_line(odd_copy, runner, name) -> None:
    path = _gen(odd_copy) / name
    path.write_bytes(b"")  # numpy raises EOFError here, which click prints as a bare "Aborted."
    for args in (["info", str(odd_copy)], ["search", str(odd_copy), "a cat", "--device", "cpu"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: ") and str(path) in lines[0]
        assert "empty file (0 bytes)" in lines[0] and "crossrank verify" in lines[0]


# -- verify -------------------------------------------------------------------------------------


def test_verify_hashes_every_file_by_default(index_copy, runner) -> None:
    result = runner.invoke(app, ["verify", str(index_copy)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("ok: 24 images, generation 1, every file matches its recorded")
    out = json.loads(runner.invoke(app, ["verify", str(index_copy), "--json"]).stdout)
    assert out["ok"] is True and out["mode"] == "full" and out["notes"] == []
    assert out["files_hashed"] == len(
        json.loads((_gen(index_copy) / "generation.json").read_text())["files"]
    )
    quick = runner.invoke(app, ["verify", str(index_copy), "--quick"])
    assert quick.exit_code == 0 and "quick: structure and sizes" in quick.stdout


def test_verify_catches_a_flipped_byte_and_quick_does_not(odd_copy, runner) -> None:
    path = _gen(odd_copy) / "vectors.npy"
    _flip(path)
    assert runner.invoke(app, ["verify", str(odd_copy), "--quick"]).exit_code == 0
    result = runner.invoke(app, ["verify", str(odd_copy)])
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} is damaged")  # literal path
    out = runner.invoke(app, ["verify", str(odd_copy), "--json"])
    assert out.exit_code == 1
    assert json.loads(out.stdout)["problems"][0].startswith(f"{path} is damaged")


def test_verify_of_a_truncated_id_table_is_one_line_per_problem(odd_copy, runner) -> None:
    path = _gen(odd_copy) / "ids.npy"
    path.write_bytes(path.read_bytes()[:-16])
    for args in ([], ["--quick"]):
        result = runner.invoke(app, ["verify", str(odd_copy), *args])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        lines = result.stderr.splitlines()
        assert lines[0].startswith(f"error: {path} has ")
        assert f"error: ids {path} cannot be read (ValueError: mmap length" in lines[1]
        assert all(line.startswith("error: ") for line in lines)
        assert "Traceback" not in result.stderr + result.stdout


def test_verify_of_an_index_without_checksums_passes_with_a_note(index_copy, runner) -> None:
    gen_json = _gen(index_copy) / "generation.json"
    raw = json.loads(gen_json.read_text())
    del raw["checksums"]
    gen_json.write_text(json.dumps(raw))
    result = runner.invoke(app, ["verify", str(index_copy)])
    assert result.exit_code == 0
    assert result.stderr.startswith("note: checksums are not recorded in gen-000001")
    assert "contents not hashed" in result.stdout
    out = json.loads(runner.invoke(app, ["verify", str(index_copy), "--json"]).stdout)
    assert out["ok"] is True and out["files_hashed"] == 0 and len(out["notes"]) == 1


# -- patch codecs ---------------------------------------------------------------------------------


def test_info_reports_the_patch_codec_and_bytes_per_image(built_index, runner, tmp_path) -> None:
    out = json.loads(runner.invoke(app, ["info", str(built_index), "--json"]).stdout)
    assert out["patch_codec"] == "fp16" and out["patch_bytes_per_image"] == 16 * 32 * 2
    assert out["default_reranker"] == "none"  # a tiny CLIP: no reranker trained over it
    text = " ".join(runner.invoke(app, ["info", str(built_index)]).stdout.split())
    assert "patches 16 x 32 fp16 (1.0 kB per image)" in text


def test_info_and_verify_of_an_int8_index(image_folder, tiny_clip, runner, tmp_path) -> None:
    from crossrank.write.build import build_index

    index = tmp_path / "int8.idx"
    build_index(image_folder, index, model=tiny_clip, device="cpu", workers=2, patch_codec="int8")
    out = json.loads(runner.invoke(app, ["info", str(index), "--json"]).stdout)
    assert out["patch_codec"] == "int8" and out["patch_bytes_per_image"] == 16 * (32 + 2)
    assert out["format_version"] == 3
    text = " ".join(runner.invoke(app, ["info", str(index)]).stdout.split())
    assert "patches 16 x 32 int8 (544 bytes per image)" in text
    result = runner.invoke(app, ["verify", str(index)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.startswith("ok: 24 images")
