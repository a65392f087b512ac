import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crossrank.errors import CrossrankError, InvalidArgumentError, ModelError, ModelMismatchError
from crossrank.rerank import CrossAttentionReranker, RerankerConfig, load_reranker
from crossrank.training import RerankTrainConfig, train_reranker
from crossrank.training.data import CandidateSampler, prepare_training_set
from crossrank.training.reranker import (
    CHECKPOINT_NAME,
    LOG_NAME,
    distill_loss,
    export_checkpoint,
    rerank_loss,
)

# Gated with the 0.02 init (not the library defaults): a gated model starts at the identity, which
# some tests rely on; the init is the one checkpoints that predate the field were trained with.
TINY = RerankerConfig(width=16, heads=2, layers=1, mlp_ratio=2.0, gated=True, init="bert")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, tiny_clip):
    """A 60-image shapes train split and an index over its images (pairs' paths are relative)."""
    from crossrank import Index
    from crossrank.datasets import generate_shapes

    root = tmp_path_factory.mktemp("shapes")
    ds = generate_shapes(
        root / "data",
        n_images=60,
        n_queries=0,
        split="train",
        seed=3,
        captions_per_image=3,
        workers=1,
    )
    index = Index.build(
        ds.images_dir, root / "shapes.idx", model=tiny_clip, device="cpu", batch_size=32, workers=1
    )
    return ds, index


def _write_pairs(path: Path, rows: list[tuple[str | None, str | None]]) -> Path:
    table = pa.table(
        {
            "path": pa.array([p for p, _ in rows], pa.string()),
            "caption": pa.array([c for _, c in rows], pa.string()),
        }
    )
    if path.suffix == ".csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


@pytest.fixture(scope="module")
def colours(tmp_path_factory, tiny_clip):
    """24 noisy red or blue images, paired with 'a red circle' or 'a blue square', and an index.

    Generic pairs (no dataset.json): the 12 images of a caption are its positives. Learnable in a
    few dozen steps even with a random CLIP: the two colours give very different patch features.
    """
    from PIL import Image

    from crossrank import Index

    root = tmp_path_factory.mktemp("colours")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        red = i % 2 == 0
        colour = np.array([200, 30, 30] if red else [30, 30, 200])
        pixels = np.clip(colour + rng.integers(-40, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i:02d}.png")
        rows.append((f"img/{i:02d}.png", "a red circle" if red else "a blue square"))
    pairs = _write_pairs(root / "pairs.parquet", rows)
    index = Index.build(
        root / "img", root / "colours.idx", model=tiny_clip, device="cpu", batch_size=32, workers=1
    )
    return pairs, index


def _images(index) -> list[str]:
    return index.metadata(columns=["path"]).column("path").to_pylist()


def _config(**fields) -> RerankTrainConfig:
    # No residual unless a test asks for one (the default, "auto", takes the encoder's logit scale).
    base = dict(
        steps=8,
        batch_size=8,
        n_candidates=6,
        mine_k=10,
        warmup=2,
        lr=3e-3,
        eval_every=4,
        checkpoint_every=4,
        device="cpu",
        val_fraction=0.1,
        first_stage_weight=0.0,
    )
    return RerankTrainConfig(**{**base, **fields})


# -- the loss ---------------------------------------------------------------------------------


def test_rerank_loss_matches_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    listwise = (
        -math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(1 / (1 + math.e + math.exp(-1)))
    ) / 2
    assert rerank_loss(logits, "listwise").item() == pytest.approx(listwise, rel=1e-6)

    def sp(x):  # softplus: the binary cross-entropy of logit x with label 0
        return math.log1p(math.exp(x))

    positives = (sp(-2.0) + sp(0.0)) / 2
    negatives = (sp(0.0) + sp(0.0) + sp(1.0) + sp(-1.0)) / 4
    assert rerank_loss(logits, "itm").item() == pytest.approx(
        0.5 * positives + 0.5 * negatives, rel=1e-6
    )


def test_rerank_loss_leaves_out_invalid_slots():
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 1.0, -1.0]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    listwise = (
        -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e + math.exp(-1)))
    ) / 2
    assert rerank_loss(logits, "listwise", valid).item() == pytest.approx(listwise, rel=1e-6)
    # itm: the negatives' mean runs over the three valid negatives only
    positives = (math.log1p(math.exp(-2.0)) + math.log1p(1.0)) / 2
    negatives = (math.log1p(1.0) + math.log1p(math.e) + math.log1p(math.exp(-1.0))) / 3
    assert rerank_loss(logits, "itm", valid).item() == pytest.approx(
        0.5 * positives + 0.5 * negatives, rel=1e-6
    )
    with pytest.raises(InvalidArgumentError, match="column 0"):
        rerank_loss(logits, "listwise", ~valid)


# -- training ---------------------------------------------------------------------------------


def test_training_loss_falls_on_a_tiny_set(colours, tmp_path):
    pairs, index = colours
    losses = []
    report = train_reranker(
        index,
        pairs,
        tmp_path / "r",
        model_config=TINY,
        config=_config(
            steps=60,
            lr=1e-2,
            hard_fraction=0.0,
            val_fraction=0.0,
            eval_every=30,
            checkpoint_every=60,
            seed=1,
        ),
        progress=lambda step, steps, loss, acc: losses.append(loss),
    )
    assert len(losses) == 60 and report.steps == 60 and report.relevance == "caption"
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    assert start == pytest.approx(math.log(6), abs=0.01)  # a gated model starts at the identity
    assert end < 0.5 * start
    assert report.curve[-1]["train_accuracy"] > 0.9


@pytest.mark.parametrize("loss", ["listwise", "itm"])
def test_both_losses_train_and_save_a_loadable_reranker(shapes, tmp_path, loss):
    ds, index = shapes
    seen = []
    report = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "r",
        model_config=TINY,
        config=_config(loss=loss),
        progress=lambda *args: seen.append(args),
    )
    assert [s[0] for s in seen] == list(range(1, 9)) and all(s[1] == 8 for s in seen)
    assert all(math.isfinite(s[2]) and 0.0 <= s[3] <= 1.0 for s in seen)
    assert [e["step"] for e in report.curve] == [0, 4, 8]
    # Step 0: a gated model gives every candidate the same logit. Ties count as chance, and the
    # reranked lists keep the first-stage order.
    assert report.curve[0]["val_accuracy"] == pytest.approx(1 / 6)
    assert report.curve[0]["val_r1"] == report.first_stage["r1"]
    assert set(report.final) == {"val_accuracy", "val_r1"}
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["metadata"]["train"]["loss"] == loss and saved["metadata"]["steps"] == 8
    assert saved["metadata"]["val"] == report.final
    lines = (tmp_path / "r" / LOG_NAME).read_text().splitlines()
    assert [json.loads(line) for line in lines] == list(report.curve)


