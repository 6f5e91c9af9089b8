"""The quantized linear layer on GGUF blocks: ``nn.quant.quantized_linear_forward`` (out = x @
dequantize(W).T + b) without a float32 copy of W: the blocks are read where they are (a
memory-mapped file), their float16 scales too.

Two kernels, by how they treat x:

- ``numba_quantized_linear`` (float32): up to MAX_ROWS rows of x (decoding), one pass over W's
  blocks in their stored order. Each row keeps 32 float32 accumulators, one per position in a
  block (``acc[j] += q_j * (d_b * x_j)``), reduced once per row: that loop shape vectorizes, where
  a sum per block does not (the probe in docs/performance.md). Each block's constant term (Q4_1's
  min m_b, Q4_0's -8 d_b, Q5_0's -16 d_b) multiplies the block's sum of x.
- ``numba_quantized_linear_int8``: the same, but for the kinds in INT8_KINDS the rows of x are first
  quantized to int8 blocks of 32 (``xq = round(x / dx_b)``, ``dx_b = max|x| / 127``, as
  llama.cpp's q8_0) and each block of W meets them in one byte dot product (``_simd.py``: VNNI's
  ``vpdpbusd``, or AVX2's ``vpmaddubsw`` then ``vpmaddwd``), its integer sum scaled by ``d_b
  dx_b`` into 8 float lanes. Each kind has its own loop (``_int8_rows``), which takes two rows of
  W a pass. 3-8x faster than the float loop (2.6-5x on a Zen 3's AVX2); chosen where the CPU has
  VNNI or AVX2.

Both split the rows of W over the threads BLAS may use now (``blas_thread_count``: the model's
runner holds it to the model's threads). More rows than MAX_ROWS (a prompt): tiles of TILE rows
of W are dequantized to float32 and multiplied with BLAS (``x @ tile.T``), so the float32 memory
is one tile. With VNNI (with AVX2 alone, every kind but Q8_0: ``groups_pay``), the int8 kernel
runs a prompt of up to GROUP_ROWS rows a thread in int8 instead (``groups_times``): x's rows in
groups of 8, one row a vector lane, so each 4 weights of W (a broadcast word) meet 8 rows in one
byte dot product; 4 rows of W share each load of x, and a tile of 16 rows of W is unpacked (Q4
nibbles to bytes, each block's scale and sum) once for all the groups. About 150-185 GFLOPS a
core, against float32 tiles' 45-145 (decoding a tile costs the same however few rows meet it);
with AVX2's two steps, 1.2-1.4x the tiles. The K-quants (q4_k, q5_k, q6_k) have their own loops, in
``kquant.py`` (a Q4_K or Q5_K prompt runs the int8 groups, each sub-block of 32 as a block);
what the kernels share (the rows decoding takes, x as int8 blocks) is in ``_blocks.py``.

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

import functools
from typing import Any

import numpy as np

from arraygpt.backends import numpy as backend  # the backend these arrays come from: its BLAS threads
from arraygpt.backends.numpy.kernels import _threads, kquant
from arraygpt.backends.numpy.kernels._blocks import (
    MAX_ROWS,
    MIN_ROWS_PER_THREAD,
    TILE,
    activations,
    blocks_2d,
    prefetch_row,
    quantize_block,
    rows_ahead,
)
from arraygpt.backends.numpy.kernels._jit import OPTIONS, LazyJit, ParallelJit, jitable, lazy_njit, loader
from arraygpt.backends.numpy.kernels._simd import (
    add,
    bytes32,
    dot_bytes,
    dot_dword,
    dot_dword_small,
    dot_fivebits,
    dot_nibbles,
    fma,
    fmav,
    half,
    has_avx2,
    has_vnni,
    int_zeros,
    lane,
    load8,
    nibbles,
    scale_add,
    splat,
    store32,
    total,
    zeros,
)
from arraygpt.errors import KernelUnavailable
from arraygpt.nn import quant
from arraygpt.nn.kernels import KernelSpec

GROUP = 8  # rows of x the int8 prompt loop carries at once: the 8 lanes of a vector
GROUP_ROWS = 512  # a prompt's rows a thread up to which the int8 groups beat float32 tiles and BLAS (measured)
W_TILE = 16  # rows of W the int8 prompt loop unpacks at a time and keeps in the L1 cache while the groups pass
KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


# ----------------------------------------------------------------------------------------------
# numba sources: each built with numba's prange, so that its rows run on several threads


@jitable
def dot_float(row, nbytes, start, high, offset, x, xsum, acc):
    # one row of W (its blocks' bytes, uint8) times x (K,): 32 float32 accumulators `acc`, one per
    # position in a block (acc[j] += q_j (d_b x_j)), reduced once. value = d_b q + min_b: Q8_0
    # (nbytes 34) int8 quants from byte 2; else nibbles at byte `start` (with `high`, a fifth bit
    # from the 4 bytes before them), min_b the float16 m_b at byte 2 (offset 0: Q4_1, Q5_1) or
    # -offset d_b (Q4_0: 8, Q5_0: 16), times the block's sum of x, xsum (nb,)
    acc[:] = 0.0
    s = np.float32(0.0)
    for b in range(xsum.shape[0]):
        at = b * nbytes
        db = half(row, at)
        xb = x[b * 32 : b * 32 + 32]
        if nbytes == 34:
            q8 = row[at + 2 : at + 34]
            for j in range(32):
                acc[j] += np.float32(np.int8(q8[j])) * (db * xb[j])
            continue
        q = row[at + start : at + start + 16]
        if high:
            h = row[at + start - 4 : at + start]
            qh = np.uint32(h[0]) | (np.uint32(h[1]) << 8) | (np.uint32(h[2]) << 16) | (np.uint32(h[3]) << 24)
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
        mb = half(row, at + 2) if offset == 0 else np.float32(-offset) * db
        s += mb * xsum[b]
    return acc.sum() + s


def _int8_rows(kind: str) -> Any:
    """rows_times' int8 loop for one kind, whose layout (bytes, first byte of the quants, fifth
    bit, offset) is compile-time constants here: LLVM folds the kind's branches and strides out
    of the block loop, and two rows of W a pass share x's loads. Either alone gained much less on a
    Zen 5 (one thread); together, 2-2.3x on Q4_1 and Q4_0, 1.3-1.7x on Q8_0 and the Q5 kinds."""
    nbytes, start, high, offset = _LAYOUT[kind]

    @jitable(inline=False)
    def int8_rows(xq, dx, xsum, blocks, lo, hi, out):
        # out[m, o] = (x @ W.T)[m, o] for rows lo..hi of W and each row m of x as int8 blocks (xq
        # (M, K), dx and xsum (M, nb)); two rows of W (o, o1) a pass share x's loads and scales.
        # Each block's byte dot product (_simd.py) times d_b dx_b goes to 8 float lanes, reduced
        # once; the constant term: m_b (a float16 at byte 2) or -offset d_b, times the block's sum of x
        ahead = rows_ahead(blocks)
        for o in range(lo, hi, 2):
            o1 = min(o + 1, hi - 1)  # an odd last row: row o twice
            r0, r1 = blocks[o], blocks[o1]
            prefetch_row(blocks, o + ahead, hi)  # rows further on, from memory meanwhile
            prefetch_row(blocks, o1 + ahead, hi)
            for m in range(xq.shape[0]):
                x, dxm, xsm = xq[m], dx[m], xsum[m]
                a0, a1 = zeros(), zeros()
                s0, s1 = np.float32(0.0), np.float32(0.0)
                for b in range(dxm.shape[0]):
                    at, d = b * nbytes, dxm[b]
                    d0, d1 = half(r0, at), half(r1, at)
                    if nbytes == 34:
                        a0 = fma(a0, dot_bytes(r0, at + 2, x, b * 32), d0 * d)
                        a1 = fma(a1, dot_bytes(r1, at + 2, x, b * 32), d1 * d)
                        continue
                    if high:
                        a0 = fma(a0, dot_fivebits(r0, at + start, x, b * 32), d0 * d)
                        a1 = fma(a1, dot_fivebits(r1, at + start, x, b * 32), d1 * d)
                    else:
                        a0 = fma(a0, dot_nibbles(r0, at + start, x, b * 32), d0 * d)
                        a1 = fma(a1, dot_nibbles(r1, at + start, x, b * 32), d1 * d)
                    if offset == 0:
                        s0 += half(r0, at + 2) * xsm[b]
                        s1 += half(r1, at + 2) * xsm[b]
                    else:  # times -offset after the loop (a power of two: the same sums)
                        s0 += d0 * xsm[b]
                        s1 += d1 * xsm[b]
                out[m, o] = total(a0) + s0 * np.float32(-offset if offset else 1)
                out[m, o1] = total(a1) + s1 * np.float32(-offset if offset else 1)

    return int8_rows


_LAYOUT = {  # kind -> where a block keeps its parts: (bytes, first byte of the quants, a fifth bit, offset)
    "q8_0": (34, 2, 0, 0),
    "q4_0": (18, 2, 0, 8),
    "q4_1": (20, 4, 0, 0),
    "q5_0": (22, 6, 1, 16),
    "q5_1": (24, 8, 1, 0),
}
_q8_0_rows, _q4_0_rows, _q4_1_rows, _q5_0_rows, _q5_1_rows = (_int8_rows(kind) for kind in KINDS)


@jitable
def rows_times(x, xq, dx, xsum, blocks, layout, lo, hi, out):
    # out[m, o] = (x @ W.T)[m, o] for rows lo..hi of W and every row m of x (M, K); layout =
    # (nbytes, start, high, offset, int8): with int8, x as int8 blocks (xq, dx, xsum), each
    # kind's own loop (_int8_rows)
    nbytes, start, high, offset, int8 = layout[0], layout[1], layout[2], layout[3], layout[4]
    if int8:
        if nbytes == 34:
            _q8_0_rows(xq, dx, xsum, blocks, lo, hi, out)
        elif nbytes == 18:
            _q4_0_rows(xq, dx, xsum, blocks, lo, hi, out)
        elif nbytes == 20:
            _q4_1_rows(xq, dx, xsum, blocks, lo, hi, out)
        elif nbytes == 22:
            _q5_0_rows(xq, dx, xsum, blocks, lo, hi, out)
        else:
            _q5_1_rows(xq, dx, xsum, blocks, lo, hi, out)
        return
    acc = np.empty(32, np.float32)
    ahead = rows_ahead(blocks)
    for o in range(lo, hi):
        row = blocks[o]
        prefetch_row(blocks, o + ahead, hi)  # a row further on, from memory meanwhile
        for m in range(x.shape[0]):
            out[m, o] = dot_float(row, nbytes, start, high, offset, x[m], xsum[m], acc)


@jitable(inline=False)
def unpack_rows(blocks, nbytes, start, high, offset, r0, wq, d, correction, constant):
    # rows r0.. of W (a kind in INT8_KINDS), as many as wq has, for groups_times: per block d_b (d),
    # 128 sum(q_b) (correction: x goes in as xq + 128), the constant m_b / -offset d_b (constant);
    # the nibble kinds' quants as bytes into wq (rows, K) (Q8_0's are read where they are)
    ones = np.ones(32, np.int8)
    for r in range(wq.shape[0]):
        row = blocks[r0 + r]
        for b in range(d.shape[1]):
            at = b * nbytes
            d[r, b] = half(row, at)
            if nbytes == 34:
                q_sum = total(fma(zeros(), dot_bytes(row, at + 2, ones, 0), np.float32(1.0)))
                constant[r, b] = 0.0
            else:
                store32(nibbles(row, at + start), wq[r], b * 32)
                if high:  # the fifth bits: bit j of the 4 bytes before the nibbles for value j
                    for j in range(32):
                        wq[r, b * 32 + j] |= ((row[at + start - 4 + j // 8] >> (j % 8)) & 1) << 4
                    q_sum = total(fma(zeros(), dot_fivebits(row, at + start, ones, 0), np.float32(1.0)))
                else:
                    q_sum = total(fma(zeros(), dot_nibbles(row, at + start, ones, 0), np.float32(1.0)))
                constant[r, b] = half(row, at + 2) if offset == 0 else np.float32(-offset) * d[r, b]
            correction[r, b] = np.int32(128) * np.int32(q_sum)


def _groups_loop(dot: Any) -> Any:
    """groups_times' loop with ``dot``, the byte dot product of 4 weights: ``dot_dword`` for
    Q8_0's signed bytes, ``dot_dword_small`` for the other kinds' unpacked quants (0-63), which
    AVX2 sums exactly in its two int16 steps."""

    @jitable(inline=False)
    def groups_loop(xt, dx, xsum, blocks, layout, lo, hi, out):
        # out[m, o] = (x @ W.T)[m, o] for rows lo..hi of W (GROUP_KINDS), x (M, K) in groups of
        # GROUP rows as group_activations lays them out: xt (G, nb 256) uint8 (xq + 128, each block as
        # (4-byte word j, row, byte)), dx and xsum (G, nb GROUP) the blocks' scales and sums of x.
        # Each 4 weights meet the group's 8 rows in one byte dot product (one row a lane), 4 rows of W
        # at a time sharing the loads of x; two chains of words a row (a product's latency)
        nbytes, start, high, offset = layout[0], layout[1], layout[2], layout[3]
        M, nb = out.shape[0], dx.shape[1] // GROUP
        q8 = nbytes == 34
        stride, skip = (nbytes, 2) if q8 else (32, 0)  # where block b's quants start: b stride + skip
        wq = np.empty((W_TILE, nb * 32), np.uint8)
        d, constant = np.empty((W_TILE, nb), np.float32), np.empty((W_TILE, nb), np.float32)
        correction = np.empty((W_TILE, nb), np.int32)
        for tile in range(lo, hi, W_TILE):
            rows = min(W_TILE, hi - tile)
            if nbytes in (144, 176):  # Q4_K, Q5_K: each sub-block of 32 as a block
                kquant.unpack_rows_k(blocks, nbytes == 176, tile, wq[:rows], d, correction, constant)
            else:
                unpack_rows(blocks, nbytes, start, high, offset, tile, wq[:rows], d, correction, constant)
            for g in range(xt.shape[0]):
                x, dxg, xsg, m = xt[g], dx[g], xsum[g], g * GROUP
                for r in range(0, rows, 4):
                    r0, r1, r2, r3 = r, min(r + 1, rows - 1), min(r + 2, rows - 1), min(r + 3, rows - 1)
                    if q8:
                        w0, w1, w2, w3 = blocks[tile + r0], blocks[tile + r1], blocks[tile + r2], blocks[tile + r3]
                    else:
                        w0, w1, w2, w3 = wq[r0], wq[r1], wq[r2], wq[r3]
                    f0, f1, f2, f3 = zeros(), zeros(), zeros(), zeros()  # the byte products' sums, scaled
                    c0, c1, c2, c3 = zeros(), zeros(), zeros(), zeros()  # the constant terms
                    for b in range(nb):
                        xat, wat, at = b * 32 * GROUP, b * stride + skip, b * GROUP
                        p0, p1, p2, p3 = int_zeros(), int_zeros(), int_zeros(), int_zeros()
                        q0, q1, q2, q3 = int_zeros(), int_zeros(), int_zeros(), int_zeros()
                        for j in range(4):
                            v = bytes32(x, xat + 32 * j)
                            p0, p1 = dot(p0, v, w0, wat + 4 * j), dot(p1, v, w1, wat + 4 * j)
                            p2, p3 = dot(p2, v, w2, wat + 4 * j), dot(p3, v, w3, wat + 4 * j)
                            v = bytes32(x, xat + 32 * (j + 4))
                            q0, q1 = dot(q0, v, w0, wat + 4 * (j + 4)), dot(q1, v, w1, wat + 4 * (j + 4))
                            q2, q3 = dot(q2, v, w2, wat + 4 * (j + 4)), dot(q3, v, w3, wat + 4 * (j + 4))
                        f0 = scale_add(f0, p0, q0, correction[r0, b], dxg, at, d[r0, b])
                        f1 = scale_add(f1, p1, q1, correction[r1, b], dxg, at, d[r1, b])
                        f2 = scale_add(f2, p2, q2, correction[r2, b], dxg, at, d[r2, b])
                        f3 = scale_add(f3, p3, q3, correction[r3, b], dxg, at, d[r3, b])
                        if not q8:
                            sums = load8(xsg, at)
                            c0, c1 = fmav(c0, sums, splat(constant[r0, b])), fmav(c1, sums, splat(constant[r1, b]))
                            c2, c3 = fmav(c2, sums, splat(constant[r2, b])), fmav(c3, sums, splat(constant[r3, b]))
                    f0, f1, f2, f3 = add(f0, c0), add(f1, c1), add(f2, c2), add(f3, c3)
                    for i in range(min(GROUP, M - m)):
                        out[m + i, tile + r0], out[m + i, tile + r1] = lane(f0, i), lane(f1, i)
                        out[m + i, tile + r2], out[m + i, tile + r3] = lane(f2, i), lane(f3, i)

    return groups_loop


_groups_full, _groups_small = _groups_loop(dot_dword), _groups_loop(dot_dword_small)


@jitable
def groups_times(xt, dx, xsum, blocks, layout, lo, hi, out):
    # out[m, o] = (x @ W.T)[m, o] for rows lo..hi of W (GROUP_KINDS), x in groups (_groups_loop)
    if layout[0] == 34:
        _groups_full(xt, dx, xsum, blocks, layout, lo, hi, out)
    else:
        _groups_small(xt, dx, xsum, blocks, layout, lo, hi, out)


def _groups_source(prange: Any) -> Any:
    def _product_groups(xt, dx, xsum, blocks, layout, out, parts):
        # out (M, N) = x (M, K) @ W.T, x in groups (groups_times), W's rows in `parts` ranges
        N = blocks.shape[0]
        for c in prange(parts):
            groups_times(xt, dx, xsum, blocks, layout, c * N // parts, (c + 1) * N // parts, out)

    return _product_groups


def _rows_source(prange: Any) -> Any:
    def _product_rows(x, xq, dx, xsum, blocks, layout, out, parts):
        # out (M, N) = x (M, K) @ W.T, W's rows in `parts` contiguous ranges, one task each
        N = blocks.shape[0]
        for c in prange(parts):
            rows_times(x, xq, dx, xsum, blocks, layout, c * N // parts, (c + 1) * N // parts, out)

    return _product_rows


@lazy_njit
def _quantize_groups(x, xt, dx, xsum):
    # group_activations' layout: each block of each row of x (M, K) quantized, plus 128, into place
    M = x.shape[0]
    q = np.empty(32, np.int8)
    for m in range(xt.shape[0] * GROUP):
        g, i = m // GROUP, m % GROUP
        for b in range(dx.shape[1] // GROUP):
            if m < M:
                dx[g, b * GROUP + i], xsum[g, b * GROUP + i], _ = quantize_block(x[m, b * 32 : b * 32 + 32], q)
            else:  # the last group's padding
                q[:] = 0
                dx[g, b * GROUP + i], xsum[g, b * GROUP + i] = 0.0, 0.0
            at = b * 32 * GROUP + 4 * i
            for j in range(8):
                for k in range(4):
                    xt[g, at + 32 * j + k] = np.uint8(np.int32(q[4 * j + k]) + 128)


@lazy_njit
def _dequantize_tile(blocks, nbytes, start, high, offset, r0, tile):
    # tile (R, K) float32 = dequantize(W)[r0 : r0 + R]; blocks (N, nb * nbytes) uint8;
    # nbytes 34: Q8_0 (int8 quants), else the nibble kinds as in dot_float. On this thread
    # alone: BLAS's threads do the product, and numba's workers spinning beside them made a
    # 256-token prefill 8x slower on 2 cores
    nb = blocks.shape[1] // nbytes
    for r in range(tile.shape[0]):
        row = blocks[r0 + r]
        for b in range(nb):
            at, base = b * nbytes, b * 32
            db = half(row, at)
            if nbytes == 34:
                for j in range(32):
                    v = np.int32(row[at + 2 + j])
                    tile[r, base + j] = db * np.float32(v - 256 if v >= 128 else v)
                continue
            mb = half(row, at + 2) if offset == 0 else np.float32(-offset) * db
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


_product_rows = LazyJit(_rows_source(range), OPTIONS)
_product_rows_parallel = ParallelJit(_rows_source)
_product_groups = LazyJit(_groups_source(range), OPTIONS)
_product_groups_parallel = ParallelJit(_groups_source)


# ----------------------------------------------------------------------------------------------
# the wrappers


INT8_KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # the kinds the int8 kernel sums with byte dot products
GROUP_KINDS = (*INT8_KINDS, "q4_k", "q5_k")  # the kinds of a prompt's int8 groups


@functools.cache
def layout(kind: str, int8: bool) -> np.ndarray:
    """The int64 (5,) ``layout`` of ``rows_times`` for a kind (one array per kind, never written):
    its block's bytes, the first byte of its quants, whether a fifth bit precedes them, its
    offset (0: a float16 min at byte 2), and whether x goes in as int8 blocks (``int8`` asked and
    the kind has that path)."""
    if kind in kquant.KINDS:  # a prompt's int8 groups only: the block's bytes say the kind
        return np.array([quant.BLOCKS[kind][1], 0, 0, 0, 1], dtype=np.int64)
    return np.array([*_LAYOUT[kind], int(int8 and kind in INT8_KINDS)], dtype=np.int64)


def groups_pay(M: int, kinds: set[str] | frozenset[str]) -> bool:
    """Whether a prompt of M rows on weights of these kinds goes to the int8 groups rather than
    float32 tiles and BLAS: up to GROUP_ROWS rows a thread (the groups run on every thread, a
    tile's decoding on one), where the CPU has VNNI, or AVX2 and no Q8_0 among the kinds. Q8_0's
    byte products (unsigned x by full-range signed weights: sums of two that overflow AVX2's
    int16 step) run in portable code without VNNI, about 6x slower than float32 tiles on a Zen 3."""
    byte_products = has_vnni() or (has_avx2() and "q8_0" not in kinds)
    return M <= GROUP_ROWS * (backend.blas_thread_count() or 1) and byte_products


def group_activations(x2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x2 (M, K) as int8 blocks (quantize_block) in groups of GROUP rows, the last padded with
    zeros, for ``groups_times``: xt (G, nb * 256) uint8, xq + 128, each block's 8 rows as 8 words
    of 4 bytes a row (word j of every row, then word j + 1); dx and xsum (G, nb * GROUP) the
    blocks' scales and sums of x."""
    M, K = x2.shape
    G, nb = -(-M // GROUP), K // 32
    xt, dx, xsum = (
        np.empty((G, nb * 32 * GROUP), np.uint8),
        np.empty((G, nb * GROUP), np.float32),
        np.empty((G, nb * GROUP), np.float32),
    )
    _quantize_groups(x2, xt, dx, xsum)
    return xt, dx, xsum


class QuantizedLinearCache(quant.QuantizedLinearCache):
    """The reference's cache (a subclass, so the reference's backward reads it)."""


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
    kinds = {p.kind for p in parts}
    acts = None  # x2 as the loops read it (once for all parts): int8 blocks (in groups), or x2 and its block sums
    if M <= MAX_ROWS:
        int8 = int8 and bool(kinds & {*INT8_KINDS, *kquant.KINDS})
        if int8:
            acts = activations(x2)
        else:
            xsum = x2.reshape(M, K // 32, 32).sum(axis=-1)  # (M, nb)
            acts = (x2.view(np.int8), xsum, xsum)  # xq and dx unread on the float path
    else:
        int8 = int8 and bool(kinds & set(GROUP_KINDS)) and groups_pay(M, kinds)
        if int8:
            acts = group_activations(x2)
    start = 0
    for part in parts:
        _product(x2, part, out[:, start : start + part.shape[0]], acts, int8)
        start += part.shape[0]
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], N), QuantizedLinearCache(x, w, b is not None)


def quantized_linear_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, Any]:
    """``nn.quant.quantized_linear_pair_forward`` on the blocks, in float32: x (..., in) -> (...,
    out), a stack part by part. What :func:`takes` refuses goes to the reference."""
    return _forward(x, w, b, int8=False)


