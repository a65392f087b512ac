"""Reading and writing TREC qrels and run files.

Formats (whitespace-separated, one judgment or hit per line; blank lines are skipped):

- qrels: ``qid iter docid rel`` (``iter`` is conventionally ``0`` and ignored; ``rel`` an int);
- run: ``qid Q0 docid rank score tag``.

Ranks and ties. In crossrank a ranking is a list, best first. Tools that read run files (ranx,
trec_eval) ignore the rank column and order each query's docs by score, breaking ties their own
way (trec_eval by docid, ranx by an unstable sort). So :func:`write_run` requires each query's
scores to be non-increasing in list order, and writes tied scores nudged down by one float64 ulp
per position (``1.0, 1.0`` becomes ``1.0, 0.9999999999999999``): the file's scores are strictly
decreasing and every tool reads back the list order. Scores are written with ``repr`` and so read
back exactly. :func:`read_run` orders each query by score, highest first, and breaks exact ties by
the rank column, then by line order.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from crossrank.errors import InvalidArgumentError

__all__ = ["read_qrels", "write_qrels", "read_run", "write_run"]

logger = logging.getLogger(__name__)


def _lines(path: str | Path, what: str) -> list[tuple[int, list[str]]]:
    """The non-blank lines of a text file, split on whitespace, with 1-based line numbers."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{what} file {path} cannot be read: {e}") from e
    rows = [(n, line.split()) for n, line in enumerate(text.splitlines(), start=1)]
    rows = [(n, fields) for n, fields in rows if fields]
    if not rows:
        raise InvalidArgumentError(f"{what} file {path} is empty")
    return rows


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Read a TREC qrels file, ``qid iter docid rel`` per line.

    Args:
        path: the qrels file.

    Returns:
        query id -> ``{doc id: rel}``, queries and docs in file order. Judgments with rel 0 (or
        below) are kept: :func:`~crossrank.evaluate.metrics.compute_metrics` treats them as not
        relevant and reports queries that have no relevant doc.

    Raises:
        InvalidArgumentError: the file is missing, unreadable or empty; a line does not have 4
            fields or its rel is not an int; a (qid, docid) pair is judged twice. Each message
            names the file and the line.
    """
    qrels: dict[str, dict[str, int]] = {}
    for n, fields in _lines(path, "qrels"):
        where = f"qrels file {path}, line {n}"
        if len(fields) != 4:
            raise InvalidArgumentError(
                f"{where}: expected 4 fields `qid 0 docid rel`, "
                f"got {len(fields)}: {' '.join(fields)!r}"
            )
        qid, _, docid, rel_text = fields
        try:
            rel = int(rel_text)
        except ValueError:
            raise InvalidArgumentError(f"{where}: rel must be an int, got {rel_text!r}") from None
        judged = qrels.setdefault(qid, {})
        if docid in judged:
            raise InvalidArgumentError(f"{where}: query {qid!r} judges doc {docid!r} a second time")
        judged[docid] = rel
    return qrels


def read_run(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """Read a TREC run file, ``qid Q0 docid rank score tag`` per line.

    Args:
        path: the run file.

    Returns:
        query id -> ``[(doc id, score), ...]`` best first: by score, highest first, exact ties
        broken by the rank column, then by line order. Queries in file order.

    Raises:
        InvalidArgumentError: the file is missing, unreadable or empty; a line does not have 6
            fields, its rank is not an int or its score not a number (NaN included); a query lists
            a doc twice. Each message names the file and the line.
    """
    entries: dict[str, list[tuple[float, int, int, str]]] = {}
    seen: dict[str, dict[str, int]] = {}
    for n, fields in _lines(path, "run"):
        where = f"run file {path}, line {n}"
        if len(fields) != 6:
            raise InvalidArgumentError(
                f"{where}: expected 6 fields `qid Q0 docid rank score tag`, got {len(fields)}: "
                f"{' '.join(fields)!r}"
            )
        qid, _, docid, rank_text, score_text, _ = fields
        try:
            rank = int(rank_text)
        except ValueError:
            raise InvalidArgumentError(f"{where}: rank must be an int, got {rank_text!r}") from None
        try:
            score = float(score_text)
        except ValueError:
            raise InvalidArgumentError(
                f"{where}: score must be a number, got {score_text!r}"
            ) from None
        if math.isnan(score):
            raise InvalidArgumentError(f"{where}: score is NaN")
        first = seen.setdefault(qid, {}).setdefault(docid, n)
        if first != n:
            raise InvalidArgumentError(
                f"{where}: query {qid!r} lists doc {docid!r} again (first at line {first})"
            )
        entries.setdefault(qid, []).append((-score, rank, n, docid))
    return {
        qid: [(docid, -neg) for neg, _, _, docid in sorted(rows)] for qid, rows in entries.items()
    }


def _check_token(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise InvalidArgumentError(
            f"{what} must be a non-empty str without whitespace "
            f"(TREC files are whitespace-separated), got {value!r}"
        )
    return value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_run(
    path: str | Path,
    run: Mapping[str, Sequence[tuple[str, float]]],
    tag: str = "crossrank",
) -> Path:
    """Write a TREC run file, ``qid Q0 docid rank score tag`` per line.

    Ranks are list positions from 1. Tied scores are nudged down by one float64 ulp per position
    so the file's scores strictly decrease in list order (see the module docstring); a query with
    an empty list writes no line (TREC cannot express it; metrics score it as a missing query).
    The file is written to a temporary sibling and renamed into place; parent folders are made.

    Args:
        path: the run file to write (replaced if it exists).
        run: query id -> ``[(doc id, score), ...]`` best first, scores non-increasing.
        tag: the run name in the last column.

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: an id or the tag is empty or holds whitespace; a score is not a
            finite number; a query's scores increase down its list; a query lists a doc twice.
    """
    _check_token(tag, "tag")
    if not isinstance(run, Mapping):
        raise InvalidArgumentError(
            f"run must be a dict {{qid: [(docid, score), ...]}}, got {type(run).__name__}"
        )
    out: list[str] = []
    for qid, hits in run.items():
        _check_token(qid, "query id")
        previous_raw = math.inf
        previous_written = math.inf
        docids: set[str] = set()
        for rank, hit in enumerate(hits, start=1):
            if not isinstance(hit, (tuple, list)) or len(hit) != 2:
                raise InvalidArgumentError(
                    f"run[{qid!r}] rank {rank} must be a (docid, score) pair, got {hit!r}"
                )
            docid = _check_token(hit[0], f"run[{qid!r}] rank {rank} doc id")
            try:
                raw = float(hit[1])
            except (TypeError, ValueError):
                raise InvalidArgumentError(
                    f"run[{qid!r}] rank {rank}: score must be a number, got {hit[1]!r}"
                ) from None
            if not math.isfinite(raw):
                raise InvalidArgumentError(
                    f"run[{qid!r}] rank {rank}: score must be finite, got {raw}"
                )
            if raw > previous_raw:
                raise InvalidArgumentError(
                    f"run[{qid!r}]: the score at rank {rank} ({raw!r}) is higher than at rank "
                    f"{rank - 1} ({previous_raw!r}); list each query's hits best first, by the "
                    "score you write"
                )
            if docid in docids:
                raise InvalidArgumentError(
                    f"run[{qid!r}] lists doc {docid!r} twice (again at rank {rank})"
                )
            docids.add(docid)
            written = min(raw, math.nextafter(previous_written, -math.inf))
            out.append(f"{qid} Q0 {docid} {rank} {written!r} {tag}\n")
            previous_raw, previous_written = raw, written
    path = Path(path)
    _atomic_write(path, "".join(out))
    logger.debug("wrote %d run lines for %d queries to %s", len(out), len(run), path)
    return path


def write_qrels(path: str | Path, qrels: Mapping[str, Mapping[str, int]]) -> Path:
    """Write a TREC qrels file, ``qid 0 docid rel`` per line, in the mapping's order.

    Args:
        path: the qrels file to write (replaced if it exists); parent folders are made.
        qrels: query id -> ``{doc id: rel}``, rel an int.

    Returns:
        The path written.

    Raises:
        InvalidArgumentError: an id is empty or holds whitespace, or a rel is not an int.
    """
    out: list[str] = []
    for qid, judged in qrels.items():
        _check_token(qid, "query id")
        for docid, rel in judged.items():
            _check_token(docid, f"qrels[{qid!r}] doc id")
            if not isinstance(rel, numbers.Integral) or isinstance(rel, bool):
                raise InvalidArgumentError(
                    f"qrels[{qid!r}][{docid!r}] must be an int relevance, got {rel!r}"
                )
            out.append(f"{qid} 0 {docid} {int(rel)}\n")
    path = Path(path)
    _atomic_write(path, "".join(out))
    return path
