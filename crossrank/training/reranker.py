"""Training the cross-attention reranker over frozen encoders (``crossrank train``).

Given an index and a pairs file (image path, caption) over the index's images, the reranker learns
to put each caption's image first among candidates the first stage finds hard:

- **Features are cached, never recomputed.** The index's text encoder encodes every unique
  caption once (float16 token features in memory); the patch features of every image training can
  touch are read from the patch store once (float16 in memory). A step only gathers rows.
- **Positives** are the pair's image. Images that are also true matches are never used as
  negatives: every image paired with the identical caption, or, when the pairs file sits in a
  shapes dataset (``dataset.json`` with ``"name": "shapes"``), every image whose scene graph
  satisfies the caption (:func:`~crossrank.datasets.match_matrix`).
- **Negatives**: ``n_candidates - 1`` per query, ``hard_fraction`` of them from the caption's
  first-stage top ``mine_k`` (one batched search up front, positives removed), the rest the other
  queries' positives in the step (in-batch) topped up with random images. ``curriculum`` ramps
  the hard share up from 0.
- **Caption negatives** (``caption_negatives``, shapes datasets): each pair's image also ranks its
  true caption against rewrites that its scene graph makes false (swapped colours, shapes or
  objects, another relation, one object changed), a second loss of the same kind.
  ``caption_only_steps`` trains on that loss alone first (the reranker by itself, no first-stage
  residual, no image lists: about 4x cheaper steps), a curriculum that lets it learn to find and
  bind objects before residual training asks it to correct the first stage.
- **Loss**: ``listwise`` (softmax cross-entropy over each candidate list, the positive first) or
  ``itm`` (binary matching over every (query, candidate), both classes weighted equally).
- **Distillation** (``teacher``): a trained reranker's scores over every list a step ranks are
  soft targets beside the labels (:func:`distill_loss`), for a smaller student architecture.
- **Validation**: a fixed share of the unique captions is held out; every ``eval_every`` steps
  the log records their accuracy@1 on fixed candidate lists and the R@1 of reranking their
  first-stage top ``mine_k`` (the learning curve, also in ``out_dir/train_log.jsonl``).

Training is seeded and resumable: ``out_dir/checkpoint.pt`` (weights, optimizer, RNG states,
step and a fingerprint of config and data) is written every ``checkpoint_every`` steps; rerunning
the same call continues from it. The result is saved with
:func:`~crossrank.rerank.save_reranker` (``model.safetensors`` + ``config.json``) in ``out_dir``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.errors import (
    CrossrankError,
    InvalidArgumentError,
    ModelError,
    ModelMismatchError,
    some_of,
)
from crossrank.training.attention_targets import attention_supervision_loss, object_cell_masks
from crossrank.training.config import RerankLoss, RerankTrainConfig
from crossrank.training.state import _load_checkpoint, _save_checkpoint, _TrainLog
from crossrank.training.steps import (
    Banks,
    _first_stage_metrics,
    _forward,
    _validate,
    forward_captions,
    top1_accuracy,
)

if TYPE_CHECKING:
    import torch

    from crossrank.api.index import Index
    from crossrank.rerank.config import RerankerConfig
    from crossrank.rerank.cross_attention import CrossAttentionReranker

__all__ = [
    "TrainReport",
    "make_optimizer",
    "distill_loss",
    "rerank_loss",
    "resolve_model_config",
    "train_reranker",
    "export_checkpoint",
    "CHECKPOINT_NAME",
    "LOG_NAME",
]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"

#: ``progress(step, steps, loss, accuracy)`` after each step; accuracy is the share of the step's
#: queries whose positive got the top logit.
ProgressFn = Callable[[int, int, float, float], None]


#: Consecutive steps with a non-finite loss or gradient after which training stops as diverged.
MAX_NONFINITE_IN_A_ROW = 20


@dataclass(frozen=True)
class TrainReport:
    """What :func:`train_reranker` did.

    Attributes:
        out_dir: the folder holding the reranker (and ``checkpoint.pt``, ``train_log.jsonl``).
        steps: the steps the reranker was trained for in all.
        resumed_from: the checkpoint step this call started from (0 = a fresh run).
        seconds: wall time of this call, preparation and validation included.
        steps_per_second: optimizer steps per second of this call, validation excluded.
        device: where it trained (``cpu``, ``cuda:0``).
        relevance: ``"shapes"`` (exact scene-graph relevance) or ``"caption"`` (identical caption).
        counts: ``pairs``, ``used_pairs``, ``val_pairs``, ``missing_image`` and
            ``empty_caption`` (skipped), ``no_negative`` (pairs whose caption is true of every
            candidate image), ``captions``, ``train_captions``, ``val_captions``, ``images``.
        first_stage: on the validation captions, the first stage's ``r1`` and its ``recall``
            at ``mine_k`` (the ceiling of reranking); empty without validation.
        final: the last validation: ``val_accuracy`` (positive ranked first of
            ``n_candidates``), ``val_r1`` (R@1 after reranking the first-stage top ``mine_k``),
            with caption negatives ``val_caption_accuracy`` (the true caption ranked first among
            its rewrites on its image).
        curve: the log, one dict per ``eval_every`` steps (``step``, ``train_loss``,
            ``train_accuracy``, ``lr``, ``hard_fraction``, ``val_accuracy``, ``val_r1``, ...).
        first_stage_weight: the residual weight W it trained with (``"auto"`` resolved; 0 = no
            residual); the reranker recommends ``--fusion weighted:1/(1+W)``.
    """

    out_dir: Path
    steps: int
    resumed_from: int
    seconds: float
    steps_per_second: float
    device: str
    relevance: str
    counts: dict[str, int]
    first_stage: dict[str, float]
    final: dict[str, float]
    curve: tuple[dict[str, Any], ...]
    first_stage_weight: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (``out_dir`` as a string)."""
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["curve"] = list(self.curve)
        return out


