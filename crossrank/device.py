"""Choosing the torch device (``auto`` takes CUDA when there is one) and the precision rerankers
compute in."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from crossrank.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = ["Device", "Precision", "parse_precision", "resolve_device"]


class Device(StrEnum):
    """Where the torch work runs. ``AUTO`` picks CUDA when ``torch.cuda.is_available()``."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


def resolve_device(device: Device | str = Device.AUTO) -> torch.device:
    """Turn a :class:`Device` (or ``"cuda:1"``-style string) into a ``torch.device``.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The ``torch.device`` to place modules and tensors on.

    Raises:
        InvalidArgumentError: the device is unknown, or CUDA was asked for on a machine without it.
    """
    import torch

    name = str(device).lower()
    if name == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == Device.CPU:
        return torch.device("cpu")
    if name == Device.CUDA or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {name!r} was asked for, but torch sees no CUDA device on this machine; "
                "use --device cpu or --device auto"
            )
        return torch.device(name)
    raise InvalidArgumentError(f"device must be one of auto, cpu, cuda or cuda:N, got {device!r}")


class Precision(StrEnum):
    """The precision a reranker computes in (its scores are float32 in every case).

    ``AUTO``: bf16 autocast on CUDA (fp16 on a GPU without bf16), float32 on the CPU.
    ``FLOAT32``: float32 everywhere (the reference scores).
    ``BFLOAT16``: bf16 autocast on the CPU too, with pooling, the score heads and the folded
    weight products kept float32. Faster on a CPU with native bf16 (AVX-512 BF16 or AMX: Intel
    Sapphire Rapids, AMD Zen 4 and later); scores move slightly (docs/rerankers.md, Precision).
    """

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


def parse_precision(precision: Precision | str) -> Precision:
    """``precision`` as a :class:`Precision` (``bf16`` and ``fp32`` are accepted too).

    Raises:
        InvalidArgumentError: not a precision.
    """
    name = str(precision).strip().lower()
    name = {"bf16": Precision.BFLOAT16, "fp32": Precision.FLOAT32}.get(name, name)
    try:
        return Precision(name)
    except ValueError:
        choices = ", ".join(p.value for p in Precision)
        raise InvalidArgumentError(
            f"precision must be one of {choices}, got {precision!r}"
        ) from None