def test_reranker_dims_come_from_the_index_encoder(shapes, tmp_path):
    ds, index = shapes
    wrong = RerankerConfig(text_dim=999, patch_dim=777, width=16, heads=2, layers=1)
    train_reranker(
        index, ds.pairs_path, tmp_path / "r", model_config=wrong, config=_config(steps=1)
    )
    dim = index.manifest.encoder["patch_dim"]
    loaded = load_reranker(tmp_path / "r", device="cpu", encoder_info=index.manifest.encoder)
    assert (loaded.config.text_dim, loaded.config.patch_dim) == (dim, dim) != (999, 777)
    assert loaded.config.width == 16


def test_layer_0_token_states_are_read_at_the_encoders_width_in_training_and_search(
    shapes, tmp_path
):
    ds, index = shapes
    asked = dataclasses.replace(
        TINY, token_embeddings=1
    )  # any value > 0 asks; the width is the encoder's
    train_reranker(
        index, ds.pairs_path, tmp_path / "r", model_config=asked, config=_config(steps=2)
    )
    width, dim = index.manifest.encoder["text_width"], index.manifest.encoder["patch_dim"]
    loaded = load_reranker(tmp_path / "r", device="cpu", encoder_info=index.manifest.encoder)
    assert loaded.config.token_embeddings == width and loaded.config.token_input_dim == width + dim
    data = prepare_training_set(index, ds.pairs_path, _config(), token_embeddings=True)
    row = 5
    feats = index.encoder.encode_text([data.captions[row]], token_embeddings=True)
    n = int(feats.mask[0].sum())
    assert data.tokens.shape[2] == width + dim
    np.testing.assert_allclose(
        data.tokens[row, :n].astype(np.float32),
        feats.reranker_tokens()[0, :n],
        atol=2e-3,
        rtol=2e-3,
    )  # the bank is float16
    assert len(index.search(data.captions[row], k=2, rerank_k=5, reranker=str(tmp_path / "r"))) == 2


def test_layer_0_token_states_of_an_encoder_without_them_are_refused():
    from crossrank.training.reranker import resolve_model_config

    with pytest.raises(
        ModelMismatchError, match="does not give layer-0 token states; train without"
    ):
        resolve_model_config(
            dataclasses.replace(TINY, token_embeddings=1),
            {"model_id": "custom", "patch_dim": 8, "n_patches": 4},
        )


class _Interrupt(Exception):
    pass


def _interrupted_run(index, pairs, out: Path, config: RerankTrainConfig, at_step: int) -> None:
    """Train TINY into ``out`` and stop it (as a crash would) when step ``at_step`` is reported."""

    def stop(step, steps, loss, acc):
        if step == at_step:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_reranker(index, pairs, out, model_config=TINY, config=config, progress=stop)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(shapes, tmp_path):
    ds, index = shapes
    config = _config(steps=12, eval_every=3, checkpoint_every=4)
    whole = train_reranker(
        index, ds.pairs_path, tmp_path / "whole", model_config=TINY, config=config
    )

    _interrupted_run(index, ds.pairs_path, tmp_path / "cut", config, at_step=6)
    resumed = train_reranker(
        index, ds.pairs_path, tmp_path / "cut", model_config=TINY, config=config
    )
    assert whole.resumed_from == 0 and resumed.resumed_from == 4  # the last checkpoint
    a = load_reranker(tmp_path / "whole", device="cpu").state_dict()
    b = load_reranker(tmp_path / "cut", device="cpu").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def strip(curve):
        return [{k: v for k, v in e.items() if k != "elapsed_s"} for e in curve]

    assert strip(resumed.curve) == strip(whole.curve)  # the log neither loses nor repeats a step


def test_exported_weights_are_the_checkpoint_weights_and_search_with_them(shapes, tmp_path):
    ds, index = shapes
    train_reranker(index, ds.pairs_path, tmp_path / "r", model_config=TINY, config=_config())
    loaded = load_reranker(tmp_path / "r", device="cpu", encoder_info=index.manifest.encoder)
    state = torch.load(tmp_path / "r" / CHECKPOINT_NAME, weights_only=True)["model"]
    trained = CrossAttentionReranker(loaded.config)
    trained.load_state_dict(state)
    trained.eval()
    feats = index.encoder.encode_text(["a red circle"])
    patches = torch.from_numpy(index.patches.gather(np.arange(10)))
    query, mask = torch.from_numpy(feats.tokens[0]), torch.from_numpy(feats.mask[0])
    assert torch.equal(loaded.score(query, mask, patches), trained.score(query, mask, patches))
    hits = index.search("a red circle", k=3, rerank_k=10, reranker=loaded).hits
    assert len(hits) == 3 and all(h.rerank_score is not None for h in hits)


def test_residual_training_starts_at_the_first_stage_and_search_fuses_as_it_trained(
    shapes, tmp_path
):
    ds, index = shapes
    weight = 20.0
    report = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "r",
        model_config=TINY,
        config=_config(first_stage_weight=weight, val_fraction=0.3),
    )
    # An untrained gated model scores every candidate alike, so the residual logits rank exactly
    # as the first stage does: validation R@1 at step 0 is the first stage's.
    assert report.curve[0]["step"] == 0
    assert report.curve[0]["val_r1"] == pytest.approx(report.first_stage["r1"])
    alpha = 1 / (1 + weight)
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["metadata"]
    assert saved["fusion"] == f"weighted:{alpha:.6g}"
    loaded = load_reranker(tmp_path / "r", device="cpu", encoder_info=index.manifest.encoder)
    assert loaded.fusion == f"weighted:{alpha:.6g}"
    auto = index.search("a red circle", k=5, rerank_k=10, reranker=loaded)  # fusion="auto"
    for hit in auto.hits:
        assert hit.score == pytest.approx(
            alpha * hit.rerank_score + (1 - alpha) * hit.first_stage_score, abs=1e-5
        )
    plain = index.search("a red circle", k=5, rerank_k=10, reranker=loaded, fusion="rerank")
    assert [h.score for h in plain.hits] == [h.rerank_score for h in plain.hits]


def test_the_default_architecture_has_a_position_per_patch_of_the_encoder(shapes, tmp_path):
    ds, index = shapes
    train_reranker(index, ds.pairs_path, tmp_path / "r", config=_config(steps=2))
    config = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    assert (
        config["patch_positions"] == index.manifest.encoder["n_patches"] == index.encoder.n_patches
    )
    assert (config["gated"], config["init"]) == (False, "lecun")


def test_first_stage_weight_auto_is_the_encoders_logit_scale(shapes, tmp_path):
    ds, index = shapes
    scale = index.encoder.logit_scale
    assert scale == pytest.approx(float(index.encoder.model.logit_scale.exp()))
    report = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "r",
        model_config=TINY,
        config=_config(first_stage_weight="auto"),
    )
    assert report.first_stage_weight == pytest.approx(scale, abs=1e-4) and scale > 1
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["metadata"]
    assert saved["train"]["first_stage_weight"] == report.first_stage_weight  # resolved, not "auto"
    assert saved["fusion"] == f"weighted:{1 / (1 + report.first_stage_weight):.6g}"
    # An encoder without a logit scale: no residual. Unresolved, there is no fusion to recommend.
    assert RerankTrainConfig().first_stage_weight == "auto"
    assert RerankTrainConfig().resolve_first_stage_weight(None).first_stage_weight == 0.0
    assert (
        RerankTrainConfig(first_stage_weight=3.0)
        .resolve_first_stage_weight(50.0)
        .first_stage_weight
        == 3.0
    )
    with pytest.raises(ValueError, match="not resolved yet"):
        _ = RerankTrainConfig().fusion