def rerank_loss(
    logits: torch.Tensor,
    loss: RerankLoss | str = RerankLoss.LISTWISE,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of candidate lists whose positive is in column 0.

    Args:
        logits: float32 ``(B, k)`` reranker logits, ``k >= 2``.
        loss: ``listwise``: mean over queries of ``-log softmax(logits)[0]``. ``itm``: binary
            cross-entropy per (query, candidate), label 1 in column 0 and 0 elsewhere, the
            positives' mean and the negatives' mean averaged with equal weight.
        valid: bool ``(B, k)``, False = an empty slot that takes no part (column 0 must be
            True); None = all valid.

    Returns:
        A float32 scalar.
    """
    import torch
    import torch.nn.functional as F

    if valid is not None:
        if not bool(valid[:, 0].all()):
            raise InvalidArgumentError(
                "rerank_loss: column 0 (the positive) must be valid in every row"
            )
        logits = logits.masked_fill(~valid, float("-inf"))
    if RerankLoss(loss) == RerankLoss.LISTWISE:
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, target)
    labels = torch.zeros_like(logits)
    labels[:, 0] = 1.0
    negative = torch.ones_like(labels, dtype=torch.bool)
    negative[:, 0] = False
    if valid is not None:
        negative &= valid
        logits = logits.masked_fill(~valid, 0.0)  # finite, and excluded from the mean below
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (B, k)
    neg = bce[negative].mean() if bool(negative.any()) else bce.new_zeros(())
    return 0.5 * bce[:, 0].mean() + 0.5 * neg


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The distillation loss of candidate lists: the teacher's softmax over each list as the
    target of the student's, ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` averaged
    over the lists (``T^2`` keeps the gradient's scale independent of ``T``).

    Args:
        student: float32 ``(B, k)`` logits, with gradient.
        teacher: ``(B, k)`` logits of the same lists (no gradient is taken through them).
        valid: bool ``(B, k)``, False = an empty slot that takes no part; None = all valid.
            Every row needs a valid slot.
        temperature: ``T > 0``; above 1 softens both distributions.

    Returns:
        A float32 scalar, 0 where the student's list distributions equal the teacher's.
    """
    import torch

    t = float(temperature)
    student, teacher = student.float() / t, teacher.detach().float() / t
    if valid is not None:
        student = student.masked_fill(~valid, float("-inf"))
        teacher = teacher.masked_fill(~valid, float("-inf"))
    log_s = torch.log_softmax(student, dim=1)
    log_t = torch.log_softmax(teacher, dim=1)
    term = log_t.exp() * (log_t - log_s)  # (B, k); NaN in the empty slots (0 * (-inf + inf))
    if valid is not None:
        term = torch.where(valid, term, torch.zeros_like(term))
    return t * t * term.sum(dim=1).mean()


def train_reranker(
    index: Index | str | os.PathLike[str],
    pairs_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_config: RerankerConfig | Mapping[str, Any] | None = None,
    config: RerankTrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> TrainReport:
    """Train a :class:`~crossrank.rerank.CrossAttentionReranker` on (image, caption) pairs.

    The encoders stay frozen: token features come from the index's text encoder (once per unique
    caption), patch features from its patch store; no image is re-encoded. A
    ``checkpoint.pt`` in ``out_dir`` from an earlier run of the same config and data is resumed.

    Args:
        index: an opened :class:`~crossrank.api.index.Index` or its directory (opened on
            ``config.device``), built over the pairs' images.
        pairs_path: a ``.parquet`` or ``.csv`` file with ``path`` and ``caption`` columns;
            relative paths resolve against its folder. Pairs whose image is not in the index, or
            whose caption is empty, are skipped and counted.
        out_dir: the folder for the reranker, ``checkpoint.pt`` and ``train_log.jsonl``.
        model_config: the architecture: a :class:`RerankerConfig`, or a mapping of the
            :class:`RerankerConfig` fields to change from their defaults (what ``crossrank train``
            passes), where ``patch_positions`` defaults to the encoder's patch count (None or 0 =
            no position embedding); None = all defaults so. ``text_dim`` and ``patch_dim`` are
            always taken from the index's encoder.
        config: the training settings (default :class:`RerankTrainConfig()`).
        progress: called as ``progress(step, steps, loss, accuracy)`` after each step.

    Returns:
        A :class:`TrainReport`; the reranker is in ``out_dir`` (open it with
        :func:`~crossrank.rerank.load_reranker`).

    Raises:
        InvalidArgumentError: the pairs file is missing, unreadable or lacks ``path``/``caption``;
            no pair is usable; the device is unavailable; ``out_dir`` holds a checkpoint of
            another config or data.
        ModelError: ``out_dir`` holds a corrupt checkpoint, or the reranker cannot be written.
        ModelMismatchError: ``model_config.patch_positions`` is smaller than the encoder's patches.
        IndexNotFoundError: ``index`` is a folder without an index.

    Example:
        >>> config = RerankTrainConfig(steps=300)
        >>> report = train_reranker("shapes-train.idx", "shapes-train/pairs.parquet",
        ...                         "runs/reranker", config=config)  # doctest: +SKIP
        >>> report.final["val_r1"], report.first_stage["r1"]  # doctest: +SKIP
    """
    import torch

    from crossrank.api.index import Index
    from crossrank.device import resolve_device
    from crossrank.rerank.checkpoint import load_reranker, save_reranker
    from crossrank.rerank.cross_attention import CrossAttentionReranker, _autocast
    from crossrank.training.data import CandidateSampler, prepare_training_set

    t_start = time.perf_counter()
    config = config if config is not None else RerankTrainConfig()
    if not isinstance(config, RerankTrainConfig):
        raise InvalidArgumentError(
            f"config must be a RerankTrainConfig, got {type(config).__name__}"
        )
    _refuse_foreign_out(Path(out_dir))
    device = resolve_device(config.device)
    if not isinstance(index, Index):
        index = Index.open(index, device=config.device)
    if config.first_stage_weight == "auto":
        config = config.resolve_first_stage_weight(getattr(index.encoder, "logit_scale", None))
        logger.info(
            "first_stage_weight auto: %g (the encoder's logit scale%s)",
            config.first_stage_weight,
            "" if config.first_stage_weight else ": none, so no residual",
        )
    # The reranker a fine-tune starts from; the weights' hashes of the run's reranker inputs.
    init, input_hashes = None, {}
    if config.init_from is not None:
        init = load_reranker(config.init_from, device="cpu", encoder_info=index.manifest.encoder)
        input_hashes["init_weights_sha256"] = _init_sha256(config.init_from)
        if model_config is None:
            model_config = init.config
    model_config = resolve_model_config(model_config, index.manifest.encoder, index)
    teacher, teacher_weight = None, 0.0
    if config.teacher is not None:
        teacher, teacher_weight, teacher_record = _load_teacher(config, model_config, index)
        input_hashes.update(teacher_record)
    if init is not None and init.config != model_config:
        raise InvalidArgumentError(
            f"init_from {config.init_from} is a reranker of another architecture than the one "
            f"asked for ({_config_diff(init.config, model_config)}); leave the architecture "
            "unset to fine-tune its own"
        )
    if (
        config.attention_supervision
        and model_config.n_query_tokens
        and model_config.query_tokens_mode == "replace"
    ):
        raise InvalidArgumentError(
            "attention_supervision supervises the text tokens' attention, and learnable query "
            "tokens in "
            "'replace' mode leave none; use query_tokens_mode='concat' or train without it"
        )
    data = prepare_training_set(
        index, pairs_path, config, token_embeddings=bool(model_config.token_embeddings)
    )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the output folder {out}: {e.strerror or e}") from e

    fingerprint = {
        "config": {k: v for k, v in config.to_dict().items() if k not in _NOT_FINGERPRINTED},
        "model": model_config.to_dict(),
        "data": {**data.fingerprint, "counts": data.counts},
        # The weights, not only the paths: a teacher retrained in place between a stop and a
        # resume would otherwise go unnoticed.
        "inputs": input_hashes,
    }
    torch.manual_seed(config.seed)
    model = CrossAttentionReranker(model_config)
    if init is not None:
        model.load_state_dict(init.state_dict())
    model = model.to(device).train()
    optimizer = make_optimizer(model, config)
    # bf16 autocast needs no loss scaling; the fp16 fallback on older GPUs does.
    scaler = torch.amp.GradScaler(
        device.type, enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported()
    )
    rng = np.random.default_rng(config.seed)

    ckpt_path = out / CHECKPOINT_NAME
    start = 0
    # The train loss and accuracy of the steps since the last log line; checkpointed, so that a
    # resumed run logs the same means as an uninterrupted one.
    window: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, fingerprint, _fingerprint_defaults())
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start = int(state["step"])
        window = state.get("window", {"loss": [], "accuracy": []})
        logger.info("resuming from %s at step %d", ckpt_path, start)

    # The banks go to the device once; a step then gathers rows there.
    tokens = torch.from_numpy(data.tokens).to(device)  # (U, L, d) float16
    token_mask = torch.from_numpy(data.token_mask).to(device)  # (U, L) bool
    patches = torch.from_numpy(data.patches).to(device)  # (N, P, d) float16
    # The first-stage cosine of every (caption, image) pair, weighted, for residual training.
    vectors = None  # (query vectors (U, D), image vectors (N, D)) float32, when a residual needs
    if config.first_stage_weight > 0 or teacher_weight > 0:
        vectors = (
            torch.from_numpy(data.query_vectors).to(device),
            torch.from_numpy(data.image_vectors).to(device),
        )
    residual = None if config.first_stage_weight <= 0 else (config.first_stage_weight, *vectors)
    banks = Banks(tokens, token_mask, patches, residual)
    teacher_banks = None  # the same features, with the residual weight the teacher ranks with
    if teacher is not None:
        teacher = teacher.to(device).eval()
        teacher_banks = banks._replace(
            residual=None if teacher_weight <= 0 else (teacher_weight, *vectors)
        )
    sampler = CandidateSampler(data, config.n_candidates, config.in_batch)
    n_neg = config.n_candidates - 1
    val_candidates = sampler.sample(
        data.val_captions,
        data.val_image,
        round(config.hard_fraction * n_neg),
        np.random.default_rng([config.seed, 2]),
        in_batch=False,
    )
    val_rewrites = None  # fixed rewrites of each validation caption, false of its image
    if data.negatives is not None and data.val_captions.size:
        val_rewrites = data.negatives.sample(
            data.val_captions,
            data.val_image,
            config.caption_negatives,
            np.random.default_rng([config.seed, 3]),
        )
    first_stage = _first_stage_metrics(data)
    log = _TrainLog(out / LOG_NAME, start)

    def evaluate(
        step: int,
        train_loss: float | None,
        train_acc: float | None,
        caption_acc: float | None = None,
        attention_mass: float | None = None,
        relation_acc: float | None = None,
        distilled: float | None = None,
    ) -> None:
        entry: dict[str, Any] = {
            "step": step,
            "lr": config.lr_at(max(step - 1, 0)),
            "hard_fraction": config.hard_fraction_at(max(step - 1, 0)),
        }
        if train_loss is not None:
            entry["train_loss"] = train_loss
        if train_acc is not None:  # none on caption-only steps: they rank no image lists
            entry["train_accuracy"] = train_acc
        if caption_acc is not None:  # the true caption ranked first among its rewrites
            entry.update(train_caption_accuracy=caption_acc)
        if attention_mass is not None:  # each object word's attention on its object's patches
            entry.update(train_attention_mass=attention_mass)
        if relation_acc is not None:  # the relation-only lists (relation_share)
            entry.update(train_relation_accuracy=relation_acc)
        if distilled is not None:  # the distillation loss, before its weight (with a teacher)
            entry.update(train_distill_loss=distilled)
        if data.val_captions.size:
            entry.update(_validate(model, data, val_candidates, banks, device, val_rewrites))
        entry["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        log.append(entry)
        logger.info(
            "step %d: %s",
            step,
            ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "step" and v is not None),
        )

    supervise = data.object_tokens is not None and config.attention_supervision > 0
    relation_pool = None  # training pairs whose caption has relation-only rewrites
    if config.relation_share and data.relation_negatives is not None:
        relation_pool = np.flatnonzero(data.relation_negatives.n_structural[data.train_caption] > 0)
        if relation_pool.size == 0:
            raise InvalidArgumentError(
                "relation_share needs relation captions ('... left of ...') among the training "
                "pairs, and "
                f"none of the {data.train_caption.size} has one; train without --relation-share"
            )
    # The object words' positions among the query-side states: after any learnable query tokens.
    token_offset = model_config.n_query_tokens
    if start == 0:
        evaluate(0, None, None)
    train_seconds = 0.0
    skipped_steps = bad_in_a_row = 0
    for step in range(start, config.steps):
        t_step = time.perf_counter()
        batch = rng.choice(
            data.train_caption.size,
            size=min(config.batch_size, data.train_caption.size),
            replace=False,
        )
        caption, positive = data.train_caption[batch], data.train_image[batch]
        caption_only = step < config.caption_only_steps
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        logits, loss = None, torch.zeros((), device=device)
        distilled = None  # the step's distillation loss(es), before the distill weight
        if not caption_only:
            n_hard = round(config.hard_fraction_at(step) * n_neg)
            candidates = sampler.sample(caption, positive, n_hard, rng)  # (B, k)
            with _autocast(device):
                logits = _forward(model, banks, caption, candidates, device)  # (B, k) float32
            loss = rerank_loss(logits, config.loss)
            if teacher is not None:
                with torch.no_grad(), _autocast(device):
                    target = _forward(teacher, teacher_banks, caption, candidates, device)
                distilled = distill_loss(logits, target, None, config.distill_temperature)
                loss = loss + config.distill * distilled
        caption_acc = attention_mass = relation_acc = None
        if data.negatives is not None:
            # Text side: the true caption against rewrites false of the image, on that image.
            rows, valid, text_image, n_relation = _caption_lists(
                data, caption, positive, config, relation_pool, rng
            )
            valid_t = torch.from_numpy(valid).to(device)
            masks = None
            if supervise:  # where each object the true caption names lies in its image
                masks = torch.from_numpy(
                    object_cell_masks(
                        data.negatives.specs,
                        data.negatives.scenes,
                        rows[:, 0],
                        text_image,
                        banks.patches.shape[1],
                    )
                ).to(device)  # (B, P, 2)
            with _autocast(device):
                text_logits = forward_captions(
                    model,
                    banks,
                    rows,
                    text_image,
                    device,
                    residual=not caption_only,
                    attend_to=masks,
                )  # (B, 1+M)[, (B, 1+M, n, 2)]
            if masks is not None:
                text_logits, attended = text_logits
                positions = torch.from_numpy(data.object_tokens[rows[:, 0]]).to(device)  # (B, 2)
                positions = torch.where(positions >= 0, positions + token_offset, positions)
                supervision, attention_mass = attention_supervision_loss(
                    attended[:, 0].float(), positions, masks
                )
                if supervision is not None:
                    loss = loss + config.attention_supervision * supervision
            loss = loss + rerank_loss(text_logits, config.loss, valid_t)
            if teacher is not None:
                with torch.no_grad(), _autocast(device):
                    target = forward_captions(
                        teacher, teacher_banks, rows, text_image, device, residual=not caption_only
                    )
                text_distilled = distill_loss(
                    text_logits, target, valid_t, config.distill_temperature
                )
                distilled = text_distilled if distilled is None else distilled + text_distilled
                loss = loss + config.distill * text_distilled
            caption_hits = top1_accuracy(text_logits.detach().masked_fill(~valid_t, float("-inf")))
            caption_acc = float(caption_hits.mean().item())
            if n_relation:  # the relation-only lists come last
                relation_acc = float(caption_hits[-n_relation:].mean().item())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        loss_value = float(loss.item())
        # A non-finite loss or gradient would turn every weight into NaN for good (clipping does
        # not help, and the fp16 scaler's own skip is off under bf16): skip that update instead.
        finite = math.isfinite(loss_value) and bool(torch.isfinite(grad_norm))
        if finite:
            scaler.step(optimizer)
            bad_in_a_row = 0
        else:
            skipped_steps += 1
            bad_in_a_row += 1
            logger.warning(
                "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                step + 1,
                bad_in_a_row,
            )
            if bad_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise CrossrankError(
                    f"training diverged: {bad_in_a_row} steps in a row up to step {step + 1} gave "
                    "a non-finite "
                    f"loss or gradient; lower --lr (now {config.lr}) or train with --device cpu"
                )
        scaler.update()
        # Caption-only steps report the caption accuracy (there are no image lists).
        acc = caption_acc if logits is None else float(top1_accuracy(logits.detach()).mean().item())
        train_seconds += time.perf_counter() - t_step
        if finite:
            window["loss"].append(loss_value)
            if logits is not None:
                window["accuracy"].append(acc)
            if caption_acc is not None:
                window.setdefault("caption_accuracy", []).append(caption_acc)
            if attention_mass is not None:
                window.setdefault("attention_mass", []).append(attention_mass)
            if relation_acc is not None:
                window.setdefault("relation_accuracy", []).append(relation_acc)
            if distilled is not None:
                window.setdefault("distill_loss", []).append(float(distilled.item()))
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            evaluate(
                done,
                float(np.mean(window["loss"])) if window["loss"] else None,
                float(np.mean(window["accuracy"])) if window["accuracy"] else None,
                float(np.mean(window["caption_accuracy"]))
                if window.get("caption_accuracy")
                else None,
                float(np.mean(window["attention_mass"])) if window.get("attention_mass") else None,
                float(np.mean(window["relation_accuracy"]))
                if window.get("relation_accuracy")
                else None,
                float(np.mean(window["distill_loss"])) if window.get("distill_loss") else None,
            )
            window = {"loss": [], "accuracy": []}
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_checkpoint(
                ckpt_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "step": done,
                    "window": window,
                    "fingerprint": fingerprint,
                },
            )
        if progress is not None:
            progress(done, config.steps, loss_value, acc)

    final = {
        k: log.entries[-1][k]
        for k in ("val_accuracy", "val_r1", "val_caption_accuracy")
        if log.entries and k in log.entries[-1]
    }
    metadata = _reranker_metadata(
        "crossrank train",
        config,
        config.steps,
        {
            "pairs": str(Path(pairs_path).absolute()),
            "index": str(index.path.absolute()),
            "encoder": index.model_id,
            **data.fingerprint,
            "counts": data.counts,
        },
        first_stage_val=first_stage,
        val=final,
        **input_hashes,
    )
    model.eval()
    save_reranker(model, out, metadata=metadata)
    n_run = config.steps - start
    return TrainReport(
        out_dir=out,
        steps=config.steps,
        resumed_from=start,
        seconds=round(time.perf_counter() - t_start, 2),
        steps_per_second=round(n_run / train_seconds, 3) if train_seconds > 0 else 0.0,
        device=str(device),
        relevance=data.relevance,
        counts={**data.counts, "skipped_steps": skipped_steps},
        first_stage=first_stage,
        final=final,
        curve=tuple(log.entries),
        first_stage_weight=float(config.first_stage_weight),
    )


