"""Making new CLIP (and, for the tests, SigLIP) models from scratch, saved in Hugging Face format.

Two users: the tests, which need a tiny random CLIP they can build offline in a second, and
``crossrank train-encoder``, which trains the shipped demo model. Both save a directory that
:func:`crossrank.encoders.load_encoder` opens exactly as it opens ``openai/clip-vit-base-patch32``:
``config.json`` + ``model.safetensors`` (a transformers ``CLIPModel``), a tokenizer trained with
`tokenizers` (``tokenizer.json``), and ``preprocessor_config.json`` (a ``CLIPImageProcessor``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedTokenizerFast

__all__ = ["ClipSpec", "build_tokenizer", "new_clip", "save_clip", "make_clip", "make_siglip"]

logger = logging.getLogger(__name__)

# Special tokens, in id order. The end-of-text id must not be 2: transformers' CLIP text model
# treats eos_token_id == 2 as the legacy OpenAI config and pools at argmax(input_ids) instead of
# at the first end-of-text token.
PAD, BOS, UNK, EOS = "<pad>", "<bos>", "<unk>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, UNK, EOS]

# The usual CLIP pixel statistics; a model trained from scratch could use any, these keep the
# preprocessing identical to the real checkpoints.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipSpec:
    """The size of a CLIP built from scratch.

    The defaults make a tiny model for tests (about 60k parameters); the demo model is larger.
    """

    image_size: int = 32  # input side, pixels
    patch_size: int = 8  # ViT patch side, pixels; (image_size / patch_size)^2 patches
    vision_width: int = 32  # vision transformer hidden size
    vision_layers: int = 2
    vision_heads: int = 2
    text_width: int = 32  # text transformer hidden size
    text_layers: int = 2
    text_heads: int = 2
    projection_dim: int = 32  # shared embedding space (pooled vectors, patch and token features)
    max_text_len: int = 24  # text positions, special tokens included
    vocab_size: int = 256  # tokenizer vocabulary (a target: BPE may learn fewer)

    def __post_init__(self) -> None:
        for name in (
            "image_size",
            "patch_size",
            "vision_width",
            "vision_layers",
            "vision_heads",
            "text_width",
            "text_layers",
            "text_heads",
            "projection_dim",
            "max_text_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ClipSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ClipSpec.image_size ({self.image_size}) must be "
                f"a multiple of patch_size ({self.patch_size})"
            )
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("ClipSpec widths must be multiples of their head counts")
        if self.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise ValueError(
                f"ClipSpec.vocab_size must be > {len(SPECIAL_TOKENS)}, got {self.vocab_size}"
            )


def build_tokenizer(
    texts: Iterable[str], vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """Train a lower-casing BPE tokenizer on ``texts`` and wrap it for transformers.

    Every encoded text is ``<bos> ... <eos>``; padding uses ``<pad>`` (id 0) on the right.

    Args:
        texts: the training corpus (captions, or a word list).
        vocab_size: target vocabulary size, special tokens included.
        max_length: the model's number of text positions; longer texts are truncated.

    Returns:
        A ``PreTrainedTokenizerFast`` ready for ``save_pretrained``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        special_tokens=[(BOS, tok.token_to_id(BOS)), (EOS, tok.token_to_id(EOS))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=max_length,
        padding_side="right",
    )


