"""SigLIP and SigLIP 2 through transformers' ``SiglipModel`` and ``Siglip2Model``.

SigLIP (Zhai et al., 2023) is a CLIP trained with a sigmoid loss; its vision tower has no CLS
token and pools with an attention head (a learned probe attending over all patch tokens, then an
MLP), and its text tower pools at the *last* position, which the model was trained to read after
padding every text to ``max_length`` (64). What crossrank takes from it:

- pooled image: ``vision_model(...).pooler_output``, the attention-pool head's output; equal to
  ``get_image_features``, L2-normalised here as for CLIP. ``dim`` is the vision width.
- patches: ``vision_model(...).last_hidden_state``, *every* token (there is no CLS token), after
  ``post_layernorm`` and before the attention-pool head: ``(n, (image_size / patch_size)^2,
  vision_width)``. The head mixes all patches into one vector, so there is no per-patch
  projection to apply; the patches stay in the vision tower's space.
- pooled text: ``text_model(...).pooler_output`` = ``head(last_hidden_state[:, -1])`` on the
  text padded to ``max_text_len`` exactly as the model's processor pads it
  (``padding="max_length"``, the tokenizer's own padding side, its ``attention_mask`` passed to
  the model): equal to ``get_text_features`` on the processor's output. L2-normalised here.
- tokens: ``text_model(...).last_hidden_state`` (after ``final_layer_norm``), the real tokens
  only. The text ``head`` is a linear layer applied to the pooled position alone; crossrank does
  not apply it to the tokens, so tokens and patches are both pre-head states of their towers,
  and **not in one space**: MaxSim over them means nothing, a cross-attention reranker trained
  with ``crossrank train`` learns the match.
- token embeddings (only when asked for): ``text_model.embeddings(input_ids)``, token plus
  position embeddings, at the positions the text had in the padded input.

The reranker sees only real tokens: the text is run padded to ``max_text_len``, then each row's
real tokens are moved to the front (SigLIP 2's tokenizer pads on the left) and the columns past
the longest text are dropped, so :class:`~crossrank.encoders.base.TextFeatures` look as they do
for CLIP (right padding, ``n_tokens`` = the longest text).

SigLIP 2 ships in two forms. The fixed-resolution checkpoints (``google/siglip2-base-patch16-224``
and the like) are ``model_type: siglip`` with a Gemma tokenizer: :class:`SiglipEncoder` reads
them. The NaFlex checkpoints (``google/siglip2-base-patch16-naflex``) are ``model_type: siglip2``
(``Siglip2Model``), which takes any grid of patches up to ``max_num_patches``;
:class:`Siglip2Encoder` runs them at **one fixed square grid**, ``sqrt(max_num_patches)`` a side
(16 x 16 for the usual 256), so every image stores the same number of patches: each image is
first resized to that square (aspect ratio not kept, as SigLIP's own processor does), then goes
through the model's ``Siglip2ImageProcessor``. A ``max_num_patches`` that is not a square number
is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.encoders.base import TextFeatures, TransformersEncoder
from crossrank.errors import InvalidArgumentError, ModelError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["SiglipEncoder", "Siglip2Encoder"]

_PATCHES = (
    "vision_model.last_hidden_state (all patches, after post_layernorm, before the attention-pool "
    "head)"
)
_TOKENS = "text_model.last_hidden_state (real tokens, after final_layer_norm, no head)"


class SiglipEncoder(TransformersEncoder):
    """A transformers ``SiglipModel`` as a crossrank encoder (see the module notes).

    Load it with :func:`crossrank.encoders.load_encoder`, which picks this class for
    ``model_type == "siglip"`` (SigLIP, and SigLIP 2 at a fixed resolution).

    Attributes:
        dim: the pooled size (the vision width, equal to the text head's output).
        patch_dim: the vision width (patch features).
        token_dim: the text width (token features).
    """

    backend = "siglip"
    _model_class = "SiglipModel"

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Path,
        *,
        info: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> SiglipEncoder:
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
            ModelError: a part is missing or does not load, or the pooled image and text sizes
                differ.
        """
        import transformers

        from crossrank.encoders._hf import load_processors, load_weights

        model_id = info["model_id"]
        model = load_weights(getattr(transformers, cls._model_class), model_dir, model_id)
        image_processor, tokenizer = load_processors(model_dir, model_id)
        vision, text = model.config.vision_config, model.config.text_config
        projection = int(getattr(text, "projection_size", None) or text.hidden_size)
        if projection != int(vision.hidden_size):
            raise ModelError(
                f"model {model_id!r}: its text head gives {projection}-d vectors but its vision "
                f"tower {int(vision.hidden_size)}-d ones; a SigLIP checkpoint has one size for "
                "both, so this one cannot be searched"
            )
        image_size, n_patches = cls._grid(vision, image_processor, model_id)
        info = {
            **info,
            "dim": projection,
            "patch_dim": int(vision.hidden_size),
            "token_dim": int(text.hidden_size),
            "n_patches": n_patches,
            "image_size": image_size,
            "patch_size": int(vision.patch_size),
            "max_text_len": _max_text_len(text.max_position_embeddings, tokenizer),
            "text_width": int(text.hidden_size),
            "text_padding": "max_length",
            "patch_features": _PATCHES,
            "token_features": _TOKENS,
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

    @classmethod
    def _grid(cls, vision: Any, image_processor: Any, model_id: str) -> tuple[int, int]:
        """``(image_size, n_patches)`` of the images this encoder stores."""
        return int(vision.image_size), (vision.image_size // vision.patch_size) ** 2

    # -- text ----------------------------------------------------------------------------------

    # Padded to max_length as SigLIP's processor pads (the model pools at the last position).
    _text_padding = "max_length"

    def _passes_mask(self) -> bool:
        """Whether the model's processor hands the tokenizer's attention mask to the model."""
        return "attention_mask" in (getattr(self.tokenizer, "model_input_names", None) or ())

    def _text_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text = self.model.text_model(
            input_ids=input_ids, attention_mask=attention_mask if self._passes_mask() else None
        )
        return text.pooler_output, text.last_hidden_state  # (b, dim), (b, L, text_width)

    def _text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings(input_ids=input_ids)  # (b, L, text_width)

    def encode_text(self, texts: Sequence[str], *, token_embeddings: bool = False) -> TextFeatures:
        """Encode query texts (see :meth:`TransformersEncoder.encode_text`).

        The model runs on the texts padded to ``max_text_len``; the features returned hold only
        the real tokens, moved to the front of each row and cut to the longest text.
        """
        feats = super().encode_text(texts, token_embeddings=token_embeddings)
        return _compact(feats, self.tokenizer.pad_token_id or 0)

    # -- images --------------------------------------------------------------------------------

    def _image_forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vision = self.model.vision_model(pixel_values=pixel_values)
        return vision.pooler_output, vision.last_hidden_state  # (b, dim), (b, P, vision_width)


class Siglip2Encoder(SiglipEncoder):
    """A transformers ``Siglip2Model`` (SigLIP 2 NaFlex) at one fixed square grid of patches.

    Load it with :func:`crossrank.encoders.load_encoder`, which picks this class for
    ``model_type == "siglip2"``. :meth:`preprocess` returns ``(n, 3, S, S)`` pixels
    (``S = patch_size * sqrt(max_num_patches)``), which :meth:`_image_forward` cuts into patches
    the way ``Siglip2ImageProcessor`` does, with every patch real (no padding patches).
    """

    backend = "siglip2"
    _model_class = "Siglip2Model"

    @classmethod
    def _grid(cls, vision: Any, image_processor: Any, model_id: str) -> tuple[int, int]:
        patch = int(vision.patch_size)
        processor_patch = int(getattr(image_processor, "patch_size", patch) or patch)
        max_patches = int(getattr(image_processor, "max_num_patches", 0) or vision.num_patches)
        side = math.isqrt(max_patches)
        if side * side != max_patches or processor_patch != patch:
            raise ModelError(
                f"model {model_id!r}: crossrank runs SigLIP 2 NaFlex at a square grid of "
                f"patches, but its processor has max_num_patches {max_patches} and patch size "
                f"{processor_patch} (model: {patch}); save a preprocessor_config.json with a "
                "square max_num_patches such as 256"
            )
        if max_patches > int(vision.num_patches) * 4:
            raise ModelError(
                f"model {model_id!r}: max_num_patches {max_patches} is far beyond the "
                f"{int(vision.num_patches)} position embeddings the model was trained with"
            )
        return side * patch, max_patches

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize each image to the fixed square, then the model's ``Siglip2ImageProcessor``.

        Thread-safe and stateless.

        Returns:
            ``(n, 3, image_size, image_size)`` float32 CPU tensor.
        """
        import torch
        from PIL import Image

        if isinstance(images, Image.Image) or not isinstance(images, Sequence):
            raise InvalidArgumentError(
                "images must be a list of PIL images, got "
                f"{type(images).__name__}; wrap a single image in a list"
            )
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise InvalidArgumentError(
                    f"images[{i}] must be a PIL image, got {type(image).__name__}"
                )
        side, patch = self.image_size, int(self.info["patch_size"])
        if len(images) == 0:
            return torch.empty((0, 3, side, side), dtype=torch.float32)
        square = [
            (im if im.mode == "RGB" else im.convert("RGB")).resize(
                (side, side), Image.Resampling.BILINEAR
            )
            for im in images
        ]
        out = self.image_processor(
            images=square, max_num_patches=self.n_patches, return_tensors="pt"
        )
        grid = side // patch
        # (n, P, p * p * 3) patches, row-major over the grid, each (p, p, C) -> (n, 3, S, S)
        pixels = out["pixel_values"].reshape(len(images), grid, grid, patch, patch, 3)
        pixels = pixels.permute(0, 5, 1, 3, 2, 4).reshape(len(images), 3, side, side)
        return pixels.to(torch.float32).contiguous()

    def _image_forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        b, channels, side, _ = pixel_values.shape
        patch = int(self.info["patch_size"])
        grid = side // patch
        patches = (
            pixel_values.reshape(b, channels, grid, patch, grid, patch)
            .permute(0, 2, 4, 3, 5, 1)
            .reshape(b, grid * grid, patch * patch * channels)
        )
        mask = torch.ones((b, grid * grid), dtype=torch.long, device=pixel_values.device)
        shapes = torch.tensor([[grid, grid]] * b, dtype=torch.long, device=pixel_values.device)
        vision = self.model.vision_model(
            pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes
        )
        return vision.pooler_output, vision.last_hidden_state  # (b, dim), (b, P, vision_width)


def _compact(feats: TextFeatures, pad_id: int) -> TextFeatures:
    """Real tokens first in each row (order kept), columns past the longest text dropped."""
    mask = feats.mask
    order = np.argsort(~mask, axis=1, kind="stable")  # (m, L): real positions first
    keep = max(int(mask.sum(axis=1).max()), 1)
    order = order[:, :keep]

    def take(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        index = order if a.ndim == 2 else order[:, :, None]
        return np.ascontiguousarray(np.take_along_axis(a, index, axis=1))

    new_mask = take(mask)
    ids = take(feats.input_ids)
    if ids is not None:
        ids = np.where(new_mask, ids, np.int64(pad_id))
    return TextFeatures(
        pooled=feats.pooled,
        tokens=take(feats.tokens),
        mask=new_mask,
        input_ids=ids,
        token_embeddings=take(feats.token_embeddings),
        truncated=feats.truncated,
    )


def _max_text_len(max_positions: int, tokenizer: Any) -> int:
    """The model's text positions, or the tokenizer's limit when it is smaller."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < max_positions:
        return limit
    return int(max_positions)