def export_checkpoint(
    run_dir: str | os.PathLike[str], dest: str | os.PathLike[str], *, half: bool = False
) -> Path:
    """Write the reranker of a training run's latest checkpoint, e.g. while the run goes on.

    The result is what :func:`train_reranker` would have written had it stopped at that step:
    the weights, the config, and metadata with the training settings, the data fingerprint (the
    encoder's weights hash included) and the recommended fusion of residual training.

    Args:
        run_dir: a ``train_reranker`` output folder holding ``checkpoint.pt``.
        dest: the folder to write the reranker to (not ``run_dir``, whose reranker files belong
            to the finished run).
        half: store float16 weights (see :func:`~crossrank.rerank.save_reranker`).

    Returns:
        ``dest``.

    Raises:
        ModelError: no checkpoint, or a corrupt one.
        InvalidArgumentError: ``dest`` is ``run_dir``.

    Example:
        >>> export_checkpoint("runs/reranker", "runs/reranker-step2000")  # doctest: +SKIP
    """
    from crossrank.rerank.checkpoint import save_reranker
    from crossrank.rerank.config import RerankerConfig
    from crossrank.rerank.cross_attention import CrossAttentionReranker

    run, out = Path(run_dir), Path(dest)
    if out.resolve() == run.resolve():
        raise InvalidArgumentError(
            f"export the checkpoint of {run} to another folder, not into the run itself"
        )
    path = run / CHECKPOINT_NAME
    if not path.is_file():
        raise ModelError(
            f"no {CHECKPOINT_NAME} in {run}; give the --out folder of a `crossrank train` run"
        )
    state = _load_checkpoint(path, None)
    fingerprint = state["fingerprint"]
    fields = {f.name for f in dataclasses.fields(RerankTrainConfig)}
    config = RerankTrainConfig(**{k: v for k, v in fingerprint["config"].items() if k in fields})
    model = CrossAttentionReranker(RerankerConfig.from_dict(fingerprint["model"]))
    model.load_state_dict(state["model"])
    metadata = _reranker_metadata(
        "crossrank train (exported checkpoint)",
        config,
        int(state["step"]),
        fingerprint["data"],
        **fingerprint.get("inputs", {}),
    )
    for name in _NOT_FINGERPRINTED:  # the checkpoint does not record them: not the defaults either
        del metadata["train"][name]
    return save_reranker(model.eval(), out, metadata=metadata, half=half)


