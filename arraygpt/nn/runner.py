"""Splitting a batch across host threads: the one place that owns a thread pool and sets BLAS's
thread count.

NumPy runs each elementwise operation on one core, so on a CPU backend a forward/backward gains
from running contiguous chunks of the batch's rows in parallel threads, each with
single-threaded BLAS (more BLAS threads beside them would oversubscribe the cores). The model
asks the runner how to chunk a batch (:meth:`BatchRunner.chunks`) and runs the chunks with
:meth:`BatchRunner.map`. Results equal one thread's up to rounding.

Not here: what a chunk computes (``arraygpt.nn.core``), how the chunks' losses and gradients are
combined, and which dropout coins a chunk draws (``arraygpt.nn.model``).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from arraygpt.xp import Backend

# Measured on 2 cores: a chunk of fewer positions x channels runs slower in a thread than inline
# (16,384: 5-9% slower; 32,768: 0-12% faster; the nanoGPT CPU config's 49,152: 11-15% faster).
MIN_WORK_PER_THREAD = 32768


class BatchRunner:
    """Runs calls on up to ``threads`` host threads: the first on the caller's thread, the rest on
    a pool created on first use and shut down by :meth:`close` (or ``with``, or when the runner
    is garbage-collected).

    Args:
        threads: the most threads a batch is split across (>= 1).
        backend: its ``blas_threads`` limits BLAS while chunks run.
    """

    def __init__(self, threads: int, backend: Backend):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads
        self.backend = backend
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._finalizer: weakref.finalize | None = None

    def chunks(self, B: int, work_per_row: int) -> list[slice]:
        """Contiguous chunks of B rows, one per thread, each of at least MIN_WORK_PER_THREAD units
        of work (positions x channels): below that, a thread costs more than it gives."""
        n = min(self.threads, B, max(1, B * work_per_row // MIN_WORK_PER_THREAD))
        bounds = [B * i // n for i in range(n + 1)]
        return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on this thread, BLAS held to this runner's threads (so that
        ``threads=1`` or ``ARRAYGPT_NUM_THREADS=1`` means one thread, BLAS included)."""
        with self.backend.blas_threads(self.threads):
            return fn(*args, **kwargs)

    def map(self, fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """``[fn(*args) for args in calls]``, the first on this thread and the rest on the pool.
        BLAS gets the cores that the chunks leave (one each when there is a chunk per thread)."""
        if len(calls) == 1:
            return [self.run(fn, *calls[0])]
        pool = self._ensure_pool()
        with self.backend.blas_threads(max(1, self.threads // len(calls))):
            futures = [pool.submit(fn, *args) for args in calls[1:]]
            try:
                first = fn(*calls[0])
            except BaseException:  # an error or Ctrl-C: drop the chunks not started yet
                for future in futures:
                    future.cancel()
                raise
            finally:  # and let the running ones end before BLAS gets its threads back
                wait(futures)
            return [first] + [future.result() for future in futures]

    @property
    def started(self) -> bool:
        """Whether a pool has been created (some call ran on more than one thread)."""
        return self._pool is not None

    def _ensure_pool(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():  # a forked child has no pool threads
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="arraygpt")
            self._pool_pid = os.getpid()
            self._finalizer = weakref.finalize(self, self._pool.shutdown, wait=False)
        return self._pool

    def close(self) -> None:
        """Shut the pool down (it is created again if the runner is used after this)."""
        if self._finalizer is not None:
            self._finalizer()  # runs pool.shutdown once
            self._finalizer = None
        self._pool = None

    def __enter__(self) -> BatchRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
