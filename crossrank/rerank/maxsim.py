"""MaxSim: parameter-free late interaction over stored patch features (ColBERT-style).

For one query with real tokens ``t_1 .. t_L`` and a candidate with real patches ``p_1 .. p_P``::

    score = mean_i  max_j  cos(t_i, p_j)

Each query token finds the patch that matches it best; the score is the average of those best
matches over the query's real tokens (Khattab & Zaharia, ColBERT, SIGIR 2020, with the sum replaced
by a mean so that scores of queries of different lengths share one scale, in [-1, 1]). Padding
tokens never enter the mean and padding patches never win the max.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from crossrank.device import Device, resolve_device
from crossrank.rerank.base import Reranker, RerankerName, check_rerank_inputs

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["MaxSimReranker"]

logger = logging.getLogger(__name__)

_EPS = 1e-12  # floor on L2 norms: an all-zero token or patch gets cosine 0, never NaN


class MaxSimReranker(Reranker):
    """Late-interaction MaxSim reranker; no parameters, nothing to train.

    All k candidates of a query are scored by one matrix product of the query's real tokens
    ``(L, dim)`` against the flattened patches ``(k * n_patches, dim)``: the query side is
    normalised once, never copied k times.

    Numerics: on CUDA, float16 / bfloat16 patches are multiplied as they are (the GPU accumulates
    in float32) and the product is cast to float32 before the patch norms, the max and the mean; on
    the CPU everything is float32, since half-precision matmuls there are slow and less exact.
    Cosines divide by each patch's norm after the product, so the stored patches are never
    rewritten (no normalised copy of the largest tensor).

    Args:
        device: where the scoring runs: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or
            ``cuda:N``. Inputs are moved there; scores come back on the CPU.

    Raises:
        InvalidArgumentError: the device is unknown or unavailable.

    Example:
        >>> import torch
        >>> rr = MaxSimReranker(device="cpu")
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> rr.score(q, torch.tensor([True, True]), p).tolist()
        [1.0]
    """

    name: str = RerankerName.MAXSIM.value

    def __init__(self, device: Device | str = Device.AUTO) -> None:
        self.device = resolve_device(device)

    def __repr__(self) -> str:
        return f"MaxSimReranker(device={str(self.device)!r})"

    def score(
        self,
        query: torch.Tensor | np.ndarray,
        query_mask: torch.Tensor | np.ndarray,
        patches: torch.Tensor | np.ndarray,
        patch_mask: torch.Tensor | np.ndarray | None = None,
    ) -> torch.Tensor:
        """Score one query against its k candidates.

        Args:
            query: token features of one query, ``(n_tokens, dim)``, float (need not be
                normalised).
            query_mask: ``(n_tokens,)`` bool, True = a real token.
            patches: the candidates' patch features, ``(k, n_patches, dim)``, float16 or float32
                (need not be normalised).
            patch_mask: ``(k, n_patches)`` bool, True = a real patch; None means all are real.

        Returns:
            ``(k,)`` float32 on the CPU: for each candidate, the mean over real tokens of the best
            cosine over its real patches, in [-1, 1]. ``k == 0`` gives an empty tensor.

        Raises:
            InvalidArgumentError: the inputs' shapes, dtypes or dims disagree, the query has no
                real token, or a candidate has no real patch.
        """
        import torch

        query, query_mask, patches, patch_mask = check_rerank_inputs(
            query, query_mask, patches, patch_mask
        )
        if patches.shape[0] == 0:
            return torch.empty(0, dtype=torch.float32)
        with torch.inference_mode():
            sims = self._similarities(query, query_mask, patches, patch_mask)  # (k, P, L)
            best = sims.amax(dim=1)  # (k, L)
            scores = best.mean(dim=1)  # (k,)
        return scores.to("cpu", torch.float32)

    def explain(
        self,
        query: torch.Tensor | np.ndarray,
        query_mask: torch.Tensor | np.ndarray,
        patches: torch.Tensor | np.ndarray,
        patch_mask: torch.Tensor | np.ndarray | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Each real token's best patch: a one-hot map per token and candidate.

        MaxSim has no attention to show; what decides its score is, per token, the one patch of
        highest cosine (the argmax, no softmax), so the map is 1 there and 0 elsewhere. Ties go
        to the first patch. Arguments as :meth:`score`.

        Returns:
            ``(k, n_tokens, n_patches)`` float32 on the CPU; padding tokens' rows are all zero.
        """
        import torch

        query, query_mask, patches, patch_mask = check_rerank_inputs(
            query, query_mask, patches, patch_mask
        )
        k, n_patches, _ = patches.shape
        maps = torch.zeros((k, query.shape[0], n_patches), dtype=torch.float32)
        if k == 0:
            return maps
        with torch.inference_mode():
            sims = self._similarities(query, query_mask, patches, patch_mask)  # (k, P, L)
            best = sims.argmax(dim=1).cpu()  # (k, L): each real token's best patch
        real = query_mask.cpu().nonzero().flatten()  # (L,) rows of the real tokens
        rows = maps[:, real]  # (k, L, P), a copy
        rows.scatter_(-1, best.unsqueeze(-1), 1.0)
        maps[:, real] = rows
        return maps

    def _similarities(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor,
        patches: torch.Tensor,
        patch_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(k, n_patches, L)`` float32 cosines of the real tokens with every patch, padding
        patches at the float32 minimum (they never win a max); inputs checked, ``k > 0``."""
        import torch
        import torch.nn.functional as F

        k, n_patches, dim = patches.shape
        on_cuda = self.device.type == "cuda"
        half = (torch.float16, torch.bfloat16)
        # The dtype the big matmul runs in: the patches' own half precision on CUDA; float32 else.
        mm_dtype = patches.dtype if on_cuda and patches.dtype in half else torch.float32
        # Padding tokens are dropped here, so they can neither enter the mean nor cost a FLOP.
        tokens = query.to(self.device, torch.float32)[query_mask.to(self.device)]  # (L, dim)
        tokens = F.normalize(tokens, dim=-1, eps=_EPS).to(mm_dtype)  # (L, dim)
        patches = patches.to(self.device, non_blocking=True)
        flat = patches.reshape(k * n_patches, dim).to(mm_dtype)  # (k * n_patches, dim)
        # Patch norms in float32 whatever the storage dtype: float16 sums of squares overflow.
        inv_norm = torch.linalg.vector_norm(flat, dim=-1, dtype=torch.float32)  # (k * P,)
        inv_norm = inv_norm.clamp_min(_EPS).reciprocal().view(k, n_patches, 1)
        sims = (flat @ tokens.T).float()  # (k * n_patches, L)
        sims = sims.view(k, n_patches, -1) * inv_norm  # (k, n_patches, L)
        if patch_mask is not None:
            keep = patch_mask.to(self.device).unsqueeze(-1)  # (k, n_patches, 1)
            sims = sims.masked_fill(~keep, torch.finfo(sims.dtype).min)
        return sims
