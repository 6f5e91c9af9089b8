"""The numpy backend's kernels against the reference of ``arraygpt.nn.layers`` (STYLE.md section 9),
and how ``arraygpt.nn.kernels`` chooses them: registration through the plugin hook, declining,
the reference switch, and a whole model's gradients with and without kernels.

One section per module of ``backends/numpy/kernels/`` (headed by its path, in the order of that
package's table): Hypothesis-drawn shapes, forward and backward against the reference at
dtype-derived tolerances, and what each kernel hands to the reference. Then the whole model,
choosing kernels, and how they are loaded and compiled.

The numba kernels' tests skip where numba is not installed (then the reference runs, which the
rest of the suite tests); the selection tests run everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from arraygpt import GPT, GPTConfig, hookimpl, manager
from arraygpt.backends import numpy as numpy_backend
from arraygpt.backends.numpy.kernels import (
    _jit,
    _mkl,
    _threads,
    adam,
    attention,
    crossentropy,
    gelu,
    linear,
    norm,
    rope,
    swiglu,
)
from arraygpt.errors import KernelUnavailable, PluginError
from arraygpt.nn import core, kernels, layers
from arraygpt.nn.kernels import KernelPair, KernelSpec, UpdateSpec
from arraygpt.xp import load_backend
from conftest import cpu_flags

try:
    _jit.numba()
    HAS_NUMBA = True
except KernelUnavailable:
    HAS_NUMBA = False
needs_numba = pytest.mark.skipif(
    not HAS_NUMBA, reason="numba is not installed: the numpy kernels are unavailable and the reference runs"
)
DTYPES = ("float64", "float32")
NUMPY = load_backend("numpy")


def assert_close(actual, desired, dtype, what=""):
    """float64 to 1e-12; float32 to 512 eps; both relative to the reference's largest value."""
    if desired is None:
        assert actual is None, what
        return
    tol = 1e-12 if dtype == "float64" else 512 * float(np.finfo(np.float32).eps)
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype} != {desired.dtype}"
    scale = max(1.0, float(np.max(np.abs(desired), initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=0, atol=tol * scale, err_msg=what)


def _array(rng, shape, dtype, contiguous=True):
    """Normal draws of ``shape``; a strided view of a wider array where not ``contiguous``."""
    if contiguous:
        return rng.standard_normal(shape).astype(dtype)
    wide = rng.standard_normal((*shape[:-1], 2 * shape[-1])).astype(dtype)
    return wide[..., ::2]


# ----------------------------------------------------------------------------------------------
# backends/numpy/kernels/norm.py: LayerNorm and RMSNorm


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["layernorm", "rmsnorm"]),
    shape=st.sampled_from([(1, 1, 1), (1, 1, 7), (2, 5, 3), (3, 1, 16), (2, 9, 33), (13, 5), (4,)]),
    dtype=st.sampled_from(DTYPES),
    gain=st.booleans(),
    bias=st.booleans(),
    contiguous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_norm_kernels_equal_reference(kind, shape, dtype, gain, bias, contiguous, seed):
    rng = np.random.default_rng(seed)
    C = shape[-1]
    x = _array(rng, shape, dtype, contiguous) * np.asarray(3.0, dtype=dtype) + np.asarray(1.5, dtype=dtype)
    w = _array(rng, (C,), dtype) if gain else None
    b = _array(rng, (C,), dtype) if bias else None
    dout = _array(rng, shape, dtype, contiguous)
    forward, backward = getattr(norm, kind + "_forward"), getattr(norm, kind + "_backward")
    ref_forward, ref_backward = layers.NORMS[kind]
    out, cache = forward(x, w, b, 1e-5)
    ref_out, ref_cache = ref_forward(x, w, b, 1e-5)
    assert_close(out, ref_out, dtype, f"{kind} forward")
    assert isinstance(cache, layers.NormCache)
    for got, want, name in zip(cache[:2], ref_cache[:2], ("xhat", "rstd")):
        assert_close(got, want, dtype, f"{kind} cache.{name}")
    for got, want, name in zip(backward(dout, cache), ref_backward(dout, ref_cache), ("dx", "dw", "db")):
        assert_close(got, want, dtype, f"{kind} backward {name}")


# ----------------------------------------------------------------------------------------------
# backends/numpy/kernels/linear.py: the linear layer for a few rows (decoding)


REFERENCE_LINEAR = layers.linear_forward  # the tests below spy on calls of it


def _spy_on_reference_linear(mp, calls):
    """Make the reference linear forward record its calls in ``calls`` (the kernel's declines)."""
    mp.setattr(linear.layers, "linear_forward", lambda *a: calls.append(a) or REFERENCE_LINEAR(*a))


def _spy_on_launches(mp, launches):
    """Make the parallel launches of the decoding kernels record their numbers of parts."""
    launch = _threads.launch
    mp.setattr(_threads, "launch", lambda kernel, parts, *a: launches.append(parts) or launch(kernel, parts, *a))


needs_blas_control = pytest.mark.skipif(
    numpy_backend.blas_thread_count() is None,
    reason="NumPy's BLAS is not an OpenBLAS whose threads arraygpt can read: the linear kernel declines every call",
)


@needs_numba
@needs_blas_control
@settings(max_examples=60, deadline=None)
@given(
    lead=st.sampled_from([(1,), (1, 1), (2, 1), (1, 3), (4,), (5,), (2, 3), (8,), (3, 3)]),
    Cin=st.sampled_from([1, 3, 8, 37]),
    Cout=st.sampled_from([1, 2, 11, 65]),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    contiguous=st.booleans(),
    blas=st.sampled_from([1, 2, 3]),
    min_rows=st.sampled_from([1, 5, linear.MIN_ROWS_PER_THREAD]),
    seed=st.integers(0, 2**16),
)
def test_linear_rows_kernel_equals_reference(lead, Cin, Cout, bias, dtype, contiguous, blas, min_rows, seed):
    """Up to MAX_ROWS rows (a decode step, or a small batch of them) the kernel computes, beyond
    that the reference does; both give the reference's output and its cache, so the backward is
    the reference's. w's rows split over up to ``blas`` numba threads (parts of at least
    ``min_rows`` rows), the parts' bounds falling anywhere."""
    rng = np.random.default_rng(seed)
    x, w = _array(rng, (*lead, Cin), dtype, contiguous), _array(rng, (Cout, Cin), dtype)
    b = _array(rng, (Cout,), dtype) if bias else None
    calls, launches = [], []
    with pytest.MonkeyPatch.context() as mp, NUMPY.blas_threads(blas):
        _spy_on_reference_linear(mp, calls)
        _spy_on_launches(mp, launches)
        mp.setattr(linear, "MIN_ROWS_PER_THREAD", min_rows)
        mp.setattr(_mkl, "_chosen", [None])  # NumPy's BLAS for more rows (MKL's path: the tests below)
        out, cache = linear.linear_forward(x, w, b)
    ref_out, ref_cache = layers.linear_forward(x, w, b)
    rows = int(np.prod(lead))
    assert len(calls) == (rows > linear.MAX_ROWS)
    parts = min(blas, Cout // min_rows, _jit.numba().config.NUMBA_NUM_THREADS)
    assert launches == ([parts] if rows <= linear.MAX_ROWS and parts > 1 else [])
    assert_close(out, ref_out, dtype, "linear forward")
    assert type(cache) is layers.LinearCache and cache.x is x and cache.w is w and cache.has_bias == bias
    dout = _array(rng, (*lead, Cout), dtype)
    for got, want, name in zip(
        layers.linear_backward(dout, cache), layers.linear_backward(dout, ref_cache), ["dx", "dw", "db"]
    ):
        assert_close(got, want, dtype, f"linear backward {name}")


@needs_numba
@needs_blas_control
def test_linear_rows_kernel_declines_what_it_does_not_take(monkeypatch):
    """An unknown BLAS thread count, a strided weight, mixed dtypes, a broadcast bias, float16,
    mismatched sizes: the reference, with its result and errors."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((1, 1, 6)), rng.standard_normal((5, 6)), rng.standard_normal((5,))
    calls = []
    _spy_on_reference_linear(monkeypatch, calls)
    with NUMPY.blas_threads(1):
        linear.linear_forward(x, w, b)
        assert calls == []  # taken
        for args in [
            (x, np.asfortranarray(w), b),
            (x.astype(np.float32), w, b),
            (x, w, b[:1]),
            (x.astype(np.float16), w.astype(np.float16), None),
        ]:
            np.testing.assert_array_equal(linear.linear_forward(*args)[0], REFERENCE_LINEAR(*args)[0])
        with pytest.raises(ValueError):  # the reference's matmul error
            linear.linear_forward(x, w[:, :5], None)
        assert len(calls) == 5
    with NUMPY.blas_threads(4):  # any number of threads: w's rows split over them
        linear.linear_forward(x, w, b)
    assert len(calls) == 5
    monkeypatch.setattr(numpy_backend, "blas_thread_count", lambda: None)
    linear.linear_forward(x, w, b)
    assert len(calls) == 6


try:
    MKL_SGEMM, NO_MKL = _mkl._load(), ""
except KernelUnavailable as e:
    MKL_SGEMM, NO_MKL = None, f"MKL is not at hand: {e}"
needs_mkl = pytest.mark.skipif(MKL_SGEMM is None, reason=NO_MKL)


def _choose_mkl(mp):
    """MKL chosen for the linear layers' one-thread float32 products (``_mkl.py``)."""
    mp.setattr(_mkl, "_chosen", [MKL_SGEMM])


def _stored(rng, shape, transposed, pad):
    """A float32 matrix of ``shape`` stored row-major with ``pad`` spare values per row, or as the
    transposed view of such a matrix (as the backward's dout^T and w^T are); pad -1: every other
    column of a wider matrix (a layout BLAS cannot read, copied first)."""
    rows, cols = shape[::-1] if transposed else shape
    if pad < 0:
        x = rng.standard_normal((rows, 2 * cols), dtype=np.float32)[:, ::2]
    else:
        x = rng.standard_normal((rows, cols + pad), dtype=np.float32)[:, :cols]
    return x.T if transposed else x


@needs_mkl
@needs_blas_control
@settings(max_examples=80, deadline=None)
@given(
    M=st.integers(1, 70),
    N=st.integers(1, 70),
    K=st.integers(1, 70),
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    pad_a=st.sampled_from([0, 3, -1]),
    pad_b=st.sampled_from([0, 16]),
    seed=st.integers(0, 2**16),
)
def test_mkl_product_equals_float64_product(M, N, K, trans_a, trans_b, pad_a, pad_b, seed):
    """MKL's product of float32 matrices, each row-major (rows padded or not), a transposed view or
    strided, equals NumPy's float64 product to float32 round-off: |error| <= K eps32 (|a| @ |b|)."""
    rng = np.random.default_rng(seed)
    a, b = _stored(rng, (M, K), trans_a, pad_a), _stored(rng, (K, N), trans_b, pad_b)
    with pytest.MonkeyPatch.context() as mp, NUMPY.blas_threads(1):
        _choose_mkl(mp)
        out = _mkl.matmul(a, b)
    assert out.shape == (M, N) and out.dtype == np.float32 and out.flags.c_contiguous
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    bound = K * np.finfo(np.float32).eps * (np.abs(a64) @ np.abs(b64))
    assert (np.abs(out - a64 @ b64) <= bound).all()


@needs_mkl
@needs_blas_control
def test_mkl_product_declines_what_it_does_not_take(monkeypatch):
    """float64, a stack of matrices, a zero size, mismatched inner sizes, more than one BLAS
    thread: None (NumPy's matmul then), nothing computed."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 5), dtype=np.float32), rng.standard_normal((5, 4), dtype=np.float32)
    _choose_mkl(monkeypatch)
    with NUMPY.blas_threads(1):
        assert _mkl.matmul(a, b) is not None
        for x, y in [
            (a.astype(np.float64), b.astype(np.float64)),
            (a[None], b),
            (a[:0], b),
            (a, b[:4]),
        ]:
            assert _mkl.matmul(x, y) is None
    with NUMPY.blas_threads(2):
        assert _mkl.matmul(a, b) is None


@needs_mkl
@needs_numba
@needs_blas_control
@settings(max_examples=30, deadline=None)
@given(
    lead=st.sampled_from([(9,), (3, 5), (2, 16)]),
    Cin=st.sampled_from([1, 8, 37]),
    Cout=st.sampled_from([2, 11, 65]),
    bias=st.booleans(),
    contiguous=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_kernel_more_rows_through_mkl_equal_reference(lead, Cin, Cout, bias, contiguous, seed):
    """More than MAX_ROWS float32 rows go through MKL's product in the forward and both products
    of the backward (the reference's linear is not called), giving the reference's output and
    gradients to float32 round-off, the bias gradient exactly, and the reference's cache."""
    rng = np.random.default_rng(seed)
    x, w = _array(rng, (*lead, Cin), np.float32, contiguous), _array(rng, (Cout, Cin), np.float32)
    b = _array(rng, (Cout,), np.float32) if bias else None
    dout = _array(rng, (*lead, Cout), np.float32)
    calls = []
    with pytest.MonkeyPatch.context() as mp, NUMPY.blas_threads(1):
        _choose_mkl(mp)
        _spy_on_reference_linear(mp, calls)
        mp.setattr(linear.layers, "linear_backward", lambda *a: pytest.fail("the reference's backward ran"))
        out, cache = linear.linear_forward(x, w, b)
        grads = linear.linear_backward(dout, cache)
    assert calls == []
    ref_out, ref_cache = layers.linear_forward(x, w, b)
    assert type(cache) is layers.LinearCache and cache.x is x and cache.w is w and cache.has_bias == bias
    assert_close(out, ref_out, np.float32, "linear forward")
    for got, want, name in zip(grads, layers.linear_backward(dout, ref_cache), ["dx", "dw", "db"]):
        assert_close(got, want, np.float32, f"linear backward {name}")
        if name == "db" and bias:
            np.testing.assert_array_equal(got, want)


@needs_mkl
@needs_numba
@needs_blas_control
def test_linear_kernel_through_mkl_keeps_the_references_errors_and_alignment(monkeypatch):
    """A dout whose last axis is not the layer's output width is the reference's ValueError (a
    reshape alone would accept one of the same size); a float32 matrix at an unaligned address is
    copied before MKL reads it, and the product is right."""
    _choose_mkl(monkeypatch)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((8, 16), dtype=np.float32), rng.standard_normal((3, 16), dtype=np.float32)
    with NUMPY.blas_threads(1):
        _, cache = linear.linear_forward(x, w)
        with pytest.raises(ValueError, match="mismatch"):
            linear.linear_backward(rng.standard_normal((4, 6), dtype=np.float32), cache)
        raw = np.zeros(4 * 16 * 9 + 1, np.uint8)
        a = np.frombuffer(raw.data, np.float32, 16 * 9, offset=1).reshape(9, 16)  # unaligned, writable
        a[...] = rng.standard_normal((9, 16), dtype=np.float32)
        assert not a.flags.aligned
        seen = []
        sgemm = _mkl._chosen[0]
        monkeypatch.setattr(_mkl, "_chosen", [lambda *args: seen.append(args[7] % 4) or sgemm(*args)])
        out = _mkl.matmul(a, w.T)
    assert seen == [0]  # the address MKL read a from is float-aligned
    np.testing.assert_allclose(out, a.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_gemm_choice_reads_its_variable(monkeypatch):
    """ARRAYGPT_GEMM: numpy keeps NumPy's BLAS; auto takes MKL only on an Intel CPU; mkl where MKL
    cannot load, and any other value, are errors that name the variable and what it takes."""
    assert _mkl._choose("numpy") is None
    monkeypatch.setattr(_mkl, "_intel_cpu", lambda: False)
    monkeypatch.setattr(_mkl, "_load", lambda: pytest.fail("MKL loaded on a CPU that is not Intel's"))
    assert _mkl._choose("auto") is None
    with pytest.raises(ValueError, match="ARRAYGPT_GEMM must be one of auto, numpy, mkl.*'openblas'"):
        _mkl._choose("openblas")

    def missing():
        raise KernelUnavailable("Intel's mkl package is not installed: pip install 'arraygpt[mkl]'")

    monkeypatch.setattr(_mkl, "_intel_cpu", lambda: True)
    monkeypatch.setattr(_mkl, "_load", missing)
    assert _mkl._choose("auto") is None  # auto falls back quietly
    with pytest.raises(ValueError, match=r"ARRAYGPT_GEMM=mkl, but Intel's mkl package is not installed"):
        _mkl._choose("mkl")


def test_gemm_choice_fails_when_a_model_selects_the_linear_kernel():
    """A bad ARRAYGPT_GEMM stops the model's construction with its message, before any step."""
    code = 'from arraygpt import GPT, GPTConfig; GPT(GPTConfig.preset("microgpt"))'
    env = {**os.environ, "ARRAYGPT_GEMM": "fast"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "ARRAYGPT_GEMM must be one of auto, numpy, mkl" in result.stderr


# ----------------------------------------------------------------------------------------------
# backends/numpy/kernels/attention.py: causal and grouped-query attention


def _attention_inputs(rng, B, T, past, NH, hs, dtype, NKV=None):
    """q, k, v as the model passes them: views of one (B, T, D + 2 Dkv) projection (Dkv = NKV hs,
    NKV = NH unless grouped); with ``past`` > 0, k and v are views of a longer buffer, as a KV
    cache returns them."""
    D, Dkv = NH * hs, (NKV or NH) * hs
    qkv = rng.standard_normal((B, T, D + 2 * Dkv)).astype(dtype)
    q = qkv[..., :D]
    if past == 0:
        return q, qkv[..., D : D + Dkv], qkv[..., D + Dkv :]
    buffer = rng.standard_normal((2, B, past + T + 3, Dkv)).astype(dtype)  # spare positions after the end
    return q, buffer[0, :, : past + T], buffer[1, :, : past + T]


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.sampled_from([1, 2, 4, 5, 8, 13, 16, 48, 64, 70, 96]),
    past=st.sampled_from([0, 0, 1, 4, 67]),
    NKV=st.integers(1, 3),
    G=st.sampled_from([1, 1, 2, 3]),
    hs=st.sampled_from([1, 3, 8, 16, 32, 48]),
    dtype=st.sampled_from(DTYPES),
    blas=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**16),
)
@example(B=2, T=70, past=0, NKV=2, G=3, hs=3, dtype="float64", blas=1, seed=1)  # a key block seen by some queries only
@example(B=1, T=70, past=67, NKV=1, G=2, hs=8, dtype="float32", blas=1, seed=2)  # the same, after a KV cache
@example(B=3, T=1, past=67, NKV=1, G=3, hs=8, dtype="float32", blas=2, seed=3)  # decoding, heads split unevenly
@example(B=2, T=48, past=0, NKV=2, G=2, hs=32, dtype="float32", blas=1, seed=4)  # head tiles, grouped
@example(B=1, T=16, past=0, NKV=1, G=1, hs=16, dtype="float32", blas=1, seed=5)  # head tiles, one tile row
@example(B=1, T=96, past=0, NKV=1, G=2, hs=16, dtype="float32", blas=1, seed=6)  # head tiles, T > 64
@example(B=1, T=80, past=0, NKV=1, G=2, hs=48, dtype="float32", blas=1, seed=7)  # tiles of 32 and of 16 columns
def test_attention_kernel_equals_reference(B, T, past, NKV, G, hs, dtype, blas, seed):
    """T = 1 (a decode step) to DECODE_ROWS (one numba pass, its (row, head) pairs split over up to
    ``blas`` numba threads), odd sizes, more than one query block (T > TILE), a KV cache (past >
    0; 67 puts a key block boundary inside the queries), grouped-query attention (G query heads
    per key/value head), and the head tiles (float32 without a KV cache, T and hs multiples of 16)."""
    rng = np.random.default_rng(seed)
    NH = NKV * G
    q, k, v = _attention_inputs(rng, B, T, past, NH, hs, dtype, NKV)
    dout = rng.standard_normal((B, T, NH * hs)).astype(dtype)
    grouped = {} if G == 1 else {"n_kv_head": NKV}
    launches = []
    with pytest.MonkeyPatch.context() as mp, NUMPY.blas_threads(blas):
        _spy_on_launches(mp, launches)
        mp.setattr(attention, "MIN_KEYS_PER_THREAD", 1)  # split whenever there are threads
        y, cache = attention.attention_forward(q, k, v, NH, **grouped)
    ref_y, ref_cache = layers.attention_forward(q, k, v, NH, **grouped)
    split = min(blas, B * NH, _jit.numba().config.NUMBA_NUM_THREADS) if T <= attention.DECODE_ROWS else 1
    assert launches == ([split] if split > 1 and numpy_backend.blas_thread_count() is not None else [])
    lanes = attention.LANES
    tiles = past == 0 and dtype == "float32" and T % lanes == 0 and hs % lanes == 0 and T <= attention.MAX_TILED_T
    assert type(cache) is (attention.TiledAttentionCache if tiles else attention.FusedAttentionCache)
    assert isinstance(cache, layers.AttentionCache)
    assert cache.k.shape == ref_cache.k.shape == (B, NKV, past + T, hs)
    assert_close(y, ref_y, dtype, "attention forward")
    assert_close(cache.probs, ref_cache.probs, dtype, "attention probs")
    for got, want, name in zip(
        attention.attention_backward(dout, cache), layers.attention_backward(dout, ref_cache), "qkv"
    ):
        assert_close(got, want, dtype, f"attention backward d{name}")


@functools.cache  # once a process: each Hypothesis example compiling it anew cost seconds
def _compiled(fn):
    return _jit.numba().njit(fn)


@needs_numba
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 40),
    stride=st.integers(1, 50),
    transposed=st.booleans(),
    accumulate=st.booleans(),
    width=st.sampled_from([16, 32, 48, 64]),
    seed=st.integers(0, 2**16),
)
def test_head_tiles_are_numpys_product(n, stride, transposed, accumulate, width, seed):
    """attention.product_tiles (8 rows of a product over ``width`` columns) and both tile sets it
    chooses from, whichever CPU runs the test: tiles_avx512 (product_tile32's 8 x 32 tiles, then
    product_tile's 8 x 16) and tiles_avx2 (product_tile4's 4 x 16), _simd's 16-lane vectors,
    compiled and as plain Python, against NumPy's matmul in float64: any k count, a row-major or
    transposed left operand at an offset, a strided right operand, scale and accumulate; nothing
    else of c is written."""
    rng = np.random.default_rng(seed)
    a_row, a_step = (1, stride) if transposed else (stride, 1)
    b_step, c_row = width + 4, width + 8
    a = rng.standard_normal(3 + 8 * a_row + max(n, 1) * a_step).astype(np.float32)
    b = rng.standard_normal(5 + max(n, 1) * b_step).astype(np.float32)
    c = rng.standard_normal(2 + 8 * c_row).astype(np.float32)
    A = np.array([[a[3 + r * a_row + k * a_step] for k in range(n)] for r in range(8)], np.float64).reshape(8, n)
    B = np.array([b[5 + k * b_step : 5 + k * b_step + width] for k in range(n)], np.float64).reshape(n, width)
    tile_rows = [slice(2 + r * c_row, 2 + r * c_row + width) for r in range(8)]
    want = 0.5 * (A @ B) + (np.array([c[t] for t in tile_rows], np.float64) if accumulate else 0)
    outside = np.ones(c.size, bool)
    for t in tile_rows:
        outside[t] = False
    compiled = (_compiled(attention.product_tiles), _compiled(attention.tiles_avx512), _compiled(attention.tiles_avx2))
    for tiles in compiled + (
        attention.product_tiles,
        attention.tiles_avx512,
        attention.tiles_avx2,
    ):
        got = c.copy()
        tiles(n, a, 3, a_row, a_step, b, 5, b_step, got, 2, c_row, np.float32(0.5), accumulate, width)
        assert np.allclose([got[t] for t in tile_rows], want, rtol=1e-5, atol=1e-5 * (1 + n))
        assert np.array_equal(got[outside], c[outside])


@needs_numba
def test_the_head_tiles_are_chosen_by_the_cpus_registers():
    """_simd.has_avx512 (which decides product_tiles' tiles) says what the CPU's flags say, in
    Python and compiled."""
    avx512 = "avx512f" in cpu_flags()
    if os.environ.get("NUMBA_CPU_NAME") or os.environ.get("NUMBA_CPU_FEATURES"):
        pytest.skip("numba compiles for another CPU than this one")
    from arraygpt.backends.numpy.kernels import _simd

    assert _simd.has_avx512() is avx512
    assert _jit.numba().njit(lambda: _simd.has_avx512())() is avx512


@needs_numba
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 48), scale=st.sampled_from([0.1, 10.0, 100.0]), seed=st.integers(0, 2**16))
def test_head_softmax_is_numpys(n, scale, seed):
    """attention._softmax_tiles (_simd's 16-lane max, exp and sums), compiled and as plain Python,
    against NumPy's softmax in float64 over the first n values of a row of 48, zeros after them."""
    rng = np.random.default_rng(seed)
    row = (scale * rng.standard_normal(2 + 48)).astype(np.float32)
    x = row[2 : 2 + n].astype(np.float64)
    want = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    for softmax in (_compiled(attention._softmax_tiles), attention._softmax_tiles):
        got = row.copy()
        softmax(got, 2, n, 48)
        assert np.allclose(got[2 : 2 + n], want, rtol=1e-5, atol=1e-7)
        assert not got[2 + n :].any() and got[:2].tolist() == row[:2].tolist()


