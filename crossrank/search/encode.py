"""The encode stage of a search: texts and images to pooled vectors and token features.

Queries are checked in two steps so that bad input fails before any model loads:
:func:`prepare_queries` checks every query and decodes the image files (no model), then
:func:`encode_queries` runs the encoder on what it prepared.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from crossrank.errors import InvalidArgumentError

if TYPE_CHECKING:
    from PIL import Image

    from crossrank.encoders import Encoder

__all__ = [
    "PreparedQueries",
    "Query",
    "QueryTruncatedWarning",
    "encode_queries",
    "prepare_queries",
    "token_strings",
    "truncation_note",
]

#: A text, or an image (a PIL image, or a ``pathlib.Path`` to an image file) to search by image.
Query: TypeAlias = "str | Path | Image.Image"


class QueryTruncatedWarning(UserWarning):
    """A text query was longer than the text encoder's positions and was cut: its end was not
    read. Issued once per such query (the message names the query and the limit)."""


@dataclass(frozen=True)
class PreparedQueries:
    """Queries checked and, for image files, decoded: what :func:`encode_queries` encodes.

    Attributes:
        texts: ``(position, text)`` of the text queries.
        images: ``(position, RGB PIL image)`` of the image queries.
        labels: each query's label in the result (the text, the image path, or ``<image WxH>``).
    """

    texts: list[tuple[int, str]]
    images: list[tuple[int, Any]]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def is_image(self, position: int) -> bool:
        """Whether the query at ``position`` is an image."""
        return any(i == position for i, _ in self.images)

    def subset(self, positions: Sequence[int]) -> PreparedQueries:
        """The queries at ``positions``, renumbered from 0 in that order."""
        new = {old: n for n, old in enumerate(positions)}
        return PreparedQueries(
            texts=[(new[i], t) for i, t in self.texts if i in new],
            images=[(new[i], im) for i, im in self.images if i in new],
            labels=[self.labels[i] for i in positions],
        )


def prepare_queries(queries: Sequence[Query]) -> PreparedQueries:
    """Check every query and decode the image files, loading no model.

    Raises:
        InvalidArgumentError: an empty text, a query of another type, an image path that does not
            exist, is a folder, or does not decode (each message names the query and what to give).
    """
    texts: list[tuple[int, str]] = []
    images: list[tuple[int, Any]] = []
    labels: list[str] = []
    for i, query in enumerate(queries):
        if isinstance(query, str):
            if not query.strip():
                raise InvalidArgumentError("query is empty; give a text to search for, or an image")
            try:
                query.encode("utf-8")
            except UnicodeEncodeError:
                # Bytes that are not UTF-8 reach Python as lone surrogates (argv, stdin); the
                # tokenizers reject them with a TypeError.
                raise InvalidArgumentError(
                    f"query {query!r} is not valid text: it holds bytes that are not UTF-8; "
                    "give the query as UTF-8 text"
                ) from None
            texts.append((i, query))
            labels.append(query)
        elif isinstance(query, Path):
            if query.is_dir():
                raise InvalidArgumentError(
                    f"query image {query} is a folder, not an image file; give the path of one "
                    "image file (to index a folder, use crossrank build or add)"
                )
            if not query.exists():
                raise InvalidArgumentError(
                    f"query image {query} does not exist; give the path of an image file"
                )
            if not query.is_file():
                raise InvalidArgumentError(
                    f"query image {query} is not a regular file; give the path of an image file"
                )
            from crossrank.errors import DecodeError
            from crossrank.ingest import decode_image

            try:
                image, _ = decode_image(query)
            except DecodeError as e:
                raise InvalidArgumentError(
                    f"query image {query} cannot be used: {e}; give a PNG, JPEG or other image file"
                ) from e
            images.append((i, image))
            labels.append(str(query))
        elif _is_pil_image(query):
            from crossrank.ingest import to_rgb

            images.append((i, to_rgb(query)))
            labels.append(f"<image {query.width}x{query.height}>")
        else:
            raise InvalidArgumentError(
                "query must be a str (text), a pathlib.Path or a "
                f"PIL image, got {type(query).__name__}"
            )
    return PreparedQueries(texts=texts, images=images, labels=labels)


def _is_pil_image(query: object) -> bool:
    """Whether ``query`` is a PIL image; a text-only search never imports PIL (a cold search)."""
    if "PIL.Image" not in sys.modules:  # no PIL image can exist before PIL.Image is imported
        return False
    from PIL import Image as PILImage

    return isinstance(query, PILImage.Image)


def truncation_note(query: str, max_tokens: int | None) -> str:
    """The one line said about a text query that was cut at the encoder's text positions."""
    shown = query if len(query) <= 60 else query[:57] + "..."
    limit = f"{max_tokens} tokens" if max_tokens else "its text positions"
    return (
        f"query {shown!r} is longer than the text encoder reads ({limit}); it was cut and its end "
        "was ignored: use a shorter query"
    )


