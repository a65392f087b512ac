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
import json
import logging
import math
import os
import pickle
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from crossrank.errors import CrossrankError, InvalidArgumentError, ModelError

if TYPE_CHECKING:
    import torch

    from crossrank.index import Index
    from crossrank.rerank.config import RerankerConfig
    from crossrank.rerank.cross_attention import CrossAttentionReranker
    from crossrank.rerank._train_data import TrainingSet

__all__ = ["RerankLoss", "RerankTrainConfig", "TrainReport", "rerank_loss", "train_reranker",
           "export_checkpoint", "CHECKPOINT_NAME", "LOG_NAME"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "train_log.jsonl"
_CHECKPOINT_FORMAT = "crossrank-rerank-train"
_EVAL_CANDIDATES = 1024  # candidates scored per forward during validation

#: ``progress(step, steps, loss, accuracy)`` after each step; accuracy is the share of the step's
#: queries whose positive got the top logit.
ProgressFn = Callable[[int, int, float, float], None]


#: Consecutive steps with a non-finite loss or gradient after which training stops as diverged.
MAX_NONFINITE_IN_A_ROW = 20


class RerankLoss(StrEnum):
    """The training objective over each query's candidate list (positive first)."""

    LISTWISE = "listwise"  # softmax cross-entropy: the positive against its negatives
    ITM = "itm"  # binary matching per (query, candidate); positives and negatives weigh equally


@dataclass(frozen=True)
class RerankTrainConfig:
    """How to train a reranker (:func:`train_reranker`).

    Raises:
        ValueError: a field has a wrong type or value; the message names it.

    Example:
        >>> RerankTrainConfig(steps=300, loss="itm").loss
        <RerankLoss.ITM: 'itm'>
    """

    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # queries (pairs) per step
    n_candidates: int = 16  # candidates per query: 1 positive + n_candidates - 1 negatives
    loss: RerankLoss = RerankLoss.LISTWISE  # listwise | itm
    hard_fraction: float = 0.5  # share of each query's negatives mined from the first stage
    curriculum: float = 0.0  # share of the steps over which hard_fraction ramps up from 0; 0 = none
    mine_k: int = 50  # first-stage candidates mined per caption; also the depth val R@1 reranks
    in_batch: bool = True  # non-mined negatives: other queries' positives first, then random
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW decay on matrices (not on biases, norms, gates)
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr / 20
    grad_clip: float = 1.0  # max global gradient norm
    val_fraction: float = 0.05  # share of the unique captions held out for validation; 0 = none
    max_val_captions: int = 256  # at most this many validation captions
    eval_every: int = 200  # steps between validations (and train_log.jsonl lines)
    checkpoint_every: int = 200  # steps between checkpoints
    seed: int = 0  # model init, caption split, batches and negatives
    device: str = "auto"  # auto (CUDA when present, bf16 autocast) | cpu | cuda | cuda:N
    # Residual training: each logit is ``reranker + first_stage_weight * first-stage cosine``, so
    # the reranker learns a correction to the first stage instead of replacing it (0 = off). The
    # saved reranker then recommends ``--fusion weighted:1/(1+W)``, the same ranking at search time.
    first_stage_weight: float = 0.0
    # Caption negatives (shapes datasets): per pair, this many rewrites of its caption that are
    # false of its image (swapped colours, shapes or objects, another relation, a recoloured or
    # reshaped object), ranked against the true caption on that image: a second, text-side loss
    # that teaches binding directly. 0 = off.
    caption_negatives: int = 0
    # Curriculum: the first this many steps train on the caption negatives alone (the reranker's
    # own logits: no image-side lists, no first-stage residual), then both losses as above.
    caption_only_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "mine_k", "max_val_captions", "eval_every",
                     "checkpoint_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not _is_int(self.n_candidates) or self.n_candidates < 2:
            raise ValueError(
                f"n_candidates must be an int >= 2 (the positive and at least one negative), "
                f"got {self.n_candidates!r}"
            )
        for name in ("warmup", "seed", "caption_negatives", "caption_only_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        try:
            object.__setattr__(self, "loss", RerankLoss(self.loss))
        except ValueError:
            raise ValueError(
                f"loss must be one of {', '.join(m.value for m in RerankLoss)}, got {self.loss!r}"
            ) from None
        for name, lo, hi in (("hard_fraction", 0.0, 1.0), ("curriculum", 0.0, 1.0),
                             ("val_fraction", 0.0, 0.5)):
            value = getattr(self, name)
            if not _is_real(value) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not _is_real(self.first_stage_weight) or not 0 <= self.first_stage_weight < 1e4:
            raise ValueError(
                f"first_stage_weight must be a number in [0, 1e4), got {self.first_stage_weight!r}"
            )
        object.__setattr__(self, "first_stage_weight", float(self.first_stage_weight))
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        if not isinstance(self.in_batch, bool):
            raise ValueError(f"in_batch must be True or False, got {self.in_batch!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        object.__setattr__(self, "device", str(self.device))  # a Device enum becomes its string
        if self.caption_only_steps and not self.caption_negatives:
            raise ValueError(
                f"caption_only_steps={self.caption_only_steps} needs caption_negatives >= 1 (it "
                "trains on the caption negatives alone); set both or neither"
            )
        if self.caption_only_steps >= self.steps:
            raise ValueError(
                f"caption_only_steps must be below steps (the rest train both losses), got "
                f"{self.caption_only_steps} of {self.steps}"
            )

    def hard_fraction_at(self, step: int) -> float:
        """The share of mined negatives at ``step`` (0-based), after the curriculum ramp."""
        ramp = self.curriculum * self.steps
        return self.hard_fraction if ramp <= 0 else self.hard_fraction * min(1.0, step / ramp)

    def lr_at(self, step: int) -> float:
        """The learning rate at ``step`` (0-based): linear warm-up, then cosine to ``lr / 20``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        low = self.lr / 20
        return low + (self.lr - low) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    @property
    def fusion(self) -> str | None:
        """The ``--fusion`` that ranks as training scored: ``weighted:1/(1+W)`` for residual
        training, None (the reranker's score alone) otherwise."""
        if self.first_stage_weight <= 0:
            return None
        return f"weighted:{1.0 / (1.0 + self.first_stage_weight):.6g}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-able values."""
        out = dataclasses.asdict(self)
        out["loss"] = self.loss.value
        return out


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (``out_dir`` as a string)."""
        out = dataclasses.asdict(self)
        out["out_dir"] = str(self.out_dir)
        out["curve"] = list(self.curve)
        return out


def rerank_loss(logits: torch.Tensor, loss: RerankLoss | str = RerankLoss.LISTWISE,
                valid: torch.Tensor | None = None) -> torch.Tensor:
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
            raise InvalidArgumentError("rerank_loss: column 0 (the positive) must be valid in every row")
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


def train_reranker(
    index: Index | str | os.PathLike[str],
    pairs_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    model_config: RerankerConfig | None = None,
    config: RerankTrainConfig | None = None,
    progress: ProgressFn | None = None,
) -> TrainReport:
    """Train a :class:`~crossrank.rerank.CrossAttentionReranker` on (image, caption) pairs.

    The encoders stay frozen: token features come from the index's text encoder (once per unique
    caption), patch features from its patch store; no image is re-encoded. A
    ``checkpoint.pt`` in ``out_dir`` from an earlier run of the same config and data is resumed.

    Args:
        index: an opened :class:`~crossrank.index.Index` or its directory (opened on
            ``config.device``), built over the pairs' images.
        pairs_path: a ``.parquet`` or ``.csv`` file with ``path`` and ``caption`` columns;
            relative paths resolve against its folder. Pairs whose image is not in the index, or
            whose caption is empty, are skipped and counted.
        out_dir: the folder for the reranker, ``checkpoint.pt`` and ``train_log.jsonl``.
        model_config: the architecture (default :class:`RerankerConfig()`); its ``text_dim``
            and ``patch_dim`` are always taken from the index's encoder.
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

    from crossrank.device import resolve_device
    from crossrank.index import Index
    from crossrank.rerank._train_data import CandidateSampler, prepare_training_set
    from crossrank.rerank.checkpoint import save_reranker
    from crossrank.rerank.cross_attention import CrossAttentionReranker, _autocast

    t_start = time.perf_counter()
    config = config if config is not None else RerankTrainConfig()
    if not isinstance(config, RerankTrainConfig):
        raise InvalidArgumentError(
            f"config must be a RerankTrainConfig, got {type(config).__name__}"
        )
    device = resolve_device(config.device)
    if not isinstance(index, Index):
        index = Index.open(index, device=config.device)
    model_config = _model_config(model_config, index.manifest.encoder)
    data = prepare_training_set(index, pairs_path, config)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the output folder {out}: {e.strerror or e}") from e

    fingerprint = {
        "config": {k: v for k, v in config.to_dict().items()
                   if k not in ("eval_every", "checkpoint_every", "device")},
        "model": model_config.to_dict(),
        "data": {**data.fingerprint, "counts": data.counts},
    }
    torch.manual_seed(config.seed)
    model = CrossAttentionReranker(model_config).to(device).train()
    optimizer = _optimizer(model, config)
    # bf16 autocast needs no loss scaling; the fp16 fallback on older GPUs does.
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda"
                                  and not torch.cuda.is_bf16_supported())
    rng = np.random.default_rng(config.seed)

    ckpt_path = out / CHECKPOINT_NAME
    start = 0
    # The train loss and accuracy of the steps since the last log line; checkpointed, so that a
    # resumed run logs the same means as an uninterrupted one.
    window: dict[str, list[float]] = {"loss": [], "accuracy": []}
    if ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, fingerprint)
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
    residual = None
    if config.first_stage_weight > 0:
        residual = (config.first_stage_weight,
                    torch.from_numpy(data.query_vectors).to(device),  # (U, D) float32
                    torch.from_numpy(data.image_vectors).to(device))  # (N, D) float32
    banks = _Banks(tokens, token_mask, patches, residual)
    sampler = CandidateSampler(data, config.n_candidates, config.in_batch)
    n_neg = config.n_candidates - 1
    val_candidates = sampler.sample(data.val_captions, data.val_image,
                               round(config.hard_fraction * n_neg),
                               np.random.default_rng([config.seed, 2]), in_batch=False)
    val_rewrites = None  # fixed rewrites of each validation caption, false of its image
    if data.negatives is not None and data.val_captions.size:
        val_rewrites = data.negatives.sample(data.val_captions, data.val_image,
                                             config.caption_negatives,
                                             np.random.default_rng([config.seed, 3]))
    first_stage = _first_stage_metrics(data)
    log = _TrainLog(out / LOG_NAME, start)

    def evaluate(step: int, train_loss: float | None, train_acc: float | None,
                 caption_acc: float | None = None) -> None:
        entry: dict[str, Any] = {"step": step, "lr": config.lr_at(max(step - 1, 0)),
                                 "hard_fraction": config.hard_fraction_at(max(step - 1, 0))}
        if train_loss is not None:
            entry["train_loss"] = train_loss
        if train_acc is not None:  # none on caption-only steps: they rank no image lists
            entry["train_accuracy"] = train_acc
        if caption_acc is not None:  # the true caption ranked first among its rewrites
            entry.update(train_caption_accuracy=caption_acc)
        if data.val_captions.size:
            entry.update(_validate(model, data, val_candidates, banks, device, val_rewrites))
        entry["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        log.append(entry)
        logger.info("step %d: %s", step, ", ".join(
            f"{k} {v:.4g}" for k, v in entry.items() if k != "step" and v is not None))

    if start == 0:
        evaluate(0, None, None)
    train_seconds = 0.0
    skipped_steps = bad_in_a_row = 0
    for step in range(start, config.steps):
        t_step = time.perf_counter()
        batch = rng.choice(data.train_caption.size, size=min(config.batch_size,
                                                              data.train_caption.size),
                           replace=False)
        caption, positive = data.train_caption[batch], data.train_image[batch]
        caption_only = step < config.caption_only_steps
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        logits, loss = None, torch.zeros((), device=device)
        if not caption_only:
            n_hard = round(config.hard_fraction_at(step) * n_neg)
            candidates = sampler.sample(caption, positive, n_hard, rng)  # (B, k)
            with _autocast(device):
                logits = _forward(model, banks, caption, candidates, device)  # (B, k) float32
            loss = rerank_loss(logits, config.loss)
        caption_acc = None
        if data.negatives is not None:
            # Text side: the true caption against rewrites false of the image, on that image.
            rows, valid = data.negatives.sample(caption, positive, config.caption_negatives, rng)
            valid_t = torch.from_numpy(valid).to(device)
            with _autocast(device):
                text_logits = _forward_captions(model, banks, rows, positive, device,
                                                residual=not caption_only)  # (B, 1+M)
            loss = loss + rerank_loss(text_logits, config.loss, valid_t)
            caption_acc = float(_top1_accuracy(
                text_logits.detach().masked_fill(~valid_t, float("-inf"))).mean().item())
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
            logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step + 1,
                           bad_in_a_row)
            if bad_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise CrossrankError(
                    f"training diverged: {bad_in_a_row} steps in a row up to step {step + 1} gave a non-finite "
                    f"loss or gradient; lower --lr (now {config.lr}) or train with --device cpu"
                )
        scaler.update()
        # Caption-only steps report the caption accuracy (there are no image lists).
        acc = caption_acc if logits is None else float(_top1_accuracy(logits.detach()).mean().item())
        train_seconds += time.perf_counter() - t_step
        if finite:
            window["loss"].append(loss_value)
            if logits is not None:
                window["accuracy"].append(acc)
            if caption_acc is not None:
                window.setdefault("caption_accuracy", []).append(caption_acc)
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            evaluate(done, float(np.mean(window["loss"])) if window["loss"] else None,
                     float(np.mean(window["accuracy"])) if window["accuracy"] else None,
                     float(np.mean(window["caption_accuracy"]))
                     if window.get("caption_accuracy") else None)
            window = {"loss": [], "accuracy": []}
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(), "step": done, "window": window,
                "fingerprint": fingerprint,
            })
        if progress is not None:
            progress(done, config.steps, loss_value, acc)

    final = {k: log.entries[-1][k] for k in ("val_accuracy", "val_r1", "val_caption_accuracy")
             if log.entries and k in log.entries[-1]}
    metadata = _reranker_metadata(
        "crossrank train", config, config.steps,
        {"pairs": str(Path(pairs_path).absolute()), "index": str(index.path.absolute()),
         "encoder": index.model_id, **data.fingerprint, "counts": data.counts},
        first_stage_val=first_stage, val=final,
    )
    model.eval()
    save_reranker(model, out, metadata=metadata)
    n_run = config.steps - start
    return TrainReport(
        out_dir=out, steps=config.steps, resumed_from=start,
        seconds=round(time.perf_counter() - t_start, 2),
        steps_per_second=round(n_run / train_seconds, 3) if train_seconds > 0 else 0.0,
        device=str(device), relevance=data.relevance, counts={**data.counts, "skipped_steps": skipped_steps},
        first_stage=first_stage, final=final, curve=tuple(log.entries),
    )


