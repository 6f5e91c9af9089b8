"""The quantized reference (arraygpt.nn.quant) against the ``gguf`` library, llama.cpp's own
Python package: its quantizers make the blocks, its dequantizer is the independent reference."""

from __future__ import annotations

import functools
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from arraygpt.nn.quant import (
    BLOCKS,
    QuantizedWeight,
    dequantize,
    quantized_linear_forward,
    quantized_linear_pair_forward,
)

gguf = pytest.importorskip("gguf", reason="the reference dequantizer is the gguf package: pip install gguf")
from gguf import GGMLQuantizationType, quants

TYPES = {kind: GGMLQuantizationType[kind.upper()] for kind in BLOCKS}


def _random_blocks(kind: str, rows: int, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes as blocks, their float16 scales made finite (every bit pattern of the integer
    parts is a valid block; a scale of inf or nan is not a weight anyone stores)."""
    per_block, nbytes = BLOCKS[kind]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, n_blocks, nbytes), dtype=np.uint8)
    scale_offsets = {
        "q8_0": [0],
        "q4_0": [0],
        "q5_0": [0],
        "q4_1": [0, 2],
        "q5_1": [0, 2],
        "q4_k": [0, 2],
        "q5_k": [0, 2],
        "q6_k": [208],
    }
    for offset in scale_offsets[kind]:
        scales = rng.uniform(-0.1, 0.1, size=(rows, n_blocks)).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, n_blocks, 2)
    return blocks


@pytest.mark.parametrize("kind", list(BLOCKS))
@given(rows=st.integers(1, 4), n_blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_dequantize_equals_the_gguf_library_on_random_blocks(kind, rows, n_blocks, seed):
    blocks = _random_blocks(kind, rows, n_blocks, seed)
    per_block = BLOCKS[kind][0]
    ours = dequantize(QuantizedWeight(kind, blocks, (rows, n_blocks * per_block)))
    reference = quants.dequantize(blocks.reshape(rows, -1), TYPES[kind])
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_array_equal(ours, reference.astype(np.float32))


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_quantized_by_gguf_then_dequantized_is_close_to_the_weights(kind):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    blocks = quants.quantize(w, TYPES[kind]).reshape(6, 2, BLOCKS[kind][1])
    back = dequantize(QuantizedWeight(kind, blocks, w.shape))
    step = np.abs(w).max() / {"q8_0": 127, "q4_0": 7, "q4_1": 7, "q5_0": 15, "q5_1": 15}[kind]
    assert np.abs(back - w).max() <= step


def test_float16_scales_decode_every_bit_pattern_like_numpy():
    import array_api_compat.numpy as xp

    from arraygpt.nn.quant import _f16

    every = np.arange(2**16, dtype=np.uint16)
    raw = every.view(np.uint8).reshape(-1, 2)
    ours = _f16(xp, raw[:, 0], raw[:, 1])
    expected = every.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(ours, expected)  # nan == nan in assert_array_equal


def test_the_reference_runs_on_array_api_strict():
    strict = pytest.importorskip("array_api_strict")
    blocks = _random_blocks("q4_k", 2, 1, 3)
    ours = dequantize(QuantizedWeight("q4_k", strict.asarray(blocks), (2, 256)))
    np.testing.assert_array_equal(np.asarray(ours), quants.dequantize(blocks.reshape(2, -1), TYPES["q4_k"]))


def test_quantized_linear_is_x_times_the_dequantized_weight():
    blocks = _random_blocks("q8_0", 5, 2, 1)
    w = QuantizedWeight("q8_0", blocks, (5, 64))
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    b = np.arange(5, dtype=np.float32)
    dense = quants.dequantize(blocks.reshape(5, -1), TYPES["q8_0"])
    np.testing.assert_allclose(quantized_linear_forward(x, w, b), x @ dense.T + b, rtol=1e-6, atol=1e-6)


def test_a_weight_whose_blocks_do_not_fit_its_shape_is_refused():
    with pytest.raises(ValueError, match=r"q4_0 weight of shape \(2, 48\).*multiple of 32"):
        QuantizedWeight("q4_0", np.zeros((2, 1, 18), np.uint8), (2, 48))
    with pytest.raises(ValueError, match="unknown quantization 'q3_k'"):
        QuantizedWeight("q3_k", np.zeros((2, 1, 18), np.uint8), (2, 32))


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_quantize_is_the_gguf_quantizer_and_the_k_quants_are_read_only(kind):
    from arraygpt import GPT, GPTConfig
    from arraygpt.nn.quant import QUANTIZERS, quantize

    w = np.random.default_rng(2).standard_normal((3, 256)).astype(np.float32)
    try:
        expected = quants.quantize(w, TYPES[kind])
    except NotImplementedError:  # gguf has no Python quantizer for the K-quants: neither has arraygpt
        assert kind not in QUANTIZERS
        for quantizing in (lambda: quantize(w, kind), lambda: GPT(GPTConfig.preset("microgpt")).quantize(kind)):
            with pytest.raises(ValueError, match=f"cannot quantize as '{kind}' .it is read from GGUF files"):
                quantizing()
        return
    assert kind in QUANTIZERS
    q = quantize(w, kind)
    assert q.shape == (3, 256)
    np.testing.assert_array_equal(q.blocks.reshape(3, -1), expected)


# ----------------------------------------------------------------------------------------------
# the numpy backend's kernel on the blocks (backends/numpy/kernels/quant.py)

QMAX = {"q8_0": (128, False), "q4_0": (8, False), "q4_1": (15, True), "q5_0": (16, False), "q5_1": (31, True)}


def _bound(kind: str, blocks: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Twice the float32 bound of the dot products, K eps sum_j |w_j x_j|, with |w_j| bounded by
    its block's scales: |d_b| qmax (+ |m_b|)."""
    qmax, has_min = QMAX[kind]
    d = np.abs(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64))  # (N, nb)
    if has_min:
        d = d * qmax + np.abs(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64))
    else:
        d = d * qmax
    rows, n_blocks = d.shape
    w_bound = np.repeat(d, 32, axis=1)  # (N, K)
    K = n_blocks * 32
    return 2 * K * np.finfo(np.float32).eps * (np.abs(x.astype(np.float64)) @ w_bound.T)


