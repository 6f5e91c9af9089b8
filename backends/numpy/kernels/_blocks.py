"""What the quantized kernels (``quant.py``, ``kquant.py``, ``decode.py``) share: how many rows of
x the decoding loops take, a weight's blocks as the loops read them, and x quantized to int8
blocks of 32 as llama.cpp's q8_0 (``quantize_block``: ``xq = round(x / dx)``, ``dx = max|x| /
127``, rounding half away from zero).

Not here: the products (``quant.py``, ``kquant.py``).
"""

from __future__ import annotations

import weakref

import numpy as np

from arraygpt.backends.numpy.kernels._jit import jitable, lazy_njit
from arraygpt.backends.numpy.kernels._simd import prefetch
from arraygpt.nn import quant

MAX_ROWS = 8  # decoding's loop up to here; more rows: dequantized tiles and BLAS
TILE = 1024  # rows of W dequantized at a time on the prefill path (256: 13% slower, 2 MB less memory)
MIN_ROWS_PER_THREAD = 64  # rows of W a thread takes at least (a parallel launch costs a few microseconds)
PREFETCH_BYTES = 16384  # how far ahead in W a product asks the memory for rows (see rows_ahead)


@jitable
def rows_ahead(blocks):
    # the rows of W (N, bytes a row) ahead of the one being read that a product asks the memory
    # for: PREFETCH_BYTES on. A Zen 5 streamed Q8_0 rows of 576 values at 12 GB/s asking 6 rows
    # (3.6 KB) ahead, 20-35 GB/s asking 16-32 KB ahead
    return max(2, PREFETCH_BYTES // max(1, blocks.shape[1]))


@jitable
def prefetch_row(blocks, r, hi):
    # row r of W (N, bytes a row) asked of the memory meanwhile, where r is before hi
    if r < hi:
        for at in range(0, blocks.shape[1], 64):
            prefetch(blocks[r], at)


@jitable
def quantize_block(xb, q):
    # a block of 32 floats xb -> q (32,) int8 = round(xb / d), d = max|xb| / 127, rounding half
    # away from zero (llama.cpp's quantize_row_q8_0); returns d, the sum of xb, the sum of q
    amax = np.float32(0.0)
    s = np.float32(0.0)
    for j in range(32):
        amax = max(amax, abs(xb[j]))
        s += xb[j]
    d = amax / np.float32(127.0)
    if s != s:  # a NaN in the block, which max() passes over: NaN out, as the float product gives
        d = np.float32(np.nan)
    inverse = np.float32(0.0)
    if d > 0:
        inverse = np.float32(1.0) / d
    total_q = 0
    for j in range(32):
        v = xb[j] * inverse
        r = np.int32(np.copysign(np.floor(abs(v) + np.float32(0.5)), v))
        q[j] = r
        total_q += r
    return d, s, total_q


@jitable(inline=False)
def quantize_row(x, xq, dx, xsum):
    # x (K,) float32 -> xq (K,) int8 blocks of 32 (quantize_block), dx (nb,) their scales, xsum
    # (nb,) the blocks' sums
    for b in range(dx.shape[0]):
        dx[b], xsum[b], _ = quantize_block(x[b * 32 : b * 32 + 32], xq[b * 32 : b * 32 + 32])


@lazy_njit
def _quantize_rows(x, xq, dx, xsum):
    # quantize_row for each row of x (M, K)
    for m in range(x.shape[0]):
        quantize_row(x[m], xq[m], dx[m], xsum[m])


_views: dict[int, tuple[weakref.ref, np.ndarray]] = {}  # id(w) -> (w, its blocks_2d) while w lives


def blocks_2d(w: quant.QuantizedWeight) -> np.ndarray:
    """w's blocks as (out, blocks per row * bytes per block): the file's bytes, not copied (the
    same view while w lives: a decode step hands it to numba 120 times a token, and a new view
    each time cost more than the dict lookup)."""
    entry = _views.get(id(w))
    if entry is not None and entry[0]() is w:
        return entry[1]
    view = np.ascontiguousarray(w.blocks).reshape(w.shape[0], -1)
    view.flags.writeable = False  # read-only like a file's: one numba type for all of them
    _views[id(w)] = (weakref.ref(w), view)
    weakref.finalize(w, _views.pop, id(w), None)
    return view


def activations(x2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x2 (M, K) as int8 blocks: xq (M, K) int8, dx (M, nb) scales, xsum (M, nb) sums of x."""
    M, K = x2.shape
    xq, dx, xsum = np.empty((M, K), np.int8), np.empty((M, K // 32), np.float32), np.empty((M, K // 32), np.float32)
    _quantize_rows(x2, xq, dx, xsum)
    return xq, dx, xsum
