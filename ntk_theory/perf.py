"""Process-level performance switches (opt-in; awt never changes them by itself).

Large kernels allocate block-sized temporaries and fresh outputs. glibc's ``malloc`` hands
blocks above its (dynamic) mmap threshold straight back to the operating system when they are
freed, so the next call faults every page in again. On some virtual machines a minor fault
costs over a microsecond: on this project's 2-core VM the closed-form CNTK of the README
(N = 64, Flatten) took 36.7 ms per call in a loop with 14,800 faults per call, and 20.5 ms with
170 faults after :func:`keep_freed_memory`; the L=4 ReLU MLP NTK with N = 2000 took 72.6 ms
with 18,600 faults per call, and 50 ms without faults. XLA (neural-tangents) keeps its memory
pooled by design; this gives torch's CPU allocations the same behaviour.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 * 2 ** 20, trim_threshold: int = 2 ** 31 - 1) -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    Sets ``M_MMAP_THRESHOLD`` (blocks below it come from the heap, 32 MiB by default, glibc's
    maximum) and ``M_TRIM_THRESHOLD`` (free heap memory kept before trimming) with ``mallopt``.
    This trades resident memory (freed blocks stay mapped, up to ``trim_threshold``) for
    fewer page faults in repeated kernel computations; it affects the whole process and lasts
    until changed. Equivalent to starting Python with ``MALLOC_MMAP_THRESHOLD_`` and
    ``MALLOC_TRIM_THRESHOLD_`` set. Returns True if both settings were accepted, False where
    there is no glibc (macOS, Windows, musl) or glibc refused a value.
    """
    for v, name in ((mmap_threshold, "mmap_threshold"), (trim_threshold, "trim_threshold")):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 2 ** 31 - 1:
            raise ValueError(f"{name}: expected an int in [0, 2**31 - 1] bytes, got {v!r}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
