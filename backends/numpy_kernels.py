"""Fused kernels for the numpy backend, compiled with numba: GELU (tanh), SwiGLU, RoPE, LayerNorm,
RMSNorm, the linear layer for a few rows, causal (and grouped-query) attention and softmax +
cross-entropy, each a forward/backward pair equal to its reference in ``arraygpt.nn.layers``, and the
Adam/AdamW update, bit-identical to the optimizer plugin's reference update.

Why they pay: NumPy runs each elementwise operation as its own pass over memory on one core; a
kernel here makes one pass (GELU, SwiGLU, RoPE, the norms' rows) or computes only the causal half
of attention and fuses its masked softmax. A decode step's linear layers read every weight for
one row of input, which OpenBLAS does slower than one core streams memory. Each kernel is serial
and releases the GIL (``nogil``): the model already splits a batch across threads
(``arraygpt.nn.runner``), so the chunks' kernels run side by side, and a parallel numba kernel
beside them would oversubscribe the cores (and numba's default ``workqueue`` threading layer may
not be entered from two threads at once).
docs/kernels.md and docs/performance.md give the measurements behind these choices.

A kernel takes what it knows (NumPy arrays of float32/float64, C-contiguous or evenly strided rows
where it matters) and hands everything else to the reference: dropout in attention, a keyword it
does not know. Its backward recognizes its own forward's cache by type (a subclass of the
reference's NamedTuple, so ``cache.probs`` still reads the attention patterns) and calls the
reference's backward for a reference cache.

numba is imported only when a model first selects one of these kernels (``import numba`` takes
about half a second); without numba the kernels are unavailable and the reference runs.
Compiled code is cached on disk (numba's ``cache=True``), so later processes skip compilation.

Not here: the math's definition (``arraygpt.nn.layers``), choosing kernels (``arraygpt.nn.kernels``).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from arraygpt.nn import layers
from arraygpt.nn.kernels import KernelSpec, KernelUnavailable

_GELU_C = math.sqrt(2.0 / math.pi)  # layers.gelu_tanh_forward's constants
_GELU_A = 0.044715
_TANH_CLAMP = 7.90531110763549805  # beyond it the rational tanh below is +-1 in float32

# ----------------------------------------------------------------------------------------------
# the numba sources: plain functions, compiled by _compile() on first use. Scalars are passed in
# the arrays' dtype so that float32 code stays float32 (a float64 literal would widen it).


def _fast_exp(x):  # numba only: exp that vectorizes (_exp32 or _exp64 by x's type, see _compile)
    raise NotImplementedError("compiled by numba only")


def _exp32(x):
    # Cephes' expf: exp(x) = 2^k exp(r), x = k ln2 + r, |r| <= ln2 / 2, a degree-7 polynomial for
    # exp(r) and 2^k from its bits; ~3 ulp. libm's expf does not vectorize without Intel's SVML.
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
    r = x - k * np.float32(0.693359375) - k * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _f32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


def _exp64(x):
    # Cephes' exp: the same reduction, a Pade form for exp(r); a few 1e-15 relative here
    x = min(max(x, -708.0), 709.0)
    k = np.floor(x * 1.4426950408889634 + 0.5)
    r = x - k * 6.93145751953125e-1 - k * 1.42860682030941723212e-6
    rr = r * r
    px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1)
    qx = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr + 2.0
    return (1.0 + 2.0 * px / (qx - px)) * _f64_from_bits((np.int64(k) + np.int64(1023)) << np.int64(52))


def _f32_from_bits(i):  # replaced by a numba intrinsic in _compile
    raise NotImplementedError("compiled by numba only")


def _f64_from_bits(i):
    raise NotImplementedError("compiled by numba only")


def _tanh32(u, clamp):  # numba only (inlined): tanh of float32 u, |u| <= clamp
    # a rational function (Eigen's generic_fast_tanh_float, accurate to a few ulp in float32): it
    # vectorizes, libm's tanh and exp do not without Intel's SVML
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


def _gelu32_forward(x, out, half, one, c, a, clamp):  # x, out (n,) float32
    # out = 0.5 x (1 + tanh(u)), u = c (x + a x^3)
    for i in range(x.size):
        v = x[i]
        u = min(max(c * v * (one + a * v * v), -clamp), clamp)
        out[i] = half * v * (one + _tanh32(u, clamp))


def _gelu32_backward(x, dout, dx, half, one, c, a, clamp):
    # dx = dout * (0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3a x^2)), t = tanh(u), recomputed from x
    for i in range(x.size):
        v = x[i]
        u = min(max(c * v * (one + a * v * v), -clamp), clamp)
        t = _tanh32(u, clamp)
        dx[i] = dout[i] * (half * (one + t) + half * v * (one - t * t) * c * (one + (a + a + a) * v * v))


def _gelu64_forward(x, out):  # float64: out = x sigmoid(2u), as the reference computes it
    for i in range(x.size):
        v = x[i]
        minus_2u = v * (v * v * (-2.0 * 0.7978845608028654 * 0.044715) - 2.0 * 0.7978845608028654)
        out[i] = v / (1.0 + _fast_exp(min(minus_2u, 80.0)))


def _gelu64_backward(x, dout, dx):  # dx = dout (s + x s (1 - s) 2c (1 + 3a x^2)), s = sigmoid(2u)
    for i in range(x.size):
        v = x[i]
        minus_2u = v * (v * v * (-2.0 * 0.7978845608028654 * 0.044715) - 2.0 * 0.7978845608028654)
        s = 1.0 / (1.0 + _fast_exp(min(minus_2u, 80.0)))
        g = v * (v * v * (6.0 * 0.7978845608028654 * 0.044715) + 2.0 * 0.7978845608028654)
        dx[i] = dout[i] * (s + g * s * (1.0 - s))


def _swiglu_forward(g, gs, u, us, out, one, cap):
    # layers.swiglu_forward: out = g sigmoid(g) u; g, u flat C views whose row n starts at n gs
    # (n us), out (N, H)
    N, H = out.shape
    for n in range(N):
        gn, un, o = g[n * gs : n * gs + H], u[n * us : n * us + H], out[n]
        for j in range(H):
            x = gn[j]
            s = one / (one + _fast_exp(min(-x, cap)))
            o[j] = x * s * un[j]


def _swiglu_backward(g, gs, u, us, dout, dg, du, one, cap):
    # layers.swiglu_backward with s = sigmoid(g) recomputed: du = dout g s, dg = dout u (g s - g s s + s)
    N, H = dout.shape
    for n in range(N):
        gn, un, d, dgn, dun = g[n * gs : n * gs + H], u[n * us : n * us + H], dout[n], dg[n], du[n]
        for j in range(H):
            x = gn[j]
            s = one / (one + _fast_exp(min(-x, cap)))
            silu = x * s
            dun[j] = d[j] * silu
            dgn[j] = (silu - silu * s + s) * un[j] * d[j]


def _rope(x, xs, cos, sin, out, T, hs, backward):
    # layers.rope_forward / rope_backward for one (row, position, head) at a time; x a flat C view
    # whose row n (position n % T) starts at n xs, out (N, NH * hs), cos and sin (T, hs). Forward:
    # out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2; backward (the transposed rotation): dx1 = d1 c1 +
    # d2 s2, dx2 = d2 c2 - d1 s1, where c1 = cos[t, :hs/2], c2 = cos[t, hs/2:] (equal in
    # layers.rope_tables' layout, kept apart here as the reference keeps them)
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


def _norm_forward(x, w, b, has_w, has_b, centered, eps, out, xhat, rstd):
    # x (N, C); layers.layernorm_forward (centered) / rmsnorm_forward, one row at a time; the row
    # statistics in float64
    N, C = x.shape
    cast = np.empty(2, x.dtype)
    for n in range(N):
        row = x[n]
        mean = 0.0
        if centered:
            for j in range(C):
                mean += row[j]
            mean /= C
        var = 0.0
        for j in range(C):
            d = row[j] - mean
            var += d * d
        cast[0] = mean
        cast[1] = 1.0 / math.sqrt(var / C + eps)
        m, r = cast[0], cast[1]
        rstd[n] = r
        xh, o = xhat[n], out[n]
        for j in range(C):
            h = (row[j] - m) * r
            xh[j] = h
            if has_w:
                h = h * w[j]
            if has_b:
                h = h + b[j]
            o[j] = h


def _norm_backward(dout, xhat, rstd, w, has_w, centered, dx, dw, db):
    # layers._norm_backward one row at a time: dx = rstd (g - xhat mean(g xhat) [- mean(g)]),
    # g = dout w; dw, db (C,) float64 accumulate over the rows
    N, C = dout.shape
    cast = np.empty(2, dout.dtype)
    for n in range(N):
        do, xh = dout[n], xhat[n]
        sum_g = 0.0
        sum_gx = 0.0
        for j in range(C):
            g = do[j] * w[j] if has_w else do[j]
            sum_g += g
            sum_gx += g * xh[j]
        cast[0] = sum_g / C if centered else 0.0
        cast[1] = sum_gx / C
        mg, mgx = cast[0], cast[1]
        r = rstd[n]
        d = dx[n]
        for j in range(C):
            g = do[j] * w[j] if has_w else do[j]
            d[j] = (g - xh[j] * mgx - mg) * r
            dw[j] += do[j] * xh[j]
            db[j] += do[j]


def _softmax_into(x, out, n, zero):  # numba only (inlined): out[:n] = softmax(x[:n]), out may be x
    # returns (max, sum of exp(x - max)) for a log-sum-exp. The row max runs in 8 independent
    # chains: a max reduction does not vectorize without assuming no NaN, and one chain waits on
    # each compare
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = x[0]
    for j in range(0, n - 7, 8):
        m0, m1, m2, m3 = max(m0, x[j]), max(m1, x[j + 1]), max(m2, x[j + 2]), max(m3, x[j + 3])
        m4, m5, m6, m7 = max(m4, x[j + 4]), max(m5, x[j + 5]), max(m6, x[j + 6]), max(m7, x[j + 7])
    for j in range(n - n % 8, n):
        m0 = max(m0, x[j])
    top = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    total = zero
    for j in range(n):
        e = _fast_exp(x[j] - top)
        out[j] = e
        total += e
    inv = 1.0 / total
    for j in range(n):
        out[j] *= inv
    return top, total


def _causal_softmax(probs, past):
    # probs (B, NH, T, Tk) holds the scores q k^T where computed; in place, each row becomes
    # softmax over the keys query i sees (0 .. past + i, past = Tk - T) and 0 after them: the
    # reference's "+ causal_mask, - max, exp, / sum" in one pass per row (layers.attention_forward)
    B, NH, T, Tk = probs.shape
    zero = np.zeros(1, probs.dtype)[0]
    for b in range(B):
        for h in range(NH):
            for i in range(T):
                n = past + i + 1
                p = probs[b, h, i]
                _softmax_into(p, p, n, zero)
                for j in range(n, Tk):
                    p[j] = zero


def _causal_softmax_backward(da, probs, dout, y, past):
    # da (B, NH, T, Tk) holds dy v^T where computed; in place it becomes ds = a (da - dy . y_i)
    # on the keys query i sees and 0 after them (layers.attention_backward); dout, y (B, T, D)
    B, NH, T, Tk = probs.shape
    hs = dout.shape[2] // NH
    zero = np.zeros(1, probs.dtype)[0]
    for b in range(B):
        for h in range(NH):
            for i in range(T):
                n = past + i + 1
                dy, yi = dout[b, i, h * hs : (h + 1) * hs], y[b, i, h * hs : (h + 1) * hs]
                dy_dot_y = zero
                for d in range(hs):
                    dy_dot_y += dy[d] * yi[d]
                g, p = da[b, h, i], probs[b, h, i]
                for j in range(n):
                    g[j] = p[j] * (g[j] - dy_dot_y)
                for j in range(n, Tk):
                    g[j] = zero


def _crossentropy_forward(logits, targets, ignore_index, probs, weights, safe_targets):
    # layers.crossentropy_forward one row at a time: probs = softmax(row), loss_n =
    # log(sum exp(row - max)) + max - row[t_n] where t_n != ignore_index; returns (sum of the
    # losses, count of the rows with a target), both in float64
    N, V = logits.shape
    zero = np.zeros(1, logits.dtype)[0]
    total = 0.0
    count = 0.0
    for n in range(N):
        row = logits[n]
        top, s = _softmax_into(row, probs[n], V, zero)
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


def _crossentropy_backward(probs, targets, weights, scale, dlogits):
    # dlogits_n = (probs_n - onehot(t_n)) * w_n * scale (layers.crossentropy_backward)
    N, V = probs.shape
    for n in range(N):
        r = weights[n] * scale
        p, d = probs[n], dlogits[n]
        for j in range(V):
            d[j] = p[j] * r
        d[targets[n]] -= r


def _linear_rows(x, w, b, has_b, out):
    # out (N, Cout) = x (N, Cin) @ w.T (+ b) for a few rows N: each row of w is read from memory
    # once for all N rows of x (a decode step is memory-bound on the weights), four rows of x at a
    # time so that each value of w loaded serves four sums; OpenBLAS's products with M = 1..8 rows
    # are slower at this (docs/kernels.md)
    N, K = x.shape
    zero = np.zeros(1, out.dtype)[0]
    for i in range(w.shape[0]):
        wi = w[i]
        bi = b[i] if has_b else zero
        n = 0
        while n + 4 <= N:
            x0, x1, x2, x3 = x[n], x[n + 1], x[n + 2], x[n + 3]
            s0 = s1 = s2 = s3 = zero
            for j in range(K):
                wj = wi[j]
                s0 += wj * x0[j]
                s1 += wj * x1[j]
                s2 += wj * x2[j]
                s3 += wj * x3[j]
            out[n, i], out[n + 1, i], out[n + 2, i], out[n + 3, i] = s0 + bi, s1 + bi, s2 + bi, s3 + bi
            n += 4
        for n in range(n, N):
            xn = x[n]
            s = zero
            for j in range(K):
                s += wi[j] * xn[j]
            out[n, i] = s + bi


def _adam_update(
    p, g, m, v, decay, wd, beta1, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, step_size, decoupled, coupled
):
    # plugins.optimizers.Adam.update, the same operations in the same order, each rounded as NumPy
    # rounds it (compiled without fastmath: no reassociation, no fused multiply-add)
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


# ----------------------------------------------------------------------------------------------
# compiling

_SOURCES = (
    _gelu32_forward,
    _gelu32_backward,
    _gelu64_forward,
    _gelu64_backward,
    _swiglu_forward,
    _swiglu_backward,
    _rope,
    _norm_forward,
    _norm_backward,
    _causal_softmax,
    _causal_softmax_backward,
    _crossentropy_forward,
    _crossentropy_backward,
    _linear_rows,
)
_EXACT_SOURCES = (_adam_update,)  # compiled without fastmath: bit-identical to the NumPy reference
_jit: dict[str, Any] = {}
_jit_lock = threading.Lock()


def _compile() -> dict[str, Any]:
    """numba-compiled versions of the sources above (compiled lazily per dtype on first call).

    fastmath lets LLVM reassociate sums (vectorized reductions) and use reciprocals; it keeps
    NaN and inf semantics, so a diverging run still shows nan. ``error_model="numpy"`` drops the
    ZeroDivisionError check that otherwise keeps every division loop scalar. The optimizer update
    goes without fastmath: its elementwise loop vectorizes anyway, and it stays bit-identical."""
    with _jit_lock:
        if not _jit:
            try:
                import numba
            except ImportError as e:
                raise KernelUnavailable(f"numba is not installed ({e}); pip install numba") from e
            options = dict(nogil=True, cache=True, error_model="numpy", fastmath={"nsz", "arcp", "contract", "reassoc"})
            _define_exp(numba)
            for helper in (_tanh32, _softmax_into):  # inlined into the sources that call them
                globals()[helper.__name__] = numba.njit(inline="always", **options)(helper)
            exact = dict(options, fastmath=False)
            for fn, opts in [(fn, options) for fn in _SOURCES] + [(fn, exact) for fn in _EXACT_SOURCES]:
                try:
                    _jit[fn.__name__] = numba.njit(**opts)(fn)
                except RuntimeError:  # no writable cache folder (numba: "no locator available")
                    _jit[fn.__name__] = numba.njit(**dict(opts, cache=False))(fn)
    return _jit


def _floats(*arrays: Any) -> bool:
    """NumPy arrays of one dtype, float32 or float64."""
    first = arrays[0]
    return first.dtype in (np.float32, np.float64) and all(
        type(a) is np.ndarray and a.dtype == first.dtype for a in arrays
    )


def _define_exp(numba: Any) -> None:
    """Make _fast_exp callable from numba code: bit casts as LLVM intrinsics, and an overload
    that picks _exp32 or _exp64 by the argument's type."""
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic, overload

    def bits_as(float_type: Any, int_type: Any, ir_type: Any) -> Any:
        @intrinsic
        def from_bits(typingctx, i):
            return float_type(int_type), lambda context, builder, sig, args: builder.bitcast(args[0], ir_type)

        return from_bits

    globals()["_f32_from_bits"] = bits_as(types.float32, types.int32, ir.FloatType())
    globals()["_f64_from_bits"] = bits_as(types.float64, types.int64, ir.DoubleType())

    @overload(_fast_exp, inline="always", fastmath={"nsz", "contract"})
    def _fast_exp_overload(x):  # no annotations: numba compares the signature with _fast_exp's
        if x == types.float32:
            return _exp32
        if x == types.float64:
            return _exp64
        return None


