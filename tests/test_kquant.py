"""The numpy backend's K-quant product (backends/numpy/kernels/kquant.py) against the ``gguf``
library's dequantizer, llama.cpp's own Python package, and the array-API reference
(arraygpt.nn.quant.dequantize). gguf's Python cannot quantize the K-quants, so the blocks are
random bytes with finite float16 scales (every bit pattern of the integer parts is a valid block)."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arraygpt.nn.quant import BLOCKS, QuantizedWeight, dequantize

gguf = pytest.importorskip("gguf", reason="the reference dequantizer is the gguf package: pip install gguf")
pytest.importorskip("numba")
from gguf import GGMLQuantizationType, quants

from arraygpt.backends.numpy import blas_threads
from arraygpt.backends.numpy.kernels import _blocks, _jit, _threads, kquant

KINDS = ["q4_k", "q5_k", "q6_k"]
SCALES = {"q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}  # bytes of the float16 d (and dmin)
QUANTS = {"q4_k": slice(16, 144), "q5_k": slice(16, 176), "q6_k": slice(0, 192)}  # bytes of the quants


def _random_blocks(kind: str, rows: int, n_blocks: int, seed: int) -> np.ndarray:
    nbytes = BLOCKS[kind][1]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, n_blocks, nbytes), dtype=np.uint8)
    for offset in SCALES[kind]:
        scales = rng.uniform(-0.1, 0.1, size=(rows, n_blocks)).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, n_blocks, 2)
    return blocks


def _gguf(kind: str, blocks: np.ndarray) -> np.ndarray:
    """gguf's dequantized weight (rows, K), float64."""
    rows = blocks.shape[0]
    return quants.dequantize(blocks.reshape(rows, -1), GGMLQuantizationType[kind.upper()]).astype(np.float64)


def _w_bound(kind: str, blocks: np.ndarray) -> np.ndarray:
    """(rows, K): |w| bounded by its sub-block's scales, |d sc| qmax + |dmin mn|, read through
    gguf: the weight with every quant bit 0 is -dmin mn (Q6_K: -32 d sc), with every bit 1 it is
    d sc qmax - dmin mn (Q6_K: 31 d sc)."""
    zeros, ones = blocks.copy(), blocks.copy()
    zeros[..., QUANTS[kind]] = 0
    ones[..., QUANTS[kind]] = 255
    w0 = _gguf(kind, zeros)
    return np.abs(_gguf(kind, ones) - w0) + np.abs(w0)