def new_clip(spec: ClipSpec, vocab_size: int, seed: int = 0) -> CLIPModel:
    """A randomly initialised transformers ``CLIPModel`` of the given size.

    Args:
        spec: the architecture.
        vocab_size: the tokenizer's actual vocabulary size.
        seed: torch seed for the initial weights.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=spec.text_width,
            intermediate_size=4 * spec.text_width,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=spec.text_heads,
            max_position_embeddings=spec.max_text_len,
            pad_token_id=ids[PAD],
            bos_token_id=ids[BOS],
            eos_token_id=ids[EOS],
        ),
        vision_config=dict(
            image_size=spec.image_size,
            patch_size=spec.patch_size,
            hidden_size=spec.vision_width,
            intermediate_size=4 * spec.vision_width,
            num_hidden_layers=spec.vision_layers,
            num_attention_heads=spec.vision_heads,
        ),
        projection_dim=spec.projection_dim,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def save_clip(
    model: CLIPModel,
    tokenizer: PreTrainedTokenizerFast,
    spec: ClipSpec,
    out_dir: str | Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save model, tokenizer and image processor as one Hugging Face model directory.

    Args:
        model: the CLIP model.
        tokenizer: its tokenizer.
        spec: the architecture it was built from (recorded in ``crossrank_clip.json``).
        out_dir: the directory to write (created if needed).
        extra: more facts to record beside the spec (training command, seed, ...).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    import json

    from transformers import CLIPImageProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out)
    (out / "crossrank_clip.json").write_text(
        json.dumps({"spec": asdict(spec), **(extra or {})}, indent=2) + "\n"
    )
    return out


def make_clip(
    out_dir: str | Path, texts: Iterable[str], spec: ClipSpec | None = None, seed: int = 0
) -> Path:
    """Build and save a random CLIP whose tokenizer is trained on ``texts``.

    Example:
        >>> make_clip(tmp_path / "tiny-clip", ["a red circle", "a blue square"])  # doctest: +SKIP
    """
    spec = spec or ClipSpec()
    tokenizer = build_tokenizer(texts, spec.vocab_size, spec.max_text_len)
    model = new_clip(spec, vocab_size=len(tokenizer), seed=seed)
    return save_clip(model, tokenizer, spec, out_dir)


def make_siglip(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    version: int = 1,
    spec: ClipSpec | None = None,
    seed: int = 0,
) -> Path:
    """Build and save a random SigLIP (``version=1``) or NaFlex SigLIP 2 (``version=2``).

    For tests: a transformers ``SiglipModel`` / ``Siglip2Model`` of ``spec``'s sizes (the pooled
    size is the vision width; ``projection_dim`` is not used), its image processor
    (``SiglipImageProcessor`` at ``image_size``; ``Siglip2ImageProcessor`` with
    ``max_num_patches = (image_size / patch_size)^2``) and a BPE tokenizer trained on ``texts``,
    saved as ``tokenizer.json``. The hub checkpoints use SentencePiece (SigLIP) or Gemma (SigLIP 2)
    tokenizers; what matters here is what they do to a text. SigLIP's is a fast BPE tokenizer
    that appends ``<eos>`` and pads on the right with ``<pad>``; SigLIP 2's is transformers'
    own ``Siglip2Tokenizer`` (lower-cased, ``"▁"`` for spaces, padded on the left).

    Example:
        >>> make_siglip(tmp_path / "tiny-siglip", ["a red circle"])  # doctest: +SKIP
    """
    import json

    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if version not in (1, 2):
        raise ValueError(f"make_siglip version must be 1 or 2, got {version!r}")
    spec = spec or ClipSpec()
    tokenizer: Any
    if version == 1:
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(
            texts,
            trainer=trainers.BpeTrainer(
                vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
            ),
        )
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=BOS,
            eos_token=EOS,
            unk_token=UNK,
            pad_token=PAD,
            model_max_length=spec.max_text_len,
            padding_side="right",
        )
    else:
        from transformers import Siglip2Tokenizer

        # transformers' own Siglip2Tokenizer (Gemma's BPE over "▁"-joined lower-cased text, padded
        # on the left), with a vocabulary trained here on words split at "▁".
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.normalizer = normalizers.Sequence(
            [normalizers.Lowercase(), normalizers.Replace(" ", "\u2581")]
        )
        tok.pre_tokenizer = pre_tokenizers.Split(
            pattern="\u2581", behavior="merged_with_previous", invert=False
        )
        tok.train_from_iterator(
            texts,
            trainer=trainers.BpeTrainer(
                vocab_size=spec.vocab_size,
                special_tokens=[PAD, EOS, BOS, UNK, "<mask>"],
                show_progress=False,
            ),
        )
        bpe = json.loads(tok.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in bpe["merges"]]
        tokenizer = Siglip2Tokenizer(
            vocab=bpe["vocab"], merges=merges, model_max_length=spec.max_text_len
        )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_width,
        intermediate_size=4 * spec.text_width,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_text_len,
        projection_size=spec.vision_width,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
    )
    vision_config = dict(
        patch_size=spec.patch_size,
        hidden_size=spec.vision_width,
        intermediate_size=4 * spec.vision_width,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
    )
    grid = spec.image_size // spec.patch_size
    torch.manual_seed(seed)
    if version == 1:
        from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

        config = SiglipConfig(
            text_config=text_config,
            vision_config={**vision_config, "image_size": spec.image_size},
        )
        model: Any = SiglipModel(config)
        processor: Any = SiglipImageProcessor(
            size={"height": spec.image_size, "width": spec.image_size}
        )
    else:
        from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

        config = Siglip2Config(
            text_config=text_config,
            vision_config={**vision_config, "num_patches": grid * grid},
        )
        model = Siglip2Model(config)
        processor = Siglip2ImageProcessor(patch_size=spec.patch_size, max_num_patches=grid * grid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "crossrank_clip.json").write_text(
        json.dumps({"spec": asdict(spec), "family": f"siglip{'' if version == 1 else 2}"}, indent=2)
        + "\n"
    )
    return out
