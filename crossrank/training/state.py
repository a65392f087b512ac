"""A training run's state on disk: the checkpoint (atomic writes, checked on load) and the log.

``checkpoint.pt`` holds weights, optimizer, RNG states, the step and a fingerprint of the training
config, model config and data, so that a run only resumes from its own checkpoint;
``train_log.jsonl`` holds one JSON line per validation.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from crossrank.errors import InvalidArgumentError, ModelError

_CHECKPOINT_FORMAT = "crossrank-rerank-train"


class _TrainLog:
    """``train_log.jsonl``: one JSON line per validation; a resumed run drops later lines."""

    def __init__(self, path: Path, start: int) -> None:
        self.path = path
        self.entries: list[dict[str, Any]] = []
        if start > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if isinstance(entry, dict) and entry.get("step", math.inf) <= start:
                    self.entries.append(entry)
        self.path.write_text("".join(json.dumps(e) + "\n" for e in self.entries), encoding="utf-8")

    def append(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": _CHECKPOINT_FORMAT, **state}, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot write the checkpoint {path}: {e.strerror or e}") from e


def _load_checkpoint(
    path: Path,
    fingerprint: dict[str, Any] | None,
    defaults: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The checkpoint's state, after checking it belongs to this config and data (any run's when
    ``fingerprint`` is None).

    ``defaults`` maps a fingerprint section (``"config"``, ``"model"``) to its fields' default
    values: a field that a checkpoint of an older crossrank does not record matches while this
    run leaves it at its default (the behaviour the older code had), so that adding an option
    does not strand the runs in progress.
    """
    import torch

    fix = "delete it to train from scratch, or pick another --out"
    try:
        # weights_only: a checkpoint holds tensors and plain values; never run pickled code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as e:
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelError(f"checkpoint {path} is corrupt or truncated ({detail}); {fix}") from e
    if not isinstance(state, dict) or state.get("format") != _CHECKPOINT_FORMAT:
        raise ModelError(f"{path} is not a reranker training checkpoint; {fix}")
    theirs = state.get("fingerprint")
    if fingerprint is None:
        if not (isinstance(theirs, dict) and set(_FINGERPRINT_NAMES) - _LATER <= set(theirs)):
            raise ModelError(f"{path} does not record the run it belongs to; {fix}")
        return state
    if isinstance(theirs, dict):
        # Sections a checkpoint predates: it was written before they were recorded, so it
        # cannot be checked against them (the behaviour the older code had).
        theirs = {**{k: fingerprint[k] for k in _LATER & fingerprint.keys()}, **theirs}
    if isinstance(theirs, dict) and defaults:
        for section, values in defaults.items():
            ours, recorded = fingerprint.get(section), theirs.get(section)
            if isinstance(ours, dict) and isinstance(recorded, dict):
                # Fields this checkpoint predates, filled with their defaults; a run that sets
                # one of them differs from the old run, and still fails the comparison below.
                theirs[section] = {
                    **{k: values[k] for k in ours.keys() - recorded.keys() if k in values},
                    **recorded,
                }
    if theirs != fingerprint:
        parts = sorted(
            k
            for k in fingerprint
            if not isinstance(theirs, dict) or theirs.get(k) != fingerprint[k]
        )
        fields = _differing_fields(theirs, fingerprint, parts)
        if fields:
            fix = f"resume with the checkpoint's settings, {fix}"
        raise InvalidArgumentError(
            f"checkpoint {path} was written by a training run with another "
            f"{' and '.join(_FINGERPRINT_NAMES[p] for p in parts)}{fields}; {fix}"
        )
    return state


def _differing_fields(theirs: Any, ours: dict[str, Any], parts: list[str]) -> str:
    """`` (patch_positions: None in the checkpoint, 64 in this run; ...)`` for the config and
    model fields that differ (at most 4), or "" when there are none to name."""
    diffs = []
    for part in parts:
        recorded = theirs.get(part) if isinstance(theirs, dict) else None
        wanted = ours[part]
        if part == "data" or not isinstance(recorded, dict) or not isinstance(wanted, dict):
            continue
        for key in sorted(recorded.keys() | wanted.keys()):
            if recorded.get(key) != wanted.get(key):
                diffs.append(
                    f"{key}: {recorded.get(key)!r} in the checkpoint, {wanted.get(key)!r} in this "
                    "run"
                )
    if not diffs:
        return ""
    more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
    return f" ({'; '.join(diffs[:4])}{more})"


_FINGERPRINT_NAMES = {
    "config": "training config",
    "model": "model config",
    "data": "pairs file or index",
    "inputs": "init_from or teacher weights",
}
#: Fingerprint sections added after checkpoints first recorded one: a checkpoint without them
#: matches on them.
_LATER = {"inputs"}