def test_an_exported_checkpoint_is_the_reranker_the_run_writes(shapes, tmp_path):
    ds, index = shapes
    train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "r",
        model_config=TINY,
        config=_config(first_stage_weight=9.0),
    )
    out = export_checkpoint(tmp_path / "r", tmp_path / "exported")
    finished = json.loads((tmp_path / "r" / "config.json").read_text())
    exported = json.loads((out / "config.json").read_text())
    assert exported["config"] == finished["config"]
    assert exported["metadata"]["fusion"] == finished["metadata"]["fusion"] == "weighted:0.1"
    assert exported["metadata"]["data"]["encoder"] == index.manifest.encoder["weights_sha256"]
    assert exported["metadata"]["steps"] == 8
    # what the checkpoint does not record is left out, not filled with defaults
    unrecorded = {"eval_every", "checkpoint_every", "device"}
    assert unrecorded <= finished["metadata"]["train"].keys()
    assert not unrecorded & exported["metadata"]["train"].keys()
    assert {
        k: v for k, v in finished["metadata"]["train"].items() if k not in unrecorded
    } == exported["metadata"]["train"]
    a, b = (load_reranker(p, device="cpu") for p in (tmp_path / "r", out))
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    with pytest.raises(InvalidArgumentError, match="to another folder"):
        export_checkpoint(tmp_path / "r", tmp_path / "r")
    with pytest.raises(ModelError, match="no checkpoint.pt in"):
        export_checkpoint(tmp_path / "exported", tmp_path / "x")


def test_a_reranker_trained_without_residual_recommends_no_fusion(shapes, tmp_path):
    ds, index = shapes
    train_reranker(index, ds.pairs_path, tmp_path / "r", model_config=TINY, config=_config(steps=2))
    assert "fusion" not in json.loads((tmp_path / "r" / "config.json").read_text())["metadata"]
    assert load_reranker(tmp_path / "r", device="cpu").fusion is None


# -- positives and negatives ------------------------------------------------------------------


def test_hard_negatives_never_include_exact_shapes_positives(shapes):
    from crossrank.datasets import match_matrix

    ds, index = shapes
    data = prepare_training_set(index, ds.pairs_path, _config(mine_k=40, val_fraction=0.0))
    assert data.relevance == "shapes" and data.counts["used_pairs"] == data.counts["pairs"]
    # The truth, computed independently: which pool images satisfy which caption.
    paths = pq.read_table(ds.metadata_path, columns=["path"]).column("path").to_pylist()
    scene_of = {str((ds.root / p).absolute()): i for i, p in enumerate(paths)}
    index_paths = _images(index)
    scenes = [ds.scenes()[scene_of[index_paths[row]]] for row in data.pool_rows]
    truth = match_matrix(data.captions, scenes)  # (U, N)
    # The test can fail: the first stage ranks true matches that were never paired with their
    # caption among its top 40, which an identical-caption rule would keep as hard negatives.
    paired = np.zeros_like(truth)
    paired[data.train_caption, data.train_image] = True
    _, ids = index.first_stage.search(index.encoder.encode_text(data.captions).pooled, 40)
    mined = np.searchsorted(data.pool_rows, index.stored.rows_of_ids(ids.ravel()))
    assert (truth & ~paired)[np.repeat(np.arange(len(data.captions)), 40), mined].sum() > 20
    assert data.hard_count.sum() > 0
    for u in range(len(data.captions)):
        assert not truth[u, data.hard[u, : data.hard_count[u]]].any()
    sampler = CandidateSampler(data, n_candidates=8, in_batch=True)
    rng = np.random.default_rng(0)
    for _ in range(30):
        batch = rng.choice(data.train_caption.size, size=16, replace=False)
        u = data.train_caption[batch]
        lists = sampler.sample(u, data.train_image[batch], n_hard=4, rng=rng)
        assert truth[u, lists[:, 0]].all()
        assert not truth[u[:, None], lists[:, 1:]].any()


def test_caption_negatives_are_rewrites_false_of_the_image(shapes):
    from crossrank.datasets import caption_perturbations, parse_query, satisfies

    ds, index = shapes
    data = prepare_training_set(
        index, ds.pairs_path, _config(caption_negatives=4, val_fraction=0.0)
    )
    bank = data.negatives
    n_bank = data.tokens.shape[0]
    assert (
        n_bank
        == len(data.captions) + data.counts["negative_captions"]
        == data.query_vectors.shape[0]
    )
    texts = data.captions + [None] * data.counts["negative_captions"]
    paths = pq.read_table(ds.metadata_path, columns=["path"]).column("path").to_pylist()
    scene_of = {str((ds.root / p).absolute()): s for p, s in zip(paths, ds.scenes(), strict=True)}
    index_paths = _images(index)
    # Rewrites name only colour-shape pairs the captions show (none of the held-out ones).
    seen = {
        (o.colour, o.shape)
        for c in data.captions
        for o in (parse_query(c).a, parse_query(c).b)
        if o is not None
    }
    rng = np.random.default_rng(0)
    n_structural = n_slots = 0
    for _ in range(10):
        batch = rng.choice(data.train_caption.size, size=16, replace=False)
        u, image = data.train_caption[batch], data.train_image[batch]
        rows, valid = bank.sample(u, image, 4, rng)
        assert (
            rows.shape == valid.shape == (16, 5) and (rows[:, 0] == u).all() and valid[:, 0].all()
        )
        for b in range(16):
            scene = scene_of[index_paths[data.pool_rows[image[b]]]]
            caption = parse_query(data.captions[u[b]])
            structural, attribute = caption_perturbations(caption, seen)
            allowed = {
                s.text: kind for kind, group in (("s", structural), ("a", attribute)) for s in group
            }
            chosen = rows[b, 1:][valid[b, 1:]]
            assert len(set(chosen.tolist())) == chosen.size  # no rewrite twice
            kinds = []
            for row in chosen.tolist():
                text = texts[row] if row < len(data.captions) else _bank_text(bank, row)
                assert text in allowed and not satisfies(scene, text)
                kinds.append(allowed[text])
            # Half the slots (rounded up) structural where enough are false, each group topping
            # up the other; a slot stays empty only when the caption has no other false rewrite.
            false_s = sum(not satisfies(scene, t.text) for t in structural)
            false_a = sum(not satisfies(scene, t.text) for t in attribute)
            assert chosen.size == min(4, false_s + false_a)
            assert kinds.count("s") == min(false_s, max(4 - false_a, 2))
            n_structural += kinds.count("s")
            n_slots += chosen.size
    assert n_slots > 500 and n_structural > 50