@needs_numba
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_kernel_declines_dropout_and_unknown_arguments(dtype):
    """Dropout (with and without grouped keys) and unknown keywords run the reference, forward and
    backward; grouped-query attention runs the kernel."""
    rng = np.random.default_rng(0)
    B, T, NH, hs = 2, 5, 2, 4
    q, k, v = _attention_inputs(rng, B, T, 0, NH, hs, dtype)
    dout = rng.standard_normal((B, T, NH * hs)).astype(dtype)
    coins = rng.random((B, NH, T, T))
    y, cache = attention.attention_forward(q, k, v, NH, 0.25, coins)
    ref_y, ref_cache = layers.attention_forward(q, k, v, NH, 0.25, coins)
    assert type(cache) is layers.AttentionCache and cache.dropout_mask is not None
    assert_close(y, ref_y, dtype)
    for got, want in zip(attention.attention_backward(dout, cache), layers.attention_backward(dout, ref_cache)):
        assert_close(got, want, dtype)
    with pytest.raises(TypeError, match="unexpected keyword"):  # passed on to the reference, which rejects it
        attention.attention_forward(q, k, v, NH, window=3)
    kv = rng.standard_normal((2, B, T, hs)).astype(dtype)  # one key/value head for two query heads
    y, cache = attention.attention_forward(q, kv[0], kv[1], NH, n_kv_head=1)
    assert type(cache) is attention.FusedAttentionCache
    assert_close(y, layers.attention_forward(q, kv[0], kv[1], NH, n_kv_head=1)[0], dtype)
    y, cache = attention.attention_forward(q, kv[0], kv[1], NH, 0.25, coins, n_kv_head=1)  # grouped, with dropout
    assert type(cache) is layers.AttentionCache
    assert_close(y, layers.attention_forward(q, kv[0], kv[1], NH, 0.25, coins, n_kv_head=1)[0], dtype)
    _, cache = attention.attention_forward(q, k, v, NH, n_kv_head=NH)  # the plain call spelled out
    assert type(cache) is attention.FusedAttentionCache
    for n_kv_head in (0, 3):  # not a divisor of n_head: the reference's error
        with pytest.raises(ValueError, match="n_kv_head must divide n_head"):
            attention.attention_forward(q, kv[0], kv[1], NH, n_kv_head=n_kv_head)


