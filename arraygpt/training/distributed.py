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
default 600). A rank whose wait runs past it, or that raises, prints one line naming itself,
waits until the launcher has read its output (the launcher drops what it has not read once it
handles the abort) and calls ``MPI_Abort``, which ends every rank of the job; a rank killed
outright is noticed by the launcher (MPICH's hydra, Open MPI's prte), which ends the others.
Checkpoints are written atomically by rank 0 alone, so the last one stays intact.

Not here: which rows a rank takes and how gradients are weighted (``arraygpt.training.step``); NCCL
on GPUs (future work: the buffer here is host NumPy, so a GPU backend pays one copy each way).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from arraygpt.errors import CollectiveTimeout, TrainingDiverged
from arraygpt.xp import to_numpy

TIMEOUT_ENV = "ARRAYGPT_MPI_TIMEOUT"
START_TIMEOUT_ENV = "ARRAYGPT_MPI_START_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
ABORT_DRAIN_S = 10.0  # how long an aborting rank waits for the launcher to read its last output
# what MPI launchers put in each rank's environment: MPICH/hydra and Intel MPI, Open MPI, PMIx
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
LAUNCHER_VARIABLES = (*LAUNCHER_SIZE_VARIABLES, "PMIX_RANK")
MPI_INSTALL_HINT = "pip install 'arraygpt[mpi]'  (or: pip install mpi4py mpich)"


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

    def broadcast_text(self, text: str, root: int = 0, what: str = "the broadcast") -> str:
        """Rank ``root``'s ``text`` on every rank (its length, then its UTF-8 bytes).

        Example:
            >>> World().broadcast_text("ok")
            'ok'
        """
        if self.comm is None:
            return text
        data = np.frombuffer(text.encode(), dtype=np.uint8) if self.rank == root else np.empty(0, dtype=np.uint8)
        length = self.broadcast_(np.array([data.size], dtype=np.int64), root=root, what=what)
        buffer = data.copy() if self.rank == root else np.empty(int(length[0]), dtype=np.uint8)
        if buffer.size:
            self.broadcast_(buffer, root=root, what=what)
        return buffer.tobytes().decode()

    def allgather(self, value: np.ndarray, what: str = "an all-gather") -> np.ndarray:
        """Every rank's ``value`` (same shape and dtype everywhere), stacked: (size, *value.shape)."""
        value = np.ascontiguousarray(value)
        out = np.empty((self.size, *value.shape), dtype=value.dtype)
        if self.comm is None:
            out[0] = value
            return out
        self._wait(self.comm.Iallgather(value, out), what)
        return out

    def reduce_scatter_sum(
        self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int], what: str = "the gradient reduce-scatter"
    ) -> np.ndarray:
        """Add ``send`` over the ranks and keep this rank's block of the sum in ``recv``.

        Args:
            send: a contiguous host buffer, the same length on every rank (``sum(counts)``).
            recv: this rank's block: ``counts[rank]`` elements, ``send``'s dtype.
            counts: the length of each rank's block; rank r's block follows rank r-1's.

        Returns:
            ``recv``.
        """
        _check_buffer(send)
        _check_buffer(recv)
        if recv.size != counts[self.rank] or send.size != sum(counts):
            raise ValueError(
                f"reduce-scatter of {send.size} elements into blocks of {list(counts)}: "
                f"rank {self.rank} holds {recv.size}"
            )
        if self.comm is None:
            recv[...] = send
            return recv
        from mpi4py import MPI

        self._wait(self.comm.Ireduce_scatter(send, recv, [int(c) for c in counts], MPI.SUM), what)
        return recv

    def allgatherv_(
        self, buffer: np.ndarray, counts: Sequence[int], what: str = "the parameter all-gather"
    ) -> np.ndarray:
        """Every rank's block of ``buffer`` onto every rank, in place: rank r contributes (and
        everyone receives) the ``counts[r]`` elements after ``sum(counts[:r])``."""
        _check_buffer(buffer)
        if self.comm is None:
            return buffer
        from mpi4py import MPI

        counts = [int(c) for c in counts]
        self._wait(self.comm.Iallgatherv(MPI.IN_PLACE, [buffer, (counts, _displacements(counts))]), what)
        return buffer

    def gatherv(
        self, block: np.ndarray, counts: Sequence[int], root: int = 0, what: str = "a gather"
    ) -> np.ndarray | None:
        """The ranks' blocks (rank r's of ``counts[r]`` elements), concatenated in rank order, on
        ``root``; None on the other ranks."""
        block = np.ascontiguousarray(block)
        if self.comm is None:
            return block.copy()
        counts = [int(c) for c in counts]
        out = np.empty(sum(counts), dtype=block.dtype) if self.rank == root else None
        spec = [out, (counts, _displacements(counts))] if out is not None else None
        self._wait(self.comm.Igatherv(block, spec, root=root), what)
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

    def broadcast_arrays_(
        self, arrays: Mapping[str, Any], what: str = "the parameter broadcast"
    ) -> dict[str, np.ndarray]:
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
        (``MPI_Abort``). A single process only prints; the caller raises.

        Before ``MPI_Abort``, wait (at most ``ABORT_DRAIN_S`` seconds) until the launcher has read
        everything this rank wrote to stdout and stderr: the launcher stops forwarding output once
        it handles the abort, so a line still in the pipe would be lost (MPICH's hydra)."""
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        print(f"arraygpt: rank {self.rank} of {self.size}: {message}", file=sys.stderr, flush=True)
        if self.comm is not None:
            wait_until_output_is_read(ABORT_DRAIN_S)
            self.comm.Abort(code)


@contextlib.contextmanager
def ending_all_ranks_on_error(world: World) -> Iterator[None]:
    """With several ranks, turn an exception on one rank into the end of the job (MPI_Abort after
    its traceback and a line naming the rank), so no other rank waits for it in a collective.
    TrainingDiverged is left alone: every rank raises it at the same step."""
    try:
        yield
    except TrainingDiverged:
        raise
    except BaseException as e:
        if world.size == 1:
            raise
        traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
        what = str(e).split(": ", 1)[-1] if isinstance(e, CollectiveTimeout) else f"{type(e).__name__}: {e}"
        world.abort(f"{what}; ending all {world.size} ranks", code)
        raise


def _unread_bytes(fd: int) -> int | None:
    """Bytes written to ``fd`` that its reader has not read yet, when ``fd`` is a pipe (None for a
    terminal, a file, a socket: no way to tell)."""
    import stat

    try:
        import fcntl
        import termios

        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4), sys.byteorder, signed=True)
    except (ImportError, OSError, ValueError):  # no fcntl (Windows), or a closed fd
        return None


