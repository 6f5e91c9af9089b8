"""The quantized linear layer on GGUF blocks: ``nn.quant.quantized_linear_forward`` (out = x @
dequantize(W).T + b) without a float32 copy of W.

Two paths, by the number of rows M of x:

- decoding (M <= MAX_ROWS): one pass over W's blocks in their stored order, split by rows of W
  over the threads BLAS may use now (``blas_thread_count``: the model's runner holds it to the
  model's threads). Each row keeps 32 float32 accumulators, one per position in a block
  (``acc[j] += q_j * (d_b * x_j)``), reduced once per row: that loop shape vectorizes, where a
  sum per block does not (the probe in docs/performance.md). The nibbles are read in place. Each
  block's constant term (Q4_1's min m_b, Q4_0's -8 d_b, Q5_0's -16 d_b) multiplies the block's
  sum of x, computed once per call for all rows of W.
- prefill (more rows): tiles of TILE rows of W are dequantized to float32 and multiplied with
  BLAS (``x @ tile.T``), so the float32 memory is one tile.

Prepared per weight, once, and cached while the weight lives: the float16 scales (and mins) as
float32 arrays, (out, in / 32) each; the blocks themselves stay where they are (a memory-mapped
file). Kinds: q8_0, q4_0, q4_1, q5_0, q5_1; the K-quants (q4_k, q5_k, q6_k) are decoded by the
reference's array-API code a tile of TILE rows at a time, then multiplied with BLAS (slow, but
the float32 memory is one tile, not the whole matrix).

Rounding: the kernels sum in another order than the reference's BLAS product; both are within
the float32 bound of a dot product, ``|error| <= K eps sum_j |w_j x_j|`` (K = in), where
``|w_j| <= |d_b| qmax + |m_b|`` from the block's scales. tests/test_quant.py checks the kernels
against the reference and the ``gguf`` library's dequantizer within twice that bound.

Not here: the math's definition (``arraygpt.nn.quant``), choosing kernels (``arraygpt.nn.kernels``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, NamedTuple

import numpy as np

from arraygpt.backends.numpy.kernels._jit import OPTIONS, LazyJit, _lock, loader, numba
from arraygpt.nn import quant
from arraygpt.nn.kernels import KernelSpec

MAX_ROWS = 8  # decoding's loop up to here; more rows: dequantized tiles and BLAS
TILE = 256  # rows of W dequantized at a time on the prefill path
KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_CODE = {kind: code for code, kind in enumerate(KINDS)}
PARALLEL = dict(OPTIONS, parallel=True)


# ----------------------------------------------------------------------------------------------
# numba sources: each built with numba's prange, so that its rows run on several threads


class _ParallelJit(LazyJit):
    """A numba source built by ``build(prange)``, compiled with ``parallel=True`` on its first
    call; :attr:`py_func` is the same source over ``range`` (serial Python)."""

    def __init__(self, build: Any):
        super().__init__(build(range), PARALLEL)
        self._build = build

    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            numba_module = numba()
            with _lock:
                if self._dispatcher is None:
                    self._dispatcher = numba_module.njit(**self.options)(self._build(numba_module.prange))
        return self._dispatcher


def _q8_0_source(prange: Any) -> Any:
    def _q8_0_rows(x, blocks, d, chunks, out):
        # out (M, N) = x (M, K) @ W.T; blocks (N, nb, 34) viewed as int8 (the quants from byte 2
        # on), d (N, nb) float32 scales; W's rows in `chunks` contiguous ranges, one task each
        M = x.shape[0]
        N, nb = d.shape
        for c in prange(chunks):
            acc = np.empty(32, np.float32)
            for o in range(c * N // chunks, (c + 1) * N // chunks):
                for m in range(M):
                    acc[:] = 0.0
                    for b in range(nb):
                        db = d[o, b]
                        base = b * 32
                        for j in range(32):
                            acc[j] += np.float32(blocks[o, b, 2 + j]) * (db * x[m, base + j])
                    out[m, o] = acc.sum()

    return _q8_0_rows


def _q4_source(prange: Any) -> Any:
    def _q4_rows(x, blocks, d, mins, xsum, start, high, chunks, out):
        # out (M, N) = x @ W.T for Q4_0/Q4_1/Q5_0/Q5_1: value = d_b q + min_b, q the nibbles at
        # byte `start` of each block (with `high`, a fifth bit from the 4 bytes before them);
        # min_b is m_b (Q4_1, Q5_1), -8 d_b (Q4_0) or -16 d_b (Q5_0), times the block's sum of x,
        # xsum (M, nb). blocks (N, nb * bytes): each row and each x taken as a 1-D slice (indexing
        # the 3-D array in the inner loop was 1.5x slower)
        M = x.shape[0]
        N, nb = d.shape
        nbytes = blocks.shape[1] // nb
        for c in prange(chunks):
            acc = np.empty(32, np.float32)
            for o in range(c * N // chunks, (c + 1) * N // chunks):
                row = blocks[o]
                for m in range(M):
                    xm = x[m]
                    acc[:] = 0.0
                    s = np.float32(0.0)
                    for b in range(nb):
                        db = d[o, b]
                        q = row[b * nbytes + start : b * nbytes + start + 16]
                        xb = xm[b * 32 : b * 32 + 32]
                        if high:
                            h = row[b * nbytes + start - 4 : b * nbytes + start]
                            qh = (
                                np.uint32(h[0])
                                | (np.uint32(h[1]) << 8)
                                | (np.uint32(h[2]) << 16)
                                | (np.uint32(h[3]) << 24)
                            )
                            for j in range(16):
                                lo = np.uint32(q[j] & 15) | (((qh >> j) & 1) << 4)
                                hi = np.uint32(q[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)
                                acc[j] += np.float32(lo) * (db * xb[j])
                                acc[j + 16] += np.float32(hi) * (db * xb[j + 16])
                        else:
                            for j in range(16):
                                v = q[j]
                                acc[j] += np.float32(v & 15) * (db * xb[j])
                                acc[j + 16] += np.float32(v >> 4) * (db * xb[j + 16])
                        s += mins[o, b] * xsum[m, b]
                    out[m, o] = acc.sum() + s

    return _q4_rows


def _tile_source(prange: Any) -> Any:
    def _dequantize_tile(blocks, d, mins, start, high, r0, tile):
        # tile (R, K) float32 = dequantize(W)[r0 : r0 + R]; start < 0: Q8_0 (int8 quants from
        # byte 2), else the nibble kinds as in _q4_rows
        nb = d.shape[1]
        for r in prange(tile.shape[0]):
            o = r0 + r
            for b in range(nb):
                db, mb, base = d[o, b], mins[o, b], b * 32
                if start < 0:
                    for j in range(32):
                        v = np.int32(blocks[o, b, 2 + j])
                        tile[r, base + j] = db * np.float32(v - 256 if v >= 128 else v)
                    continue
                qh = np.uint32(0)
                if high:
                    qh = (
                        np.uint32(blocks[o, b, start - 4])
                        | (np.uint32(blocks[o, b, start - 3]) << 8)
                        | (np.uint32(blocks[o, b, start - 2]) << 16)
                        | (np.uint32(blocks[o, b, start - 1]) << 24)
                    )
                for j in range(16):
                    v = blocks[o, b, start + j]
                    lo = np.uint32(v & 15) | (((qh >> j) & 1) << 4)
                    hi = np.uint32(v >> 4) | (((qh >> (j + 16)) & 1) << 4)
                    tile[r, base + j] = db * np.float32(lo) + mb
                    tile[r, base + 16 + j] = db * np.float32(hi) + mb

    return _dequantize_tile


_q8_0_rows = _ParallelJit(_q8_0_source)
_q4_rows = _ParallelJit(_q4_source)
_dequantize_tile = _ParallelJit(_tile_source)


# ----------------------------------------------------------------------------------------------
# prepared layouts, once per weight


class _Prepared(NamedTuple):
    blocks: np.ndarray  # (N, nb, bytes per block): the weight's own bytes, int8 for Q8_0, else uint8
    d: np.ndarray  # (N, nb) float32 scales
    mins: np.ndarray  # (N, nb) float32 constant term of each block (Q8_0: d again, unread)
    start: int  # first byte of the quants (-1: Q8_0)
    high: bool  # a fifth bit per value (Q5_0, Q5_1)


_HEADER = {"q8_0": (-1, False), "q4_0": (2, False), "q4_1": (4, False), "q5_0": (6, True), "q5_1": (8, True)}
_prepared: dict[int, tuple[weakref.ref, _Prepared]] = {}
_prepared_lock = threading.Lock()


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte ``offset`` of every block, as float32 (N, nb)."""
    return np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def prepare(w: quant.QuantizedWeight) -> _Prepared:
    """The layout the loops read, computed on the first call for ``w`` and kept while ``w`` lives:
    the scales as float32; the blocks are not copied (a C-contiguous array is used as is)."""
    key = id(w)
    entry = _prepared.get(key)
    if entry is not None and entry[0]() is w:
        return entry[1]
    blocks = np.ascontiguousarray(w.blocks)
    start, high = _HEADER[w.kind]
    d = _f16(blocks, 0)
    if w.kind == "q8_0":
        prepared = _Prepared(blocks.view(np.int8), d, d, start, high)  # Q8_0 has no constant term: never read
    else:
        mins = {"q4_0": -8.0 * d, "q5_0": -16.0 * d}.get(w.kind)
        prepared = _Prepared(blocks, d, _f16(blocks, 2) if mins is None else mins, start, high)
    with _prepared_lock:
        _prepared[key] = (weakref.ref(w), prepared)
        weakref.finalize(w, _forget, key)
    return prepared


