"""How many numba threads a decoding kernel splits its work over, and launching it on them.

A decode step is a few rows through each weight matrix (and each cached key and value): memory
bound, so one core leaves the others' bandwidth unused. :func:`chunks` says how many contiguous
parts to split a loop into: the threads BLAS may use now (``blas_thread_count``: the model's
runner holds it to the model's threads; one inside a chunk of a split batch, whose other threads
already run other chunks), no more than numba's pool, and none smaller than a given number of
rows (a parallel launch costs a few microseconds). :func:`launch` runs a ``ParallelJit`` kernel
with numba's thread count set for this call, one launch at a time: numba's workqueue layer
(where there is no OpenMP or TBB) aborts on two at once.

Not here: the kernels (``linear.py``, ``attention.py``); quant.py and decode.py keep their own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from arraygpt.backends import numpy as backend  # the backend these arrays come from: its BLAS threads
from arraygpt.backends.numpy.kernels._jit import numba

_lock = threading.Lock()
_pool: list[int] = []  # numba's pool size (NUMBA_NUM_THREADS), read once


def chunks(rows: int, min_rows: int) -> int:
    """Parts to split ``rows`` rows of work into: at most the threads BLAS may use now and numba's
    pool, each of at least ``min_rows`` rows; 0 where BLAS's thread count is unknown."""
    threads = backend.blas_thread_count()
    if not threads:
        return 0
    if not _pool:
        _pool.append(numba().config.NUMBA_NUM_THREADS)
    return max(1, min(threads, rows // min_rows, _pool[0]))


def launch(kernel: Any, parts: int, *args: Any) -> Any:
    """``kernel(*args, parts)`` with ``parts`` numba threads (a ``ParallelJit`` whose prange loop
    runs over ``parts``), and what it returns."""
    with held(parts):
        return kernel(*args, parts)


@contextlib.contextmanager
def held(parts: int) -> Iterator[None]:
    """Inside the block, numba's thread count is ``parts`` and no other launch runs: :func:`launch`
    for one kernel, or a caller's many in a row (a decode step's blocks)."""
    with _lock:
        numba().set_num_threads(parts)
        yield