def _takes(*arrays: Any) -> bool:
    """NumPy arrays of one float32/float64 dtype, C-contiguous: what the kernels compute on."""
    return type(arrays[0]) is np.ndarray and _floats(*arrays) and all(a.flags.c_contiguous for a in arrays)


# ----------------------------------------------------------------------------------------------
# GELU (tanh approximation): layers.gelu_tanh_forward / gelu_tanh_backward


class GeluCache(layers.ActivationCache):
    """The fused GELU's cache: ``s`` is None, the backward recomputes it from ``x``."""

    __slots__ = ()


def gelu_tanh_forward(x: Any) -> tuple[Any, layers.ActivationCache]:
    """layers.gelu_tanh_forward in one pass."""
    if not _takes(x):
        return layers.gelu_tanh_forward(x)
    jit = _jit or _compile()
    out = np.empty_like(x)
    if x.dtype == np.float32:
        f = np.float32
        jit["_gelu32_forward"](x.reshape(-1), out.reshape(-1), f(0.5), f(1.0), f(_GELU_C), f(_GELU_A), f(_TANH_CLAMP))
    else:
        jit["_gelu64_forward"](x.reshape(-1), out.reshape(-1))
    return out, GeluCache(x, None)


def gelu_tanh_backward(dout: Any, cache: layers.ActivationCache) -> Any:
    """layers.gelu_tanh_backward in one pass, recomputing tanh from x."""
    if type(cache) is not GeluCache:
        return layers.gelu_tanh_backward(dout, cache)
    x = cache.x
    dout = np.ascontiguousarray(dout, dtype=x.dtype)
    jit = _jit or _compile()
    dx = np.empty_like(x)
    if x.dtype == np.float32:
        f = np.float32
        jit["_gelu32_backward"](
            x.reshape(-1), dout.reshape(-1), dx.reshape(-1), f(0.5), f(1.0), f(_GELU_C), f(_GELU_A), f(_TANH_CLAMP)
        )
    else:
        jit["_gelu64_backward"](x.reshape(-1), dout.reshape(-1), dx.reshape(-1))
    return dx


