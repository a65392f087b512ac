"""CLIP's text tower in plain torch, for a query path that never imports transformers.

A cold ``crossrank search`` spends most of its time importing transformers to encode one query
(``benchmarks/bench_cold_search.py`` measures it). The text half of CLIP is small, so this module
runs it with ``torch.nn.functional`` alone, its weights read straight from the model's safetensors
(the same files whose fingerprint the index recorded) and its texts tokenised by ``tokenizers``
from the model's ``tokenizer.json``:

    ids ─► token + position embeddings (layer-0 states) ─► N x [pre-LayerNorm causal attention,
    pre-LayerNorm MLP] ─► final LayerNorm ─► pool at the end-of-text token ─► text_projection

It computes what :class:`crossrank.encoders.clip.ClipEncoder` computes (pooled vectors, token
features, masks, token ids, layer-0 states, the same truncation), equal within float tolerance;
``tests/encoders/test_text_tower.py`` checks that against transformers.

:class:`LightClipTextEncoder` is a :class:`~crossrank.encoders.base.TransformersEncoder`, so its
``encode_text`` is the shared one: the same input checks and the same truncation signal
(``TextFeatures.truncated``, the rows ``_tokenize`` reports cut). Image methods load the full
encoder on first use.

:func:`load_text_encoder` picks it for CLIP models and falls back to
:func:`crossrank.encoders.load_encoder` for anything it cannot run (BLIP, weights only in
``pytorch_model.bin``, an activation or tokenizer it does not know), with the reason at debug level.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossrank.encoders.base import Encoder, ImageFeatures, TransformersEncoder
from crossrank.errors import InvalidArgumentError, ModelError, ModelMismatchError

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "CLIP_TEXT_DEFAULTS",
    "ClipTextTower",
    "LightClipTextEncoder",
    "load_text_encoder",
]

logger = logging.getLogger(__name__)

#: transformers' ``CLIPTextConfig`` defaults, for keys a saved ``config.json`` leaves out (a test
#: compares them with the installed transformers).
CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}
#: ``CLIPConfig``'s default size of the shared space.
CLIP_PROJECTION_DIM_DEFAULT = 512

# Tokenizer classes whose fast tokenizer is tokenizer.json as saved. transformers 5 rebuilds a
# CLIPTokenizer's pipeline in code from the vocabulary; the standard CLIP tokenizer.json holds that
# same pipeline, which _check_tokenizer_json verifies before trusting the file.
_GENERIC_TOKENIZERS = frozenset({"", "PreTrainedTokenizerFast", "TokenizersBackend"})
_CLIP_TOKENIZERS = frozenset({"CLIPTokenizer", "CLIPTokenizerFast"})

_PREFIX = "text_model."


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    import torch

    return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The torch function of a transformers ``hidden_act`` name, or None for one not known here."""
    import torch.nn.functional as F

    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "quick_gelu": _quick_gelu,
        "gelu": F.gelu,
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
        "swish": F.silu,
    }
    return table.get(name)