def _case(kind: str, rows: int, n_blocks: int, M: int, bias: bool, seed: int):
    """Random blocks, their weight (rows, 32 n_blocks), x (M, 32 n_blocks) and a bias or None."""
    blocks = _random_blocks(kind, rows, n_blocks, seed)
    w = QuantizedWeight(kind, blocks, (rows, 32 * n_blocks))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, 32 * n_blocks)).astype(np.float32)
    return blocks, w, x, rng.standard_normal(rows).astype(np.float32) if bias else None


def _kernel():
    pytest.importorskip("numba")
    from arraygpt.backends.numpy.kernels import quant as kernel

    return kernel


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
@given(
    rows=st.integers(1, 70),
    n_blocks=st.integers(1, 4),
    M=st.sampled_from([1, 2, 3, 8, 9, 17]),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_kernel_on_blocks_equals_the_reference_and_the_gguf_dequantizer(
    kind, rows, n_blocks, M, bias, threads, seed
):
    from arraygpt.backends.numpy import blas_threads

    kernel = _kernel()
    blocks, w, x, b = _case(kind, rows, n_blocks, M, bias, seed)
    K = 32 * n_blocks
    with blas_threads(threads):
        out, cache = kernel.quantized_linear_forward(x.reshape(1, M, K), w, b)  # (1, M, rows)
    assert out.shape == (1, M, rows) and out.dtype == np.float32 and cache.has_bias == bias
    tol = _bound(kind, blocks, x) + 1e-6
    ref = quantized_linear_forward(x, w, b)
    dense = quants.dequantize(blocks.reshape(rows, -1), TYPES[kind]).astype(np.float64)
    independent = x.astype(np.float64) @ dense.T + (0 if b is None else b)
    assert np.all(np.abs(out[0] - ref) <= tol)
    assert np.all(np.abs(out[0] - independent) <= tol)


def test_the_prefill_path_crosses_tiles_of_rows(monkeypatch):
    kernel = _kernel()
    monkeypatch.setattr(kernel, "TILE", 7)
    blocks = _random_blocks("q4_1", 30, 2, 5)
    w = QuantizedWeight("q4_1", blocks, (30, 64))
    x = np.random.default_rng(5).standard_normal((12, 64)).astype(np.float32)
    out, _ = kernel.quantized_linear_forward(x, w)
    dense = quants.dequantize(blocks.reshape(30, -1), TYPES["q4_1"]).astype(np.float64)
    assert np.all(np.abs(out - x @ dense.T) <= _bound("q4_1", blocks, x) + 1e-6)


@pytest.mark.parametrize("M", [1, 11])
def test_a_stack_of_kinds_is_its_parts_side_by_side(M):
    from arraygpt.nn.quant import QuantizedStack, concat_rows

    kernel = _kernel()
    parts = [QuantizedWeight(kind, _random_blocks(kind, r, 2, r), (r, 64)) for kind, r in (("q4_0", 5), ("q8_0", 3))]
    stack = concat_rows(parts)
    assert isinstance(stack, QuantizedStack) and stack.shape == (8, 64)
    x = np.random.default_rng(M).standard_normal((M, 64)).astype(np.float32)
    out, _ = kernel.quantized_linear_forward(x, stack)
    dense = np.concatenate([quants.dequantize(p.blocks.reshape(p.shape[0], -1), TYPES[p.kind]) for p in parts])
    np.testing.assert_allclose(out, x @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(quantized_linear_forward(x, stack), x @ dense.T, rtol=1e-5, atol=1e-5)


def test_the_kernel_hands_what_it_does_not_take_to_the_reference():
    kernel = _kernel()
    blocks = _random_blocks("q6_k", 2, 1, 9)  # a K-quant: the reference
    w = QuantizedWeight("q6_k", blocks, (2, 256))
    x = np.random.default_rng(9).standard_normal((1, 256))  # float64 too
    out, _ = kernel.quantized_linear_forward(x, w)
    np.testing.assert_allclose(out, x @ quants.dequantize(blocks.reshape(2, -1), TYPES["q6_k"]).T, rtol=1e-12)


def _cpu_has_byte_products() -> bool:
    """Whether the CPU has VNNI's byte dot products or AVX2's two-step byte products."""
    from conftest import cpu_flags  # here: a subprocess below imports this module without pytest's path

    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "avx2"})


