"""The reranker interface: what the search path calls to rescore one query's candidates.

A reranker sees only features: the query's token features and its candidates' stored patch
features. No image is decoded or re-encoded at query time. Every reranker (parameter-free MaxSim,
the trained cross-attention reranker, BLIP's pretrained ITM head) subclasses :class:`Reranker`,
takes the same inputs and returns one float32 score per candidate, higher is better. The registry
that builds one by name or folder is :mod:`crossrank.rerank.registry`.

Besides :meth:`Reranker.score`, the interface declares what the search path asks of a reranker,
each with the default a plain reranker has:

- ``needs_input_ids`` (False): a reranker that runs a model's own text tower rather than reading
  token features (``blip-itm``) sets it; the search path then also passes the query's token ids,
  ``score(..., input_ids=TextFeatures.input_ids[i])``.
- ``token_embeddings`` (0): the width of the text encoder's layer-0 token states the reranker
  reads beside the last layer's (a cross-attention reranker trained with ``--token-embeddings``);
  the search path then encodes the query with ``encode_text(..., token_embeddings=True)`` and
  passes ``TextFeatures.reranker_tokens()`` as ``query``, ``(n_tokens, token_embeddings + dim)``.
- ``fusion`` (None): the ``--fusion`` the reranker recommends (a trained checkpoint records it);
  ``fusion="auto"`` uses it.
- ``precision`` (``auto``): the :class:`~crossrank.device.Precision` a torch reranker computes
  in; :func:`~crossrank.rerank.get_reranker` sets it on the rerankers it builds. The
  cross-attention and BLIP ITM rerankers honour it; MaxSim computes in float32 always.
- :meth:`Reranker.explain` (None): where each query token looked in each candidate, one map over
  the candidate's patches per token (``search(..., explain=True)``); a reranker that cannot say
  keeps the default, and the search then adds a one-line note instead of maps.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from crossrank.device import Precision
from crossrank.errors import InvalidArgumentError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Reranker", "RerankerName", "check_rerank_inputs"]

logger = logging.getLogger(__name__)


class RerankerName(StrEnum):
    """The rerankers that can be asked for by name (``--reranker``)."""

    MAXSIM = "maxsim"
    BLIP_ITM = "blip-itm"
    NONE = "none"


class Reranker(ABC):
    """Scores one query against its k candidates, all candidates in one batched computation.

    Subclass it and implement :meth:`score`; override the other members only to change their
    defaults (see the module notes).

    Attributes:
        name: a short name for logs and reports, e.g. ``"maxsim"``.
        needs_input_ids: :meth:`score` takes a keyword ``input_ids``, the query's ``(n_tokens,)``
            int64 token ids (None for an image query).
        token_embeddings: width of the layer-0 token states expected in front of ``query``
            (0: none).
        fusion: the fusion this reranker recommends for ``fusion="auto"``; None = the default.
        precision: what a torch reranker computes in (see the module notes).
    """

    name: str = "reranker"
    needs_input_ids: ClassVar[bool] = False
    token_embeddings: int = 0
    fusion: str | None = None
    precision: Precision = Precision.AUTO

    @abstractmethod
    def score(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        patches: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Score one query against k candidates.

        Args:
            query: token features of one query, ``(n_tokens, dim)``, float.
            query_mask: ``(n_tokens,)`` bool, True = a real token, False = padding.
            patches: the candidates' patch features, ``(k, n_patches, dim)``, float16 or float32.
            patch_mask: ``(k, n_patches)`` bool, True = a real patch; None means all are real.

        Returns:
            ``(k,)`` float32 scores on the CPU, higher is better, in the order of ``patches``.
        """

    def explain(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        patches: torch.Tensor,
        patch_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """Where each query token looked in each candidate: one weight per patch and token.

        Takes what :meth:`score` takes (a reranker with ``needs_input_ids`` also gets
        ``input_ids``). The search calls it only for the hits it returns, after scoring, so the
        maps never change a score.

        Returns:
            ``(k, n_tokens, n_patches)`` float32 on the CPU, the rows in the order of ``query``
            (padding tokens' rows all zero), or None: this reranker cannot explain (the default).
        """
        return None


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    """Accept a torch tensor or a numpy array (a read-only memory map too) without copying twice."""
    import numpy as np
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        # torch.from_numpy warns on read-only arrays (np.load(mmap_mode="r") slices); copy those.
        return torch.from_numpy(x if x.flags.writeable else np.array(x))
    raise InvalidArgumentError(
        f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}"
    )