def _refuse_foreign_out(out: Path) -> None:
    """Refuse an output folder that is a file or holds files no training run wrote.

    A run replaces ``config.json`` and ``model.safetensors`` in its folder: given a folder of the
    user's (a Hugging Face model folder passed as ``--out`` by mistake, a dataset folder), it would
    destroy their files. A run's own folder (an interrupted or finished run, resumed or
    continued) holds only what a run writes, and its ``config.json`` is a crossrank reranker's.

    Raises:
        InvalidArgumentError: ``out`` is a file, or such a folder.
    """
    from crossrank.rerank.checkpoint import CONFIG_NAME, WEIGHTS_NAME, has_reranker_config

    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(
            f"the output folder {out} is a file; give a new or empty folder for the reranker"
        )
    if not out.is_dir():
        return
    own = (CONFIG_NAME, WEIGHTS_NAME, CHECKPOINT_NAME, LOG_NAME)
    names = sorted(e.name for e in out.iterdir())
    # the temporary files of an interrupted atomic write: .NAME.tmp-PID
    foreign = [n for n in names if n not in own and not re.fullmatch(r"\.(.+)\.tmp-\d+", n)]
    if CONFIG_NAME in names and not has_reranker_config(out):
        foreign.insert(0, f"{CONFIG_NAME} (not a crossrank reranker's)")
    if foreign:
        shown = some_of(foreign)
        raise InvalidArgumentError(
            f"the output folder {out} holds files a `crossrank train` run did not write "
            f"({shown}); a run replaces {CONFIG_NAME} and {WEIGHTS_NAME} there, so crossrank "
            "never trains into it: choose an empty or new folder"
        )


