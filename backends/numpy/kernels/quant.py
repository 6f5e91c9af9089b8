"""The quantized linear layer on GGUF blocks: ``nn.quant.quantized_linear_forward`` (out = x @
dequantize(W).T + b) without a float32 copy of W: the blocks are read where they are (a
memory-mapped file), their float16 scales too.

Two kernels, by how they treat x:

- ``numba_quantized_linear`` (float32): up to MAX_ROWS rows of x (decoding), one pass over W's
  blocks in their stored order. Each row keeps 32 float32 accumulators, one per position in a
  block (``acc[j] += q_j * (d_b * x_j)``), reduced once per row: that loop shape vectorizes, where
  a sum per block does not (the probe in docs/performance.md). Each block's constant term (Q4_1's
  min m_b, Q4_0's -8 d_b, Q5_0's -16 d_b) multiplies the block's sum of x.
- ``numba_quantized_linear_int8``: the same, but for Q8_0, Q4_0 and Q4_1 the rows of x are first
  quantized to int8 blocks of 32 (``xq = round(x / dx_b)``, ``dx_b = max|x| / 127``, as
  llama.cpp's q8_0) and each block of W meets them in one byte dot product (``_simd.py``: VNNI's
  ``vpdpbusd``), its integer sum scaled by ``d_b dx_b`` into 8 float lanes. 3-8x faster than the
  float loop; chosen where the CPU has VNNI.

Both split the rows of W over the threads BLAS may use now (``blas_thread_count``: the model's
runner holds it to the model's threads). More rows than MAX_ROWS (a prompt): tiles of TILE rows
of W are dequantized to float32 and multiplied with BLAS (``x @ tile.T``), so the float32 memory
is one tile. The K-quants (q4_k, q5_k, q6_k) are decoded by the reference's array-API code a tile
at a time, then multiplied with BLAS.

Rounding: the float32 kernel sums in another order than the reference's BLAS product; both are
within the float32 bound of a dot product, ``|error| <= K eps sum_j |w_j x_j|`` (K = in), where
``|w_j| <= |d_b| qmax + |m_b|`` from the block's scales. The int8 kernel's products are exact
integers, and its result is within that bound of ``x_hat @ W_q.T + x @ W_c.T`` (x_hat = dx_b xq the
rounded activations, W_q the quants' part of W, W_c its constant part): within
``sum_j |W_q,j| dx_b / 2`` more of the float product. tests/test_quant.py checks both against the
``gguf`` library's quantizer and dequantizer.

Not here: the math's definition (``arraygpt.nn.quant``), choosing kernels (``arraygpt.nn.kernels``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from arraygpt.backends.numpy.kernels._jit import OPTIONS, LazyJit, _lock, lazy_njit, loader, numba
from arraygpt.backends.numpy.kernels._simd import dot_bytes, dot_nibbles, fma, half, has_vnni, total, zeros
from arraygpt.errors import KernelUnavailable
from arraygpt.nn import quant
from arraygpt.nn.kernels import KernelSpec

MAX_ROWS = 8  # decoding's loop up to here; more rows: dequantized tiles and BLAS
TILE = 256  # rows of W dequantized at a time on the prefill path
KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
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
    def _q8_0_rows(x, blocks, chunks, out):
        # out (M, N) = x (M, K) @ W.T; blocks (N, nb * 34) int8: a float16 scale d_b, then 32
        # int8 quants; W's rows in `chunks` contiguous ranges, one task each
        M = x.shape[0]
        N = blocks.shape[0]
        nb = blocks.shape[1] // 34
        for c in prange(chunks):
            acc = np.empty(32, np.float32)
            for o in range(c * N // chunks, (c + 1) * N // chunks):
                row = blocks[o]
                for m in range(M):
                    xm = x[m]
                    acc[:] = 0.0
                    for b in range(nb):
                        db = half(row, b * 34)
                        q = row[b * 34 + 2 : b * 34 + 34]
                        xb = xm[b * 32 : b * 32 + 32]
                        for j in range(32):
                            acc[j] += np.float32(q[j]) * (db * xb[j])
                    out[m, o] = acc.sum()

    return _q8_0_rows


def _q4_source(prange: Any) -> Any:
    def _q4_rows(x, blocks, nbytes, start, high, offset, xsum, chunks, out):
        # out (M, N) = x @ W.T for Q4_0/Q4_1/Q5_0/Q5_1: value = d_b q + min_b, q the nibbles at
        # byte `start` of each block of `nbytes` (with `high`, a fifth bit from the 4 bytes before
        # them); min_b is the float16 m_b at byte 2 (Q4_1, Q5_1; offset 0) or -offset d_b (Q4_0: 8,
        # Q5_0: 16), times the block's sum of x, xsum (M, nb). blocks (N, nb * nbytes) uint8:
        # each row and each x taken as a 1-D slice (indexing a 3-D array in the inner loop was
        # 1.5x slower)
        M = x.shape[0]
        N = blocks.shape[0]
        nb = blocks.shape[1] // nbytes
        for c in prange(chunks):
            acc = np.empty(32, np.float32)
            for o in range(c * N // chunks, (c + 1) * N // chunks):
                row = blocks[o]
                for m in range(M):
                    xm = x[m]
                    acc[:] = 0.0
                    s = np.float32(0.0)
                    for b in range(nb):
                        at = b * nbytes
                        db = half(row, at)
                        q = row[at + start : at + start + 16]
                        xb = xm[b * 32 : b * 32 + 32]
                        if high:
                            h = row[at + start - 4 : at + start]
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
                        mb = half(row, at + 2) if offset == 0 else -offset * db
                        s += mb * xsum[m, b]
                    out[m, o] = acc.sum() + s

    return _q4_rows


def _int8_source(prange: Any) -> Any:
    def _int8_rows(xq, dx, xsum, blocks, nbytes, start, offset, chunks, out):
        # out (M, N) = x @ W.T with x as int8 blocks, x ~ dx_b xq (dx, xsum (M, nb)), summed with
        # byte dot products (_simd.py): Q8_0 (start 2: int8 quants), Q4_0 and Q4_1 (start 2 and 4:
        # nibbles); each block's integer dot times d_b dx_b goes to 8 float lanes, reduced once
        # per row; the constant term (as in _q4_rows) times the block's float sum of x
        M = xq.shape[0]
        N = blocks.shape[0]
        nb = blocks.shape[1] // nbytes
        for c in prange(chunks):
            for o in range(c * N // chunks, (c + 1) * N // chunks):
                row = blocks[o]
                for m in range(M):
                    xm = xq[m]
                    acc = zeros()
                    s = np.float32(0.0)
                    for b in range(nb):
                        at = b * nbytes
                        db = half(row, at)
                        if start == 2 and nbytes == 34:
                            acc = fma(acc, dot_bytes(row, at + 2, xm, b * 32), db * dx[m, b])
                        else:
                            acc = fma(acc, dot_nibbles(row, at + start, xm, b * 32), db * dx[m, b])
                            mb = half(row, at + 2) if offset == 0 else -offset * db
                            s += mb * xsum[m, b]
                    out[m, o] = total(acc) + s

    return _int8_rows


@lazy_njit
def _quantize_rows(x, xq, dx, xsum):
    # x (M, K) float32 -> xq (M, K) int8 = round(x / dx_b) per block of 32, dx_b = max|x| / 127,
    # rounding half away from zero (llama.cpp's quantize_row_q8_0); xsum (M, nb) the blocks' sums
    M, K = x.shape
    for m in range(M):
        for b in range(K // 32):
            amax = np.float32(0.0)
            s = np.float32(0.0)
            for j in range(b * 32, b * 32 + 32):
                amax = max(amax, abs(x[m, j]))
                s += x[m, j]
            d = amax / np.float32(127.0)
            inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            for j in range(b * 32, b * 32 + 32):
                v = x[m, j] * inverse
                xq[m, j] = np.int8(np.floor(abs(v) + np.float32(0.5)) * (1 if v >= 0 else -1))
            dx[m, b] = d
            xsum[m, b] = s


def _tile_source(prange: Any) -> Any:
    def _dequantize_tile(blocks, nbytes, start, high, offset, r0, tile):
        # tile (R, K) float32 = dequantize(W)[r0 : r0 + R]; blocks (N, nb * nbytes) uint8;
        # start 2 and nbytes 34: Q8_0 (int8 quants), else the nibble kinds as in _q4_rows
        nb = blocks.shape[1] // nbytes
        for r in prange(tile.shape[0]):
            row = blocks[r0 + r]
            for b in range(nb):
                at, base = b * nbytes, b * 32
                db = half(row, at)
                if nbytes == 34:
                    for j in range(32):
                        v = np.int32(row[at + 2 + j])
                        tile[r, base + j] = db * np.float32(v - 256 if v >= 128 else v)
                    continue
                mb = half(row, at + 2) if offset == 0 else -offset * db
                qh = np.uint32(0)
                if high:
                    qh = (
                        np.uint32(row[at + start - 4])
                        | (np.uint32(row[at + start - 3]) << 8)
                        | (np.uint32(row[at + start - 2]) << 16)
                        | (np.uint32(row[at + start - 1]) << 24)
                    )
                for j in range(16):
                    v = row[at + start + j]
                    lo = np.uint32(v & 15) | (((qh >> j) & 1) << 4)
                    hi = np.uint32(v >> 4) | (((qh >> (j + 16)) & 1) << 4)
                    tile[r, base + j] = db * np.float32(lo) + mb
                    tile[r, base + 16 + j] = db * np.float32(hi) + mb

    return _dequantize_tile


_q8_0_rows = _ParallelJit(_q8_0_source)
_q4_rows = _ParallelJit(_q4_source)
_int8_rows = _ParallelJit(_int8_source)
_dequantize_tile = _ParallelJit(_tile_source)


# ----------------------------------------------------------------------------------------------
# the wrappers


class _Layout(NamedTuple):
    """Where a kind keeps its parts in a block: the quants from byte ``start``; a fifth bit per
    value (``high``) in the 4 bytes before them; the constant term a float16 at byte 2 (offset
    0) or -offset d_b."""

    start: int
    high: bool
    offset: float


_LAYOUT = {
    "q8_0": _Layout(2, False, 0.0),
    "q4_0": _Layout(2, False, 8.0),
    "q4_1": _Layout(4, False, 0.0),
    "q5_0": _Layout(6, True, 16.0),
    "q5_1": _Layout(8, True, 0.0),
}
INT8_KINDS = ("q8_0", "q4_0", "q4_1")  # the kinds the int8 kernel sums with byte dot products


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


def _forward(x: Any, w: Any, b: Any, int8: bool) -> tuple[Any, Any]:
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
    activations = None
    if int8 and M <= MAX_ROWS and any(part.kind in INT8_KINDS for part in parts):
        activations = (
            np.empty((M, K), np.int8),
            np.empty((M, K // 32), np.float32),
            np.empty((M, K // 32), np.float32),
        )
        _quantize_rows(x2, *activations)
    start = 0
    for part in parts:
        _product(x2, part, threads, out[:, start : start + part.shape[0]], activations)
        start += part.shape[0]
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], N), QuantizedLinearCache(x, w, b is not None)


def quantized_linear_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, Any]:
    """``nn.quant.quantized_linear_pair_forward`` on the blocks, in float32: x (..., in) -> (...,
    out), a stack part by part. What :func:`takes` refuses goes to the reference."""
    return _forward(x, w, b, int8=False)


def quantized_linear_int8_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, Any]:
    """:func:`quantized_linear_forward`, but up to MAX_ROWS rows of x on Q8_0, Q4_0 and Q4_1
    weights are quantized to int8 blocks first (as llama.cpp's q8 dot products do) and summed with
    byte dot products: a different rounding, bounded in docs/gguf.md ("Quantized weights")."""
    return _forward(x, w, b, int8=True)


def _product(x2: np.ndarray, w: quant.QuantizedWeight, threads: int, out: np.ndarray, activations: Any) -> None:
    """out (M, N) = x2 (M, K) @ dequantize(w).T, on the blocks (the K-quants: the reference's
    decoding, a tile of rows at a time, then BLAS); ``activations`` (xq, dx, xsum) of x2: the
    int8 path where the kind has one."""
    M, K = x2.shape
    N = w.shape[0]
    if w.kind not in _LAYOUT:
        for r0 in range(0, N, TILE):
            rows = min(TILE, N - r0)
            tile = quant.dequantize(quant.QuantizedWeight(w.kind, w.blocks[r0 : r0 + rows], (rows, K)))
            np.matmul(x2, tile.T, out=out[:, r0 : r0 + rows])
        return
    start, high, offset = _LAYOUT[w.kind]
    nbytes = quant.BLOCKS[w.kind][1]
    blocks = np.ascontiguousarray(w.blocks).reshape(N, -1)  # (N, nb * nbytes): the file's bytes, not copied
    if M <= MAX_ROWS:
        chunks = threads if N >= 64 * threads else 1
        if activations is not None and w.kind in INT8_KINDS:
            xq, dx, xsum = activations
            _int8_rows(xq, dx, xsum, blocks, nbytes, start, offset, chunks, out)
        elif w.kind == "q8_0":
            _q8_0_rows(x2, blocks.view(np.int8), chunks, out)
        else:
            xsum = x2.reshape(M, K // 32, 32).sum(axis=-1)  # (M, nb)
            _q4_rows(x2, blocks, nbytes, start, high, offset, xsum, chunks, out)
    else:
        # the tiles are decoded on this thread alone: BLAS's threads do the product, and numba's
        # workers spinning beside them made a 256-token prefill 8x slower on 2 cores
        numba().set_num_threads(1)
        tile = np.empty((min(TILE, N), K), dtype=np.float32)
        for r0 in range(0, N, TILE):
            rows = min(TILE, N - r0)
            _dequantize_tile(blocks, nbytes, start, high, offset, r0, tile[:rows])
            np.matmul(x2, tile[:rows].T, out=out[:, r0 : r0 + rows])


def _int8_declines(config: Any, backend: Any, dtype: str) -> str | None:
    try:
        vnni = has_vnni()
    except KernelUnavailable as e:
        return str(e)
    return None if vnni else "this CPU has no byte dot products (VNNI): the float32 kernel is faster"


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
    "numba_quantized_linear_int8": KernelSpec(
        "quantized_linear",
        loader(quantized_linear_int8_forward, quant.quantized_linear_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        dtypes=("float32",),
        supports=_int8_declines,
        priority=1,
        description=f"numba_quantized_linear, but up to {MAX_ROWS} rows on {', '.join(INT8_KINDS)} with x quantized "
        "to int8 blocks and byte dot products (VNNI), as llama.cpp's q8 products",
    ),
}
