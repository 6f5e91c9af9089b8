"""LayerNorm and RMSNorm one row at a time: ``layers.layernorm_forward`` / ``rmsnorm_forward``
and their backward.

The formulas are the reference's (``arraygpt/nn/layers.py``: LayerNorm as PyTorch's
nn.LayerNorm, Ba et al. 2016; RMSNorm, Zhang & Sennrich 2019; the backward of
``layers._norm_backward``). Each row's statistics are computed in float64, then xhat and the
output written once; the backward's two row means and the dw/db sums happen in the same pass.

Checked by tests/test_kernels.py, section "norm.py".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels._arrays import takes
from arraygpt.backends.numpy.kernels._jit import lazy_njit, loader
from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelSpec


class FusedNormCache(layers.NormCache):
    """The fused norms' cache: the reference's fields (xhat, rstd, w, has_bias)."""

    __slots__ = ()


@lazy_njit
def _norm_forward(x, w, b, has_w, has_b, centered, eps, out, xhat, rstd):
    # x (N, C); out = (x - mean) rstd w + b (centered: LayerNorm) or x rstd w + b (RMSNorm),
    # rstd = 1 / sqrt(mean((x - mean)^2) + eps); the row statistics in float64
    N, C = x.shape
    cast = np.empty(2, x.dtype)
    for n in range(N):
        row = x[n]
        mean = 0.0
        if centered:
            for j in range(C):
                mean += row[j]
            mean /= C
        var = 0.0
        for j in range(C):
            d = row[j] - mean
            var += d * d
        cast[0] = mean
        cast[1] = 1.0 / math.sqrt(var / C + eps)
        m, r = cast[0], cast[1]
        rstd[n] = r
        xh, o = xhat[n], out[n]
        for j in range(C):
            h = (row[j] - m) * r
            xh[j] = h
            if has_w:
                h = h * w[j]
            if has_b:
                h = h + b[j]
            o[j] = h


def _forward(x: Any, w: Any, b: Any, eps: float, centered: bool) -> tuple[Any, layers.NormCache] | None:
    params = [a for a in (w, b) if a is not None]
    if not takes(x, *params) or x.ndim < 1 or any(a.shape != x.shape[-1:] for a in params):
        return None
    C = x.shape[-1]
    x2 = x.reshape(-1, C)  # (N, C)
    out, xhat = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty((x2.shape[0],), dtype=x.dtype)
    unused = np.empty((C,), dtype=x.dtype)
    w_or_unused, b_or_unused = unused if w is None else w, unused if b is None else b
    _norm_forward(x2, w_or_unused, b_or_unused, w is not None, b is not None, centered, float(eps), out, xhat, rstd)
    shape = x.shape
    return out.reshape(shape), FusedNormCache(xhat.reshape(shape), rstd.reshape(*shape[:-1], 1), w, b is not None)


@lazy_njit
def _norm_backward(dout, xhat, rstd, w, has_w, centered, dx, dw, db):
    # one row at a time: dx = rstd (g - xhat mean(g xhat) [- mean(g)]), g = dout w; dw, db (C,)
    # float64 accumulate over the rows
    N, C = dout.shape
    cast = np.empty(2, dout.dtype)
    for n in range(N):
        do, xh = dout[n], xhat[n]
        sum_g = 0.0
        sum_gx = 0.0
        for j in range(C):
            g = do[j] * w[j] if has_w else do[j]
            sum_g += g
            sum_gx += g * xh[j]
        cast[0] = sum_g / C if centered else 0.0
        cast[1] = sum_gx / C
        mg, mgx = cast[0], cast[1]
        r = rstd[n]
        d = dx[n]
        for j in range(C):
            g = do[j] * w[j] if has_w else do[j]
            d[j] = (g - xh[j] * mgx - mg) * r
            dw[j] += do[j] * xh[j]
            db[j] += do[j]


def _backward(dout: Any, cache: FusedNormCache, centered: bool) -> tuple[Any, Any, Any]:
    xhat, rstd, w, has_bias = cache
    C = xhat.shape[-1]
    dout2 = np.ascontiguousarray(dout, dtype=xhat.dtype).reshape(-1, C)
    dx = np.empty_like(dout2)
    dw, db = np.zeros((C,)), np.zeros((C,))  # float64 accumulators
    unused = np.empty((C,), dtype=xhat.dtype)
    _norm_backward(
        dout2, xhat.reshape(-1, C), rstd.reshape(-1), unused if w is None else w, w is not None, centered, dx, dw, db
    )
    return (
        dx.reshape(xhat.shape),
        None if w is None else dw.astype(xhat.dtype),
        db.astype(xhat.dtype) if has_bias else None,
    )


def layernorm_forward(x: Any, w: Any, b: Any, eps: float) -> tuple[Any, layers.NormCache]:
    """layers.layernorm_forward, one row at a time."""
    return _forward(x, w, b, eps, centered=True) or layers.layernorm_forward(x, w, b, eps)


def layernorm_backward(dout: Any, cache: layers.NormCache) -> tuple[Any, Any, Any]:
    """layers.layernorm_backward, one row at a time."""
    if type(cache) is not FusedNormCache:
        return layers.layernorm_backward(dout, cache)
    return _backward(dout, cache, centered=True)


def rmsnorm_forward(x: Any, w: Any, b: Any, eps: float) -> tuple[Any, layers.NormCache]:
    """layers.rmsnorm_forward, one row at a time."""
    return _forward(x, w, b, eps, centered=False) or layers.rmsnorm_forward(x, w, b, eps)


def rmsnorm_backward(dout: Any, cache: layers.NormCache) -> tuple[Any, Any, Any]:
    """layers.rmsnorm_backward, one row at a time."""
    if type(cache) is not FusedNormCache:
        return layers.rmsnorm_backward(dout, cache)
    return _backward(dout, cache, centered=False)


_ON = dict(backends=("numpy",), array_types=(np.ndarray,))
SPECS = {
    "numba_layernorm": KernelSpec(
        "norm:layernorm",
        loader(layernorm_forward, layernorm_backward),
        **_ON,
        description="one pass per row, forward and backward (numba, serial, nogil)",
    ),
    "numba_rmsnorm": KernelSpec(
        "norm:rmsnorm",
        loader(rmsnorm_forward, rmsnorm_backward),
        **_ON,
        description="one pass per row, forward and backward (numba, serial, nogil)",
    ),
}