def _bank_text(bank, row: int) -> str:
    """The text of a caption-bank row, rebuilt from its parsed spec arrays."""
    from crossrank.datasets import Colour, ObjectSpec, QueryKind, QuerySpec, Relation, Shape, Size

    sp = bank.specs.take(np.array([row]))

    def obj(prefix):
        colour = int(getattr(sp, f"{prefix}_colour")[0])
        if colour < 0:
            return None
        size = int(getattr(sp, f"{prefix}_size")[0])
        return ObjectSpec(
            list(Colour)[colour],
            list(Shape)[int(getattr(sp, f"{prefix}_shape")[0])],
            None if size < 0 else list(Size)[size],
        )

    relation = int(sp.relation[0])
    return QuerySpec(
        list(QueryKind)[int(sp.kind[0])],
        obj("a"),
        obj("b"),
        None if relation < 0 else list(Relation)[relation],
    ).text


def test_a_custom_caption_inside_a_shapes_dataset_is_refused(shapes):
    ds, index = shapes
    first = pq.read_table(ds.pairs_path, columns=["path"]).column("path")[0].as_py()
    pairs = _write_pairs(ds.root / "custom-pairs.parquet", [(first, "a photo of my cat")])
    try:
        with pytest.raises(
            InvalidArgumentError,
            match=r"sits in shapes dataset .* captions must be shapes "
            r"templates.*move a custom pairs file out",
        ):
            prepare_training_set(index, pairs, _config())
    finally:
        pairs.unlink()


def test_caption_negatives_need_a_shapes_dataset(colours):
    pairs, index = colours
    with pytest.raises(
        InvalidArgumentError,
        match=r"caption negatives need the scene graphs of a shapes "
        r"dataset.*train without --caption-negatives",
    ):
        prepare_training_set(index, pairs, _config(caption_negatives=2))


