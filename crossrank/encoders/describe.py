"""Which model an index was built with, in the words every output uses (CLI, JSON, page, HTTP).

The shipped demo encoder is the default without ``--model``, and it is useless on photos: it was
trained on the synthetic shapes world only. Every place that names the encoder says so in one line
(:data:`DEMO_NOTE`), with what to do instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from crossrank.encoders.config import DEMO_MODEL

__all__ = ["DEMO_NOTE", "ModelDescription", "describe_model"]

#: The one line shown wherever the demo encoder is in use (tests check its numbers against the
#: shipped model's tokenizer and config).
DEMO_NOTE = (
    "the demo encoder: trained only on the synthetic shapes world (it knows 92 tokens and 16 text "
    "positions), not on photos; for real images build with --model and a CLIP, SigLIP or BLIP "
    "Hugging Face id or folder, e.g. --model openai/clip-vit-base-patch32"
)


@dataclass(frozen=True)
class ModelDescription:
    """The encoder of an index, for display.

    Attributes:
        model_id: the id or folder the index was built with (``crossrank-demo`` for the demo).
        model_type: ``clip`` or ``blip`` (``""`` when the manifest does not say).
        is_demo: the shipped demo encoder.
        note: :data:`DEMO_NOTE` for the demo encoder, else None.
    """

    model_id: str
    model_type: str
    is_demo: bool
    note: str | None

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-able values (``encoder`` in search, info and /healthz JSON)."""
        return {
            "model_id": self.model_id,
            "model_type": self.model_type,
            "demo": self.is_demo,
            "note": self.note,
        }


def describe_model(encoder_info: Mapping[str, Any]) -> ModelDescription:
    """Describe the encoder of an index from its manifest's ``encoder`` record.

    Example:
        >>> describe_model({"model_id": "crossrank-demo", "source": "demo"}).is_demo
        True
    """
    model_id = str(encoder_info.get("model_id", ""))
    is_demo = encoder_info.get("source") == "demo" or model_id == DEMO_MODEL
    return ModelDescription(
        model_id=model_id,
        model_type=str(encoder_info.get("model_type") or ""),
        is_demo=is_demo,
        note=DEMO_NOTE if is_demo else None,
    )
