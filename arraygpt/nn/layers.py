"""Every layer of a GPT as a hand-written forward/backward pair, in forward-pass order.

Clean, minimal, reference: each ``<layer>_forward(...)`` returns ``(out, cache)`` and its
``<layer>_backward(dout, cache)`` returns the gradients of the forward's inputs, in the order
they were passed. The math is written once against the array API standard: the namespace comes
from the inputs (``namespace(x)``), so the same code runs on NumPy, CuPy, array-api-strict and
PyTorch. Nothing here imports an array library, and there is no autograd.

Not here: how the layers are wired into a model (``model.py``), randomness (dropout takes
pre-drawn coins), optimizers and sampling.

Shape legend:
    B batch, T time (query positions), Tk key positions (T, or more with a KV cache),
    C channels (n_embd), V vocabulary, NH heads, hs head size, D = NH*hs attention width,
    NKV key/value heads (grouped-query attention; NH/NKV = G query heads share one), Dkv = NKV*hs,
    H the MLP's hidden width, N = B*T rows of a flattened batch.
Weights are stored (out, in), so a linear layer computes ``x @ w.T + b``.

Speed: hot paths update arrays they have just created in place (``y *= s``, allowed by the
standard). That saves a pass and an allocation, and it sidesteps a slow path of NumPy 2, where
``python_float * temporary`` is up to 20x slower than the explicit in-place form.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from arraygpt.xp import Array, namespace, scatter_add


def _flat(x: Array) -> Array:  # (..., C) -> (N, C)
    return namespace(x).reshape(x, (-1, x.shape[-1]))


# Sums as matrix-vector products: BLAS runs them 3-5x faster than NumPy's sum over short rows.
def _sum_last(xp: Any, x: Array) -> Array:  # (..., C) -> (..., 1)
    ones = xp.ones((x.shape[-1], 1), dtype=x.dtype, device=x.device)
    return xp.reshape(xp.matmul(_flat(x), ones), (*x.shape[:-1], 1))


def _sum_rows(xp: Any, x: Array) -> Array:  # (..., C) -> (C,): the sum over every row, as for a bias gradient
    x = _flat(x)
    return xp.matmul(xp.ones((x.shape[0],), dtype=x.dtype, device=x.device), x)


# ----------------------------------------------------------------------------------------------
# encoder: token embedding + position embedding


class EncoderCache(NamedTuple):
    idx: Array  # (B, T) token ids
    wte_shape: tuple[int, ...]
    wpe_shape: tuple[int, ...] | None  # None: no position table (rotary positions act inside attention)
    pos_offset: int


def encoder_forward(idx: Array, wte: Array, wpe: Array | None, pos_offset: int = 0) -> tuple[Array, EncoderCache]:
    """x[b, t] = wte[idx[b, t]] + wpe[pos_offset + t]; (B,T) ints -> (B,T,C).
    ``wpe`` None: x[b, t] = wte[idx[b, t]] (the model encodes positions with RoPE instead)."""
    xp = namespace(wte)
    B, T = idx.shape
    C = wte.shape[1]
    x = xp.reshape(xp.take(wte, xp.reshape(idx, (B * T,)), axis=0), (B, T, C))  # (N, C) -> (B, T, C)
    if wpe is not None:
        x += wpe[pos_offset : pos_offset + T, :]  # (B, T, C)
    return x, EncoderCache(idx, wte.shape, None if wpe is None else wpe.shape, pos_offset)


def encoder_backward(dout: Array, cache: EncoderCache) -> tuple[Array, Array | None]:
    """forward: x[b, t] = wte[idx[b, t]] + wpe[t]. A token id that repeats gathers every row
    that used it (scatter-add); a position gathers the batch (sum over b). dwpe is None without wpe."""
    idx, wte_shape, wpe_shape, pos_offset = cache
    xp = namespace(dout)
    B, T, C = dout.shape
    dwte = xp.zeros(wte_shape, dtype=dout.dtype, device=dout.device)
    scatter_add(dwte, xp.reshape(idx, (B * T,)), xp.reshape(dout, (B * T, C)))
    if wpe_shape is None:
        return dwte, None
    dwpe = xp.zeros(wpe_shape, dtype=dout.dtype, device=dout.device)
    dwpe[pos_offset : pos_offset + T, :] = xp.sum(dout, axis=0)
    return dwte, dwpe


# ----------------------------------------------------------------------------------------------
# dropout (inverted: scaled at train time, the identity at eval time)


def dropout_forward(x: Array, p: float, coins: Array) -> tuple[Array, Array]:
    """out = x * keep / (1 - p), keep = coins >= p; ``coins`` are uniform [0, 1) draws of x's shape."""
    xp = namespace(x)
    mask = xp.astype(coins >= p, x.dtype)
    mask *= 1.0 / (1.0 - p)
    return x * mask, mask


def dropout_backward(dout: Array, mask: Array) -> Array:
    """forward: out = x * mask."""
    return dout * mask


