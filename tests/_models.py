"""Test helpers shared across test folders (models made offline in a tmp dir)."""

from __future__ import annotations

from pathlib import Path

import torch

BLIP_WORDS = [
    "a red circle left of a blue square",
    "a green triangle above a yellow star",
    "a purple square right of an orange circle",
    "a large small cat dog photo of the and below",
]


def make_tiny_blip(
    path: Path,
    words: list[str] = BLIP_WORDS,
    seed: int = 0,
    architecture: str = "BlipForImageTextRetrieval",
) -> Path:
    """A random BLIP (image 32, patch 8, text and vision width 32, 2 layers each) in HF format.

    Saved with a WordPiece ``BertTokenizerFast`` trained on ``words`` and a 32 px
    ``BlipImageProcessor``. The vision ``initializer_range`` is 0.02 (BLIP's default 1e-10 gives
    every image the same tokens) and the rest 0.1, so that ITM scores differ between images by far
    more than the parity tolerance. ``architecture="BlipForConditionalGeneration"`` saves a
    captioning model instead (for the "not a retrieval model" errors).
    """
    import transformers
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import BertTokenizerFast, BlipConfig, BlipImageProcessor

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        words,
        trainers.WordPieceTrainer(vocab_size=128, special_tokens=special, show_progress=False),
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    tokenizer = BertTokenizerFast(tokenizer_object=tok, model_max_length=32)

    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=32,
            pad_token_id=0,
            bos_token_id=cls_id,
            sep_token_id=sep_id,
            eos_token_id=sep_id,
            initializer_range=0.1,
        ),
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            initializer_range=0.02,
        ),
        image_text_hidden_size=16,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
