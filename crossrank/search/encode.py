"""The encode stage of a search: texts and images to pooled vectors and token features."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from crossrank.errors import InvalidArgumentError

if TYPE_CHECKING:
    from PIL import Image

    from crossrank.encoders import Encoder

__all__ = ["Query", "encode_queries"]

#: A text, or an image (a PIL image, or a ``pathlib.Path`` to an image file) to search by image.
Query: TypeAlias = "str | Path | Image.Image"


def encode_queries(
    encoder: Encoder, dim: int, queries: Sequence[Query], token_embeddings: int = 0
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray | None], list[str]]:
    """Encode texts and images with ``encoder``; returns pooled ``(m, dim)``, per-query token
    features, masks and token ids (None for images and for encoders without ids), and labels.

    With ``token_embeddings`` (a reranker's width of layer-0 token states, 0 = none) a text's
    token features are ``TextFeatures.reranker_tokens()``, and an image query's patches get that
    many zero channels in front (an image has no layer-0 text states)."""
    from PIL import Image as PILImage

    from crossrank.ingest import decode_image, to_rgb

    texts: list[tuple[int, str]] = []
    images: list[tuple[int, Any]] = []
    labels: list[str] = []
    for i, query in enumerate(queries):
        if isinstance(query, str):
            if not query.strip():
                raise InvalidArgumentError("query is empty; give a text to search for, or an image")
            texts.append((i, query))
            labels.append(query)
        elif isinstance(query, Path):
            if not query.is_file():
                raise InvalidArgumentError(
                    f"query image {query} does not exist; give the path of an image file"
                )
            image, _ = decode_image(query)
            images.append((i, image))
            labels.append(str(query))
        elif isinstance(query, PILImage.Image):
            images.append((i, to_rgb(query)))
            labels.append(f"<image {query.width}x{query.height}>")
        else:
            raise InvalidArgumentError(
                "query must be a str (text), a pathlib.Path or a "
                f"PIL image, got {type(query).__name__}"
            )
    m = len(queries)
    xq = np.empty((m, dim), dtype=np.float32)
    tokens: list[np.ndarray] = [np.empty(0)] * m
    masks: list[np.ndarray] = [np.empty(0)] * m
    input_ids: list[np.ndarray | None] = [None] * m
    if texts:
        # The keyword only when asked for: an Encoder need not take it (see Encoder.encode_text).
        extra = {"token_embeddings": True} if token_embeddings else {}
        feats = encoder.encode_text([t for _, t in texts], **extra)
        text_tokens = feats.reranker_tokens()  # feats.tokens without token embeddings
        for row, (i, _) in enumerate(texts):
            xq[i] = feats.pooled[row]
            tokens[i], masks[i] = text_tokens[row], feats.mask[row]
            if feats.input_ids is not None:
                input_ids[i] = feats.input_ids[row]
    if images:
        feats = encoder.encode_images([img for _, img in images])
        for row, (i, _) in enumerate(images):
            xq[i] = feats.pooled[row]
            tokens[i] = feats.patches[row]
            if token_embeddings:
                tokens[i] = np.concatenate(
                    [
                        np.zeros((tokens[i].shape[0], token_embeddings), dtype=tokens[i].dtype),
                        tokens[i],
                    ],
                    axis=-1,
                )
            masks[i] = np.ones(feats.patches.shape[1], dtype=bool)
    return xq, tokens, masks, input_ids, labels