@needs_numba
def test_attention_head_tiles_leave_long_sequences_and_scattered_rows_to_blas(monkeypatch):
    """Past MAX_TILED_T positions, and for keys whose rows are not evenly spaced, the tiles'
    shapes run the BLAS blocks, which equal the reference too."""
    rng = np.random.default_rng(1)
    B, T, NH, hs = 2, 32, 2, 16
    q, k, v = _attention_inputs(rng, B, T, 0, NH, hs, "float32")
    assert type(attention.attention_forward(q, k, v, NH)[1]) is attention.TiledAttentionCache
    scattered = np.ascontiguousarray(k.transpose(1, 0, 2)).transpose(1, 0, 2)  # row (b, i) at (i B + b) D
    for case, (kk, limit) in {"long": (k, T // 2), "scattered": (scattered, T)}.items():
        monkeypatch.setattr(attention, "MAX_TILED_T", limit)
        y, cache = attention.attention_forward(q, kk, v, NH)
        assert type(cache) is attention.FusedAttentionCache, case
        assert_close(y, layers.attention_forward(q, kk, v, NH)[0], "float32", case)


# ----------------------------------------------------------------------------------------------
# backends/numpy/kernels/gelu.py: GELU (tanh)


@needs_numba
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 9),
    H=st.integers(1, 37),
    dtype=st.sampled_from(DTYPES),
    contiguous=st.booleans(),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1.0, 6.0]),
)
def test_gelu_tanh_kernel_equals_reference(B, T, H, dtype, contiguous, seed, scale):
    rng = np.random.default_rng(seed)
    x = _array(rng, (B, T, H), dtype, contiguous)
    x *= np.asarray(scale, dtype=dtype)  # in place: a strided x stays strided
    assert x.flags.c_contiguous == contiguous or H == 1
    dout = _array(rng, (B, T, H), dtype)
    out, cache = gelu.gelu_tanh_forward(x)
    ref_out, ref_cache = layers.gelu_tanh_forward(x)
    assert_close(out, ref_out, dtype, "gelu forward")
    assert_close(
        gelu.gelu_tanh_backward(dout, cache), layers.gelu_tanh_backward(dout, ref_cache), dtype, "gelu backward"
    )
    if contiguous:
        assert type(cache) is gelu.GeluCache
    # a non-contiguous dout goes through the fused backward too
    assert_close(gelu.gelu_tanh_backward(dout.T.copy().T, cache), layers.gelu_tanh_backward(dout, ref_cache), dtype)


