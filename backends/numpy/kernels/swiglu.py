"""SwiGLU in one pass: ``layers.swiglu_forward`` / ``swiglu_backward``.

The formula is the reference's (``arraygpt/nn/layers.py``: out = silu(g) u, silu(g) = g
sigmoid(g), Shazeer 2020), with its exp cap of 80. The backward recomputes sigmoid(g) (the cache
holds g and u, no sigmoid array) and writes dg and du in one pass. The gate and up halves of the
model's fused gate_up projection are taken as they are: rows at a stride, no copy.

Checked by tests/test_kernels.py, section "swiglu.py".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels._arrays import floats, rows
from arraygpt.backends.numpy.kernels._jit import lazy_njit, loader
from arraygpt.backends.numpy.kernels._vecmath import fast_exp
from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelSpec

EXP_CAP = 80.0  # the reference's cap on -g: exp stays finite


class FusedSwiGLUCache(layers.SwiGLUCache):
    """The fused SwiGLU's cache: ``sig`` is None, the backward recomputes it from ``gate``."""

    __slots__ = ()


@lazy_njit
def _swiglu_forward(g, gs, u, us, out, one, cap):
    # out = g sigmoid(g) u; g, u flat C views whose row n starts at n gs (n us), out (N, H)
    N, H = out.shape
    for n in range(N):
        gn, un, o = g[n * gs : n * gs + H], u[n * us : n * us + H], out[n]
        for j in range(H):
            x = gn[j]
            s = one / (one + fast_exp(min(-x, cap)))
            o[j] = x * s * un[j]


def swiglu_forward(gate: Any, up: Any) -> tuple[Any, layers.SwiGLUCache]:
    """layers.swiglu_forward in one pass; gate and up may be strided rows (the halves of one
    projection's output)."""
    g, u = rows(gate), rows(up)
    if g is None or u is None or not floats(gate, up) or gate.shape != up.shape:
        return layers.swiglu_forward(gate, up)
    f = gate.dtype.type
    out = np.empty(gate.shape, dtype=gate.dtype)
    _swiglu_forward(g[0], g[1], u[0], u[1], out.reshape(g[2], -1), f(1.0), f(EXP_CAP))
    return out, FusedSwiGLUCache(gate, up, None)


@lazy_njit
def _swiglu_backward(g, gs, u, us, dout, dg, du, one, cap):
    # s = sigmoid(g) recomputed: du = dout g s, dg = dout u (g s - g s s + s)
    N, H = dout.shape
    for n in range(N):
        gn, un, d, dgn, dun = g[n * gs : n * gs + H], u[n * us : n * us + H], dout[n], dg[n], du[n]
        for j in range(H):
            x = gn[j]
            s = one / (one + fast_exp(min(-x, cap)))
            silu = x * s
            dun[j] = d[j] * silu
            dgn[j] = (silu - silu * s + s) * un[j] * d[j]


def swiglu_backward(dout: Any, cache: layers.SwiGLUCache) -> tuple[Any, Any]:
    """layers.swiglu_backward in one pass, recomputing sigmoid(gate)."""
    if type(cache) is not FusedSwiGLUCache:
        return layers.swiglu_backward(dout, cache)
    gate, up, _ = cache
    g, u = rows(gate), rows(up)
    f = gate.dtype.type
    dout = np.ascontiguousarray(dout, dtype=gate.dtype).reshape(g[2], -1)
    dg, du = np.empty_like(dout), np.empty_like(dout)
    _swiglu_backward(g[0], g[1], u[0], u[1], dout, dg, du, f(1.0), f(EXP_CAP))
    return dg.reshape(gate.shape), du.reshape(gate.shape)


SPECS = {
    "numba_swiglu": KernelSpec(
        "swiglu",
        loader(swiglu_forward, swiglu_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        description="one pass forward and backward, sigmoid recomputed in the backward (numba, serial, nogil)",
    ),
}
