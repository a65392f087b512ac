"""Training the demo dual encoder: a small CLIP, from scratch, on generated (image, caption) pairs.

The loss is CLIP's symmetric contrastive loss with one change that this data needs: a caption such
as "a red circle" is true of many images in a batch, so every image the caption is true of counts
as a positive (a multi-positive InfoNCE: the log of the summed softmax mass on the positives). The
plain one-positive loss would push true matches apart and stall training.

**Caption negatives** (``caption_negatives``, NegCLIP, Yuksekgonul et al. 2023): a contrastive
encoder trained on pooled vectors learns a bag of words, because the batch rarely holds the caption
that only an order or a relation word tells apart ("a red circle left of a blue square" against
"... right of ..."); the demo encoder's text tower maps "left" and "right" to nearly the same token
features. With ``caption_negatives = M`` each caption in the batch brings M rewrites false of its
image (:func:`~crossrank.datasets.caption_perturbations`: swapped bindings, swapped objects,
another relation, one object changed) as extra text columns, their truth decided on every batch
image's scene graph. ``init_from`` fine-tunes an existing model (e.g. the shipped demo encoder)
instead of starting from scratch.

Training is seeded and resumable: a checkpoint (weights, optimizer, schedule, RNG state, step) is
written every ``checkpoint_every`` steps and at the end; rerunning the same command continues from
it. The output is a Hugging Face model directory that :func:`crossrank.encoders.load_encoder` opens.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossrank.datasets.negatives import CaptionNegativeBank
from crossrank.datasets.relevance import match_matrix
from crossrank.encoders.factory import CLIP_MEAN, CLIP_STD, ClipSpec
from crossrank.errors import InvalidArgumentError

__all__ = ["EncoderTrainConfig", "TrainData", "train_encoder", "DEMO_SPEC"]

logger = logging.getLogger(__name__)

#: The architecture of the shipped demo model (about 1.3M parameters, 5 MB of fp32 weights).
DEMO_SPEC = ClipSpec(
    image_size=64,
    patch_size=8,
    vision_width=128,
    vision_layers=4,
    vision_heads=4,
    text_width=128,
    text_layers=2,
    text_heads=4,
    projection_dim=128,
    max_text_len=16,
    vocab_size=128,
)


@dataclass(frozen=True)
class EncoderTrainConfig:
    """How to train the demo encoder."""

    steps: int = 4000  # optimizer steps
    batch_size: int = 256  # images per step, one caption each
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.05
    warmup: int | None = (
        None  # linear warm-up, then cosine to lr / 20; None = min(200, steps // 20)
    )
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 200  # steps between checkpoints
    spec: ClipSpec = field(default_factory=lambda: DEMO_SPEC)
    caption_negatives: int = 0  # per caption, rewrites false of its image as extra text negatives
    init_from: str | None = None  # a CLIP model directory to fine-tune; None = from scratch (spec)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"EncoderTrainConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if not self.lr > 0:
            raise ValueError(f"EncoderTrainConfig.lr must be > 0, got {self.lr}")
        if self.warmup is None:
            object.__setattr__(self, "warmup", min(200, max(1, self.steps // 20)))
        if self.warmup < 0:
            raise ValueError(f"EncoderTrainConfig.warmup must be >= 0, got {self.warmup}")
        if self.caption_negatives < 0:
            raise ValueError(
                f"EncoderTrainConfig.caption_negatives must be >= 0, got {self.caption_negatives}"
            )


@dataclass
class TrainData:
    """Everything a training step samples from, held in memory.

    Attributes:
        images: uint8 ``(n, 3, H, W)`` pixels, H = W = the model's image size.
        captions: all training captions.
        caption_image: for each caption, the row of the image it was written for.
        positives: ``positives(caption_rows, image_rows)``, a bool matrix
            ``(len(caption_rows), len(image_rows))``,
            True where the caption is true of the image.
        negatives: for caption negatives, the rewrites of each unique caption over the images'
            scene graphs (bank rows: the unique captions, then the rewrites); None = none.
        bank_texts: the text of every bank row.
        caption_bank_row: int64, for each caption, its bank row.
    """

    images: np.ndarray
    captions: list[str]
    caption_image: np.ndarray
    positives: Callable[[np.ndarray, np.ndarray], np.ndarray]
    negatives: CaptionNegativeBank | None = None
    bank_texts: list[str] | None = None
    caption_bank_row: np.ndarray | None = None


ProgressFn = Callable[[int, int, float], None]  # (step, steps, loss)


def train_encoder(
    data: TrainData,
    out_dir: str | Path,
    config: EncoderTrainConfig | None = None,
    progress: ProgressFn | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Train a CLIP from scratch on ``data`` and save it to ``out_dir`` in Hugging Face format.

    A checkpoint in ``out_dir/checkpoint.pt`` from an earlier run of the same config is resumed.

    Args:
        data: the training images and captions.
        out_dir: where the model (and its checkpoint) go.
        config: the training settings.
        progress: called as ``progress(step, steps, loss)`` after each step.
        extra: facts recorded in ``crossrank_clip.json`` (the command that made the model, ...).

    Returns:
        ``out_dir``.
    """
    import torch

    from crossrank.device import resolve_device
    from crossrank.encoders.factory import build_tokenizer, new_clip, save_clip

    config = config or EncoderTrainConfig()
    spec = config.spec
    if config.caption_negatives and data.negatives is None:
        raise InvalidArgumentError(
            "caption negatives need the scene graphs of a shapes dataset "
            "(shapes_train_data(..., caption_negatives=True)); "
            "train without --caption-negatives"
        )
    if config.init_from is not None:
        model, tokenizer, spec = _load_init(config.init_from)
    if data.images.ndim != 4 or data.images.shape[1:] != (3, spec.image_size, spec.image_size):
        raise InvalidArgumentError(
            f"training images must be uint8 (n, 3, {spec.image_size}, {spec.image_size}), "
            f"got {data.images.shape}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    rng = np.random.default_rng(config.seed)

    if config.init_from is None:
        tokenizer = build_tokenizer(sorted(set(data.captions)), spec.vocab_size, spec.max_text_len)
        model = new_clip(spec, vocab_size=len(tokenizer), seed=config.seed)
    model = model.to(device).train()
    # Tokenized once: every caption, or with caption negatives every bank row (the unique captions,
    # then their rewrites), which a step then indexes.
    texts = data.bank_texts if config.caption_negatives else data.captions
    tokens = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=spec.max_text_len,
        return_tensors="np",
    )
    input_ids, attention = tokens["input_ids"], tokens["attention_mask"]

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)
    ]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return config.lr * (step + 1) / config.warmup
        t = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.lr / 20 + (config.lr - config.lr / 20) * 0.5 * (
            1 + math.cos(math.pi * min(t, 1.0))
        )

    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    captions_of: list[list[int]] = [[] for _ in range(len(data.images))]
    for c, i in enumerate(data.caption_image):
        captions_of[int(i)].append(c)

    start_step = 0
    ckpt_path = out / "checkpoint.pt"
    fingerprint = {
        "config": _jsonable(asdict(config)),
        "n_images": int(len(data.images)),
        "n_captions": len(data.captions),
    }
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["fingerprint"] != fingerprint:
            raise InvalidArgumentError(
                f"{ckpt_path} was written by a different training config or data; "
                "delete it or choose another output directory"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        start_step = int(ckpt["step"])
        logger.info("resuming from %s at step %d", ckpt_path, start_step)

    def save_checkpoint(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "fingerprint": fingerprint,
            },
            tmp,
        )
        tmp.replace(ckpt_path)

    t0 = time.perf_counter()
    for step in range(start_step, config.steps):
        image_rows = rng.choice(
            len(data.images), size=min(config.batch_size, len(data.images)), replace=False
        )
        caption_rows = np.array(
            [captions_of[i][rng.integers(len(captions_of[i]))] for i in image_rows]
        )
        pixels = torch.from_numpy(data.images[image_rows]).to(device).float().div_(255)
        pixels = (pixels - mean) / std  # (B, 3, H, W)
        if config.caption_negatives:
            # The batch's captions, then each one's rewrites false of its own image; a rewrite
            # may be true of another batch image, so every (text, image) is decided on its scene.
            u = data.caption_bank_row[caption_rows]
            rows, valid = data.negatives.sample(u, image_rows, config.caption_negatives, rng)
            text_rows = np.concatenate([u, rows[:, 1:][valid[:, 1:]]])  # (T,) bank rows
            pos_np = match_matrix(
                data.negatives.specs.take(text_rows), data.negatives.scenes.take(image_rows)
            )
            pos = torch.from_numpy(pos_np).to(device)  # (T, B) bool
            ids = torch.from_numpy(input_ids[text_rows]).to(device)
            mask = torch.from_numpy(attention[text_rows]).to(device)
        else:
            pos = torch.from_numpy(data.positives(caption_rows, image_rows)).to(
                device
            )  # (B, B) bool
            ids = torch.from_numpy(input_ids[caption_rows]).to(device)
            mask = torch.from_numpy(attention[caption_rows]).to(device)

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        out_ = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        logits = out_.logits_per_text.float()  # (T texts, B images), scaled by exp(logit_scale)
        loss = 0.5 * (_multi_positive_nce(logits, pos) + _multi_positive_nce(logits.t(), pos.t()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        if progress is not None:
            progress(step + 1, config.steps, loss.item())
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            save_checkpoint(step + 1)
            logger.info(
                "step %d/%d loss %.4f (%.1f s)",
                step + 1,
                config.steps,
                loss.item(),
                time.perf_counter() - t0,
            )

    model = model.to("cpu").eval()
    extra = {**(extra or {}), "train": _jsonable(asdict(config)), "n_images": int(len(data.images))}
    save_clip(model, tokenizer, spec, out, extra=extra)
    (out / "train_done.json").write_text(json.dumps({"steps": config.steps}) + "\n")
    return out


def _load_init(model_dir: str) -> tuple[Any, Any, ClipSpec]:
    """The CLIP model, tokenizer and spec of a model directory to fine-tune.

    Raises:
        InvalidArgumentError: the directory is not a CLIP made by crossrank (no spec recorded).
    """
    from crossrank.encoders import ClipEncoder, load_encoder
    from crossrank.encoders.loading import resolve_model

    encoder = load_encoder(model_dir, device="cpu")
    if not isinstance(encoder, ClipEncoder):
        raise InvalidArgumentError(
            f"--init-from {model_dir}: only a CLIP can be fine-tuned here, got {encoder!r}"
        )
    info = resolve_model(model_dir).model_dir / "crossrank_clip.json"
    try:
        spec = ClipSpec(**json.loads(info.read_text())["spec"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"--init-from {model_dir}: no crossrank_clip.json with a spec ({e}); fine-tune a model "
            "made by crossrank train-encoder (the shipped demo encoder is one)"
        ) from e
    return encoder.model.float(), encoder.tokenizer, spec


def _multi_positive_nce(logits: Any, pos: Any) -> Any:
    """``-log(sum of softmax over the positives)`` per row, averaged over rows with a positive.

    Args:
        logits: float32 ``(rows, cols)`` similarity logits.
        pos: bool ``(rows, cols)``, True where the column is a true match of the row.
    """
    import torch

    log_all = torch.logsumexp(logits, dim=1)  # (rows,)
    masked = logits.masked_fill(~pos, torch.finfo(logits.dtype).min)
    log_pos = torch.logsumexp(masked, dim=1)  # (rows,)
    has = pos.any(dim=1)
    return (log_all - log_pos)[has].mean()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def shapes_train_data(
    root: str | Path, image_size: int, *, caption_negatives: bool = False
) -> TrainData:
    """Load a generated shapes dataset (``crossrank dataset shapes --split train``) for training.

    Args:
        root: the dataset folder (with ``metadata.parquet``, ``pairs.parquet`` and ``images/``).
        image_size: the model's input side; images are resized to it if they differ.
        caption_negatives: also build the caption-negative bank (every caption's rewrites; some
            seconds for a 20,000-image split), for ``EncoderTrainConfig.caption_negatives``.

    Returns:
        A :class:`TrainData` whose positives are exact: a caption is a positive of every image in
        the batch whose scene satisfies it.
    """
    import pyarrow.parquet as pq
    from PIL import Image

    from crossrank.datasets import SpecArrays, open_shapes, parse_query, perturbation_rows

    ds = open_shapes(root)
    paths = pq.read_table(ds.metadata_path, columns=["path"])["path"].to_pylist()
    scenes = ds.scene_arrays()
    images = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, rel in enumerate(paths):
        with Image.open(ds.root / rel) as im:
            im = im.convert("RGB")
            if im.size != (image_size, image_size):
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
            images[i] = np.asarray(im).transpose(2, 0, 1)
    pairs = pq.read_table(ds.pairs_path, columns=["path", "caption"])
    row_of = {p: i for i, p in enumerate(paths)}
    caption_image = np.array([row_of[p] for p in pairs["path"].to_pylist()], dtype=np.int64)
    captions = pairs["caption"].to_pylist()
    # The bank: the unique captions (each parsed once), then, with caption negatives, their
    # rewrites (see CaptionNegativeBank); a pair's caption is its bank row.
    unique, caption_bank_row = np.unique(np.array(captions, dtype=object), return_inverse=True)
    caption_bank_row = caption_bank_row.astype(np.int64)
    unique_texts = [str(c) for c in unique]
    unique_specs = [parse_query(c) for c in unique_texts]
    offsets, n_structural, extra = (
        perturbation_rows(unique_texts, unique_specs)
        if caption_negatives
        else ([], np.zeros(0, dtype=np.int64), [])
    )
    bank_specs = SpecArrays.from_specs(unique_specs + extra)

    def positives(caption_rows: np.ndarray, image_rows: np.ndarray) -> np.ndarray:
        return match_matrix(
            bank_specs.take(caption_bank_row[caption_rows]), scenes.take(image_rows)
        )

    negatives = (
        CaptionNegativeBank(
            offsets=offsets, n_structural=n_structural, specs=bank_specs, scenes=scenes
        )
        if caption_negatives
        else None
    )
    return TrainData(
        images=images,
        captions=captions,
        caption_image=caption_image,
        positives=positives,
        negatives=negatives,
        bank_texts=unique_texts + [e.text for e in extra],
        caption_bank_row=caption_bank_row,
    )