# ----------------------------------------------------------------------------------------------
# backends/numpy/kernels/crossentropy.py: softmax + cross-entropy


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    N=st.integers(1, 20),
    V=st.sampled_from([1, 2, 3, 7, 65, 70]),
    dtype=st.sampled_from(DTYPES),
    reduction=st.sampled_from(["mean", "sum"]),
    ignored=st.floats(0.0, 1.0),
    scale=st.sampled_from([1.0, 30.0]),
    contiguous=st.booleans(),
    int32=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_crossentropy_kernel_equals_reference(N, V, dtype, reduction, ignored, scale, contiguous, int32, seed):
    rng = np.random.default_rng(seed)
    logits = _array(rng, (N, V), dtype, contiguous) * np.asarray(scale, dtype=dtype)
    targets = rng.integers(0, V, N).astype(np.int32 if int32 else np.int64)
    targets[rng.random(N) < ignored] = -1
    if not (targets >= 0).any() and reduction == "mean":
        targets[0] = 0  # the all-ignored mean is nan on both sides (tested below)
    loss, cache = crossentropy.crossentropy_forward(logits, targets, reduction=reduction)
    ref_loss, ref_cache = layers.crossentropy_forward(logits, targets, reduction=reduction)
    assert_close(loss, ref_loss, dtype, "loss")
    assert type(cache) is (
        crossentropy.FusedCrossEntropyCache if logits.flags.c_contiguous else layers.CrossEntropyCache
    )
    assert_close(cache.probs, ref_cache.probs, dtype, "probs")
    np.testing.assert_array_equal(cache.targets, ref_cache.targets)
    np.testing.assert_array_equal(cache.weights, ref_cache.weights)
    assert float(cache.divisor) == float(ref_cache.divisor)
    for dloss in (1.0, 0.25):
        assert_close(
            crossentropy.crossentropy_backward(dloss, cache), layers.crossentropy_backward(dloss, ref_cache), dtype
        )


