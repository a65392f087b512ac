"""The reranker interface: what the search path calls to rescore one query's candidates.

A reranker sees only features: the query's token features and its candidates' stored patch
features. No image is decoded or re-encoded at query time. Every reranker (parameter-free MaxSim,
the trained cross-attention reranker, BLIP's pretrained ITM head) takes the same inputs and returns
one float32 score per candidate, higher is better.

A reranker that runs a model's own text tower rather than reading token features (``blip-itm``)
sets ``needs_input_ids = True``; :class:`crossrank.Index` then also passes the query's token ids,
``score(..., input_ids=TextFeatures.input_ids[i])``. Rerankers without the attribute are called
exactly as before.

A reranker that reads the text encoder's layer-0 token states beside the last layer's sets
``token_embeddings`` to their width (a cross-attention reranker trained with
``--token-embeddings``); :class:`crossrank.Index` then encodes the query with
``encode_text(..., token_embeddings=True)`` and passes ``TextFeatures.reranker_tokens()`` as
``query``, ``(n_tokens, token_embeddings + dim)``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from crossrank.device import Device
from crossrank.errors import InvalidArgumentError, ModelMismatchError

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Reranker", "RerankerName", "get_reranker", "check_rerank_inputs"]

logger = logging.getLogger(__name__)


class RerankerName(StrEnum):
    """The rerankers that can be asked for by name (``--reranker``)."""

    MAXSIM = "maxsim"
    BLIP_ITM = "blip-itm"
    NONE = "none"


@runtime_checkable
class Reranker(Protocol):
    """Scores one query against its k candidates, all candidates in one batched computation.

    Attributes:
        name: a short name for logs and reports, e.g. ``"maxsim"``.

    A reranker may also set a class attribute ``needs_input_ids = True`` and take a keyword
    ``input_ids`` (``(n_tokens,)`` int64 token ids of the query) in :meth:`score`, or an int
    ``token_embeddings`` > 0 to get the layer-0 token states in front of ``query``; see the
    module notes.
    """

    name: str

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
        ...


def get_reranker(
    spec: str | os.PathLike[str] | RerankerName | Reranker | None,
    device: Device | str = Device.AUTO,
    *,
    encoder_info: Mapping[str, Any] | None = None,
) -> Reranker | None:
    """Turn a ``--reranker`` value into a reranker.

    Args:
        spec: ``"maxsim"`` (case-insensitive), ``"blip-itm"`` (BLIP's image-text matching head,
            loaded from ``encoder_info``'s model), ``"none"`` or None for no reranking, the folder of
            a saved cross-attention reranker (a path; names win over a folder of the same name,
            write ``./maxsim`` for that), or a :class:`Reranker` instance, returned as it is.
        device: where a named or loaded reranker runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        encoder_info: the ``info`` of the encoder whose features will be reranked (an index
            manifest's ``encoder``); a loaded reranker's dims are checked against it.

    Returns:
        The reranker, or None when reranking is off.

    Raises:
        InvalidArgumentError: the name is not a known reranker nor a path, or the device is
            unavailable.
        ModelError: the path holds no loadable reranker (missing, corrupt or truncated files).
        ModelMismatchError: the loaded reranker's dims do not fit ``encoder_info``; ``blip-itm``
            on an index not built with BLIP; ``maxsim`` on a BLIP index (its token and patch
            features are in different spaces).

    Example:
        >>> get_reranker("none") is None
        True
    """
    if spec is None:
        return None
    if isinstance(spec, os.PathLike):
        return _load(spec, device, encoder_info)
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name == RerankerName.NONE:
            return None
        if name == RerankerName.MAXSIM:
            from crossrank.rerank.maxsim import MaxSimReranker

            if encoder_info is not None and encoder_info.get("model_type") == "blip":
                raise ModelMismatchError(
                    f"reranker 'maxsim' cannot rerank an index built with BLIP ({encoder_info.get('model_id')!r}): "
                    "its text tokens and stored vision tokens are not in one space; use --reranker blip-itm"
                )
            return MaxSimReranker(device=device)
        if name == RerankerName.BLIP_ITM:
            from crossrank.rerank.blip_itm import blip_itm_for_index

            return blip_itm_for_index(device, encoder_info)
        if _looks_like_path(spec):
            return _load(spec, device, encoder_info)
        choices = ", ".join(m.value for m in RerankerName)
        raise InvalidArgumentError(
            f"reranker must be one of {choices}, got {spec!r}, or the folder of a saved "
            "cross-attention reranker (no such folder exists)"
        )
    if isinstance(spec, Reranker):
        return spec
    raise InvalidArgumentError(
        f"reranker must be a name ({', '.join(m.value for m in RerankerName)}), a folder of a "
        "saved reranker, None, or an object with a `name` and a `score(query, query_mask, patches, "
        f"patch_mask)` method; got {type(spec).__name__}"
    )


def _looks_like_path(spec: str) -> bool:
    """A string names a folder if one exists there or it is written like a path."""
    return (
        Path(spec).expanduser().exists()
        or os.sep in spec
        or (os.altsep is not None and os.altsep in spec)
        or spec.startswith((".", "~"))
    )


def _load(path: str | os.PathLike[str], device: Device | str,
          encoder_info: Mapping[str, Any] | None) -> Reranker:
    from crossrank.rerank.checkpoint import load_reranker

    return load_reranker(Path(path).expanduser(), device, encoder_info=encoder_info)


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