def test_the_numpy_backend_selects_the_int8_kernel_where_the_cpu_has_byte_products_and_float32_only():
    _kernel()
    from arraygpt import GPTConfig
    from arraygpt.backends.numpy.kernels import quant as kernel
    from arraygpt.nn import kernels

    config = GPTConfig.preset("microgpt")
    chosen = kernels.select_kernels(config, "numpy", "float32").quantized_linear[0]
    expected = kernel.quantized_linear_int8_forward if _cpu_has_byte_products() else kernel.quantized_linear_forward
    assert chosen is expected
    assert kernels.select_kernels(config, "numpy", "float64").quantized_linear[0] is quantized_linear_pair_forward


# ----------------------------------------------------------------------------------------------
# the int8 path: x quantized to blocks of int8 (as llama.cpp's q8_0), byte dot products (_simd.py)


@functools.cache  # once a process: a Hypothesis example each compiling them anew took 30 s
def _simd_compiled():
    pytest.importorskip("numba")
    from arraygpt.backends.numpy.kernels import _simd
    from arraygpt.backends.numpy.kernels._jit import numba

    @numba().njit
    def dots(row, xq, kinds):  # the sum of each dot's lanes, for blocks at 0, 34, 68, ...
        out = np.empty(len(kinds), np.float32)
        for i in range(len(kinds)):
            at = 34 * i
            if kinds[i] == 2:  # a fifth bit from the 4 bytes before the nibbles
                v = _simd.dot_fivebits(row, at + 4, xq, 32 * i)
            elif kinds[i] == 1:
                v = _simd.dot_nibbles(row, at, xq, 32 * i)
            elif kinds[i] == 3:  # the K-quants' rows of 32 bytes: low nibbles
                v = _simd.dot_nibble_row(row, at, 0, xq, 32 * i)
            elif kinds[i] == 4:  # high nibbles, a fifth bit from bit 3 of the same bytes
                v = _simd.dot_fivebit_row(row, at, 4, at, 3, xq, 32 * i)
            elif kinds[i] == 5:  # high nibbles, two more bits from bits 2-3, minus 32 (Q6_K)
                v = _simd.dot_sixbits(row, at, 4, at, 2, xq, 32 * i)
            else:
                v = _simd.dot_bytes(row, at, xq, 32 * i)
            out[i] = _simd.total(_simd.fma(_simd.zeros(), v, np.float32(1.0)))
        return out

    @numba().njit
    def halves(row):
        out = np.empty(len(row) // 2, np.float32)
        for i in range(len(out)):
            out[i] = _simd.half(row, 2 * i)
        return out

    @numba().njit
    def sums(x, w, packed, c, s, d, t):  # x (n, 256) words of 8 lanes; w (n, 32) weights; packed (n, 16) nibbles
        out, small = np.empty((len(x), 8), np.float32), np.empty((len(x), 8), np.float32)
        unpacked = np.empty((len(x), 32), np.uint8)
        ones, w_small = np.ones(8, np.float32), np.empty(32, np.uint8)
        for b in range(len(x)):
            p, q = _simd.int_zeros(), _simd.int_zeros()
            for j in range(4):
                p = _simd.dot_dword(p, _simd.bytes32(x[b], 32 * j), w[b], 4 * j)
                q = _simd.dot_dword(q, _simd.bytes32(x[b], 32 * (j + 4)), w[b], 4 * (j + 4))
            acc = _simd.scale_add(_simd.zeros(), p, q, c[b], s[b], 0, d[b])
            acc = _simd.add(_simd.fmav(acc, _simd.splat(d[b]), _simd.load8(t[b], 0)), _simd.zeros())
            for k in range(32):  # the weights as the nibble kinds' unpacked quants: 0-63
                w_small[k] = np.uint8(w[b, k] & 63)
            p = _simd.int_zeros()
            for j in range(8):
                p = _simd.dot_dword_small(p, _simd.bytes32(x[b], 32 * j), w_small, 4 * j)
            sums_small = _simd.scale_add(_simd.zeros(), p, _simd.int_zeros(), 0, ones, 0, np.float32(1.0))
            for i in range(8):
                out[b, i], small[b, i] = _simd.lane(acc, i), _simd.lane(sums_small, i)  # small: exact below 2^24
            _simd.store32(_simd.nibbles(packed[b], 0), unpacked[b], 0)
        return out, unpacked, small

    return dots, halves, sums


def _prompt_case(n: int, seed: int) -> tuple[np.ndarray, ...]:
    """Random operands of the prompt loop's vocabulary (the ``sums`` of _simd_compiled)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 256), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, 32)).astype(np.int8)
    packed = rng.integers(0, 256, (n, 16), dtype=np.uint8)
    c = rng.integers(-(2**20), 2**20, n).astype(np.int32)
    s, t = rng.uniform(-2, 2, (n, 8)).astype(np.float32), rng.standard_normal((n, 8)).astype(np.float32)
    return x, w, packed, c, s, rng.uniform(-2, 2, n).astype(np.float32), t


@given(n=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_the_byte_dot_products_are_numpys_integer_dots(n, seed):
    dots, _, _ = _simd_compiled()
    rng = np.random.default_rng(seed)
    row = rng.integers(0, 256, 34 * n, dtype=np.uint8)  # every byte, -128 included
    xq = rng.integers(-127, 128, 32 * n).astype(np.int8)
    kinds = rng.integers(0, 6, n).astype(np.int64)
    expected = []
    for i in range(n):
        raw = row[34 * i : 34 * i + 32]
        if kinds[i] == 2:
            q, bits = row[34 * i + 4 : 34 * i + 20], int(row[34 * i : 34 * i + 4].view(np.uint32)[0])
            w = np.concatenate([q & 15, q >> 4]) | (((bits >> np.arange(32)) & 1) << 4)
        elif kinds[i] == 3:
            w = raw & 15
        elif kinds[i] == 4:
            w = (raw >> 4) | (((raw >> 3) & 1) << 4)
        elif kinds[i] == 5:
            w = ((raw >> 4) | (((raw >> 2) & 3) << 4)).astype(np.int64) - 32
        else:
            w = np.concatenate([raw[:16] & 15, raw[:16] >> 4]) if kinds[i] else raw.view(np.int8)
        expected.append(int(np.dot(w.astype(np.int64), xq[32 * i : 32 * i + 32].astype(np.int64))))
    assert dots(row, xq, kinds).tolist() == expected  # |dot| < 2**24: exact in float32


@pytest.mark.parametrize("x", [-127, 127])
def test_the_byte_dot_products_hold_their_largest_sums(x):
    """The largest products each kind meets (Q8_0's -128 and 127, Q5's 31, Q4's 15, Q6_K's -32
    and 31, times |x| = 127): AVX2's first step sums two products in int16, which these must not
    overflow."""
    dots, _, _ = _simd_compiled()
    xq = np.full(32 * 8, x, np.int8)
    row = np.full(34 * 8, 0xFF, np.uint8)  # nibbles and fifth bits all ones: 15 and 31
    row[:34] = 0x80  # a Q8_0 block of -128
    row[34:68] = 0x7F  # a Q8_0 block of 127
    row[34 * 7 :] = 0  # six bits of 0: Q6_K's -32
    got = dots(row, xq, np.array([0, 0, 1, 2, 3, 4, 5, 5]))
    largest = [-128, 127, 15, 31, 15, 31, 31, -32]
    assert got.tolist() == [32 * w * x for w in largest]


@given(n=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_the_prompt_loops_vectors_are_numpys_integer_dots_and_float_sums(n, seed):
    """A prompt's vocabulary (_simd.py), compiled: 8 words of 4 weights against 8 lanes of x
    (dot_dword), nibbles unpacked and stored, scale_add, fmav, add and lane, against the same sums
    in NumPy's integers and float64."""
    _, _, sums = _simd_compiled()
    x, w, packed, c, s, d, t = _prompt_case(n, seed)
    got, unpacked, small = sums(x, w, packed, c, s, d, t)
    for b in range(n):
        words = x[b].reshape(8, 8, 4).astype(np.int64)  # (word j, lane i, byte k)
        small_words = (w[b].view(np.uint8) & 63).reshape(8, 4).astype(np.int64)
        assert np.array_equal(small[b], np.einsum("jik,jk->i", words, small_words))
        dots = np.einsum("jik,jk->i", words, w[b].reshape(8, 4).astype(np.int64)) - int(c[b])
        expected = dots * s[b].astype(np.float64) * float(d[b]) + float(d[b]) * t[b].astype(np.float64)
        assert np.all(np.abs(got[b] - expected) <= 1e-6 * (np.abs(dots * s[b] * d[b]) + np.abs(expected) + 1))
        assert np.array_equal(unpacked[b], np.concatenate([packed[b] & 15, packed[b] >> 4]))


def test_the_float16_scales_read_in_place_are_numpys_for_every_bit_pattern():
    _, halves, _ = _simd_compiled()
    bits = np.arange(1 << 16, dtype=np.uint16)
    expected = bits.view(np.float16).astype(np.float32)
    got = halves(bits.view(np.uint8))
    finite = np.isfinite(expected)
    assert np.array_equal(got[finite], expected[finite])
    assert np.array_equal(np.isnan(got), np.isnan(expected)) and np.array_equal(
        got[np.isinf(got)], expected[np.isinf(expected)]
    )


def test_without_vnni_or_f16c_the_portable_vector_code_gives_the_same_numbers(tmp_path):
    """numba compiling for a generic x86-64 (no VNNI, AVX2 or F16C) takes the portable LLVM code,
    whose numbers equal those of this CPU's byte products (VNNI's, or AVX2's two steps)."""
    import os
    import subprocess
    import sys

    if not _cpu_has_byte_products() or os.uname().machine != "x86_64":
        pytest.skip("compares the portable code with the VNNI or AVX2 path on an x86-64 CPU that has one")
    code = (
        "import sys, numpy as np, tests.test_quant as t\n"
        "from arraygpt.backends.numpy.kernels import _simd\n"
        "assert not _simd.has_vnni() and not _simd.has_avx2()\n"
        "dots, halves, sums = t._simd_compiled()\n"
        "rng = np.random.default_rng(3)\n"
        "row = rng.integers(0, 256, 34 * 8, dtype=np.uint8); xq = rng.integers(-127, 128, 256).astype(np.int8)\n"
        "np.save(sys.argv[1] + '/dots.npy', dots(row, xq, np.arange(8) % 6))\n"
        "np.save(sys.argv[1] + '/halves.npy', halves(np.arange(1 << 16, dtype=np.uint16).view(np.uint8)))\n"
        "got = sums(*t._prompt_case(6, 3)); np.save(sys.argv[1] + '/sums.npy', got[0]); "
        "np.save(sys.argv[1] + '/small.npy', got[2])\n"
    )
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    generic = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert generic.returncode == 0, generic.stderr[-2000:]
    dots, _, sums = _simd_compiled()
    got = sums(*_prompt_case(6, 3))
    assert np.array_equal(np.load(tmp_path / "sums.npy"), got[0])
    assert np.array_equal(np.load(tmp_path / "small.npy"), got[2])
    rng = np.random.default_rng(3)
    row = rng.integers(0, 256, 34 * 8, dtype=np.uint8)
    xq = rng.integers(-127, 128, 256).astype(np.int8)
    assert np.array_equal(np.load(tmp_path / "dots.npy"), dots(row, xq, np.arange(8) % 6))
    got = np.load(tmp_path / "halves.npy")
    expected = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    assert np.array_equal(got, expected, equal_nan=True)


def _activations(x: np.ndarray):
    from arraygpt.backends.numpy.kernels import _blocks

    M, K = x.shape
    xq, dx, xsum = np.empty((M, K), np.int8), np.empty((M, K // 32), np.float32), np.empty((M, K // 32), np.float32)
    _blocks._quantize_rows(x, xq, dx, xsum)
    return xq, dx, xsum


@given(
    M=st.integers(1, 4),
    n_blocks=st.integers(1, 4),
    scale=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_activations_quantize_as_the_gguf_q8_0_quantizer(M, n_blocks, scale, seed):
    _kernel()
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((M, 32 * n_blocks)) * scale).astype(np.float32)
    x[0, :32] = 0.0  # a block of zeros: scale 0, quants 0
    xq, dx, xsum = _activations(x)
    blocks = quants.quantize(x, GGMLQuantizationType.Q8_0).reshape(M, n_blocks, 34)
    assert np.array_equal(xq.reshape(M, n_blocks, 32), blocks[..., 2:].view(np.int8))
    d16 = blocks[..., :2].copy().view(np.float16)[..., 0]
    assert np.array_equal(dx.astype(np.float16), d16)  # gguf keeps the scale as float16
    np.testing.assert_allclose(xsum, x.reshape(M, n_blocks, 32).sum(-1, dtype=np.float64), rtol=1e-5, atol=1e-5 * scale)


def _split(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W = W_q + W_c (float64, (N, K)): the part that multiplies the quants (d_b q) and the
    constant part (m_b, -8 d_b or 0), W_c as the gguf dequantizer reads the blocks with quants 0."""
    rows = blocks.shape[0]
    start = {"q8_0": 2, "q4_0": 2, "q4_1": 4, "q5_0": 2, "q5_1": 4}[kind]
    zeroed = blocks.copy()
    zeroed[..., start:] = 0
    dense = quants.dequantize(blocks.reshape(rows, -1), TYPES[kind]).astype(np.float64)
    constant = quants.dequantize(zeroed.reshape(rows, -1), TYPES[kind]).astype(np.float64)
    return dense - constant, constant


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
@given(
    rows=st.integers(1, 70),
    n_blocks=st.integers(1, 4),
    M=st.sampled_from([1, 2, 8, 9, 16, 21]),  # decoding's rows, then a prompt's groups of 8 (the last padded)
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_int8_kernel_multiplies_the_quantized_activations_exactly_as_floats(kind, rows, n_blocks, M, threads, seed):
    """out = x_hat @ W_q.T + x @ W_c.T, x_hat = dx xq the activations as quantized (checked against
    gguf's quantizer above), within the float32 bound of the sums. A prompt's int8 groups run
    here whatever the CPU (where it lacks VNNI, a model sends prompts to float32 tiles instead)."""
    from arraygpt.backends.numpy import blas_threads

    kernel = _kernel()
    vnni = mock.patch.object(kernel, "has_vnni", lambda: True)
    blocks = _random_blocks(kind, rows, n_blocks, seed)
    if kind == "q8_0":
        blocks[0, 0, 2] = 0x80  # a quant of -128, which llama.cpp's quantizer never writes
    K = 32 * n_blocks
    w = QuantizedWeight(kind, blocks, (rows, K))
    x = np.random.default_rng(seed).standard_normal((M, K)).astype(np.float32)
    with blas_threads(threads), vnni:
        out, _ = kernel.quantized_linear_int8_forward(x, w)
    _assert_exact_as_floats(kind, blocks, x, out)


@pytest.mark.parametrize(
    "vnni, avx2, kinds, groups",
    [
        (True, True, {"q8_0"}, True),
        (True, False, {"q4_1", "q8_0"}, True),
        (False, True, {"q4_1", "q5_0", "q4_k"}, True),  # the nibble kinds' pairs fit AVX2's int16 step
        (False, True, {"q4_1", "q8_0"}, False),  # Q8_0's do not
        (False, False, {"q4_1"}, False),
    ],
)
def test_a_prompt_goes_to_the_int8_groups_where_the_cpu_sums_its_kinds_bytes(monkeypatch, vnni, avx2, kinds, groups):
    from arraygpt.backends.numpy import blas_threads

    kernel = _kernel()
    monkeypatch.setattr(kernel, "has_vnni", lambda: vnni)
    monkeypatch.setattr(kernel, "has_avx2", lambda: avx2)
    with blas_threads(2):
        assert kernel.groups_pay(kernel.MAX_ROWS + 1, kinds) is groups
        assert kernel.groups_pay(kernel.GROUP_ROWS * 2 + 1, kinds) is False  # past GROUP_ROWS a thread: tiles


@pytest.mark.parametrize("kind", ["q8_0", "q4_1", "q5_0"])
@pytest.mark.parametrize("M", [1, 13])
def test_the_int8_kernel_splits_the_rows_of_w_over_two_threads(kind, M):
    from arraygpt.backends.numpy import blas_threads

    kernel = _kernel()
    rows = 2 * kernel.MIN_ROWS_PER_THREAD + 7  # two parts, the second a row longer
    blocks = _random_blocks(kind, rows, 2, seed=5)
    x = np.random.default_rng(5).standard_normal((M, 64)).astype(np.float32)
    with blas_threads(2), mock.patch.object(kernel, "has_vnni", lambda: True):
        out, _ = kernel.quantized_linear_int8_forward(x, QuantizedWeight(kind, blocks, (rows, 64)))
    _assert_exact_as_floats(kind, blocks, x, out)


def _assert_exact_as_floats(kind: str, blocks: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    (M, K), n_blocks = x.shape, blocks.shape[1]
    xq, dx, _ = _activations(x)
    x_hat = xq.reshape(M, n_blocks, 32).astype(np.float64) * dx[..., None].astype(np.float64)
    w_q, w_c = _split(kind, blocks)
    expected = x_hat.reshape(M, K) @ w_q.T + x.astype(np.float64) @ w_c.T
    assert np.all(
        np.abs(out - expected) <= _bound(kind, blocks, np.maximum(np.abs(x), np.abs(x_hat.reshape(M, K)))) + 1e-6
    )


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
@given(
    rows=st.integers(1, 40),
    n_blocks=st.integers(1, 4),
    M=st.sampled_from([1, 3, 8, 9, 300]),
    bias=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_int8_kernel_is_within_its_documented_bound_of_the_gguf_dequantized_product(
    kind, rows, n_blocks, M, bias, seed
):
    """|out - x @ W.T| <= sum_j |W_q,j| dx_b / 2 (the activations' rounding, docs/gguf.md) plus
    the float32 bound; the kinds without an int8 path (Q5) and long prompts (more rows than
    ``groups_pay`` takes) are the float32 kernel's numbers."""
    kernel = _kernel()
    blocks, w, x, b = _case(kind, rows, n_blocks, M, bias, seed)
    out, _ = kernel.quantized_linear_int8_forward(x, w, b)
    dense = quants.dequantize(blocks.reshape(rows, -1), TYPES[kind]).astype(np.float64)
    expected = x.astype(np.float64) @ dense.T + (0 if b is None else b)
    tol = _bound(kind, blocks, x) + 1e-6
    if kind in kernel.INT8_KINDS and (M <= kernel.MAX_ROWS or kernel.groups_pay(M, {kind})):
        _, dx, _ = _activations(x)
        w_q, _ = _split(kind, blocks)
        half_step = np.repeat(dx.astype(np.float64) / 2, 32, axis=1) * (1 + 1e-6)  # (M, K)
        tol = tol + half_step @ np.abs(w_q).T
    else:
        float_out, _ = kernel.quantized_linear_forward(x, w, b)
        assert np.array_equal(out, float_out)
    assert np.all(np.abs(out - expected) <= tol)


def test_backward_through_quantized_weights_is_refused_with_what_to_do():
    from arraygpt.nn.quant import quantized_linear_backward

    _, cache = quantized_linear_pair_forward(
        np.ones((1, 32), np.float32), QuantizedWeight("q8_0", _random_blocks("q8_0", 1, 1, 0), (1, 32))
    )
    with pytest.raises(RuntimeError, match="inference only.*dtype='float32'"):
        quantized_linear_backward(np.ones((1, 1), np.float32), cache)


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
@pytest.mark.parametrize("M", [1, 10])
def test_the_k_quants_run_a_tile_of_rows_at_a_time(monkeypatch, kind, M):
    kernel = _kernel()
    from arraygpt.backends.numpy.kernels import _blocks

    monkeypatch.setattr(_blocks, "TILE", 3)
    blocks = _random_blocks(kind, 7, 2, M)
    w = QuantizedWeight(kind, blocks, (7, 512))
    x = np.random.default_rng(M).standard_normal((M, 512)).astype(np.float32)
    out, _ = kernel.quantized_linear_forward(x, w)
    dense = quants.dequantize(blocks.reshape(7, -1), TYPES[kind]).astype(np.float64)
    bound = 2 * 512 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(dense).T) + 1e-6
    assert np.all(np.abs(out - x @ dense.T) <= bound)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_1"])
@pytest.mark.parametrize("M", [1, 9])
def test_a_nan_or_inf_in_x_comes_out_of_the_int8_kernel_as_of_the_float_one(kind, M):
    """A diverged model's NaN must not vanish in int8 rounding (max() passes over a NaN)."""
    kernel = _kernel()
    blocks = _random_blocks(kind, 40, 2, seed=M)
    w = QuantizedWeight(kind, blocks, (40, 64))
    for bad in (np.nan, np.inf):
        x = np.random.default_rng(M).standard_normal((M, 64)).astype(np.float32)
        x[0, 5] = bad
        with np.errstate(invalid="ignore"):
            expected = np.isfinite(kernel.quantized_linear_forward(x, w)[0])
            got = np.isfinite(kernel.quantized_linear_int8_forward(x, w)[0])
        assert not got[0].any() and np.array_equal(got, expected)