def _bound(kind: str, blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(M, rows): twice the float32 bound of the dot products, K eps sum_j |w_j x_j|, |w_j| as
    _w_bound."""
    K = blocks.shape[1] * 256
    return 2 * K * np.finfo(np.float32).eps * (np.abs(x.astype(np.float64)) @ _w_bound(kind, blocks).T)


def test_the_bound_covers_the_weights():
    # the tolerance's |w| bound is a bound (else every test below would test nothing much)
    for kind in KINDS:
        blocks = _random_blocks(kind, 5, 2, 1)
        assert np.all(np.abs(_gguf(kind, blocks)) <= _w_bound(kind, blocks) * (1 + 1e-6))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=12, deadline=None)
@given(
    rows=st.integers(1, 40),
    n_blocks=st.integers(1, 3),
    M=st.sampled_from([1, 3, _blocks.MAX_ROWS, _blocks.MAX_ROWS + 1, 17]),
    threads=st.sampled_from([1, 2]),
    given_sums=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_product_equals_the_gguf_dequantizer_and_the_reference(kind, rows, n_blocks, M, threads, given_sums, seed):
    blocks = _random_blocks(kind, rows, n_blocks, seed)
    K = 256 * n_blocks
    w = QuantizedWeight(kind, blocks, (rows, K))
    x = np.random.default_rng(seed).standard_normal((M, K)).astype(np.float32)
    xsum = x.reshape(M, -1, 32).sum(axis=-1) if given_sums else None
    out = np.full((M, rows + 3), np.nan, np.float32)  # a column slice, as a stack's part writes
    # small tiles and chunks, so that a few rows cross tiles and split over two threads
    with (
        blas_threads(threads),
        mock.patch.object(_blocks, "TILE", 7),
        mock.patch.object(_blocks, "MIN_ROWS_PER_THREAD", 4),
    ):
        kquant.product(x, w, out[:, 2 : 2 + rows], xsum)
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, 2 + rows :]).all()
    got = out[:, 2 : 2 + rows]
    tol = _bound(kind, blocks, x) + 1e-6
    x64 = x.astype(np.float64)
    assert np.all(np.abs(got - x64 @ _gguf(kind, blocks).T) <= tol)
    reference = np.asarray(dequantize(w), dtype=np.float64)  # arraygpt.nn.quant's array-API decoding
    assert np.all(np.abs(got - x64 @ reference.T) <= tol)


@pytest.mark.parametrize("kind", KINDS)
def test_a_decode_sized_product_on_two_threads(kind):
    # enough rows for quant's own chunking (MIN_ROWS_PER_THREAD) to split them
    rows = 2 * _blocks.MIN_ROWS_PER_THREAD + 5
    blocks = _random_blocks(kind, rows, 2, 3)
    w = QuantizedWeight(kind, blocks, (rows, 512))
    x = np.random.default_rng(3).standard_normal((1, 512)).astype(np.float32)
    out = np.empty((1, rows), np.float32)
    with blas_threads(2):
        parts = _threads.chunks(rows, _blocks.MIN_ROWS_PER_THREAD)
        kquant.product(x, w, out)
    assert parts == min(2, _jit.numba().config.NUMBA_NUM_THREADS)  # the parallel launch, where there are 2 threads
    assert np.all(np.abs(out - x.astype(np.float64) @ _gguf(kind, blocks).T) <= _bound(kind, blocks, x) + 1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_the_tile_dequantizer_is_the_gguf_dequantizer(kind):
    blocks = _random_blocks(kind, 6, 2, 4)
    w = QuantizedWeight(kind, blocks, (6, 512))
    tile = np.full((4, 512), np.nan, np.float32)
    kquant.dequantize_tile_k(_blocks.blocks_2d(w), kquant.KIND_CODES[kind], 2, tile)
    # one rounding apart (a fused multiply-add, or not), within eps of the scales' bound
    tol = 2 * np.finfo(np.float32).eps * _w_bound(kind, blocks)[2:6]
    assert np.all(np.abs(tile - _gguf(kind, blocks)[2:6]) <= tol)


# ----------------------------------------------------------------------------------------------
# the int8 variant: x quantized to q8_0 blocks (quant.activations, checked against gguf's
# quantizer in tests/test_quant.py), byte dot products


def _split(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W = W_q + W_c (float64): the part that multiplies the quants and the constant part, W_c
    as gguf dequantizes the blocks with every quant 0: -dmin mn (Q4_K, Q5_K); Q6_K's -32 d sc
    multiplies its quants (q - 32), so there W_c = 0."""
    dense = _gguf(kind, blocks)
    if kind == "q6_k":
        return dense, np.zeros_like(dense)
    zeros = blocks.copy()
    zeros[..., QUANTS[kind]] = 0
    constant = _gguf(kind, zeros)
    return dense - constant, constant


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 40),
    n_blocks=st.integers(1, 3),
    M=st.sampled_from([1, 3, _blocks.MAX_ROWS]),
    threads=st.sampled_from([1, 2]),
    given_acts=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_int8_product_multiplies_the_quantized_activations_exactly_as_floats(
    kind, rows, n_blocks, M, threads, given_acts, seed
):
    """out = x_hat @ W_q.T + x @ W_c.T (x_hat = dx xq, the activations as quantized) within the
    float32 bound of the sums, and within sum_j |W_q,j| dx_b / 2 more of the float product."""
    blocks = _random_blocks(kind, rows, n_blocks, seed)
    K = 256 * n_blocks
    w = QuantizedWeight(kind, blocks, (rows, K))
    x = np.random.default_rng(seed).standard_normal((M, K)).astype(np.float32)
    xq, dx, xsum = _blocks.activations(x)
    x_hat = (xq.reshape(M, -1, 32) * dx[..., None].astype(np.float64)).reshape(M, K)
    out = np.full((M, rows + 3), np.nan, np.float32)
    with blas_threads(threads), mock.patch.object(_blocks, "MIN_ROWS_PER_THREAD", 4):
        kquant.product_int8(x, w, out[:, 2 : 2 + rows], (xq, dx, xsum) if given_acts else None)
    assert np.isnan(out[:, :2]).all() and np.isnan(out[:, 2 + rows :]).all()
    got = out[:, 2 : 2 + rows]
    w_q, w_c = _split(kind, blocks)
    x64 = x.astype(np.float64)
    tol = _bound(kind, blocks, np.maximum(np.abs(x), np.abs(x_hat))) + 1e-6
    assert np.all(np.abs(got - (x_hat @ w_q.T + x64 @ w_c.T)) <= tol)
    rounding = np.repeat(dx.astype(np.float64), 32, axis=1) / 2 @ np.abs(w_q).T  # (M, rows)
    assert np.all(np.abs(got - x64 @ _gguf(kind, blocks).T) <= tol + rounding)


def test_the_int8_product_of_a_prompt_is_the_float_product():
    blocks = _random_blocks("q4_k", 9, 1, 6)
    w = QuantizedWeight("q4_k", blocks, (9, 256))
    x = np.random.default_rng(6).standard_normal((_blocks.MAX_ROWS + 1, 256)).astype(np.float32)
    out = np.empty((x.shape[0], 9), np.float32)
    kquant.product_int8(x, w, out)
    assert np.all(np.abs(out - x.astype(np.float64) @ _gguf("q4_k", blocks).T) <= _bound("q4_k", blocks, x) + 1e-6)


@pytest.mark.parametrize("kind", ["q4_k", "q5_k"])
@pytest.mark.parametrize(("M", "threads"), [(9, 1), (21, 2)])
def test_a_prompt_on_the_int8_kernel_multiplies_the_quantized_activations_exactly_as_floats(kind, M, threads):
    """A prompt of Q4_K or Q5_K rows on quant.py's int8 groups (each sub-block of 32 unpacked as a
    block, kquant.unpack_rows_k): out = x_hat @ W_q.T + x @ W_c.T within the float32 bound. The
    groups run here whatever the CPU (where it lacks VNNI, a model sends prompts to float32 tiles)."""
    from arraygpt.backends.numpy.kernels import quant as quant_kernel

    rows, K = 2 * _blocks.MIN_ROWS_PER_THREAD + 3, 512  # W's rows in two parts at two threads
    blocks = _random_blocks(kind, rows, K // 256, seed=M)
    x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
    with blas_threads(threads), mock.patch.object(quant_kernel, "has_vnni", lambda: True):
        out, _ = quant_kernel.quantized_linear_int8_forward(x, QuantizedWeight(kind, blocks, (rows, K)))
    xq, dx, _ = _blocks.activations(x)
    x_hat = (xq.reshape(M, -1, 32) * dx[..., None].astype(np.float64)).reshape(M, K)
    w_q, w_c = _split(kind, blocks)
    tol = _bound(kind, blocks, np.maximum(np.abs(x), np.abs(x_hat))) + 1e-6
    assert np.all(np.abs(out - (x_hat @ w_q.T + x.astype(np.float64) @ w_c.T)) <= tol)