def _forget(key: int) -> None:
    with _prepared_lock:
        _prepared.pop(key, None)


# ----------------------------------------------------------------------------------------------
# the wrapper


class QuantizedLinearCache(quant.QuantizedLinearCache):
    """The reference's cache (a subclass, so the reference's backward reads it)."""


def _threads() -> int:
    """The threads the model's runner lets BLAS use now (one where that is unknown)."""
    from arraygpt.backends.numpy import blas_thread_count  # the backend these arrays come from

    return max(1, blas_thread_count() or 1)


def takes(x: Any, w: Any, b: Any = None) -> bool:
    """Whether the kernel takes this call: a NumPy float32 x (..., in), a weight of a kind in KINDS
    whose blocks are a NumPy array, a float32 bias of (out,) or none."""
    return (
        type(x) is np.ndarray
        and x.dtype == np.float32
        and x.ndim >= 1
        and isinstance(w, quant.QuantizedWeight)
        and w.kind in quant.BLOCKS
        and type(w.blocks) in (np.ndarray, np.memmap)
        and x.shape[-1] == w.shape[1]
        and x.size > 0
        and (b is None or (type(b) is np.ndarray and b.dtype == np.float32 and b.shape == (w.shape[0],)))
    )


def quantized_linear_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, Any]:
    """``nn.quant.quantized_linear_pair_forward`` on the blocks: x (..., in) -> (..., out), a
    stack part by part. What :func:`takes` refuses goes to the reference."""
    parts = w.parts if isinstance(w, quant.QuantizedStack) else (w,)
    if not all(takes(x, part) for part in parts) or not (
        b is None or (type(b) is np.ndarray and b.dtype == np.float32 and b.shape == (w.shape[0],))
    ):
        return quant.quantized_linear_pair_forward(x, w, b)
    M = x.size // x.shape[-1]
    N, K = w.shape
    x2 = np.ascontiguousarray(x.reshape(M, K))
    out = np.empty((M, N), dtype=np.float32)
    threads = min(_threads(), numba().config.NUMBA_NUM_THREADS)
    numba().set_num_threads(threads)
    start = 0
    for part in parts:
        _product(x2, part, threads, out[:, start : start + part.shape[0]])
        start += part.shape[0]
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], N), QuantizedLinearCache(x, w, b is not None)


