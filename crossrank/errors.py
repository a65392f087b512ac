"""The exceptions crossrank raises at its public boundary.

Every error a user can cause is a :class:`CrossrankError`; the CLI prints its message as one line
and exits 1. Messages name the argument, what was expected, what was got, and what to do.
"""

from __future__ import annotations

__all__ = [
    "CrossrankError",
    "InvalidArgumentError",
    "SourceError",
    "DecodeError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "IndexLockedError",
    "IndexWriteError",
    "IndexBusyError",
    "ModelError",
    "ModelMismatchError",
    "FilterError",
    "DependencyError",
    "some_of",
]


def some_of(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``names`` for a one-line message: ``"a, b, c and 4 more"``."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class CrossrankError(Exception):
    """Base class of every error crossrank raises on purpose."""


class InvalidArgumentError(CrossrankError, ValueError):
    """An argument has a value the call cannot use (``k <= 0``, an empty query, ...)."""


class SourceError(CrossrankError):
    """The images to index cannot be listed: missing folder, unreadable manifest, no ``path``."""


class DecodeError(CrossrankError):
    """One image file cannot be decoded; the build skips it and records the reason."""


class IndexNotFoundError(CrossrankError):
    """There is no committed index in the directory given."""


class IndexCorruptError(CrossrankError):
    """An index directory is inconsistent (counts disagree, files missing); raised by verify."""


class IndexLockedError(CrossrankError):
    """Another process writes the index (build, add, remove or compact); one writer at a time."""


class IndexWriteError(CrossrankError):
    """The operating system refused a write to an index: disk full, a read-only or unwritable
    folder, a path under a file. Raised ``from`` the ``OSError``; the last committed generation
    is intact, the writer lock released and the temporary files removed."""


class IndexBusyError(IndexNotFoundError):
    """The index directory has no committed index yet because its first build is running."""


class ModelError(CrossrankError):
    """A model cannot be loaded: not a supported architecture, or not available offline."""


class ModelMismatchError(CrossrankError):
    """A model other than the one an index was built with was asked to search it."""


class FilterError(CrossrankError, ValueError):
    """A ``where`` filter is malformed or names a column the metadata does not have."""


class DependencyError(CrossrankError, ImportError):
    """An optional dependency needed for this call is not installed."""