def _rows(a: Any) -> tuple[Any, int, int] | None:
    """A (..., W) array whose rows are W contiguous values at a fixed stride (a slice of the last
    axis, such as the model's q of its qkv projection or the gate half of its gate_up): (a flat
    C-contiguous view starting at its first value, the row stride in values, the number of rows),
    without a copy; None for any other layout (the reference takes it)."""
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


# ----------------------------------------------------------------------------------------------
# SwiGLU: layers.swiglu_forward / swiglu_backward


class FusedSwiGLUCache(layers.SwiGLUCache):
    """The fused SwiGLU's cache: ``sig`` is None, the backward recomputes it from ``gate``."""

    __slots__ = ()


def swiglu_forward(gate: Any, up: Any) -> tuple[Any, layers.SwiGLUCache]:
    """layers.swiglu_forward in one pass; gate and up may be strided rows (the halves of one
    projection's output)."""
    g, u = _rows(gate), _rows(up)
    if g is None or u is None or not _floats(gate, up) or gate.shape != up.shape:
        return layers.swiglu_forward(gate, up)
    jit = _jit or _compile()
    f = gate.dtype.type
    out = np.empty(gate.shape, dtype=gate.dtype)
    jit["_swiglu_forward"](g[0], g[1], u[0], u[1], out.reshape(g[2], -1), f(1.0), f(80.0))
    return out, FusedSwiGLUCache(gate, up, None)


