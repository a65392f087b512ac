"""Mixed precision for the rerankers: bf16 autocast on CUDA, on the CPU when asked, float32
islands."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

from crossrank.device import Precision, parse_precision
from crossrank.errors import InvalidArgumentError

__all__ = ["autocast", "autocast_off", "check_precision", "native_cpu_bf16"]

logger = logging.getLogger(__name__)


def autocast(
    device: torch.device, precision: Precision | str = Precision.AUTO
) -> contextlib.AbstractContextManager:
    """The autocast region a reranker's forward runs in on ``device`` at ``precision``.

    ``auto``: bf16 on CUDA (fp16 where bf16 is unsupported), nothing on the CPU; ``float32``:
    nothing; ``bfloat16``: bf16 on CUDA and on the CPU.
    """
    precision = parse_precision(precision)
    if precision == Precision.FLOAT32 or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    if device.type == "cpu":
        if precision == Precision.AUTO:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=torch.bfloat16)
    bf16 = precision == Precision.BFLOAT16 or torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16 if bf16 else torch.float16)


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Run a region in float32 even inside an autocast region (pooling, the score heads, the
    folded weight products): crossrank's own, or one a caller opened."""
    if device.type in ("cuda", "cpu"):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX-512 BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def check_precision(precision: Precision | str, device: torch.device) -> Precision:
    """``precision`` checked against ``device``: bf16 on a GPU without it is refused; on a CPU
    without native bf16 it runs (emulated, slower than float32), with a warning.

    Raises:
        InvalidArgumentError: not a precision, or bfloat16 on a GPU without bf16.
    """
    precision = parse_precision(precision)
    if precision != Precision.BFLOAT16:
        return precision
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InvalidArgumentError(
            f"precision bfloat16 was asked for, but {torch.cuda.get_device_name(device)} has no "
            "bf16; use --precision auto (fp16 autocast there) or float32"
        )
    if device.type == "cpu" and not native_cpu_bf16():
        logger.warning(
            "this CPU has no native bf16 (AVX-512 BF16 or AMX): --precision bfloat16 will run "
            "slower than float32; leave it at auto"
        )
    return precision
