"""Argument checks shared by the first stage and exact search, and the output convention."""

from __future__ import annotations

import numbers

import numpy as np

from crossrank.errors import InvalidArgumentError

__all__ = ["PAD_ID", "PAD_SCORE", "as_vectors", "check_k", "as_ids", "finish_results"]

#: Id of an empty result slot (fewer than k vectors qualified).
PAD_ID = -1
#: Score of an empty result slot: below every real inner product.
PAD_SCORE = float("-inf")


def as_vectors(
    x: object,
    name: str,
    d: int | None = None,
    expected: str | None = None,
    hint: str = "encode it with the index's model",
    *,
    finite: bool = True,
) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``(m, d)`` matrix of finite values.

    Args:
        x: array-like ``(m, d)``.
        name: the argument's name, for messages.
        d: the dim required, if any.
        expected: where ``d`` comes from, for the message (default:
            "the index was built with dim d").
        hint: what to do about a wrong dim, ending that message.
        finite: check that every value is finite (False: the caller checks what it computes).

    Raises:
        InvalidArgumentError: not 2-D, the wrong dim, or NaN / inf inside.
    """
    try:
        arr = np.ascontiguousarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"{name} must be a float matrix of shape (m, d), got {type(x).__name__}"
        ) from e
    if arr.ndim != 2:
        one = f"; pass {name}[None, :] for one vector" if arr.ndim == 1 else ""
        raise InvalidArgumentError(
            f"{name} must have shape (m, {'d' if d is None else d}), got shape {arr.shape}{one}"
        )
    if d is not None and arr.shape[1] != d:
        label = "query" if name == "xq" else name
        expected = expected or f"the index was built with dim {d}"
        raise InvalidArgumentError(f"{label} has dim {arr.shape[1]}, but {expected}; {hint}")
    if finite and arr.size and not np.isfinite(arr).all():
        raise InvalidArgumentError(f"{name} holds NaN or infinite values")
    return arr


def check_k(k: object) -> int:
    """``k`` as an int >= 1.

    Raises:
        InvalidArgumentError: ``k`` is not an integer or is < 1.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) < 1:
        raise InvalidArgumentError(f"k must be an int >= 1 (results per query), got {k!r}")
    return int(k)


def as_ids(ids: object, name: str, n: int | None = None) -> np.ndarray:
    """``ids`` as a 1-D int64 array of non-negative values (of length ``n`` when given).

    Raises:
        InvalidArgumentError: not 1-D integers, negative, or the wrong length.
    """
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise InvalidArgumentError(
            f"{name} must be a 1-D array of int64 ids, got {arr.dtype} of shape {arr.shape}"
        )
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if n is not None and len(arr) != n:
        raise InvalidArgumentError(f"{name} has {len(arr)} ids, but there are {n} vectors")
    if arr.size and arr.min() < 0:
        raise InvalidArgumentError(
            f"{name} must be >= 0 ({PAD_ID} marks an empty result slot), got {arr.min()}"
        )
    return arr


def finish_results(D: np.ndarray, I: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply the output convention: empty slots are (PAD_SCORE, PAD_ID), and each row is ordered
    by score descending, then id ascending (so ties come out the same everywhere).

    FAISS returns rows already ordered by score, so the sort runs only where a row is out of
    order (ties not by id, or the unordered candidates of exact search): the common case costs
    two comparisons per slot.

    Args:
        D: float ``(m, k)`` scores; modified in place when already float32.
        I: int ``(m, k)`` ids, negative for empty slots; modified in place when already int64.

    Returns:
        ``(D, I)``: float32 ``(m, k)`` and int64 ``(m, k)``.
    """
    D = np.asarray(D, dtype=np.float32)
    I = np.asarray(I, dtype=np.int64)
    empty = I < 0
    if empty.any():
        D[empty] = PAD_SCORE
        I[empty] = PAD_ID
    # Empty slots sort last: their score is -inf and their tie key the largest id.
    key = np.where(empty, np.iinfo(np.int64).max, I)
    later_better = (D[:, 1:] > D[:, :-1]) | ((D[:, 1:] == D[:, :-1]) & (key[:, 1:] < key[:, :-1]))
    if not later_better.any():
        return D, I
    order = np.lexsort((key, -D), axis=-1)
    return np.take_along_axis(D, order, axis=-1), np.take_along_axis(I, order, axis=-1)