def swiglu_backward(dout: Any, cache: layers.SwiGLUCache) -> tuple[Any, Any]:
    """layers.swiglu_backward in one pass, recomputing sigmoid(gate)."""
    if type(cache) is not FusedSwiGLUCache:
        return layers.swiglu_backward(dout, cache)
    gate, up, _ = cache
    g, u = _rows(gate), _rows(up)
    jit = _jit or _compile()
    f = gate.dtype.type
    dout = np.ascontiguousarray(dout, dtype=gate.dtype).reshape(g[2], -1)
    dg, du = np.empty_like(dout), np.empty_like(dout)
    jit["_swiglu_backward"](g[0], g[1], u[0], u[1], dout, dg, du, f(1.0), f(80.0))
    return dg.reshape(gate.shape), du.reshape(gate.shape)


# ----------------------------------------------------------------------------------------------
# rotary position embeddings: layers.rope_forward / rope_backward


class FusedRopeCache(layers.RopeCache):
    """The fused RoPE's cache: the reference's fields (cos, sin)."""

    __slots__ = ()


def _rope_call(x: Any, cos: Any, sin: Any, backward: bool) -> Any:
    """out (B, T, D) rotated per (row, position, head), or None where the kernel does not take it."""
    rows = _rows(x)
    if (
        rows is None
        or x.ndim != 3
        or not _floats(x, cos, sin)
        or cos.ndim != 2
        or sin.shape != cos.shape
        or cos.shape[0] != x.shape[1]
        or cos.shape[1] % 2
        or cos.shape[1] == 0
        or x.shape[2] % cos.shape[1]
    ):
        return None
    jit = _jit or _compile()
    out = np.empty(x.shape, dtype=x.dtype)
    jit["_rope"](
        rows[0],
        rows[1],
        np.ascontiguousarray(cos),
        np.ascontiguousarray(sin),
        out.reshape(rows[2], -1),
        x.shape[1],
        cos.shape[1],
        backward,
    )
    return out


