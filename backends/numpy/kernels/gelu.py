"""GELU (tanh approximation) in one pass: ``layers.gelu_tanh_forward`` / ``gelu_tanh_backward``.

The formula is the reference's (``arraygpt/nn/layers.py``, GPT-2's GELU, Hendrycks & Gimpel
2016), with its constants ``c`` and ``a`` imported from there. The forward writes out in one pass;
the backward recomputes tanh from x, so the cache holds x only. float32 uses a rational tanh (a
few ulp; exactly +-1 past its clamp), float64 the reference's ``x sigmoid(2u)`` with the
vectorizing exp.

Checked by tests/test_kernels.py, section "gelu.py".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels._arrays import takes
from arraygpt.backends.numpy.kernels._jit import lazy_njit, loader
from arraygpt.backends.numpy.kernels._vecmath import fast_exp, tanh32
from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelSpec

GELU_C, GELU_A = layers._GELU_C, layers._GELU_A  # u = c (x + a x^3)
TANH_CLAMP = 7.90531110763549805  # beyond it the rational tanh is +-1 in float32


class GeluCache(layers.ActivationCache):
    """The fused GELU's cache: ``s`` is None, the backward recomputes it from ``x``."""

    __slots__ = ()


@lazy_njit
def _gelu32_forward(x, out, half, one, c, a, clamp):  # x, out (n,) float32
    # out = 0.5 x (1 + tanh(u)), u = c (x + a x^3)
    for i in range(x.size):
        v = x[i]
        u = min(max(c * v * (one + a * v * v), -clamp), clamp)
        out[i] = half * v * (one + tanh32(u, clamp))


@lazy_njit
def _gelu64_forward(x, out, c, a):  # float64: out = x sigmoid(2u), as the reference computes it
    for i in range(x.size):
        v = x[i]
        minus_2u = v * (v * v * (-2.0 * c * a) - 2.0 * c)
        out[i] = v / (1.0 + fast_exp(min(minus_2u, 80.0)))


def gelu_tanh_forward(x: Any) -> tuple[Any, layers.ActivationCache]:
    """layers.gelu_tanh_forward in one pass."""
    if not takes(x):
        return layers.gelu_tanh_forward(x)
    out = np.empty_like(x)
    if x.dtype == np.float32:
        f = np.float32
        _gelu32_forward(x.reshape(-1), out.reshape(-1), f(0.5), f(1.0), f(GELU_C), f(GELU_A), f(TANH_CLAMP))
    else:
        _gelu64_forward(x.reshape(-1), out.reshape(-1), GELU_C, GELU_A)
    return out, GeluCache(x, None)


@lazy_njit
def _gelu32_backward(x, dout, dx, half, one, c, a, clamp):
    # dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3a x^2)), t = tanh(u), recomputed from x
    for i in range(x.size):
        v = x[i]
        u = min(max(c * v * (one + a * v * v), -clamp), clamp)
        t = tanh32(u, clamp)
        dx[i] = dout[i] * (half * (one + t) + half * v * (one - t * t) * c * (one + (a + a + a) * v * v))


@lazy_njit
def _gelu64_backward(x, dout, dx, c, a):  # dx = dout (s + x s (1 - s) 2c (1 + 3a x^2)), s = sigmoid(2u)
    for i in range(x.size):
        v = x[i]
        minus_2u = v * (v * v * (-2.0 * c * a) - 2.0 * c)
        s = 1.0 / (1.0 + fast_exp(min(minus_2u, 80.0)))
        g = v * (v * v * (6.0 * c * a) + 2.0 * c)
        dx[i] = dout[i] * (s + g * s * (1.0 - s))


def gelu_tanh_backward(dout: Any, cache: layers.ActivationCache) -> Any:
    """layers.gelu_tanh_backward in one pass, recomputing tanh from x."""
    if type(cache) is not GeluCache:
        return layers.gelu_tanh_backward(dout, cache)
    x = cache.x
    dout = np.ascontiguousarray(dout, dtype=x.dtype)
    dx = np.empty_like(x)
    if x.dtype == np.float32:
        f = np.float32
        _gelu32_backward(
            x.reshape(-1), dout.reshape(-1), dx.reshape(-1), f(0.5), f(1.0), f(GELU_C), f(GELU_A), f(TANH_CLAMP)
        )
    else:
        _gelu64_backward(x.reshape(-1), dout.reshape(-1), dx.reshape(-1), GELU_C, GELU_A)
    return dx


SPECS = {
    "numba_gelu_tanh": KernelSpec(
        "activation:gelu_tanh",
        loader(gelu_tanh_forward, gelu_tanh_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        description="one pass forward and backward, tanh recomputed in the backward (numba, serial, nogil)",
    ),
}