@dataclass(frozen=True)
class _TextConfig:
    """The sizes of a CLIP text tower, from ``config.json`` with transformers' defaults."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_positions: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    projection_dim: int

    @classmethod
    def from_clip_config(cls, config: Mapping[str, Any]) -> _TextConfig:
        text = {**CLIP_TEXT_DEFAULTS}
        for key in ("text_config", "text_config_dict"):  # the legacy _dict wins, as in CLIPConfig
            value = config.get(key)
            if isinstance(value, Mapping):
                text.update({k: v for k, v in value.items() if v is not None})
        return cls(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            num_layers=int(text["num_hidden_layers"]),
            num_heads=int(text["num_attention_heads"]),
            max_positions=int(text["max_position_embeddings"]),
            hidden_act=str(text["hidden_act"]),
            layer_norm_eps=float(text["layer_norm_eps"]),
            eos_token_id=int(text["eos_token_id"]),
            projection_dim=int(config.get("projection_dim") or CLIP_PROJECTION_DIM_DEFAULT),
        )


class ClipTextTower:
    """CLIP's text transformer and ``text_projection`` as plain tensors and functional torch.

    The same computation as transformers' ``CLIPTextModel`` + ``CLIPModel.text_projection``: token
    plus position embeddings, pre-LayerNorm residual layers (causal self-attention with the padding
    masked out, then an MLP), a final LayerNorm; the pooled state is the one at the first
    ``eos_token_id`` of each row, or, for legacy configs whose ``eos_token_id`` is 2, at the
    largest token id (transformers keeps that rule for them).

    Attributes:
        config: the sizes.
        weights: the ``text_model.*`` tensors (prefix dropped), ``text_projection`` and
            ``logit_scale`` (when the checkpoint has it).
    """

    def __init__(self, config: _TextConfig, weights: dict[str, torch.Tensor]) -> None:
        """Hold the weights; :func:`_load_tower` checks that every one is there first."""
        act = _activation(config.hidden_act)
        if act is None:  # the loader checks this before reading any weight
            raise ModelError(f"unsupported hidden_act {config.hidden_act!r}")
        self.config = config
        self.weights = weights
        self._act = act
        self.logit_scale = weights.get("logit_scale")

    @staticmethod
    def weight_names(config: _TextConfig) -> list[str]:
        """The checkpoint names the tower needs (``logit_scale`` is optional and not listed)."""
        names = [
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.final_layer_norm.weight",
            "text_model.final_layer_norm.bias",
            "text_projection.weight",
        ]
        for i in range(config.num_layers):
            p = f"text_model.encoder.layers.{i}."
            for part in (
                "layer_norm1",
                "layer_norm2",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
            ):
                names += [f"{p}{part}.weight", f"{p}{part}.bias"]
        return names

    # -- what TransformersEncoder asks of its model ---------------------------------------------

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
        """Move every tensor (as ``nn.Module.to``); returns self."""
        self.weights = {k: v.to(device=device, dtype=dtype) for k, v in self.weights.items()}
        self.logit_scale = self.weights.get("logit_scale")
        return self

    def eval(self) -> ClipTextTower:
        """Nothing to switch (no dropout here); returns self."""
        return self

    # -- the computation -------------------------------------------------------------------------

    def _w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(b, L)`` ids -> the layer-0 states ``(b, L, hidden_size)``."""
        if input_ids.shape[-1] > self.config.max_positions:
            raise InvalidArgumentError(
                f"input_ids has {input_ids.shape[-1]} positions; the model has "
                f"{self.config.max_positions}"
            )
        tok = self._w(_PREFIX + "embeddings.token_embedding.weight")[input_ids]
        pos = self._w(_PREFIX + "embeddings.position_embedding.weight")[: input_ids.shape[-1]]
        return tok + pos

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, L)`` ids and mask -> pooled ``(b, dim)`` and tokens ``(b, L, dim)``, projected
        and not normalised (``CLIPModel.text_projection`` of ``pooler_output`` and of
        ``last_hidden_state``)."""
        import torch
        import torch.nn.functional as F

        cfg = self.config
        width, heads = cfg.hidden_size, cfg.num_heads
        head_dim = width // heads
        b, length = input_ids.shape
        x = self.embeddings(input_ids)
        # Causal, and no attention to padding (as transformers' create_causal_mask): a real token
        # only sees the real tokens before it; a padding row still sees the real ones, so no row
        # is empty.
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for i in range(cfg.num_layers):
            p = f"{_PREFIX}encoder.layers.{i}."
            h = F.layer_norm(
                x,
                (width,),
                self._w(p + "layer_norm1.weight"),
                self._w(p + "layer_norm1.bias"),
                cfg.layer_norm_eps,
            )
            q, k, v = (
                F.linear(
                    h,
                    self._w(f"{p}self_attn.{n}_proj.weight"),
                    self._w(f"{p}self_attn.{n}_proj.bias"),
                )
                .view(b, length, heads, head_dim)
                .transpose(1, 2)
                for n in ("q", "k", "v")
            )
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=head_dim**-0.5)
            a = a.transpose(1, 2).reshape(b, length, width)
            x = x + F.linear(
                a, self._w(p + "self_attn.out_proj.weight"), self._w(p + "self_attn.out_proj.bias")
            )
            h = F.layer_norm(
                x,
                (width,),
                self._w(p + "layer_norm2.weight"),
                self._w(p + "layer_norm2.bias"),
                cfg.layer_norm_eps,
            )
            h = self._act(F.linear(h, self._w(p + "mlp.fc1.weight"), self._w(p + "mlp.fc1.bias")))
            x = x + F.linear(h, self._w(p + "mlp.fc2.weight"), self._w(p + "mlp.fc2.bias"))
        x = F.layer_norm(
            x,
            (width,),
            self._w(_PREFIX + "final_layer_norm.weight"),
            self._w(_PREFIX + "final_layer_norm.bias"),
            cfg.layer_norm_eps,
        )
        ids = input_ids.to(torch.int)
        if cfg.eos_token_id == 2:  # legacy OpenAI configs: end of text is the largest id
            at = ids.argmax(dim=-1)
        else:  # the first end-of-text token (padding may use the same id after it)
            at = (ids == cfg.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(b, device=x.device), at]
        proj = self._w("text_projection.weight")
        return F.linear(pooled, proj), F.linear(x, proj)


class _FastTokenizer:
    """A ``tokenizers.Tokenizer`` set up as transformers' fast tokenizer is for one call with
    ``padding="longest", truncation=True, max_length=max_text_len``."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int,
        pad_token: str | None,
        pad_id: int | None,
        padding_side: str,
        truncation_side: str,
    ) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        tokenizer.enable_truncation(
            max_length, stride=0, strategy="longest_first", direction=truncation_side
        )
        if pad_id is not None and pad_token is not None:
            tokenizer.enable_padding(
                direction=padding_side, pad_id=pad_id, pad_type_id=0, pad_token=pad_token
            )
        self.tokenizer = tokenizer
        self.can_pad = pad_id is not None
        self.model_max_length = max_length

    def __call__(
        self,
        texts: list[str],
        *,
        return_offsets_mapping: bool = False,
        truncation: bool = True,
        max_length: int | None = None,
    ) -> Any:
        """The encodings of ``texts``; with ``return_offsets_mapping``, as a transformers fast
        tokenizer answers that call (unpadded ``input_ids`` and ``offset_mapping`` per text),
        which is how training locates words (:mod:`crossrank.training.attention_targets`)."""
        if return_offsets_mapping:
            if not truncation or (max_length is not None and max_length != self.model_max_length):
                raise ModelError(
                    f"this tokenizer truncates at {self.model_max_length} tokens, the text "
                    f"encoder's limit; got truncation={truncation}, max_length={max_length}"
                )
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
            real = [[m == 1 for m in e.attention_mask] for e in encodings]  # without the padding
            return {
                "input_ids": [
                    [t for t, keep in zip(e.ids, r, strict=True) if keep]
                    for e, r in zip(encodings, real, strict=True)
                ],
                "offset_mapping": [
                    [o for o, keep in zip(e.offsets, r, strict=True) if keep]
                    for e, r in zip(encodings, real, strict=True)
                ],
            }
        if len(texts) > 1 and not self.can_pad:
            raise ModelError(
                "the tokenizer has no padding token, so texts of different lengths cannot be "
                "batched; encode one text at a time"
            )
        return self.tokenizer.encode_batch(texts, add_special_tokens=True)


