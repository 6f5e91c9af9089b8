"""A decode step of a Llama-family block in one compiled call: ``Kernels.decode``.

Decoding one token runs each block's layers on one row: a dozen kernel calls and the Python
between them, about 0.3 ms a block, which on a 30-layer model is as long as the block's matrix
products. Here the block is one numba function (llm.c's forward is one C function, llama.cpp's a
graph):

    h = rmsnorm(x) g1 -> q, k, v = W_qkv h -> rope(q), rope(k) -> the cache keeps k, v ->
    y = softmax(q K^T / sqrt(hs)) V per head (grouped-query) -> x += W_o y ->
    h = rmsnorm(x) g2 -> g, u = W_gate_up h -> x += W_down (silu(g) u)

with the matrix products of ``quant.py`` (``rows_times``: the float32 loop, or int8 activations
and byte dot products where ``kernels.quantized_linear`` is the int8 kernel), the rows of each
product split over the model's threads. It takes a block whose four matrices are GGUF blocks of a
kind in ``quant.KINDS`` (one kind per matrix), norms without bias, RoPE, SwiGLU, float32, batch 1,
one token; the core runs any other block layer by layer. The block's output equals the
layer-by-layer decode (the same products; the norms, softmax and SiLU in float32, summed in
another order): tests/test_decode.py runs both on quantized Llama models.

Not here: the layers' definitions (``arraygpt.nn.layers``), the loop over blocks
(``arraygpt.nn.core.gpt_forward``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels import quant as kernel
from arraygpt.backends.numpy.kernels._jit import ParallelJit, jitable, loader, numba
from arraygpt.nn import quant
from arraygpt.nn.kernels import KernelSpec


def _block_source(prange: Any) -> Any:
    rows_times, quantize_row = kernel.rows_times, kernel.quantize_row

    def _decode_block(x, g1, g2, eps, wqkv, lqkv, wo, lo, wgu, lgu, wdown, ldown, cos, sin, keys, values, pos,
                      n_head, n_kv_head, chunks):  # fmt: skip
        # x (1, C) updated in place; w*: (N, nb * bytes) blocks with their layouts l* (rows_times);
        # cos, sin (hs,) of this position; keys, values (capacity, Dkv): row `pos` is written
        C = x.shape[1]
        hs = cos.shape[0]
        D, Dkv, half = n_head * hs, n_kv_head * hs, hs // 2
        acts = np.empty((1, max(C, D, wgu.shape[0] // 2)), np.int8)
        dx = np.empty((1, acts.shape[1] // 32), np.float32)
        xsum = np.empty((1, acts.shape[1] // 32), np.float32)

        # attention: h = rmsnorm(x) g1; q, k, v = W_qkv h
        h = np.empty((1, C), np.float32)
        _rmsnorm(x[0], g1, eps, h[0])
        quantize_row(h[0], acts[0, :C], dx[0, : C // 32], xsum[0, : C // 32])
        qkv = np.empty((1, D + 2 * Dkv), np.float32)
        n = qkv.shape[1]
        for c in prange(chunks):
            rows_times(h, acts[:, :C], dx[:, : C // 32], xsum[:, : C // 32], wqkv, lqkv, c * n // chunks,
                       (c + 1) * n // chunks, qkv)  # fmt: skip
        # rope on q's and k's heads: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves of a head
        for head in range(n_head + n_kv_head):
            at = head * hs
            for i in range(half):
                x1, x2 = qkv[0, at + i], qkv[0, at + half + i]
                qkv[0, at + i] = x1 * cos[i] - x2 * sin[i]
                qkv[0, at + half + i] = x2 * cos[half + i] + x1 * sin[half + i]
        keys[pos] = qkv[0, D : D + Dkv]
        values[pos] = qkv[0, D + Dkv :]
        # y = softmax(q K^T / sqrt(hs)) V for each query head, over positions 0..pos
        y = np.zeros((1, D), np.float32)
        scores = np.empty(pos + 1, np.float32)
        scale = np.float32(1.0 / math.sqrt(hs))
        group = n_head // n_kv_head
        for head in range(n_head):
            q = qkv[0, head * hs : head * hs + hs]
            kv = (head // group) * hs
            top = np.float32(-np.inf)
            for t in range(pos + 1):
                s = np.float32(0.0)
                for j in range(hs):
                    s += q[j] * keys[t, kv + j]
                scores[t] = s * scale
                top = max(top, scores[t])
            norm = np.float32(0.0)
            for t in range(pos + 1):
                scores[t] = np.exp(scores[t] - top)
                norm += scores[t]
            for t in range(pos + 1):
                p = scores[t] / norm
                for j in range(hs):
                    y[0, head * hs + j] += p * values[t, kv + j]
        quantize_row(y[0], acts[0, :D], dx[0, : D // 32], xsum[0, : D // 32])
        out = np.empty((1, C), np.float32)
        for c in prange(chunks):
            rows_times(y, acts[:, :D], dx[:, : D // 32], xsum[:, : D // 32], wo, lo, c * C // chunks,
                       (c + 1) * C // chunks, out)  # fmt: skip
        x[0] += out[0]

        # MLP: h = rmsnorm(x) g2; g, u = W_gate_up h; x += W_down (silu(g) u)
        _rmsnorm(x[0], g2, eps, h[0])
        quantize_row(h[0], acts[0, :C], dx[0, : C // 32], xsum[0, : C // 32])
        gu = np.empty((1, wgu.shape[0]), np.float32)
        n = gu.shape[1]
        for c in prange(chunks):
            rows_times(h, acts[:, :C], dx[:, : C // 32], xsum[:, : C // 32], wgu, lgu, c * n // chunks,
                       (c + 1) * n // chunks, gu)  # fmt: skip
        H = n // 2
        a = np.empty((1, H), np.float32)
        for j in range(H):
            g = gu[0, j]
            a[0, j] = g / (np.float32(1.0) + np.exp(min(-g, np.float32(80.0)))) * gu[0, H + j]
        quantize_row(a[0], acts[0, :H], dx[0, : H // 32], xsum[0, : H // 32])
        for c in prange(chunks):
            rows_times(a, acts[:, :H], dx[:, : H // 32], xsum[:, : H // 32], wdown, ldown, c * C // chunks,
                       (c + 1) * C // chunks, out)  # fmt: skip
        x[0] += out[0]

    return _decode_block


@jitable
def _rmsnorm(x: np.ndarray, g: np.ndarray, eps: float, out: np.ndarray) -> None:
    # out = x / sqrt(mean(x^2) + eps) * g, as layers.rmsnorm_forward
    s = np.float32(0.0)
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    rstd = np.float32(1.0) / np.sqrt(s / np.float32(x.shape[0]) + np.float32(eps))
    for j in range(x.shape[0]):
        out[j] = x[j] * rstd * g[j]


_decode_block = ParallelJit(_block_source)

_MATRICES = ("attn_wqkv", "attn_wo", "mlp_gate_up", "mlp_down")


def _matrix(params: Any, name: str) -> quant.QuantizedWeight | None:
    w = params.get(name)
    ok = isinstance(w, quant.QuantizedWeight) and w.kind in kernel.KINDS and type(w.blocks) in (np.ndarray, np.memmap)
    return w if ok else None


def _float32(a: Any, size: int) -> bool:
    return type(a) is np.ndarray and a.dtype == np.float32 and a.shape == (size,)


def decode_block_forward(params: Any, config: Any, i: int, x: Any, kv_cache: Any, rope: Any, kernels: Any) -> Any:
    """Block ``i`` of a decode step in one call: x (1, 1, C) -> (1, 1, C), the token's key and
    value stored in ``kv_cache``; None for a block it does not take (see the module's docstring)."""
    name, C = f"layer{i}.", config.n_embd
    if not (
        config.norm == "rmsnorm"
        and config.position == "rope"
        and config.mlp == "swiglu"
        and rope is not None
        and type(x) is np.ndarray
        and x.dtype == np.float32
        and x.shape == (1, 1, C)
        and config.head_dim % 2 == 0
        and all(name + m + "_b" not in params for m in _MATRICES)
        and _float32(params.get(name + "norm1"), C)
        and _float32(params.get(name + "norm2"), C)
        and name + "norm1_b" not in params
        and name + "norm2_b" not in params
    ):
        return None
    weights = [_matrix(params, name + m) for m in _MATRICES]
    if any(w is None for w in weights):
        return None
    cos, sin = rope
    if type(cos) is not np.ndarray or cos.dtype != np.float32:
        return None
    keys, values = kv_cache.buffers(i, x[:, :, : config.kv_dim])  # (1, capacity, Dkv)
    threads = min(kernel.model_threads(), numba().config.NUMBA_NUM_THREADS)
    kernel.use_threads(threads)
    int8 = kernels.quantized_linear[0] is kernel.quantized_linear_int8_forward
    smallest = min(w.shape[0] for w in weights)
    chunks = threads if smallest >= 64 * threads else 1
    args = []
    for w in weights:
        args += [kernel.blocks_2d(w), kernel.layout(w.kind, int8)]
    out = np.array(x[0], dtype=np.float32)  # (1, C): the block adds to its own copy of x
    _decode_block(out, params[name + "norm1"], params[name + "norm2"], config.norm_eps, *args, cos[0], sin[0],
                  keys[0], values[0], kv_cache.length, config.n_head, config.n_kv_head, chunks)  # fmt: skip
    return out[None]


def _no_backward(*args: Any) -> Any:
    raise RuntimeError("a decode step has no backward: generation with a KV cache keeps no activations")


SPECS = {
    "numba_decode_block": KernelSpec(
        "decode",
        loader(decode_block_forward, _no_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        dtypes=("float32",),
        description="a Llama-family block on GGUF blocks, one token, in one call (numba, parallel rows)",
    ),
}
