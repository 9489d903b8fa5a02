"""ntk_theory.perf: the opt-in allocator switch cuts the page faults of repeated kernel calls."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ntk_theory.perf import keep_freed_memory

_LOOP = textwrap.dedent("""
    import resource, sys, torch
    from ntk_theory.infinite import serial, Conv, Relu, Flatten, Dense
    from ntk_theory.perf import keep_freed_memory
    if sys.argv[1] == "on":
        assert keep_freed_memory()
    img = torch.randn(64, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    k = serial(Conv(3), Relu(), Conv(3), Relu(), Flatten(), Dense())
    for _ in range(3):
        k(img)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        k(img)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 10)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_keep_freed_memory_removes_repeated_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", _LOOP, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())
    off, on = faults("off"), faults("on")
    # a CNTK call frees several ~5 MB temporaries: thousands of faults per call when glibc hands them
    # back to the OS (measured ~10,000), a few hundred at most when it keeps them
    assert off > 1000 and on < 0.1 * off, (off, on)


def test_keep_freed_memory_validates_its_arguments():
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=-1)
    with pytest.raises(ValueError, match="trim_threshold"):
        keep_freed_memory(trim_threshold=2 ** 40)
    with pytest.raises(ValueError, match="mmap_threshold"):
        keep_freed_memory(mmap_threshold=True)
