"""NumPy backend: the default, on the CPU."""

import ctypes
import os

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
    if values.ndim == 1:
        np.add.at(target, indices, values)  # unbuffered: repeated indices accumulate
        return
    # Rows (the embedding gradient): np.add.at is slow on rows, so sum each index's rows with one
    # sort and one segmented reduction, then add once per distinct index.
    order = np.argsort(indices, kind="stable")
    sorted_indices = indices[order]
    first_of_run = np.empty(len(sorted_indices), dtype=bool)
    first_of_run[:1] = True
    np.not_equal(sorted_indices[1:], sorted_indices[:-1], out=first_of_run[1:])
    starts = np.flatnonzero(first_of_run)
    target[sorted_indices[starts]] += np.add.reduceat(values[order], starts, axis=0)


def synchronize():
    pass


def _keep_freed_memory():
    """Stop glibc from handing freed activation buffers back to the OS.

    A training step allocates and frees the same megabyte-sized activations every step. By
    default glibc unmaps or trims them, and each new array then page-faults its memory in
    again: that cost the nanoGPT CPU config about a quarter of its step time. PyTorch's CPU
    allocator avoids the same cost. Set ARRAYGPT_MALLOC_TUNING=0 to keep glibc's defaults.
    """
    if os.environ.get("ARRAYGPT_MALLOC_TUNING", "1") == "0":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return  # not glibc (macOS, Windows, musl): nothing to tune
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)  # glibc's maximum: blocks below 32 MiB come from the heap
    mallopt(M_TRIM_THRESHOLD, 2**30)  # return heap memory only past 1 GiB free
    mallopt(M_TOP_PAD, 64 * 2**20)


_keep_freed_memory()