@pytest.mark.parametrize(
    "model_config",
    [
        TINY,
        RerankerConfig(
            width=16,
            heads=2,
            layers=2,
            mlp_ratio=2.0,
            patch_self_attention=True,
            query_self_attention=True,
        ),
    ],
)
def test_training_forwards_equal_plain_per_pair_scores(shapes, model_config):
    """The step's shortcuts (keys/values once per distinct image) score as the plain forward."""
    from crossrank.rerank.cross_attention import AttentionPath
    from crossrank.training.reranker import Banks, _forward, forward_captions

    ds, index = shapes
    data = prepare_training_set(
        index, ds.pairs_path, _config(caption_negatives=3, val_fraction=0.0)
    )
    dim = index.manifest.encoder["patch_dim"]
    torch.manual_seed(0)
    cfg = RerankerConfig(
        **{
            **model_config.to_dict(),
            "text_dim": dim,
            "patch_dim": dim,
            "patch_positions": index.patches.shape[0],
        }
    )
    model = CrossAttentionReranker(cfg).eval()
    with torch.no_grad():  # gates away from 0, so that the cross-attention counts
        for name, param in model.named_parameters():
            if "gate" in name:
                param.fill_(0.7)
    banks = Banks(
        torch.from_numpy(data.tokens),
        torch.from_numpy(data.token_mask),
        torch.from_numpy(data.patches),
        (2.0, torch.from_numpy(data.query_vectors), torch.from_numpy(data.image_vectors)),
    )
    rng = np.random.default_rng(0)
    batch = rng.choice(data.train_caption.size, size=6, replace=False)
    u, image = data.train_caption[batch], data.train_image[batch]
    candidates = CandidateSampler(data, 5, in_batch=True).sample(u, image, 2, rng)
    rows, _ = data.negatives.sample(u, image, 3, rng)

    def plain(caption: int, img: int) -> float:
        mask = banks.token_mask[caption][None]
        logit = model.forward_batch(
            banks.tokens[caption][None].float(),
            mask,
            banks.patches[img][None, None].float(),
            path=AttentionPath.PLAIN,
        )
        return float(logit) + 2.0 * float(banks.residual[1][caption] @ banks.residual[2][img])

    with torch.no_grad():
        got = _forward(model, banks, u, candidates, torch.device("cpu"))
        want = torch.tensor([[plain(u[b], c) for c in candidates[b]] for b in range(6)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        got = forward_captions(model, banks, rows, image, torch.device("cpu"))
        want = torch.tensor([[plain(r, image[b]) for r in rows[b]] for b in range(6)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got.std() > 0.01  # the scores differ: the check can fail


def test_caption_negatives_train_and_log_their_accuracy(shapes, tmp_path):
    ds, index = shapes
    report = train_reranker(
        index, ds.pairs_path, tmp_path / "r", model_config=TINY, config=_config(caption_negatives=3)
    )
    assert report.counts["negative_captions"] > 0
    logged = [e for e in report.curve if "train_loss" in e]
    assert logged and all(0.0 <= e["train_caption_accuracy"] <= 1.0 for e in logged)
    # Validation ranks each held-out caption among its rewrites on its image; at step 0 a gated
    # model ties them all, so the tie-aware accuracy is below 1 (chance, not a free hit).
    assert all(0.0 <= e["val_caption_accuracy"] <= 1.0 for e in report.curve)
    assert report.curve[0]["val_caption_accuracy"] < 0.9
    assert report.final["val_caption_accuracy"] == report.curve[-1]["val_caption_accuracy"]
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["metadata"]["train"]["caption_negatives"] == 3


def test_attention_supervision_pulls_object_words_onto_their_objects(shapes, tmp_path):
    ds, index = shapes
    config = _config(
        steps=60,
        eval_every=20,
        checkpoint_every=60,
        caption_negatives=3,
        attention_supervision=2.0,
        lr=1e-2,
        val_fraction=0.0,
    )
    report = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "r",
        model_config=dataclasses.replace(TINY, gated=False),
        config=config,
    )
    mass = [e["train_attention_mass"] for e in report.curve if "train_attention_mass" in e]
    assert len(mass) == 3 and all(0.0 <= m <= 1.0 for m in mass)
    # Uniform attention puts about (object's patches / P) on each object; supervision raises it.
    assert mass[-1] > mass[0] + 0.05, mass
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["metadata"]["train"]["attention_supervision"] == 2.0


def test_attention_supervision_leaves_training_without_it_unchanged(shapes, tmp_path):
    # Asking for the attention mass is an extra value channel: the scores, and so the weights a
    # run learns, are those of a run without supervision when its weight is ~0.
    ds, index = shapes
    runs = {
        w: train_reranker(
            index,
            ds.pairs_path,
            tmp_path / str(w),
            model_config=TINY,
            config=_config(steps=4, caption_negatives=3, attention_supervision=w),
        )
        for w in (0.0, 1e-12)
    }
    a = load_reranker(tmp_path / "0.0").state_dict()
    b = load_reranker(tmp_path / "1e-12").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert (
        "train_attention_mass" not in runs[0.0].curve[-1]
        and "train_attention_mass" in runs[1e-12].curve[-1]
    )


def test_relation_only_rewrites_keep_both_objects_and_change_only_the_relation(shapes):
    ds, index = shapes
    data = prepare_training_set(index, ds.pairs_path, _config(caption_negatives=3))
    bank, full, specs = data.relation_negatives, data.negatives, data.negatives.specs

    def objects(row: int) -> set[tuple[int, int, int]]:
        return {
            (int(specs.a_colour[row]), int(specs.a_shape[row]), int(specs.a_size[row])),
            (int(specs.b_colour[row]), int(specs.b_shape[row]), int(specs.b_size[row])),
        }

    n_kept = 0
    for u in range(len(data.captions)):
        rows = bank.offsets[u].tolist()
        assert bank.n_structural[u] == len(rows)
        if specs.relation[u] < 0:  # no relation: nothing to keep
            assert rows == []
            continue
        assert set(rows) <= set(full.offsets[u][: int(full.n_structural[u])].tolist())
        for r in rows:  # same two objects; another relation, or the objects swapped around it
            assert objects(r) == objects(u) and specs.relation[r] >= 0
            assert (
                specs.relation[r] != specs.relation[u]
                or specs.a_colour[r] != specs.a_colour[u]
                or specs.a_shape[r] != specs.a_shape[u]
            )
        n_kept += len(rows)
    assert n_kept > 0


def test_relation_share_gives_relation_only_lists_their_share_and_logs_them(shapes, tmp_path):
    ds, index = shapes
    config = _config(steps=4, caption_negatives=3, relation_share=0.5, val_fraction=0.0)
    report = train_reranker(index, ds.pairs_path, tmp_path / "r", model_config=TINY, config=config)
    assert all(0.0 <= e["train_relation_accuracy"] <= 1.0 for e in report.curve[1:])
    from crossrank.training.reranker import _caption_lists

    data = prepare_training_set(index, ds.pairs_path, config)
    pool = np.flatnonzero(data.relation_negatives.n_structural[data.train_caption] > 0)
    caption, positive = data.train_caption[:8], data.train_image[:8]
    rows, valid, image, n_relation = _caption_lists(
        data, caption, positive, config, pool, np.random.default_rng(0)
    )
    assert n_relation == 4 and rows.shape == (8, 4) and valid.shape == (8, 4)
    np.testing.assert_array_equal(
        image[:4], positive[:4]
    )  # the batch's own first pairs keep their lists
    for b in range(4, 8):  # the relation-only lists: only rewrites that keep both objects
        u = rows[b, 0]
        assert data.relation_negatives.n_structural[u] > 0
        assert set(rows[b, 1:][valid[b, 1:]].tolist()) <= set(
            data.relation_negatives.offsets[u].tolist()
        )
    with pytest.raises(ValueError, match="relation_share needs caption_negatives"):
        _config(relation_share=0.5)


def test_relation_share_without_relation_captions_is_refused(shapes, tmp_path, monkeypatch):
    import crossrank.training.data as train_data

    ds, index = shapes
    prepare = train_data.prepare_training_set

    def without_relations(*args, **kwargs):  # as a shapes split whose captions name no relation
        data = prepare(*args, **kwargs)
        bank = data.relation_negatives
        data.relation_negatives = dataclasses.replace(
            bank,
            offsets=[o[:0] for o in bank.offsets],
            n_structural=np.zeros_like(bank.n_structural),
        )
        return data

    monkeypatch.setattr(train_data, "prepare_training_set", without_relations)
    with pytest.raises(
        InvalidArgumentError,
        match="relation_share needs relation captions .* train without --relation-share",
    ):
        train_reranker(
            index,
            ds.pairs_path,
            tmp_path / "r",
            model_config=TINY,
            config=_config(steps=2, caption_negatives=3, relation_share=0.5),
        )
    assert not (tmp_path / "r" / CHECKPOINT_NAME).exists()


def test_caption_only_steps_train_the_reranker_alone_first(shapes, tmp_path, monkeypatch):
    # Curriculum: the first steps rank captions on the reranker's own logits (no first-stage
    # residual, no image-side candidate lists), the rest train both losses with the residual.
    import crossrank.training.reranker as train_module

    calls = []  # (training step's forward, first-stage residual added?), validation left out
    forward, forward_captions = train_module._forward, train_module.forward_captions

    def spy_forward(model, banks, *args, **kwargs):
        if model.training:
            calls.append(("images", banks.residual is not None))
        return forward(model, banks, *args, **kwargs)

    def spy_captions(model, banks, *args, residual=True, **kwargs):
        if model.training:
            calls.append(("captions", residual and banks.residual is not None))
        return forward_captions(model, banks, *args, residual=residual, **kwargs)

    monkeypatch.setattr(train_module, "_forward", spy_forward)
    monkeypatch.setattr(train_module, "forward_captions", spy_captions)
    ds, index = shapes
    report = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "r",
        model_config=TINY,
        config=_config(caption_negatives=3, caption_only_steps=4, first_stage_weight=5.0),
    )
    assert calls == [("captions", False)] * 4 + [("images", True), ("captions", True)] * 4
    by_step = {e["step"]: e for e in report.curve}
    assert "train_accuracy" not in by_step[4] and 0.0 <= by_step[4]["train_caption_accuracy"] <= 1.0
    assert 0.0 <= by_step[8]["train_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["metadata"]["train"]["caption_only_steps"] == 4


def test_images_paired_with_the_identical_caption_are_never_negatives(colours):
    pairs, index = colours
    data = prepare_training_set(index, pairs, _config(mine_k=30, val_fraction=0.0))
    assert data.relevance == "caption" and data.counts["missing_image"] == 0
    paths = [_images(index)[row] for row in data.pool_rows]
    red = data.captions.index("a red circle")
    red_images = np.flatnonzero([int(Path(p).stem) % 2 == 0 for p in paths])
    assert red_images.size == 12
    assert data.hard_count[red] == 12  # every image was mined: the 12 blue ones remain
    assert not np.isin(data.hard[red, : data.hard_count[red]], red_images).any()
    sampler = CandidateSampler(data, n_candidates=13, in_batch=True)
    rng = np.random.default_rng(0)
    batch = np.arange(data.train_caption.size)  # every pair: in-batch offers red positives too
    for n_hard in (0, 6, 12):
        lists = sampler.sample(data.train_caption[batch], data.train_image[batch], n_hard, rng)
        is_red = data.train_caption[batch] == red
        assert np.isin(lists[is_red, 0], red_images).all()
        assert not np.isin(lists[is_red, 1:], red_images).any()
        assert np.isin(lists[~is_red, 1:], red_images).all()
        assert all(len(set(row)) == row.size for row in lists)  # enough negatives: no repeats


def test_validation_captions_are_held_out_of_training(shapes):
    ds, index = shapes
    data = prepare_training_set(index, ds.pairs_path, _config(val_fraction=0.2))
    assert data.counts["val_captions"] == data.val_captions.size > 0
    assert not np.isin(data.train_caption, data.val_captions).any()
    assert data.counts["used_pairs"] + data.counts["val_pairs"] == data.counts["pairs"]


def test_missing_images_and_empty_captions_are_skipped_and_counted(colours, tmp_path):
    _, index = colours
    images = _images(index)
    rows = [
        (p, "a red circle" if i % 2 == 0 else "a blue square") for i, p in enumerate(images[:10])
    ]
    rows += [("gone/one.png", "a cat"), ("/nowhere/two.png", "a dog"), (None, "a bird")]
    rows += [(images[10], ""), (images[11], "   "), (images[12], None)]
    pairs = _write_pairs(tmp_path / "pairs.csv", rows)
    report = train_reranker(
        index, pairs, tmp_path / "r", model_config=TINY, config=_config(steps=2, val_fraction=0.0)
    )
    counts = report.counts
    assert (counts["pairs"], counts["missing_image"], counts["empty_caption"]) == (16, 3, 3)
    assert counts["used_pairs"] == 10 and counts["images"] >= 10  # pairs' images + mined ones
    assert report.first_stage == {} and report.final == {}


# -- errors -----------------------------------------------------------------------------------


def test_no_usable_pair_is_refused(colours, tmp_path):
    _, index = colours
    pairs = _write_pairs(tmp_path / "pairs.csv", [("a.png", "a cat"), (_images(index)[0], " ")])
    with pytest.raises(
        InvalidArgumentError,
        match=r"no usable pair in .*pairs\.csv: of 2 pairs, "
        r"1 name an image not in index .* 1 have an "
        r"empty caption; build the index over",
    ):
        train_reranker(index, pairs, tmp_path / "r", model_config=TINY, config=_config())


@pytest.mark.parametrize(
    "columns, missing", [(["path", "text"], "`caption`"), (["file", "text"], "`path` or `caption`")]
)
def test_a_pairs_file_without_path_and_caption_columns_is_refused(
    colours, tmp_path, columns, missing
):
    _, index = colours
    pairs = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({columns[0]: ["a.png"], columns[1]: ["a cat"]}), pairs)
    with pytest.raises(
        InvalidArgumentError,
        match=rf"pairs file .* has no {missing} column "
        rf"\(columns: {columns[0]}, {columns[1]}\)",
    ):
        train_reranker(index, pairs, tmp_path / "r", model_config=TINY, config=_config())


def test_a_missing_or_foreign_pairs_file_is_refused(colours, tmp_path):
    _, index = colours
    with pytest.raises(InvalidArgumentError, match=r"pairs file .*none\.csv does not exist"):
        train_reranker(index, tmp_path / "none.csv", tmp_path / "r", config=_config())
    (tmp_path / "pairs.json").write_text("[]")
    with pytest.raises(InvalidArgumentError, match=r"has suffix '\.json'; a pairs file is a "):
        train_reranker(index, tmp_path / "pairs.json", tmp_path / "r", config=_config())


@pytest.mark.parametrize("kind", ["hf-model", "other-files", "file"])
def test_an_output_folder_of_other_files_is_refused_and_left_untouched(colours, tmp_path, kind):
    # A run replaces config.json and model.safetensors: a model folder given as --out by mistake
    # would lose its own.
    _, index = colours
    out = tmp_path / "out"
    files = {
        "hf-model": {"config.json": b'{"model_type": "clip"}', "model.safetensors": b"weights"},
        "other-files": {"notes.txt": b"mine", "train_log.jsonl": b"{}"},
        "file": {},
    }[kind]
    if kind == "file":
        out.write_bytes(b"a file")
    else:
        out.mkdir()
        for name, data in files.items():
            (out / name).write_bytes(data)
    match = (
        r"the output folder .*out is a file"
        if kind == "file"
        else r"the output folder .*out holds files a `crossrank train` run did not write \("
        + {"hf-model": r"config\.json \(not a crossrank reranker's\)\)", "other-files": "notes"}[
            kind
        ]
    )
    with pytest.raises(InvalidArgumentError, match=match):
        train_reranker(index, tmp_path / "pairs.csv", out, model_config=TINY, config=_config())
    if kind == "file":
        assert out.read_bytes() == b"a file"
    else:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == files


def test_a_checkpoint_of_another_run_is_refused(shapes, tmp_path):
    ds, index = shapes
    train_reranker(index, ds.pairs_path, tmp_path / "r", model_config=TINY, config=_config(steps=4))
    # The message names each differing field with both values, so that a run can be resumed.
    with pytest.raises(
        InvalidArgumentError,
        match=r"checkpoint .*checkpoint\.pt was written by a "
        r"training run with another training config "
        r"\(lr: 0\.003 in the checkpoint, 0\.001 in this run\); "
        r"resume with the checkpoint's settings, "
        r"delete it .* or pick another --out",
    ):
        train_reranker(
            index,
            ds.pairs_path,
            tmp_path / "r",
            model_config=TINY,
            config=_config(steps=4, lr=1e-3),
        )
    with pytest.raises(
        InvalidArgumentError,
        match=r"another model config \(gated: True in the checkpoint, "
        r"False in this run; init: 'bert' .*\); resume",
    ):
        train_reranker(
            index,
            ds.pairs_path,
            tmp_path / "r",
            model_config=RerankerConfig(width=8, heads=2, layers=1),
            config=_config(steps=4),
        )


def test_a_checkpoint_that_predates_a_field_resumes_while_the_field_keeps_its_default(
    shapes, tmp_path
):
    ds, index = shapes
    config = _config(steps=6, checkpoint_every=4)
    cut, ckpt = tmp_path / "cut", tmp_path / "cut" / CHECKPOINT_NAME

    _interrupted_run(index, ds.pairs_path, cut, config, at_step=5)
    state = torch.load(ckpt, weights_only=True)
    del state["fingerprint"]["config"]["caption_only_steps"]  # as written before these fields
    del state["fingerprint"]["model"]["init"]
    del state["fingerprint"]["inputs"]  # the weights' hashes, recorded since
    torch.save(state, ckpt)
    with pytest.raises(InvalidArgumentError, match="another training config"):  # not the old run's
        train_reranker(
            index,
            ds.pairs_path,
            cut,
            model_config=TINY,
            config=_config(steps=6, checkpoint_every=4, caption_negatives=2, caption_only_steps=2),
        )
    with pytest.raises(InvalidArgumentError, match="another model config"):
        train_reranker(
            index,
            ds.pairs_path,
            cut,
            model_config=dataclasses.replace(TINY, init="lecun"),
            config=config,
        )
    assert (
        train_reranker(index, ds.pairs_path, cut, model_config=TINY, config=config).resumed_from
        == 4
    )


def test_a_corrupt_checkpoint_is_refused(shapes, tmp_path):
    ds, index = shapes
    out = tmp_path / "r"
    out.mkdir()
    (out / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(
        ModelError,
        match=r"checkpoint .*checkpoint\.pt is corrupt or truncated "
        r"\(.*\); delete it to train from scratch",
    ):
        train_reranker(index, ds.pairs_path, out, model_config=TINY, config=_config())


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"n_candidates": 1}, r"n_candidates must be an int >= 2"),
        ({"loss": "hinge"}, r"loss must be one of listwise, itm, got 'hinge'"),
        ({"hard_fraction": 1.5}, r"hard_fraction must be a number in \[0, 1\], got 1.5"),
        ({"steps": 0}, r"steps must be an int >= 1, got 0"),
        ({"lr": 0}, r"lr must be a number > 0"),
        ({"val_fraction": 0.9}, r"val_fraction must be a number in \[0, 0.5\]"),
        ({"in_batch": "yes"}, r"in_batch must be True or False"),
        (
            {"first_stage_weight": -1},
            r"first_stage_weight must be 'auto' or a number in \[0, 1e4\)",
        ),
        (
            {"first_stage_weight": "heavy"},
            r"first_stage_weight must be 'auto' or a number in \[0, 1e4\)",
        ),
        ({"caption_negatives": -1}, r"caption_negatives must be an int >= 0"),
        ({"distill": -1}, r"distill must be a number in \[0, 1e3\)"),
        ({"distill_temperature": 0}, r"distill_temperature must be a number in \(0, 100\]"),
        ({"teacher": ""}, r"teacher must be a reranker folder or None"),
        ({"caption_only_steps": 5}, r"caption_only_steps=5 needs caption_negatives >= 1"),
        ({"attention_supervision": 1.0}, r"attention_supervision needs caption_negatives >= 1"),
        (
            {"attention_supervision": -1, "caption_negatives": 2},
            r"attention_supervision must be a number in \[0, 1e3\)",
        ),
        (
            {"caption_only_steps": 10, "caption_negatives": 2, "steps": 10},
            r"caption_only_steps must be below steps .*got 10 of 10",
        ),
    ],
)
def test_config_refuses_bad_values(fields, match):
    with pytest.raises(ValueError, match=match):
        RerankTrainConfig(**fields)


