"""The command line end to end: build -> search -> info -> verify, --json shapes and exit codes."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from crossrank.cli import app

from ..conftest import committed_state, write_images

QUERY = "a red circle left of a blue square"


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _ok(result) -> None:
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)


def _search_json(runner: CliRunner, *args: str) -> dict:
    result = runner.invoke(app, ["search", *args, "--device", "cpu", "--json"])
    _ok(result)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def odd_folder(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, list[Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("cli-photos")
    good = write_images(root / "photos", 10, seed=5)
    data = good[0].read_bytes()
    bad = {
        "truncated": root / "photos" / "truncated.png",
        "zero": root / "photos" / "zero.png",
        "text": root / "photos" / "readme.png",
    }
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("not an image\n")
    return root, good, bad


@pytest.fixture(scope="module")
def cli_build(odd_folder, tiny_clip, runner):
    """`crossrank build photos --index photos.idx`, with relative paths, from the folder above."""
    root, good, bad = odd_folder
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = runner.invoke(
            app,
            [
                "build",
                "photos",
                "--index",
                "photos.idx",
                "--model",
                str(tiny_clip),
                "--device",
                "cpu",
                "--batch-size",
                "4",
                "--workers",
                "2",
            ],
        )
    return root / "photos.idx", result


# -- build -> search -> info -> verify -----------------------------------------------------------


def test_build_exits_0_and_counts_the_skipped_files(cli_build):
    index, result = cli_build
    _ok(result)
    assert "indexed 10 images, skipped 3" in result.stdout
    assert "crossrank info photos.idx --skipped" in result.stdout
    assert (index / "manifest.json").is_file()


def test_build_json_summary(tmp_path, tiny_clip, runner):
    write_images(tmp_path / "few", 3, seed=6)
    result = runner.invoke(
        app,
        [
            "build",
            str(tmp_path / "few"),
            "--index",
            str(tmp_path / "few.idx"),
            "--model",
            str(tiny_clip),
            "--device",
            "cpu",
            "--json",
        ],
    )
    _ok(result)
    summary = json.loads(result.stdout)
    assert set(summary) == {
        "index",
        "generation",
        "indexed",
        "skipped",
        "seconds",
        "images_per_second",
        "factory",
        "model",
        "duplicates",
        "resumed",
        "encoder",
    }
    assert summary["duplicates"] == 0 and summary["resumed"] == 0
    assert summary["encoder"]["model_id"] == str(tiny_clip) and not summary["encoder"]["demo"]
    assert (summary["indexed"], summary["skipped"], summary["generation"], summary["factory"]) == (
        3,
        0,
        1,
        "Flat",
    )
    assert summary["model"] == str(tiny_clip)


def test_search_json_has_the_documented_shape(cli_build, odd_folder, runner):
    index, _ = cli_build
    _, good, _ = odd_folder
    out = _search_json(
        runner, str(index), QUERY, "-k", "3", "--rerank-k", "8", "--reranker", "maxsim"
    )
    assert list(out) == [
        "query",
        "hits",
        "counts",
        "timings_ms",
        "generation",
        "encoder",
        "reranker",
        "fusion",
        "notes",
    ]
    assert out["reranker"] == "maxsim" and out["fusion"] == "rerank" and out["notes"] == []
    assert out["encoder"]["demo"] is False and out["encoder"]["note"] is None
    assert out["query"] == QUERY
    assert out["generation"] == 1  # a fresh build is generation 1
    assert len(out["hits"]) == 3
    for hit in out["hits"]:
        assert list(hit) == ["id", "path", "score", "scores", "metadata"]
        assert list(hit["scores"]) == ["first_stage", "rerank"]
        assert isinstance(hit["scores"]["first_stage"], float) and isinstance(
            hit["scores"]["rerank"], float
        )
        assert hit["score"] == hit["scores"]["rerank"]
        assert (
            Path(hit["path"]).is_absolute() and Path(hit["path"]) in good
        )  # built from a relative SOURCE
        assert {"sha256", "width", "height", "bytes", "mtime"} <= set(hit["metadata"])
    scores = [h["score"] for h in out["hits"]]
    assert scores == sorted(scores, reverse=True)
    assert {"requested": 3, "returned": 3, "filtered_out": 0}.items() <= out["counts"].items()
    assert {"encode", "first_stage", "rerank", "metadata", "total"} <= set(out["timings_ms"])
    assert all(isinstance(ms, float) and ms >= 0 for ms in out["timings_ms"].values())


def test_search_without_reranker_reports_null_rerank_scores(cli_build, runner):
    index, _ = cli_build
    out = _search_json(runner, str(index), QUERY, "-k", "4", "--reranker", "none")
    assert [h["scores"]["rerank"] for h in out["hits"]] == [None] * 4
    assert [h["score"] for h in out["hits"]] == [h["scores"]["first_stage"] for h in out["hits"]]


def test_search_where_counts_what_was_filtered_out(cli_build, runner):
    index, _ = cli_build
    out = _search_json(runner, str(index), QUERY, "-k", "5", "--where", "id IN (1, 4)")
    assert sorted(h["id"] for h in out["hits"]) == [1, 4]
    assert {"requested": 5, "returned": 2, "filtered_out": 8}.items() <= out["counts"].items()
    nothing = _search_json(runner, str(index), QUERY, "--where", "id < 0")
    assert nothing["hits"] == []
    assert {"requested": 10, "returned": 0, "filtered_out": 10}.items() <= nothing["counts"].items()


def test_search_by_image_finds_that_image_first(cli_build, odd_folder, runner):
    index, _ = cli_build
    _, good, _ = odd_folder
    out = _search_json(runner, str(index), "--image", str(good[7]), "-k", "2")
    assert out["hits"][0]["path"] == str(good[7])
    assert out["query"] == str(good[7])


def test_search_table_says_when_the_list_is_short(cli_build, runner):
    index, _ = cli_build
    result = runner.invoke(
        app, ["search", str(index), QUERY, "-k", "4", "--where", "id < 2", "--device", "cpu"]
    )
    _ok(result)
    assert "2 of 4 requested · 8 filtered out" in result.stdout
    assert "first stage" in result.stdout and "rerank" in result.stdout


def test_info_describes_the_index(cli_build, tiny_clip, runner):
    index, _ = cli_build
    result = runner.invoke(app, ["info", str(index), "--json"])
    _ok(result)
    facts = json.loads(result.stdout)
    assert facts["path"] == str(index.resolve())
    assert facts["counts"] == {"images": 10, "skipped": 3}
    assert facts["encoder"]["model_id"] == str(tiny_clip)
    assert facts["first_stage"]["ntotal"] == 10
    human = runner.invoke(app, ["info", str(index)])
    _ok(human)
    assert "images" in human.stdout and "10" in human.stdout and "Flat" in human.stdout


def test_info_skipped_lists_each_file_with_a_reason(cli_build, odd_folder, runner):
    index, _ = cli_build
    _, _, bad = odd_folder
    result = runner.invoke(app, ["info", str(index), "--skipped", "--json"])
    _ok(result)
    rows = json.loads(result.stdout)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in bad.values())
    assert all(set(r) == {"path", "reason"} and r["reason"].strip() for r in rows)
    table = runner.invoke(app, ["info", str(index), "--skipped"])
    _ok(table)
    assert "3 skipped files" in table.stdout
    for row in rows:
        assert row["reason"].split()[0] in table.stdout


def test_verify_ok(cli_build, runner):
    index, _ = cli_build
    result = runner.invoke(app, ["verify", str(index)])
    _ok(result)
    assert "ok: 10 images, generation 1" in result.stdout
    out = json.loads(runner.invoke(app, ["verify", str(index), "--json"]).stdout)
    assert {k: out[k] for k in ("ok", "images", "generation", "problems")} == {
        "ok": True,
        "images": 10,
        "generation": 1,
        "problems": [],
    }
    assert out["mode"] == "full" and out["files_hashed"] > 0


def test_verify_exits_1_naming_a_deleted_patch_shard(index_copy, runner):
    shard = index_copy / "gen-000001" / "patches-000.npy"
    shard.unlink()
    result = runner.invoke(app, ["verify", str(index_copy)])
    assert result.exit_code == 1
    assert result.stderr.splitlines()[0] == f"error: {shard} is missing"
    out = runner.invoke(app, ["verify", str(index_copy), "--json"])
    assert out.exit_code == 1
    assert json.loads(out.stdout)["problems"][0] == f"{shard} is missing"


def test_verify_exits_1_on_a_count_mismatch(index_copy, runner):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["counts"]["images"] = 25
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["verify", str(index_copy)])
    assert result.exit_code == 1
    assert (
        result.stderr.strip()
        == "error: manifest counts.images is 25, generation gen-000001 holds 24"
    )


# -- manifests ----------------------------------------------------------------------------------


def test_manifest_columns_reach_hits_and_where(tmp_path, tiny_clip, runner):
    images = write_images(tmp_path / "data" / "img", 6, seed=8)
    with (tmp_path / "data" / "list.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "year"])
        for i, p in enumerate(images):
            w.writerow([f"img/{p.name}", "dog" if i < 2 else "cat", 2020 + i])
    _ok(
        runner.invoke(
            app,
            [
                "build",
                str(tmp_path / "data" / "list.csv"),
                "--index",
                str(tmp_path / "m.idx"),
                "--model",
                str(tiny_clip),
                "--device",
                "cpu",
            ],
        )
    )
    out = _search_json(
        runner,
        str(tmp_path / "m.idx"),
        QUERY,
        "-k",
        "6",
        "--where",
        "label = 'cat' AND year < 2024",
    )
    assert sorted(h["path"] for h in out["hits"]) == [str(images[2]), str(images[3])]
    assert sorted((h["metadata"]["label"], h["metadata"]["year"]) for h in out["hits"]) == [
        ("cat", 2022),
        ("cat", 2023),
    ]
    assert {"requested": 6, "returned": 2, "filtered_out": 4}.items() <= out["counts"].items()


# -- bad input: exit 1, one line, no traceback, nothing committed changes --------------------------


def _write_bad_manifests(tmp: Path) -> None:
    (tmp / "nopath.csv").write_text("file,label\na.png,cat\n")
    (tmp / "broken.parquet").write_bytes(b"PAR1 not parquet")


# args ({idx}: a copy of a built index, {tmp}: a scratch folder, {clip}/{other}: models) -> message
BAD = {
    "missing-source": (
        ["build", "{tmp}/nowhere", "--index", "{idx}", "--model", "{clip}", "--overwrite"],
        r"SOURCE .*nowhere does not exist",
    ),
    "existing-index": (
        ["build", "{photos}", "--index", "{idx}", "--model", "{clip}"],
        r"already holds an index \(24 images\); pass --overwrite",
    ),
    "unreadable-manifest": (
        ["build", "{tmp}/broken.parquet", "--index", "{idx}", "--model", "{clip}", "--overwrite"],
        r"cannot read manifest .*broken\.parquet",
    ),
    "manifest-without-path": (
        ["build", "{tmp}/nopath.csv", "--index", "{idx}", "--model", "{clip}", "--overwrite"],
        r"has no `path` column",
    ),
    "missing-index": (
        ["search", "{tmp}/no.idx", QUERY],
        r"no committed index in .*no\.idx; build one",
    ),
    "info-missing-index": (["info", "{tmp}/no.idx"], r"no committed index in"),
    "search-the-image-folder": (
        ["search", "{photos}", QUERY],
        r"no committed index in .*photos\d*: it is a folder of other files, not a crossrank index",
    ),
    "verify-missing-index": (["verify", "{tmp}/no.idx"], r"no committed index in"),
    "other-model": (
        ["search", "{idx}", QUERY, "--model", "{other}"],
        r"built with model '.*tiny-clip', but queries would be encoded with '.*other-clip'",
    ),
    "malformed-where": (
        ["search", "{idx}", QUERY, "--where", "width >"],
        r'where "width >" is not a valid SQL',
    ),
    "unknown-column": (
        ["search", "{idx}", QUERY, "--where", "label = 'x'"],
        r'unknown column "label"',
    ),
    "k-zero": (
        ["search", "{idx}", QUERY, "-k", "0"],
        r"k must be a positive number of hits, got 0",
    ),
    "rerank-k-below-k": (
        ["search", "{idx}", QUERY, "-k", "5", "--rerank-k", "3"],
        r"rerank_k must be >= k",
    ),
    "empty-query": (["search", "{idx}", "  "], r"query is empty"),
    # bytes that are not UTF-8 in argv or stdin reach Python as lone surrogates
    "non-utf8-query": (
        ["search", "{idx}", "a red \udcff circle"],
        r"query 'a red \\udcff circle' is not valid text: it holds bytes that are not UTF-8",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_1(
    case, index_copy, image_folder, tmp_path, tiny_clip, other_clip, runner
):

    _write_bad_manifests(tmp_path)
    args, match = BAD[case]
    args = [
        a.format(
            idx=index_copy, tmp=tmp_path, clip=tiny_clip, other=other_clip, photos=image_folder
        )
        for a in args
    ]
    if args[0] == "search":
        args += ["--device", "cpu"]
    before = committed_state(index_copy)
    result = runner.invoke(app, args)
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    assert isinstance(
        result.exception, SystemExit
    )  # handled: not an exception escaping with its traceback
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(match, lines[0])
    assert committed_state(index_copy) == before


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The real console script's code path in a fresh interpreter (tracebacks go to real stderr)."""
    return subprocess.run(
        [sys.executable, "-c", "from crossrank.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_errors_have_no_traceback_unless_verbose(tmp_path):
    quiet = _cli("info", str(tmp_path / "no.idx"))
    assert quiet.returncode == 1
    assert (
        quiet.stderr.strip()
        == f"error: no committed index in {tmp_path / 'no.idx'}; build one with "
        f"`crossrank build SOURCE --index {tmp_path / 'no.idx'}`"
    )
    assert "Traceback" not in quiet.stderr
    loud = _cli("--verbose", "info", str(tmp_path / "no.idx"))
    assert loud.returncode == 1
    assert "Traceback (most recent call last)" in loud.stderr
    assert "IndexNotFoundError: no committed index in" in loud.stderr


def test_query_and_image_are_one_or_the_other(built_index, image_folder, runner):
    args = ["search", str(built_index), "a cat", "--image", str(image_folder / "img_000.png")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "give either a QUERY text or --image PATH" in " ".join(result.stderr.split())


def test_usage_error_for_an_unknown_device(built_index, runner):
    result = runner.invoke(app, ["search", str(built_index), "a cat", "--device", "tpu"])
    assert result.exit_code == 2
    assert "tpu" in result.stderr


def test_search_cli_equals_the_api(built_index, runner):
    from crossrank import Index

    out = _search_json(
        runner,
        str(built_index),
        QUERY,
        "-k",
        "5",
        "--rerank-k",
        "12",
        "--where",
        "id % 2 = 1",
        "--fusion",
        "weighted:0.5",
    )
    api = Index.open(built_index, device="cpu").search(
        QUERY, k=5, rerank_k=12, where="id % 2 = 1", fusion="weighted:0.5"
    )
    assert [h["id"] for h in out["hits"]] == [h.id for h in api]
    np.testing.assert_allclose([h["score"] for h in out["hits"]], [h.score for h in api], atol=1e-6)
    assert out["counts"] == api.counts.to_dict()


def test_build_failure_on_a_fresh_dir_leaves_no_index(tmp_path, tiny_clip, runner):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"nope")
    result = runner.invoke(
        app,
        [
            "build",
            str(tmp_path / "bad"),
            "--index",
            str(tmp_path / "x.idx"),
            "--model",
            str(tiny_clip),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1
    assert re.search(r"error: none of the 1 files in .* could be decoded", result.stderr)
    leftovers = list((tmp_path / "x.idx").iterdir()) if (tmp_path / "x.idx").exists() else []
    assert leftovers == []
    shutil.rmtree(tmp_path / "bad")


# -- what a search says, and what it refuses before the model loads -----------------------------


@pytest.fixture()
def encoder_loads(monkeypatch) -> list[str]:
    """Counts the encoders loaded (the CLI runs in this process)."""
    import crossrank.encoders

    loads: list[str] = []
    for name in ("load_encoder", "load_text_encoder"):  # the full model, the text tower alone
        real = getattr(crossrank.encoders, name)

        def counting(*args, _real=real, **kwargs):
            loads.append(str(args[0]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(crossrank.encoders, name, counting)
    return loads


def test_search_footer_names_the_encoder_reranker_and_the_train_hint(built_index, runner):
    result = runner.invoke(app, ["search", str(built_index), QUERY, "-k", "3", "--device", "cpu"])
    _ok(result)
    out = " ".join(result.stdout.split())
    assert "3 of 3 requested" in out
    assert "reranker none" in out and "encoder " in out and "tiny-clip" in out
    note = " ".join(result.stderr.split())
    assert note.count("crossrank train") == 1  # auto found no trained reranker: one hint


def test_the_demo_encoder_note_is_said_once_on_stderr(tmp_path, runner):
    from crossrank.encoders.describe import DEMO_NOTE

    write_images(tmp_path / "src", 3)
    _ok(runner.invoke(app, ["build", str(tmp_path / "src"), "--index", str(tmp_path / "d.idx")]))
    args = ["search", str(tmp_path / "d.idx"), "--device", "cpu"]
    result = runner.invoke(app, args, input="a red circle\na blue square\n")
    _ok(result)
    assert " ".join(result.stderr.split()).count(" ".join(DEMO_NOTE.split())) == 1
    assert "(demo encoder)" in result.stdout
    assert "cross-attention (shipped for" in " ".join(result.stdout.split())
    assert DEMO_NOTE not in result.stdout  # the table's stdout stays the results
    out = _search_json(runner, str(tmp_path / "d.idx"), "a red circle")
    assert out["encoder"]["demo"] is True and out["encoder"]["note"] == DEMO_NOTE


def test_queries_from_stdin_load_the_model_once_and_print_json_lines(
    built_index, runner, encoder_loads
):
    result = runner.invoke(
        app,
        ["search", str(built_index), "-k", "2", "--json", "--device", "cpu"],
        input=f"{QUERY}\n\n  a dog  \n",
    )
    _ok(result)
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    objects = [json.loads(line) for line in lines]
    assert [o["query"] for o in objects] == [QUERY, "a dog"]
    assert all(len(o["hits"]) == 2 for o in objects)
    assert len(encoder_loads) == 1


def test_a_bad_where_fails_before_the_model_loads(built_index, runner, monkeypatch):
    import crossrank.encoders

    def refuse(*args, **kwargs):
        raise AssertionError("the encoder was loaded")

    monkeypatch.setattr(crossrank.encoders, "load_encoder", refuse)
    monkeypatch.setattr(crossrank.encoders, "load_text_encoder", refuse)
    for where, match in (("label = 'x'", 'unknown column "label"'), ("width >", "not a valid")):
        result = runner.invoke(
            app, ["search", str(built_index), QUERY, "--where", where, "--device", "cpu"]
        )
        assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
        assert match in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["search", str(built_index), "--where", "label = 'x'"], input="q\n")
    assert result.exit_code == 1 and 'unknown column "label"' in result.stderr  # stdin mode too


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--image", "{folder}"], r"is a folder, not an image file; give the path of one image"),
        (["--image", "{text}"], r"notes\.png cannot be used"),
        (["q", "-k", str(10**30)], r"k must be at most 9223372036854775807"),
        (["q", "-k", "3", "--rerank-k", str(2**64)], r"rerank_k must be at most"),
    ],
    ids=["image-folder", "image-not-an-image", "k-beyond-int64", "rerank-k-beyond-int64"],
)
def test_bad_image_or_k_is_one_line_before_the_model_loads(
    built_index, tmp_path, runner, monkeypatch, args, match
):
    import crossrank.encoders

    monkeypatch.setattr(crossrank.encoders, "load_encoder", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(crossrank.encoders, "load_text_encoder", lambda *a, **k: 1 / 0)
    (tmp_path / "notes.png").write_text("not an image")
    args = [a.format(folder=tmp_path, text=tmp_path / "notes.png") for a in args]
    result = runner.invoke(app, ["search", str(built_index), *args, "--device", "cpu"])
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(match, " ".join(lines)), result.stderr


def test_huge_k_returns_the_whole_index_and_keeps_the_request(built_index, runner):
    huge = str(10**18)
    out = _search_json(runner, str(built_index), QUERY, "-k", huge, "--rerank-k", huge)
    assert out["counts"]["requested"] == 10**18
    assert out["counts"]["returned"] == len(out["hits"]) == 24


def test_a_long_query_is_cut_with_one_yellow_note(built_index, runner):
    long = " ".join([QUERY] * 6)
    result = runner.invoke(app, ["search", str(built_index), long, "-k", "2", "--device", "cpu"])
    _ok(result)
    stderr = " ".join(result.stderr.split())
    assert stderr.count("longer than the text encoder reads (24 tokens)") == 1
    assert "Warning" not in result.stderr  # a note, not a Python warning line


def test_user_text_is_printed_literally(tmp_path, tiny_clip, runner):
    from PIL import Image

    src = tmp_path / "src"
    write_images(src, 2)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(src / "[bold]m.png")
    _ok(
        runner.invoke(
            app,
            ["build", str(src), "--index", str(tmp_path / "i.idx"), "--model", str(tiny_clip)],
        )
    )
    for query in ("[/x] a red circle", "[bold]a red circle"):
        result = runner.invoke(
            app, ["search", str(tmp_path / "i.idx"), query, "-k", "3", "--device", "cpu"]
        )
        _ok(result)
        assert "[bold]m.png" in result.stdout
        assert repr(query) in result.stdout


def test_build_names_the_encoder_and_says_once_when_it_is_the_demo_one(tmp_path, runner):
    from crossrank.encoders.describe import DEMO_NOTE

    write_images(tmp_path / "few", 3, seed=6)
    index = str(tmp_path / "few.idx")
    result = runner.invoke(app, ["build", str(tmp_path / "few"), "--index", index])
    _ok(result)
    assert "encoder crossrank-demo (demo encoder)" in result.stdout
    stderr = " ".join(result.stderr.split())
    assert stderr.endswith(f"note: {DEMO_NOTE}") and stderr.count("note:") == 1


def test_search_explain_json_and_table(cli_build, runner):
    """--explain: per hit the query's words, the patch grid and a map per word (JSON), and a
    table of each word's peak patch; the scores are those of the same search without it."""
    index, _ = cli_build
    args = [str(index), QUERY, "-k", "2", "--rerank-k", "8", "--reranker", "maxsim"]
    plain = _search_json(runner, *args)
    told = _search_json(runner, *args, "--explain")
    assert [h["score"] for h in told["hits"]] == [h["score"] for h in plain["hits"]]
    for hit in told["hits"]:
        ex = hit["explain"]
        assert ex["tokens"] and len(ex["maps"]) == len(ex["tokens"])
        assert all(len(m) == ex["grid"][0] * ex["grid"][1] for m in ex["maps"])
    assert "explain" not in plain["hits"][0]
    table = runner.invoke(app, ["search", *args, "--device", "cpu", "--explain"])
    _ok(table)
    assert "where each word looked" in table.stdout
    assert ex["tokens"][-1] in table.stdout
