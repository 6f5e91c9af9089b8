"""The quantized product on GGUF's K-quants (Q4_K, Q5_K, Q6_K: the kinds of llama.cpp's Q4_K_M
files) read in place: out = x @ dequantize(W).T, with ``nn.quant``'s layouts (super-blocks of 256
values, ggml-quants.c) decoded inside numba loops instead of the reference's array-API code.

- Up to ``_blocks.MAX_ROWS`` rows of x (decoding): one pass over W's blocks in their stored order,
  as ``quant.dot_float`` does. Each row keeps 32 float32 accumulators, one per position in a
  sub-block of 32, reduced once per row; a sub-block's scale is folded into x
  (``acc[l] += q * (d sc_s x_l)``), so the loop over the 32 positions vectorizes. Q4_K's and
  Q5_K's min term (``-dmin mn_s``) multiplies the sub-block's sum of x (``xsum``, the same
  (M, K / 32) sums the 32-value kinds use); Q6_K's offset (q - 32) stays in the loop. The rows of
  W are split over the threads BLAS may use now (``_threads``), as ``quant._product`` does.
- :func:`product_int8`, the same rows with x as int8 blocks of 32 (``_blocks.activations``, as
  quant.py's int8 kernel; llama.cpp's q8_K idea): each 32 values of W unpacked in registers
  where they lie (Q4_K's low or high nibbles of 32 bytes, ``_simd.dot_nibble_row``; Q5_K's with
  a fifth bit, ``dot_fivebit_row``; Q6_K's six bits minus 32, ``dot_sixbits``), met with x's in
  one byte dot product (VNNI, or AVX2's two steps) and scaled by ``d sc_s dx`` into 8 float
  lanes; Q6_K's two scales of 16 values each go to lanes 0-3 and 4-7 (``fma_halves``). Two
  rows of W a pass, two chains of FMAs a row. One thread, streaming: 1.2-1.7 ns a 32 values on
  a Zen 5, where a scratch row of bytes unpacked by scalar loops took 4.7-6.6.
- More rows (a prompt): tiles of ``_blocks.TILE`` rows of W decoded to float32 by a serial numba
  loop, then multiplied with BLAS (``x @ tile.T``).

Rounding: a different order of sums than the reference's BLAS product, both within the float32
bound of a dot product, ``|error| <= K eps sum_j |w_j x_j|``, where a weight is bounded by its
sub-block's scales: ``|d sc_s| qmax + |dmin mn_s|`` (qmax 15, 31; Q6_K: ``|d sc_s| 32``). The
int8 variant's products are exact integers: it is within that bound of ``x_hat @ W_q.T + x @
W_c.T`` (x_hat = dx xq, W_q the part of W that multiplies the quants, W_c = -dmin mn), so within
``sum_j |W_q,j| dx_b / 2`` more of the float product. tests/test_kquant.py checks both against
the ``gguf`` library's dequantizer.

Not here: the math's definition (``arraygpt.nn.quant``), the 32-value kinds and choosing a
kernel for a call (``quant.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels import _blocks, _threads
from arraygpt.backends.numpy.kernels._jit import OPTIONS, LazyJit, ParallelJit, jitable, lazy_njit
from arraygpt.backends.numpy.kernels._simd import (
    add,
    dot_fivebit_row,
    dot_nibble_row,
    dot_sixbits,
    fma,
    fma_halves,
    half,
    total,
    zeros,
)
from arraygpt.nn.quant import QuantizedWeight

KINDS = ("q4_k", "q5_k", "q6_k")
KIND_CODES = {kind: code for code, kind in enumerate(KINDS)}  # the numba sources' ``kind``: 0, 1, 2


# Bit operations as NumPy's ufuncs on uint8 scalars: numba widens ``v & 15`` to int64, and the
# loops then convert 8 int64 lanes to float at a time; the ufuncs keep bytes (1.2-1.3x here)
_and, _or, _shl, _shr = np.bitwise_and, np.bitwise_or, np.left_shift, np.right_shift
_U1, _U2, _U3, _U4, _U12, _U15, _U48, _U192 = (np.uint8(v) for v in (1, 2, 3, 4, 12, 15, 48, 192))


# ----------------------------------------------------------------------------------------------
# numba sources: one super-block of 256 values at a time. A row of W is its blocks' bytes (uint8,
# ``_blocks.blocks_2d(w)[o]``); offsets inside a block as in nn.quant._dequantize_blocks


@jitable(inline=False)
def _scale_min(row, at, s):
    # the six-bit scale and min of sub-block s of the Q4_K/Q5_K block at byte `at`
    # (get_scale_min_k4: 12 bytes at at + 4, d = bytes 0-3, m = 4-7, md = 8-11)
    if s < 4:
        return np.float32(row[at + 4 + s] & 63), np.float32(row[at + 8 + s] & 63)
    md = row[at + 8 + s]
    sc = (md & 15) | ((row[at + s] >> 6) << 4)
    mn = (md >> 4) | ((row[at + 4 + s] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


@jitable(inline=False)
def _dot_q4k(row, x, xsum, acc):
    # one Q4_K row times x (K,), xsum (K / 32,) x's sums per sub-block of 32. Block: d, dmin
    # (float16), 12 bytes of scales and mins, 128 bytes of nibbles: bytes 32j..32j+31 hold
    # sub-block 2j (low nibbles) and 2j+1 (high); value = d sc_s q - dmin mn_s
    acc[:] = 0.0
    s = np.float32(0.0)
    for b in range(xsum.shape[0] // 8):
        at = b * 144
        d = half(row, at)
        dmin = half(row, at + 2)
        for j in range(4):
            sc0, mn0 = _scale_min(row, at, 2 * j)
            sc1, mn1 = _scale_min(row, at, 2 * j + 1)
            d0, d1 = d * sc0, d * sc1
            x0 = x[b * 256 + 64 * j : b * 256 + 64 * j + 32]
            x1 = x[b * 256 + 64 * j + 32 : b * 256 + 64 * j + 64]
            q = row[at + 16 + 32 * j : at + 48 + 32 * j]
            for l in range(32):
                v = q[l]
                acc[l] += np.float32(_and(v, _U15)) * (d0 * x0[l]) + np.float32(_shr(v, _U4)) * (d1 * x1[l])
            s -= dmin * (mn0 * xsum[b * 8 + 2 * j] + mn1 * xsum[b * 8 + 2 * j + 1])
    return acc.sum() + s


@jitable(inline=False)
def _dot_q5k(row, x, xsum, acc):
    # Q4_K's loop with a fifth bit per value: bit j of byte l of the 32 bytes at byte 16 for value
    # l of sub-block j, the nibbles at byte 48 (block of 176 bytes)
    acc[:] = 0.0
    s = np.float32(0.0)
    for b in range(xsum.shape[0] // 8):
        at = b * 176
        d = half(row, at)
        dmin = half(row, at + 2)
        h = row[at + 16 : at + 48]
        for j in range(4):
            sc0, mn0 = _scale_min(row, at, 2 * j)
            sc1, mn1 = _scale_min(row, at, 2 * j + 1)
            d0, d1 = d * sc0, d * sc1
            x0 = x[b * 256 + 64 * j : b * 256 + 64 * j + 32]
            x1 = x[b * 256 + 64 * j + 32 : b * 256 + 64 * j + 64]
            q = row[at + 48 + 32 * j : at + 80 + 32 * j]
            shift = np.uint8(2 * j)
            for l in range(32):
                v = q[l]
                hb = _shr(h[l], shift)
                lo = _or(_and(v, _U15), _shl(_and(hb, _U1), _U4))
                hi = _or(_shr(v, _U4), _shl(_and(hb, _U2), _U3))
                acc[l] += np.float32(lo) * (d0 * x0[l]) + np.float32(hi) * (d1 * x1[l])
            s -= dmin * (mn0 * xsum[b * 8 + 2 * j] + mn1 * xsum[b * 8 + 2 * j + 1])
    return acc.sum() + s


@jitable(inline=False)
def _dot_q6k(row, x, acc):
    # one Q6_K row times x (K,). Block: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8
    # scales, d (float16); each half h of 128 values: value 32k + l (k 0..3, l 0..31) is
    # ql[64h + 32(k & 1) + l]'s nibble k >> 1 | bits 2k of qh[32h + l] << 4, minus 32, times
    # d sc[8h + 2k + l // 16]
    acc[:] = 0.0
    for b in range(x.shape[0] // 256):
        at = b * 210
        d = half(row, at + 208)
        for h in range(2):
            ql = row[at + 64 * h : at + 64 * h + 64]
            qh = row[at + 128 + 32 * h : at + 128 + 32 * h + 32]
            xb = x[b * 256 + 128 * h : b * 256 + 128 * h + 128]
            for g in range(2):  # positions 16g..16g+15: one scale per k
                sc = at + 192 + 8 * h + g
                d0 = d * np.float32(np.int8(row[sc]))
                d1 = d * np.float32(np.int8(row[sc + 2]))
                d2 = d * np.float32(np.int8(row[sc + 4]))
                d3 = d * np.float32(np.int8(row[sc + 6]))
                for i in range(16):
                    l = 16 * g + i
                    a, c, e = ql[l], ql[32 + l], qh[l]
                    q0 = np.float32(_or(_and(a, _U15), _shl(_and(e, _U3), _U4))) - np.float32(32)
                    q1 = np.float32(_or(_and(c, _U15), _shl(_and(e, _U12), _U2))) - np.float32(32)
                    q2 = np.float32(_or(_shr(a, _U4), _and(e, _U48))) - np.float32(32)
                    q3 = np.float32(_or(_shr(c, _U4), _shr(_and(e, _U192), _U2))) - np.float32(32)
                    acc[l] += (
                        q0 * (d0 * xb[l]) + q1 * (d1 * xb[32 + l]) + q2 * (d2 * xb[64 + l]) + q3 * (d3 * xb[96 + l])
                    )
    return acc.sum()


@jitable(inline=False)
def dot_k(row, kind, x, xsum, acc):
    # one row of W (kind: a KIND_CODES value) times x (K,) in float32; xsum (K / 32,) x's sums
    # per 32 values (unread for Q6_K), acc (32,) float32 scratch
    if kind == 0:
        return _dot_q4k(row, x, xsum, acc)
    if kind == 1:
        return _dot_q5k(row, x, xsum, acc)
    return _dot_q6k(row, x, acc)


@jitable(inline=False)
def rows_times_k(x, xsum, blocks, kind, lo, hi, out):
    # out[m, o] = (x @ W.T)[m, o] for rows lo..hi of W and every row m of x (M, K), xsum (M, K / 32)
    acc = np.empty(32, np.float32)
    ahead = _blocks.rows_ahead(blocks)
    for o in range(lo, hi):
        row = blocks[o]
        _blocks.prefetch_row(blocks, o + ahead, hi)  # a row further on, from memory meanwhile
        for m in range(x.shape[0]):
            out[m, o] = dot_k(row, kind, x[m], xsum[m], acc)


def _rows_source(prange):
    def _product_rows(x, xsum, blocks, kind, out, parts):
        # out (M, N) = x (M, K) @ W.T, W's rows in `parts` contiguous ranges, one task each
        N = blocks.shape[0]
        for c in prange(parts):
            rows_times_k(x, xsum, blocks, kind, c * N // parts, (c + 1) * N // parts, out)

    return _product_rows


# The int8 variant (llama.cpp's q8_K idea, with quant.py's q8_0 activations): x as int8 blocks of
# 32 (``_blocks.activations``: xq (K,), dx and xsum (K / 32,)), each 32 values of W unpacked in
# registers and met with x's in one byte dot product (_simd.py), scaled by d sc_s dx into 8 float
# lanes, reduced once per row; the min term as in the float loop. A prompt's int8 groups
# (quant.groups_times) take a tile of rows unpacked to one byte a value (unpack_rows_k)


@jitable(inline=False)
def _unpack_q4k(row, at, w8):
    # w8[:256] = the Q4_K block at byte `at`'s quants, one byte a value, in the values' order
    # (the four pairs of sub-blocks in one loop: a loop per pair is unrolled unvectorized)
    q = row[at + 16 : at + 144]
    for l in range(32):
        a, b, c, e = q[l], q[32 + l], q[64 + l], q[96 + l]
        w8[l] = _and(a, _U15)
        w8[32 + l] = _shr(a, _U4)
        w8[64 + l] = _and(b, _U15)
        w8[96 + l] = _shr(b, _U4)
        w8[128 + l] = _and(c, _U15)
        w8[160 + l] = _shr(c, _U4)
        w8[192 + l] = _and(e, _U15)
        w8[224 + l] = _shr(e, _U4)


@jitable(inline=False)
def _unpack_q5k(row, at, w8):
    # w8[:256] = the Q5_K block at byte `at`'s quants (five bits), one byte a value
    h = row[at + 16 : at + 48]
    for j in range(4):
        q = row[at + 48 + 32 * j : at + 80 + 32 * j]
        w0 = w8[64 * j : 64 * j + 32]
        w1 = w8[64 * j + 32 : 64 * j + 64]
        shift = np.uint8(2 * j)
        for l in range(32):
            v = q[l]
            hb = _shr(h[l], shift)
            w0[l] = _or(_and(v, _U15), _shl(_and(hb, _U1), _U4))
            w1[l] = _or(_shr(v, _U4), _shl(_and(hb, _U2), _U3))


@jitable(inline=False)
def unpack_rows_k(blocks, fifth, r0, wq, d, correction, constant):
    # rows r0.. of a Q4_K (fifth 0) or Q5_K (fifth 1) W, as many as wq has, for a prompt's int8
    # groups (quant.groups_times): each sub-block of 32 as a block of the 32-value kinds, its
    # quants one byte a value (wq (rows, K)), d sc (d), 128 sum(q) (correction: x goes in as xq +
    # 128) and the constant -dmin mn (constant), (rows, K / 32) each
    nbytes = 176 if fifth else 144
    for r in range(wq.shape[0]):
        row = blocks[r0 + r]
        for b in range(d.shape[1] // 8):
            at = b * nbytes
            w8 = wq[r, b * 256 : b * 256 + 256]
            if fifth:
                _unpack_q5k(row, at, w8)
            else:
                _unpack_q4k(row, at, w8)
            scale, low = half(row, at), half(row, at + 2)
            for t in range(8):
                sc, mn = _scale_min(row, at, t)
                d[r, b * 8 + t] = scale * sc
                constant[r, b * 8 + t] = -low * mn
                q_sum = 0
                for j in range(32 * t, 32 * t + 32):
                    q_sum += np.int32(w8[j])
                correction[r, b * 8 + t] = 128 * q_sum


def _q45k_int8(fifth: bool) -> Any:
    """The int8 decoding loop of two Q4_K rows (``fifth`` false) or Q5_K rows: each 32 bytes of
    nibbles hold sub-blocks 2j (low) and 2j + 1 (high), met with x's 32 bytes where they lie
    (``_simd.dot_nibble_row``; Q5_K's fifth bits, bit 2j or 2j + 1 of the 32 bytes at byte 16:
    ``dot_fivebit_row``), ``fifth`` a compile-time constant. Two rows a pass share x's loads,
    each row keeps two chains of FMAs, and the loop is inlined into the rows' loop (a call per
    pair of rows cost a third of its time): 2.2 -> 1.2 ns a 32 values on a Zen 5 (Q4_K)."""
    nbytes, quants = (176, 48) if fifth else (144, 16)

    @jitable
    def dot(row, q, hat, j, shift, xq, xat):
        # sub-block 2j (shift 0) or 2j + 1 (shift 4) of a block, its quants at byte q
        if fifth:
            return dot_fivebit_row(row, q, shift, hat, 2 * j + shift // 4, xq, xat)
        return dot_nibble_row(row, q, shift, xq, xat)

    @jitable
    def dot_int8(r0, r1, xq, dx, xsum):
        # rows r0 and r1 times x as int8 blocks
        a0, b0, a1, b1 = zeros(), zeros(), zeros(), zeros()
        s0, s1 = np.float32(0.0), np.float32(0.0)
        for b in range(dx.shape[0] // 8):
            at = b * nbytes
            d0, m0, d1, m1 = half(r0, at), half(r0, at + 2), half(r1, at), half(r1, at + 2)
            for j in range(4):
                t, q, xat = b * 8 + 2 * j, at + quants + 32 * j, b * 256 + 64 * j
                x0, x1, xs0, xs1 = dx[t], dx[t + 1], xsum[t], xsum[t + 1]
                sc0, mn0 = _scale_min(r0, at, 2 * j)
                sc1, mn1 = _scale_min(r0, at, 2 * j + 1)
                a0 = fma(a0, dot(r0, q, at + 16, j, 0, xq, xat), d0 * sc0 * x0)
                b0 = fma(b0, dot(r0, q, at + 16, j, 4, xq, xat + 32), d0 * sc1 * x1)
                s0 -= m0 * (mn0 * xs0 + mn1 * xs1)
                sc0, mn0 = _scale_min(r1, at, 2 * j)
                sc1, mn1 = _scale_min(r1, at, 2 * j + 1)
                a1 = fma(a1, dot(r1, q, at + 16, j, 0, xq, xat), d1 * sc0 * x0)
                b1 = fma(b1, dot(r1, q, at + 16, j, 4, xq, xat + 32), d1 * sc1 * x1)
                s1 -= m1 * (mn0 * xs0 + mn1 * xs1)
        return total(add(a0, b0)) + s0, total(add(a1, b1)) + s1

    return dot_int8


_dot_q4k_int8, _dot_q5k_int8 = _q45k_int8(False), _q45k_int8(True)


@jitable
def _q6k_half(row, b, h, d, xq, dx, acc, acc1):
    # half h of one Q6_K row's block b: values 32k + l (k 0..3) from ql's nibble k >> 1
    # of byte 32 (k & 1) + l and qh's bits 2k of byte l, minus 32 (_simd.dot_sixbits, in
    # registers); values 0-15 and 16-31 of each 32 have scales of their own (lanes 0-3 and 4-7 of
    # the dot product: fma_halves). acc and acc1 updated
    at = b * 210
    ql, qh, sc, xat, t = at + 64 * h, at + 128 + 32 * h, at + 192 + 8 * h, b * 256 + 128 * h, b * 8 + 4 * h
    d0, d1 = d * np.float32(np.int8(row[sc])), d * np.float32(np.int8(row[sc + 1]))
    acc = fma_halves(acc, dot_sixbits(row, ql, 0, qh, 0, xq, xat), d0 * dx[t], d1 * dx[t])
    d0, d1 = d * np.float32(np.int8(row[sc + 2])), d * np.float32(np.int8(row[sc + 3]))
    acc1 = fma_halves(acc1, dot_sixbits(row, ql + 32, 0, qh, 2, xq, xat + 32), d0 * dx[t + 1], d1 * dx[t + 1])
    d0, d1 = d * np.float32(np.int8(row[sc + 4])), d * np.float32(np.int8(row[sc + 5]))
    acc = fma_halves(acc, dot_sixbits(row, ql, 4, qh, 4, xq, xat + 64), d0 * dx[t + 2], d1 * dx[t + 2])
    d0, d1 = d * np.float32(np.int8(row[sc + 6])), d * np.float32(np.int8(row[sc + 7]))
    acc1 = fma_halves(acc1, dot_sixbits(row, ql + 32, 4, qh, 6, xq, xat + 96), d0 * dx[t + 3], d1 * dx[t + 3])
    return acc, acc1


@jitable
def _dot_q6k_int8(r0, r1, xq, dx):
    # two Q6_K rows times x as int8 blocks, as _q45k_int8's loops: two rows a pass, two chains each
    a0, b0, a1, b1 = zeros(), zeros(), zeros(), zeros()
    for b in range(dx.shape[0] // 8):
        at = b * 210
        d0, d1 = half(r0, at + 208), half(r1, at + 208)
        for h in range(2):
            a0, b0 = _q6k_half(r0, b, h, d0, xq, dx, a0, b0)
            a1, b1 = _q6k_half(r1, b, h, d1, xq, dx, a1, b1)
    return total(add(a0, b0)), total(add(a1, b1))


@jitable(inline=False)
def rows_times_k_int8(xq, dx, xsum, blocks, kind, lo, hi, out):
    # rows_times_k with x (M, K) as int8 blocks: xq (M, K) int8, dx and xsum (M, K / 32)
    ahead = _blocks.rows_ahead(blocks)
    for o in range(lo, hi, 2):
        o1 = min(o + 1, hi - 1)  # an odd last row: row o twice
        r0, r1 = blocks[o], blocks[o1]
        _blocks.prefetch_row(blocks, o + ahead, hi)
        _blocks.prefetch_row(blocks, o1 + ahead, hi)
        for m in range(xq.shape[0]):
            if kind == 0:
                out[m, o], out[m, o1] = _dot_q4k_int8(r0, r1, xq[m], dx[m], xsum[m])
            elif kind == 1:
                out[m, o], out[m, o1] = _dot_q5k_int8(r0, r1, xq[m], dx[m], xsum[m])
            else:
                out[m, o], out[m, o1] = _dot_q6k_int8(r0, r1, xq[m], dx[m])


def _rows_source_int8(prange):
    def _product_rows_int8(xq, dx, xsum, blocks, kind, out, parts):
        # out (M, N) = x @ W.T, x as int8 blocks, W's rows in `parts` contiguous ranges
        N = blocks.shape[0]
        for c in prange(parts):
            rows_times_k_int8(xq, dx, xsum, blocks, kind, c * N // parts, (c + 1) * N // parts, out)

    return _product_rows_int8


@jitable(inline=False)
def _block_q4k(row, at, t):
    # t (256,) float32 = the Q4_K block at byte `at` of a row (layout as _dot_q4k)
    d = half(row, at)
    dmin = half(row, at + 2)
    for j in range(4):
        sc0, mn0 = _scale_min(row, at, 2 * j)
        sc1, mn1 = _scale_min(row, at, 2 * j + 1)
        d0, m0, d1, m1 = d * sc0, dmin * mn0, d * sc1, dmin * mn1
        q = row[at + 16 + 32 * j : at + 48 + 32 * j]
        t0 = t[64 * j : 64 * j + 32]
        t1 = t[64 * j + 32 : 64 * j + 64]
        for l in range(32):
            v = q[l]
            t0[l] = d0 * np.float32(_and(v, _U15)) - m0
            t1[l] = d1 * np.float32(_shr(v, _U4)) - m1


@jitable(inline=False)
def _block_q5k(row, at, t):
    # t (256,) float32 = the Q5_K block at byte `at` of a row (layout as _dot_q5k)
    d = half(row, at)
    dmin = half(row, at + 2)
    h = row[at + 16 : at + 48]
    for j in range(4):
        sc0, mn0 = _scale_min(row, at, 2 * j)
        sc1, mn1 = _scale_min(row, at, 2 * j + 1)
        d0, m0, d1, m1 = d * sc0, dmin * mn0, d * sc1, dmin * mn1
        q = row[at + 48 + 32 * j : at + 80 + 32 * j]
        t0 = t[64 * j : 64 * j + 32]
        t1 = t[64 * j + 32 : 64 * j + 64]
        shift = np.uint8(2 * j)
        for l in range(32):
            v = q[l]
            hb = _shr(h[l], shift)
            t0[l] = d0 * np.float32(_or(_and(v, _U15), _shl(_and(hb, _U1), _U4))) - m0
            t1[l] = d1 * np.float32(_or(_shr(v, _U4), _shl(_and(hb, _U2), _U3))) - m1


@jitable(inline=False)
def _block_q6k(row, at, t):
    # t (256,) float32 = the Q6_K block at byte `at` of a row (layout as _dot_q6k)
    d = half(row, at + 208)
    for h in range(2):
        ql = row[at + 64 * h : at + 64 * h + 64]
        qh = row[at + 128 + 32 * h : at + 128 + 32 * h + 32]
        th = t[128 * h : 128 * h + 128]
        for g in range(2):
            sc = at + 192 + 8 * h + g
            d0 = d * np.float32(np.int8(row[sc]))
            d1 = d * np.float32(np.int8(row[sc + 2]))
            d2 = d * np.float32(np.int8(row[sc + 4]))
            d3 = d * np.float32(np.int8(row[sc + 6]))
            for i in range(16):
                l = 16 * g + i
                a, c, e = ql[l], ql[32 + l], qh[l]
                th[l] = d0 * (np.float32(_or(_and(a, _U15), _shl(_and(e, _U3), _U4))) - np.float32(32))
                th[32 + l] = d1 * (np.float32(_or(_and(c, _U15), _shl(_and(e, _U12), _U2))) - np.float32(32))
                th[64 + l] = d2 * (np.float32(_or(_shr(a, _U4), _and(e, _U48))) - np.float32(32))
                th[96 + l] = d3 * (np.float32(_or(_shr(c, _U4), _shr(_and(e, _U192), _U2))) - np.float32(32))


@lazy_njit
def dequantize_tile_k(blocks, kind, r0, tile):
    # tile (R, K) float32 = dequantize(W)[r0 : r0 + R], W's blocks (N, K / 256 * bytes) uint8.
    # Serial, as quant._dequantize_tile (BLAS's threads do the product)
    nbytes = 210 if kind == 2 else (176 if kind == 1 else 144)
    for r in range(tile.shape[0]):
        row = blocks[r0 + r]
        for b in range(tile.shape[1] // 256):
            t = tile[r, b * 256 : b * 256 + 256]
            if kind == 0:
                _block_q4k(row, b * nbytes, t)
            elif kind == 1:
                _block_q5k(row, b * nbytes, t)
            else:
                _block_q6k(row, b * nbytes, t)


_product_rows = LazyJit(_rows_source(range), OPTIONS)
_product_rows_parallel = ParallelJit(_rows_source)
_product_rows_int8 = LazyJit(_rows_source_int8(range), OPTIONS)
_product_rows_int8_parallel = ParallelJit(_rows_source_int8)


# ----------------------------------------------------------------------------------------------
# the wrapper


def product(x2: np.ndarray, w: QuantizedWeight, out: np.ndarray, xsum: np.ndarray | None = None) -> None:
    """out (M, N) = x2 (M, K) @ dequantize(w).T for a weight of a kind in KINDS, on its blocks.

    Args:
        x2: float32 (M, K), C-contiguous.
        w: a QuantizedWeight of kind q4_k, q5_k or q6_k whose blocks are a NumPy array.
        out: float32 (M, N), written (a column slice of a wider output is fine).
        xsum: x2's sums per 32 values, float32 (M, K / 32), where the caller has them (a stack's
            parts share them); computed here when None, unread for more than MAX_ROWS rows.

    Up to ``_blocks.MAX_ROWS`` rows: the decoding loops, W's rows split over the BLAS threads;
    more: tiles of ``_blocks.TILE`` rows dequantized by numba, then ``np.matmul``.

    Example:
        >>> out = np.empty((1, w.shape[0]), np.float32)
        >>> product(x.reshape(1, -1), w, out)
    """
    M, K = x2.shape
    N = w.shape[0]
    kind = KIND_CODES[w.kind]
    blocks = _blocks.blocks_2d(w)
    if M <= _blocks.MAX_ROWS:
        if xsum is None:
            xsum = x2.reshape(M, K // 32, 32).sum(axis=-1)  # (M, K / 32)
        parts = _threads.chunks(N, _blocks.MIN_ROWS_PER_THREAD) or 1
        if parts > 1:
            _threads.launch(_product_rows_parallel, parts, x2, xsum, blocks, kind, out)
        else:
            _product_rows(x2, xsum, blocks, kind, out, 1)
        return
    tile = np.empty((min(_blocks.TILE, N), K), dtype=np.float32)
    for r0 in range(0, N, _blocks.TILE):
        rows = min(_blocks.TILE, N - r0)
        dequantize_tile_k(blocks, kind, r0, tile[:rows])
        np.matmul(x2, tile[:rows].T, out=out[:, r0 : r0 + rows])


def product_int8(x2: np.ndarray, w: QuantizedWeight, out: np.ndarray, acts: tuple | None = None) -> None:
    """:func:`product`, but up to ``_blocks.MAX_ROWS`` rows of x go in as int8 blocks of 32 and meet
    W's unpacked blocks in byte dot products (VNNI where the CPU has it), as quant.py's int8
    kernel does for Q8_0/Q4_0/Q4_1: a different rounding, within ``sum_j |W_q,j| dx_b / 2`` of the
    float product (W_q the part of W that multiplies the quants). More rows: :func:`product`.

    Args:
        acts: ``_blocks.activations(x2)`` (xq, dx, xsum) where the caller has them; else made here.
    """
    M, K = x2.shape
    if M > _blocks.MAX_ROWS:
        product(x2, w, out)
        return
    N = w.shape[0]
    kind = KIND_CODES[w.kind]
    blocks = _blocks.blocks_2d(w)
    xq, dx, xsum = _blocks.activations(x2) if acts is None else acts
    parts = _threads.chunks(N, _blocks.MIN_ROWS_PER_THREAD) or 1
    if parts > 1:
        _threads.launch(_product_rows_int8_parallel, parts, xq, dx, xsum, blocks, kind, out)
    else:
        _product_rows_int8(xq, dx, xsum, blocks, kind, out, 1)