def _product(x2: np.ndarray, w: quant.QuantizedWeight, threads: int, out: np.ndarray) -> None:
    """out (M, N) = x2 (M, K) @ dequantize(w).T, on the blocks (the K-quants: the reference's
    decoding, a tile of rows at a time, then BLAS)."""
    M, K = x2.shape
    N = w.shape[0]
    if w.kind not in _HEADER:
        for r0 in range(0, N, TILE):
            rows = min(TILE, N - r0)
            tile = quant.dequantize(quant.QuantizedWeight(w.kind, w.blocks[r0 : r0 + rows], (rows, K)))
            np.matmul(x2, tile.T, out=out[:, r0 : r0 + rows])
        return
    p = prepare(w)
    if M <= MAX_ROWS:
        chunks = threads if N >= 64 * threads else 1
        if p.start < 0:
            _q8_0_rows(x2, p.blocks, p.d, chunks, out)
        else:
            xsum = x2.reshape(M, K // 32, 32).sum(axis=-1)  # (M, nb)
            _q4_rows(x2, p.blocks.reshape(N, -1), p.d, p.mins, xsum, p.start, p.high, chunks, out)
    else:
        # the tiles are decoded on this thread alone: BLAS's threads do the product, and numba's
        # workers spinning beside them made a 256-token prefill 8x slower on 2 cores
        numba().set_num_threads(1)
        tile = np.empty((min(TILE, N), K), dtype=np.float32)
        for r0 in range(0, N, TILE):
            rows = min(TILE, N - r0)
            _dequantize_tile(p.blocks, p.d, p.mins, p.start, p.high, r0, tile[:rows])
            np.matmul(x2, tile[:rows].T, out=out[:, r0 : r0 + rows])


SPECS = {
    "numba_quantized_linear": KernelSpec(
        "quantized_linear",
        loader(quantized_linear_forward, quant.quantized_linear_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        dtypes=("float32",),
        description=f"GGUF blocks ({', '.join(KINDS)}): up to {MAX_ROWS} rows in one pass over the blocks "
        f"(32 accumulators a row, rows split over the BLAS threads); more rows: tiles of {TILE} rows "
        "dequantized for BLAS (numba, parallel, nogil)",
    ),
}
