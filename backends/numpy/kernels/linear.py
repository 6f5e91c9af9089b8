"""The linear layer: a few rows (a decode step) in one numba pass over the weights, and more rows
(training, a prompt) through MKL's product where it is chosen (``_mkl.py``):
``layers.linear_forward`` and ``linear_backward``.

The formula is the reference's (``arraygpt/nn/layers.py``: out = x w^T + b, w stored (out, in)).
A decode step multiplies one row by each weight matrix, which reads every weight once per token;
OpenBLAS does that slower than the cores stream memory, and with 2-8 rows slower still. The
kernel reads each row of w once, in its stored order, for all rows of x, four rows of x at a time
so that each loaded weight serves four sums. w's rows are split into contiguous parts over the
threads BLAS may use now (``_threads.py``), one numba thread each, so that decoding reads the
weights with every core the model has, as BLAS's and PyTorch's one-row products do. More rows
(BLAS is faster there) go to MKL's float32 product where ``_mkl.py`` chose it (the forward's x
w^T and the backward's dout w and dout^T x, the bias and its gradient as the reference adds and
sums them), else to the reference, i.e. NumPy's BLAS; so do a BLAS thread count the kernel cannot
read and anything unusual. The cache is the reference's, so either backward takes either cache.

Checked by tests/test_kernels.py, section "linear.py".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels import _mkl, _threads
from arraygpt.backends.numpy.kernels._jit import OPTIONS, LazyJit, ParallelJit, loader
from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelPair, KernelSpec

MAX_ROWS = 8  # up to here the kernel beat or tied OpenBLAS's products on every size measured
MIN_ROWS_PER_THREAD = 64  # rows of w; a smaller part costs more to launch than it saves


def _rows_source(prange: Any) -> Any:
    def _linear_rows(x, w, b, has_b, out, parts):
        # out (N, Cout) = x (N, Cin) @ w.T (+ b) for a few rows N: each row of w is read from
        # memory once for all N rows of x (a decode step is memory-bound on the weights), four
        # rows of x at a time so that each value of w loaded serves four sums; w's rows in
        # `parts` contiguous ranges, one task each
        N, K = x.shape
        O = w.shape[0]
        zero = np.zeros(1, out.dtype)[0]
        for c in prange(parts):
            for i in range(c * O // parts, (c + 1) * O // parts):
                wi = w[i]
                bi = b[i] if has_b else zero
                n = 0
                while n + 4 <= N:
                    x0, x1, x2, x3 = x[n], x[n + 1], x[n + 2], x[n + 3]
                    s0 = s1 = s2 = s3 = zero
                    for j in range(K):
                        wj = wi[j]
                        s0 += wj * x0[j]
                        s1 += wj * x1[j]
                        s2 += wj * x2[j]
                        s3 += wj * x3[j]
                    out[n, i], out[n + 1, i], out[n + 2, i], out[n + 3, i] = s0 + bi, s1 + bi, s2 + bi, s3 + bi
                    n += 4
                for n in range(n, N):
                    xn = x[n]
                    s = zero
                    for j in range(K):
                        s += wi[j] * xn[j]
                    out[n, i] = s + bi

    return _linear_rows


_linear_rows = LazyJit(_rows_source(range), OPTIONS)  # one part: no parallel launch
_linear_rows_parallel = ParallelJit(_rows_source)


def linear_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, layers.LinearCache]:
    """layers.linear_forward for at most MAX_ROWS rows of x (the batch's positions): one pass over
    w's rows in their stored order, split over the threads BLAS may use now. More rows, an
    unknown BLAS thread count, and other arrays: the reference."""
    # cheapest checks first, and few: a small model's decode step makes 25 of these calls per
    # token, and each microsecond here is about 1% of its time
    if not (
        type(x) is np.ndarray
        and type(w) is np.ndarray
        and x.dtype == w.dtype
        and x.dtype.char in "fd"
        and x.ndim
        and w.ndim == 2
        and x.shape[-1] == w.shape[1]
        and 0 < x.size
        and w.flags.c_contiguous
        and (b is None or (type(b) is np.ndarray and b.dtype == w.dtype and b.shape == w.shape[:1]))
    ):
        return layers.linear_forward(x, w, b)
    if x.size > MAX_ROWS * w.shape[1]:
        return _products_forward(x, w, b)
    parts = _threads.chunks(w.shape[0], MIN_ROWS_PER_THREAD)
    if not parts:  # BLAS's thread count unknown: the model's thread setting cannot be read
        return layers.linear_forward(x, w, b)
    out = np.empty((*x.shape[:-1], w.shape[0]), dtype=w.dtype)
    has_b = b is not None
    x2, out2 = np.ascontiguousarray(x).reshape(-1, w.shape[1]), out.reshape(-1, w.shape[0])  # (N, Cin), (N, Cout)
    args = (x2, w, b if has_b else w[0], has_b, out2)  # out allocated here: returning numba's array was slower
    if parts > 1:
        _threads.launch(_linear_rows_parallel, parts, *args)
    else:
        _linear_rows(*args, 1)
    return out, layers.LinearCache(x, w, has_b)


def _products_forward(x: Any, w: Any, b: Any) -> tuple[Any, layers.LinearCache]:
    """More rows: out (N, Cout) = x (N, Cin) @ w^T by MKL where it is chosen, else the reference."""
    out = _mkl.matmul(x.reshape(-1, w.shape[1]), w.T)
    if out is None:
        return layers.linear_forward(x, w, b)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[0]), layers.LinearCache(x, w, b is not None)


def linear_backward(dout: Any, cache: layers.LinearCache) -> tuple[Any, Any, Any]:
    """layers.linear_backward with dx = dout @ w and dw = dout^T @ x by MKL where it is chosen
    (and takes the arrays), else the reference."""
    x, w, has_bias = cache
    takes = type(dout) is np.ndarray and dout.shape[-1:] == w.shape[:1]  # else the reference's errors
    dout2 = dout.reshape(-1, w.shape[0]) if takes else None  # (N, Cout)
    dx = None if dout2 is None else _mkl.matmul(dout2, w)  # (N, Cin)
    dw = None if dx is None else _mkl.matmul(dout2.T, x.reshape(-1, w.shape[1]))  # (Cout, Cin)
    if dw is None:
        return layers.linear_backward(dout, cache)
    db = np.ones(dout2.shape[0], dout2.dtype) @ dout2 if has_bias else None  # as the reference sums rows
    return dx.reshape(x.shape), dw, db


def _load() -> KernelPair:
    _mkl.sgemm()  # ARRAYGPT_GEMM read now: a bad value fails when a model selects the kernel, not in a step
    return loader(linear_forward, linear_backward)()


SPECS = {
    "numba_linear_rows": KernelSpec(
        "linear",
        _load,
        backends=("numpy",),
        array_types=(np.ndarray,),
        description=f"up to {MAX_ROWS} rows (decoding) in one pass over the weights, its rows split over "
        "the BLAS threads; more rows: MKL's product where installed on Intel, else NumPy's BLAS "
        "(numba, parallel, nogil)",
    ),
}
