"""Encoders: images and texts to pooled vectors (first stage) and patch / token features (reranker).

Example:
    >>> from crossrank.encoders import load_encoder
    >>> enc = load_encoder("openai/clip-vit-base-patch32", device="cpu")  # doctest: +SKIP
    >>> feats = enc.encode_images([image])  # doctest: +SKIP
    >>> feats.pooled.shape, feats.patches.shape  # doctest: +SKIP
    ((1, 512), (1, 49, 512))

torch and transformers are imported only when a model is loaded. For text queries,
:func:`load_text_encoder` runs a CLIP model's text tower without importing transformers at all
(``crossrank/encoders/text_tower.py``).
"""

from crossrank.encoders.base import Encoder, ImageFeatures, TextFeatures
from crossrank.encoders.clip import ClipEncoder
from crossrank.encoders.config import DEMO_MODEL, EncoderConfig, Precision
from crossrank.encoders.fingerprint import same_model
from crossrank.encoders.loading import demo_model_dir, load_encoder, supported_model_types
from crossrank.encoders.siglip import Siglip2Encoder, SiglipEncoder
from crossrank.encoders.text_tower import load_text_encoder

__all__ = [
    "DEMO_MODEL",
    "ClipEncoder",
    "Encoder",
    "EncoderConfig",
    "ImageFeatures",
    "Precision",
    "Siglip2Encoder",
    "SiglipEncoder",
    "TextFeatures",
    "demo_model_dir",
    "load_encoder",
    "load_text_encoder",
    "same_model",
    "supported_model_types",
]
