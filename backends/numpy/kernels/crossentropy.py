"""Softmax + cross-entropy, one pass per row: ``layers.crossentropy_forward`` /
``crossentropy_backward``.

The formulas are the reference's (``arraygpt/nn/layers.py``: loss = mean or sum of
logsumexp(row) - row[t] over the rows whose target is not ignored; dlogits = (probs - onehot) w
dloss / d, as llm.c's crossentropy_softmax_backward). The forward computes the softmax over the
vocabulary, the picked logit and the row's loss in one pass per row (the row max in independent
chains, the vectorizing exp); the backward writes dlogits in one pass. Targets out of range and
anything unusual go to the reference, which raises as before.

Checked by tests/test_kernels.py, section "crossentropy.py".
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels._arrays import takes
from arraygpt.backends.numpy.kernels._jit import lazy_njit, loader
from arraygpt.backends.numpy.kernels._vecmath import softmax_into
from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelSpec


class FusedCrossEntropyCache(layers.CrossEntropyCache):
    """The fused loss's cache: the reference's fields (probs, targets, weights, divisor)."""

    __slots__ = ()


@lazy_njit
def _crossentropy_forward(logits, targets, ignore_index, probs, weights, safe_targets):
    # one row at a time: probs = softmax(row), loss_n = log(sum exp(row - max)) + max - row[t_n]
    # where t_n != ignore_index; returns (sum of the losses, count of the rows with a target),
    # both in float64
    N, V = logits.shape
    zero = np.zeros(1, logits.dtype)[0]
    total = 0.0
    count = 0.0
    for n in range(N):
        row = logits[n]
        top, s = softmax_into(row, probs[n], V, zero)
        t = targets[n]
        if t == ignore_index:
            weights[n] = zero
            safe_targets[n] = 0
        else:
            weights[n] = zero + 1
            safe_targets[n] = t
            total += math.log(s) + top - row[t]
            count += 1.0
    return total, count


def crossentropy_forward(
    logits: Any, targets: Any, ignore_index: int = -1, reduction: str = "mean", **more: Any
) -> tuple[Any, layers.CrossEntropyCache]:
    """layers.crossentropy_forward with the softmax, the picked logit and the loss in one pass per
    row. Anything it does not know goes to the reference (which raises on a bad reduction)."""
    if (
        more
        or reduction not in ("mean", "sum")
        or not takes(logits)
        or logits.ndim != 2
        or type(targets) is not np.ndarray
        or targets.shape != logits.shape[:1]
        or targets.dtype.kind not in "iu"
        or not 0 <= int(targets.max(initial=0)) < logits.shape[1]
    ):
        return layers.crossentropy_forward(logits, targets, ignore_index, reduction, **more)
    N, V = logits.shape
    probs = np.empty_like(logits)
    weights = np.empty((N,), dtype=logits.dtype)
    safe_targets = np.empty_like(targets)
    total, count = _crossentropy_forward(logits, targets, int(ignore_index), probs, weights, safe_targets)
    dt = logits.dtype.type
    divisor = dt(count) if reduction == "mean" else 1.0
    loss = dt(total) / divisor  # every row ignored: nan (0/0) with NumPy's warning, as the reference
    return loss, FusedCrossEntropyCache(probs, safe_targets, weights, divisor)


@lazy_njit
def _crossentropy_backward(probs, targets, weights, scale, dlogits):
    # dlogits_n = (probs_n - onehot(t_n)) * w_n * scale
    N, V = probs.shape
    for n in range(N):
        r = weights[n] * scale
        p, d = probs[n], dlogits[n]
        for j in range(V):
            d[j] = p[j] * r
        d[targets[n]] -= r


def crossentropy_backward(dloss: float, cache: layers.CrossEntropyCache) -> Any:
    """layers.crossentropy_backward in one pass: dlogits = (probs - onehot) * w * dloss / divisor."""
    if type(cache) is not FusedCrossEntropyCache:
        return layers.crossentropy_backward(dloss, cache)
    probs, targets, weights, divisor = cache
    dlogits = np.empty_like(probs)
    dt = probs.dtype.type
    scale = dt(dloss) / dt(divisor)  # every row ignored: inf (NumPy's warning), so NaN gradients, as the reference
    _crossentropy_backward(probs, targets, weights, scale, dlogits)
    return dlogits


SPECS = {
    "numba_crossentropy": KernelSpec(
        "crossentropy",
        loader(crossentropy_forward, crossentropy_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        description="softmax, loss and backward in one pass per row (numba, serial, nogil)",
    ),
}