def export_checkpoint(run_dir: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                      half: bool = False) -> Path:
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
        raise InvalidArgumentError(f"export the checkpoint of {run} to another folder, not into the run itself")
    path = run / CHECKPOINT_NAME
    if not path.is_file():
        raise ModelError(f"no {CHECKPOINT_NAME} in {run}; give the --out folder of a `crossrank train` run")
    state = _load_checkpoint(path, None)
    fingerprint = state["fingerprint"]
    fields = {f.name for f in dataclasses.fields(RerankTrainConfig)}
    config = RerankTrainConfig(**{k: v for k, v in fingerprint["config"].items() if k in fields})
    model = CrossAttentionReranker(RerankerConfig.from_dict(fingerprint["model"]))
    model.load_state_dict(state["model"])
    metadata = _reranker_metadata("crossrank train (exported checkpoint)", config, int(state["step"]),
                                  fingerprint["data"])
    return save_reranker(model.eval(), out, metadata=metadata, half=half)


def _reranker_metadata(trained_by: str, config: RerankTrainConfig, steps: int, data: dict[str, Any],
                       **more: Any) -> dict[str, Any]:
    """What a trained reranker's ``config.json`` records beside its architecture, with the fusion
    that ranks as its training scored (residual training)."""
    metadata = {"trained_by": trained_by, "train": config.to_dict(), "data": data, "steps": steps, **more}
    if config.fusion is not None:
        metadata["fusion"] = config.fusion
    return metadata


