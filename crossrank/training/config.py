"""How ``crossrank train`` trains a reranker: one frozen :class:`RerankTrainConfig`.

The settings of :func:`~crossrank.training.reranker.train_reranker`; the trained reranker's
metadata records them. The architecture trained is a :class:`~crossrank.rerank.RerankerConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from crossrank.rerank.config import _is_int, _is_real

__all__ = ["RerankLoss", "RerankTrainConfig"]


class RerankLoss(StrEnum):
    """The training objective over each query's candidate list (positive first)."""

    LISTWISE = "listwise"  # softmax cross-entropy: the positive against its negatives
    ITM = "itm"  # binary matching per (query, candidate); positives and negatives weigh equally


@dataclass(frozen=True)
class RerankTrainConfig:
    """How to train a reranker (:func:`~crossrank.training.reranker.train_reranker`).

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
    # Linear warm-up steps, then cosine decay to lr / 20; None = min(100, steps // 20), at least 1.
    warmup: int | None = None
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
    # "auto": the index's encoder's logit scale (CLIP's exp(logit_scale)), or 0 for an encoder
    # without one; train_reranker resolves it (see resolve_first_stage_weight).
    first_stage_weight: float | str = "auto"
    # Caption negatives (shapes datasets): per pair, this many rewrites of its caption that are
    # false of its image (swapped colours, shapes or objects, another relation, a recoloured or
    # reshaped object), ranked against the true caption on that image: a second, text-side loss
    # that teaches binding directly. 0 = off.
    caption_negatives: int = 0
    # Curriculum: the first this many steps train on the caption negatives alone (the reranker's
    # own logits: no image-side lists, no first-stage residual), then both losses as above.
    caption_only_steps: int = 0
    # Attention supervision (shapes datasets, with caption negatives): weight of a loss that
    # pulls the last layer's attention of each object word of the true caption onto the patches
    # of that object's grid cell, from the scene graph; 0 = off.
    attention_supervision: float = 0.0
    # Relation focus (with caption negatives): this share of each step's caption-negative lists
    # goes to relation captions ranked only against their rewrites that keep both objects
    # (another relation, or the objects swapped around it), the lists where the relation is the
    # whole signal; the rest are drawn as before. 0 = off.
    relation_share: float = 0.0
    # Fine-tuning: a reranker folder (a checkpoint ``save_reranker`` or ``crossrank train``
    # wrote) whose weights start the run instead of a fresh init; its architecture must be the
    # run's (train_reranker takes it as the default). None = from scratch.
    init_from: str | None = None
    # Distillation: a trained reranker folder (another architecture allowed, over the same
    # encoder) whose scores over every list the run ranks are soft targets: the loss adds
    # ``distill * T^2 * KL(softmax(teacher / T) || softmax(student / T))`` with
    # ``T = distill_temperature``. None = no teacher.
    teacher: str | None = None
    distill: float = 1.0
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "mine_k",
            "max_val_captions",
            "eval_every",
            "checkpoint_every",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not _is_int(self.n_candidates) or self.n_candidates < 2:
            raise ValueError(
                f"n_candidates must be an int >= 2 (the positive and at least one negative), "
                f"got {self.n_candidates!r}"
            )
        if self.warmup is None and _is_int(self.steps):
            object.__setattr__(self, "warmup", min(100, max(1, self.steps // 20)))
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
        for name, lo, hi in (
            ("hard_fraction", 0.0, 1.0),
            ("curriculum", 0.0, 1.0),
            ("val_fraction", 0.0, 0.5),
            ("relation_share", 0.0, 1.0),
        ):
            value = getattr(self, name)
            if not _is_real(value) or not lo <= value <= hi:
                raise ValueError(f"{name} must be a number in [{lo:g}, {hi:g}], got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in ("lr", "grad_clip"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.first_stage_weight != "auto":
            if not _is_real(self.first_stage_weight) or not 0 <= self.first_stage_weight < 1e4:
                raise ValueError(
                    f"first_stage_weight must be 'auto' or a number in [0, 1e4), got "
                    f"{self.first_stage_weight!r}"
                )
            object.__setattr__(self, "first_stage_weight", float(self.first_stage_weight))
        if not _is_real(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        if not isinstance(self.in_batch, bool):
            raise ValueError(f"in_batch must be True or False, got {self.in_batch!r}")
        if self.init_from is not None:
            if not isinstance(self.init_from, (str, os.PathLike)) or not str(self.init_from):
                raise ValueError(
                    f"init_from must be a reranker folder or None, got {self.init_from!r}"
                )
            object.__setattr__(self, "init_from", os.fspath(self.init_from))
        if self.teacher is not None:
            if not isinstance(self.teacher, (str, os.PathLike)) or not str(self.teacher):
                raise ValueError(f"teacher must be a reranker folder or None, got {self.teacher!r}")
            object.__setattr__(self, "teacher", os.fspath(self.teacher))
        if not _is_real(self.distill) or not 0 <= self.distill < 1e3:
            raise ValueError(f"distill must be a number in [0, 1e3), got {self.distill!r}")
        object.__setattr__(self, "distill", float(self.distill))
        if not _is_real(self.distill_temperature) or not 0 < self.distill_temperature <= 100:
            raise ValueError(
                "distill_temperature must be a number in (0, 100], got "
                f"{self.distill_temperature!r}"
            )
        object.__setattr__(self, "distill_temperature", float(self.distill_temperature))
        if not isinstance(self.device, str):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        object.__setattr__(self, "device", str(self.device))  # a Device enum becomes its string
        if not _is_real(self.attention_supervision) or not 0 <= self.attention_supervision < 1e3:
            raise ValueError(
                "attention_supervision must be a number in [0, 1e3), got "
                f"{self.attention_supervision!r}"
            )
        object.__setattr__(self, "attention_supervision", float(self.attention_supervision))
        if self.attention_supervision and not self.caption_negatives:
            raise ValueError(
                "attention_supervision needs caption_negatives >= 1 (it supervises the true "
                "caption "
                "of each caption-negative list, from a shapes dataset's scene graphs)"
            )
        if self.relation_share and not self.caption_negatives:
            raise ValueError(
                "relation_share needs caption_negatives >= 1 (it reshapes the caption-negative "
                "lists, from a shapes dataset's scene graphs)"
            )
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

    def resolve_first_stage_weight(self, logit_scale: float | None) -> RerankTrainConfig:
        """This config with ``first_stage_weight="auto"`` made a number: ``logit_scale`` (the
        encoder's, :attr:`~crossrank.encoders.TransformersEncoder.logit_scale`), or 0 (no residual)
        when it is None. A config with a number is returned as it is."""
        if self.first_stage_weight != "auto":
            return self
        weight = 0.0 if logit_scale is None else min(float(logit_scale), 9999.0)
        return dataclasses.replace(self, first_stage_weight=round(weight, 4))

    @property
    def fusion(self) -> str | None:
        """The ``--fusion`` that ranks as training scored: ``weighted:1/(1+W)`` for residual
        training, None (the reranker's score alone) otherwise.

        Raises:
            ValueError: ``first_stage_weight`` is still ``"auto"`` (resolve it first).
        """
        if self.first_stage_weight == "auto":
            raise ValueError(
                "first_stage_weight='auto' is not resolved yet; call "
                "resolve_first_stage_weight(encoder.logit_scale)"
            )
        if self.first_stage_weight <= 0:
            return None
        return f"weighted:{1.0 / (1.0 + self.first_stage_weight):.6g}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-able values."""
        out = dataclasses.asdict(self)
        out["loss"] = self.loss.value
        return out