@needs_numba
def test_crossentropy_kernel_edge_cases():
    logits = np.zeros((3, 4))
    with pytest.warns(RuntimeWarning):
        loss, cache = crossentropy.crossentropy_forward(logits, np.array([-1, -1, -1]))
    assert np.isnan(loss)
    with np.errstate(all="ignore"):  # every row ignored: NaN gradients, as the reference (and PyTorch)
        want = layers.crossentropy_backward(1.0, layers.crossentropy_forward(logits, np.array([-1, -1, -1]))[1])
        got = crossentropy.crossentropy_backward(1.0, cache)
    assert np.isnan(want).all() and np.isnan(got).all()
    with pytest.raises(ValueError, match="reduction"):  # the reference's error
        crossentropy.crossentropy_forward(logits, np.array([0, 1, 2]), reduction="max")
    with pytest.raises(IndexError):  # a target out of range: the reference's error, not a wild write
        crossentropy.crossentropy_forward(logits, np.array([0, 1, 4]))


# ----------------------------------------------------------------------------------------------
# backends/numpy/kernels/rope.py: rotary position embeddings


def _random_tables(rng, T, hs, dtype):
    """cos and sin tables whose two halves differ: the kernel must read them as the reference does."""
    return rng.standard_normal((T, hs)).astype(dtype), rng.standard_normal((T, hs)).astype(dtype)


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.sampled_from([1, 2, 5, 16]),
    past=st.sampled_from([0, 1, 7]),
    NH=st.integers(1, 3),
    hs=st.sampled_from([2, 4, 6, 32]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["qkv", "contiguous", "strided"]),
    tables=st.sampled_from(["rope", "scaled", "random"]),
    seed=st.integers(0, 2**16),
)
def test_rope_kernel_equals_reference(B, T, past, NH, hs, dtype, layout, tables, seed):
    """T = 1 (a decode step), odd head halves (hs = 6), positions offset by a KV cache's past
    (the tables of core.rope_tables at past .. past + T - 1), q as a view of the qkv projection,
    Llama 3.1's scaled frequencies, and tables whose halves differ."""
    rng = np.random.default_rng(seed)
    D = NH * hs
    if layout == "qkv":
        x = rng.standard_normal((B, T, 3 * D)).astype(dtype)[..., D : 2 * D]  # k of a qkv projection
    else:
        x = _array(rng, (B, T, D), dtype, layout == "contiguous")
    if tables == "random":
        cos, sin = _random_tables(rng, T, hs, dtype)
    else:
        inv_freq = layers.rope_frequencies(hs, 500.0, (8.0, 1.0, 4.0, 8) if tables == "scaled" else None)
        cos, sin = layers.rope_tables(np, T, past, inv_freq, np.dtype(dtype))
    dout = _array(rng, (B, T, D), dtype)
    out, cache = rope.rope_forward(x, cos, sin)
    ref_out, ref_cache = layers.rope_forward(x, cos, sin)
    assert_close(out, ref_out, dtype, "rope forward")
    assert type(cache) is (layers.RopeCache if layout == "strided" else rope.FusedRopeCache)
    assert_close(rope.rope_backward(dout, cache), layers.rope_backward(dout, ref_cache), dtype, "rope backward")
    assert_close(rope.rope_backward(dout.T.copy().T, cache), layers.rope_backward(dout, ref_cache), dtype)
    strided_dout = _array(rng, (B, T, D), dtype, contiguous=False)  # the backward declines it too
    assert_close(rope.rope_backward(strided_dout, cache), layers.rope_backward(strided_dout, ref_cache), dtype)


@needs_numba
def test_rope_kernel_declines_what_it_does_not_take():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 10))
    cos, sin = _random_tables(rng, 3, 5, "float64")  # an odd head size: the reference's rotate_half
    out, cache = rope.rope_forward(x, cos, sin)
    assert type(cache) is layers.RopeCache
    np.testing.assert_array_equal(out, layers.rope_forward(x, cos, sin)[0])
    with pytest.raises(AssertionError, match="rope tables have"):  # the reference's check
        rope.rope_forward(x, *_random_tables(rng, 4, 2, "float64"))
    _, cache = rope.rope_forward(x.astype(np.float32), cos, sin)  # mixed dtypes
    assert type(cache) is layers.RopeCache


# ----------------------------------------------------------------------------------------------
# backends/numpy/kernels/swiglu.py: SwiGLU


def _pair(rng, shape, dtype, layout):
    """gate and up (or any two (..., H) inputs): ``halves`` of one (..., 2H) array, as the model's
    fused gate_up projection gives them; ``contiguous``; ``strided`` (every other value of wider
    rows, which the kernels hand to the reference)."""
    if layout == "halves":
        both = rng.standard_normal((*shape[:-1], 2 * shape[-1])).astype(dtype)
        return both[..., : shape[-1]], both[..., shape[-1] :]
    return _array(rng, shape, dtype, layout == "contiguous"), _array(rng, shape, dtype, layout == "contiguous")


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.sampled_from([1, 2, 5, 8]),
    H=st.sampled_from([1, 2, 7, 33, 352]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["halves", "contiguous", "strided"]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1.0, 8.0, 100.0]),
)
def test_swiglu_kernel_equals_reference(B, T, H, dtype, layout, seed, scale):
    """T = 1, odd H, the gate and up halves of one projection (strided rows), large |gate|
    (sigmoid saturates: the exp cap)."""
    rng = np.random.default_rng(seed)
    gate, up = _pair(rng, (B, T, H), dtype, layout)
    gate *= np.asarray(scale, dtype=dtype)  # in place: gate stays a view
    dout = _array(rng, (B, T, H), dtype)
    out, cache = swiglu.swiglu_forward(gate, up)
    ref_out, ref_cache = layers.swiglu_forward(gate, up)
    assert_close(out, ref_out, dtype, "swiglu forward")
    assert isinstance(cache, layers.SwiGLUCache)
    assert type(cache) is (layers.SwiGLUCache if layout == "strided" and H > 1 else swiglu.FusedSwiGLUCache)
    grads = zip(swiglu.swiglu_backward(dout, cache), layers.swiglu_backward(dout, ref_cache), ("dgate", "dup"))
    for got, want, name in grads:
        assert_close(got, want, dtype, f"swiglu backward {name}")
    dg, du = swiglu.swiglu_backward(dout.T.copy().T, cache)  # a non-contiguous dout
    assert_close(dg, layers.swiglu_backward(dout, ref_cache)[0], dtype)


@needs_numba
def test_swiglu_kernel_declines_what_it_does_not_take():
    rng = np.random.default_rng(0)
    gate = np.linspace(-3, 3, 12, dtype=np.float16).reshape(3, 4)
    out, cache = swiglu.swiglu_forward(gate, gate)
    assert type(cache) is layers.SwiGLUCache and out.dtype == np.float16
    _, cache = swiglu.swiglu_forward(rng.standard_normal((3, 4)), rng.standard_normal((4,)))  # broadcast: the reference
    assert type(cache) is layers.SwiGLUCache


# ----------------------------------------------------------------------------------------------
# backends/numpy/kernels/adam.py: the Adam/AdamW update, bit-identical to the plugins' reference update


def _adam_pair(name, shapes, dtype, seed, **options):
    """Two optimizers ``name`` on equal parameters: with the kernels, and with the reference."""
    from arraygpt.training.optim import create_optimizer

    rng = np.random.default_rng(seed)
    fast = {f"p{i}": rng.standard_normal(shape).astype(dtype) for i, shape in enumerate(shapes)}
    ref = {k: v.copy() for k, v in fast.items()}
    return (
        fast,
        ref,
        create_optimizer(name, fast, **options),
        create_optimizer(name, ref, kernels="reference", **options),
    )


@needs_numba
@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["adam", "adamw"]),
    shapes=st.sampled_from([[(1,)], [(7,)], [(3, 5), (5,)], [(17, 33), (1, 1), (4, 2, 3)]]),
    dtype=st.sampled_from(DTYPES),
    beta1=st.sampled_from([0.0, 0.9]),
    beta2=st.sampled_from([0.95, 0.999]),
    eps=st.sampled_from([1e-8, 1e-3]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    lrs=st.lists(st.sampled_from([0.0, 1e-3, 3e-2]), min_size=1, max_size=4),
    seed=st.integers(0, 99),
)
def test_adam_update_kernel_is_bit_identical_to_reference(
    name, shapes, dtype, beta1, beta2, eps, weight_decay, lrs, seed
):
    fast, ref, opt_fast, opt_ref = _adam_pair(
        name, shapes, dtype, seed, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay
    )
    assert all(f is adam.adam_update for f in opt_fast.fused.values()) and set(opt_ref.fused.values()) == {None}
    rng = np.random.default_rng(seed + 1)
    for lr in lrs:
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in fast.items()}
        opt_fast.step(grads, lr)
        opt_ref.step({k: g.copy() for k, g in grads.items()}, lr)
    for k in fast:  # the same numbers to the last bit, parameters and both moments
        np.testing.assert_array_equal(fast[k], ref[k], err_msg=k)
        for buffer in ("m", "v"):
            np.testing.assert_array_equal(
                opt_fast.buffers[buffer][k], opt_ref.buffers[buffer][k], err_msg=f"{buffer}.{k}"
            )
    assert opt_fast.state_dict().keys() == opt_ref.state_dict().keys()


