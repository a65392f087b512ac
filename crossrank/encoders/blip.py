"""BLIP through transformers' ``BlipForImageTextRetrieval``, with its image processor and tokenizer.

BLIP (Li et al., ICML 2022) has two heads for retrieval, and crossrank uses one per stage:

- **ITC** (image-text contrastive) for the first stage. Pooled image: ``vision_proj`` of the vision
  transformer's CLS token (``last_hidden_state[:, 0]``, after ``post_layernorm``); pooled text:
  ``text_proj`` of the CLS token of the text encoder run *without* the image. Both L2-normalised,
  of size ``dim = image_text_hidden_size`` (256 for the Salesforce checkpoints). Their dot product
  is exactly ``BlipForImageTextRetrieval(..., use_itm_head=False).itm_score``.
- **ITM** (image-text matching) for the reranker ``blip-itm``
  (:class:`crossrank.rerank.blip_itm.BlipItmReranker`): the text encoder cross-attends to the
  image's vision tokens, ``itm_head`` reads the first text token, and the softmax gives P(match).

So the patch features stored at build time are what ITM cross-attends to: the vision model's
``last_hidden_state``, *all* tokens including CLS, ``(n, 1 + (image_size / patch_size)^2,
vision_hidden)``, e.g. ``(n, 577, 768)`` for ViT-B/16 at 384 px (about 0.9 MB per image in the
fp16 patch store; ``n_patches`` in ``info`` counts the CLS token). ``patch_dim`` is therefore the
vision hidden size and differs from ``dim``; the token features (``tokens``) are the text
encoder's unimodal ``last_hidden_state``, of ``token_dim`` = the text hidden size, zero at padding.
They do not share a space with the patches, so MaxSim is refused on a BLIP index; ``blip-itm``
reads ``TextFeatures.input_ids`` instead and runs the model's own text tower.

Texts are truncated at the smaller of the tokenizer's ``model_max_length`` and the text model's
positions (512 for the Salesforce checkpoints; BLIP's own retrieval code truncates at 35 tokens).

Known difference from the original BLIP: for ITM, original BLIP replaces the first token of the
text with a special ``[ENC]`` token (``input_ids[:, 0] = tokenizer.enc_token_id``) before the
image-conditioned text encoder, while transformers' ``BlipForImageTextRetrieval`` feeds the
tokenizer's ``[CLS]`` unchanged and reads ``itm_head`` at that position. Two transformers issues
point this out (huggingface/transformers#22732, #25629); both are closed and the transformers
forward (checked in 5.x) still uses ``[CLS]``. crossrank follows transformers exactly (its parity
test compares against ``BlipForImageTextRetrieval.forward``), so ITM scores here equal Hugging
Face's and may differ slightly from the original repository's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossrank.encoders.base import TransformersEncoder
from crossrank.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["BlipEncoder", "RETRIEVAL_ARCHITECTURE", "check_retrieval_config"]

#: The transformers class whose checkpoints hold both the ITC projections and the ITM head.
RETRIEVAL_ARCHITECTURE = "BlipForImageTextRetrieval"


def check_retrieval_config(config: Any, model_id: str) -> None:
    """Refuse a BLIP checkpoint that is not an image-text retrieval model, before loading weights.

    Args:
        config: the model's ``config.json`` as a dict, or a transformers config.
        model_id: what the user asked for, for the message.

    Raises:
        ModelError: the ``model_type`` is not ``blip``, or ``architectures`` names only other
            BLIP heads (captioning, VQA).
    """
    get = (
        config.get
        if isinstance(config, dict)
        else (lambda key, default=None: getattr(config, key, default))
    )
    model_type = get("model_type")
    if model_type != "blip":
        raise ModelError(
            f"model {model_id!r} has model_type {model_type!r}, not 'blip'; "
            f"BLIP image-text matching needs a {RETRIEVAL_ARCHITECTURE} "
            "checkpoint such as Salesforce/blip-itm-base-coco"
        )
    architectures = get("architectures") or []
    if architectures and RETRIEVAL_ARCHITECTURE not in architectures:
        raise ModelError(
            f"model {model_id!r} is a BLIP {', '.join(map(str, architectures))} checkpoint, "
            f"not an image-text retrieval model ({RETRIEVAL_ARCHITECTURE}); use one of "
            "Salesforce/blip-itm-base-coco, -large-coco, -base-flickr or -large-flickr"
        )


class BlipEncoder(TransformersEncoder):
    """A transformers ``BlipForImageTextRetrieval`` as a crossrank encoder (see the module notes).

    Load it with :func:`crossrank.encoders.load_encoder`, which picks this class for
    ``model_type == "blip"``.

    Attributes:
        dim: ITC projection size (pooled vectors).
        patch_dim: vision hidden size (patch features, CLS included).
        token_dim: text hidden size (token features).
    """

    backend = "blip"

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Path,
        *,
        info: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> BlipEncoder:
        """Load the model, image processor and tokenizer from a local Hugging Face directory.

        Args:
            model_dir: the directory holding ``config.json``, the weights, the tokenizer and
                ``preprocessor_config.json``.
            info: the loader's description so far (``model_id``, fingerprints, ...); the model's
                sizes are added to it.
            device: where to run.
            dtype: what to run in.
            batch_size: images or texts per forward pass.

        Returns:
            The encoder.

        Raises:
            ModelError: the directory is not a BLIP retrieval model, or a part is missing or does
                not load.
        """
        from transformers import BlipConfig, BlipForImageTextRetrieval

        from crossrank.encoders._hf import load_processors, load_weights, one_line

        model_id = info["model_id"]
        try:
            config = BlipConfig.from_pretrained(model_dir, local_files_only=True)
        except Exception as e:
            raise ModelError(
                f"model {model_id!r}: cannot read its BLIP config in {model_dir}: {one_line(e)}"
            ) from e
        check_retrieval_config(config, model_id)
        model = load_weights(BlipForImageTextRetrieval, model_dir, model_id)
        image_processor, tokenizer = load_processors(model_dir, model_id)
        vision, text = model.config.vision_config, model.config.text_config
        info = {
            **info,
            "dim": int(model.config.image_text_hidden_size),
            "patch_dim": int(vision.hidden_size),
            "token_dim": int(text.hidden_size),
            "n_patches": 1 + (vision.image_size // vision.patch_size) ** 2,
            "image_size": int(vision.image_size),
            "patch_size": int(vision.patch_size),
            "max_text_len": _max_text_len(text.max_position_embeddings, tokenizer),
            "text_width": int(text.hidden_size),
            "patch_features": (
                "vision_model.last_hidden_state (CLS + patches, after post_layernorm)"
            ),
        }
        return cls(
            model,
            image_processor,
            tokenizer,
            info=info,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )

    def _image_forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.vision_model(
            pixel_values=pixel_values
        ).last_hidden_state  # (b, 1 + P, vision_hidden)
        # BlipForImageTextRetrieval's ITC reads last_hidden_state[:, 0], not pooler_output (which
        # applies post_layernorm a second time).
        pooled = self.model.vision_proj(hidden[:, 0])  # (b, dim)
        return pooled, hidden

    def _text_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        pooled = self.model.text_proj(hidden[:, 0])  # (b, dim)
        return pooled, hidden  # hidden: (b, n_tokens, text_hidden)

    def _text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        # word + position embeddings through the embedding LayerNorm: the text encoder's layer 0
        return self.model.text_encoder.embeddings(input_ids=input_ids)  # (b, n_tokens, text_hidden)


def _max_text_len(max_positions: int, tokenizer: Any) -> int:
    """The model's text positions, or the tokenizer's limit when it is smaller."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_positions:
        return limit
    return int(max_positions)
