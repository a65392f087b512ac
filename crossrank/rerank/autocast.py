"""Mixed precision for the cross-attention reranker: bf16 autocast on CUDA, float32 islands."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["autocast", "autocast_off"]


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); nothing on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """Run a region in float32 even inside an autocast region (pooling, the score heads, the
    folded weight products): crossrank's own on CUDA, or one a caller opened on the CPU."""
    if device.type in ("cuda", "cpu"):
        with torch.autocast(device.type, enabled=False):
            yield
    else:
        yield