def test_config_schedules():
    config = RerankTrainConfig(steps=100, warmup=10, lr=1e-3, hard_fraction=0.5, curriculum=0.2)
    assert config.lr_at(0) == pytest.approx(1e-4) and config.lr_at(9) == pytest.approx(1e-3)
    assert config.lr_at(99) == pytest.approx(5e-5, rel=0.01)  # cosine down to lr / 20
    assert [config.hard_fraction_at(s) for s in (0, 10, 20, 90)] == [0.0, 0.25, 0.5, 0.5]
    assert RerankTrainConfig(hard_fraction=0.5).hard_fraction_at(0) == 0.5  # no curriculum


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trains_on_cuda(shapes, tmp_path):
    ds, index = shapes
    report = train_reranker(
        index, ds.pairs_path, tmp_path / "r", model_config=TINY, config=_config(device="cuda")
    )
    assert report.device.startswith("cuda") and math.isfinite(report.curve[-1]["train_loss"])


def test_a_non_finite_step_is_skipped_and_weights_stay_finite(colours, tmp_path, monkeypatch):
    import crossrank.training.reranker as train_module

    real_loss, calls = train_module.rerank_loss, []

    def sometimes_nan(logits, loss="listwise"):
        calls.append(1)
        value = real_loss(logits, loss)
        return value * float("nan") if len(calls) in (3, 4) else value

    monkeypatch.setattr(train_module, "rerank_loss", sometimes_nan)
    pairs, index = colours
    report = train_reranker(
        index, pairs, tmp_path / "r", model_config=TINY, config=_config(steps=8, val_fraction=0.0)
    )
    assert report.counts["skipped_steps"] == 2
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(
        math.isfinite(entry["train_loss"]) for entry in report.curve if "train_loss" in entry
    )


