"""``precision``: what a reranker computes in.

- ``auto`` is float32 on the CPU (bf16 autocast on CUDA), and so is ``float32`` on the CPU;
- ``bfloat16`` autocasts the CPU forward: scores move a little, stay float32, and leave the
  folded-weight cache float32 for the next float32 call;
- a bad value is one line, before any weights are read; a CPU without native bf16 is warned of;
- ``Index.open(precision=...)`` and ``--precision`` reach the rerankers a search loads, and the
  result names the precision (MaxSim, float32 at any precision, does not).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from crossrank import Index, InvalidArgumentError, Precision
from crossrank.cli import app
from crossrank.device import parse_precision
from crossrank.rerank import CrossAttentionReranker, RerankerConfig, get_reranker
from crossrank.rerank import autocast as autocast_module
from crossrank.rerank.checkpoint import load_reranker, save_reranker

QUERY = "a red circle left of a blue square"


def _model() -> CrossAttentionReranker:
    torch.manual_seed(0)
    cfg = RerankerConfig(
        text_dim=32, patch_dim=32, width=32, heads=2, layers=1, pair_head=True, patch_positions=16
    )
    return CrossAttentionReranker(cfg).eval()


def _inputs(k: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    query = torch.randn(5, 32, generator=g)
    mask = torch.ones(5, dtype=torch.bool)
    return query, mask, torch.randn(k, 16, 32, generator=g).half()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("auto", Precision.AUTO),
        ("float32", Precision.FLOAT32),
        ("FP32", Precision.FLOAT32),
        ("bfloat16", Precision.BFLOAT16),
        (" bf16 ", Precision.BFLOAT16),
        (Precision.BFLOAT16, Precision.BFLOAT16),
    ],
)
def test_precision_names_and_aliases(given, expected):
    assert parse_precision(given) is expected


def test_an_unknown_precision_is_one_line_naming_the_choices():
    with pytest.raises(InvalidArgumentError, match="auto, float32, bfloat16, got 'fp8'") as err:
        parse_precision("fp8")
    assert "\n" not in str(err.value)


def test_auto_and_float32_are_the_float32_scores_on_the_cpu():
    model = _model()
    reference = model.score(*_inputs())
    for precision in ("auto", "float32"):
        model.precision = parse_precision(precision)
        torch.testing.assert_close(model.score(*_inputs()), reference, rtol=0, atol=0)


def test_bfloat16_moves_the_scores_a_little_and_keeps_the_float32_path_clean():
    model = _model()
    reference = model.score(*_inputs())
    model.precision = Precision.BFLOAT16
    bf16 = model.score(*_inputs())
    assert bf16.dtype == torch.float32
    diff = (bf16 - reference).abs().max().item()
    assert 0 < diff < 0.05 * reference.abs().max().item() + 0.05  # autocast ran, and stayed close
    # The folded maps it kept are float32: the next float32 call is the reference again.
    model.precision = Precision.FLOAT32
    torch.testing.assert_close(model.score(*_inputs()), reference, rtol=0, atol=0)


def test_explain_runs_at_bfloat16_and_its_rows_still_sum_to_one():
    model = _model()
    model.precision = Precision.BFLOAT16
    maps = model.explain(*_inputs(3))
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 5), rtol=0, atol=2e-2)


def test_load_reranker_sets_the_precision_and_refuses_a_bad_one_before_reading(tmp_path: Path):
    folder = save_reranker(_model(), tmp_path / "rr")
    assert load_reranker(folder, "cpu").precision is Precision.AUTO
    assert load_reranker(folder, "cpu", precision="bf16").precision is Precision.BFLOAT16
    (folder / "model.safetensors").write_bytes(b"not weights")  # never read: the value fails first
    with pytest.raises(InvalidArgumentError, match="precision must be one of"):
        load_reranker(folder, "cpu", precision="half")


def test_get_reranker_passes_the_precision_on(tmp_path: Path):
    folder = save_reranker(_model(), tmp_path / "rr")
    assert get_reranker(folder, "cpu", precision="bfloat16").precision is Precision.BFLOAT16
    assert get_reranker("maxsim", "cpu", precision="float32").precision is Precision.FLOAT32
    mine = _model()
    assert get_reranker(mine, "cpu", precision="bfloat16") is mine  # an instance keeps its own
    assert mine.precision is Precision.AUTO


def test_bfloat16_on_a_cpu_without_native_bf16_runs_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(autocast_module, "native_cpu_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="crossrank.rerank.autocast"):
        got = autocast_module.check_precision("bfloat16", torch.device("cpu"))
    assert got is Precision.BFLOAT16
    assert "no native bf16" in caplog.text and "slower than float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="crossrank.rerank.autocast"):
        autocast_module.check_precision("float32", torch.device("cpu"))
    assert caplog.text == ""


# -- through an index and the command line ----------------------------------------------------


@pytest.fixture(scope="module")
def with_reranker(built_index: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the built index with a (random) cross-attention reranker of its own."""
    import shutil

    path = tmp_path_factory.mktemp("precision") / "photos.idx"
    shutil.copytree(built_index, path)
    probe = Index.open(path, device="cpu")
    dim = int(probe.manifest.encoder["patch_dim"])
    probe.close()
    torch.manual_seed(0)
    model = CrossAttentionReranker(
        RerankerConfig(text_dim=dim, patch_dim=dim, width=16, heads=2, layers=1)
    )
    save_reranker(model, path / "reranker")
    return path


def test_index_open_precision_reaches_the_reranker_and_the_result_names_it(with_reranker: Path):
    with Index.open(with_reranker, device="cpu") as plain:
        reference = plain.search(QUERY, k=5, rerank_k=10)
    with Index.open(with_reranker, device="cpu", precision="bfloat16") as bf16:
        result = bf16.search(QUERY, k=5, rerank_k=10)
        maxsim = bf16.search(QUERY, k=5, rerank_k=10, reranker="maxsim")
    assert reference.reranker == "cross-attention (index reranker/)"
    assert result.reranker == "cross-attention (index reranker/), bfloat16"
    assert maxsim.reranker == "maxsim"  # float32 at any precision: not named
    ref = {h.id: h.rerank_score for h in reference}
    moved = [abs(h.rerank_score - ref[h.id]) for h in result if h.id in ref]
    assert moved and max(moved) > 0  # bf16 ran


def test_index_open_refuses_a_bad_precision_in_one_line(built_index: Path):
    with pytest.raises(InvalidArgumentError, match="precision must be one of"):
        Index.open(built_index, device="cpu", precision="int8")


def test_search_precision_flag(with_reranker: Path):
    runner = CliRunner()
    out = runner.invoke(
        app,
        ["search", str(with_reranker), QUERY, "--precision", "bfloat16", "--device", "cpu"]
        + ["--json"],
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["reranker"].endswith(", bfloat16")
    bad = runner.invoke(app, ["search", str(with_reranker), QUERY, "--precision", "fp8"])
    assert bad.exit_code == 2
    assert "fp8" in bad.output and "bfloat16" in bad.output
