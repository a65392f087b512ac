"""The one place faiss is imported, and the turning of its C++ errors into one-line reasons."""

from __future__ import annotations

import re
from types import ModuleType

from crossrank.errors import DependencyError

__all__ = ["import_faiss", "faiss_reason"]

_INSTALL_HINT = "pip install 'crossrank[cpu]' (or [gpu] on CUDA machines)"

# FAISS C++ exceptions read "Error in <signature> at <file>:<line>: <reason>"; some add "Error: ".
_FAISS_ERROR = re.compile(r"^Error in .*? at [^\s:]+:\d+: (?:Error: )?(?P<reason>.*)$", re.DOTALL)


def import_faiss() -> ModuleType:
    """Import faiss lazily, so that ``crossrank --help`` never pays for it.

    Returns:
        The ``faiss`` module (faiss-cpu or faiss-gpu: both install the same module).

    Raises:
        DependencyError: faiss is not installed.
    """
    try:
        import faiss
    except ImportError as e:
        raise DependencyError(
            f"the first stage needs faiss, which is not installed; {_INSTALL_HINT}"
        ) from e
    return faiss


def faiss_reason(error: BaseException) -> str:
    """The reason part of a FAISS exception, on one line (no C++ signature, file or line)."""
    text = str(error).strip()
    match = _FAISS_ERROR.match(text)
    if match:
        text = match.group("reason")
    return " ".join(text.split())