def test_training_that_keeps_diverging_stops_with_a_clear_error(colours, tmp_path, monkeypatch):
    import crossrank.training.reranker as train_module

    monkeypatch.setattr(train_module, "MAX_NONFINITE_IN_A_ROW", 3)
    monkeypatch.setattr(
        train_module, "rerank_loss", lambda logits, loss="listwise": logits.sum() * float("nan")
    )
    pairs, index = colours
    with pytest.raises(
        CrossrankError, match=r"training diverged: 3 steps in a row up to step 3 .* lower --lr"
    ):
        train_reranker(
            index,
            pairs,
            tmp_path / "r",
            model_config=TINY,
            config=_config(steps=8, val_fraction=0.0),
        )


# -- fine-tuning from a saved reranker ---------------------------------------------------------


def test_init_from_starts_at_the_saved_weights_and_takes_their_architecture(shapes, tmp_path):
    ds, index = shapes
    train_reranker(index, ds.pairs_path, tmp_path / "base", model_config=TINY, config=_config())
    base = load_reranker(tmp_path / "base", device="cpu").state_dict()
    # lr ~ 0 for one step: the fine-tune's weights stay where the saved ones are
    config = _config(steps=1, lr=1e-12, warmup=1, init_from=str(tmp_path / "base"))
    report = train_reranker(index, ds.pairs_path, tmp_path / "ft", config=config)
    tuned = load_reranker(tmp_path / "ft", device="cpu")
    assert tuned.config == load_reranker(tmp_path / "base", device="cpu").config  # not defaults
    assert all(torch.allclose(tuned.state_dict()[k], v, atol=1e-6) for k, v in base.items())
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())["metadata"]
    assert saved["train"]["init_from"] == str(tmp_path / "base")
    assert len(saved["init_weights_sha256"]) == 64 and report.steps == 1
    # A fresh run of the same config does not start there.
    fresh = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "fresh",
        model_config=TINY,
        config=_config(steps=1, lr=1e-12, warmup=1),
    )
    state = load_reranker(fresh.out_dir, device="cpu").state_dict()
    assert not all(torch.allclose(state[k], v, atol=1e-6) for k, v in base.items())


def test_init_from_another_architecture_or_a_missing_folder_is_one_line(shapes, tmp_path):
    ds, index = shapes
    train_reranker(index, ds.pairs_path, tmp_path / "base", model_config=TINY, config=_config())
    config = _config(init_from=str(tmp_path / "base"))
    wider = dataclasses.replace(TINY, width=32)
    with pytest.raises(InvalidArgumentError, match=r"another architecture .*width: 16 there, 32"):
        train_reranker(index, ds.pairs_path, tmp_path / "ft", model_config=wider, config=config)
    with pytest.raises(ModelError, match="nowhere"):
        train_reranker(
            index,
            ds.pairs_path,
            tmp_path / "ft2",
            config=_config(init_from=str(tmp_path / "nowhere")),
        )
    with pytest.raises(ValueError, match="init_from must be a reranker folder"):
        _config(init_from="")


# -- distillation -----------------------------------------------------------------------------


