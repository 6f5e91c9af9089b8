"""What the kernels' wrappers accept: NumPy arrays of one float32/float64 dtype, and the layouts
each loop can read. Anything else goes to the reference.

Not here: the kernels.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def floats(*arrays: Any) -> bool:
    """NumPy arrays of one dtype, float32 or float64."""
    first = arrays[0]
    return first.dtype in (np.float32, np.float64) and all(
        type(a) is np.ndarray and a.dtype == first.dtype for a in arrays
    )


def takes(*arrays: Any) -> bool:
    """NumPy arrays of one float32/float64 dtype, C-contiguous: what most kernels compute on."""
    return type(arrays[0]) is np.ndarray and floats(*arrays) and all(a.flags.c_contiguous for a in arrays)


def rows(a: Any) -> tuple[Any, int, int] | None:
    """A (..., W) array whose rows are W contiguous values at a fixed stride (a slice of the last
    axis, such as the model's q of its qkv projection or the gate half of its gate_up): (a flat
    C-contiguous view starting at its first value, the row stride in values, the number of rows),
    without a copy; None for any other layout (the reference takes it).

    The loops take each row as a slice of the flat view: indexing it as ``x[n * stride + j]``
    instead was 7 times slower (numba's wraparound of a possibly negative index keeps LLVM from
    vectorizing)."""
    if type(a) is not np.ndarray or a.ndim < 1 or a.size == 0:
        return None
    W, item = a.shape[-1], a.itemsize
    a2 = a.reshape(-1, W)
    if not np.may_share_memory(a2, a):  # reshape copied: the rows are not evenly spaced
        return None
    (s0, s1), N = a2.strides, a2.shape[0]
    if (W > 1 and s1 != item) or s0 % item or (N > 1 and s0 < 0):
        return None
    stride = s0 // item if N > 1 else W
    return np.lib.stride_tricks.as_strided(a2, ((N - 1) * stride + W,), (item,)), stride, N