def _load_teacher(
    config: RerankTrainConfig, model_config: RerankerConfig, index: Index
) -> tuple[CrossAttentionReranker, float, dict[str, Any]]:
    """The reranker ``config.teacher`` names, on the CPU, checked against the index's encoder and
    the student's token features; the first-stage weight it ranks with (its own training's, else
    the run's); and what the student's metadata records of it."""
    from crossrank.rerank.checkpoint import _read_config_file, load_reranker

    folder = config.teacher
    try:
        teacher = load_reranker(folder, device="cpu", encoder_info=index.manifest.encoder)
    except (ModelError, ModelMismatchError) as e:  # say which of the run's rerankers it is
        raise type(e)(f"teacher: {e}") from None
    if bool(teacher.config.token_embeddings) != bool(model_config.token_embeddings):
        has, lacks = "the teacher", "the student"
        if model_config.token_embeddings:
            has, lacks = lacks, has
        raise InvalidArgumentError(
            f"{has} reads the text encoder's layer-0 token states and {lacks} does not; give "
            "the student the teacher's token_embeddings setting (--token-embeddings)"
        )
    recorded = _read_config_file(folder)[1].get("train") or {}
    weight = recorded.get("first_stage_weight")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        weight = float(config.first_stage_weight)  # a teacher without a record: the run's own
    return teacher, float(weight), {"teacher_weights_sha256": _init_sha256(folder)}


