"""numba's compiler code (libllvmlite's pages) goes back to the OS after each compile, and a later
compile still works: backends/numpy/kernels/_compiler_pages.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = r"""
import numpy as np
import llvmlite.binding as llvm
from arraygpt.backends.numpy.kernels._jit import lazy_njit

def resident_code_kb():
    # the Rss of libllvmlite's read-only executable mappings, from /proc/self/smaps
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[1] == "r-xp" and fields[5] == llvm.ffi.lib._name
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total

@lazy_njit
def cumulative(x):
    out = np.empty_like(x)
    s = x.dtype.type(0)
    for i in range(x.size):
        s += x[i]
        out[i] = s
    return out

a = np.arange(1, 6, dtype=np.float64)
assert np.array_equal(cumulative(a), np.cumsum(a))   # compiled (cache off: see env)
after_first = resident_code_kb()
b = np.arange(1, 6, dtype=np.int32)
assert np.array_equal(cumulative(b), np.cumsum(b))   # a second signature: LLVM runs again
print(after_first, resident_code_kb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise are Linux's")
def test_the_compilers_code_pages_go_back_after_each_compile_and_compiling_again_works(tmp_path):
    pytest.importorskip("numba")
    env = {"NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_DISABLE_CACHE": "1"}
    import os

    result = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    after_first, after_second = (int(v) for v in result.stdout.split())
    # a compile touches tens of MB of LLVM's code; what stays resident after each is a few pages
    assert after_first < 4096 and after_second < 4096, (after_first, after_second)
