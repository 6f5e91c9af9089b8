"""Intel oneMKL's float32 matrix product, for the linear layers' one-thread products, where the
``mkl`` package is installed (``pip install 'arraygpt[mkl]'``: Intel's wheel, under the Intel
Simplified Software License, so an extra and never a dependency).

Why: on the Sapphire Rapids Xeon of docs/performance.md, MKL's sgemm runs a training step's
products 12-14% faster than NumPy's OpenBLAS (``benchmarks/gemm.py``); PyTorch's CPU build links
the same library. ``ARRAYGPT_GEMM`` chooses, read on the first product:

- unset or ``auto``: MKL where the ``mkl`` package is installed and the CPU is Intel's (on AMD's it
  is not measured, so NumPy's BLAS keeps the products);
- ``numpy``: NumPy's BLAS always;
- ``mkl``: MKL on any CPU, or an error saying why it cannot load.

MKL runs sequential, its threading layer set before its first product: arraygpt splits a batch
over threads itself, each with one-thread products (``arraygpt.nn.runner``). Where BLAS may use
more threads (a prompt on two threads, one sequence), NumPy's OpenBLAS keeps the product.

Checked by tests/test_kernels.py, section "linear.py".
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import numpy as np

from arraygpt.backends import numpy as backend
from arraygpt.errors import KernelUnavailable

ENV_VAR = "ARRAYGPT_GEMM"
CHOICES = ("auto", "numpy", "mkl")  # and empty: auto
SEQUENTIAL, LP64 = 1, 0  # MKL_THREADING_SEQUENTIAL, MKL_INTERFACE_LP64 (32-bit sizes)
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS's enums
MAX_INT = 2**31 - 1

_lock = threading.Lock()
_chosen: list[Any] = []  # [cblas_sgemm, or None for NumPy's BLAS], once chosen


def sgemm() -> Any:
    """MKL's ``cblas_sgemm`` (a ctypes function) where ARRAYGPT_GEMM and the machine choose MKL,
    else None.

    Raises:
        ValueError: ARRAYGPT_GEMM holds none of auto, numpy, mkl; or it says mkl, and MKL cannot
            load here (the message says why).
    """
    if not _chosen:
        with _lock:
            if not _chosen:
                _chosen.append(_choose(os.environ.get(ENV_VAR, "").strip().lower() or "auto"))
    return _chosen[0]


def _choose(choice: str) -> Any:
    if choice not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(CHOICES)} (or unset: auto), got {choice!r}")
    if choice == "numpy" or (choice == "auto" and not _intel_cpu()):
        return None
    try:
        return _load()
    except KernelUnavailable as e:
        if choice == "mkl":
            raise ValueError(f"{ENV_VAR}=mkl, but {e}") from None
        return None


def _intel_cpu() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def _load() -> Any:
    import importlib.metadata

    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        raise KernelUnavailable("Intel's mkl package is not installed: pip install 'arraygpt[mkl]'") from None
    paths = [str(f.locate()) for f in files if f.name.startswith("libmkl_rt.so")]
    if not paths:
        raise KernelUnavailable("the mkl package holds no libmkl_rt.so (MKL's single dynamic library)")
    try:
        lib = ctypes.CDLL(paths[0])
    except OSError as e:
        raise KernelUnavailable(f"MKL's library did not load: {e}") from None
    # both return the layer in force: another user of this MKL in the process may have set others
    if lib.MKL_Set_Threading_Layer(SEQUENTIAL) != SEQUENTIAL or lib.MKL_Set_Interface_Layer(LP64) != LP64:
        raise KernelUnavailable("MKL was loaded in this process with another threading or interface layer")
    f = lib.cblas_sgemm
    i32, ptr = ctypes.c_int, ctypes.c_void_p
    f.argtypes = [i32, i32, i32, i32, i32, i32, ctypes.c_float, ptr, i32, ptr, i32, ctypes.c_float, ptr, i32]
    f.restype = None
    return f


def _layout(x: Any) -> tuple[Any, int, int]:
    """(x or a copy that MKL can read, CBLAS transpose flag, leading dimension) of a float32
    matrix: stored row-major (rows may be padded) or as the transposed view of such a matrix is
    read in place; anything else is copied row-major first, as NumPy's matmul copies it."""
    (rows, cols), (row_step, col_step) = x.shape, x.strides
    # the step along an axis of length 1 is never taken (NumPy may leave any value there)
    col_step = 4 if cols == 1 else col_step
    row_step = 4 * cols if rows == 1 else row_step
    if x.flags.aligned and col_step == 4 and row_step % 4 == 0 and cols <= row_step // 4 <= MAX_INT:
        return x, NO_TRANS, row_step // 4
    if x.flags.aligned and row_step == 4 and col_step % 4 == 0 and rows <= col_step // 4 <= MAX_INT:
        return x, TRANS, col_step // 4
    return np.array(x, order="C"), NO_TRANS, cols  # a copy: ascontiguousarray keeps an unaligned buffer


def matmul(a: Any, b: Any) -> Any:
    """a (M, K) @ b (K, N) -> a new (M, N) array by MKL, for float32 matrices, in a thread whose
    BLAS holds one thread; None where MKL is not chosen or does not take the arrays (then NumPy's
    matmul gives the product)."""
    f = sgemm()
    if f is None or backend.blas_thread_count() != 1:
        return None
    if not (type(a) is type(b) is np.ndarray and a.dtype == b.dtype == np.float32 and a.ndim == b.ndim == 2):
        return None
    (M, K), N = a.shape, b.shape[1]
    if not (b.shape[0] == K and 0 < min(M, N, K) and max(M, N, K) <= MAX_INT):
        return None
    (a, trans_a, lda), (b, trans_b, ldb) = _layout(a), _layout(b)
    out = np.empty((M, N), dtype=np.float32)
    f(ROW_MAJOR, trans_a, trans_b, M, N, K, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb, 0.0, out.ctypes.data, N)
    return out
