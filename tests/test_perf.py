"""ntk_theory.perf: the opt-in allocator switch keeps freed blocks in the process.

The property is measured through glibc's own accounting (``mallinfo2``), which is deterministic
for a given sequence of allocations: with the switch an 8 MiB block (a kernel-sized temporary)
comes from the heap and stays there once freed, so the next call reuses its pages; without it the
block is an mmap of its own, unmapped on ``free``, and every call faults its pages in again. The
page-fault counts that follow from this (README: 14,800 -> 170 per CNTK call) are a timing-like
figure that the machine's load moves, so they are reported by the benchmarks, not asserted here.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import subprocess
import sys
import textwrap

import pytest

from ntk_theory.perf import keep_freed_memory

_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    from ntk_theory.perf import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    info = lambda: {k: getattr(libc.mallinfo2(), k) for k in ("arena", "hblkhd", "fordblks")}
    accepted = keep_freed_memory() if sys.argv[1] == "on" else None
    size = 8 * 2 ** 20
    before = info()
    if sys.argv[2] == "malloc":   # the mechanism: one malloc'd block, touched, then freed
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        during = info()
        libc.free(p)
    else:                         # the use: a tensor (torch's CPU allocator goes through posix_memalign)
        t = torch.ones(size // 8, dtype=torch.float64)
        during = info()
        del t
    # one allocation per process: glibc raises its dynamic mmap threshold after freeing a mapped block
    print(json.dumps({"accepted": accepted, "info": [before, during, info()]}))
""")


def _glibc_with_mallinfo2() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return hasattr(libc, "mallinfo2")
    except OSError:
        return False


def _probe(mode: str, what: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, what], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not (sys.platform.startswith("linux") and _glibc_with_mallinfo2()),
                    reason="glibc mallopt/mallinfo2 (Linux, glibc >= 2.33) only")
@pytest.mark.parametrize("what", ["malloc", "torch"])
def test_keep_freed_memory_keeps_freed_blocks_in_the_heap(what):
    # Was: asserted `faults_on < 0.1 * faults_off` on page-fault counts of a CNTK loop, which a busy machine moved
    # (3901 faults off, 576 on: failed); now the allocator's own, load-independent accounting
    size = 8 * 2 ** 20
    off, on = _probe("off", what), _probe("on", what)
    assert off["accepted"] is None and on["accepted"] is True
    (b0, d0, a0), (b1, d1, a1) = off["info"], on["info"]
    # off: glibc's default mmap threshold (128 KiB in a fresh process) maps the block on its own and unmaps it
    assert d0["hblkhd"] - b0["hblkhd"] >= size, off
    assert a0["hblkhd"] == b0["hblkhd"], off
    # on: the block comes from the heap (no new mapping) and its memory stays there, free, after the free
    assert d1["hblkhd"] == b1["hblkhd"], on
    assert d1["arena"] - b1["arena"] >= size or b1["fordblks"] >= size, on
    assert a1["arena"] == d1["arena"] and a1["fordblks"] >= size, on


def test_keep_freed_memory_validates_its_arguments():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=-1)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=2 ** 40)
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=True)
