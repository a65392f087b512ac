"""What every encoder returns and promises, and the machinery the transformers backends share.

A backend (``clip.py``, ...) only says how one batch goes through its model
(:meth:`TransformersEncoder._image_forward` and :meth:`TransformersEncoder._text_forward`);
:class:`TransformersEncoder` does the rest the same way for all of them: input checks, the image
processor and the tokenizer, batching, device and dtype, float32 L2-normalised pooled outputs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from crossrank.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["ImageFeatures", "TextFeatures", "Encoder", "TransformersEncoder"]

logger = logging.getLogger(__name__)


@dataclass
class ImageFeatures:
    """What an encoder makes of n images.

    Attributes:
        pooled: ``(n, dim)`` float32, L2-normalised: the first-stage vectors.
        patches: ``(n, n_patches, patch_dim)`` float32 per-patch features in the shared space, not
            normalised (the backend's docstring says which tokens they are).
    """

    pooled: np.ndarray
    patches: np.ndarray

    def __len__(self) -> int:
        return int(self.pooled.shape[0])


@dataclass
class TextFeatures:
    """What an encoder makes of m texts.

    Attributes:
        pooled: ``(m, dim)`` float32, L2-normalised: the first-stage query vectors.
        tokens: ``(m, n_tokens, patch_dim)`` float32 per-token features in the shared space, not
            normalised; zero where ``mask`` is False.
        mask: ``(m, n_tokens)`` bool, True for the real tokens (special tokens included), False for
            padding. ``n_tokens`` is the longest text's token count in this call.
        input_ids: ``(m, n_tokens)`` int64 token ids (padding id where ``mask`` is False), or None
            for an encoder that has none. A reranker that runs the model's own text tower (e.g.
            ``blip-itm``) reads these rather than ``tokens``; see ``Reranker.needs_input_ids``.
        token_embeddings: ``(m, n_tokens, text_width)`` float32, the text encoder's layer-0 states
            (token plus position embeddings, before any attention; zero at padding), or None when
            not asked for (``encode_text(..., token_embeddings=True)``). A reranker that reads them
            takes :meth:`reranker_tokens`; see ``Reranker.token_embeddings``.
        truncated: the rows whose text was longer than the model's text positions and was cut
            to ``max_text_len`` tokens (a search warns about them: the end of the query was not
            read).
    """

    pooled: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    input_ids: np.ndarray | None = None
    token_embeddings: np.ndarray | None = None
    truncated: tuple[int, ...] = ()

    def __len__(self) -> int:
        return int(self.pooled.shape[0])

    def reranker_tokens(self) -> np.ndarray:
        """What a cross-attention reranker reads per token: ``tokens``, with ``token_embeddings``
        in front when there are any: ``(m, n_tokens, text_width + token_dim)`` float32."""
        if self.token_embeddings is None:
            return self.tokens
        return np.concatenate([self.token_embeddings, self.tokens], axis=-1)


@runtime_checkable
class Encoder(Protocol):
    """Images and texts in, pooled vectors and patch / token features out.

    Attributes:
        model_id: what the index manifest records: the ``crossrank-demo`` alias, a hub id, or an
            absolute directory.
        info: JSON-able description of the model (``model_id``, ``model_type``, ``dim``,
            ``patch_dim``, ``n_patches``, ``image_size``, ``max_text_len``, ``config_sha256``,
            ``weights_sha256``, ...); see :func:`crossrank.encoders.same_model`.
        dim: size D of the pooled vectors.
        patch_dim: size d of the patch and token features.
        n_patches: patches P per image.
    """

    model_id: str
    info: dict[str, Any]
    dim: int
    patch_dim: int
    n_patches: int

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(n, 3, H, W)`` float32 CPU pixel values; thread-safe (runs in decode threads)."""
        ...

    def encode_pixels(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Encode preprocessed images, batched internally."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> ImageFeatures:
        """``preprocess`` + ``encode_pixels``."""
        ...

    def encode_text(self, texts: Sequence[str]) -> TextFeatures:
        """Encode texts, batched internally; an empty text is an error.

        An encoder may also take a keyword ``token_embeddings=True`` and then fill
        ``TextFeatures.token_embeddings`` (its ``token_embedding_dim`` says how wide they are);
        it is passed only to an encoder whose ``token_embedding_dim`` is set.
        """
        ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InvalidArgumentError(
            "texts must be a list of strings, got "
            f"{type(texts).__name__}; wrap a single query in a list"
        )
    if len(texts) == 0:
        raise InvalidArgumentError("texts is empty; give at least one query text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.strip():
            raise InvalidArgumentError(
                f"texts[{i}] is empty or only whitespace; give a query with words in it"
            )
    return list(texts)


class TransformersEncoder:
    """Shared body of the encoders built on a transformers model, its image processor and tokenizer.

    Thread safety: :meth:`preprocess` keeps no state and may run in many threads at once;
    tokenizing is serialised with a lock (a fast tokenizer's padding / truncation settings are
    mutable state of the Rust object), and forward passes under ``torch.inference_mode`` may run
    concurrently.

    Subclasses set ``backend`` and implement ``_image_forward`` and ``_text_forward``.
    """

    backend: ClassVar[str] = ""

    def __init__(
        self,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        *,
        info: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        """Place the model and read its sizes from ``info``.

        Args:
            model: the transformers model (moved here to ``device`` and ``dtype``, set to eval).
            image_processor: its image processor (PIL in, ``pixel_values`` out).
            tokenizer: its tokenizer.
            info: the encoder's description; must hold ``model_id``, ``dim``, ``patch_dim``,
                ``n_patches``, ``image_size`` and ``max_text_len``; may hold ``token_dim`` (the
                size of the token features, default ``patch_dim``) and ``text_width`` (the size
                of the text encoder's layer-0 token states, for a backend that gives them).
            device: where the model runs.
            dtype: the dtype it runs in.
            batch_size: images or texts per forward pass.
        """
        self.model = model.to(device=device, dtype=dtype).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.info = info
        self.model_id: str = info["model_id"]
        self.dim: int = info["dim"]
        self.patch_dim: int = info["patch_dim"]
        # Token features share the patch features' size unless the backend says otherwise (BLIP:
        # text hidden size vs vision hidden size).
        self.token_dim: int = info.get("token_dim", info["patch_dim"])
        # Width of the layer-0 token states (encode_text(token_embeddings=True)); None: not given.
        self.token_embedding_dim: int | None = info.get("text_width")
        self.n_patches: int = info["n_patches"]
        self.image_size: int = info["image_size"]
        self.max_text_len: int = info["max_text_len"]
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self._tokenizer_lock = threading.Lock()
        self._logged_truncation = False

    @property
    def logit_scale(self) -> float | None:
        """The contrastive temperature the model was trained with, as the factor on a cosine
        (CLIP's ``exp(logit_scale)``: 100 for OpenAI's models), or None for a model without one.

        ``crossrank train``'s residual training uses it as the default first-stage weight, so the
        residual starts from the first stage's own softmax.
        """
        scale = getattr(self.model, "logit_scale", None)
        if scale is None:
            return None
        return float(scale.detach().float().exp())

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, device={str(self.device)!r}, "
            f"dtype={str(self.dtype).removeprefix('torch.')!r}, batch_size={self.batch_size})"
        )

    # -- what a backend implements -----------------------------------------------------------------

    def _image_forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch ``(b, 3, H, W)`` -> pooled ``(b, dim)`` (unnormalised), patches ``(b, P, d)``."""
        raise NotImplementedError

    def _text_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch ``(b, L)`` -> pooled ``(b, dim)`` (unnormalised), tokens ``(b, L, d)``."""
        raise NotImplementedError

    def _text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One batch ``(b, L)`` -> the text encoder's layer-0 states ``(b, L, text_width)``."""
        raise NotImplementedError

    #: How texts are padded: ``"longest"`` (to the longest text of a batch), or ``"max_length"``
    #: (to ``max_text_len``, for a model that pools at the last position, as SigLIP does).
    _text_padding = "longest"

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Token ids ``(m, L)`` int64, attention mask ``(m, L)`` int64, and the rows that were cut.

        Pads on the tokenizer's side as ``_text_padding`` says; truncates at ``max_text_len``.
        """
        with self._tokenizer_lock:
            enc = self.tokenizer(
                texts,
                padding=self._text_padding,
                truncation=True,
                max_length=self.max_text_len,
                return_tensors="pt",
            )
        encodings = getattr(enc, "encodings", None) or []
        truncated = [i for i, e in enumerate(encodings) if getattr(e, "overflowing", None)]
        if "attention_mask" in enc:
            mask = enc["attention_mask"]
        else:  # a tokenizer without masks: padding is every position holding the pad id
            mask = (enc["input_ids"] != self.tokenizer.pad_token_id).long()
        return enc["input_ids"], mask, truncated

    # -- public API --------------------------------------------------------------------------------

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize, crop and normalise images as the model's own image processor does.

        Thread-safe and stateless, so the ingest decode threads call it.

        Args:
            images: PIL images (any mode; converted to RGB here).

        Returns:
            ``(n, 3, image_size, image_size)`` float32 CPU tensor.

        Raises:
            InvalidArgumentError: ``images`` is not a sequence of PIL images.
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
        if len(images) == 0:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.float32)
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        return pixels.to(torch.float32).contiguous()  # (n, 3, H, W)

    def encode_pixels(self, pixel_values: torch.Tensor | np.ndarray) -> ImageFeatures:
        """Encode preprocessed images, ``batch_size`` at a time.

        Args:
            pixel_values: ``(n, 3, image_size, image_size)`` float, as :meth:`preprocess` returns.

        Returns:
            :class:`ImageFeatures`: pooled ``(n, dim)`` float32 L2-normalised, patches
            ``(n, n_patches, patch_dim)`` float32.

        Raises:
            InvalidArgumentError: the tensor has another shape.
        """
        import torch
        import torch.nn.functional as F

        if isinstance(pixel_values, np.ndarray):
            pixel_values = torch.from_numpy(pixel_values)
        if not isinstance(pixel_values, torch.Tensor):
            raise InvalidArgumentError(
                f"pixel_values must be a torch tensor, got {type(pixel_values).__name__}"
            )
        expected = (3, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise InvalidArgumentError(
                f"pixel_values must have shape (n, {', '.join(map(str, expected))}) "
                f"for {self.model_id}, got {tuple(pixel_values.shape)}; make them "
                "with this encoder's preprocess()"
            )
        n = pixel_values.shape[0]
        pooled = np.empty((n, self.dim), dtype=np.float32)
        patches = np.empty((n, self.n_patches, self.patch_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, self.batch_size):
                batch = pixel_values[start : start + self.batch_size].to(
                    self.device, self.dtype, non_blocking=True
                )
                p, x = self._image_forward(batch)
                stop = start + batch.shape[0]
                # Normalise in float32 whatever the model ran in.
                pooled[start:stop] = F.normalize(p.float(), dim=-1).cpu().numpy()
                patches[start:stop] = x.float().cpu().numpy()
        return ImageFeatures(pooled=pooled, patches=patches)

    def encode_images(self, images: Sequence[Image.Image]) -> ImageFeatures:
        """:meth:`preprocess` then :meth:`encode_pixels`.

        Args:
            images: PIL images.

        Returns:
            :class:`ImageFeatures` (see :meth:`encode_pixels`).
        """
        return self.encode_pixels(self.preprocess(images))

    def encode_text(self, texts: Sequence[str], *, token_embeddings: bool = False) -> TextFeatures:
        """Encode query texts, ``batch_size`` at a time.

        Texts longer than the model's ``max_text_len`` tokens are truncated: their rows are listed
        in ``TextFeatures.truncated`` (a search warns once per such query), logged once at debug.

        Args:
            texts: the texts; each must have a non-whitespace character.
            token_embeddings: also return the text encoder's layer-0 token states (token plus
                position embeddings, before any attention), which a reranker with
                ``token_embeddings`` reads beside the last layer's.

        Returns:
            :class:`TextFeatures`: pooled ``(m, dim)`` float32 L2-normalised, tokens
            ``(m, n_tokens, token_dim)`` float32 (zero at padding), mask ``(m, n_tokens)`` bool,
            input_ids ``(m, n_tokens)`` int64, and with ``token_embeddings`` the layer-0 states
            ``(m, n_tokens, token_embedding_dim)`` float32 (zero at padding).

        Raises:
            InvalidArgumentError: ``texts`` is empty, not a list of strings, or holds an empty text.
            ModelError: ``token_embeddings`` was asked of a backend that does not give them.
        """
        import torch
        import torch.nn.functional as F

        from crossrank.errors import ModelError

        if token_embeddings and not self.token_embedding_dim:
            raise ModelError(
                f"encoder {self.model_id} ({self.backend or type(self).__name__}) does not give "
                "its layer-0 token states; use a reranker trained without token_embeddings"
            )
        texts = _check_texts(texts)
        input_ids, attention_mask, truncated = self._tokenize(texts)
        if truncated and not self._logged_truncation:
            self._logged_truncation = True
            logger.debug(
                "%d text(s) longer than %d tokens were truncated for %s (first: texts[%d])",
                len(truncated),
                self.max_text_len,
                self.model_id,
                truncated[0],
            )
        m, n_tokens = input_ids.shape
        mask = attention_mask.bool()  # (m, n_tokens)
        pooled = np.empty((m, self.dim), dtype=np.float32)
        tokens = np.empty((m, n_tokens, self.token_dim), dtype=np.float32)
        layer0 = (
            np.empty((m, n_tokens, self.token_embedding_dim), dtype=np.float32)
            if token_embeddings
            else None
        )
        with torch.inference_mode():
            for start in range(0, m, self.batch_size):
                stop = min(start + self.batch_size, m)
                ids = input_ids[start:stop].to(self.device)
                pad = ~mask[start:stop, :, None].to(self.device)  # (b, n_tokens, 1)
                p, t = self._text_forward(ids, attention_mask[start:stop].to(self.device))
                t = t.float().masked_fill(pad, 0.0)  # (b, n_tokens, d)
                pooled[start:stop] = F.normalize(p.float(), dim=-1).cpu().numpy()
                tokens[start:stop] = t.cpu().numpy()
                if layer0 is not None:
                    layer0[start:stop] = (
                        self._text_embeddings(ids).float().masked_fill(pad, 0.0).cpu().numpy()
                    )
        return TextFeatures(
            pooled=pooled,
            tokens=tokens,
            mask=mask.numpy(),
            input_ids=input_ids.to(torch.int64).numpy(),
            token_embeddings=layer0,
            truncated=tuple(truncated),
        )
