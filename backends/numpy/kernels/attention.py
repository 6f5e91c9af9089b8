"""Causal (and grouped-query) attention over the causal half only: ``layers.attention_forward`` /
``attention_backward``.

The formulas are the reference's (``arraygpt/nn/layers.py``: y = softmax(q k^T / sqrt(hs) +
mask) v per head; the backward's ds = a (da - dy . y), as FlashAttention computes the row sums).
Queries go in blocks of TILE rows, each block's scores and output against only the keys it sees
(BLAS matmuls), so masked blocks are never computed; the masked softmax and its backward are one
fused numba pass per row each. A KV cache (queries at the end of longer keys) and grouped-query
attention are taken; dropout and any argument it does not know go to the reference. A decode step
(at most DECODE_ROWS query rows) is one numba pass over the cached keys and values instead: for so
few rows, the NumPy calls around BLAS's products cost more than the products. Training's shapes
(float32, no KV cache, T and the head size multiples of 16, T <= MAX_TILED_T) go per head in
tiles instead: each product of the forward and backward (q k^T, probs v, dy v^T, ds k, ds^T q,
probs^T dy) as tiles summed in registers (:func:`product_tiles`: 8 rows x 32 or 16 lanes with
AVX-512, 4 x 16 with AVX2's fewer registers), the causal blocks skipped, the masked softmax 16
lanes at a time, q, k and v read in place and dq, dk, dv written in the (B, T, .) layout: no
batched BLAS calls of a few thousand products each, no copies into heads and back.

Checked by tests/test_kernels.py, section "attention.py".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels import _threads
from arraygpt.backends.numpy.kernels._arrays import floats, rows
from arraygpt.backends.numpy.kernels._jit import OPTIONS, LazyJit, ParallelJit, jitable, lazy_njit, loader
from arraygpt.backends.numpy.kernels._simd import (
    add16,
    below16,
    exp16,
    fill16,
    fma16,
    has_avx512,
    hmax16,
    hsum16,
    load16,
    max16,
    mul16,
    splat16,
    store16,
    zeros16,
)
from arraygpt.backends.numpy.kernels._vecmath import softmax_into
from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelSpec

TILE = 64  # query rows per block: a block of queries needs the keys up to its last row only
DECODE_ROWS = 4  # up to this many query rows: one numba pass (decoding), not BLAS's batched products
MIN_KEYS_PER_THREAD = 16384  # cached key values (positions x head size) a decoding thread reads at least
LANES = 16  # float32 values in one AVX-512 register (two of AVX2's): the head tiles' columns
TILE_ROWS = 8  # rows of a head tile, its 8 x 16 or 8 x 32 sums held in registers
MAX_TILED_T = 512  # longer: the backward's column reads of ds stride a whole row (T=1024: tiles and BLAS even)


class FusedAttentionCache(layers.AttentionCache):
    """The fused attention's cache: the reference's fields, with q, k, v C-contiguous (B, NH, T, hs)."""

    __slots__ = ()


class TiledAttentionCache(FusedAttentionCache):
    """The head tiles' cache: q, k, v (B, NH, T, hs) views of the scaled q and of k and v as
    (B, T, NH hs) rows, as :func:`_heads_backward` reads them."""

    __slots__ = ()


def _blocks(T: int) -> list[tuple[int, int]]:
    return [(i0, min(T, i0 + TILE)) for i0 in range(0, T, TILE)]


def _split(x: Any, n_head: int) -> Any:  # (B, T, D) -> C-contiguous (B, NH, T, hs)
    B, T, D = x.shape
    return np.ascontiguousarray(x.reshape(B, T, n_head, D // n_head).transpose(0, 2, 1, 3))


def _merge(x: Any) -> Any:  # (B, NH, T, hs) -> C-contiguous (B, T, D)
    B, NH, T, hs = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(B, T, NH * hs)


def _mT(x: Any) -> Any:  # the last two axes swapped (a view)
    return np.swapaxes(x, -1, -2)


@lazy_njit
def _causal_softmax(probs, past):
    # probs (B, NH, T, Tk) holds the scores q k^T where computed; in place, each row becomes
    # softmax over the keys query i sees (0 .. past + i, past = Tk - T) and 0 after them: the
    # reference's "+ causal_mask, - max, exp, / sum" in one pass per row
    B, NH, T, Tk = probs.shape
    zero = np.zeros(1, probs.dtype)[0]
    for b in range(B):
        for h in range(NH):
            for i in range(T):
                n = past + i + 1
                p = probs[b, h, i]
                softmax_into(p, p, n, zero)
                for j in range(n, Tk):
                    p[j] = zero


@jitable
def attend_row(qi, k, v, kv, n, p, yi, zero):
    # one query row qi (hs,) (already scaled) against the first n keys of k, v (Tk, Dkv), at
    # column kv (its key/value head): p[:n] = softmax(k[:n] qi), yi (hs,) = p[:n] v[:n]
    hs = qi.shape[0]
    for j in range(n):
        kj = k[j, kv : kv + hs]
        s = zero
        for d in range(hs):
            s += qi[d] * kj[d]
        p[j] = s
    softmax_into(p, p, n, zero)
    yi[:] = zero
    for j in range(n):
        pj, vj = p[j], v[j, kv : kv + hs]
        for d in range(hs):
            yi[d] += pj * vj[d]


def _rows_source(prange: Any) -> Any:
    def _attention_rows(q, k, v, scale, qh, probs, y, parts):
        # the reference's attention for a few query rows at the end of the keys (a decode step):
        # q (B, T, D), k and v (B, Tk, Dkv) read in place (views of the KV cache); per head and
        # row, qh = q scale, scores against the keys the row sees, the masked softmax, y = probs v.
        # Query head h uses key/value head h // G (transformers' repeat_kv order). The (batch
        # row, head) pairs in `parts` contiguous ranges, one task each
        B, T, D = q.shape
        NH, hs = qh.shape[1], qh.shape[3]
        Tk = k.shape[1]
        G = NH // (k.shape[2] // hs)
        past = Tk - T
        zero = np.zeros(1, q.dtype)[0]
        for c in prange(parts):
            for bh in range(c * B * NH // parts, (c + 1) * B * NH // parts):
                b, h = bh // NH, bh % NH
                for i in range(T):
                    qi, n, p = qh[b, h, i], past + i + 1, probs[b, h, i]
                    qrow = q[b, i, h * hs : (h + 1) * hs]
                    for d in range(hs):
                        qi[d] = qrow[d] * scale
                    attend_row(qi, k[b], v[b], (h // G) * hs, n, p, y[b, i, h * hs : (h + 1) * hs], zero)
                    for j in range(n, Tk):
                        p[j] = zero

    return _attention_rows


_attention_rows = LazyJit(_rows_source(range), OPTIONS)  # one part: no parallel launch
_attention_rows_parallel = ParallelJit(_rows_source)


@jitable(inline=False)
def _put(acc, c, at, scale, accumulate):  # c[at:at+16] (+)= acc * scale
    acc = mul16(acc, scale)
    if accumulate:
        acc = add16(acc, load16(c, at))
    store16(acc, c, at)


@jitable(inline=False)
def product_tile(n, a, at, a_row, a_step, b, bt, b_step, c, ct, c_row, scale, accumulate):
    # TILE_ROWS x LANES values of a product: for r < 8, c[ct + r c_row :+16] (+)= scale * the sum
    # over k < n of a[at + r a_row + k a_step] * b[bt + k b_step :+16]. The 8 sums stay in
    # registers, and each loaded vector of b serves all 8
    c0, c1, c2, c3 = zeros16(), zeros16(), zeros16(), zeros16()
    c4, c5, c6, c7 = zeros16(), zeros16(), zeros16(), zeros16()
    for k in range(n):
        bk, ak = load16(b, bt + k * b_step), at + k * a_step
        c0 = fma16(c0, splat16(a, ak), bk)
        c1 = fma16(c1, splat16(a, ak + a_row), bk)
        c2 = fma16(c2, splat16(a, ak + 2 * a_row), bk)
        c3 = fma16(c3, splat16(a, ak + 3 * a_row), bk)
        c4 = fma16(c4, splat16(a, ak + 4 * a_row), bk)
        c5 = fma16(c5, splat16(a, ak + 5 * a_row), bk)
        c6 = fma16(c6, splat16(a, ak + 6 * a_row), bk)
        c7 = fma16(c7, splat16(a, ak + 7 * a_row), bk)
    _put(c0, c, ct, scale, accumulate)
    _put(c1, c, ct + c_row, scale, accumulate)
    _put(c2, c, ct + 2 * c_row, scale, accumulate)
    _put(c3, c, ct + 3 * c_row, scale, accumulate)
    _put(c4, c, ct + 4 * c_row, scale, accumulate)
    _put(c5, c, ct + 5 * c_row, scale, accumulate)
    _put(c6, c, ct + 6 * c_row, scale, accumulate)
    _put(c7, c, ct + 7 * c_row, scale, accumulate)


@jitable(inline=False)
def product_tile32(n, a, at, a_row, a_step, b, bt, b_step, c, ct, c_row, scale, accumulate):
    # product_tile over 2 x LANES columns: 16 sums in registers, each broadcast of a serving two
    # vectors of b. Eight chains of FMAs (product_tile) just cover the FMA units' latency, so any
    # stall idles them; sixteen keep them busy (1.2-1.7x faster at shakespeare-char's heads)
    c0, c1, c2, c3 = zeros16(), zeros16(), zeros16(), zeros16()
    c4, c5, c6, c7 = zeros16(), zeros16(), zeros16(), zeros16()
    d0, d1, d2, d3 = zeros16(), zeros16(), zeros16(), zeros16()
    d4, d5, d6, d7 = zeros16(), zeros16(), zeros16(), zeros16()
    for k in range(n):
        bk, ak = bt + k * b_step, at + k * a_step
        lo, hi = load16(b, bk), load16(b, bk + LANES)
        s = splat16(a, ak)
        c0, d0 = fma16(c0, s, lo), fma16(d0, s, hi)
        s = splat16(a, ak + a_row)
        c1, d1 = fma16(c1, s, lo), fma16(d1, s, hi)
        s = splat16(a, ak + 2 * a_row)
        c2, d2 = fma16(c2, s, lo), fma16(d2, s, hi)
        s = splat16(a, ak + 3 * a_row)
        c3, d3 = fma16(c3, s, lo), fma16(d3, s, hi)
        s = splat16(a, ak + 4 * a_row)
        c4, d4 = fma16(c4, s, lo), fma16(d4, s, hi)
        s = splat16(a, ak + 5 * a_row)
        c5, d5 = fma16(c5, s, lo), fma16(d5, s, hi)
        s = splat16(a, ak + 6 * a_row)
        c6, d6 = fma16(c6, s, lo), fma16(d6, s, hi)
        s = splat16(a, ak + 7 * a_row)
        c7, d7 = fma16(c7, s, lo), fma16(d7, s, hi)
    _put(c0, c, ct, scale, accumulate)
    _put(d0, c, ct + LANES, scale, accumulate)
    _put(c1, c, ct + c_row, scale, accumulate)
    _put(d1, c, ct + c_row + LANES, scale, accumulate)
    _put(c2, c, ct + 2 * c_row, scale, accumulate)
    _put(d2, c, ct + 2 * c_row + LANES, scale, accumulate)
    _put(c3, c, ct + 3 * c_row, scale, accumulate)
    _put(d3, c, ct + 3 * c_row + LANES, scale, accumulate)
    _put(c4, c, ct + 4 * c_row, scale, accumulate)
    _put(d4, c, ct + 4 * c_row + LANES, scale, accumulate)
    _put(c5, c, ct + 5 * c_row, scale, accumulate)
    _put(d5, c, ct + 5 * c_row + LANES, scale, accumulate)
    _put(c6, c, ct + 6 * c_row, scale, accumulate)
    _put(d6, c, ct + 6 * c_row + LANES, scale, accumulate)
    _put(c7, c, ct + 7 * c_row, scale, accumulate)
    _put(d7, c, ct + 7 * c_row + LANES, scale, accumulate)


@jitable(inline=False)
def product_tile4(n, a, at, a_row, a_step, b, bt, b_step, c, ct, c_row, scale, accumulate):
    # product_tile over 4 rows: 4 sums of 16 lanes, which AVX2 holds in 8 of its 16 registers
    # (8 chains of FMAs, as many as its two FMA units need) with room for b and a broadcast
    c0, c1, c2, c3 = zeros16(), zeros16(), zeros16(), zeros16()
    for k in range(n):
        bk, ak = load16(b, bt + k * b_step), at + k * a_step
        c0 = fma16(c0, splat16(a, ak), bk)
        c1 = fma16(c1, splat16(a, ak + a_row), bk)
        c2 = fma16(c2, splat16(a, ak + 2 * a_row), bk)
        c3 = fma16(c3, splat16(a, ak + 3 * a_row), bk)
    _put(c0, c, ct, scale, accumulate)
    _put(c1, c, ct + c_row, scale, accumulate)
    _put(c2, c, ct + 2 * c_row, scale, accumulate)
    _put(c3, c, ct + 3 * c_row, scale, accumulate)


@jitable(inline=False)
def tiles_avx512(n, a, at, a_row, a_step, b, bt, b_step, c, ct, c_row, scale, accumulate, width):
    # 8 rows of a product over `width` columns (a multiple of LANES) in tiles whose sums fill half
    # of AVX-512's 32 registers: 8 x 32 (product_tile32), then 8 x 16 for the rest
    j = 0
    while j + 2 * LANES <= width:
        product_tile32(n, a, at, a_row, a_step, b, bt + j, b_step, c, ct + j, c_row, scale, accumulate)
        j += 2 * LANES
    if j < width:
        product_tile(n, a, at, a_row, a_step, b, bt + j, b_step, c, ct + j, c_row, scale, accumulate)


@jitable(inline=False)
def tiles_avx2(n, a, at, a_row, a_step, b, bt, b_step, c, ct, c_row, scale, accumulate, width):
    # tiles_avx512's product in 4 x 16 tiles (product_tile4), two per 16 columns: AVX2's 16
    # registers of 8 lanes cannot hold product_tile's 8 sums of 16 lanes (attention 1.2-1.6x faster
    # on a Zen 3 than with tiles_avx512)
    for j in range(0, width, LANES):
        product_tile4(n, a, at, a_row, a_step, b, bt + j, b_step, c, ct + j, c_row, scale, accumulate)
        product_tile4(
            n, a, at + 4 * a_row, a_row, a_step, b, bt + j, b_step, c, ct + 4 * c_row + j, c_row, scale, accumulate
        )


@jitable(inline=False)
def product_tiles(n, a, at, a_row, a_step, b, bt, b_step, c, ct, c_row, scale, accumulate, width):
    # TILE_ROWS rows of a product over `width` columns (a multiple of LANES): for r < 8 and
    # j < width, c[ct + r c_row + j] (+)= scale * the sum over k < n of a[at + r a_row + k a_step]
    # * b[bt + k b_step + j], in the tiles that fit the registers of the CPU compiled for
    if has_avx512():
        tiles_avx512(n, a, at, a_row, a_step, b, bt, b_step, c, ct, c_row, scale, accumulate, width)
    else:
        tiles_avx2(n, a, at, a_row, a_step, b, bt, b_step, c, ct, c_row, scale, accumulate, width)


@jitable(inline=False)
def _softmax_tiles(p, at, n, T):
    # p[at : at + T], T a multiple of 16: in place, the softmax of its first n values, 0 after them
    # (the reference's "+ causal_mask, - max, exp, / sum"), 16 lanes at a time
    ninf, zero = np.float32(-np.inf), np.float32(0.0)
    top = fill16(ninf)
    for c in range(0, n, LANES):
        top = max16(top, below16(load16(p, at + c), n - c, ninf))
    minus_top, total = fill16(-hmax16(top)), zeros16()
    for c in range(0, n, LANES):
        e = below16(exp16(add16(load16(p, at + c), minus_top)), n - c, zero)
        store16(e, p, at + c)
        total = add16(total, e)
    inv = np.float32(1.0) / hsum16(total)
    for c in range(0, n, LANES):
        store16(mul16(load16(p, at + c), inv), p, at + c)
    for c in range((n + LANES - 1) // LANES * LANES, T, LANES):
        store16(zeros16(), p, at + c)


@jitable(inline=False)
def _softmax_tiles_backward(g, gt, p, pt, n, T, dy, y, yt, hs):
    # g[gt : gt + T] holds dy v^T where computed; in place it becomes ds = p (g - dy . y) on the
    # first n values and 0 after them; dy . y over dy[yt : yt + hs] and y[yt : yt + hs]
    dot = zeros16()
    for d in range(0, hs, LANES):
        dot = fma16(dot, load16(dy, yt + d), load16(y, yt + d))
    minus_dot, zero = fill16(-hsum16(dot)), np.float32(0.0)
    for c in range(0, n, LANES):
        ds = fma16(zeros16(), load16(p, pt + c), add16(load16(g, gt + c), minus_dot))
        store16(below16(ds, n - c, zero), g, gt + c)
    for c in range((n + LANES - 1) // LANES * LANES, T, LANES):
        store16(zeros16(), g, gt + c)


@jitable
def _transpose_head(x, at, x_row, T, hs, out):  # out (hs, T) flat = the head x[at + i x_row + d]^T, T % 16 == 0
    if T <= 64:
        for i in range(T):
            xi = x[at + i * x_row : at + i * x_row + hs]
            for d in range(hs):
                out[d * T + i] = xi[d]
        return
    # longer rows of out: row by row, the writes T floats apart fall in a few L1 sets and evict
    # each other (3-4x slower at T=256-512); 16 rows at a time write one cache line of out per d
    for i0 in range(0, T, LANES):
        for d in range(hs):
            for i in range(i0, i0 + LANES):
                out[d * T + i] = x[at + i * x_row + d]


@lazy_njit
def _heads_forward(q, q_row, k, k_row, v, v_row, NKV, probs, y, kt):
    # training's attention (no KV cache) in tiles: q (already scaled), k, v flat views whose rows
    # (b T + i) start q_row, k_row, v_row values apart, head h at column h hs; probs (B, NH, T, T)
    # C-contiguous, y (B, T, NH hs) flat; kt (hs T) scratch. T and hs are multiples of 16.
    # Per head: the scores of each 8 queries against the 16-key blocks they see (q k^T), the
    # masked softmax per row, then y = probs v over the keys up to the block's last query
    B, NH, T = probs.shape[0], probs.shape[1], probs.shape[2]
    D = y.size // (B * T)
    hs = D // NH
    G = NH // NKV
    probs = probs.reshape(-1)
    one = np.float32(1.0)
    for b in range(B):
        for h in range(NH):
            qt, yt, pt = b * T * q_row + h * hs, b * T * D + h * hs, (b * NH + h) * T * T
            kt0, vt0 = b * T * k_row + (h // G) * hs, b * T * v_row + (h // G) * hs
            if h % G == 0:
                _transpose_head(k, kt0, k_row, T, hs, kt)
            for i0 in range(0, T, TILE_ROWS):  # the keys up to the block's last query, in whole tiles
                seen = (i0 + TILE_ROWS + LANES - 1) // LANES * LANES
                product_tiles(hs, q, qt + i0 * q_row, q_row, 1, kt, 0, T, probs, pt + i0 * T, T, one, False, seen)
            for i in range(T):
                _softmax_tiles(probs, pt + i * T, i + 1, T)
            for i0 in range(0, T, TILE_ROWS):
                n = i0 + TILE_ROWS  # keys 0..n-1: the block's last query sees them, the others' probs are 0
                product_tiles(n, probs, pt + i0 * T, T, 1, v, vt0, v_row, y, yt + i0 * D, D, one, False, hs)


@lazy_njit
def _heads_backward(dy, q, k, k_row, v, v_row, y, probs, scale, NKV, dq, dk, dv, vt, ds):
    # _heads_forward's backward: dy, q (scaled), y, dq (B, T, D) and dk, dv (B, T, NKV hs) flat and
    # C-contiguous, dk and dv zeros; k, v as the forward read them; probs (B, NH, T, T); vt (hs T)
    # and ds (T T) scratch. Per head: ds = dy v^T on the forward's blocks, ds = probs (ds - dy.y)
    # on the keys a query sees and 0 after them, dq = ds k scale, dk += ds^T q, dv += probs^T dy
    B, NH, T = probs.shape[0], probs.shape[1], probs.shape[2]
    D = dy.size // (B * T)
    hs = D // NH
    G, Dkv = NH // NKV, NKV * hs
    flat = probs.reshape(-1)
    one = np.float32(1.0)
    for b in range(B):
        for h in range(NH):
            qt, pt, kvt = b * T * D + h * hs, (b * NH + h) * T * T, b * T * Dkv + (h // G) * hs
            kt0, vt0 = b * T * k_row + (h // G) * hs, b * T * v_row + (h // G) * hs
            if h % G == 0:
                _transpose_head(v, vt0, v_row, T, hs, vt)
            for i0 in range(0, T, TILE_ROWS):
                seen = (i0 + TILE_ROWS + LANES - 1) // LANES * LANES
                product_tiles(hs, dy, qt + i0 * D, D, 1, vt, 0, T, ds, i0 * T, T, one, False, seen)
            for i in range(T):
                _softmax_tiles_backward(ds, i * T, flat, pt + i * T, i + 1, T, dy, y, qt + i * D, hs)
            for i0 in range(0, T, TILE_ROWS):
                n = i0 + TILE_ROWS
                product_tiles(n, ds, i0 * T, T, 1, k, kt0, k_row, dq, qt + i0 * D, D, scale, False, hs)
            for j0 in range(0, T, TILE_ROWS):  # keys j0..j0+7, seen by the queries j0..T-1
                out, rows = kvt + j0 * Dkv, qt + j0 * D
                product_tiles(T - j0, ds, j0 * T + j0, 1, T, q, rows, D, dk, out, Dkv, one, True, hs)
                product_tiles(T - j0, flat, pt + j0 * T + j0, 1, T, dy, rows, D, dv, out, Dkv, one, True, hs)


def _tiles_forward(q: Any, k: Any, v: Any, n_head: int, NKV: int, scale: float) -> Any:
    """attention_forward by :func:`_heads_forward` (no KV cache, float32, T and hs multiples of
    LANES), k and v read in place; None where their rows are not evenly spaced."""
    B, T, D = q.shape
    hs = D // n_head
    k_rows, v_rows = rows(k), rows(v)
    if k_rows is None or v_rows is None:
        return None
    qs = q * q.dtype.type(scale)  # (B, T, D), scaled as the reference does
    probs = np.empty((B, n_head, T, T), dtype=q.dtype)
    y = np.empty((B, T, D), dtype=q.dtype)
    kt = np.empty(hs * T, dtype=q.dtype)
    _heads_forward(qs.reshape(-1), D, *k_rows[:2], *v_rows[:2], NKV, probs, y.reshape(-1), kt)

    def heads(x: Any, n: int) -> Any:  # (B, T, n hs) -> (B, n, T, hs), a view
        return x.reshape(B, T, n, hs).transpose(0, 2, 1, 3)

    return y, TiledAttentionCache(heads(qs, n_head), heads(k, NKV), heads(v, NKV), y, probs, None, scale)


def _tiles_backward(dout: Any, cache: TiledAttentionCache) -> tuple[Any, Any, Any]:
    """attention_backward by :func:`_heads_backward`, for a cache of :func:`_tiles_forward`."""
    qh, kh, vh, y, probs, _, scale = cache
    B, NH, T, hs = qh.shape
    NKV = kh.shape[1]
    qs, k, v = (x.transpose(0, 2, 1, 3).reshape(B, T, -1) for x in (qh, kh, vh))  # the forward's (B, T, .) views
    k_rows, v_rows = rows(k), rows(v)
    dout = np.ascontiguousarray(dout, dtype=qh.dtype)
    dq = np.empty((B, T, NH * hs), dtype=qh.dtype)
    dk, dv = np.zeros((B, T, NKV * hs), dtype=qh.dtype), np.zeros((B, T, NKV * hs), dtype=qh.dtype)
    vt, ds = np.empty(hs * T, dtype=qh.dtype), np.empty(T * T, dtype=qh.dtype)  # scratch
    dy, q, y, dq_, dk_, dv_ = (a.reshape(-1) for a in (dout, qs, y, dq, dk, dv))
    _heads_backward(dy, q, *k_rows[:2], *v_rows[:2], y, probs, qh.dtype.type(scale), NKV, dq_, dk_, dv_, vt, ds)
    return dq, dk, dv


def attention_forward(
    q: Any, k: Any, v: Any, n_head: int, dropout_p: float = 0.0, coins: Any = None, **more: Any
) -> tuple[Any, layers.AttentionCache]:
    """layers.attention_forward, skipping the masked blocks: queries in blocks of TILE rows, each
    block's scores and output against only the keys it sees (BLAS matmuls), and the masked
    softmax in one fused pass. Grouped-query attention (``n_kv_head`` < n_head): the queries are
    viewed as (B, NKV, G, T, hs) and the key/value heads as (B, NKV, 1, Tk, hs), so each matmul
    broadcasts one key/value head over its G query heads (no repeated copies) and the causal
    blocks stay those of the plain case. At most DECODE_ROWS query rows: :func:`_attention_rows`,
    the keys and values read in place. Dropout and any argument it does not know go to the
    reference (which also raises on an n_kv_head that does not divide n_head)."""
    n_kv_head = more.pop("n_kv_head", None)
    B, T, D = q.shape
    NKV = n_head if n_kv_head is None else n_kv_head
    if (
        dropout_p > 0.0
        or more
        or n_head < 1
        or D % n_head
        or NKV < 1
        or n_head % NKV
        or k.ndim != 3
        or k.shape != v.shape
        or k.shape[0] != B
        or k.shape[2] != NKV * (D // n_head)
        or k.shape[1] < T
        or type(q) is not np.ndarray
        or not floats(q, k, v)
    ):
        if n_kv_head is not None:
            more["n_kv_head"] = n_kv_head
        return layers.attention_forward(q, k, v, n_head, dropout_p, coins, **more)
    Tk, hs, G = k.shape[1], D // n_head, n_head // NKV
    past = Tk - T  # keys before the first query (a KV cache)
    scale = 1.0 / math.sqrt(hs)
    if T <= DECODE_ROWS:  # decoding: one numba pass per query row instead of a dozen NumPy calls
        qh = np.empty((B, n_head, T, hs), dtype=q.dtype)
        probs = np.empty((B, n_head, T, Tk), dtype=q.dtype)
        y = np.empty((B, T, D), dtype=q.dtype)
        args = (q, k, v, q.dtype.type(scale), qh, probs, y)
        parts = _threads.chunks(B * n_head, max(1, MIN_KEYS_PER_THREAD // (Tk * hs)))
        if parts > 1:
            _threads.launch(_attention_rows_parallel, parts, *args)
        else:
            _attention_rows(*args, 1)
        kh, vh = (x.reshape(B, Tk, NKV, hs).transpose(0, 2, 1, 3) for x in (k, v))  # (B, NKV, Tk, hs) views
        return y, FusedAttentionCache(qh, kh, vh, y, probs, None, scale)
    if not past and q.dtype == np.float32 and T % LANES == 0 and hs % LANES == 0 and T <= MAX_TILED_T:
        tiled = _tiles_forward(q, k, v, n_head, NKV, scale)
        if tiled is not None:
            return tiled
    qh = _split(q * q.dtype.type(scale), n_head)  # (B, NH, T, hs), scaled as the reference does
    if past:  # decoding: the keys and values as views of the KV cache, read in place by BLAS
        kh, vh = (x.reshape(B, Tk, NKV, hs).transpose(0, 2, 1, 3) for x in (k, v))  # (B, NKV, Tk, hs)
    else:  # training: C-contiguous heads, which BLAS's batched products take faster
        kh, vh = _split(k, NKV), _split(v, NKV)
    probs = np.empty((B, n_head, T, Tk), dtype=q.dtype)
    # query head h = j G + g uses key/value head j (transformers' repeat_kv order): views with a
    # group axis, the key/value heads broadcast over it
    q5, p5 = qh.reshape(B, NKV, G, T, hs), probs.reshape(B, NKV, G, T, Tk)
    k5T, v5 = _mT(kh)[:, :, None], vh[:, :, None]  # (B, NKV, 1, hs, Tk), (B, NKV, 1, Tk, hs)
    for i0, i1 in _blocks(T):  # scores of queries i0..i1-1 against keys 0..past+i1-1
        np.matmul(q5[..., i0:i1, :], k5T[..., : past + i1], out=p5[..., i0:i1, : past + i1])
    _causal_softmax(probs, past)
    yh = np.empty((B, n_head, T, hs), dtype=q.dtype)
    y5 = yh.reshape(B, NKV, G, T, hs)
    for i0, i1 in _blocks(T):
        np.matmul(p5[..., i0:i1, : past + i1], v5[..., : past + i1, :], out=y5[..., i0:i1, :])
    y = _merge(yh)  # (B, T, D)
    return y, FusedAttentionCache(qh, kh, vh, y, probs, None, scale)


@lazy_njit
def _causal_softmax_backward(da, probs, dout, y, past):
    # da (B, NH, T, Tk) holds dy v^T where computed; in place it becomes ds = a (da - dy . y_i)
    # on the keys query i sees and 0 after them; dout, y (B, T, D)
    B, NH, T, Tk = probs.shape
    hs = dout.shape[2] // NH
    zero = np.zeros(1, probs.dtype)[0]
    for b in range(B):
        for h in range(NH):
            for i in range(T):
                n = past + i + 1
                dy, yi = dout[b, i, h * hs : (h + 1) * hs], y[b, i, h * hs : (h + 1) * hs]
                dy_dot_y = zero
                for d in range(hs):
                    dy_dot_y += dy[d] * yi[d]
                g, p = da[b, h, i], probs[b, h, i]
                for j in range(n):
                    g[j] = p[j] * (g[j] - dy_dot_y)
                for j in range(n, Tk):
                    g[j] = zero


def attention_backward(dout: Any, cache: layers.AttentionCache) -> tuple[Any, Any, Any]:
    """layers.attention_backward over the blocks the forward computed, the softmax's backward
    fused into one pass. With grouped key/value heads, dk and dv of a key/value head sum over its
    G query heads: one matmul over the G*T stacked rows where a key block is seen by every query
    (as the reference's grouped matmuls), else per query head and summed."""
    if type(cache) is TiledAttentionCache:
        return _tiles_backward(dout, cache)
    if type(cache) is not FusedAttentionCache:
        return layers.attention_backward(dout, cache)
    qh, kh, vh, y, probs, _, scale = cache
    B, NH, T, hs = qh.shape
    NKV, Tk = kh.shape[1], kh.shape[2]
    G, past = NH // NKV, Tk - T
    dout = np.ascontiguousarray(dout, dtype=qh.dtype)
    dyh = _split(dout, NH)  # (B, NH, T, hs)
    ds = np.empty_like(probs)  # da = dy v^T, then ds in place
    dy5, ds5, p5, q5 = (a.reshape(B, NKV, G, T, a.shape[-1]) for a in (dyh, ds, probs, qh))
    k5, v5T = kh[:, :, None], _mT(vh)[:, :, None]
    for i0, i1 in _blocks(T):
        np.matmul(dy5[..., i0:i1, :], v5T[..., : past + i1], out=ds5[..., i0:i1, : past + i1])
    _causal_softmax_backward(ds, probs, dout, y, past)
    dq = np.empty_like(qh)
    dq5 = dq.reshape(B, NKV, G, T, hs)
    for i0, i1 in _blocks(T):  # dq = ds k * scale
        np.matmul(ds5[..., i0:i1, : past + i1], k5[..., : past + i1, :], out=dq5[..., i0:i1, :])
    dq *= dq.dtype.type(scale)
    dk, dv = np.empty_like(kh), np.empty_like(vh)
    dsg, pg, qg, dyg = (a.reshape(B, NKV, G * T, a.shape[-1]) for a in (ds, probs, qh, dyh))  # (B, NKV, G*T, .)
    for j0, j1 in _blocks(Tk):  # keys j0..j1-1 are seen by queries from j0 - past on
        r = max(0, j0 - past)
        if r == 0 or G == 1:  # the rows r.. of every query head are contiguous in the stacked view
            np.matmul(_mT(dsg[:, :, r:, j0:j1]), qg[:, :, r:], out=dk[:, :, j0:j1])  # ds^T q
            np.matmul(_mT(pg[:, :, r:, j0:j1]), dyg[:, :, r:], out=dv[:, :, j0:j1])  # a^T dy
        else:
            np.sum(np.matmul(_mT(ds5[..., r:, j0:j1]), q5[..., r:, :]), axis=2, out=dk[:, :, j0:j1])
            np.sum(np.matmul(_mT(p5[..., r:, j0:j1]), dy5[..., r:, :]), axis=2, out=dv[:, :, j0:j1])
    return _merge(dq), _merge(dk), _merge(dv)


SPECS = {
    "numba_causal_attention": KernelSpec(
        "attention",
        loader(attention_forward, attention_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        description="masked blocks skipped (BLAS on the rest, or register tiles per head for float32 "
        "training shapes), masked softmax fused, grouped-query attention without repeated keys; dropout "
        "runs the reference (numba, serial, nogil)",
    ),
}