class LightClipTextEncoder(TransformersEncoder):
    """A CLIP text encoder without transformers: :class:`ClipTextTower` and ``tokenizers``.

    ``encode_text`` is :meth:`TransformersEncoder.encode_text` (same checks, batching, outputs and
    truncation signal as :class:`~crossrank.encoders.clip.ClipEncoder`); ``info`` is the full
    encoder's, key for key. ``preprocess``, ``encode_pixels`` and ``encode_images`` load the full
    encoder (transformers) on first use and hand over to it.

    Load it with :func:`load_text_encoder`.
    """

    backend = "clip"
    #: True on this class: the query path that leaves transformers out.
    light = True

    def __init__(
        self,
        tower: ClipTextTower,
        tokenizer: _FastTokenizer,
        *,
        info: dict[str, Any],
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        model_ref: str | Path,
        dtype_name: str,
    ) -> None:
        """See :class:`TransformersEncoder`; ``model_ref`` and ``dtype_name`` reopen the model
        with :func:`load_encoder` for the image methods."""
        super().__init__(
            tower,
            None,
            tokenizer,
            info=info,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
        )
        self._model_ref = model_ref
        self._dtype_name = dtype_name
        self._full: Encoder | None = None
        self._full_lock = threading.Lock()

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        import torch

        with self._tokenizer_lock:
            encodings = self.tokenizer(texts)
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        truncated = [i for i, e in enumerate(encodings) if e.overflowing]
        return input_ids, attention_mask, truncated

    def _text_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward(input_ids, attention_mask)

    def _text_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings(input_ids)

    # -- images: the full encoder, on first use ----------------------------------------------------

    def full_encoder(self) -> Encoder:
        """The transformers :class:`~crossrank.encoders.clip.ClipEncoder` of the same model,
        loaded once (the image methods use it).

        Raises:
            ModelMismatchError: the model's files changed between the two loads.
        """
        if self._full is None:
            with self._full_lock:
                if self._full is None:
                    from crossrank.encoders.fingerprint import same_model
                    from crossrank.encoders.loading import load_encoder

                    full = load_encoder(
                        self._model_ref,
                        device=str(self.device),
                        batch_size=self.batch_size,
                        dtype=self._dtype_name,
                    )
                    if not same_model(self.info, full.info):
                        raise ModelMismatchError(
                            f"model {self.model_id!r} changed on disk while in use; open it again"
                        )
                    self._full = full
        return self._full

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The full encoder's ``preprocess`` (loads it on first use)."""
        return self.full_encoder().preprocess(images)

    def encode_pixels(self, pixel_values: torch.Tensor | np.ndarray) -> ImageFeatures:
        """The full encoder's ``encode_pixels`` (loads it on first use)."""
        return self.full_encoder().encode_pixels(pixel_values)

    def encode_images(self, images: Sequence[Image.Image]) -> ImageFeatures:
        """The full encoder's ``encode_images`` (loads it on first use)."""
        return self.full_encoder().encode_images(images)