# -- steps and validation ---------------------------------------------------------------------


class _Banks(NamedTuple):
    """The training set's features on the training device."""

    tokens: torch.Tensor  # (U, L, d) float16
    token_mask: torch.Tensor  # (U, L) bool
    patches: torch.Tensor  # (N, P, d) float16
    # (weight, query vectors (U, D), image vectors (N, D)) for residual training, else None
    residual: tuple[float, torch.Tensor, torch.Tensor] | None = None


def _gather_queries(banks: _Banks, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The token features (float32) and mask of caption bank ``rows``, without the columns that
    are padding for every one of them."""
    mask = banks.token_mask[rows]  # (Q, L)
    real = mask.any(dim=0)
    return banks.tokens[rows][:, real].float(), mask[:, real]


def _forward(model: CrossAttentionReranker, banks: _Banks, caption: np.ndarray,
             candidates: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(B, k)`` float32 logits of the queries' candidate lists, gathered from the banks.

    With residual training the logits are the reranker's plus the weighted first-stage cosine.
    """
    import torch

    from crossrank.rerank.cross_attention import AttentionPath

    u = torch.from_numpy(caption).to(device)
    c = torch.from_numpy(candidates).to(device)
    x, mask = _gather_queries(banks, u)  # (B, L_b, d), (B, L_b)
    if model.config.foldable_layers == 0:
        # Patch self-attention (or back-attention) is per image, not per (query, candidate):
        # run it once per distinct image of the step (in-batch negatives repeat images) and
        # let every list read the keys/values of its candidates.
        images, where = torch.unique(c, return_inverse=True)  # (n,), (B, k)
        kv = model.precompute_kv(banks.patches[images].float()).select(where)  # lead (B, k)
        logits = model.forward_batch(x, mask, kv)
    else:
        # auto folds the key/value projections into the query side: about twice as fast a
        # training step on the CPU as projecting every candidate's patches.
        p = banks.patches[c].float()  # (B, k, P, d)
        logits = model.forward_batch(x, mask, p, path=AttentionPath.AUTO)
    if banks.residual is not None:
        weight, q_vec, i_vec = banks.residual
        cosine = torch.einsum("bd,bkd->bk", q_vec[u], i_vec[c])  # (B, k) float32
        logits = logits.float() + weight * cosine
    return logits


def _forward_captions(model: CrossAttentionReranker, banks: _Banks, rows: np.ndarray,
                      image: np.ndarray, device: torch.device, *, residual: bool = True
                      ) -> torch.Tensor:
    """``(B, 1 + M)`` float32 logits of each image against its caption bank rows ``(B, 1 + M)``.

    The image's keys/values are computed once and read by its ``1 + M`` captions; residual
    training adds the weighted first-stage cosine of each (caption, image), as :func:`_forward`,
    unless ``residual`` is False (caption-only steps train the reranker's own logits).
    """
    import torch

    b, m1 = rows.shape
    u = torch.from_numpy(rows.reshape(-1)).to(device)  # (B * (1 + M),)
    img = torch.from_numpy(image).to(device)  # (B,)
    x, mask = _gather_queries(banks, u)  # (B * (1 + M), L_b, d), (B * (1 + M), L_b)
    owner = torch.arange(b, device=device).repeat_interleave(m1)  # each query's image
    kv = model.precompute_kv(banks.patches[img].float()).select(owner).unsqueeze(1)
    logits = model.forward_batch(x, mask, kv).view(b, m1)  # (B, 1 + M)
    if residual and banks.residual is not None:
        weight, q_vec, i_vec = banks.residual
        cosine = (q_vec[u].view(b, m1, -1) * i_vec[img][:, None, :]).sum(-1)  # (B, 1 + M)
        logits = logits.float() + weight * cosine
    return logits


def _validate(model: CrossAttentionReranker, data: TrainingSet, val_candidates: np.ndarray,
              banks: _Banks, device: torch.device,
              rewrites: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, float]:
    """``val_accuracy`` on the fixed candidate lists, ``val_r1`` reranking the first-stage lists,
    and with caption negatives ``val_caption_accuracy``: the true caption ranked first among its
    fixed rewrites ``(rows, valid)`` on its image."""
    import torch

    from crossrank.rerank.cross_attention import _autocast

    model.eval()
    hits, r1 = [], []
    with torch.inference_mode(), _autocast(device):
        per = max(1, _EVAL_CANDIDATES // val_candidates.shape[1])
        for lo in range(0, val_candidates.shape[0], per):
            logits = _forward(model, banks, data.val_captions[lo:lo + per],
                              val_candidates[lo:lo + per], device)
            hits.append(_top1_accuracy(logits).cpu().numpy())
        fs = data.val_first_stage  # (V, mine_k), -1 padded
        per = max(1, _EVAL_CANDIDATES // fs.shape[1])
        for lo in range(0, fs.shape[0], per):
            chunk = fs[lo:lo + per]
            logits = _forward(model, banks, data.val_captions[lo:lo + per], np.maximum(chunk, 0),
                              device)
            logits = logits.masked_fill(torch.from_numpy(chunk < 0).to(device), float("-inf"))
            # The first of the tied top candidates: ties keep the first-stage order, as in search.
            top = _near_top(logits).int().argmax(dim=1).cpu().numpy()  # (b,)
            r1.append(data.val_relevant[lo:lo + per][np.arange(chunk.shape[0]), top])
        caption_hits = []
        if rewrites is not None:
            rows, valid = rewrites
            per = max(1, _EVAL_CANDIDATES // rows.shape[1])
            for lo in range(0, rows.shape[0], per):
                logits = _forward_captions(model, banks, rows[lo:lo + per],
                                           data.val_image[lo:lo + per], device)
                keep = torch.from_numpy(valid[lo:lo + per]).to(device)
                caption_hits.append(_top1_accuracy(logits.masked_fill(~keep, float("-inf")))
                                    .cpu().numpy())
    model.train()
    out = {"val_accuracy": float(np.concatenate(hits).mean()),
           "val_r1": float(np.concatenate(r1).mean())}
    if caption_hits:
        out["val_caption_accuracy"] = float(np.concatenate(caption_hits).mean())
    return out


def _near_top(logits: torch.Tensor) -> torch.Tensor:
    """``(B, k)`` bool: the logits tied with their row's maximum.

    A tie allows for float rounding (1e-5 relative): the same state in two rows of one batched
    matmul can come out a few ulps apart, and an untrained gated model gives every candidate the
    same state.
    """
    top = logits.max(dim=1, keepdim=True).values  # (B, 1)
    return logits >= top - (1e-6 + 1e-5 * top.abs())  # (B, k)


def _top1_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float: 1 where the positive (column 0) alone has the top logit, ``1/t`` where it
    ties with ``t - 1`` others (the expected hit under a random tie break), else 0.

    Tie-aware because an untrained gated model gives every candidate the same logit: ``argmax``
    would then pick column 0 and report a perfect score.
    """
    at_top = _near_top(logits)  # (B, k)
    return at_top[:, 0].float() / at_top.sum(dim=1).float()  # (B,)


def _first_stage_metrics(data: TrainingSet) -> dict[str, float]:
    """The first stage's R@1 and recall at ``mine_k`` on the validation captions."""
    if not data.val_captions.size:
        return {}
    return {"r1": float(data.val_relevant[:, 0].mean()),
            "recall": float(data.val_relevant.any(axis=1).mean())}


class _TrainLog:
    """``train_log.jsonl``: one JSON line per validation; a resumed run drops later lines."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        if start > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(entry, dict) and entry.get("step", math.inf) <= start:
                    self.entries.append(entry)
        self.path.write_text("".join(json.dumps(e) + "\n" for e in self.entries), encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


# -- model, optimizer, checkpoint -------------------------------------------------------------


def _model_config(model_config: RerankerConfig | None, encoder: dict[str, Any]) -> RerankerConfig:
    """The architecture with the encoder's feature dims, checked against its patch count."""
    from crossrank.rerank.checkpoint import check_reranker_matches
    from crossrank.rerank.config import RerankerConfig

    if model_config is not None and not isinstance(model_config, RerankerConfig):
        raise InvalidArgumentError(
            f"model_config must be a RerankerConfig or None, got {type(model_config).__name__}"
        )
    dim = int(encoder["patch_dim"])
    cfg = dataclasses.replace(model_config or RerankerConfig(), text_dim=dim, patch_dim=dim)
    check_reranker_matches(cfg, encoder, where="model_config")
    return cfg


def _optimizer(model: CrossAttentionReranker, config: RerankTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms, gates, embeddings)."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        matrix = param.ndim >= 2 and name not in ("query_tokens", "patch_pos")
        (decay if matrix else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": _CHECKPOINT_FORMAT, **state}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot write the checkpoint {path}: {e.strerror or e}") from e


def _load_checkpoint(path: Path, fingerprint: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's state, after checking it belongs to this config and data (any run's when
    ``fingerprint`` is None)."""
    import torch

    fix = "delete it to train from scratch, or pick another --out"
    try:
        # weights_only: a checkpoint holds tensors and plain values; never run pickled code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelError(f"checkpoint {path} is corrupt or truncated ({detail}); {fix}") from e
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a reranker training checkpoint; {fix}")
    theirs = state.get("fingerprint")
    if fingerprint is None:
        if not (isinstance(theirs, dict) and set(_FINGERPRINT_NAMES) <= set(theirs)):
            raise ModelError(f"{path} does not record the run it belongs to; {fix}")
        return state
    if theirs != fingerprint:
        parts = sorted(k for k in fingerprint if not isinstance(theirs, dict)
                       or theirs.get(k) != fingerprint[k])
        raise InvalidArgumentError(
            f"checkpoint {path} was written by a training run with another "
            f"{' and '.join(_FINGERPRINT_NAMES[p] for p in parts)}; {fix}"
        )
    return state


_FINGERPRINT_NAMES = {"config": "training config", "model": "model config",
                      "data": "pairs file or index"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
