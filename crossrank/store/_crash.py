"""Named crash points for the crash-safety tests: ``CROSSRANK_CRASH_AT=NAME`` kills the process.

The writers (build, add, remove, compact and the generation commit they share) call
:func:`crash_point` at the moments a crash could leave something behind: segments written, the
generation renamed, the manifest switched, half-way through deleting an old generation. With the
environment variable unset (always, outside the tests) a call is one dictionary lookup.

``CROSSRANK_CRASH_AT=after-rename`` sends SIGKILL to the process the first time the point is
reached; ``CROSSRANK_CRASH_AT=encoded@3`` the third time. SIGKILL, not an exception: no ``finally``
block, ``__exit__`` or atexit handler runs, exactly as when the machine loses power or the OOM
killer strikes.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["CRASH_ENV", "CRASH_POINTS", "crash_point"]

CRASH_ENV = "CROSSRANK_CRASH_AT"

#: Every point the writers call, in the order a commit reaches them (see the callers for details).
CRASH_POINTS: tuple[str, ...] = (
    "lock-acquired",  # a writer holds the lock and has cleaned up after earlier crashes
    "add-hashed",  # add: the source files are hashed and compared with the index
    "segments-linked",  # add/remove: the previous generation's files are linked into the new one
    "encoded",  # build/add: a batch was encoded and its patches appended (reached once per batch)
    "compact-rewriting",  # compact: a chunk of live rows was copied (once per chunk)
    "segments-written",  # commit() was called: every segment is written, generation.json is not
    "generation-written",  # generation.json is written, nothing is fsynced yet
    "before-rename",  # everything is durable in the temporary folder
    # the generation folder has its final name; the manifest still names the old one
    "after-rename",
    "manifest-written",  # the new manifest is durable under its temporary name, not yet renamed
    "after-manifest",  # the new generation is committed; old generations not yet collected
    "gc-trashed",  # an old generation was renamed to a trash folder (once per generation)
    "gc-deleting",  # one file of a trash folder was deleted (once per file)
    "after-gc",  # old generations are gone; the lock is still held
)

_counts: dict[str, int] = {}
_lock = threading.Lock()


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when ``CROSSRANK_CRASH_AT`` names this point.

    Args:
        name: one of :data:`CRASH_POINTS`.
    """
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + 1
        hit = _counts[name]
    if hit >= (int(nth) if nth else 1):
        os.kill(os.getpid(), signal.SIGKILL)