# ----------------------------------------------------------------------------------------------
# normalization: LayerNorm (Ba et al. 2016; PyTorch's nn.LayerNorm) and RMSNorm (Zhang & Sennrich 2019)


class NormCache(NamedTuple):
    xhat: Array  # (..., C) the normalized input, before the gain
    rstd: Array  # (..., 1)
    w: Array | None  # the gain (C,), or None
    has_bias: bool


def layernorm_forward(x: Array, w: Array | None, b: Array | None, eps: float) -> tuple[Array, NormCache]:
    """out = (x - mean) * rstd * w + b over the last axis, rstd = 1/sqrt(var + eps) (biased var).
    ``w`` and ``b`` may be None (no learnable gain or bias)."""
    xp = namespace(x)
    inv_c = 1.0 / x.shape[-1]
    xhat = x - _sum_last(xp, x) * inv_c
    var = _sum_last(xp, xhat * xhat)  # (..., 1)
    rstd = 1.0 / xp.sqrt(var * inv_c + eps)
    xhat *= rstd
    return _affine(xhat, w, b), NormCache(xhat, rstd, w, b is not None)


def _affine(xhat: Array, w: Array | None, b: Array | None) -> Array:  # xhat * w + b, w and b optional
    if w is None:
        return xhat if b is None else xhat + b
    out = xhat * w
    if b is not None:
        out += b
    return out


def layernorm_backward(dout: Array, cache: NormCache) -> tuple[Array, Array | None, Array | None]:
    """forward: xhat = (x - mean) * rstd; out = xhat * w + b.
    dxhat = dout * w;  dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    dw = sum over rows of dout * xhat,  db = sum over rows of dout."""
    return _norm_backward(dout, cache, centered=True)


def _norm_backward(dout: Array, cache: NormCache, centered: bool) -> tuple[Array, Array | None, Array | None]:
    """LayerNorm's backward (``centered``) and RMSNorm's, which lacks the mean(dxhat) term.
    With dxhat = dout * w, both row means are matrix-vector products with w:
    mean(dxhat) = dout @ w / C and mean(dxhat * xhat) = (dout * xhat) @ w / C."""
    xhat, rstd, w, has_bias = cache
    xp = namespace(dout)
    C = xhat.shape[-1]
    dout_xhat = dout * xhat
    dw = None if w is None else _sum_rows(xp, dout_xhat)
    db = _sum_rows(xp, dout) if has_bias else None
    w_col = xp.ones((C, 1), dtype=dout.dtype, device=dout.device) if w is None else xp.reshape(w, (C, 1))

    def row_mean_times_w(a: Array) -> Array:  # (..., C) -> (..., 1)
        return xp.reshape(xp.matmul(_flat(a), w_col), (*a.shape[:-1], 1)) * (1.0 / C)

    dxhat = dout if w is None else dout * w
    dx = dxhat - xhat * row_mean_times_w(dout_xhat)
    if centered:
        dx -= row_mean_times_w(dout)
    dx *= rstd
    return dx, dw, db


def rmsnorm_forward(x: Array, w: Array | None, b: Array | None, eps: float) -> tuple[Array, NormCache]:
    """out = x * rstd * w + b, rstd = 1/sqrt(mean(x^2) + eps) over the last axis."""
    xp = namespace(x)
    rstd = 1.0 / xp.sqrt(_sum_last(xp, x * x) * (1.0 / x.shape[-1]) + eps)  # (..., 1)
    xhat = x * rstd
    return _affine(xhat, w, b), NormCache(xhat, rstd, w, b is not None)


def rmsnorm_backward(dout: Array, cache: NormCache) -> tuple[Array, Array | None, Array | None]:
    """forward: xhat = x * rstd; out = xhat * w + b.
    dx = rstd * (dxhat - xhat * mean(dxhat * xhat)) with dxhat = dout * w (no mean term: nothing
    was subtracted); dw and db as in LayerNorm."""
    return _norm_backward(dout, cache, centered=False)


NORMS = {"layernorm": (layernorm_forward, layernorm_backward), "rmsnorm": (rmsnorm_forward, rmsnorm_backward)}


# ----------------------------------------------------------------------------------------------
# linear (also the query/key/value/output projections, the MLP, and the unembedding)


class LinearCache(NamedTuple):
    x: Array  # (..., Cin) the input
    w: Array  # (Cout, Cin)
    has_bias: bool


def linear_forward(x: Array, w: Array, b: Array | None = None) -> tuple[Array, LinearCache]:
    """out = x @ w.T + b; (..., Cin) -> (..., Cout), w is (Cout, Cin)."""
    xp = namespace(x)
    out = xp.matmul(_flat(x), xp.matrix_transpose(w))  # (N, Cout)
    if b is not None:
        out += b
    return xp.reshape(out, (*x.shape[:-1], w.shape[0])), LinearCache(x, w, b is not None)


