"""Scalar math for the numba sources that LLVM can vectorize: exp, tanh and a row's softmax.

libm's ``exp`` and ``tanh`` do not vectorize without Intel's SVML (not installed, and not worth a
dependency), and a loop that calls them runs one value at a time: the masked softmax went from
11 ms to 2.4 ms at B8 T256 with the exp below (docs/kernels.md). Each helper is plain Python
(it runs, slowly, without numba too) and is inlined into the sources that call it.

Scalars are passed in the arrays' dtype so that float32 code stays float32 (a float64 literal
would widen it).

Not here: the kernels that use them (gelu, swiglu, attention, crossentropy).
"""

from __future__ import annotations

import numpy as np

from arraygpt.backends.numpy.kernels._jit import jitable, when_numba_loads


@jitable
def exp32(x):
    # Cephes' expf: exp(x) = 2^k exp(r), x = k ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial for
    # exp(r) and 2^k from its bits; ~3 ulp
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    two_k = np.int32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)  # 2^k from its bits
    return (p * r * r + r + np.float32(1.0)) * two_k


@jitable
def exp64(x):
    # Cephes' exp: the same reduction, a Pade form for exp(r); a few 1e-15 relative here
    x = min(max(x, -708.0), 709.0)
    k = np.floor(x * 1.4426950408889634 + 0.5)
    r = x - k * 6.93145751953125e-1 - k * 1.42860682030941723212e-6
    rr = r * r
    px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1)
    qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr + 2.0
    two_k = np.int64((np.int64(k) + np.int64(1023)) << np.int64(52)).view(np.float64)
    return (1.0 + 2.0 * px / (qx - px)) * two_k


def fast_exp(x):
    """exp(x) by :func:`exp32` or :func:`exp64`, chosen by x's type (in numba, when compiling)."""
    return exp32(x) if isinstance(x, np.float32) else exp64(x)


def _register_fast_exp(numba):
    @numba.extending.overload(fast_exp, inline="always", fastmath={"nsz", "contract"})
    def _fast_exp_by_type(x):
        if x == numba.core.types.float32:
            return exp32
        if x == numba.core.types.float64:
            return exp64
        return None


when_numba_loads(_register_fast_exp)


@jitable
def tanh32(u, clamp):
    # tanh of float32 u, |u| <= clamp: a rational function (Eigen's generic_fast_tanh_float,
    # accurate to a few ulp in float32)
    u2 = u * u
    p = u2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = p * u2 + np.float32(-8.60467152213735e-11)
    p = p * u2 + np.float32(5.12229709037114e-08)
    p = p * u2 + np.float32(1.48572235717979e-05)
    p = p * u2 + np.float32(6.37261928875436e-04)
    p = p * u2 + np.float32(4.89352455891786e-03)
    q = u2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = q * u2 + np.float32(2.26843463243900e-03)
    q = q * u2 + np.float32(4.89352518554385e-03)
    if u >= clamp or u <= -clamp:  # exactly +-1 out there (p/q is 1 only to a few ulp)
        return u / clamp
    return u * p / q


@jitable
def softmax_into(x, out, n, zero):
    # out[:n] = softmax(x[:n]) (out may be x); returns (max, sum of exp(x - max)) for a
    # log-sum-exp. The row max runs in 8 independent chains: a max reduction does not vectorize
    # without assuming no NaN, and one chain waits on each compare
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = x[0]
    for j in range(0, n - 7, 8):
        m0, m1, m2, m3 = max(m0, x[j]), max(m1, x[j + 1]), max(m2, x[j + 2]), max(m3, x[j + 3])
        m4, m5, m6, m7 = max(m4, x[j + 4]), max(m5, x[j + 5]), max(m6, x[j + 6]), max(m7, x[j + 7])
    for j in range(n - n % 8, n):
        m0 = max(m0, x[j])
    top = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    total = zero
    for j in range(n):
        e = fast_exp(x[j] - top)
        out[j] = e
        total += e
    inv = 1.0 / total
    for j in range(n):
        out[j] *= inv
    return top, total