def _config_diff(theirs: RerankerConfig, ours: RerankerConfig) -> str:
    """``width: 128 there, 64 here; ...`` for the fields where two architectures differ."""
    a, b = theirs.to_dict(), ours.to_dict()
    return "; ".join(f"{k}: {a[k]!r} there, {b[k]!r} here" for k in sorted(a) if a[k] != b.get(k))


def _init_sha256(folder: str) -> str:
    """The SHA-256 of the weights file a fine-tune started from."""
    from crossrank.rerank.checkpoint import WEIGHTS_NAME
    from crossrank.training.data import _file_sha256

    return _file_sha256(Path(folder) / WEIGHTS_NAME)


#: Training settings that change no result, so a run resumes whatever they are; a checkpoint does
#: not record them.
_NOT_FINGERPRINTED = ("eval_every", "checkpoint_every", "device")


def _reranker_metadata(
    trained_by: str, config: RerankTrainConfig, steps: int, data: dict[str, Any], **more: Any
) -> dict[str, Any]:
    """What a trained reranker's ``config.json`` records beside its architecture, with the fusion
    that ranks as its training scored (residual training)."""
    metadata = {
        "trained_by": trained_by,
        "train": config.to_dict(),
        "data": data,
        "steps": steps,
        **more,
    }
    if config.fusion is not None:
        metadata["fusion"] = config.fusion
    return metadata


