"""Rotary position embeddings in one pass per (row, position, head): ``layers.rope_forward`` /
``rope_backward``.

The formula is the reference's (``arraygpt/nn/layers.py``: out = x cos + rotate_half(x) sin,
Su et al. 2021, in the two-halves layout of GPT-NeoX and Hugging Face's Llama), without
rotate_half's temporaries; the backward is the transposed rotation. q and k are read where they
lie in the qkv projection (strided rows, no copy), and the cos/sin tables as given, so a KV
cache's offset positions are the tables' (``layers.rope_tables`` at past .. past + T - 1), as in
the reference. An odd head size goes to the reference.

Checked by tests/test_kernels.py, section "rope.py".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels._arrays import floats, rows
from arraygpt.backends.numpy.kernels._jit import lazy_njit, loader
from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelSpec


class FusedRopeCache(layers.RopeCache):
    """The fused RoPE's cache: the reference's fields (cos, sin)."""

    __slots__ = ()


@lazy_njit
def _rope(x, xs, cos, sin, out, T, hs, backward):
    # one (row, position, head) at a time; x a flat C view whose row n (position n % T) starts at
    # n xs, out (N, NH * hs), cos and sin (T, hs). Forward: out1 = x1 c1 - x2 s1, out2 = x2 c2 +
    # x1 s2; backward (the transposed rotation): dx1 = d1 c1 + d2 s2, dx2 = d2 c2 - d1 s1, where
    # c1 = cos[t, :hs/2], c2 = cos[t, hs/2:] (equal in layers.rope_tables' layout, kept apart here
    # as the reference keeps them)
    N, D = out.shape
    half = hs // 2
    for n in range(N):
        t = n % T
        c1, c2, s1, s2 = cos[t, :half], cos[t, half:], sin[t, :half], sin[t, half:]
        for h0 in range(0, D, hs):
            a = n * xs + h0
            x1, x2 = x[a : a + half], x[a + half : a + hs]  # slices: their indices need no wraparound
            o1, o2 = out[n, h0 : h0 + half], out[n, h0 + half : h0 + hs]
            if backward:
                for j in range(half):
                    o1[j] = x1[j] * c1[j] + x2[j] * s2[j]
                    o2[j] = x2[j] * c2[j] - x1[j] * s1[j]
            else:
                for j in range(half):
                    o1[j] = x1[j] * c1[j] - x2[j] * s1[j]
                    o2[j] = x2[j] * c2[j] + x1[j] * s2[j]


def _rope_call(x: Any, cos: Any, sin: Any, backward: bool) -> Any:
    """out (B, T, D) rotated per (row, position, head), or None where the kernel does not take it."""
    flat = rows(x)
    if (
        flat is None
        or x.ndim != 3
        or not floats(x, cos, sin)
        or cos.ndim != 2
        or sin.shape != cos.shape
        or cos.shape[0] != x.shape[1]
        or cos.shape[1] % 2
        or cos.shape[1] == 0
        or x.shape[2] % cos.shape[1]
    ):
        return None
    out = np.empty(x.shape, dtype=x.dtype)
    _rope(
        flat[0],
        flat[1],
        np.ascontiguousarray(cos),
        np.ascontiguousarray(sin),
        out.reshape(flat[2], -1),
        x.shape[1],
        cos.shape[1],
        backward,
    )
    return out


def rope_forward(x: Any, cos: Any, sin: Any) -> tuple[Any, layers.RopeCache]:
    """layers.rope_forward in one pass per (row, position, head); x may be strided rows (q or k
    of the qkv projection)."""
    out = _rope_call(x, cos, sin, False)
    if out is None:
        return layers.rope_forward(x, cos, sin)
    return out, FusedRopeCache(cos, sin)


def rope_backward(dout: Any, cache: layers.RopeCache) -> Any:
    """layers.rope_backward in one pass: the transposed rotation."""
    dx = _rope_call(dout, *cache, True) if type(cache) is FusedRopeCache else None
    return layers.rope_backward(dout, cache) if dx is None else dx


SPECS = {
    "numba_rope": KernelSpec(
        "rope",
        loader(rope_forward, rope_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        description="one pass per row, position and head, forward and backward (numba, serial, nogil)",
    ),
}