def wait_until_output_is_read(timeout: float) -> bool:
    """Wait until the reader of this process's stdout and stderr pipes (an MPI launcher) has read
    all that was written to them, at most ``timeout`` seconds. One that is not a pipe (a
    terminal, a file) cannot be asked: then wait a fixed half second more. True when every pipe
    was emptied in time."""
    pipes = [fd for fd in (1, 2) if _unread_bytes(fd) is not None]
    deadline = time.monotonic() + timeout
    while any(_unread_bytes(fd) for fd in pipes):
        if time.monotonic() > deadline:
            return False
        time.sleep(1e-3)
    if len(pipes) < 2:
        time.sleep(min(0.5, timeout))
    return True


def array_digest(arrays: Mapping[str, Any]) -> int:
    """A 63-bit hash of the arrays (name, dtype, shape and bytes, in name order), as an int."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(to_numpy(arrays[name]))
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def _displacements(counts: Sequence[int]) -> list[int]:
    return [int(d) for d in np.concatenate([[0], np.cumsum(counts)[:-1]])] if len(counts) else []


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


# ----------------------------------------------------------------------------------------------
# sharded optimizer state (ZeRO stage 1)


class ShardLayout:
    """Which part of the flat parameter buffer each rank owns under ``zero``.

    The flat buffer is every parameter raveled, in the order of ``shapes`` (the model's state
    dict), as the gradient all-reduce packs it. Rank r owns the contiguous range
    ``[cuts[r], cuts[r+1])``: R balanced ranges, each cut moved to the nearest row boundary
    (``by_rows``: along axis 0 of the parameter the cut falls in, so a rank's part of a parameter
    is ``p[r0:r1]``, a sub-array with the parameter's own ndim) or the nearest parameter boundary
    (not ``by_rows``: every parameter whole on one rank, for optimizers whose update of an element
    needs the rest of its parameter).

    Args:
        shapes: (name, shape) of every parameter, in the flat buffer's order.
        ranks: R.
        by_rows: cut at rows (True) or between whole parameters (False).

    Attributes:
        offsets: name -> where the parameter starts in the flat buffer.
        cuts: R + 1 positions, 0 to the number of elements N.
        counts: ``cuts[r+1] - cuts[r]``, the elements of each rank.
        pieces: per rank, a list of (name, r0, r1): rows ``[r0, r1)`` of the parameter are the rank's.

    Raises:
        ValueError: a rank would own nothing (more ranks than rows, or than parameters).

    Example:
        >>> ShardLayout([("w", (4, 3)), ("b", (3,))], 2).pieces
        [[('w', 0, 2)], [('w', 2, 4), ('b', 0, 3)]]
    """

    def __init__(self, shapes: Sequence[tuple[str, tuple[int, ...]]], ranks: int, by_rows: bool = True):
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes}
        self.offsets: dict[str, int] = {}
        rows: list[tuple[str, int, int, int]] = []  # name, offset, rows, elements per row
        n = 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape, dtype=np.int64))
            count = shape[0] if shape else 1
            if not by_rows:
                count = 1
            self.offsets[name] = n
            rows.append((name, n, count, size // count if count else 0))
            n += size
        self.size, self.ranks, self.by_rows = n, ranks, by_rows
        cuts = [0]
        for r in range(1, ranks):
            ideal = n * r / ranks
            cut = n
            for name, offset, count, per in rows:  # the parameter the ideal cut falls in
                if offset <= ideal < offset + count * per:
                    cut = offset + per * min(count, max(0, int(round((ideal - offset) / per))))
                    break
            cuts.append(max(cut, cuts[-1]))
        cuts.append(n)
        self.cuts = cuts
        self.counts = [cuts[r + 1] - cuts[r] for r in range(ranks)]
        if min(self.counts) <= 0:
            granules = sum(c for _, _, c, per in rows if per) if by_rows else len(rows)
            raise ValueError(
                f"cannot shard the optimizer state of {len(rows)} parameters ({granules} "
                f"{'rows' if by_rows else 'parameters'}) over {ranks} ranks: "
                "a rank would own nothing"
            )
        self.row_size = {name: per for name, _, _, per in rows}  # elements per piece row
        self.pieces: list[list[tuple[str, int, int]]] = []
        for r in range(ranks):
            lo, hi, mine = cuts[r], cuts[r + 1], []
            for name, offset, count, per in rows:
                r0, r1 = (max(0, (lo - offset) // per), min(count, (hi - offset) // per)) if per else (0, 0)
                if r1 > r0:
                    shape = self.shapes[name]
                    if not by_rows:  # the whole parameter: its own rows
                        r0, r1 = 0, shape[0] if shape else 1
                        self.row_size[name] = per // r1
                    mine.append((name, r0, r1))
            self.pieces.append(mine)

    def start(self, name: str, r0: int) -> int:
        """Where row ``r0`` of parameter ``name`` starts in the flat buffer."""
        return self.offsets[name] + r0 * self.row_size[name]


def _rows(p: Any, r0: int, r1: int) -> Any:
    """Rows ``[r0, r1)`` of ``p`` (a view on NumPy, CuPy and torch); a 0-d array whole."""
    return p if p.ndim == 0 or (r0 == 0 and r1 == p.shape[0]) else p[r0:r1]


class ShardedOptimizer:
    """ZeRO stage 1: the optimizer state of 1/R of the parameters on each rank.

    Wraps an optimizer plugin: rank r builds it (``factory(pieces, **options)``) on its pieces of
    the parameters, the rows ``[r0, r1)`` that :class:`ShardLayout` gives it, which are views of
    the model's own arrays. Elementwise optimizers (the factory's ``elementwise`` attribute is
    true: SGD, Adam, AdamW) are split at rows, so the shares are equal to within one row; any
    other optimizer gets whole parameters. A piece keeps its parameter's name and ndim, so a
    weight-decay mask on names or ``ndim`` (AdamW's) is the same as unsharded.

    One step: :meth:`reduce_gradients` adds the ranks' gradients with one reduce-scatter of the
    one contiguous gradient buffer (each rank receives the sum for its own range only), the
    training loop clips with the all-reduced squared norm, :meth:`step` updates this rank's
    pieces with the wrapped optimizer, and one in-place all-gather of the flat parameter buffer
    brings every rank's updated range to every rank. The parameters stay identical on all ranks.

    :meth:`state_dict` is a collective (every rank calls it): the full state, as the unsharded
    optimizer would write it, is gathered onto rank 0; the other ranks get ``{}``.
    :meth:`load_state_dict` takes a full state (any rank count wrote it, sharded or not) and keeps
    this rank's rows.

    Args:
        factory: an optimizer plugin's factory.
        params: the model's name -> array dict (updated in place).
        world: the ranks.
        **options: passed to the factory.
    """

    def __init__(self, factory: Callable[..., Any], params: Mapping[str, Any], world: World, **options: Any):
        self.params, self.world = params, world
        self.elementwise = bool(getattr(factory, "elementwise", False))
        shapes = [(name, tuple(p.shape)) for name, p in params.items()]
        self.layout = ShardLayout(shapes, world.size, by_rows=self.elementwise)
        self.mine = self.layout.pieces[world.rank]
        self.pieces = {name: _rows(params[name], r0, r1) for name, r0, r1 in self.mine}
        self.inner = factory(self.pieces, **options)
        self._grad_buffer: np.ndarray | None = None
        self._shard: np.ndarray | None = None
        self._flat: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"ShardedOptimizer({type(self.inner).__name__}, rank {self.world.rank} of {self.world.size}, "
            f"{self.count:,} elements)"
        )

    @property
    def count(self) -> int:
        """Elements of the parameters this rank's optimizer state covers."""
        return self.layout.counts[self.world.rank]

    @property
    def range(self) -> tuple[int, int]:
        """This rank's range of the flat parameter buffer."""
        return self.layout.cuts[self.world.rank], self.layout.cuts[self.world.rank + 1]

    def reduce_gradients(self, grads: Mapping[str, Any], what: str = "the gradient reduce-scatter") -> dict[str, Any]:
        """The sum over ranks of ``grads`` (every parameter's, full size), this rank's pieces only:
        name -> array of the piece's shape on the parameters' backend."""
        from arraygpt.training.optim import _like

        host = {name: to_numpy(grads[name]) for name in self.params}
        dtype = np.result_type(*host.values())
        if self._grad_buffer is None or self._grad_buffer.dtype != dtype:
            self._grad_buffer = np.empty(self.layout.size, dtype=dtype)  # (N,): every gradient, flat
            self._shard = np.empty(self.count, dtype=dtype)  # (N / R,): this rank's block of the sum
            self._flat = None
        send, recv = self._grad_buffer, self._shard
        assert recv is not None
        for name, h in host.items():
            start = self.layout.offsets[name]
            send[start : start + h.size] = h.ravel()
        self.world.reduce_scatter_sum(send, recv, self.layout.counts, what=what)
        out, lo = {}, self.range[0]
        for name, r0, r1 in self.mine:
            piece = self.pieces[name]
            start = self.layout.start(name, r0) - lo
            out[name] = _like(recv[start : start + piece.size].reshape(piece.shape), piece)
        return out

    def step(self, grads: Mapping[str, Any], lr: float) -> None:
        """Update this rank's pieces from their summed gradients (``reduce_gradients``), then
        all-gather the parameters so that every rank holds every updated value."""
        from arraygpt.training.optim import _like

        self.inner.step(grads, lr)
        lo, hi = self.range
        if self._flat is None:
            dtype = np.result_type(*(to_numpy(p).dtype for p in self.pieces.values()))
            reuse = self._grad_buffer is not None and self._grad_buffer.dtype == dtype
            # (N,): every parameter, flat; the gradient buffer's memory when it has their dtype (it is
            # free until the next step's reduce-scatter)
            self._flat = self._grad_buffer if reuse else np.empty(self.layout.size, dtype=dtype)
        flat = self._flat
        for name, r0, r1 in self.mine:  # this rank's range, from its updated pieces
            piece = to_numpy(self.pieces[name])
            start = self.layout.start(name, r0)
            flat[start : start + piece.size] = piece.ravel()
        self.world.allgatherv_(flat, self.layout.counts, what="the parameter all-gather")
        for name, p in self.params.items():  # every parameter not wholly this rank's, from the flat buffer
            start, size = self.layout.offsets[name], int(np.prod(p.shape, dtype=np.int64))
            if not lo <= start <= start + size <= hi:
                p[...] = _like(flat[start : start + size].reshape(p.shape), p)

    # -- state -----------------------------------------------------------------------------------

    def _split_state(self, state: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """(buffer -> name -> array, numbers) of a state dict whose arrays are ``<buffer>.<name>``."""
        arrays: dict[str, dict[str, Any]] = {}
        numbers: dict[str, Any] = {}
        for key, value in state.items():
            buffer, _, name = key.partition(".")
            if name in self.params and hasattr(value, "shape"):
                arrays.setdefault(buffer, {})[name] = value
            elif hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
                raise ValueError(
                    f"cannot shard the state of {type(self.inner).__name__}: its array {key!r} is not "
                    f"'<buffer>.<parameter name>'"
                )
            else:
                numbers[key] = value
        return arrays, numbers

    def state_dict(self) -> dict[str, Any]:
        """The full state (what the unsharded optimizer's ``state_dict`` holds), gathered onto rank 0;
        ``{}`` on the other ranks. A collective: every rank must call it."""
        arrays, numbers = self._split_state(self.inner.state_dict())
        full: dict[str, Any] = dict(numbers)
        for buffer in sorted(arrays):
            local = arrays[buffer]
            if set(local) != set(self.pieces):
                raise ValueError(
                    f"cannot gather the state of {type(self.inner).__name__}: its buffer {buffer!r} "
                    "does not cover every parameter"
                )
            block = np.concatenate([np.ravel(to_numpy(local[name])) for name, _, _ in self.mine])
            flat = self.world.gatherv(block, self.layout.counts, what=f"the optimizer state gather ({buffer})")
            if flat is not None:
                for name, shape in self.layout.shapes.items():
                    start = self.layout.offsets[name]
                    full[f"{buffer}.{name}"] = flat[start : start + int(np.prod(shape, dtype=np.int64))].reshape(shape)
        return full if self.world.is_root else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Keep this rank's rows of a full state (from ``state_dict`` of any optimizer of the same
        kind, sharded over any number of ranks or not)."""
        arrays, numbers = self._split_state(state)
        mine: dict[str, Any] = dict(numbers)
        for buffer, by_name in arrays.items():
            for name, r0, r1 in self.mine:
                if name in by_name:
                    host = to_numpy(by_name[name])
                    mine[f"{buffer}.{name}"] = host if host.ndim == 0 else host[r0:r1]
        self.inner.load_state_dict(mine)

    def local_state_nbytes(self) -> int:
        """Bytes of optimizer state this rank holds (its arrays; numbers not counted)."""
        return sum(to_numpy(v).nbytes for v in self.inner.state_dict().values() if hasattr(v, "shape"))