def check_rerank_inputs(
    query: torch.Tensor | np.ndarray,
    query_mask: torch.Tensor | np.ndarray,
    patches: torch.Tensor | np.ndarray,
    patch_mask: torch.Tensor | np.ndarray | None = None,
    *,
    same_dim: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate one query's rerank inputs at the public boundary; shared by every reranker.

    Args:
        query: ``(n_tokens, dim)`` float token features.
        query_mask: ``(n_tokens,)`` bool, True = a real token.
        patches: ``(k, n_patches, dim)`` float patch features (float16 is fine).
        patch_mask: ``(k, n_patches)`` bool, True = a real patch, or None (all real).
        same_dim: require the token and patch dims to be equal (MaxSim compares them directly);
            a reranker that projects each modality itself passes False and checks its own dims.

    Returns:
        The four inputs as torch tensors (numpy arrays converted), on their original device.

    Raises:
        InvalidArgumentError: a shape, rank or dtype is not as above, the query and patch dims
            differ, the query has no real token, there are no patches, or a candidate has no real
            patch.
    """
    import torch

    query = _as_tensor(query, "query")
    query_mask = _as_tensor(query_mask, "query_mask")
    patches = _as_tensor(patches, "patches")
    if patch_mask is not None:
        patch_mask = _as_tensor(patch_mask, "patch_mask")

    if query.ndim != 2:
        raise InvalidArgumentError(
            "query must be (n_tokens, dim) token features of one query, "
            f"got shape {tuple(query.shape)}"
        )
    if patches.ndim != 3:
        raise InvalidArgumentError(
            f"patches must be (k, n_patches, dim) patch features of k candidates, "
            f"got shape {tuple(patches.shape)}"
        )
    if not query.is_floating_point() or not patches.is_floating_point():
        raise InvalidArgumentError(
            f"query and patches must be floating point, got {query.dtype} and {patches.dtype}"
        )
    n_tokens, dim = query.shape
    k, n_patches, patch_dim = patches.shape
    if same_dim and dim != patch_dim:
        raise InvalidArgumentError(
            f"query tokens have dim {dim}, but patches have dim {patch_dim}; token and patch "
            "features must come from the same encoder (the one the index was built with)"
        )
    if query_mask.dtype != torch.bool or tuple(query_mask.shape) != (n_tokens,):
        raise InvalidArgumentError(
            f"query_mask must be a bool tensor of shape ({n_tokens},) (True = real token), "
            f"got {query_mask.dtype} of shape {tuple(query_mask.shape)}"
        )
    if not bool(query_mask.any()):
        raise InvalidArgumentError(
            "query has no real token (query_mask is all False); an empty query cannot be reranked"
        )
    if n_patches == 0:
        raise InvalidArgumentError("patches has n_patches == 0; every candidate needs patches")
    if patch_mask is not None:
        if patch_mask.dtype != torch.bool or tuple(patch_mask.shape) != (k, n_patches):
            raise InvalidArgumentError(
                f"patch_mask must be a bool tensor of shape ({k}, {n_patches}) "
                f"(True = real patch), got {patch_mask.dtype} of shape {tuple(patch_mask.shape)}"
            )
        empty = (~patch_mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise InvalidArgumentError(
                f"candidates at positions {empty[:10]} have no real patch (patch_mask all False); "
                "drop them before reranking"
            )
    return query, query_mask, patches, patch_mask
