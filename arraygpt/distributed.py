"""More than one process: the :class:`World` of ranks a training run spans, and its collectives.

A run launched with ``mpiexec -n R arraygpt train ...`` (or ``arraygpt.train(...)`` inside such a
job) has R ranks. Each draws the same global batch, computes the gradients of its own contiguous
share of the rows, and the ranks add their gradients with one all-reduce of one contiguous float
buffer (mpi4py's buffer ``Iallreduce``, never the lowercase pickling methods: STYLE.md section 12),
so every rank applies the same update. The parameters are broadcast from rank 0 at the start and
checked once (a hash of every rank's weights, gathered; a rank that differs is an error).

Without an MPI launcher (no ``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE`` or ``PMIX_RANK`` in the
environment), or with one rank, :func:`get_world` returns a single-process World whose collectives
do nothing, and mpi4py is never imported: nothing changes for a normal run.

Faults: every collective is non-blocking underneath and waited for with a deadline
(``ARRAYGPT_MPI_TIMEOUT`` seconds, default 600; 0 waits forever; the collectives of the start-up,
while ranks may still be importing and reading data, wait at least ``ARRAYGPT_MPI_START_TIMEOUT``,
default 600). A rank whose wait runs past it,
or that raises, prints one line naming itself and calls ``MPI_Abort``, which ends every rank of the
job; a rank killed outright is noticed by the launcher (MPICH's hydra, Open MPI's prte), which ends
the others. Checkpoints are written atomically by rank 0 alone, so the last one stays intact.

Not here: which rows a rank takes and how gradients are weighted (``arraygpt.training``); NCCL
on GPUs (future work: the buffer here is host NumPy, so a GPU backend pays one copy each way).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from arraygpt.shim import to_numpy

TIMEOUT_ENV = "ARRAYGPT_MPI_TIMEOUT"
START_TIMEOUT_ENV = "ARRAYGPT_MPI_START_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
# what MPI launchers put in each rank's environment: MPICH/hydra and Intel MPI, Open MPI, PMIx
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
LAUNCHER_VARIABLES = (*LAUNCHER_SIZE_VARIABLES, "PMIX_RANK")
MPI_INSTALL_HINT = "pip install 'arraygpt[mpi]'  (or: pip install mpi4py mpich)"


class CollectiveTimeout(RuntimeError):
    """A collective waited longer than the timeout for the other ranks."""


class World:
    """The ranks of one run and the collectives the training loop needs.

    ``World()`` is one process (rank 0 of 1), whose collectives return their buffer unchanged.
    ``World(comm)`` wraps an mpi4py communicator; :func:`get_world` picks one of the two.

    Args:
        comm: an ``mpi4py.MPI.Comm`` (None: a single process).
        timeout: seconds a collective may wait for the other ranks (None: ``$ARRAYGPT_MPI_TIMEOUT``
            or 600; 0: forever).
        start_timeout: the same inside :meth:`starting` (None: ``$ARRAYGPT_MPI_START_TIMEOUT`` or
            600), never less than ``timeout``.

    Example:
        >>> world = World()
        >>> world.rank, world.size, world.is_root
        (0, 1, True)
        >>> world.allreduce_sum_(np.array([1.0, 2.0]))
        array([1., 2.])
    """

    def __init__(self, comm: Any = None, timeout: float | None = None, start_timeout: float | None = None):
        self.comm = comm
        self.rank = 0 if comm is None else int(comm.Get_rank())
        self.size = 1 if comm is None else int(comm.Get_size())
        self.timeout = _timeout_from_env(TIMEOUT_ENV) if timeout is None else float(timeout)
        start = _timeout_from_env(START_TIMEOUT_ENV) if start_timeout is None else float(start_timeout)
        self.start_timeout = 0.0 if 0.0 in (self.timeout, start) else max(self.timeout, start)
        self._starting = False
        if comm is not None:
            from mpi4py import MPI

            comm.Set_errhandler(MPI.ERRORS_RETURN)  # an MPI error raises MPI.Exception instead of ending silently
        self._collectives = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size})"

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Collectives inside wait up to ``start_timeout``: ranks reach the first one at different
        times (imports, reading the data, building the model)."""
        self._starting = True
        try:
            yield
        finally:
            self._starting = False

    # -- collectives on host NumPy buffers ------------------------------------------------------

    def allreduce_sum_(self, buffer: np.ndarray, what: str = "the gradient all-reduce") -> np.ndarray:
        """Add ``buffer`` over the ranks, in place: every rank ends with the same sum.

        Args:
            buffer: a contiguous host NumPy array (float or int), the same shape on every rank.
            what: named in the message if the wait times out.

        Returns:
            ``buffer``.
        """
        return self._allreduce(buffer, "SUM", what)

    def allreduce_max_(self, buffer: np.ndarray, what: str = "an all-reduce") -> np.ndarray:
        """The elementwise maximum over the ranks, in place."""
        return self._allreduce(buffer, "MAX", what)

    def broadcast_(self, buffer: np.ndarray, root: int = 0, what: str = "the broadcast") -> np.ndarray:
        """Overwrite ``buffer`` on every rank with rank ``root``'s, in place."""
        if self.comm is None:
            return buffer
        _check_buffer(buffer)
        self._wait(self.comm.Ibcast(buffer, root=root), what)
        return buffer

    def allgather(self, value: np.ndarray, what: str = "an all-gather") -> np.ndarray:
        """Every rank's ``value`` (same shape and dtype everywhere), stacked: (size, *value.shape)."""
        value = np.ascontiguousarray(value)
        out = np.empty((self.size, *value.shape), dtype=value.dtype)
        if self.comm is None:
            out[0] = value
            return out
        self._wait(self.comm.Iallgather(value, out), what)
        return out

    def _allreduce(self, buffer: np.ndarray, op: str, what: str) -> np.ndarray:
        if self.comm is None:
            return buffer
        from mpi4py import MPI

        _check_buffer(buffer)
        self._wait(self.comm.Iallreduce(MPI.IN_PLACE, buffer, getattr(MPI, op)), what)
        return buffer

    def _wait(self, request: Any, what: str) -> None:
        """Wait for a non-blocking collective, polling with a growing sleep (at most 2 ms, so a
        waiting rank leaves its core to a computing one), until the timeout."""
        self._collectives += 1
        timeout, variable = (self.start_timeout, START_TIMEOUT_ENV) if self._starting else (self.timeout, TIMEOUT_ENV)
        start = time.monotonic()
        pause = 0.0
        while not request.Test():
            if timeout and time.monotonic() - start > timeout:
                raise CollectiveTimeout(
                    f"rank {self.rank} of {self.size}: {what} waited {timeout:g} s for the other ranks "
                    f"(a rank is dead or stuck; set {variable} to wait longer, 0 for ever)"
                )
            if pause:
                time.sleep(pause)
            pause = min(2e-3, max(1e-5, pause * 2))

    # -- parameters ------------------------------------------------------------------------------

    def broadcast_arrays_(self, arrays: Mapping[str, Any], what: str = "the parameter broadcast") -> dict[str, np.ndarray]:
        """Rank 0's values of ``arrays`` (name -> array, the same names and shapes everywhere), as
        host NumPy arrays, through one contiguous buffer per dtype."""
        host = {name: np.ascontiguousarray(to_numpy(a)) for name, a in arrays.items()}
        if self.comm is None:
            return host
        for dtype in sorted({a.dtype.str for a in host.values()}):
            names = [n for n, a in host.items() if a.dtype.str == dtype]
            flat = np.concatenate([host[n].ravel() for n in names])
            self.broadcast_(flat, what=what)
            start = 0
            for n in names:
                size = host[n].size
                host[n] = flat[start : start + size].reshape(host[n].shape)
                start += size
        return host

    def check_identical(self, arrays: Mapping[str, Any], what: str = "parameters") -> None:
        """Raise on every rank if ``arrays`` (name -> array) differ between ranks: each rank hashes
        its values (sha256 of the names, dtypes, shapes and bytes, in name order) and the hashes
        are gathered, so each rank can name the ranks that differ from rank 0.

        Raises:
            RuntimeError: some rank's arrays differ from rank 0's (the message names the ranks).
        """
        hashes = self.allgather(np.array([array_digest(arrays)], dtype=np.int64), what=f"the {what} check")[:, 0]
        differ = [r for r in range(self.size) if hashes[r] != hashes[0]]
        if differ:
            raise RuntimeError(
                f"the {what} of rank(s) {', '.join(map(str, differ))} differ from rank 0's "
                f"(checked across {self.size} ranks after the broadcast)"
            )

    # -- faults ----------------------------------------------------------------------------------

    def abort(self, message: str, code: int = 1) -> None:
        """Print ``message`` on stderr (prefixed with this rank) and end every rank of the job
        (``MPI_Abort``). A single process only prints; the caller raises."""
        print(f"arraygpt: rank {self.rank} of {self.size}: {message}", file=sys.stderr, flush=True)
        if self.comm is not None:
            self.comm.Abort(code)