def test_distill_loss_matches_hand_computed_kl_and_is_zero_at_the_teacher():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])

    def kl(s, t, temp=1.0):
        p = torch.softmax(torch.tensor(t) / temp, 0)
        q = torch.softmax(torch.tensor(s) / temp, 0)
        return float((p * (p.log() - q.log())).sum()) * temp * temp

    expected = (kl([1.0, 0.0, -1.0], [2.0, 1.0, 0.0]) + kl([0.5, 0.5, 2.0], [0.0, 3.0, 1.0])) / 2
    assert distill_loss(student, teacher).item() == pytest.approx(expected, rel=1e-6)
    expected_t = (
        kl([1.0, 0.0, -1.0], [2.0, 1.0, 0.0], 2.0) + kl([0.5, 0.5, 2.0], [0.0, 3.0, 1.0], 2.0)
    ) / 2
    assert distill_loss(student, teacher, temperature=2.0).item() == pytest.approx(
        expected_t, rel=1e-6
    )
    # A shift of a whole list changes no softmax: the student matches a shifted teacher exactly.
    assert distill_loss(teacher + 3.0, teacher).item() == pytest.approx(0.0, abs=1e-7)
    # Empty slots take no part (and give no NaN), whatever their logits.
    valid = torch.tensor([[True, True, False], [True, True, True]])
    masked = distill_loss(student, teacher, valid)
    expected_v = (kl([1.0, 0.0], [2.0, 1.0]) + kl([0.5, 0.5, 2.0], [0.0, 3.0, 1.0])) / 2
    assert masked.item() == pytest.approx(expected_v, rel=1e-6)
    # The gradient reaches the student only.
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    distill_loss(s, t, valid).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and t.grad is None
    assert s.grad[0, 2] == 0  # an empty slot gets no gradient


def test_a_student_that_is_its_teacher_has_zero_distillation_loss(shapes, tmp_path):
    """The targets are the teacher's own scores of the very lists the student ranks, with the
    residual weight the teacher trained with (image lists and caption lists both)."""
    ds, index = shapes
    fields = dict(first_stage_weight=20.0, caption_negatives=2, caption_only_steps=2)
    train_reranker(
        index, ds.pairs_path, tmp_path / "t", model_config=TINY, config=_config(**fields)
    )
    same = _config(
        **fields, steps=4, lr=1e-12, warmup=1, eval_every=2, init_from=str(tmp_path / "t")
    )
    report = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "s",
        config=dataclasses.replace(same, teacher=str(tmp_path / "t")),
    )
    losses = [e["train_distill_loss"] for e in report.curve if "train_distill_loss" in e]
    assert len(losses) == 2  # caption-only steps, then both lists
    assert max(losses) < 1e-6
    saved = json.loads((tmp_path / "s" / "config.json").read_text())["metadata"]
    assert saved["train"]["teacher"] == str(tmp_path / "t")
    assert len(saved["teacher_weights_sha256"]) == 64
    # The same weights under another residual weight rank the image lists otherwise: the teacher
    # keeps its own 20, so a student at 5 or 0 is off it.
    for weight in (5.0, 0.0):  # 0: the student has no residual, the teacher still its own
        other = dataclasses.replace(same, first_stage_weight=weight, teacher=str(tmp_path / "t"))
        report = train_reranker(index, ds.pairs_path, tmp_path / f"s{weight}", config=other)
        assert report.curve[-1]["train_distill_loss"] > 1e-3


def test_a_teacher_retrained_in_place_stops_a_resume_and_exports_carry_its_hash(shapes, tmp_path):
    ds, index = shapes
    teacher = tmp_path / "t"
    train_reranker(index, ds.pairs_path, teacher, model_config=TINY, config=_config(steps=2))
    config = _config(steps=6, checkpoint_every=4, teacher=str(teacher))
    cut = tmp_path / "cut"
    _interrupted_run(index, ds.pairs_path, cut, config, at_step=5)
    export_checkpoint(cut, tmp_path / "exported")
    saved = json.loads((tmp_path / "exported" / "config.json").read_text())["metadata"]
    assert (
        saved["teacher_weights_sha256"]
        == hashlib.sha256((teacher / "model.safetensors").read_bytes()).hexdigest()
    )

    # Same folder, other weights: the run cannot go on with another teacher than it began with.
    other = tmp_path / "t2"
    train_reranker(index, ds.pairs_path, other, model_config=TINY, config=_config(steps=2, seed=5))
    shutil.copyfile(other / "model.safetensors", teacher / "model.safetensors")
    with pytest.raises(InvalidArgumentError, match="another init_from or teacher weights"):
        train_reranker(index, ds.pairs_path, cut, model_config=TINY, config=config)


def test_distillation_pulls_a_smaller_student_towards_its_teacher(shapes, tmp_path):
    ds, index = shapes
    teacher_dir = tmp_path / "t"
    ungated = RerankerConfig(width=16, heads=2, layers=1, mlp_ratio=2.0)  # scores differ at once
    train_reranker(
        index, ds.pairs_path, teacher_dir, model_config=ungated, config=_config(steps=16)
    )
    student = dataclasses.replace(ungated, width=8, heads=1)
    plain = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "plain",
        model_config=student,
        config=_config(steps=40, lr=1e-2),
    )
    taught = train_reranker(
        index,
        ds.pairs_path,
        tmp_path / "taught",
        model_config=student,
        config=_config(steps=40, lr=1e-2, teacher=str(teacher_dir), distill=50.0),
    )
    teacher = load_reranker(teacher_dir, device="cpu")
    queries = pq.read_table(ds.pairs_path).column("caption").to_pylist()[:12]

    def divergence(folder):
        model = load_reranker(folder, device="cpu")
        total = 0.0
        for q in queries:
            a = index.search(q, k=10, rerank_k=10, reranker=teacher, fusion="rerank").hits
            by_id = {h.id: h.rerank_score for h in a}
            b = index.search(q, k=10, rerank_k=10, reranker=model, fusion="rerank").hits
            s = torch.tensor([h.rerank_score for h in b])
            t = torch.tensor([by_id[h.id] for h in b])
            total += float(distill_loss(s[None], t[None]))
        return total / len(queries)

    assert divergence(taught.out_dir) < 0.5 * divergence(plain.out_dir)


def test_a_teacher_of_another_encoder_a_missing_one_or_other_token_features_is_one_line(
    shapes, tmp_path
):
    ds, index = shapes
    with pytest.raises(ModelError, match=r"^teacher: no reranker at .*nowhere"):
        train_reranker(
            index, ds.pairs_path, tmp_path / "a", config=_config(teacher=str(tmp_path / "nowhere"))
        )
    from crossrank.rerank import save_reranker

    wide = dataclasses.replace(TINY, text_dim=64, patch_dim=64, patch_positions=None)
    save_reranker(CrossAttentionReranker(wide), tmp_path / "wide")
    with pytest.raises(ModelMismatchError, match="^teacher: .*token dim 64"):
        train_reranker(
            index, ds.pairs_path, tmp_path / "b", config=_config(teacher=str(tmp_path / "wide"))
        )
    dim = index.manifest.encoder["patch_dim"]
    width = index.encoder.token_embedding_dim
    reads = dataclasses.replace(TINY, text_dim=dim, patch_dim=dim, token_embeddings=width)
    save_reranker(CrossAttentionReranker(reads), tmp_path / "reads")
    with pytest.raises(InvalidArgumentError, match="the teacher reads .* layer-0 token states"):
        train_reranker(
            index,
            ds.pairs_path,
            tmp_path / "c",
            model_config=TINY,
            config=_config(teacher=str(tmp_path / "reads")),
        )
    assert not (tmp_path / "c").exists()  # refused before any folder or feature work
