"""Giving freed memory back to the system (shared by mtop and climber).

A busy tunnel allocates and frees buffers of up to 256 KiB for every read
and write.  glibc keeps freed memory for reuse and returns to the system
only what is free at the top of its heap, so after a burst of traffic a
process keeps its peak size even when every tunnel has gone idle: with 300
tunnels that had each echoed 1 MiB, about 400 KiB of RSS per tunnel stayed,
of which 35 KiB was in use.  `MemoryTrimmer` calls glibc's
``malloc_trim(0)`` every few seconds, which returns the free pages anywhere
in the heap (the same processes then held 46 KiB per tunnel); when there is
little to return it costs microseconds.  With a C library that has no
``malloc_trim``, it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any, Callable

from twisted.application.internet import TimerService

#: Seconds between trims.
TRIM_INTERVAL = 10.0


def malloc_trim() -> Callable[[], Any] | None:
    """glibc's ``malloc_trim(0)`` as a function of no arguments, or None
    where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


class MemoryTrimmer(TimerService):
    """Returns freed heap memory to the system every ``interval`` seconds
    on ``clock`` (a Service: it runs while the process serves)."""

    def __init__(self, clock: Any, interval: float = TRIM_INTERVAL, trim: Callable[[], Any] | None = None):
        self.trim = trim if trim is not None else malloc_trim()
        super().__init__(interval, self._trim)
        self.clock = clock

    def _trim(self) -> None:
        if self.trim is not None:
            self.trim()