# -- loading ---------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _check_tokenizer_json(data: Mapping[str, Any], tokenizer_class: str) -> str | None:
    """Why ``tokenizer.json`` may not tokenise as transformers would, or None when it will."""
    if tokenizer_class in _GENERIC_TOKENIZERS:
        return None
    if tokenizer_class not in _CLIP_TOKENIZERS:
        return f"tokenizer class {tokenizer_class!r} is not one the light path knows"
    # transformers 5 builds CLIPTokenizer's pipeline in code (NFC, whitespace runs to one space,
    # lower case; the CLIP split regex then byte-level; BPE with '</w>'; RobertaProcessing);
    # the hub's tokenizer.json files hold the same steps.
    normalizer = data.get("normalizer") or {}
    steps = [n.get("type") for n in normalizer.get("normalizers") or [] if isinstance(n, dict)]
    pre = data.get("pre_tokenizer") or {}
    pre_steps = [n.get("type") for n in pre.get("pretokenizers") or [] if isinstance(n, dict)]
    model = data.get("model") or {}
    post = data.get("post_processor") or {}
    if (
        steps != ["NFC", "Replace", "Lowercase"]
        or pre_steps != ["Split", "ByteLevel"]
        or model.get("type") != "BPE"
        or model.get("end_of_word_suffix") != "</w>"
        or post.get("type") != "RobertaProcessing"
    ):
        return "its tokenizer.json is not the standard CLIP pipeline"
    return None


