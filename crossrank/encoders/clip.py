"""CLIP through transformers' ``CLIPModel``, with its own image processor and tokenizer.

Features, in the shared (projected) space of dimension ``projection_dim``:

- pooled image: ``visual_projection(post_layernorm(CLS))``, the vision ``pooler_output`` projected,
  i.e. exactly what ``CLIPModel.get_image_features`` returns; L2-normalised here.
- patches: ``visual_projection(post_layernorm(h[:, 1:]))``, the last hidden states of the patch
  tokens (CLS left out) through the same layer norm and projection as the CLS token, in row-major
  patch-grid order, ``(n, (image_size / patch_size)^2, projection_dim)``. Not normalised: a reranker
  that wants cosines normalises them itself. CLIP never trained the projection on patch tokens; the
  features still land in the text space closely enough for late interaction, the trick of
  MaskCLIP (Zhou et al., 2022).
- pooled text: ``text_projection`` of the text ``pooler_output`` (the final-layer-normed hidden
  state at the first end-of-text token); L2-normalised here. Equal to ``get_text_features``.
- tokens: ``text_projection(last_hidden_state)``; in transformers' ``CLIPTextTransformer`` the last
  hidden state is already after ``final_layer_norm``. Not normalised; zero at padding.
- token embeddings (only when asked for): ``text_model.embeddings(input_ids)``, the token plus
  position embeddings before any attention (``hidden_states[0]``), ``(m, n_tokens, text_width)``
  with ``text_width`` the text transformer's hidden size; zero at padding.

The text transformer is causal, so right padding never changes a text's real tokens or its pooled
vector.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from crossrank.encoders.base import TransformersEncoder

if TYPE_CHECKING:
    import torch

__all__ = ["ClipEncoder"]


class ClipEncoder(TransformersEncoder):
    """A transformers ``CLIPModel`` as a crossrank encoder (see the module notes for the features).

    Load it with :func:`crossrank.encoders.load_encoder`, which picks this class for
    ``model_type == "clip"``.
    """

    backend = "clip"

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Path,
        *,
        info: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> ClipEncoder:
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
            ModelError: a part is missing or does not load.
        """
        from transformers import CLIPModel

        from crossrank.encoders._hf import load_processors, load_weights

        model = load_weights(CLIPModel, model_dir, info["model_id"])
        image_processor, tokenizer = load_processors(model_dir, info["model_id"])
        vision, text = model.config.vision_config, model.config.text_config
        info = {
            **info,
            "dim": int(model.config.projection_dim),
            "patch_dim": int(model.config.projection_dim),
            "n_patches": (vision.image_size // vision.patch_size) ** 2,
            "image_size": int(vision.image_size),
            "patch_size": int(vision.patch_size),
            "max_text_len": _max_text_len(text.max_position_embeddings, tokenizer),
            "text_width": int(text.hidden_size),
            "patch_features": "visual_projection(post_layernorm(last_hidden_state[:, 1:]))",
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
        vision = self.model.vision_model(pixel_values=pixel_values)
        pooled = self.model.visual_projection(vision.pooler_output)  # (b, dim)
        patches = vision.last_hidden_state[:, 1:]  # (b, n_patches, vision_width)
        patches = self.model.visual_projection(
            self.model.vision_model.post_layernorm(patches)
        )  # (b, n_patches, dim)
        return pooled, patches

    def _text_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.model.text_projection(text.pooler_output)  # (b, dim)
        tokens = self.model.text_projection(text.last_hidden_state)  # (b, n_tokens, dim)
        return pooled, tokens

    def _text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings(input_ids=input_ids)  # (b, n_tokens, text_width)


def _max_text_len(max_positions: int, tokenizer: Any) -> int:
    """The model's text positions, or the tokenizer's limit when it is smaller."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_positions:
        return limit
    return int(max_positions)
