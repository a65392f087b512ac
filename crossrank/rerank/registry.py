"""The reranker registry: build a reranker from a ``--reranker`` value (a name or a folder).

The interface every reranker implements is :class:`crossrank.rerank.base.Reranker`; this module
imports the implementations (MaxSim, BLIP ITM, saved cross-attention checkpoints), which never
import it back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crossrank.device import Device, Precision, parse_precision
from crossrank.errors import InvalidArgumentError, ModelMismatchError
from crossrank.rerank.base import Reranker, RerankerName

__all__ = ["get_reranker"]

#: Encoders whose token and patch features live in different spaces (no contrastive loss ties a
#: text token to a patch), by model_type: MaxSim would compare unrelated vectors.
_NOT_ONE_SPACE = {"blip": "BLIP", "siglip": "SigLIP", "siglip2": "SigLIP 2"}


def get_reranker(
    spec: str | os.PathLike[str] | RerankerName | Reranker | None,
    device: Device | str = Device.AUTO,
    *,
    encoder_info: Mapping[str, Any] | None = None,
    precision: Precision | str = Precision.AUTO,
) -> Reranker | None:
    """Turn a ``--reranker`` value into a reranker.

    Args:
        spec: ``"maxsim"`` (case-insensitive), ``"blip-itm"`` (BLIP's image-text matching head,
            loaded from ``encoder_info``'s model), ``"none"`` or None for no reranking, the folder
            of a saved cross-attention reranker (a path; names win over a folder of the same name,
            write ``./maxsim`` for that), or a :class:`Reranker` instance, returned as it is
            (an object that only has a ``name`` and a ``score`` method is wrapped in a
            :class:`Reranker` with the interface's defaults).
        device: where a named or loaded reranker runs: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        encoder_info: the ``info`` of the encoder whose features will be reranked (an index
            manifest's ``encoder``); a loaded reranker's dims are checked against it.
        precision: what a named or loaded reranker computes in (:class:`Precision`: ``auto``,
            ``float32`` or ``bfloat16``); a :class:`Reranker` instance keeps its own.

    Returns:
        The reranker, or None when reranking is off.

    Raises:
        InvalidArgumentError: the name is not a known reranker nor a path, the device is
            unavailable, or the precision is unknown or unsupported there (bf16 on a GPU
            without it).
        ModelError: the path holds no loadable reranker (missing, corrupt or truncated files).
        ModelMismatchError: the loaded reranker's dims do not fit ``encoder_info``; ``blip-itm``
            on an index not built with BLIP; ``maxsim`` on a BLIP index (its token and patch
            features are in different spaces).

    Example:
        >>> get_reranker("none") is None
        True
    """
    precision = parse_precision(precision)  # a bad value fails before any model loads
    if spec is None:
        return None
    if isinstance(spec, os.PathLike):
        return _load(spec, device, encoder_info, precision)
    if isinstance(spec, str):
        name = spec.strip().lower()
        if name == RerankerName.NONE:
            return None
        if name == RerankerName.MAXSIM:
            from crossrank.rerank.maxsim import MaxSimReranker

            model_type = None if encoder_info is None else encoder_info.get("model_type")
            if model_type in _NOT_ONE_SPACE:
                raise ModelMismatchError(
                    f"reranker 'maxsim' cannot rerank an index built with "
                    f"{_NOT_ONE_SPACE[model_type]} ({encoder_info.get('model_id')!r}): its text "
                    "tokens and stored vision tokens are not in one space; "
                    + (
                        "use --reranker blip-itm"
                        if model_type == "blip"
                        else "train a cross-attention reranker (crossrank train) or use "
                        "--reranker none"
                    )
                )
            scorer = MaxSimReranker(device=device)  # float32 at any precision
            scorer.precision = precision
            return scorer
        if name == RerankerName.BLIP_ITM:
            from crossrank.rerank.autocast import check_precision
            from crossrank.rerank.blip_itm import blip_itm_for_index

            blip = blip_itm_for_index(device, encoder_info)
            blip.precision = check_precision(precision, blip.device)
            return blip
        if _looks_like_path(spec):
            return _load(spec, device, encoder_info, precision)
        choices = ", ".join(m.value for m in RerankerName)
        raise InvalidArgumentError(
            f"reranker must be one of {choices}, got {spec!r}, or the folder of a saved "
            "cross-attention reranker (no such folder exists)"
        )
    if isinstance(spec, Reranker):
        return spec
    if isinstance(getattr(spec, "name", None), str) and callable(getattr(spec, "score", None)):
        return _Wrapped(spec)
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


def _load(
    path: str | os.PathLike[str],
    device: Device | str,
    encoder_info: Mapping[str, Any] | None,
    precision: Precision | str,
) -> Reranker:
    from crossrank.rerank.checkpoint import load_reranker

    return load_reranker(
        Path(path).expanduser(), device, encoder_info=encoder_info, precision=precision
    )


class _Wrapped(Reranker):
    """A duck-typed reranker (a ``name`` and a ``score`` method) behind the interface: its own
    optional members where it has them, the interface's defaults otherwise."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.needs_input_ids = bool(getattr(inner, "needs_input_ids", False))  # type: ignore[misc]
        self.token_embeddings = int(getattr(inner, "token_embeddings", 0))
        self.fusion = getattr(inner, "fusion", None)

    def score(
        self, query: Any, query_mask: Any, patches: Any, patch_mask: Any = None, **extra: Any
    ) -> Any:
        return self.inner.score(query, query_mask, patches, patch_mask, **extra)