def encode_queries(
    encoder: Encoder,
    dim: int,
    queries: Sequence[Query] | PreparedQueries,
    token_embeddings: int = 0,
) -> tuple[
    np.ndarray,
    list[np.ndarray],
    list[np.ndarray],
    list[np.ndarray | None],
    list[str],
    dict[int, str],
]:
    """Encode texts and images with ``encoder``; returns pooled ``(m, dim)``, per-query token
    features, masks and token ids (None for images and for encoders without ids), labels, and
    ``{position: note}`` for the text queries that were cut at the encoder's text positions.

    ``queries`` may be what :func:`prepare_queries` returned (checked and decoded already). A cut
    query also issues a :class:`QueryTruncatedWarning` (once per query).

    With ``token_embeddings`` (a reranker's width of layer-0 token states, 0 = none) a text's
    token features are ``TextFeatures.reranker_tokens()``, and an image query's patches get that
    many zero channels in front (an image has no layer-0 text states)."""
    prepared = queries if isinstance(queries, PreparedQueries) else prepare_queries(queries)
    texts, images, labels = prepared.texts, prepared.images, prepared.labels
    m = len(labels)
    xq = np.empty((m, dim), dtype=np.float32)
    tokens: list[np.ndarray] = [np.empty(0)] * m
    masks: list[np.ndarray] = [np.empty(0)] * m
    input_ids: list[np.ndarray | None] = [None] * m
    notes: dict[int, str] = {}
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
        # An encoder without the attribute (a foreign one) reports no cut queries.
        for row in getattr(feats, "truncated", ()) or ():
            i, text = texts[row]
            notes[i] = truncation_note(text, getattr(encoder, "max_text_len", None))
            warnings.warn(notes[i], QueryTruncatedWarning, stacklevel=2)
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
    return xq, tokens, masks, input_ids, labels, notes


#: Word-piece markers some tokenizers put on a token string (CLIP's end of word, GPT-2's and
#: SentencePiece's leading space, BERT's continuation); a person reads the word without them.
_PIECE_MARKS = ("</w>", "\u0120", "\u2581", "##")


def token_strings(encoder: Any, input_ids: np.ndarray | None, mask: np.ndarray) -> list[str | None]:
    """What a person reads for each token row of a text query: the word (piece) it stands for.

    Uses the encoder's ``tokenizer`` attribute: a transformers tokenizer
    (``convert_ids_to_tokens``), or a wrapper of a ``tokenizers.Tokenizer`` (``id_to_token``).
    Word-piece markers are stripped (``red</w>`` reads ``red``).

    Args:
        encoder: the encoder that encoded the query.
        input_ids: the query's ``(n_tokens,)`` token ids, or None (an encoder that gives none).
        mask: ``(n_tokens,)`` bool, True = a real token.

    Returns:
        One entry per row: the token's text, or None for padding and special tokens (begin, end,
        padding, class markers), which stand for no word. Without ids or a tokenizer, the real
        rows are named by position (``#0``, ``#1``, ...).
    """
    n = int(mask.shape[0])
    tok = getattr(encoder, "tokenizer", None)
    if input_ids is None or tok is None:
        return [f"#{i}" if mask[i] else None for i in range(n)]
    ids = [int(i) for i in input_ids]
    special: set[int] = set()
    if hasattr(tok, "convert_ids_to_tokens"):  # a transformers tokenizer
        strings = list(tok.convert_ids_to_tokens(ids))
        special = {int(i) for i in getattr(tok, "all_special_ids", ()) or ()}
    else:  # a wrapper holding a tokenizers.Tokenizer, or one itself
        inner = getattr(tok, "tokenizer", tok)
        to_token = getattr(inner, "id_to_token", None)
        if to_token is None:
            return [f"#{i}" if mask[i] else None for i in range(n)]
        strings = [to_token(i) for i in ids]
        added = getattr(inner, "get_added_tokens_decoder", None)
        if added is not None:
            special = {int(i) for i, t in added().items() if getattr(t, "special", False)}
    out: list[str | None] = []
    for row, (token_id, text) in enumerate(zip(ids, strings, strict=True)):
        if not mask[row] or token_id in special or text is None:
            out.append(None)
            continue
        for mark in _PIECE_MARKS:
            text = text.replace(mark, "")
        out.append(text or f"#{row}")
    return out
