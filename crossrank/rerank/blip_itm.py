"""``blip-itm``: BLIP's pretrained image-text matching head over cached patch features.

No training needed: the reranker is the ITM half of the same ``BlipForImageTextRetrieval``
checkpoint the index was built with (:class:`crossrank.encoders.blip.BlipEncoder`). For one
query and its k candidates::

    h = text_encoder(input_ids, attention_mask,
                     encoder_hidden_states=patches, encoder_attention_mask=ones)  # (k, L, hidden)
    score = softmax(itm_head(h[:, 0]))[:, 1]                                        # P(match), (k,)

``patches`` are the candidates' stored vision tokens (``vision_model.last_hidden_state``, CLS
included, ``(k, 1 + P, vision_hidden)``), gathered from the patch store: the vision model never
runs at query time. The query's ids are broadcast to the k candidates with ``expand`` (no copy)
and all k go through one batched forward.

Scores and fusion: ``scores.rerank`` in the search output is P(match) in [0, 1], the softmax of
the two ITM logits. ``--fusion`` applies as for the other rerankers: ``rerank`` ranks by P(match)
alone, ``sum`` adds the ITC cosine (the first-stage score), ``weighted:ALPHA`` mixes them. BLIP's
own retrieval evaluation also adds ITM to ITC: it reranks the top ``k_test`` ITC candidates (a
config value, 128 or 256 in the released retrieval configs) by ``itm_head(...)[:, 1] + cosine``,
i.e. the raw "match" logit, not its softmax, plus the ITC similarity. ``--fusion sum`` is the
closest crossrank option; it is not the same number, since P(match) is bounded where the logit is
not, so orderings can differ where the ITC cosines disagree strongly with ITM.

Precision (``precision``, as for the cross-attention reranker): by default the text encoder runs
under bf16 autocast on CUDA (fp16 where bf16 is unsupported) over the fp16 stored patches, and in
float32 on the CPU; ``bfloat16`` autocasts on the CPU too, ``float32`` nowhere. ``itm_head`` and
the softmax run in float32, and scores come back float32 on the CPU.

Explaining (``search(..., explain=True)``): :meth:`BlipItmReranker.explain` reruns the same text
encoder forward over the returned hits with ``output_attentions=True`` and gives each query
token's last-layer cross-attention over the stored vision tokens, mean over heads
(``cross_attentions[-1].mean(dim=1)``). ``score`` is not changed by it.

The ``[CLS]`` vs ``[ENC]`` difference from the original BLIP (transformers issues 22732 and
25629) is described in :mod:`crossrank.encoders.blip`: this reranker matches transformers'
``BlipForImageTextRetrieval.forward`` exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from crossrank.device import Device, resolve_device
from crossrank.errors import InvalidArgumentError, ModelError, ModelMismatchError
from crossrank.rerank.base import Reranker, RerankerName, _as_tensor, check_rerank_inputs

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["BlipItmReranker"]

logger = logging.getLogger(__name__)


class BlipItmReranker(Reranker):
    """BLIP image-text matching over stored vision tokens (see the module notes).

    Holds only the text encoder (with its cross-attention layers) and ``itm_head`` of a
    ``BlipForImageTextRetrieval``; the vision tower is dropped.

    Args:
        model: a transformers ``BlipForImageTextRetrieval`` (its ``text_encoder`` and ``itm_head``
            are kept, in float32, on ``device``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        model_id: the model's id, for messages.

    Attributes:
        name: ``"blip-itm"``.
        needs_input_ids: True: :meth:`score` needs the query's token ids
            (``TextFeatures.input_ids``), which :class:`crossrank.Index` passes to rerankers that
            declare this.
        patch_dim: the vision hidden size the stored patches must have.
        explain_chunk: how many candidates :meth:`explain` runs at a time (it keeps every
            layer's attention weights of a chunk).

    Example:
        >>> rr = BlipItmReranker.from_pretrained(  # doctest: +SKIP
        ...     "Salesforce/blip-itm-base-coco", "cpu"
        ... )
        >>> q = encoder.encode_text(["a dog on a beach"])  # doctest: +SKIP
        >>> rr.score(q.tokens[0], q.mask[0], patches, input_ids=q.input_ids[0])  # doctest: +SKIP
    """

    name: str = RerankerName.BLIP_ITM.value
    needs_input_ids: ClassVar[bool] = True
    explain_chunk: ClassVar[int] = 16

    def __init__(
        self, model: Any, device: Device | str = Device.AUTO, *, model_id: str = "<in memory>"
    ) -> None:
        import torch

        self.device = resolve_device(device)
        self.model_id = model_id
        self.text_encoder = model.text_encoder.to(self.device, torch.float32).eval()
        self.itm_head = model.itm_head.to(self.device, torch.float32).eval()
        self.patch_dim = int(model.config.vision_config.hidden_size)

    def __repr__(self) -> str:
        return f"BlipItmReranker(model_id={self.model_id!r}, device={str(self.device)!r})"

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path,
        device: Device | str = Device.AUTO,
        *,
        encoder_info: Mapping[str, Any] | None = None,
    ) -> BlipItmReranker:
        """Load the ITM half of a ``BlipForImageTextRetrieval`` checkpoint.

        Args:
            model: a local directory or hub id (resolved as :func:`crossrank.encoders.load_encoder`
                does: cache first, hub only when allowed).
            device: where to run.
            encoder_info: the index's encoder ``info``; when given, the checkpoint's config and
                weight fingerprints must match it.

        Returns:
            The reranker.

        Raises:
            ModelError: the model cannot be found, or is not a BLIP retrieval model.
            ModelMismatchError: the checkpoint is not the one ``encoder_info`` describes.
        """
        from transformers import BlipForImageTextRetrieval

        from crossrank.encoders._hf import load_weights, quiet_transformers
        from crossrank.encoders.blip import check_retrieval_config
        from crossrank.encoders.fingerprint import config_sha256, weight_files, weights_sha256
        from crossrank.encoders.loading import _read_config, resolve_model

        resolved = resolve_model(model)
        config = _read_config(resolved)
        check_retrieval_config(config, resolved.model_id)
        if encoder_info is not None:
            fingerprints = {
                "config_sha256": config_sha256(config),
                "weights_sha256": weights_sha256(weight_files(resolved.model_dir)),
            }
            if any(encoder_info.get(key) != value for key, value in fingerprints.items()):
                raise ModelMismatchError(
                    f"blip-itm loaded {resolved.model_id!r}, but its config or weights differ from "
                    f"the model the index was built with ({encoder_info.get('model_id')!r}); "
                    "rebuild the index or restore that model"
                )
        with quiet_transformers():
            retrieval = load_weights(
                BlipForImageTextRetrieval, resolved.model_dir, resolved.model_id
            )
        return cls(retrieval, device, model_id=resolved.model_id)

    def score(
        self,
        query: torch.Tensor | np.ndarray,
        query_mask: torch.Tensor | np.ndarray,
        patches: torch.Tensor | np.ndarray,
        patch_mask: torch.Tensor | np.ndarray | None = None,
        *,
        input_ids: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        """P(match) of one text query against its k candidates, in one batched forward.

        Args:
            query: the query's token features ``(n_tokens, token_dim)``; only their shape is used
                (checked against ``input_ids``): ITM reruns the text tower on the ids.
            query_mask: ``(n_tokens,)`` bool, True = a real token (the attention mask).
            patches: the candidates' stored vision tokens ``(k, 1 + P, vision_hidden)``, float16
                or float32.
            patch_mask: ``(k, 1 + P)`` bool; must be None or all True. BLIP's image attention mask
                is all ones, and transformers' BLIP text model (5.x) drops the encoder attention
                mask in its cross-attention (``BlipTextAttention`` never passes it on), so padded
                vision tokens could not be masked out.
            input_ids: ``(n_tokens,)`` integer token ids of the query
                (``TextFeatures.input_ids[i]``).

        Returns:
            ``(k,)`` float32 on the CPU, P(match) in [0, 1]. ``k == 0`` gives an empty tensor.

        Raises:
            InvalidArgumentError: ``input_ids`` is missing (an image query, or a caller that did not
                pass it) or has another length than ``query``; the patches are not of this model's
                vision hidden size; ``patch_mask`` masks some tokens out; or a shape check of
                :func:`check_rerank_inputs` fails.
        """
        import torch

        input_ids, query_mask, patches = self._check(
            query, query_mask, patches, patch_mask, input_ids
        )
        k = patches.shape[0]
        if k == 0:
            return torch.empty(0, dtype=torch.float32)
        device = self.device
        from crossrank.rerank.autocast import autocast, autocast_off

        with torch.inference_mode(), autocast(device, self.precision):
            hidden = self._text_forward(
                input_ids, query_mask, patches
            ).last_hidden_state  # (k, n_tokens, hidden)
            with autocast_off(device):
                logits = self.itm_head(hidden[:, 0].float())  # (k, 2)
                scores = logits.softmax(dim=-1)[:, 1]  # (k,)
        return scores.to("cpu", torch.float32)

    def explain(
        self,
        query: torch.Tensor | np.ndarray,
        query_mask: torch.Tensor | np.ndarray,
        patches: torch.Tensor | np.ndarray,
        patch_mask: torch.Tensor | np.ndarray | None = None,
        *,
        input_ids: torch.Tensor | np.ndarray | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Each query token's cross-attention over each candidate's stored vision tokens.

        The weights are transformers' own: the forward of :meth:`score` is run once more with
        ``output_attentions=True`` and the text encoder's ``cross_attentions`` of its last layer
        are averaged over heads. :meth:`score` is not touched, so explaining changes no score.
        Row ``i`` is the token ``input_ids[i]`` (the ITM input here keeps the tokenizer's
        ``[CLS]`` in row 0, as transformers does; the search leaves that special token out by
        its id). Each real token's row sums to 1 over all ``1 + P`` stored vision tokens, BLIP's
        class token (slot 0) included; the search's patch grid leaves that slot out, so a word's
        map on the grid sums to 1 minus its weight on the class token. Candidates go through in
        chunks of :attr:`explain_chunk`, since every layer's attentions are kept for a chunk.
        Arguments as :meth:`score`.

        Returns:
            ``(k, n_tokens, 1 + P)`` float32 on the CPU, rows in the order of ``input_ids``
            (padding tokens' rows all zero).

        Raises:
            InvalidArgumentError: as :meth:`score`.
        """
        import torch

        input_ids, query_mask, patches = self._check(
            query, query_mask, patches, patch_mask, input_ids
        )
        k, n_patches = patches.shape[:2]
        maps = torch.zeros((k, query_mask.shape[0], n_patches), dtype=torch.float32)
        if k == 0:
            return maps
        from crossrank.rerank.autocast import autocast

        with torch.inference_mode(), autocast(self.device, self.precision):
            for start in range(0, k, self.explain_chunk):
                out = self._text_forward(
                    input_ids,
                    query_mask,
                    patches[start : start + self.explain_chunk],
                    output_attentions=True,
                )
                # (chunk, heads, n_tokens, 1 + P), softmax rows of the last layer
                last = out.cross_attentions[-1]
                maps[start : start + last.shape[0]] = last.float().mean(dim=1).cpu()
        maps[:, ~query_mask.cpu()] = 0.0  # padding tokens attend too, but stand for nothing
        return maps

    def _check(
        self,
        query: torch.Tensor | np.ndarray,
        query_mask: torch.Tensor | np.ndarray,
        patches: torch.Tensor | np.ndarray,
        patch_mask: torch.Tensor | np.ndarray | None,
        input_ids: torch.Tensor | np.ndarray | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The checks of :meth:`score`; returns ``input_ids``, ``query_mask`` and ``patches`` as
        tensors."""
        import torch

        if input_ids is None:
            raise InvalidArgumentError(
                "blip-itm needs the query's token ids (input_ids=TextFeatures.input_ids[i]) "
                "and reranks text queries only; for an image query pass reranker='none'"
            )
        query, query_mask, patches, patch_mask = check_rerank_inputs(
            query, query_mask, patches, patch_mask, same_dim=False
        )
        input_ids = _as_tensor(input_ids, "input_ids")
        n_tokens = query_mask.shape[0]
        if (
            input_ids.dtype.is_floating_point
            or input_ids.dtype == torch.bool
            or tuple(input_ids.shape) != (n_tokens,)
        ):
            raise InvalidArgumentError(
                f"input_ids must be ({n_tokens},) integer token ids of the "
                f"query, got {input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
        patch_dim = patches.shape[2]
        if patch_dim != self.patch_dim:
            raise InvalidArgumentError(
                f"patches have dim {patch_dim}, but {self.model_id} cross-attends to vision "
                f"tokens of dim {self.patch_dim}; rerank an index built with the same BLIP model"
            )
        if patch_mask is not None and not bool(patch_mask.all()):
            raise InvalidArgumentError(
                "blip-itm attends to every stored vision token; a patch_mask "
                "with False entries is not supported (transformers' BLIP text "
                "model ignores the encoder attention mask); pass patch_mask=None"
            )
        return input_ids, query_mask, patches

    def _text_forward(
        self,
        input_ids: torch.Tensor,
        query_mask: torch.Tensor,
        patches: torch.Tensor,
        *,
        output_attentions: bool = False,
    ) -> Any:
        """The image-conditioned text encoder over ``k > 0`` candidates, in one batch: the
        query's ids broadcast to the k candidates; inputs checked. Call it under inference mode
        and :func:`~crossrank.rerank.autocast.autocast`."""
        import torch

        device = self.device
        k, n_patches = patches.shape[:2]
        n_tokens = input_ids.shape[0]
        ids = input_ids.to(device, torch.int64)[None].expand(k, n_tokens)  # (k, n_tokens)
        text_mask = query_mask.to(device, torch.int64)[None].expand(k, n_tokens)  # (k, n_tokens)
        image = patches.to(device, non_blocking=True)
        if device.type != "cuda":
            image = image.float()  # (k, 1 + P, vision_hidden); CPU half matmuls are slow, inexact
        image_mask = torch.ones((k, n_patches), dtype=torch.int64, device=device)  # as in BLIP
        extra = {"output_attentions": True} if output_attentions else {}
        return self.text_encoder(
            input_ids=ids,
            attention_mask=text_mask,
            encoder_hidden_states=image,
            encoder_attention_mask=image_mask,
            **extra,
        )


def blip_itm_for_index(
    device: Device | str, encoder_info: Mapping[str, Any] | None
) -> BlipItmReranker:
    """``get_reranker("blip-itm", ...)``: the ITM reranker of the model an index was built with.

    Raises:
        InvalidArgumentError: no ``encoder_info`` (blip-itm needs to know the index's model).
        ModelMismatchError: the index was not built with a BLIP model.
        ModelError: the model cannot be loaded as a BLIP retrieval model.
    """
    if encoder_info is None:
        raise InvalidArgumentError(
            "reranker 'blip-itm' loads the BLIP model an index was built "
            "with; pass encoder_info (the index manifest's encoder), search "
            "through Index, or use BlipItmReranker.from_pretrained(model)"
        )
    model_id = encoder_info.get("model_id")
    if encoder_info.get("model_type") != "blip":
        raise ModelMismatchError(
            "reranker 'blip-itm' needs an index built with a BLIP retrieval model, but this "
            f"one was built with {model_id!r} (model_type {encoder_info.get('model_type')!r}); "
            "use --reranker maxsim or a trained reranker"
        )
    if not isinstance(model_id, str) or not model_id:
        raise ModelError(
            "the index's encoder info has no model_id; blip-itm cannot tell which model to load"
        )
    return BlipItmReranker.from_pretrained(model_id, device, encoder_info=encoder_info)
