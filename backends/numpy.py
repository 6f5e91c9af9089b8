"""NumPy backend: the default, on the CPU."""

import array_api_compat.numpy as xp
import numpy as np

name = "numpy"
array_type = np.ndarray
device = "cpu"


def asarray(host_array):
    return np.asarray(host_array)


def to_numpy(x):
    return np.asarray(x)


def scatter_add(target, indices, values):
    np.add.at(target, indices, values)  # unbuffered: repeated indices accumulate


def synchronize():
    pass
