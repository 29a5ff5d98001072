"""Reuse of freed host memory between the runs of a compiled step (XLA's CPU runtime).

Every run of a compiled function allocates its temporaries afresh and frees them at the end. glibc serves blocks over
32 MB with fresh mappings and unmaps them when freed, so on the CPU each training step page-faults every page of its
temporaries again (98,000 faults, about a fifth of the small config's full fine-tuning step). `keep_freed_memory`
makes glibc serve every block from its heap and keep what is freed there for the next step; memory already freed
stays with the process (at most 2 GiB of it at the heap's top) instead of going back to the system.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_SETTINGS = ((_M_ARENA_MAX, 1),  # one heap for all threads: XLA's worker threads allocate the step's buffers
             (_M_MMAP_MAX, 0),  # every block from the heap, none mapped afresh
             (_M_TRIM_THRESHOLD, 2**31 - 1),  # keep freed memory at the heap's top (up to 2 GiB)
             (_M_TOP_PAD, 64 << 20))  # grow the heap 64 MiB at a time
KEPT = "glibc heap kept between steps (mallopt)"


def keep_freed_memory() -> str:
    """Sets glibc's malloc to reuse freed memory (see the module docstring) and says what the process's malloc does.

    Call it before JAX creates its CPU backend (before the first `jax.devices()` or computation): worker threads
    started earlier keep their own heaps. Leaves malloc alone where `GLIBC_TUNABLES` sets malloc tunables (the user's
    choice) and where the C library is not glibc."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc" in tunables:
        return f"GLIBC_TUNABLES={tunables}"
    if not sys.platform.startswith("linux"):
        return "system malloc"
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return "system malloc (not glibc)"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    refused = [param for param, value in _SETTINGS if mallopt(param, value) != 1]
    return KEPT if not refused else f"glibc, partly set (mallopt refused parameters {refused})"