def rope_forward(x: Any, cos: Any, sin: Any) -> tuple[Any, layers.RopeCache]:
    """layers.rope_forward in one pass per (row, position, head), without rotate_half's
    temporaries; x may be strided rows (q or k of the qkv projection). The positions are those
    of the tables (offset by a KV cache's length), as in the reference."""
    out = _rope_call(x, cos, sin, False)
    if out is None:
        return layers.rope_forward(x, cos, sin)
    return out, FusedRopeCache(cos, sin)


def rope_backward(dout: Any, cache: layers.RopeCache) -> Any:
    """layers.rope_backward in one pass: the transposed rotation."""
    dx = _rope_call(dout, *cache, True) if type(cache) is FusedRopeCache else None
    return layers.rope_backward(dout, cache) if dx is None else dx


# ----------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm: layers.layernorm_forward / rmsnorm_forward and their backward


class FusedNormCache(layers.NormCache):
    """The fused norms' cache: the reference's fields (xhat, rstd, w, has_bias)."""

    __slots__ = ()


def _norm_forward_of(centered: bool, reference: Any) -> Any:
    def forward(x: Any, w: Any, b: Any, eps: float) -> tuple[Any, layers.NormCache]:
        params = [a for a in (w, b) if a is not None]
        if not _takes(x, *params) or x.ndim < 1 or any(a.shape != x.shape[-1:] for a in params):
            return reference(x, w, b, eps)
        jit = _jit or _compile()
        C = x.shape[-1]
        x2 = x.reshape(-1, C)  # (N, C)
        out, xhat = np.empty_like(x2), np.empty_like(x2)
        rstd = np.empty((x2.shape[0],), dtype=x.dtype)
        dummy = np.empty((C,), dtype=x.dtype)
        jit["_norm_forward"](
            x2,
            dummy if w is None else w,
            dummy if b is None else b,
            w is not None,
            b is not None,
            centered,
            float(eps),
            out,
            xhat,
            rstd,
        )
        shape = x.shape
        return out.reshape(shape), FusedNormCache(xhat.reshape(shape), rstd.reshape(*shape[:-1], 1), w, b is not None)

    forward.__name__ = reference.__name__
    forward.__doc__ = f"{reference.__module__}.{reference.__name__}, one row at a time."
    return forward


def _norm_backward_of(centered: bool, reference: Any) -> Any:
    def backward(dout: Any, cache: layers.NormCache) -> tuple[Any, Any, Any]:
        if type(cache) is not FusedNormCache:
            return reference(dout, cache)
        xhat, rstd, w, has_bias = cache
        jit = _jit or _compile()
        C = xhat.shape[-1]
        dout2 = np.ascontiguousarray(dout, dtype=xhat.dtype).reshape(-1, C)
        dx = np.empty_like(dout2)
        dw, db = np.zeros((C,)), np.zeros((C,))  # float64 accumulators
        jit["_norm_backward"](
            dout2,
            xhat.reshape(-1, C),
            rstd.reshape(-1),
            np.empty((C,), dtype=xhat.dtype) if w is None else w,
            w is not None,
            centered,
            dx,
            dw,
            db,
        )
        return (
            dx.reshape(xhat.shape),
            None if w is None else dw.astype(xhat.dtype),
            db.astype(xhat.dtype) if has_bias else None,
        )

    backward.__name__ = reference.__name__
    backward.__doc__ = f"{reference.__module__}.{reference.__name__}, one row at a time."
    return backward