def linear_backward(dout: Array, cache: LinearCache) -> tuple[Array, Array, Array | None]:
    """forward: out = x @ w.T + b.  dx = dout @ w;  dw = dout.T @ x;  db = sum over rows of dout."""
    x, w, has_bias = cache
    xp = namespace(dout)
    dout2 = _flat(dout)  # (N, Cout)
    dx = xp.reshape(xp.matmul(dout2, w), x.shape)  # (..., Cin)
    dw = xp.matmul(xp.matrix_transpose(dout2), _flat(x))  # (Cout, Cin)
    db = _sum_rows(xp, dout2) if has_bias else None
    return dx, dw, db


def linear_input_backward(dout: Array, cache: LinearCache) -> Array:
    """The backward of a frozen linear (LoRA's base weight): forward out = x @ w.T + b, dx = dout @ w
    alone; no dw or db is computed, since nothing trains them."""
    x, w, _ = cache
    xp = namespace(dout)
    return xp.reshape(xp.matmul(_flat(dout), w), x.shape)  # (..., Cin)


# ----------------------------------------------------------------------------------------------
# LoRA: a frozen linear plus a trained low-rank update (Hu et al. 2021, "LoRA"; PEFT's lora.Linear)
#   r the adapter's rank; A (r, Cin), B (Cout, r); scale = alpha / r


class LoRACache(NamedTuple):
    x: Array  # (..., Cin) the input
    xa: Array  # (N, r) x @ A.T
    a: Array  # (r, Cin)
    b: Array  # (Cout, r)
    scale: float


def lora_forward(x: Array, a: Array, b: Array, scale: float) -> tuple[Array, LoRACache]:
    """The adapter branch alone: delta = scale * (x @ A.T) @ B.T; (..., Cin) -> (..., Cout).
    Added to a frozen linear's output (for a fused buffer, to its slice of the output)."""
    xp = namespace(x)
    xa = xp.matmul(_flat(x), xp.matrix_transpose(a))  # (N, r)
    delta = xp.matmul(xa, xp.matrix_transpose(b))  # (N, Cout)
    delta *= scale
    return xp.reshape(delta, (*x.shape[:-1], b.shape[0])), LoRACache(x, xa, a, b, scale)


def lora_backward(ddelta: Array, cache: LoRACache) -> tuple[Array, Array, Array]:
    """forward: delta = s (x A^T) B^T, with u = x A^T (N, r).
    dB = s ddelta^T u;  du = s ddelta B;  dA = du^T x;  dx = du A."""
    x, xa, a, b, scale = cache
    xp = namespace(ddelta)
    d2 = _flat(ddelta)  # (N, Cout)
    db = xp.matmul(xp.matrix_transpose(d2), xa)  # (Cout, r)
    db *= scale
    du = xp.matmul(d2, b)  # (N, r)
    du *= scale
    da = xp.matmul(xp.matrix_transpose(du), _flat(x))  # (r, Cin)
    dx = xp.reshape(xp.matmul(du, a), x.shape)  # (..., Cin)
    return dx, da, db


class LoRALinearCache(NamedTuple):
    base: LinearCache
    lora: LoRACache


def lora_linear_forward(
    x: Array, w: Array, bias: Array | None, a: Array, b: Array, scale: float
) -> tuple[Array, LoRALinearCache]:
    """out = x @ W.T + bias + scale * (x @ A.T) @ B.T: the LoRA linear, W and bias frozen;
    (..., Cin) -> (..., Cout)."""
    out, base = linear_forward(x, w, bias)  # (..., Cout)
    delta, lora = lora_forward(x, a, b, scale)  # (..., Cout)
    out += delta
    return out, LoRALinearCache(base, lora)


def lora_linear_backward(dout: Array, cache: LoRALinearCache) -> tuple[Array, None, None, Array, Array]:
    """forward: out = x W^T + bias + s (x A^T) B^T.  dx = dout W + (the adapter's dx); W and bias
    are frozen, so their gradients are None; dA, dB as in :func:`lora_backward`."""
    dx = linear_input_backward(dout, cache.base)
    dx_lora, da, db = lora_backward(dout, cache.lora)
    dx += dx_lora
    return dx, None, None, da, db


# ----------------------------------------------------------------------------------------------
# rotary position embeddings (RoPE, Su et al. 2021), on the queries and keys of every head


