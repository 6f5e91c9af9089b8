"""NumPy backend: the default, on the CPU. This module holds the fields of
``arraygpt.xp.Backend`` (the namespace, the extras the standard lacks, the BLAS thread control);
its fused kernels are the ``kernels`` subpackage, imported only when the kernels are registered
(``backends/__init__.py``), and numba only when a model first selects one."""

import contextlib
import ctypes
import os
import threading

import array_api_compat.numpy as xp  # noqa: F401  (the Backend field)
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


def _openblas_thread_control():
    """(get, set) of the thread count of the OpenBLAS that NumPy loaded, or None where there is
    none to control (MKL, Accelerate, a platform without /proc). The same lookup as threadpoolctl:
    find the loaded library, then its exported setter (NumPy 2 wheels prefix it scipy_)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths, key=lambda p: "numpy" not in p):  # NumPy's own copy first
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (
            ("scipy_openblas", "64_"),
            ("scipy_openblas", ""),
            ("openblas", "64_"),
            ("openblas", ""),
        ):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                return get, set_
    return None


def _threads_wanted():
    """ARRAYGPT_NUM_THREADS, else the cores this process may use."""
    value = os.environ.get("ARRAYGPT_NUM_THREADS", "").strip()
    if not value:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"ARRAYGPT_NUM_THREADS must be a positive integer, got {value!r}")
    return int(value)


_openblas = _openblas_thread_control()
_wanted = _threads_wanted()  # read even when unused, so that a bad value is an error everywhere
# NumPy runs each elementwise operation on one core, so a model splits its batch across threads
# (model.py), each with single-threaded BLAS. Without control over BLAS's threads that would
# oversubscribe the cores, so then there is one thread.
threads = _wanted if _openblas is not None else 1


def blas_thread_count():
    """The threads NumPy's OpenBLAS runs now (inside ``blas_threads``: what it holds), or None
    where that is not known."""
    return None if _openblas is None else _openblas[0]()


_blas_lock = threading.Lock()
_blas_users = 0  # blocks inside blas_threads, across all threads
_blas_before = 0


@contextlib.contextmanager
def blas_threads(n):
    """Hold NumPy's OpenBLAS to ``n`` threads inside the block (a no-op without control).

    The setting is global to the process, so overlapping blocks (two models stepping in two
    threads) share one: the first sets it, the last restores what was there before."""
    global _blas_users, _blas_before
    if _openblas is None:
        yield
        return
    get, set_ = _openblas
    with _blas_lock:
        if _blas_users == 0:
            _blas_before = get()
        _blas_users += 1
        set_(n)
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                set_(_blas_before)


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