layernorm_forward = _norm_forward_of(True, layers.layernorm_forward)
layernorm_backward = _norm_backward_of(True, layers.layernorm_backward)
rmsnorm_forward = _norm_forward_of(False, layers.rmsnorm_forward)
rmsnorm_backward = _norm_backward_of(False, layers.rmsnorm_backward)


# ----------------------------------------------------------------------------------------------
# linear for a few rows (a decode step): layers.linear_forward; the backward is the reference's

LINEAR_MAX_ROWS = 8  # up to here the kernel beat or tied OpenBLAS's products on every size measured
LINEAR_MAX_BLAS_THREADS = 2  # measured against OpenBLAS at 1 and 2 threads; with more, BLAS's
# threads may read the weights faster than one core does (not measured), so BLAS runs


def linear_forward(x: Any, w: Any, b: Any = None) -> tuple[Any, layers.LinearCache]:
    """layers.linear_forward for at most LINEAR_MAX_ROWS rows of x (the batch's positions): one
    pass over w's rows in their stored order. More rows (BLAS is faster there), more than
    LINEAR_MAX_BLAS_THREADS BLAS threads or an unknown count, and other arrays: the reference.
    Its cache is the reference's, so the backward is ``layers.linear_backward``."""
    rows = x.size // x.shape[-1] if type(x) is np.ndarray and x.ndim and x.shape[-1] else 0
    if not (
        1 <= rows <= LINEAR_MAX_ROWS
        and _floats(x, w, *(() if b is None else (b,)))
        and w.ndim == 2
        and w.flags.c_contiguous
        and x.shape[-1] == w.shape[1]
        and (b is None or b.shape == w.shape[:1])
    ):
        return layers.linear_forward(x, w, b)
    from arraygpt.backends.numpy import blas_thread_count  # imported with the numpy backend already

    threads = blas_thread_count()
    if threads is None or threads > LINEAR_MAX_BLAS_THREADS:
        return layers.linear_forward(x, w, b)
    jit = _jit or _compile()
    out = np.empty((rows, w.shape[0]), dtype=w.dtype)
    jit["_linear_rows"](
        np.ascontiguousarray(x).reshape(rows, -1), w, w.reshape(-1)[:1] if b is None else b, b is not None, out
    )
    return out.reshape(*x.shape[:-1], w.shape[0]), layers.LinearCache(x, w, b is not None)


# ----------------------------------------------------------------------------------------------
# causal attention: layers.attention_forward / attention_backward over the causal half only


class FusedAttentionCache(layers.AttentionCache):
    """The fused attention's cache: the reference's fields, with q, k, v C-contiguous (B, NH, T, hs)."""

    __slots__ = ()


TILE = 64  # query rows per block: a block of queries needs the keys up to its last row only


def _blocks(T: int) -> list[tuple[int, int]]:
    return [(i0, min(T, i0 + TILE)) for i0 in range(0, T, TILE)]