@needs_numba
def test_adam_update_kernel_declines_what_it_does_not_take():
    p = np.ones((4, 6), np.float32)
    g = np.ones((4, 6), np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    args = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True, step=1)
    assert not adam.adam_update(p[:, ::2], g[:, ::2], m[:, ::2], v[:, ::2], **args)  # strided views
    assert not adam.adam_update(p, g.astype(np.float64), m, v, **args)  # mixed dtypes
    assert not adam.adam_update(p, g[:2], m, v, **args)  # shapes differ
    assert not adam.adam_update(
        p.astype(np.float16), g.astype(np.float16), m.astype(np.float16), v.astype(np.float16), **args
    )
    np.testing.assert_array_equal(p, 1.0)  # nothing changed
    assert adam.adam_update(p, g, m, v, **args) and not np.array_equal(p, 1.0)
    # a strided parameter (a ZeRO shard could be one) runs the reference update inside the optimizer
    wide, wide_ref = np.ones((4, 12), np.float64), np.ones((4, 12), np.float64)
    from arraygpt.training.optim import create_optimizer

    fast = create_optimizer("adamw", {"w": wide[:, ::2]})
    ref = create_optimizer("adamw", {"w": wide_ref[:, ::2]}, kernels="reference")
    grad = np.random.default_rng(0).standard_normal((4, 6))
    fast.step({"w": grad}, 1e-2)
    ref.step({"w": grad.copy()}, 1e-2)
    np.testing.assert_array_equal(wide, wide_ref)


# ----------------------------------------------------------------------------------------------
# every family: arrays that are not theirs go to the reference


@needs_numba
def test_kernels_hand_other_arrays_to_the_reference():
    """float16 and array-api-strict arrays are not the kernels': the reference computes them."""
    x = np.linspace(-3, 3, 12, dtype=np.float16).reshape(3, 4)
    out, cache = gelu.gelu_tanh_forward(x)
    assert type(cache) is layers.ActivationCache and out.dtype == np.float16
    strict = load_backend("array_api_strict").xp
    xs = strict.asarray(np.ones((2, 3)))
    out, cache = norm.layernorm_forward(xs, None, None, 1e-5)
    assert type(cache) is layers.NormCache


# ----------------------------------------------------------------------------------------------
# the whole model: kernels against the reference


SMALL = GPTConfig(vocab_size=19, block_size=16, n_layer=2, n_head=2, n_embd=12)


# Llama-style: RoPE, SwiGLU, grouped-query attention (2 key/value heads of 4), RMSNorm, no biases;
# odd sizes (head halves of 3, a SwiGLU hidden size of 21)
LLAMA = GPTConfig(
    vocab_size=19,
    block_size=16,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=24,
    position="rope",
    mlp="swiglu",
    mlp_hidden=21,
    norm="rmsnorm",
    bias=False,
)


@needs_numba
@pytest.mark.parametrize(
    "config",
    [
        SMALL,
        GPTConfig(vocab_size=19, block_size=16, n_layer=2, n_head=3, n_embd=15, norm="rmsnorm", bias=False),
        GPTConfig(vocab_size=19, block_size=16, n_layer=1, n_head=2, n_embd=8, norm_affine=False),
        LLAMA,
        dataclasses.replace(LLAMA, n_kv_head=4, qkv_bias=True, rope_scaling=(8.0, 1.0, 4.0, 8)),
    ],
    ids=["layernorm", "rmsnorm-nobias", "no-affine", "llama-gqa", "qwen2-mha"],
)
def test_model_gradients_with_kernels_equal_reference(config):
    fast = GPT(config, seed=3, dtype="float64", kernels=None)
    ref = GPT(config, seed=3, dtype="float64", kernels="reference")
    kinds = ("norm", "attention", "activation", "crossentropy", "rope", "swiglu")
    used = {
        kind
        for kind in kinds
        if getattr(fast.kernels, kind)[0].__module__.startswith("arraygpt.backends.numpy.kernels.")
    }
    assert used == set(kinds)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, config.vocab_size, (5, config.block_size + 1))
    targets = batch[:, 1:].copy()
    targets[0, :3] = -1  # ignored positions
    logits, loss = fast.forward(batch[:, :-1], targets)
    ref_logits, ref_loss = ref.forward(batch[:, :-1], targets)
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-10)
    assert abs(loss - ref_loss) < 1e-10
    grads, ref_grads = fast.backward(), ref.backward()
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=0, atol=1e-10, err_msg=name)


@needs_numba
def test_model_with_kernels_under_dropout_and_a_kv_cache():
    """Dropout (attention declines, the rest runs fused) and decoding with a KV cache."""
    config = GPTConfig(vocab_size=19, block_size=16, n_layer=2, n_head=2, n_embd=12, dropout=0.1)
    fast = GPT(config, seed=1, dtype="float64", threads=1)  # one BLAS thread: the linear kernel takes the decode steps
    ref = GPT(config, seed=1, dtype="float64", kernels="reference")
    assert fast.kernels.linear[0] is linear.linear_forward
    fast.train(), ref.train()
    batch = np.random.default_rng(0).integers(0, 19, (3, 17))
    _, loss = fast.forward(batch[:, :-1], batch[:, 1:])
    _, ref_loss = ref.forward(batch[:, :-1], batch[:, 1:])
    assert abs(loss - ref_loss) < 1e-10
    grads = fast.backward()
    for name, g in ref.backward().items():
        np.testing.assert_allclose(grads[name], g, rtol=0, atol=1e-10, err_msg=name)
    fast.eval(), ref.eval()
    caches = core.KVCache(config), core.KVCache(config)
    prompt = batch[:, :5]
    for step in range(4):
        out = [m.forward(prompt if step == 0 else prompt[:, -1:], kv_cache=c)[0] for m, c in zip((fast, ref), caches)]
        np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-10)
        prompt = np.concatenate([prompt, np.argmax(np.asarray(out[1])[:, -1:], axis=-1)], axis=1)


@needs_numba
def test_llama_model_with_kernels_decodes_with_a_kv_cache():
    """RoPE at positions offset by the cache and grouped attention against cached keys: the
    kernels' logits equal the reference's at every step (a prompt, then one token at a time)."""
    fast, ref = GPT(LLAMA, seed=5, dtype="float64", threads=1), GPT(LLAMA, seed=5, dtype="float64", kernels="reference")
    assert fast.kernels.rope[0] is rope.rope_forward and fast.kernels.attention[0] is attention.attention_forward
    assert fast.kernels.linear[0] is linear.linear_forward
    caches = core.KVCache(LLAMA), core.KVCache(LLAMA)
    prompt = np.random.default_rng(3).integers(0, 19, (2, 6))
    for step in range(5):
        out = [m.forward(prompt if step == 0 else prompt[:, -1:], kv_cache=c)[0] for m, c in zip((fast, ref), caches)]
        np.testing.assert_allclose(out[0], out[1], rtol=0, atol=1e-10)
        prompt = np.concatenate([prompt, np.argmax(np.asarray(out[1])[:, -1:], axis=-1)], axis=1)


@needs_numba
@pytest.mark.parametrize("config", [SMALL, LLAMA], ids=["gpt2", "llama"])
def test_model_float32_with_kernels_is_close_to_reference(config):
    fast, ref = GPT(config, seed=2), GPT(config, seed=2, kernels="reference")
    batch = np.random.default_rng(1).integers(0, 19, (4, 17))
    _, loss = fast.forward(batch[:, :-1], batch[:, 1:])
    _, ref_loss = ref.forward(batch[:, :-1], batch[:, 1:])
    assert abs(loss - ref_loss) < 1e-5
    grads, ref_grads = fast.backward(), ref.backward()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], "float32", name)


