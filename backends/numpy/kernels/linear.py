"""The linear layer for a few rows (a decode step): ``layers.linear_forward``; the backward is the
reference's.

The formula is the reference's (``arraygpt/nn/layers.py``: out = x w^T + b, w stored (out, in)).
A decode step multiplies one row by each weight matrix, which reads every weight once per token;
OpenBLAS does that slower than one core streams memory, and with 2-8 rows slower still. The
kernel reads each row of w once, in its stored order, for all rows of x, four rows of x at a time
so that each loaded weight serves four sums. More rows (BLAS is faster there), more BLAS threads
than were measured (or a count it cannot read) and anything unusual go to the reference, i.e.
BLAS. The cache is the reference's, so the backward is ``layers.linear_backward``.

Checked by tests/test_kernels.py, section "linear.py".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels._arrays import floats
from arraygpt.backends.numpy.kernels._jit import lazy_njit, loader
from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelSpec

MAX_ROWS = 8  # up to here the kernel beat or tied OpenBLAS's products on every size measured
MAX_BLAS_THREADS = 2  # measured against OpenBLAS at 1 and 2 threads; with more, BLAS's threads
# may read the weights faster than one core does (not measured), so BLAS runs


@lazy_njit
def _linear_rows(x, w, b, has_b, out):
    # out (N, Cout) = x (N, Cin) @ w.T (+ b) for a few rows N: each row of w is read from memory
    # once for all N rows of x (a decode step is memory-bound on the weights), four rows of x at a
    # time so that each value of w loaded serves four sums
    N, K = x.shape
    zero = np.zeros(1, out.dtype)[0]
    for i in range(w.shape[0]):
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


def linear_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, layers.LinearCache]:
    """layers.linear_forward for at most MAX_ROWS rows of x (the batch's positions): one pass over
    w's rows in their stored order. More rows, more than MAX_BLAS_THREADS BLAS threads or an
    unknown count, and other arrays: the reference."""
    rows = x.size // x.shape[-1] if type(x) is np.ndarray and x.ndim and x.shape[-1] else 0
    if not (
        1 <= rows <= MAX_ROWS
        and floats(x, w, *(() if b is None else (b,)))
        and w.ndim == 2
        and w.flags.c_contiguous
        and x.shape[-1] == w.shape[1]
        and (b is None or b.shape == w.shape[:1])
    ):
        return layers.linear_forward(x, w, b)
    from arraygpt.backends.numpy import blas_thread_count  # the backend these arrays come from

    threads = blas_thread_count()
    if threads is None or threads > MAX_BLAS_THREADS:
        return layers.linear_forward(x, w, b)
    out = np.empty((rows, w.shape[0]), dtype=w.dtype)
    _linear_rows(
        np.ascontiguousarray(x).reshape(rows, -1), w, w.reshape(-1)[:1] if b is None else b, b is not None, out
    )
    return out.reshape(*x.shape[:-1], w.shape[0]), layers.LinearCache(x, w, b is not None)


SPECS = {
    "numba_linear_rows": KernelSpec(
        "linear",
        loader(linear_forward, layers.linear_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        description=f"up to {MAX_ROWS} rows (decoding) in one pass over the weights, beside BLAS at "
        f"<= {MAX_BLAS_THREADS} threads; more rows: BLAS (numba, serial, nogil)",
    ),
}
