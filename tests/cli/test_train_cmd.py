"""``crossrank train``, and searching with a trained reranker by folder or as an index default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from crossrank.cli import app

torch = pytest.importorskip("torch")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_clip: Path) -> tuple[Path, Path, Path]:
    """A tiny shapes train split, an index over it, and a reranker the CLI trained for 6 steps."""
    from crossrank.datasets import generate_shapes
    from crossrank.write.build import build_index

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("train-cli")
    ds = generate_shapes(
        root / "data",
        n_images=40,
        n_queries=0,
        split="train",
        seed=5,
        captions_per_image=2,
        workers=1,
    )
    index = root / "shapes.idx"
    build_index(ds.images_dir, index, model=tiny_clip, device="cpu", batch_size=32, workers=1)
    out = root / "reranker"
    result = runner.invoke(
        app,
        [
            "train",
            str(ds.pairs_path),
            "--index",
            str(index),
            "--out",
            str(out),
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--candidates",
            "4",
            "--mine-k",
            "8",
            "--eval-every",
            "3",
            "--width",
            "16",
            "--heads",
            "2",
            "--layers",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 6 and report["relevance"] == "shapes"
    # --first-stage-weight auto (the default): the encoder's exp(logit_scale), not 0.
    from crossrank.encoders import load_encoder

    scale = load_encoder(str(tiny_clip), device="cpu").logit_scale
    assert scale is not None and scale > 1
    assert report["first_stage_weight"] == pytest.approx(scale, abs=1e-3)
    return ds.root, index, out


def test_train_writes_a_reranker_folder(trained) -> None:
    _, _, out = trained
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())["config"]
    # The flags asked for, and the dims of the index's encoder (the tiny CLIP's 32).
    assert (config["width"], config["heads"], config["layers"]) == (16, 2, 1)
    assert (config["text_dim"], config["patch_dim"]) == (32, 32)
    # The defaults are the shipped demo reranker's: no gates, LeCun init, a position per patch.
    n_patches = json.loads((trained[1] / "manifest.json").read_text())["encoder"]["n_patches"]
    assert (config["gated"], config["init"], config["patch_positions"]) == (
        False,
        "lecun",
        n_patches,
    )
    # Trained as a residual with W = the encoder's logit scale, so search fuses as training scored.
    metadata = json.loads((out / "config.json").read_text())["metadata"]
    weight = metadata["train"]["first_stage_weight"]
    assert weight > 1 and metadata["fusion"] == f"weighted:{1 / (1 + weight):.6g}"


def test_search_with_a_reranker_folder_uses_it(trained) -> None:
    from crossrank import Index
    from crossrank.rerank import load_reranker

    _, index_dir, out = trained
    index = Index.open(index_dir, device="cpu")
    result = index.search("a red circle", k=5, rerank_k=10, reranker=str(out))
    model = load_reranker(out, device="cpu")
    rows = index.stored.rows_of_ids(np.array([h.id for h in result]))
    tokens = index.encoder.encode_text(["a red circle"])
    expected = model.score(
        torch.from_numpy(tokens.tokens[0]),
        torch.from_numpy(tokens.mask[0]),
        torch.from_numpy(index.patches.gather(rows)),
    )
    np.testing.assert_allclose(
        [h.rerank_score for h in result], expected.numpy(), rtol=1e-5, atol=1e-6
    )


def test_auto_uses_the_index_own_reranker_and_falls_back_to_the_first_stage(
    trained, tmp_path: Path
) -> None:
    from crossrank import Index

    _, index_dir, out = trained
    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    plain = Index.open(copy, device="cpu")
    assert plain.default_reranker == "none"  # no trained reranker for this encoder
    alone = plain.search("a red circle", k=3, rerank_k=10)
    first_stage = plain.search("a red circle", k=3, rerank_k=10, reranker="none")
    assert alone.reranker == "none" and all(h.rerank_score is None for h in alone)
    assert [(h.id, h.score) for h in alone] == [(h.id, h.score) for h in first_stage]

    shutil.copytree(out, copy / "reranker")
    carried = Index.open(copy, device="cpu")
    assert carried.default_reranker == str(copy / "reranker")
    by_default = carried.search("a red circle", k=3, rerank_k=10)
    by_path = carried.search("a red circle", k=3, rerank_k=10, reranker=str(out))
    assert [h.rerank_score for h in by_default] == [h.rerank_score for h in by_path]


def test_train_bad_values_are_usage_errors(trained, tmp_path: Path) -> None:
    root, index_dir, _ = trained
    result = runner.invoke(
        app,
        [
            "train",
            str(root / "pairs.parquet"),
            "--index",
            str(index_dir),
            "--out",
            str(tmp_path / "r"),
            "--hard-fraction",
            "2",
        ],
    )
    assert result.exit_code == 2
    assert "hard_fraction" in result.output
    for extra, message in (
        (["--init", "xavier"], "init must be one of bert, lecun"),
        (["--caption-only-steps", "2"], "needs caption_negatives >= 1"),
        (["--first-stage-weight", "heavy"], "--first-stage-weight must be auto or a number"),
        (
            ["--first-stage-weight", "-1"],
            "first_stage_weight must be 'auto' or a number in [0, 1e4)",
        ),
    ):
        result = runner.invoke(
            app,
            [
                "train",
                str(root / "pairs.parquet"),
                "--index",
                str(index_dir),
                "--out",
                str(tmp_path / "r"),
                *extra,
            ],
        )
        assert result.exit_code == 2
        assert message in " ".join(result.output.split())


def test_train_patch_positions_zero_turns_them_off(trained, tmp_path: Path) -> None:
    root, index_dir, _ = trained
    out = tmp_path / "r"
    result = runner.invoke(
        app,
        [
            "train",
            str(root / "pairs.parquet"),
            "--index",
            str(index_dir),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--candidates",
            "4",
            "--mine-k",
            "8",
            "--width",
            "16",
            "--heads",
            "2",
            "--layers",
            "1",
            "--patch-positions",
            "0",
            "--gated",
            "--init",
            "bert",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["patch_positions"], config["gated"], config["init"]) == (None, True, "bert")


def test_train_with_a_pair_head_and_search_with_it(trained, tmp_path: Path) -> None:
    root, index_dir, _ = trained
    out = tmp_path / "r"
    common = [
        "train",
        str(root / "pairs.parquet"),
        "--index",
        str(index_dir),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--candidates",
        "4",
        "--mine-k",
        "8",
        "--width",
        "16",
        "--heads",
        "2",
        "--device",
        "cpu",
        "--pair-head",
    ]
    refused = runner.invoke(app, [*common, "--patch-positions", "0"])
    assert refused.exit_code == 2
    assert "pair_head needs patch_positions set to the encoder's square patch grid" in " ".join(
        refused.output.replace("│", " ").split()
    )  # the message as one line, out of rich's error box
    result = runner.invoke(app, [*common, "--pair-width", "8", "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    n_patches = json.loads((index_dir / "manifest.json").read_text())["encoder"]["n_patches"]
    assert (config["pair_head"], config["patch_positions"]) == (True, n_patches)
    assert config["pair_width"] == 8
    found = runner.invoke(
        app,
        ["search", str(index_dir), "a red circle", "--reranker", str(out), "--k", "3", "--json"],
    )
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)["hits"]
    assert len(hits) == 3 and all(np.isfinite(h["scores"]["rerank"]) for h in hits)


def test_train_with_token_embeddings_and_search_with_it(trained, tmp_path: Path) -> None:
    root, index_dir, _ = trained
    out = tmp_path / "r"
    result = runner.invoke(
        app,
        [
            "train",
            str(root / "pairs.parquet"),
            "--index",
            str(index_dir),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--candidates",
            "4",
            "--mine-k",
            "8",
            "--width",
            "16",
            "--heads",
            "2",
            "--device",
            "cpu",
            "--token-embeddings",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())["config"]
    encoder = json.loads((index_dir / "manifest.json").read_text())["encoder"]
    assert config["token_embeddings"] == encoder["text_width"] > 0
    found = runner.invoke(
        app,
        ["search", str(index_dir), "a red circle", "--reranker", str(out), "--k", "3", "--json"],
    )
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)["hits"]
    assert len(hits) == 3 and all(np.isfinite(h["scores"]["rerank"]) for h in hits)


def test_train_with_caption_negatives_reports_their_validation(trained, tmp_path: Path) -> None:
    root, index_dir, _ = trained
    result = runner.invoke(
        app,
        [
            "train",
            str(root / "pairs.parquet"),
            "--index",
            str(index_dir),
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--candidates",
            "4",
            "--mine-k",
            "8",
            "--width",
            "16",
            "--heads",
            "2",
            "--layers",
            "1",
            "--caption-negatives",
            "3",
            "--caption-only-steps",
            "1",
            "--init",
            "lecun",
            "--relation-share",
            "0.25",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "validation caption accuracy (the true caption first among 3 rewrites):" in result.stdout
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["config"]["init"] == "lecun"
    assert saved["metadata"]["train"]["caption_only_steps"] == 1
    assert saved["metadata"]["train"]["relation_share"] == 0.25


def test_train_caption_negatives_outside_a_shapes_dataset_is_one_line(
    trained, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, index_dir, _ = trained
    # The same pairs, with absolute paths, in a folder without the dataset's dataset.json.
    table = pq.read_table(root / "pairs.parquet", columns=["path", "caption"])
    absolute = pa.array([str((root / p).absolute()) for p in table.column("path").to_pylist()])
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(table.set_column(0, "path", absolute), pairs)
    result = runner.invoke(
        app,
        [
            "train",
            str(pairs),
            "--index",
            str(index_dir),
            "--out",
            str(tmp_path / "r"),
            "--steps",
            "2",
            "--caption-negatives",
            "3",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1
    assert (
        result.stderr.count("error:") == 1 and "train without --caption-negatives" in result.stderr
    )


def test_train_missing_pairs_is_one_line(trained, tmp_path: Path) -> None:
    _, index_dir, _ = trained
    result = runner.invoke(
        app,
        [
            "train",
            str(tmp_path / "nope.parquet"),
            "--index",
            str(index_dir),
            "--out",
            str(tmp_path / "r"),
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.count("error:") == 1 and "nope.parquet" in result.stderr


def test_search_with_a_missing_reranker_folder_is_one_line(trained) -> None:
    _, index_dir, _ = trained
    result = runner.invoke(
        app, ["search", str(index_dir), "a red circle", "--reranker", "/no/such/reranker"]
    )
    assert result.exit_code == 1
    assert "error:" in result.stderr and "/no/such/reranker" in result.stderr


def _capture_train(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Replace the library's train_reranker with one that records what the CLI passed."""
    import crossrank.training

    seen: dict = {}

    def fake(index, pairs, out, *, model_config, config, progress):
        seen.update(index=index, model_config=model_config, config=config)
        raise SystemExit(0)  # stop before any training

    monkeypatch.setattr(crossrank.training, "train_reranker", fake)
    return seen