@needs_numba
def test_kernels_in_the_batch_threads_equal_reference():
    """A batch large enough to be split across two threads (arraygpt.nn.runner): the kernels run in
    both at once (numba code releases the GIL) and give the reference's gradients."""
    config = GPTConfig(vocab_size=23, block_size=128, n_layer=1, n_head=2, n_embd=128)
    fast = GPT(config, seed=4, dtype="float64", threads=2)
    ref = GPT(config, seed=4, dtype="float64", threads=1, kernels="reference")
    batch = np.random.default_rng(2).integers(0, 23, (4, 129))
    assert len(fast.runner.chunks(4, 128 * 128)) == 2
    _, loss = fast.forward(batch[:, :-1], batch[:, 1:])
    _, ref_loss = ref.forward(batch[:, :-1], batch[:, 1:])
    assert abs(loss - ref_loss) < 1e-10
    grads, ref_grads = fast.backward(), ref.backward()
    for name in ref_grads:
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=0, atol=1e-10, err_msg=name)


# ----------------------------------------------------------------------------------------------
# choosing kernels and updates (arraygpt.nn.kernels)


def test_reference_switch(monkeypatch):
    reference = core.reference_kernels(SMALL)
    assert kernels.select_kernels(SMALL, NUMPY, "float32", "reference") == reference
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.select_kernels(SMALL, NUMPY, "float32") == reference
    assert GPT(SMALL).kernels == reference
    assert {row[1] for row in kernels.describe_kernels(SMALL, NUMPY, "float32")} == {"reference"}
    assert "ARRAYGPT_KERNELS=reference" in kernels.describe_kernels(SMALL, NUMPY, "float32")[0][2]
    monkeypatch.setenv(kernels.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="ARRAYGPT_KERNELS"):
        kernels.select_kernels(SMALL, NUMPY, "float32")
    monkeypatch.setenv(kernels.ENV_VAR, "")
    custom = reference._replace(activation=(layers.relu_forward, layers.relu_backward))
    assert kernels.select_kernels(SMALL, NUMPY, "float32", custom) is custom
    with pytest.raises(ValueError, match="kernels must be"):
        GPT(SMALL, kernels="fast")


def test_describe_kernels_rows():
    rows = kernels.describe_kernels(SMALL, NUMPY, "float32")
    assert [row[0] for row in rows][:5] == [
        "norm:layernorm",
        "linear",
        "attention",
        "activation:gelu_tanh",
        "crossentropy",
    ]
    table = {row[0]: row for row in rows}
    if HAS_NUMBA:
        assert table["linear"][1] == "numba_linear_rows"
        assert table["attention"][1] == "numba_causal_attention"
        assert table["activation:gelu_tanh"][1] == "numba_gelu_tanh"
        assert table["rope"][1] == "numba_rope" and table["swiglu"][1] == "numba_swiglu"
    else:
        assert table["rope"][1] == table["swiglu"][1] == "reference"
    strict = kernels.describe_kernels(SMALL, load_backend("array_api_strict"), "float32")
    assert {row[1] for row in strict} == {"reference"}
    assert "not array_api_strict" in {row[0]: row for row in strict}["attention"][2]
    relu = kernels.describe_kernels(GPTConfig(activation="relu"), "numpy", "float32")
    assert "for activation 'gelu_tanh'" in {row[0]: row for row in relu}["activation:relu"][2]


def _acme_gelu_forward(x):
    out, cache = layers.gelu_tanh_forward(x)
    return out, cache


class _AcmeKernels:
    """A third-party plugin offering kernels: one that runs, one that declines, one unavailable."""

    def __init__(self, priority=10):
        self.priority = priority
        self.loads = 0

    def _load(self):
        self.loads += 1
        return KernelPair(_acme_gelu_forward, layers.gelu_tanh_backward)

    @hookimpl
    def arraygpt_register_kernels(self):
        def unavailable():
            raise KernelUnavailable("acme-fastlib is not installed")

        return [
            {
                "acme_gelu": KernelSpec("activation:gelu_tanh", self._load, priority=self.priority, description="acme"),
                "acme_norm": KernelSpec(
                    "norm:layernorm",
                    self._load,
                    priority=99,
                    supports=lambda config, backend, dtype: "only for n_embd >= 4096",
                ),
                "acme_attention": KernelSpec("attention", unavailable, priority=99),
                "acme_future": KernelSpec("conv:depthwise", self._load),
            }
        ]


@pytest.fixture
def pm():
    """A fresh plugin manager, installed as the process-wide one for the test."""
    pm = manager.get_plugin_manager(autoload=False)
    manager.set_plugin_manager(pm)
    try:
        yield pm
    finally:
        manager.set_plugin_manager(None)


def test_third_party_kernel_is_picked_up(pm):
    plugin = _AcmeKernels()
    pm.register(plugin, name="acme-kernels")
    try:
        names = {name: owner for name, _, owner in kernels.registered_kernels(pm)}
        assert names["acme_gelu"] == "acme-kernels"
        model = GPT(SMALL, dtype="float64")  # through the process-wide manager
        assert model.kernels.activation[0] is _acme_gelu_forward and plugin.loads == 1
        table = {row[0]: row for row in kernels.describe_kernels(SMALL, NUMPY, "float64", pm=pm)}
        assert table["activation:gelu_tanh"][1:] == ("acme_gelu", "acme")
        # declined (supports) and unavailable (load raised): the next best, reasons listed
        assert "acme_norm: only for n_embd >= 4096" in table["norm:layernorm"][2]
        assert "acme_attention: acme-fastlib is not installed" in table["attention"][2]
        expected_norm = "numba_layernorm" if HAS_NUMBA else "reference"
        assert table["norm:layernorm"][1] == expected_norm
        if not HAS_NUMBA:
            assert model.kernels.norm == layers.NORMS["layernorm"]
        assert model.kernels.attention[0] is not None
        batch = np.random.default_rng(0).integers(0, 19, (2, 9))
        _, loss = model.forward(batch[:, :-1], batch[:, 1:])
        ref = GPT(SMALL, dtype="float64", kernels="reference")
        assert abs(loss - ref.forward(batch[:, :-1], batch[:, 1:])[1]) < 1e-10
    finally:
        pm.unregister(plugin)


def test_priority_and_registration_order(pm):
    low = _AcmeKernels(priority=-1)  # below the built-ins (priority 0)
    pm.register(low, name="acme-low")
    try:
        chosen = kernels.select_kernels(SMALL, NUMPY, "float64", pm=pm).activation[0]
        if HAS_NUMBA:
            assert chosen is gelu.gelu_tanh_forward
        else:
            assert chosen is _acme_gelu_forward  # the only one that loads
    finally:
        pm.unregister(low)


def test_a_kernel_offered_twice_or_malformed_is_an_error(pm):
    class Twice:
        @hookimpl
        def arraygpt_register_kernels(self):
            return [{"numba_gelu_tanh": KernelSpec("activation:gelu_tanh", lambda: None)}]

    class NotASpec:
        @hookimpl
        def arraygpt_register_kernels(self):
            return [{"acme": (layers.gelu_tanh_forward, layers.gelu_tanh_backward)}]

    for plugin, match in (
        (Twice(), "offered by two plugins"),
        (NotASpec(), "must be an arraygpt.nn.kernels.KernelSpec"),
    ):
        pm.register(plugin, name="bad")
        try:
            with pytest.raises(manager.PluginError, match=match):
                kernels.select_kernels(SMALL, NUMPY, "float32", pm=pm)
        finally:
            pm.unregister(plugin)


def test_a_kernel_is_a_named_pair(pm):
    """A spec's kernel is a KernelPair (.forward, .backward); a load that returns anything else is
    a plugin error that says what to return."""
    spec = KernelSpec("activation:gelu_tanh", lambda: KernelPair(layers.gelu_tanh_forward, layers.gelu_tanh_backward))
    pair = spec.kernel()
    assert pair.forward is layers.gelu_tanh_forward and pair.backward is layers.gelu_tanh_backward
    loose = KernelSpec("activation:gelu_tanh", lambda: (layers.gelu_tanh_forward, layers.gelu_tanh_backward))
    with pytest.raises(PluginError, match=r"load\(\) must return an arraygpt.nn.kernels.KernelPair"):
        loose.kernel()
    with pytest.raises(PluginError, match=r"update's load\(\) must return a function"):
        UpdateSpec("adam", lambda: None).update()
    if HAS_NUMBA:
        chosen = kernels.select_kernels(SMALL, NUMPY, "float32", pm=pm)
        assert type(chosen.activation) is KernelPair and chosen.activation.backward is gelu.gelu_tanh_backward


