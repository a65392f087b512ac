"""Settings of an encoder: which model, on which device, in which precision, in what batches."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from crossrank.device import Device

__all__ = ["DEMO_MODEL", "VECTORS_ONLY_KEY", "Precision", "EncoderConfig"]

# The alias of the demo model that ships inside the package (crossrank/assets/demo-encoder/). Only
# this exact string is the alias: a directory of that name is reached as "./crossrank-demo".
DEMO_MODEL = "crossrank-demo"

#: The manifest ``encoder`` key that marks an index with no query encoder (built from arrays with
#: ``encoder_info=``): text and image queries are refused, vectors and ``Index.rerank`` of
#: vectors-only work.
VECTORS_ONLY_KEY = "vectors_only"


class Precision(StrEnum):
    """The dtype the encoder's weights and activations run in; outputs are always float32."""

    AUTO = "auto"  # fp16 on CUDA, fp32 on the CPU
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


@dataclass(frozen=True)
class EncoderConfig:
    """How to load and run an encoder.

    Example:
        >>> EncoderConfig(  # doctest: +SKIP
        ...     model="openai/clip-vit-base-patch32", device="cpu", batch_size=32
        ... )
    """

    model: str = DEMO_MODEL  # hub id, local Hugging Face directory, or the "crossrank-demo" alias
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto takes CUDA when there is one
    batch_size: int = 64  # images or texts per forward pass
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16; auto = fp16 on CUDA, fp32 on the CPU

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"EncoderConfig.model must be a non-empty string, got {self.model!r}")
        device = str(self.device).lower()
        if device not in {d.value for d in Device} and not device.startswith("cuda:"):
            raise ValueError(
                f"EncoderConfig.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(
                f"EncoderConfig.batch_size must be an int >= 1, got {self.batch_size!r}"
            )
        if str(self.dtype).lower() not in {p.value for p in Precision}:
            raise ValueError(
                "EncoderConfig.dtype must be one of "
                f"{', '.join(p.value for p in Precision)}, got {self.dtype!r}"
            )