def array_digest(arrays: Mapping[str, Any]) -> int:
    """A 63-bit hash of the arrays (name, dtype, shape and bytes, in name order), as an int."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(to_numpy(arrays[name]))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _check_buffer(buffer: Any) -> None:
    if not isinstance(buffer, np.ndarray) or not buffer.flags.c_contiguous:
        raise TypeError("a collective needs one contiguous host NumPy buffer")


def _timeout_from_env(variable: str) -> float:
    raw = os.environ.get(variable, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{variable} must be a number of seconds (0: no timeout), got {raw!r}") from None
    if not value >= 0:
        raise ValueError(f"{variable} must be >= 0 seconds, got {raw!r}")
    return value


def launched_ranks() -> int:
    """How many ranks an MPI launcher says this job has (1 when not launched by one)."""
    for name in LAUNCHER_SIZE_VARIABLES:
        if os.environ.get(name):
            try:
                return int(os.environ[name])
            except ValueError:
                continue
    return 2 if os.environ.get("PMIX_RANK") else 1  # PMIx without a size: MPI itself will say


_WORLD: World | None = None


def get_world() -> World:
    """The World of this process: MPI's ``COMM_WORLD`` when an MPI launcher started more than one
    rank, else a single process (mpi4py is then not imported). The same object on every call.

    Raises:
        ImportError: launched with several ranks, but mpi4py is not installed (the message says how).
    """
    global _WORLD
    if _WORLD is None:
        if launched_ranks() <= 1:
            _WORLD = World()
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise ImportError(
                    f"this process was started by an MPI launcher with several ranks, but mpi4py is not installed: "
                    f"{MPI_INSTALL_HINT}"
                ) from None
            comm = MPI.COMM_WORLD
            _WORLD = World(comm) if comm.Get_size() > 1 else World()
    return _WORLD