def rope_frequencies(
    head_dim: int, theta: float = 10000.0, scaling: tuple[float, float, float, int] | None = None
) -> tuple[float, ...]:
    """The hs/2 inverse frequencies inv_freq[i] = theta^(-2i/hs), as Python floats.

    ``scaling`` = (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    applies Llama 3.1's frequency scaling (transformers' ``_compute_llama3_parameters``): with
    L = original_max_position_embeddings and wavelength w = 2 pi / inv_freq, frequencies with
    w < L / high_freq_factor stay, those with w > L / low_freq_factor are divided by factor, and
    those between are interpolated: (1 - s) f / factor + s f, s = (L / w - low) / (high - low).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
    inv = [1.0 / theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    if scaling is None:
        return tuple(inv)
    factor, low, high, old_len = scaling
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for f in inv:
        wavelen = 2.0 * math.pi / f
        if wavelen < high_wavelen:
            out.append(f)
        elif wavelen > low_wavelen:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1.0 - smooth) * f / factor + smooth * f)
    return tuple(out)


def rope_tables(
    xp: Any, T: int, offset: int, inv_freq: tuple[float, ...], dtype: Any, device: Any = None
) -> tuple[Array, Array]:
    """cos and sin (T, hs) of the angles (offset + t) * inv_freq[i], each frequency twice
    ([f_0 .. f_{hs/2-1}, f_0 .. f_{hs/2-1}]: transformers' rotate_half layout). The angles are
    computed in float64 and rounded once to ``dtype``, for the first 2^k positions that hold
    ``offset + T`` (at least 64): the result is rows of that table, which is kept for the next
    call (a decode step's one position is a slice, not a new table)."""
    key = (id(xp), inv_freq, str(dtype), str(device))
    end = offset + T
    tables = _rope_tables.get(key)
    if tables is None or tables[0].shape[0] < end:
        n = max(64, 1 << (end - 1).bit_length())
        wide = xp.float64
        pos = xp.arange(0, n, dtype=wide, device=device)  # (n,)
        angle = pos[:, None] * xp.asarray(inv_freq, dtype=wide, device=device)[None, :]  # (n, hs/2)
        cos, sin = xp.astype(xp.cos(angle), dtype), xp.astype(xp.sin(angle), dtype)
        tables = (xp.concat([cos, cos], axis=-1), xp.concat([sin, sin], axis=-1))  # (n, hs) each
        if len(_rope_tables) >= 8:
            _rope_tables.clear()
        _rope_tables[key] = tables
    return tables[0][offset:end, :], tables[1][offset:end, :]


_rope_tables: dict[tuple[Any, ...], tuple[Array, Array]] = {}  # the last few, by namespace, frequencies, dtype, device


def _rotate_half(xp: Any, x: Array) -> Array:  # (..., hs) -> (..., hs): [x1, x2] -> [-x2, x1]
    half = x.shape[-1] // 2
    return xp.concat([-x[..., half:], x[..., :half]], axis=-1)


class RopeCache(NamedTuple):
    cos: Array  # (T, hs)
    sin: Array  # (T, hs)


def rope_forward(x: Array, cos: Array, sin: Array) -> tuple[Array, RopeCache]:
    """out = x * cos + rotate_half(x) * sin per head; x (B,T,NH*hs), cos and sin (T,hs) -> (B,T,NH*hs).

    With x = [x1, x2] (the two halves of a head) and angle a = position * f: out1 = x1 cos a -
    x2 sin a, out2 = x2 cos a + x1 sin a, a rotation of each pair (x1[i], x2[i]) (transformers'
    apply_rotary_pos_emb, so Hugging Face weights need no permutation). The positions are those
    of ``cos``/``sin`` (offset by the KV cache's length, see :func:`rope_tables`).
    """
    xp = namespace(x)
    B, T, D = x.shape
    hs = cos.shape[-1]
    assert cos.shape[0] == T, f"rope tables have {cos.shape[0]} positions, x has {T}"
    xh = xp.reshape(x, (B, T, D // hs, hs))  # (B, T, NH, hs)
    out = xh * cos[:, None, :]
    out += _rotate_half(xp, xh) * sin[:, None, :]
    return xp.reshape(out, (B, T, D)), RopeCache(cos, sin)


def rope_backward(dout: Array, cache: RopeCache) -> Array:
    """forward: out = x * cos + rotate_half(x) * sin, i.e. out1 = x1 c - x2 s, out2 = x2 c + x1 s.
    The rotation's transpose rotates back: dx1 = d1 c + d2 s, dx2 = d2 c - d1 s, which is
    dx = dout * cos - rotate_half(dout * sin)."""
    cos, sin = cache
    xp = namespace(dout)
    B, T, D = dout.shape
    hs = cos.shape[-1]
    dh = xp.reshape(dout, (B, T, D // hs, hs))  # (B, T, NH, hs)
    dx = dh * cos[:, None, :]
    dx -= _rotate_half(xp, dh * sin[:, None, :])
    return xp.reshape(dx, (B, T, D))


# ----------------------------------------------------------------------------------------------
# softmax with a temperature (used inside attention, by the loss and by the samplers)


def softmax_forward(x: Array, temperature: float = 1.0, axis: int = -1) -> Array:
    """p = exp((x - max x) / T) / sum(exp((x - max x) / T)) along ``axis``.

    Subtracting the max first keeps exp from overflowing and makes p independent of a constant
    added to x; dividing after the subtraction keeps T -> 0 finite (one-hot at the argmax).
    Entries of -inf (masked) get exactly 0. A T past the dtype's largest number divides by that
    number (the same uniform limit), not by its overflow to inf, which makes -inf / inf NaN.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy decoding for T = 0), got {temperature}")
    xp = namespace(x)
    z = x - xp.max(x, axis=axis, keepdims=True)
    if temperature != 1.0:
        z /= min(temperature, float(xp.finfo(x.dtype).max))
    e = xp.exp(z)
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


def softmax_backward(dout: Array, probs: Array, temperature: float = 1.0, axis: int = -1) -> Array:
    """forward: p = softmax(x / T).  dx = p * (dout - sum(dout * p)) / T."""
    xp = namespace(dout)
    weighted = dout * probs
    dx = dout - (_sum_last(xp, weighted) if axis == -1 else xp.sum(weighted, axis=axis, keepdims=True))
    dx *= probs
    if temperature != 1.0:
        dx /= min(temperature, float(xp.finfo(dout.dtype).max))
    return dx


# ----------------------------------------------------------------------------------------------
# causal multi-head self-attention (Vaswani et al. 2017), after the Q/K/V projections


def causal_mask(xp: Any, T: int, Tk: int, dtype: Any, device: Any) -> Array:
    """Additive (T, Tk) mask: 0 where query t may look at key s, -inf in its future.
    Query t sits at absolute position Tk - T + t (the last T of Tk positions).
    Training asks for the same mask every step, so the last few are kept."""
    key = (id(xp), T, Tk, str(dtype), str(device))
    mask = _masks.get(key)
    if mask is None:
        allowed = xp.arange(Tk, device=device)[None, :] <= xp.arange(Tk - T, Tk, device=device)[:, None]
        zeros = xp.zeros((T, Tk), dtype=dtype, device=device)
        mask = xp.where(allowed, zeros, zeros - math.inf)
        if len(_masks) >= 8:
            _masks.clear()
        _masks[key] = mask
    return mask


_masks: dict[tuple[Any, ...], Array] = {}


def _split_heads(xp: Any, x: Array, n_head: int) -> Array:  # (B, T, D) -> (B, NH, T, hs)
    B, T, D = x.shape
    return xp.permute_dims(xp.reshape(x, (B, T, n_head, D // n_head)), (0, 2, 1, 3))


def _merge_heads(xp: Any, x: Array) -> Array:  # (B, NH, T, hs) -> (B, T, D)
    B, NH, T, hs = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (B, T, NH * hs))


def _group(xp: Any, x: Array, n_kv_head: int) -> Array:  # (B, NH, T, n) -> (B, NKV, G*T, n)
    """The G = NH/NKV query heads that share key/value head j (heads j*G .. j*G+G-1, transformers'
    repeat_kv order) stacked along time, so that one matmul per key/value head serves them all."""
    B, NH, T, n = x.shape
    return x if n_kv_head == NH else xp.reshape(x, (B, n_kv_head, (NH // n_kv_head) * T, n))


def _ungroup(xp: Any, x: Array, n_head: int) -> Array:  # (B, NKV, G*T, n) -> (B, NH, T, n)
    B, NKV, GT, n = x.shape
    return x if n_head == NKV else xp.reshape(x, (B, n_head, GT // (n_head // NKV), n))


class AttentionCache(NamedTuple):
    q: Array  # (B, NH, T, hs) the queries, already multiplied by scale
    k: Array  # (B, NKV, Tk, hs): NKV = NH unless keys and values are grouped
    v: Array  # (B, NKV, Tk, hs)
    y: Array  # (B, T, D) the output
    probs: Array  # (B, NH, T, Tk) the attention probabilities, before dropout
    dropout_mask: Array | None  # (B, NH, T, Tk) keep / (1 - p), or None
    scale: float  # 1 / sqrt(hs)


def attention_forward(
    q: Array,
    k: Array,
    v: Array,
    n_head: int,
    dropout_p: float = 0.0,
    coins: Array | None = None,
    n_kv_head: int | None = None,
) -> tuple[Array, AttentionCache]:
    """y = softmax(q k^T / sqrt(hs) + mask) v per head; q (B,T,D), k and v (B,Tk,Dkv) -> y (B,T,D).

    Tk > T when earlier keys and values come from a KV cache; queries are the last T positions.
    With ``dropout_p`` > 0, ``coins`` (B,NH,T,Tk) drop attention probabilities.
    ``n_kv_head`` (default n_head): grouped-query attention (Ainslie et al. 2023): k and v hold
    NKV heads and query head h uses key/value head h // (NH / NKV), computed as grouped matmuls
    (the same as repeating each key/value head NH/NKV times, without the copies).
    """
    xp = namespace(q)
    B, T, D = q.shape
    Tk = k.shape[1]
    hs = D // n_head
    n_kv = n_head if n_kv_head is None else n_kv_head
    if n_kv < 1 or n_head % n_kv or k.shape[2] != n_kv * hs or v.shape[2] != n_kv * hs:
        raise ValueError(
            f"attention with n_head={n_head}, n_kv_head={n_kv_head}: n_kv_head must divide n_head, and k and v "
            f"must be {n_kv} heads of {hs} wide, got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    scale = 1.0 / math.sqrt(hs)
    qh = _split_heads(xp, q * scale, n_head)  # (B, NH, T, hs), scaled here: q is smaller than q k^T
    kh, vh = _split_heads(xp, k, n_kv), _split_heads(xp, v, n_kv)  # (B, NKV, Tk, hs)
    att = _ungroup(xp, xp.matmul(_group(xp, qh, n_kv), xp.matrix_transpose(kh)), n_head)  # (B, NH, T, Tk)
    if T > 1:  # a single query is the last position and sees every key
        att += causal_mask(xp, T, Tk, att.dtype, att.device)
    att -= xp.max(att, axis=-1, keepdims=True)  # softmax over keys, in place (see softmax_forward)
    att = xp.exp(att)
    att /= _sum_last(xp, att)
    mask = None
    att_used = att
    if dropout_p > 0.0:
        att_used, mask = dropout_forward(att, dropout_p, coins)
    yh = _ungroup(xp, xp.matmul(_group(xp, att_used, n_kv), vh), n_head)  # (B, NH, T, hs)
    y = _merge_heads(xp, yh)  # (B, T, D)
    return y, AttentionCache(qh, kh, vh, y, att, mask, scale)


def attention_backward(dout: Array, cache: AttentionCache) -> tuple[Array, Array, Array]:
    """forward: s = (q * scale) k^T + mask;  a = softmax(s);  y = (a * drop) v.
    dv = (a * drop)^T dy;  da = (dy v^T) * drop;  ds = a * (da - sum(da * a));
    dq = ds k * scale;  dk = ds^T (q * scale). Masked entries have a = 0, so they pass no gradient.
    The row sums sum_j da_j a_j = sum_j (dy . v_j) drop_j a_j equal dy . y, a product over hs
    channels instead of Tk keys (as FlashAttention's backward computes them).
    With grouped key/value heads, dk and dv of key/value head j sum over the G query heads that
    share it: the grouped matmuls (B, NKV, G*T, .)^T (B, NKV, G*T, .) do that sum.
    Returns dq (B, T, D), dk and dv (B, Tk, Dkv)."""
    qh, kh, vh, y, att, mask, scale = cache  # qh is already scaled; y is the output (B, T, D)
    xp = namespace(dout)
    B, NH, T, hs = qh.shape
    NKV = kh.shape[1]
    dy = _split_heads(xp, dout, NH)  # (B, NH, T, hs)
    att_used = att if mask is None else att * mask
    dy_g = _group(xp, dy, NKV)  # (B, NKV, G*T, hs)
    dv = xp.matmul(xp.matrix_transpose(_group(xp, att_used, NKV)), dy_g)  # (B, NKV, Tk, hs)
    dpre = _ungroup(xp, xp.matmul(dy_g, xp.matrix_transpose(vh)), NH)  # (B, NH, T, Tk): da
    if mask is not None:
        dpre *= mask
    dy_dot_y = _sum_last(xp, xp.reshape(dout * y, (B, T, NH, hs)))  # (B, T, NH, 1)
    dpre -= xp.permute_dims(dy_dot_y, (0, 2, 1, 3))  # softmax backward, in place
    dpre *= att
    dpre_g = _group(xp, dpre, NKV)  # (B, NKV, G*T, Tk)
    dq = _ungroup(xp, xp.matmul(dpre_g, kh), NH)  # (B, NH, T, hs)
    dq *= scale
    dk = xp.matmul(xp.matrix_transpose(dpre_g), _group(xp, qh, NKV))  # (B, NKV, Tk, hs)
    return _merge_heads(xp, dq), _merge_heads(xp, dk), _merge_heads(xp, dv)


# ----------------------------------------------------------------------------------------------
# activations of the MLP


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class ActivationCache(NamedTuple):
    x: Array  # the input
    s: Array  # what the backward reuses: sigmoid(2u) for GELU (tanh), Phi(x) for GELU (erf)


def gelu_tanh_forward(x: Array) -> tuple[Array, ActivationCache]:
    """out = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3): GPT-2's GELU (Hendrycks & Gimpel 2016).

    Computed as the identical out = x * sigmoid(2u), because exp is cheaper than tanh.
    """
    xp = namespace(x)
    minus_2u = x * x  # -2u = -2c (1 + a x^2) x, built in place
    minus_2u *= -2.0 * _GELU_C * _GELU_A
    minus_2u -= 2.0 * _GELU_C
    minus_2u *= x
    # Capped so that exp stays finite (sigmoid is 0 there anyway; float16 overflows past 11); NumPy
    # takes the minimum with a row of caps about twice as fast as with a scalar.
    cap = xp.full((x.shape[-1],), min(80.0, math.log(float(xp.finfo(x.dtype).max))), dtype=x.dtype, device=x.device)
    s = xp.exp(xp.minimum(minus_2u, cap))
    s += 1.0
    s = 1.0 / s  # sigmoid(2u)
    return x * s, ActivationCache(x, s)


def gelu_tanh_backward(dout: Array, cache: ActivationCache) -> Array:
    """forward: out = x s, s = sigmoid(2u), u = c (x + a x^3), i.e. 0.5 x (1 + tanh u).
    dx = dout * (s + x s (1 - s) 2c (1 + 3a x^2)).
    Past |x| = 16, s (1 - s) < 1e-130 and the second term is nothing, so the polynomial takes x
    capped there: x^3 would overflow float16 (at |x| >= 40) and turn 0 * inf into NaN."""
    x, s = cache
    xp = namespace(x)
    x = xp.clip(x, min=-16.0, max=16.0)
    g = x * x
    g *= 6.0 * _GELU_C * _GELU_A
    g += 2.0 * _GELU_C  # 2 du/dx = 2c (1 + 3a x^2)
    g *= x  # x 2 du/dx
    one_minus_s = 1.0 - s
    one_minus_s *= s
    g *= one_minus_s
    g += s
    g *= dout
    return g


# erfc(z) = t exp(-z^2 + P(u)) for z in [0, 26.5], t = 2 / (2 + z), u an affine map of 4t - 2 onto
# [-1, 1] (the form of Numerical Recipes' erfccheb). P's Chebyshev coefficients were fitted by
# least squares to math.erfc; the relative error is below 2e-13 over the range, beyond which erfc
# underflows in float64. The standard has no erf.
_ERFC_CHEB = (
    -0.6100171641512795,
    0.6046992435245917,
    0.013806059441532148,
    -0.008241647854603623,
    -0.0005358987303490975,
    0.0002871762764558937,
    1.5290826417884454e-05,
    -1.3695068787707311e-05,
    1.27939303662219e-08,
    7.073872472796905e-07,
    -5.811129715364716e-08,
    -3.3721224934211113e-08,
    6.711600875402241e-09,
    1.1776236906039817e-09,
    -5.265762613442423e-10,
    -6.944599569897131e-13,
    3.039663117119618e-11,
    -4.282786661707062e-12,
    -1.0848406279765628e-12,
    4.0901146034150064e-13,
    -7.03940033398677e-15,
    -2.0623591536531626e-14,
    3.946619386496667e-15,
    4.221617263557713e-16,
    -1.1003622866110156e-16,
)
_ERFC_ZMAX = 26.5
_ERFC_LO, _ERFC_HI = 4.0 * 2.0 / (2.0 + _ERFC_ZMAX) - 2.0, 2.0  # 4t - 2 over z in [0, 26.5]


def erfc(x: Array) -> Array:
    """The complementary error function, elementwise, to about 2e-13 relative in float64 (and to
    float32 precision, with half the terms, in float32)."""
    xp = namespace(x)
    z = xp.minimum(xp.abs(x), xp.full_like(x, _ERFC_ZMAX))  # erfc(26.5) already underflows to ~0
    t = 2.0 / (2.0 + z)
    two_u = t * (16.0 / (_ERFC_HI - _ERFC_LO))  # 2u, u = (2 (4t - 2) - (LO + HI)) / (HI - LO)
    two_u -= (8.0 + 2.0 * (_ERFC_LO + _ERFC_HI)) / (_ERFC_HI - _ERFC_LO)
    b1 = xp.zeros_like(x)
    b2 = xp.zeros_like(x)
    n_terms = 12 if xp.finfo(x.dtype).eps > 1e-10 else len(_ERFC_CHEB)  # |c_12| < 1e-8: float32 needs no more
    for c in _ERFC_CHEB[n_terms - 1 : 0 : -1]:  # Clenshaw's recurrence b_k = 2u b_{k+1} - b_{k+2} + c_k, in place
        b0 = two_u * b1
        b0 -= b2
        b0 += c
        b1, b2 = b0, b1
    exponent = two_u * b1
    exponent *= 0.5  # u b1
    exponent -= b2
    exponent += _ERFC_CHEB[0]
    exponent -= z * z
    r = t * xp.exp(exponent)
    return xp.where(x >= 0, r, 2.0 - r)


def gelu_forward(x: Array) -> tuple[Array, ActivationCache]:
    """out = x Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2: the exact GELU."""
    phi_cdf = 0.5 * erfc(x * (-1.0 / math.sqrt(2.0)))
    return x * phi_cdf, ActivationCache(x, phi_cdf)


def gelu_backward(dout: Array, cache: ActivationCache) -> Array:
    """forward: out = x Phi(x).  dx = dout * (Phi(x) + x phi(x)), phi(x) = exp(-x^2/2) / sqrt(2 pi)."""
    x, phi_cdf = cache
    xp = namespace(dout)
    return dout * (phi_cdf + x * xp.exp(-0.5 * (x * x)) * (1.0 / math.sqrt(2.0 * math.pi)))


def relu_forward(x: Array) -> tuple[Array, Any]:
    """out = max(x, 0)."""
    xp = namespace(x)
    keep = x > 0
    return xp.where(keep, x, xp.zeros_like(x)), keep


def relu_backward(dout: Array, keep: Array) -> Array:
    """forward: out = x where x > 0, else 0."""
    xp = namespace(dout)
    return xp.where(keep, dout, xp.zeros_like(dout))


def relu2_forward(x: Array) -> tuple[Array, Any]:
    """out = max(x, 0)^2 (squared ReLU, So et al. 2021)."""
    r, _ = relu_forward(x)
    return r * r, r


def relu2_backward(dout: Array, r: Array) -> Array:
    """forward: out = r^2, r = max(x, 0).  dx = 2 r dout (r = 0 where x <= 0)."""
    return 2.0 * r * dout


ACTIVATIONS = {
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
    "gelu": (gelu_forward, gelu_backward),
    "relu": (relu_forward, relu_backward),
    "relu2": (relu2_forward, relu2_backward),
}


# ----------------------------------------------------------------------------------------------
# SwiGLU: the gated MLP's activation (Shazeer 2020; Llama, Qwen2, SmolLM, Mistral)


class SwiGLUCache(NamedTuple):
    gate: Array  # (..., H) the gate projection's output g
    up: Array  # (..., H) the up projection's output u
    sig: Array  # (..., H) sigmoid(g)


def swiglu_forward(gate: Array, up: Array) -> tuple[Array, SwiGLUCache]:
    """out = silu(g) * u, silu(g) = g * sigmoid(g); (..., H), (..., H) -> (..., H)."""
    xp = namespace(gate)
    cap = xp.full((gate.shape[-1],), 80.0, dtype=gate.dtype, device=gate.device)  # exp stays finite
    sig = xp.exp(xp.minimum(-gate, cap))
    sig += 1.0
    sig = 1.0 / sig  # sigmoid(g)
    out = gate * sig
    out *= up
    return out, SwiGLUCache(gate, up, sig)


def swiglu_backward(dout: Array, cache: SwiGLUCache) -> tuple[Array, Array]:
    """forward: out = silu(g) u, silu(g) = g s, s = sigmoid(g).
    dg = dout u s (1 + g (1 - s))  (silu'(g) = s + g s (1 - s));  du = dout silu(g)."""
    g, u, s = cache
    silu = g * s
    du = dout * silu
    dg = silu - silu * s  # g s (1 - s)
    dg += s
    dg *= u
    dg *= dout
    return dg, du


# ----------------------------------------------------------------------------------------------
# residual connection


def residual_forward(a: Array, b: Array) -> tuple[Array, None]:
    """out = a + b; (B,T,C), (B,T,C) -> (B,T,C)."""
    return a + b, None


def residual_backward(dout: Array, cache: None) -> tuple[Array, Array]:
    """forward: out = a + b. The gradient flows unchanged into both branches."""
    return dout, dout


# ----------------------------------------------------------------------------------------------
# softmax + cross-entropy, fused (the loss on the unembedded logits)


class CrossEntropyCache(NamedTuple):
    probs: Array  # (N, V) softmax(logits)
    targets: Array  # (N,) with ignored rows set to 0
    weights: Array  # (N,) 1, or 0 where the target is ignored
    divisor: Any  # the count of weighted rows (mean) or 1.0 (sum)


def crossentropy_forward(
    logits: Array, targets: Array, ignore_index: int = -1, reduction: str = "mean"
) -> tuple[Array, CrossEntropyCache]:
    """loss = mean (or sum) over rows with target != ignore_index of logsumexp(logits) - logits[target].

    logits (N, V), targets (N,) ints -> a 0-d array. Rows whose target is ``ignore_index`` add
    nothing; if every row is ignored the mean is nan (0/0), as in PyTorch. ``reduction="sum"``
    lets a caller that splits a batch divide by the count of the whole batch.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    xp = namespace(logits)
    m = xp.max(logits, axis=-1, keepdims=True)  # (N, 1)
    e = xp.exp(logits - m)
    s = xp.sum(e, axis=-1, keepdims=True)
    valid = targets != ignore_index
    safe_targets = xp.where(valid, targets, xp.zeros_like(targets))
    picked = xp.take_along_axis(logits, safe_targets[:, None], axis=1)  # (N, 1)
    losses = (xp.log(s) + m - picked)[:, 0]  # (N,)
    weights = xp.astype(valid, logits.dtype)
    divisor = xp.sum(weights) if reduction == "mean" else 1.0
    loss = xp.sum(losses * weights) / divisor
    e /= s  # probabilities, reused by the backward
    return loss, CrossEntropyCache(e, safe_targets, weights, divisor)


def crossentropy_backward(dloss: float, cache: CrossEntropyCache) -> Array:
    """forward: loss = sum_n w_n (logsumexp(logits_n) - logits_n[t_n]) / d, w_n = 1 unless ignored,
    d = sum(w) for the mean and 1 for the sum.
    dlogits_n = (softmax(logits_n) - onehot(t_n)) * w_n * dloss / d  (softmax and loss fused)."""
    probs, targets, weights, divisor = cache
    xp = namespace(probs)
    N, V = probs.shape
    row_scale = weights * (dloss / divisor)  # (N,)
    dlogits = probs * row_scale[:, None]  # (N, V)
    flat = xp.reshape(dlogits, (N * V,))
    rows = xp.arange(N, dtype=targets.dtype, device=targets.device)
    scatter_add(flat, rows * V + targets, -row_scale)
    return xp.reshape(flat, (N, V))