# -- model, optimizer, checkpoint -------------------------------------------------------------


def _caption_lists(
    data: Any,
    caption: np.ndarray,
    positive: np.ndarray,
    config: RerankTrainConfig,
    relation_pool: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A step's caption-negative lists: ``(rows (B, 1+M), valid (B, 1+M), image (B,),
    n_relation)``, the relation-only lists last.

    Without ``relation_pool`` every pair of the batch ranks its caption against rewrites false of
    its image. With it, the last ``round(relation_share * B)`` lists are other training pairs
    with a relation caption, each against only its rewrites that keep both objects (the batch's
    own last pairs give their place)."""
    m = config.caption_negatives
    n_relation = (
        0
        if relation_pool is None
        else min(round(config.relation_share * caption.size), relation_pool.size)
    )
    if not n_relation:
        rows, valid = data.negatives.sample(caption, positive, m, rng)
        return rows, valid, positive, 0
    keep = caption.size - n_relation
    pick = rng.choice(relation_pool, size=n_relation, replace=False)
    rel_caption, rel_image = data.train_caption[pick], data.train_image[pick]
    rows, valid = data.negatives.sample(caption[:keep], positive[:keep], m, rng)
    rel_rows, rel_valid = data.relation_negatives.sample(rel_caption, rel_image, m, rng)
    return (
        np.concatenate([rows, rel_rows]),
        np.concatenate([valid, rel_valid]),
        np.concatenate([positive[:keep], rel_image]),
        n_relation,
    )


#: Fields whose default changed since checkpoints first recorded them, with the default they had
#: before: a checkpoint that predates such a field was trained with that value.
_FORMER_DEFAULTS: dict[str, dict[str, Any]] = {
    "config": {"first_stage_weight": 0.0},
    "model": {"gated": True, "init": "bert"},
}


def _fingerprint_defaults() -> dict[str, dict[str, Any]]:
    """The settings a checkpoint that predates a field was trained with: the field's default when
    it was added (today's default unless :data:`_FORMER_DEFAULTS` says otherwise)."""
    from crossrank.rerank.config import RerankerConfig

    return {
        "config": {**RerankTrainConfig().to_dict(), **_FORMER_DEFAULTS["config"]},
        "model": {**RerankerConfig().to_dict(), **_FORMER_DEFAULTS["model"]},
    }


def resolve_model_config(
    model_config: RerankerConfig | Mapping[str, Any] | None,
    encoder: dict[str, Any],
    index: Index | None = None,
) -> RerankerConfig:
    """The architecture :func:`train_reranker` trains over ``encoder`` (an index manifest's
    ``encoder``): its feature dims, checked against its patch count.

    A mapping (or None) gives the fields that differ from :class:`RerankerConfig`'s defaults;
    the one default that depends on the encoder is applied here: ``patch_positions``, a position
    per patch of the encoder unless the mapping names it (None or 0 = none).
    ``token_embeddings`` > 0 asks for the layer-0 token states; their width is the encoder's
    (``text_width`` in ``encoder``, else the loaded encoder of ``index``, for an index built
    before manifests recorded it)."""
    from crossrank.rerank.checkpoint import check_reranker_matches
    from crossrank.rerank.config import RerankerConfig

    if model_config is None or isinstance(model_config, Mapping):
        fields = {"patch_positions": int(encoder["n_patches"]), **(model_config or {})}
        fields["patch_positions"] = fields["patch_positions"] or None
        try:
            model_config = RerankerConfig.from_dict(fields)
        except ValueError as e:
            raise InvalidArgumentError(f"model_config: {e}") from None
    if not isinstance(model_config, RerankerConfig):
        raise InvalidArgumentError(
            "model_config must be a RerankerConfig, a mapping of its fields or None, got "
            f"{type(model_config).__name__}"
        )
    dim = int(encoder["patch_dim"])
    cfg = dataclasses.replace(model_config, text_dim=dim, patch_dim=dim)
    if cfg.token_embeddings:
        width = encoder.get("text_width")
        if width is None and index is not None:
            width = getattr(index.encoder, "token_embedding_dim", None)
        if not width:
            raise ModelMismatchError(
                f"the index's encoder {encoder.get('model_id', '')} does not give layer-0 token "
                "states; "
                "train without token_embeddings (--token-embeddings)"
            )
        cfg = dataclasses.replace(cfg, token_embeddings=int(width))
    check_reranker_matches(cfg, encoder, where="model_config")
    return cfg


def make_optimizer(model: CrossAttentionReranker, config: RerankTrainConfig) -> torch.optim.AdamW:
    """The AdamW ``crossrank train`` uses: ``config.lr``, with ``config.weight_decay`` on weight
    matrices only (not biases, norms, gates, query tokens or position embeddings)."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        matrix = param.ndim >= 2 and name not in ("query_tokens", "patch_pos")
        (decay if matrix else no_decay).append(param)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
