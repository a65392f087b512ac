"""Keep large CPU buffers in the process instead of handing them back to the OS after each use.

A reranker forward at k = 1000 allocates dozens of tensors of tens of MB. glibc serves each
allocation above its mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it with
``munmap`` when the tensor is freed, so every forward pays a page fault for every 4 KiB page it
touches again. On this project's 2-core machine the k = 1000 rerank of the demo reranker took
332-344 ms per query tuned against 340-463 ms with glibc's defaults (three runs each of
``benchmarks/bench_rerank_flops.py`` and ``--allocator default``, idle machine), and ~320 against
~420 ms while other jobs loaded the machine; at k = 100 the two are the same. PyTorch's
own CPU performance guide suggests swapping the allocator (jemalloc or tcmalloc with
``LD_PRELOAD``); :func:`keep_large_allocations` gets the same effect from glibc in-process with
``mallopt``: no mmap'd chunks, and free memory at the top of the heap kept up to 1 GiB.

The ``crossrank`` command line calls it at start-up. A library never changes its host process's
allocator on its own: a search backend that embeds crossrank calls it once itself, or sets the
equivalent environment variables before starting Python
(``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824``). The cost is memory: the process's
resident size stays near its peak instead of shrinking between queries.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["keep_large_allocations"]

logger = logging.getLogger(__name__)

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 1 << 30  # free memory kept at the top of the heap, bytes
_ENV_OPT_OUT = "CROSSRANK_ALLOCATOR"  # "default" leaves the allocator alone
_applied = False


def keep_large_allocations() -> bool:
    """Tell glibc's malloc to keep large freed buffers for reuse (see the module notes).

    Does nothing, and returns False, off Linux, on a C library without ``mallopt`` (musl), when
    the ``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables already choose,
    or when ``CROSSRANK_ALLOCATOR=default`` is set. Calling it again is harmless.

    Returns:
        True when the setting is (now or already) in effect.

    Example:
        >>> from crossrank.allocator import keep_large_allocations
        >>> keep_large_allocations() in (True, False)
        True
    """
    global _applied
    if _applied:
        return True
    if (
        sys.platform != "linux"
        or os.environ.get(_ENV_OPT_OUT, "").lower() == "default"
        or "MALLOC_MMAP_MAX_" in os.environ
        or "MALLOC_TRIM_THRESHOLD_" in os.environ
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the trim threshold first, so that a half-applied setting
    # never leaves mmap off with the default (small) trim threshold.
    if mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) != 1 or mallopt(_M_MMAP_MAX, 0) != 1:
        logger.debug("mallopt refused; the allocator is left as it is")
        return False
    _applied = True
    logger.debug("malloc: mmap off, trim threshold %d bytes", _TRIM_THRESHOLD)
    return True