def test_train_leaves_every_setting_not_given_to_the_library_defaults(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crossrank.training import RerankTrainConfig
    from crossrank.training.reranker import resolve_model_config

    root, index_dir, _ = trained
    seen = _capture_train(monkeypatch)
    args = ["train", str(root / "data" / "pairs.parquet"), "--index", str(index_dir)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == RerankTrainConfig(device="cpu")
    encoder = seen["index"].manifest.encoder
    assert seen["model_config"] == resolve_model_config(None, encoder, seen["index"])
    assert seen["model_config"].patch_positions == encoder["n_patches"]  # the one encoder default


def test_train_config_file_sets_the_defaults_and_flags_override_it(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, index_dir, reranker_dir = trained
    saved = json.loads((reranker_dir / "config.json").read_text())
    saved["config"]["layers"] = 2
    saved["metadata"]["train"] = {"steps": 40, "lr": 3e-4, "warmup": 7, "caption_negatives": 0}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(saved))
    seen = _capture_train(monkeypatch)
    args = ["train", str(root / "data" / "pairs.parquet"), "--index", str(index_dir)]
    args += ["--out", str(tmp_path / "r"), "--device", "cpu", "--config", str(config_file)]
    result = runner.invoke(app, [*args, "--heads", "4"])
    assert result.exit_code == 0, result.output
    model, train = seen["model_config"], seen["config"]
    want = {**saved["config"], "heads": 4}
    assert {k: v for k, v in model.to_dict().items() if k in want} == want
    assert (train.steps, train.lr, train.warmup) == (40, 3e-4, 7)
    result = runner.invoke(app, [*args, "--steps", "400"])  # the file's warm-up was for 40 steps
    assert result.exit_code == 0, result.output
    assert (seen["config"].steps, seen["config"].warmup) == (400, 20)
    # A checkpoint folder works as well as its config.json.
    result = runner.invoke(app, [*args[:-1], str(reranker_dir)])
    assert result.exit_code == 0, result.output
    assert seen["model_config"].to_dict() == saved["config"] | {"layers": 1}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "is not readable JSON"),
        ('{"format": "x"}', 'holds no reranker config: expected a JSON object with a "config"'),
        ('{"config": {"layers": 1, "colour": 3}}', "unknown reranker config fields ['colour']"),
        (
            '{"config": {}, "metadata": {"train": {"stepz": 3}}}',
            "records unknown training settings ['stepz'] in metadata.train",
        ),
    ],
)
def test_train_refuses_a_bad_config_file_in_one_line(
    trained, tmp_path: Path, content: str | None, message: str
) -> None:
    root, index_dir, _ = trained
    config_file = tmp_path / "config.json"
    if content is not None:
        config_file.write_text(content)
    args = ["train", str(root / "data" / "pairs.parquet"), "--index", str(index_dir)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r"), "--config", str(config_file)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.replace("│", " ").split())


def test_train_prints_the_output_folder_literally(trained, tmp_path: Path) -> None:
    root, index_dir, _ = trained
    out = tmp_path / "[bold]r"
    args = ["train", str(root / "pairs.parquet"), "--index", str(index_dir), "--out", str(out)]
    args += ["--steps", "2", "--batch-size", "4", "--candidates", "4", "--mine-k", "8"]
    result = runner.invoke(app, [*args, "--width", "16", "--heads", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert str(out) in " ".join(result.stdout.split())


def test_train_init_from_takes_the_folder_weights_and_architecture(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, index_dir, reranker_dir = trained
    saved = json.loads((reranker_dir / "config.json").read_text())
    seen = _capture_train(monkeypatch)
    args = ["train", str(root / "data" / "pairs.parquet"), "--index", str(index_dir)]
    args += ["--out", str(tmp_path / "r"), "--device", "cpu", "--init-from", str(reranker_dir)]
    result = runner.invoke(app, [*args, "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert seen["config"].init_from == str(reranker_dir) and seen["config"].steps == 5
    assert seen["model_config"].to_dict() == saved["config"]  # its architecture, not the defaults
    result = runner.invoke(app, [*args[:-1], str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert "--init-from" in result.output and "does not exist" in result.output


def test_train_distils_a_smaller_student_from_a_teacher_folder(trained, tmp_path: Path) -> None:
    root, index_dir, teacher_dir = trained
    args = ["train", str(root / "pairs.parquet"), "--index", str(index_dir)]
    args += ["--out", str(tmp_path / "s"), "--device", "cpu", "--steps", "4", "--eval-every", "2"]
    args += ["--width", "8", "--heads", "1", "--batch-size", "4", "--candidates", "4"]
    result = runner.invoke(
        app,
        [*args, "--teacher", str(teacher_dir), "--distill", "2", "--distill-temperature", "1.5"],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    assert saved["config"]["width"] == 8  # the student the flags describe, not the teacher's 16
    train = saved["metadata"]["train"]
    assert (train["teacher"], train["distill"], train["distill_temperature"]) == (
        str(teacher_dir),
        2.0,
        1.5,
    )
    log = [
        json.loads(line) for line in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()
    ]
    assert all(entry["train_distill_loss"] >= 0 for entry in log[1:]) and len(log) == 3


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--distill", "0.5"], "give --teacher DIR"),
        (["--distill-temperature", "2"], "give --teacher DIR"),
        (["--teacher", "/no/such/teacher"], "does not exist"),
    ],
)
def test_train_distillation_flags_without_a_teacher_are_usage_errors(
    trained, tmp_path: Path, extra: list[str], match: str
) -> None:
    root, index_dir, _ = trained
    args = ["train", str(root / "pairs.parquet"), "--index", str(index_dir)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r"), *extra])
    assert result.exit_code == 2 and match in result.output
    assert not (tmp_path / "r").exists()


def test_train_config_file_does_not_carry_the_runs_teacher_or_init_weights(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, index_dir, reranker_dir = trained
    saved = json.loads((reranker_dir / "config.json").read_text())
    saved["metadata"]["train"].update(
        teacher="/elsewhere/teacher", init_from="/elsewhere/init", distill=4.0
    )
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(saved))
    seen = _capture_train(monkeypatch)
    args = ["train", str(root / "data" / "pairs.parquet"), "--index", str(index_dir)]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "r"), "--config", str(config_file)])
    assert result.exit_code == 0, result.output
    assert seen["config"].teacher is None and seen["config"].init_from is None
    assert seen["config"].distill == 4.0  # the settings themselves still come from the file