def _split(x: Any, n_head: int) -> Any:  # (B, T, D) -> C-contiguous (B, NH, T, hs)
    B, T, D = x.shape
    return np.ascontiguousarray(x.reshape(B, T, n_head, D // n_head).transpose(0, 2, 1, 3))


def _merge(x: Any) -> Any:  # (B, NH, T, hs) -> C-contiguous (B, T, D)
    B, NH, T, hs = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(B, T, NH * hs)


def _mT(x: Any) -> Any:  # the last two axes swapped (a view)
    return np.swapaxes(x, -1, -2)


def attention_forward(
    q: Any, k: Any, v: Any, n_head: int, dropout_p: float = 0.0, coins: Any = None, **more: Any
) -> tuple[Any, layers.AttentionCache]:
    """layers.attention_forward, skipping the masked blocks: queries in blocks of TILE rows, each
    block's scores and output against only the keys it sees (BLAS matmuls), and the masked
    softmax in one fused pass. Grouped-query attention (``n_kv_head`` < n_head): the queries are
    viewed as (B, NKV, G, T, hs) and the key/value heads as (B, NKV, 1, Tk, hs), so each matmul
    broadcasts one key/value head over its G query heads (no repeated copies) and the causal
    blocks stay those of the plain case. Dropout and any argument it does not know go to the
    reference (which also raises on an n_kv_head that does not divide n_head)."""
    n_kv_head = more.pop("n_kv_head", None)
    B, T, D = q.shape
    NKV = n_head if n_kv_head is None else n_kv_head
    if (
        dropout_p > 0.0
        or more
        or n_head < 1
        or D % n_head
        or NKV < 1
        or n_head % NKV
        or k.ndim != 3
        or k.shape != v.shape
        or k.shape[0] != B
        or k.shape[2] != NKV * (D // n_head)
        or k.shape[1] < T
        or type(q) is not np.ndarray
        or not _floats(q, k, v)
    ):
        if n_kv_head is not None:
            more["n_kv_head"] = n_kv_head
        return layers.attention_forward(q, k, v, n_head, dropout_p, coins, **more)
    jit = _jit or _compile()
    Tk, hs, G = k.shape[1], D // n_head, n_head // NKV
    past = Tk - T  # keys before the first query (a KV cache)
    scale = 1.0 / math.sqrt(hs)
    qh = _split(q * q.dtype.type(scale), n_head)  # (B, NH, T, hs), scaled as the reference does
    if past:  # decoding: the keys and values as views of the KV cache, read in place by BLAS
        kh, vh = (x.reshape(B, Tk, NKV, hs).transpose(0, 2, 1, 3) for x in (k, v))  # (B, NKV, Tk, hs)
    else:  # training: C-contiguous heads, which BLAS's batched products take faster
        kh, vh = _split(k, NKV), _split(v, NKV)
    probs = np.empty((B, n_head, T, Tk), dtype=q.dtype)
    # query head h = j G + g uses key/value head j (transformers' repeat_kv order): views with a
    # group axis, the key/value heads broadcast over it
    q5, p5 = qh.reshape(B, NKV, G, T, hs), probs.reshape(B, NKV, G, T, Tk)
    k5T, v5 = _mT(kh)[:, :, None], vh[:, :, None]  # (B, NKV, 1, hs, Tk), (B, NKV, 1, Tk, hs)
    for i0, i1 in _blocks(T):  # scores of queries i0..i1-1 against keys 0..past+i1-1
        np.matmul(q5[..., i0:i1, :], k5T[..., : past + i1], out=p5[..., i0:i1, : past + i1])
    jit["_causal_softmax"](probs, past)
    yh = np.empty((B, n_head, T, hs), dtype=q.dtype)
    y5 = yh.reshape(B, NKV, G, T, hs)
    for i0, i1 in _blocks(T):
        np.matmul(p5[..., i0:i1, : past + i1], v5[..., : past + i1, :], out=y5[..., i0:i1, :])
    y = _merge(yh)  # (B, T, D)
    return y, FusedAttentionCache(qh, kh, vh, y, probs, None, scale)


def attention_backward(dout: Any, cache: layers.AttentionCache) -> tuple[Any, Any, Any]:
    """layers.attention_backward over the blocks the forward computed, the softmax's backward
    fused into one pass. With grouped key/value heads, dk and dv of a key/value head sum over its
    G query heads: one matmul over the G*T stacked rows where a key block is seen by every query
    (as the reference's grouped matmuls), else per query head and summed."""
    if type(cache) is not FusedAttentionCache:
        return layers.attention_backward(dout, cache)
    qh, kh, vh, y, probs, _, scale = cache
    jit = _jit or _compile()
    B, NH, T, hs = qh.shape
    NKV, Tk = kh.shape[1], kh.shape[2]
    G, past = NH // NKV, Tk - T
    dout = np.ascontiguousarray(dout, dtype=qh.dtype)
    dyh = _split(dout, NH)  # (B, NH, T, hs)
    ds = np.empty_like(probs)  # da = dy v^T, then ds in place
    dy5, ds5, p5, q5 = (a.reshape(B, NKV, G, T, a.shape[-1]) for a in (dyh, ds, probs, qh))
    k5, v5T = kh[:, :, None], _mT(vh)[:, :, None]
    for i0, i1 in _blocks(T):
        np.matmul(dy5[..., i0:i1, :], v5T[..., : past + i1], out=ds5[..., i0:i1, : past + i1])
    jit["_causal_softmax_backward"](ds, probs, dout, y, past)
    dq = np.empty_like(qh)
    dq5 = dq.reshape(B, NKV, G, T, hs)
    for i0, i1 in _blocks(T):  # dq = ds k * scale
        np.matmul(ds5[..., i0:i1, : past + i1], k5[..., : past + i1, :], out=dq5[..., i0:i1, :])
    dq *= dq.dtype.type(scale)
    dk, dv = np.empty_like(kh), np.empty_like(vh)
    dsg, pg, qg, dyg = (a.reshape(B, NKV, G * T, a.shape[-1]) for a in (ds, probs, qh, dyh))  # (B, NKV, G*T, .)
    for j0, j1 in _blocks(Tk):  # keys j0..j1-1 are seen by queries from j0 - past on
        r = max(0, j0 - past)
        if r == 0 or G == 1:  # the rows r.. of every query head are contiguous in the stacked view
            np.matmul(_mT(dsg[:, :, r:, j0:j1]), qg[:, :, r:], out=dk[:, :, j0:j1])  # ds^T q
            np.matmul(_mT(pg[:, :, r:, j0:j1]), dyg[:, :, r:], out=dv[:, :, j0:j1])  # a^T dy
        else:
            np.sum(np.matmul(_mT(ds5[..., r:, j0:j1]), q5[..., r:, :]), axis=2, out=dk[:, :, j0:j1])
            np.sum(np.matmul(_mT(p5[..., r:, j0:j1]), dy5[..., r:, :]), axis=2, out=dv[:, :, j0:j1])
    return _merge(dq), _merge(dk), _merge(dv)


# ----------------------------------------------------------------------------------------------
# softmax + cross-entropy: layers.crossentropy_forward / crossentropy_backward


class FusedCrossEntropyCache(layers.CrossEntropyCache):
    """The fused loss's cache: the reference's fields (probs, targets, weights, divisor)."""

    __slots__ = ()


def crossentropy_forward(
    logits: Any, targets: Any, ignore_index: int = -1, reduction: str = "mean", **more: Any
) -> tuple[Any, layers.CrossEntropyCache]:
    """layers.crossentropy_forward with the softmax, the picked logit and the loss in one pass per
    row. Anything it does not know goes to the reference (which raises on a bad reduction)."""
    if (
        more
        or reduction not in ("mean", "sum")
        or not _takes(logits)
        or logits.ndim != 2
        or type(targets) is not np.ndarray
        or targets.shape != logits.shape[:1]
        or targets.dtype.kind not in "iu"
        or not 0 <= int(targets.max(initial=0)) < logits.shape[1]
    ):
        return layers.crossentropy_forward(logits, targets, ignore_index, reduction, **more)
    jit = _jit or _compile()
    N, V = logits.shape
    probs = np.empty_like(logits)
    weights = np.empty((N,), dtype=logits.dtype)
    safe_targets = np.empty_like(targets)
    total, count = jit["_crossentropy_forward"](logits, targets, int(ignore_index), probs, weights, safe_targets)
    dt = logits.dtype.type
    divisor = dt(count) if reduction == "mean" else 1.0
    loss = dt(total) / divisor  # every row ignored: nan (0/0) with NumPy's warning, as the reference
    return loss, FusedCrossEntropyCache(probs, safe_targets, weights, divisor)


def crossentropy_backward(dloss: float, cache: layers.CrossEntropyCache) -> Any:
    """layers.crossentropy_backward in one pass: dlogits = (probs - onehot) * w * dloss / divisor."""
    if type(cache) is not FusedCrossEntropyCache:
        return layers.crossentropy_backward(dloss, cache)
    probs, targets, weights, divisor = cache
    jit = _jit or _compile()
    dlogits = np.empty_like(probs)
    jit["_crossentropy_backward"](probs, targets, weights, probs.dtype.type(float(dloss) / float(divisor)), dlogits)
    return dlogits


# ----------------------------------------------------------------------------------------------
# the Adam/AdamW update: plugins.optimizers.Adam.update (arraygpt.nn.kernels.select_update's contract)


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
    and ``v``, in one pass instead of the reference's dozen; the same numbers to the last bit.
    False (nothing changed) unless all four are C-contiguous NumPy arrays of one shape and dtype."""
    if not (_takes(p, g, m, v) and p.shape == g.shape == m.shape == v.shape):
        return False
    jit = _jit or _compile()
    f = p.dtype.type  # every scalar rounded to the arrays' dtype first, as NumPy does with a Python float
    decay = f(1.0 - lr * weight_decay)
    bc2_sqrt, step_size = math.sqrt(1.0 - beta2**step), lr / (1.0 - beta1**step)
    jit["_adam_update"](
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


# ----------------------------------------------------------------------------------------------
# registration (backends/__init__.py offers KERNELS through arraygpt_register_kernels)


def _loader(*kernel: Any) -> Any:
    def load() -> Any:
        _compile()  # imports numba, or raises KernelUnavailable saying it is missing
        return kernel if len(kernel) > 1 else kernel[0]

    return load


_NUMBA = "numba, serial, nogil"
_ON = dict(backends=("numpy",), array_types=(np.ndarray,))
KERNELS = {
    "numba_gelu_tanh": KernelSpec(
        "activation:gelu_tanh",
        _loader(gelu_tanh_forward, gelu_tanh_backward),
        **_ON,
        description=f"one pass forward and backward, tanh recomputed in the backward ({_NUMBA})",
    ),
    "numba_swiglu": KernelSpec(
        "swiglu",
        _loader(swiglu_forward, swiglu_backward),
        **_ON,
        description=f"one pass forward and backward, sigmoid recomputed in the backward ({_NUMBA})",
    ),
    "numba_rope": KernelSpec(
        "rope",
        _loader(rope_forward, rope_backward),
        **_ON,
        description=f"one pass per row, position and head, forward and backward ({_NUMBA})",
    ),
    "numba_layernorm": KernelSpec(
        "norm:layernorm",
        _loader(layernorm_forward, layernorm_backward),
        **_ON,
        description=f"one pass per row, forward and backward ({_NUMBA})",
    ),
    "numba_rmsnorm": KernelSpec(
        "norm:rmsnorm",
        _loader(rmsnorm_forward, rmsnorm_backward),
        **_ON,
        description=f"one pass per row, forward and backward ({_NUMBA})",
    ),
    "numba_crossentropy": KernelSpec(
        "crossentropy",
        _loader(crossentropy_forward, crossentropy_backward),
        **_ON,
        description=f"softmax, loss and backward in one pass per row ({_NUMBA})",
    ),
    "numba_linear_rows": KernelSpec(
        "linear",
        _loader(linear_forward, layers.linear_backward),
        **_ON,
        description=f"up to {LINEAR_MAX_ROWS} rows (decoding) in one pass over the weights, beside BLAS at "
        f"<= {LINEAR_MAX_BLAS_THREADS} threads; more rows: BLAS ({_NUMBA})",
    ),
    "numba_causal_attention": KernelSpec(
        "attention",
        _loader(attention_forward, attention_backward),
        **_ON,
        description=f"masked blocks skipped (BLAS on the rest), masked softmax fused, grouped-query "
        f"attention without repeated keys; dropout runs the reference ({_NUMBA})",
    ),
    "numba_adam": KernelSpec(
        "update:adam",
        _loader(adam_update),
        **_ON,
        description=f"Adam and AdamW in one pass per parameter, bit-identical to the reference ({_NUMBA})",
    ),
}