def _open_tokenizer(model_dir: Path, max_positions: int) -> tuple[_FastTokenizer, int] | str:
    """The tokenizer and the model's ``max_text_len``, or why the light path cannot have them."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return "no tokenizer.json"
    settings = _read_json(model_dir / "tokenizer_config.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # tokenizers raises a plain Exception on a file it cannot parse
        return f"tokenizer.json does not load ({type(e).__name__})"
    why = _check_tokenizer_json(data, str(settings.get("tokenizer_class") or ""))
    if why:
        return why
    # ClipEncoder's _max_text_len: the positions, or the tokenizer's limit when smaller.
    limit = settings.get("model_max_length")
    max_text_len = (
        int(limit)
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < max_positions
        else max_positions
    )
    pad_token = _token_text(settings.get("pad_token"))
    pad_id = tokenizer.token_to_id(pad_token) if pad_token is not None else None
    padding_side = str(settings.get("padding_side") or "right")
    truncation_side = str(settings.get("truncation_side") or "right")
    if padding_side not in ("left", "right") or truncation_side not in ("left", "right"):
        return "an unknown padding or truncation side"
    return (
        _FastTokenizer(
            tokenizer,
            max_length=max_text_len,
            pad_token=pad_token,
            pad_id=pad_id,
            padding_side=padding_side,
            truncation_side=truncation_side,
        ),
        max_text_len,
    )


def _read_weights(files: list[Path], names: list[str]) -> dict[str, torch.Tensor] | str:
    """The named tensors (plus ``logit_scale``) from safetensors files, or why not."""
    from safetensors import safe_open

    if not files or any(f.suffix != ".safetensors" for f in files):
        return "its weights are not in safetensors"
    wanted = {*names, "logit_scale"}
    found: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in wanted.intersection(f.keys()):
                    found[key] = f.get_tensor(key)
        except Exception as e:  # safetensors raises its own SafetensorError on a bad file
            return f"{file.name} does not open ({type(e).__name__})"
    missing = [n for n in names if n not in found]
    if missing:
        return f"{len(missing)} text weight(s) missing (first: {missing[0]})"
    return found


def _light_or_reason(
    resolved: Any,
    hf_config: dict[str, Any],
    info: dict[str, Any],
    files: list[Path],
    *,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    model_ref: str | Path,
    dtype_name: str,
) -> LightClipTextEncoder | str:
    try:
        cfg = _TextConfig.from_clip_config(hf_config)
    except (KeyError, TypeError, ValueError) as e:
        return f"its text config is unusual ({type(e).__name__})"
    if _activation(cfg.hidden_act) is None:
        return f"hidden_act {cfg.hidden_act!r}"
    if cfg.hidden_size % cfg.num_heads:
        return "a hidden size that is not a multiple of the heads"
    vision = {**(hf_config.get("vision_config") or {})}
    image_size = int(vision.get("image_size") or 224)
    patch_size = int(vision.get("patch_size") or 32)
    opened = _open_tokenizer(resolved.model_dir, cfg.max_positions)
    if isinstance(opened, str):
        return opened
    tokenizer, max_text_len = opened
    weights = _read_weights(files, ClipTextTower.weight_names(cfg))
    if isinstance(weights, str):
        return weights
    # The same keys, in the same order, as ClipEncoder.from_pretrained writes.
    info = {
        **info,
        "dim": cfg.projection_dim,
        "patch_dim": cfg.projection_dim,
        "n_patches": (image_size // patch_size) ** 2,
        "image_size": image_size,
        "patch_size": patch_size,
        "max_text_len": max_text_len,
        "text_width": cfg.hidden_size,
        "patch_features": "visual_projection(post_layernorm(last_hidden_state[:, 1:]))",
    }
    return LightClipTextEncoder(
        ClipTextTower(cfg, weights),
        tokenizer,
        info=info,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        model_ref=model_ref,
        dtype_name=dtype_name,
    )


def _mismatch(expected: Mapping[str, Any], got: Mapping[str, Any], index_path: Any) -> None:
    from crossrank.encoders.fingerprint import same_model

    if same_model(expected, got):
        return
    where = f"index {index_path}" if index_path is not None else "the index"
    built = expected.get("model_id")
    if got.get("model_id") == built:  # same name, other weights or config
        rebuild = f"--index {index_path}" if index_path is not None else "--index INDEX"
        raise ModelMismatchError(
            f"{where} was built with model {built!r}, whose weights or config have changed "
            "since (retrained, or a crossrank upgrade that ships a new demo encoder); rebuild "
            f"the index with `crossrank build SOURCE {rebuild} --overwrite`"
        )
    raise ModelMismatchError(
        f"{where} was built with model {built!r}, but queries would be encoded with "
        f"{got.get('model_id')!r}; search it with the same --model or rebuild the index with "
        "the new one"
    )


def load_text_encoder(
    model: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    *,
    dtype: str = "auto",
    expected_info: Mapping[str, Any] | None = None,
    index_path: str | Path | None = None,
) -> Encoder:
    """Open an encoder for text queries, without transformers for CLIP models.

    For a CLIP model (``config.json`` ``model_type == "clip"``: the demo encoder, a hub id from the
    local cache, a local Hugging Face folder, a sentence-transformers CLIP folder) it returns a
    :class:`LightClipTextEncoder`: ``encode_text`` runs :class:`ClipTextTower` on the weights in
    the model's safetensors and tokenises with ``tokenizers``; nothing imports transformers until
    an image method is called (which loads the full encoder, once). Its ``encode_text`` returns
    the :class:`~crossrank.encoders.base.TextFeatures` that :func:`load_encoder`'s encoder returns
    (equal within float tolerance; the same ``input_ids``, masks and truncation, and the same
    rows in ``TextFeatures.truncated``, which a search warns about), and its ``info`` equals that
    encoder's ``info`` key for key.

    Anything else gets :func:`~crossrank.encoders.load_encoder`'s full encoder: a BLIP model, and
    a CLIP model whose weights are not safetensors, whose ``hidden_act`` or tokenizer this module
    does not know, or whose checkpoint lacks a text weight (the full loader then raises its own
    error). The reason is logged at debug level. Check ``getattr(encoder, "light", False)`` to
    see which one came back.

    The model is resolved exactly as :func:`load_encoder` resolves it
    (:func:`~crossrank.encoders.loading.resolve_model`), and ``device``, ``batch_size`` and
    ``dtype`` mean the same.

    How ``Index`` calls it for text queries (``self.manifest.encoder`` is the recorded info)::

        from crossrank.encoders import load_text_encoder

        encoder = load_text_encoder(
            wanted,  # the --model override, else manifest.encoder["model_id"]
            device=self.device,
            expected_info=self.manifest.encoder,
            index_path=self.path,
        )

    and drops its own ``same_model`` check, which ``expected_info`` replaces with the same two
    messages. Image queries and ``add`` may use the same object (its image methods load the full
    encoder) or call :func:`load_encoder` as today.

    Args:
        model: ``None`` / ``"crossrank-demo"``, a local directory, or a hub id (as
            :func:`load_encoder`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: texts per forward pass.
        dtype: ``auto`` (fp16 on CUDA, fp32 on the CPU), ``fp32``, ``fp16`` or ``bf16``.
        expected_info: the ``info`` an index recorded for its encoder. When given, the model's
            fingerprints (``config_sha256`` and ``weights_sha256``, as
            :func:`~crossrank.encoders.same_model` compares them) are checked against it before
            any weight is read or any model is built.
        index_path: the index's folder, named in the mismatch messages.

    Returns:
        An :class:`~crossrank.encoders.base.Encoder`; ``light`` is True on the light one.

    Raises:
        InvalidArgumentError: a bad ``device``, ``batch_size`` or ``dtype``.
        ModelError: the model cannot be found or opened, or its ``model_type`` is not supported.
        ModelMismatchError: ``expected_info`` was given and the model's fingerprints differ:
            same ``model_id`` with other weights or config ("rebuild the index with ...
            --overwrite"), or another model ("search it with the same --model ...").

    Example:
        >>> enc = load_text_encoder("crossrank-demo", device="cpu")  # doctest: +SKIP
        >>> enc.encode_text(["a red circle"]).pooled.shape  # doctest: +SKIP
        (1, 128)
    """
    from crossrank.encoders.loading import _torch_dtype, load_encoder, model_info, open_model

    config, torch_device, resolved, hf_config, files = open_model(model, device, batch_size, dtype)
    model_type = hf_config["model_type"]
    # only this encoder's info is built here; the full encoder builds its own
    info = model_info(resolved, hf_config, files, LightClipTextEncoder.backend)
    if expected_info is not None:
        _mismatch(expected_info, info, index_path)

    def full() -> Encoder:
        encoder = load_encoder(model, device=device, batch_size=batch_size, dtype=dtype)
        if expected_info is not None:
            _mismatch(expected_info, encoder.info, index_path)
        return encoder

    if model_type != "clip":
        logger.debug("%s: full encoder (model_type %s)", resolved.model_id, model_type)
        return full()
    light = _light_or_reason(
        resolved,
        hf_config,
        info,
        files,
        device=torch_device,
        dtype=_torch_dtype(config.dtype, torch_device),
        batch_size=config.batch_size,
        model_ref=resolved.model_id,
        dtype_name=config.dtype,
    )
    if isinstance(light, str):
        logger.debug("%s: full encoder for text (%s)", resolved.model_id, light)
        return full()
    logger.info(
        "loaded the text tower of %s (dim %d) on %s without transformers",
        resolved.model_id,
        light.dim,
        torch_device,
    )
    return light
