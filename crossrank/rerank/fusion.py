"""Fusing the first-stage score with the reranker's score into the final ranking score.

``--fusion`` takes one of:

- ``rerank``: ``final = rerank`` (the first stage only chooses the candidates);
- ``sum``: ``final = first_stage + rerank``;
- ``weighted:ALPHA``: ``final = ALPHA * rerank + (1 - ALPHA) * first_stage``, with ALPHA in
  [0, 1]; ``weighted:1`` is ``rerank``, ``weighted:0`` keeps the first-stage order, and
  ``weighted:0.5`` ranks as ``sum`` does (half of it);
- ``auto`` (the default of search and eval): what the reranker recommends, else ``rerank``. A
  reranker trained as a residual over the first stage (``crossrank train --first-stage-weight W``)
  recommends ``weighted:1/(1+W)``, which ranks exactly as its training loss scored.

The first-stage score is the inner product of normalised pooled vectors (a cosine) and MaxSim's is a
mean of cosines, so both lie in [-1, 1] and add without rescaling. The raw reranker score is always
reported beside the fused one.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

import numpy as np

from crossrank.errors import InvalidArgumentError

if TYPE_CHECKING:
    from crossrank.rerank.base import Reranker

__all__ = ["AUTO_FUSION", "Fusion", "FusionMode", "fuse", "parse_fusion", "resolve_fusion"]

logger = logging.getLogger(__name__)

AUTO_FUSION = "auto"  # the reranker's recommended fusion, else rerank


class FusionMode(StrEnum):
    """How the final score is made from the first-stage and rerank scores."""

    RERANK = "rerank"
    SUM = "sum"
    WEIGHTED = "weighted"


@dataclass(frozen=True)
class Fusion:
    """A parsed ``--fusion`` value.

    Attributes:
        mode: rerank, sum or weighted.
        alpha: the weight of the rerank score in ``weighted`` mode, in [0, 1]; None otherwise.

    Example:
        >>> f = Fusion.parse("weighted:0.7")
        >>> f.alpha, str(f)
        (0.7, 'weighted:0.7')
    """

    mode: FusionMode = FusionMode.RERANK  # how the two scores combine
    alpha: float | None = None  # weight of the rerank score, [0, 1]; weighted mode only

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mode", FusionMode(self.mode))
        except ValueError:
            raise InvalidArgumentError(
                f"fusion mode must be one of {', '.join(m.value for m in FusionMode)}, "
                f"got {self.mode!r}"
            ) from None
        if self.mode == FusionMode.WEIGHTED:
            if self.alpha is None or not (
                isinstance(self.alpha, numbers.Real)
                and not isinstance(self.alpha, bool)
                and math.isfinite(self.alpha)
                and 0.0 <= self.alpha <= 1.0
            ):
                raise InvalidArgumentError(
                    f"fusion 'weighted' needs alpha in [0, 1], got {self.alpha!r}; "
                    "e.g. weighted:0.5"
                )
            object.__setattr__(self, "alpha", float(self.alpha))
        elif self.alpha is not None:
            raise InvalidArgumentError(
                f"fusion {self.mode.value!r} takes no alpha, got alpha={self.alpha!r}; "
                "use weighted:ALPHA to weight the scores"
            )

    @classmethod
    def parse(cls, spec: str | Fusion) -> Fusion:
        """Parse ``rerank``, ``sum`` or ``weighted:ALPHA`` (case-insensitive, spaces ignored).

        Args:
            spec: the ``--fusion`` string, or a Fusion (returned as it is).

        Returns:
            The parsed Fusion.

        Raises:
            InvalidArgumentError: the mode is unknown, ALPHA is missing, not a number or outside
                [0, 1], or ALPHA is given to a mode that takes none.
        """
        if isinstance(spec, Fusion):
            return spec
        if not isinstance(spec, str):
            raise InvalidArgumentError(
                "fusion must be a string like 'rerank', 'sum' or 'weighted:0.5', "
                f"got {type(spec).__name__}"
            )
        text = "".join(spec.split()).lower()
        mode, sep, arg = text.partition(":")
        if mode not in {m.value for m in FusionMode}:
            raise InvalidArgumentError(
                f"fusion must be rerank, sum or weighted:ALPHA (ALPHA in [0, 1]), got {spec!r}"
            )
        if mode != FusionMode.WEIGHTED:
            if sep:
                raise InvalidArgumentError(
                    f"fusion {mode!r} takes no argument, got {spec!r}; "
                    "use weighted:ALPHA to weight the scores"
                )
            return cls(FusionMode(mode))
        try:
            alpha = float(arg)
        except ValueError:
            raise InvalidArgumentError(
                f"fusion 'weighted' needs a number ALPHA in [0, 1] after the colon, got {spec!r}; "
                "e.g. weighted:0.5"
            ) from None
        return cls(FusionMode.WEIGHTED, alpha)

    def __str__(self) -> str:
        if self.mode == FusionMode.WEIGHTED:
            return f"weighted:{self.alpha:g}"
        return self.mode.value

    def __call__(self, first_stage: np.ndarray, rerank: np.ndarray) -> np.ndarray:
        """Same as :meth:`apply`: a parsed Fusion is the fusing function."""
        return self.apply(first_stage, rerank)

    def apply(self, first_stage: np.ndarray, rerank: np.ndarray) -> np.ndarray:
        """Fuse the two scores of the same candidates.

        Args:
            first_stage: first-stage scores, any shape, e.g. ``(k,)`` or ``(m, k)``.
            rerank: rerank scores of the same candidates, the same shape.

        Returns:
            The final scores, float32, that shape. Sort with
            ``np.argsort(-final, kind="stable")`` so ties keep the first-stage order.

        Raises:
            InvalidArgumentError: the two shapes differ.
        """
        first_stage = np.asarray(first_stage, dtype=np.float32)
        rerank = np.asarray(rerank, dtype=np.float32)
        if first_stage.shape != rerank.shape:
            raise InvalidArgumentError(
                f"first_stage scores have shape {first_stage.shape} but rerank scores have shape "
                f"{rerank.shape}; fuse the scores of the same candidates"
            )
        if self.mode == FusionMode.RERANK:
            return rerank.copy()
        if self.mode == FusionMode.SUM:
            return first_stage + rerank
        alpha = np.float32(self.alpha)
        return alpha * rerank + (np.float32(1.0) - alpha) * first_stage


def parse_fusion(spec: str | Fusion) -> Fusion:
    """Parse a ``--fusion`` value once; the result is callable as ``fusion(first_stage, rerank)``.

    Args:
        spec: ``rerank``, ``sum`` or ``weighted:ALPHA``, or a parsed :class:`Fusion`.

    Returns:
        The parsed :class:`Fusion`.

    Raises:
        InvalidArgumentError: the spec does not parse (see :meth:`Fusion.parse`).

    Example:
        >>> parse_fusion("sum")(np.array([0.5]), np.array([0.25])).tolist()
        [0.75]
    """
    return Fusion.parse(spec)


def resolve_fusion(spec: str | Fusion, reranker: Reranker | None = None) -> Fusion:
    """Parse a ``--fusion`` value, resolving ``auto`` against the reranker that will run.

    Args:
        spec: ``auto``, ``rerank``, ``sum`` or ``weighted:ALPHA``, or a parsed :class:`Fusion`.
        reranker: the reranker; ``auto`` takes its ``fusion`` attribute (a spec string) when it
            has one, else ``rerank``.

    Returns:
        The parsed :class:`Fusion`.

    Raises:
        InvalidArgumentError: the spec, or the reranker's recommendation, does not parse.

    Example:
        >>> str(resolve_fusion("auto")), str(resolve_fusion("sum"))
        ('rerank', 'sum')
    """
    if isinstance(spec, str):
        text = "".join(spec.split()).lower()
        mode = text.partition(":")[0]
        if mode == AUTO_FUSION:
            if text != AUTO_FUSION:
                raise InvalidArgumentError(f"fusion 'auto' takes no argument, got {spec!r}")
            recommended = None if reranker is None else reranker.fusion
            return Fusion.parse(recommended) if recommended else Fusion()
        if mode not in {m.value for m in FusionMode}:
            raise InvalidArgumentError(
                "fusion must be auto, rerank, sum or "
                f"weighted:ALPHA (ALPHA in [0, 1]), got {spec!r}"
            )
    return Fusion.parse(spec)


def fuse(
    first_stage: np.ndarray, rerank: np.ndarray, fusion: str | Fusion = "rerank"
) -> np.ndarray:
    """Fuse first-stage and rerank scores of the same candidates (see the module docstring).

    Args:
        first_stage: first-stage scores, e.g. ``(k,)`` float32.
        rerank: rerank scores, the same shape.
        fusion: ``rerank``, ``sum`` or ``weighted:ALPHA``, or a parsed :class:`Fusion`.

    Returns:
        The final scores, float32, the same shape.

    Raises:
        InvalidArgumentError: the fusion spec does not parse, or the shapes differ.

    Example:
        >>> fuse(np.array([0.2, 0.8]), np.array([0.6, 0.4]), "weighted:0.5").tolist()
        [0.4000000059604645, 0.6000000238418579]
    """
    return Fusion.parse(fusion).apply(first_stage, rerank)
