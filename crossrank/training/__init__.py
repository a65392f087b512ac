"""Training: fine-tune a cross-attention reranker over frozen encoders, and train the demo encoder.

This package uses the core (an opened :class:`crossrank.Index`, the encoders, the rerankers) and
is never imported by it: only ``crossrank.training`` itself and ``crossrank.cli`` import it.

- :func:`train_reranker` (:mod:`crossrank.training.reranker`) trains a
  :class:`~crossrank.rerank.CrossAttentionReranker` on an index's images and a pairs file,
  configured by a :class:`RerankTrainConfig` (:mod:`crossrank.training.config`); the training set
  is built in :mod:`crossrank.training.data`, the steps in :mod:`crossrank.training.steps`, the
  resumable state in :mod:`crossrank.training.state`.
- :func:`train_encoder` (:mod:`crossrank.training.encoder`) trains the shipped demo encoder on the
  synthetic shapes world.

torch is imported only when training starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from crossrank.training.config import RerankLoss, RerankTrainConfig

if TYPE_CHECKING:
    from crossrank.training.encoder import EncoderTrainConfig, train_encoder
    from crossrank.training.reranker import TrainReport, export_checkpoint, train_reranker

__all__ = [
    "EncoderTrainConfig",
    "RerankLoss",
    "RerankTrainConfig",
    "TrainReport",
    "export_checkpoint",
    "train_encoder",
    "train_reranker",
]

_LAZY = {
    "EncoderTrainConfig": "crossrank.training.encoder",
    "train_encoder": "crossrank.training.encoder",
    "TrainReport": "crossrank.training.reranker",
    "export_checkpoint": "crossrank.training.reranker",
    "train_reranker": "crossrank.training.reranker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crossrank.training' has no attribute {name!r}")
