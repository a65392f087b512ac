"""Input checks of the cross-attention reranker: features must fit its config."""

from __future__ import annotations

import torch

from crossrank.errors import InvalidArgumentError
from crossrank.rerank.config import RerankerConfig
from crossrank.rerank.kv_cache import PatchKV

__all__ = ["check_batch", "check_dims"]


def check_batch(
    config: RerankerConfig,
    tokens: torch.Tensor,
    token_mask: torch.Tensor,
    patches: torch.Tensor | PatchKV,
    patch_mask: torch.Tensor | None,
    folded: bool,
    output: str,
    attend_to: torch.Tensor | None,
) -> tuple[torch.Tensor | None, int]:
    """Check :meth:`~crossrank.rerank.CrossAttentionReranker.forward_batch`'s inputs.

    Returns:
        The patch mask to use (a cache's own) and the patch count P.

    Raises:
        InvalidArgumentError: an input does not fit ``config`` or the others.
    """
    if output not in ("logits", "pooled"):
        raise InvalidArgumentError(f"output must be 'logits' or 'pooled', got {output!r}")
    if attend_to is not None and output != "logits":
        raise InvalidArgumentError("attend_to needs output='logits'")
    if isinstance(patches, PatchKV):
        if patch_mask is not None:
            raise InvalidArgumentError(
                "patch_mask must be None with a PatchKV: the cache carries the mask it was "
                "computed with"
            )
        patch_mask = patches.mask
        lead, n_patches = tuple(patches.keys[0].shape[:-3]), patches.keys[0].shape[-2]
        check_dims(config, tokens.shape[-1], config.patch_dim, n_patches)
    else:
        lead, n_patches = tuple(patches.shape[:-2]), patches.shape[-2]
        check_dims(config, tokens.shape[-1], patches.shape[-1], n_patches)
    if tokens.ndim != 3 or len(lead) != 2 or lead[0] != tokens.shape[0]:
        raise InvalidArgumentError(
            "forward_batch needs tokens (B, L, token_input_dim) and patches "
            f"(B, k, P, patch_dim) with the same B, got tokens {tuple(tokens.shape)} and "
            f"patches of leading shape {lead}"
        )
    if tuple(token_mask.shape) != tuple(tokens.shape[:2]) or token_mask.dtype != torch.bool:
        raise InvalidArgumentError(
            f"token_mask must be bool of shape {tuple(tokens.shape[:2])}, "
            f"got {token_mask.dtype} {tuple(token_mask.shape)}"
        )
    if patch_mask is not None and (
        tuple(patch_mask.shape) != (*lead, n_patches) or patch_mask.dtype != torch.bool
    ):
        raise InvalidArgumentError(
            f"patch_mask must be bool of shape {(*lead, n_patches)}, "
            f"got {patch_mask.dtype} {tuple(patch_mask.shape)}"
        )
    if attend_to is not None and (
        attend_to.ndim != 4 or tuple(attend_to.shape[:3]) != (*lead, n_patches)
    ):
        raise InvalidArgumentError(
            f"attend_to must have shape {(*lead, n_patches)} + (channels,), "
            f"got {tuple(attend_to.shape)}"
        )
    if not isinstance(patches, PatchKV) and folded and config.foldable_layers == 0:
        raise InvalidArgumentError(
            "path='folded' needs keys/values linear in the stored patches, but "
            "patch_self_attention=True puts a self-attention before layer 1; use path='plain' "
            "or precompute_kv()"
        )
    return patch_mask, n_patches


def check_dims(config: RerankerConfig, token_dim: int, patch_dim: int, n_patches: int) -> None:
    """Refuse token or patch features that do not fit ``config``.

    Raises:
        InvalidArgumentError: the dims or the patch count do not match.
    """
    if token_dim != config.token_input_dim or patch_dim != config.patch_dim:
        layer0 = (
            f" ({config.token_embeddings} layer-0 + {config.text_dim}: give "
            "TextFeatures.reranker_tokens() of encode_text(..., token_embeddings=True))"
            if config.token_embeddings
            else ""
        )
        raise InvalidArgumentError(
            f"the reranker was made for token dim {config.token_input_dim}{layer0} and patch dim "
            f"{config.patch_dim}, got token dim {token_dim} and patch dim {patch_dim}; use a "
            "reranker trained on the encoder the index was built with"
        )
    if config.patch_positions is not None and n_patches > config.patch_positions:
        raise InvalidArgumentError(
            f"the reranker has position embeddings for {config.patch_positions} patches, got "
            f"{n_patches} patches per candidate; use a reranker trained on this encoder"
        )
