"""array-api-strict backend: a minimal, strict implementation of the array API standard on the
CPU. It is slow and exists to prove that the model math uses nothing beyond the standard."""

import numpy as np

from arraygpt.xp import BackendUnavailable

try:
    import array_api_strict as xp
except ImportError as e:
    raise BackendUnavailable("the array_api_strict backend needs array-api-strict: pip install array-api-strict") from e

name = "array_api_strict"
array_type = type(xp.asarray(0))
device = xp.Device("CPU_DEVICE")


def asarray(host_array):
    return xp.asarray(np.asarray(host_array), device=device)


def to_numpy(x):
    return np.asarray(x._array)  # the host buffer; __array__ is disabled in strict mode


def scatter_add(target, indices, values):
    # TODO(array-api#396): a standard scatter-add would remove this backend-specific extra.
    np.add.at(target._array, to_numpy(indices), to_numpy(values))


def synchronize():
    pass
