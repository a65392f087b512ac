"""Choosing the torch device: ``auto`` takes CUDA when there is one."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from crossrank.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = ["Device", "resolve_device"]


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