def quantized_linear_int8_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, Any]:
    """:func:`quantized_linear_forward`, but up to MAX_ROWS rows of x on INT8_KINDS
    weights are quantized to int8 blocks first (as llama.cpp's q8 dot products do) and summed with
    byte dot products: a different rounding, bounded in docs/gguf.md ("Quantized weights")."""
    return _forward(x, w, b, int8=True)


def _product(x2: np.ndarray, w: quant.QuantizedWeight, out: np.ndarray, acts: Any, int8: bool) -> None:
    """out (M, N) = x2 (M, K) @ dequantize(w).T, on the blocks (the K-quants: ``kquant.py``);
    ``acts`` of x2 as ``_forward`` made them, read as int8 blocks where ``int8`` and the kind has
    that path."""
    M, K = x2.shape
    N = w.shape[0]
    if w.kind in kquant.KINDS and (M <= MAX_ROWS or not int8 or w.kind not in GROUP_KINDS):
        if M <= MAX_ROWS and int8:
            kquant.product_int8(x2, w, out, acts)
        else:
            kquant.product(x2, w, out, acts[2] if M <= MAX_ROWS else None)
        return
    blocks = blocks_2d(w)
    if M <= MAX_ROWS or (int8 and w.kind in GROUP_KINDS):
        if M <= MAX_ROWS:
            kernels, args = (_product_rows, _product_rows_parallel), (x2, *acts, blocks, layout(w.kind, int8), out)
        else:
            kernels, args = (_product_groups, _product_groups_parallel), (*acts, blocks, layout(w.kind, True), out)
        parts = _threads.chunks(N, MIN_ROWS_PER_THREAD) or 1
        if parts > 1:
            _threads.launch(kernels[1], parts, *args)
        else:
            kernels[0](*args, 1)
    else:
        nbytes, start, high, offset = _LAYOUT[w.kind]
        tile = np.empty((min(TILE, N), K), dtype=np.float32)
        for r0 in range(0, N, TILE):
            rows = min(TILE, N - r0)
            _dequantize_tile(blocks, nbytes, start, high, offset, r0, tile[:rows])
            np.matmul(x2, tile[:rows].T, out=out[:, r0 : r0 + rows])


def _int8_declines(config: Any, backend: Any, dtype: str) -> str | None:
    try:
        byte_products = has_vnni() or has_avx2()
    except KernelUnavailable as e:
        return str(e)
    return None if byte_products else "no byte products (VNNI or AVX2) on this CPU, which the int8 path needs"


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
        "to int8 blocks and byte dot products (VNNI or AVX2), as llama.cpp's q8 products",
    ),
}