def test_update_kernel_selection(monkeypatch, pm):
    assert kernels.select_update("adam", NUMPY, "float32", "reference") is None
    assert kernels.select_update("adam", load_backend("array_api_strict"), "float32") is None
    assert kernels.select_update("adam", NUMPY, "float16") is None
    with pytest.raises(ValueError, match="known: adam"):
        kernels.select_update("lion", NUMPY, "float32")
    assert (kernels.select_update("adam", NUMPY, "float32") is adam.adam_update) == HAS_NUMBA
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert kernels.select_update("adam", NUMPY, "float32") is None
    from arraygpt.training.optim import create_optimizer

    assert create_optimizer("adamw", {"w": np.ones(3, np.float32)}).fused == {"w": None}
    monkeypatch.delenv(kernels.ENV_VAR)

    calls = []

    def acme_adam(p, g, m, v, **hyper):
        calls.append(hyper["step"])
        return False  # declines: the optimizer runs its reference update

    class AcmeUpdate:
        @hookimpl
        def arraygpt_register_kernels(self):
            return [
                {
                    "acme_adam": UpdateSpec("adam", lambda: acme_adam, priority=5, description="acme"),
                    "acme_lion": UpdateSpec("lion", lambda: acme_adam),
                }
            ]

    plugin = AcmeUpdate()
    pm.register(plugin, name="acme-update")
    try:
        assert kernels.select_update("adam", NUMPY, "float64", pm=pm) is acme_adam
        rows = {row[0]: row for row in kernels.describe_kernels(SMALL, NUMPY, "float64", pm=pm)}
        assert rows["update:adam"][1:] == ("acme_adam", "acme")
        params, ref = {"w": np.ones((2, 3))}, {"w": np.ones((2, 3))}
        opt = create_optimizer("adam", params)
        grad = np.full((2, 3), 0.5)
        opt.step({"w": grad}, 1e-2)
        create_optimizer("adam", ref, kernels="reference").step({"w": grad}, 1e-2)
        assert calls == [1]
        np.testing.assert_array_equal(params["w"], ref["w"])
    finally:
        pm.unregister(plugin)
    assert "no optimizer update 'lion'" in UpdateSpec("lion", lambda: acme_adam).declines(NUMPY, "float64")
    old_style = KernelSpec("update:adam", lambda: acme_adam).declines(SMALL, NUMPY, "float64")
    assert "an optimizer's update is an arraygpt.nn.kernels.UpdateSpec" in old_style


def test_hookspec_is_documented():
    from arraygpt import hookspecs

    spec = hookspecs.arraygpt_register_kernels
    assert "KernelSpec" in spec.__doc__ and inspect.signature(spec).return_annotation is not inspect.Signature.empty


@needs_numba
def test_arraygpt_backends_lists_the_kernel_of_each_layer_kind(capsys, monkeypatch):
    from arraygpt import xp as shim
    from arraygpt.cli import main

    monkeypatch.setattr(shim, "_active", None)
    monkeypatch.delenv("ARRAYGPT_BACKEND", raising=False)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert main(["backends"]) == 0
    rows = {
        line.split()[0]: line.split()[1]
        for line in capsys.readouterr().out.split("kernels on numpy")[1].splitlines()[1:]
    }
    assert rows["activation:gelu_tanh"] == "numba_gelu_tanh" and rows["linear"] == "numba_linear_rows"
    assert rows["update:adam"] == "numba_adam"
    monkeypatch.setenv(kernels.ENV_VAR, "reference")
    assert main(["backends"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.split("kernels on numpy")[1].splitlines()[1:]]
    assert rows and all(row[1] == "reference" for row in rows)


# ----------------------------------------------------------------------------------------------
# loading and compiling: numba imported on selection, sources compiled on first call, no globals() writes


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_without_numba_the_reference_runs_and_says_why():
    out = _run(
        "import sys; sys.modules['numba'] = None\n"  # import numba raises ImportError
        "from arraygpt import GPT, GPTConfig; from arraygpt.nn import core; from arraygpt.nn import kernels\n"
        "c = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)\n"
        "assert GPT(c).kernels == core.reference_kernels(c)\n"
        "rows = {r[0]: r for r in kernels.describe_kernels(c, 'numpy', 'float32')}\n"
        "print(rows['attention'][1], '|', rows['attention'][2])\n"
    )
    name, why = out.strip().split(" | ")
    assert name == "reference" and "numba is not installed" in why


def test_import_arraygpt_does_not_import_numba():
    assert (
        _run("import sys, arraygpt, arraygpt.nn.kernels, arraygpt.backends; print('numba' in sys.modules)").strip()
        == "False"
    )


@needs_numba
def test_numba_is_imported_when_a_kernel_is_selected_and_a_source_compiled_on_its_first_call():
    """Registering the kernels (which imports every family module) imports no numba; selecting
    one does; its numba source gets a dispatcher only when it is first called."""
    out = _run(
        "import sys, numpy as np\n"
        "from arraygpt.nn import kernels\n"
        "names = [name for name, _, _ in kernels.registered_kernels()]\n"
        "from arraygpt.backends.numpy.kernels import gelu\n"
        "print('numba_gelu_tanh' in names, 'numba' in sys.modules)\n"
        "pair = gelu.SPECS['numba_gelu_tanh'].kernel()\n"
        "print('numba' in sys.modules, gelu._gelu64_forward._dispatcher is None)\n"
        "pair.forward(np.ones(3))\n"
        "print(gelu._gelu64_forward._dispatcher is None, gelu._gelu32_forward._dispatcher is None)\n"
    )
    assert out.split() == ["True", "False", "True", "True", "False", "True"]


def _assigns_into_globals(source: str) -> list[int]:
    """Lines of ``source`` that write into the module's namespace through ``globals()``:
    ``globals()[k] = v``, ``globals().update(...)``, ``.setdefault``, ``.__setitem__``, ``del
    globals()[k]``."""
    import ast

    def is_globals(node):
        return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "globals"

    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        if any(isinstance(t, ast.Subscript) and is_globals(t.value) for t in targets):
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and is_globals(node.func.value)
            and node.func.attr in ("update", "setdefault", "__setitem__", "pop", "clear", "__delitem__")
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_module_under_backends_assigns_into_globals():
    """What a reader sees is what runs (STYLE.md section 9): no kernel is swapped in through
    ``globals()``."""
    from pathlib import Path

    caught = "globals()['f'] = 1\nglobals().update(g=2)\nx = globals()['f']\ndel globals()['g']\n"
    assert _assigns_into_globals(caught) == [1, 2, 4]  # the check sees what it is meant to
    root = Path(__file__).resolve().parents[1] / "backends"
    modules = sorted(root.rglob("*.py"))
    assert root / "numpy" / "kernels" / "gelu.py" in modules
    found = {str(p.relative_to(root)): _assigns_into_globals(p.read_text(encoding="utf-8")) for p in modules}
    assert {name: lines for name, lines in found.items() if lines} == {}


def test_a_cached_kernel_is_stamped_with_every_source_of_its_folder(tmp_path):
    """numba stamps a cached kernel with the hash of its own file, but a kernel compiles in helpers
    from the other files of backends/numpy/kernels/: the folder's locators stamp it with all of
    them, so an edit to any one compiles the kernels again (_jit._register_folder_stamp)."""
    pytest.importorskip("numba")
    import os

    from arraygpt.backends.numpy.kernels import _blocks, _jit

    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    before = _jit._folder_stamp(str(tmp_path))
    (tmp_path / "b.py").write_text("y = 3\n")  # a helper's file, not the kernel's
    assert _jit._folder_stamp(str(tmp_path)) != before

    dispatcher = _blocks._quantize_rows.dispatcher()
    locator = dispatcher._cache._impl.locator
    assert type(locator).__name__ == "FolderLocator"
    assert locator.get_source_stamp() == _jit._folder_stamp(os.path.dirname(_jit.__file__))
