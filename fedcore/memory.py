"""Handing freed memory back to the operating system (glibc's ``malloc_trim``).

glibc keeps the pages of freed allocations for reuse, per arena: after a burst (a round's
evaluation on torch's threads, a cohort's uploads) a long-running process's resident set stays
at the burst's high-water mark and drifts upward as arenas fragment, though the memory is free.
Trimming after each burst makes the resident set what the process really holds. A no-op where
the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  # glibc only
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> None:
    """Returns the allocator's free pages to the OS (about 0.3 ms for a 300 MB process)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError):
            libc.malloc_trim(0)
