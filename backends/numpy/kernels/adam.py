"""The Adam/AdamW update of one parameter in one pass: ``plugins.optimizers.Adam.update``, to the
last bit (the contract of ``arraygpt.nn.kernels.AdamUpdate``).

The formula is the reference's (``plugins/optimizers.py``, after torch.optim.Adam and AdamW;
Kingma & Ba 2015, Loshchilov & Hutter 2019): the same operations in the same order, each rounded
as NumPy rounds it. Every Python float is rounded to the arrays' dtype first, as NumPy does with a
weak scalar, and the source is compiled without fastmath (``exact=True``: no reassociation, no
fused multiply-add). It reads and writes each array once instead of the reference's dozen passes.

Checked by tests/test_kernels.py, section "adam.py".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels._arrays import takes
from arraygpt.backends.numpy.kernels._jit import lazy_njit, loader
from arraygpt.nn.kernels import UpdateSpec


@lazy_njit(exact=True)
def _adam_update(
    p, g, m, v, decay, wd, beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size, decoupled, coupled
):
    for i in range(p.size):
        pi, gi = p[i], g[i]
        if decoupled:
            pi = pi * decay  # AdamW: p *= 1 - lr wd
        if coupled:
            gi = gi + wd * pi  # Adam's L2: g = g + wd p
        mi = m[i] * beta1 + one_minus_beta1 * gi
        vi = v[i] * beta2 + gi * gi * one_minus_beta2
        m[i], v[i] = mi, vi
        p[i] = pi - mi / (np.sqrt(vi) / bc2_sqrt + eps) * step_size


def adam_update(
    p: Any,
    g: Any,
    m: Any,
    v: Any,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step: int,
) -> bool:
    """One Adam (``decoupled``: AdamW) step of parameter ``p`` in place, with its moments ``m``
    and ``v``; the reference's numbers to the last bit. False (nothing changed) unless all four
    are C-contiguous NumPy arrays of one shape and dtype."""
    if not (takes(p, g, m, v) and p.shape == g.shape == m.shape == v.shape):
        return False
    f = p.dtype.type  # every scalar rounded to the arrays' dtype first, as NumPy does with a Python float
    decay = f(1.0 - lr * weight_decay)
    bc2_sqrt, step_size = math.sqrt(1.0 - beta2**step), lr / (1.0 - beta1**step)
    _adam_update(
        p.reshape(-1),
        g.reshape(-1),
        m.reshape(-1),
        v.reshape(-1),
        decay,
        f(weight_decay),
        f(beta1),
        f(1.0 - beta1),
        f(beta2),
        f(1.0 - beta2),
        f(bc2_sqrt),
        f(eps),
        f(step_size),
        bool(decoupled and weight_decay),
        bool(not decoupled and weight_decay),
    )
    return True


SPECS = {
    "numba_adam": UpdateSpec(
        "adam",
        loader(adam_update),
        backends=("numpy",),
        array_types=(np.ndarray,),
        description="Adam and AdamW in one pass per parameter, bit-identical to the reference (numba, serial, nogil)",
    ),
}
