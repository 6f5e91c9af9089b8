"""A decode step, each block in one compiled call: ``Kernels.decode``.

Decoding one token runs each block's layers on one row: a dozen kernel calls and the Python
between them, about 0.3 ms a block, which on a 30-layer model is as long as the block's matrix
products (and Python between two products that stream megabytes of weights finds its own data
evicted from the caches). Here the core makes one call for every block, and each block is one
numba call (llm.c's forward is one C function, llama.cpp's a graph), its arguments prepared once
per model:

    h = norm1(x) -> q, k, v = W_qkv h (+ b) -> [rope(q), rope(k)] -> the cache keeps k, v ->
    y = softmax(q K^T / sqrt(hs)) V per head (grouped-query) -> x += W_o y (+ b) ->
    h = norm2(x) -> x += W_down (silu(g) u), g, u = W_gate_up h   (SwiGLU)
                    x += W_fc2 gelu(W_fc1 h + b) + b             (GPT-2's MLP)

Norms: RMSNorm or LayerNorm, with or without gain and bias. Matrices: float32 arrays (a dot per
row) or GGUF blocks of a kind in ``quant.KINDS`` (``quant.rows_times``: the float32 loop, or int8
activations and byte dot products where ``kernels.quantized_linear`` is the int8 kernel) or a
K-quant (``kquant.rows_times_k``, ``rows_times_k_int8``); Q|K|V may be a stack of up to three
kinds (llama.cpp's Q4_K_M keeps V in Q6_K). The rows of each product are split over the model's
threads (``_threads``). float32, batch 1, one token; the core runs any other model layer by
layer (LoRA, dropout, float64). The output equals the layer-by-layer decode (the same products; norms,
softmax and activations in float32, summed in another order): tests/test_decode.py runs both
on Llama, GPT-2 and Qwen2-shaped models, float32 and quantized.

Not here: the layers' definitions (``arraygpt.nn.layers``), the loop over blocks
(``arraygpt.nn.core.gpt_forward``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels import _blocks, _threads, attention, gelu, kquant
from arraygpt.backends.numpy.kernels import quant as kernel
from arraygpt.backends.numpy.kernels._jit import OPTIONS, LazyJit, ParallelJit, jitable, loader
from arraygpt.nn import quant
from arraygpt.nn.kernels import KernelSpec

MIN_ROWS_PER_THREAD = 64  # a block's smallest matrix splits over threads only above this many rows a thread


@jitable(inline=False)
def _norm(x, gain, bias, eps, layer_norm, out):
    # out = norm(x) * gain + bias, as layers.layernorm_forward / rmsnorm_forward; an empty gain or
    # bias is none
    C = x.shape[0]
    mean = np.float32(0.0)
    if layer_norm:
        for j in range(C):
            mean += x[j]
        mean /= np.float32(C)
    s = np.float32(0.0)
    for j in range(C):
        out[j] = x[j] - mean
        s += out[j] * out[j]
    rstd = np.float32(1.0) / np.sqrt(s / np.float32(C) + np.float32(eps))
    for j in range(C):
        out[j] *= rstd
        if gain.shape[0]:
            out[j] *= gain[j]
        if bias.shape[0]:
            out[j] += bias[j]


@jitable(inline=False)
def _project(h, xq, dx, xsum, blocks, dense, layout, lo, hi, out):
    # out[0, lo:hi] = rows lo..hi of W h: W float32 (dense, a dot per row) or GGUF blocks, a
    # K-quant's where layout[0] is 0 (its kind code in layout[1])
    if dense.shape[0]:
        for o in range(lo, hi):
            s = np.float32(0.0)
            for j in range(h.shape[1]):
                s += dense[o, j] * h[0, j]
            out[0, o] = s
    elif layout[0] == 0:
        if layout[4]:
            kquant.rows_times_k_int8(xq, dx, xsum, blocks, layout[1], lo, hi, out)
        else:
            kquant.rows_times_k(h, xsum, blocks, layout[1], lo, hi, out)
    else:
        kernel.rows_times(h, xq, dx, xsum, blocks, layout, lo, hi, out)


@jitable(inline=False)
def _project_parts(h, xq, dx, xsum, w1, d1, l1, w2, d2, l2, w3, d3, l3, lo, hi, out):
    # _project over up to three matrices stacked by rows (Q|K|V whose kinds differ: a part each;
    # an empty part has no rows): rows lo..hi of the stack
    start = 0
    for blocks, dense, layout in ((w1, d1, l1), (w2, d2, l2), (w3, d3, l3)):
        n = max(blocks.shape[0], dense.shape[0])
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            _project(h, xq, dx, xsum, blocks, dense, layout, a - start, b - start, out[:, start : start + n])
        start += n


def _block_source(prange: Any) -> Any:
    quantize_row, attend_row = _blocks.quantize_row, attention.attend_row

    def _decode_block(x, n1, n1b, n2, n2b, eps, layer_norm,
                      qkv_w, qkv_d, qkv_l, qkv_w2, qkv_d2, qkv_l2, qkv_w3, qkv_d3, qkv_l3, qkv_b, o_w, o_d, o_l, o_b,
                      up_w, up_d, up_l, up_b, down_w, down_d, down_l, down_b,
                      cos, sin, keys, values, pos, n_head, n_kv_head, hs, swiglu, parts):  # fmt: skip
        # x (1, C) updated in place. Each matrix: *_w (N, nb * bytes) blocks with layout *_l
        # (quant.rows_times) or *_d (N, K) float32, the other empty; Q|K|V in up to three parts
        # stacked by rows (qkv, qkv2, qkv3: kinds that differ); *_b its bias or empty (up is
        # gate_up for SwiGLU, else fc1); norms n1, n2 and their biases, or empty. cos, sin (hs,) of
        # this position, empty without RoPE; keys, values (capacity, Dkv), row `pos` written. The
        # products' rows (and the heads) in `parts` ranges
        C = x.shape[1]
        zero = np.float32(0.0)
        D, Dkv, half = n_head * hs, n_kv_head * hs, hs // 2
        n_up = max(up_w.shape[0], up_d.shape[0])
        H = n_up // 2 if swiglu else n_up
        widest = max(C, D, H)
        xq = np.empty((1, widest), np.int8)
        dx = np.empty((1, widest // 32 + 1), np.float32)
        xsum = np.empty((1, widest // 32 + 1), np.float32)

        # attention
        h = np.empty((1, C), np.float32)
        _norm(x[0], n1, n1b, eps, layer_norm, h[0])
        if qkv_w.shape[0] or qkv_w2.shape[0] or qkv_w3.shape[0]:  # GGUF blocks read the input's block sums
            quantize_row(h[0], xq[0, :C], dx[0, : C // 32], xsum[0, : C // 32])
        qkv = np.empty((1, D + 2 * Dkv), np.float32)
        n = qkv.shape[1]
        for c in prange(parts):
            _project_parts(h, xq[:, :C], dx[:, : C // 32], xsum[:, : C // 32], qkv_w, qkv_d, qkv_l, qkv_w2, qkv_d2,
                           qkv_l2, qkv_w3, qkv_d3, qkv_l3, c * n // parts, (c + 1) * n // parts, qkv)  # fmt: skip
        if qkv_b.shape[0]:
            qkv[0] += qkv_b
        if cos.shape[0]:  # rope on q's and k's heads: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
            for head in range(n_head + n_kv_head):
                at = head * hs
                for i in range(half):
                    x1, x2 = qkv[0, at + i], qkv[0, at + half + i]
                    qkv[0, at + i] = x1 * cos[i] - x2 * sin[i]
                    qkv[0, at + half + i] = x2 * cos[half + i] + x1 * sin[half + i]
        keys[pos] = qkv[0, D : D + Dkv]
        values[pos] = qkv[0, D + Dkv :]
        y = np.empty((1, D), np.float32)  # softmax(q K^T / sqrt(hs)) V for each query head
        scale = np.float32(1.0 / math.sqrt(hs))
        group = n_head // n_kv_head
        for head in prange(n_head):  # the heads split over the threads too
            q = qkv[0, head * hs : head * hs + hs] * scale
            scores = np.empty(pos + 1, np.float32)
            attend_row(q, keys, values, (head // group) * hs, pos + 1, scores, y[0, head * hs : head * hs + hs], zero)
        if o_w.shape[0]:  # GGUF blocks read the input's block sums (and its int8 blocks)
            quantize_row(y[0], xq[0, :D], dx[0, : D // 32], xsum[0, : D // 32])
        out = np.empty((1, C), np.float32)
        for c in prange(parts):
            _project(y, xq[:, :D], dx[:, : D // 32], xsum[:, : D // 32], o_w, o_d, o_l, c * C // parts,
                     (c + 1) * C // parts, out)  # fmt: skip
        if o_b.shape[0]:
            out[0] += o_b
        x[0] += out[0]

        # MLP
        _norm(x[0], n2, n2b, eps, layer_norm, h[0])
        if up_w.shape[0]:  # GGUF blocks read the input's block sums (and its int8 blocks)
            quantize_row(h[0], xq[0, :C], dx[0, : C // 32], xsum[0, : C // 32])
        up = np.empty((1, n_up), np.float32)
        for c in prange(parts):
            _project(h, xq[:, :C], dx[:, : C // 32], xsum[:, : C // 32], up_w, up_d, up_l, c * n_up // parts,
                     (c + 1) * n_up // parts, up)  # fmt: skip
        if up_b.shape[0]:
            up[0] += up_b
        a = np.empty((1, H), np.float32)
        for j in range(H):
            g = up[0, j]
            if swiglu:  # silu(g) u, as layers.swiglu_forward
                a[0, j] = g / (np.float32(1.0) + np.exp(min(-g, np.float32(80.0)))) * up[0, H + j]
            else:  # gelu_tanh: g sigmoid(2u), u = c (g + a g^3), as layers.gelu_tanh_forward
                minus_2u = (np.float32(-2.0 * gelu.GELU_C * gelu.GELU_A) * g * g - np.float32(2.0 * gelu.GELU_C)) * g
                a[0, j] = g / (np.float32(1.0) + np.exp(min(minus_2u, np.float32(80.0))))
        if down_w.shape[0]:  # GGUF blocks read the input's block sums (and its int8 blocks)
            quantize_row(a[0], xq[0, :H], dx[0, : H // 32], xsum[0, : H // 32])
        for c in prange(parts):
            _project(a, xq[:, :H], dx[:, : H // 32], xsum[:, : H // 32], down_w, down_d, down_l, c * C // parts,
                     (c + 1) * C // parts, out)  # fmt: skip
        if down_b.shape[0]:
            out[0] += down_b
        x[0] += out[0]

    return _decode_block


_decode_block = LazyJit(_block_source(range), OPTIONS)
_decode_block_parallel = ParallelJit(_block_source)

_STACKED = {"attn_wqkv": ("attn_wq", "attn_wk", "attn_wv"), "mlp_gate_up": ("mlp_gate", "mlp_up")}
_NO_BLOCKS = np.zeros((0, 0), np.uint8)
_NO_BLOCKS.flags.writeable = False  # the type of the blocks views (read-only): one compiled kernel
_NO_DENSE = np.zeros((0, 0), np.float32)
_NO_VECTOR = np.zeros(0, np.float32)
_NO_LAYOUT = np.zeros(5, np.int64)


def _matrix(w: Any, int8: bool, rows: int, cols: int) -> tuple[Any, ...] | None:
    """(blocks, dense, layout) of a matrix the kernel takes, else None."""
    if isinstance(w, quant.QuantizedWeight):
        kinds = (*kernel.KINDS, *kquant.KINDS)
        if w.kind not in kinds or type(w.blocks) not in (np.ndarray, np.memmap) or w.shape != (rows, cols):
            return None
        if w.kind in kquant.KINDS:
            return _blocks.blocks_2d(w), _NO_DENSE, _k_layout(w.kind, int8)
        return kernel.blocks_2d(w), _NO_DENSE, kernel.layout(w.kind, int8)
    if type(w) is np.ndarray and w.dtype == np.float32 and w.shape == (rows, cols) and w.flags.c_contiguous:
        return _NO_BLOCKS, w, _NO_LAYOUT
    return None


@functools.cache
def _k_layout(kind: str, int8: bool) -> np.ndarray:
    """_project's layout of a K-quant: 0, its kind code, and whether x goes in as int8 blocks."""
    return np.array([0, kquant.KIND_CODES[kind], 0, 0, int(int8)], dtype=np.int64)


def _parts(w: Any, int8: bool, rows: int, cols: int) -> list[Any] | None:
    """Q|K|V as _project_parts takes it: three (blocks, dense, layout), a stack's parts (kinds
    that differ) or the one matrix and two empty ones; None where the kernel does not take it."""
    parts = list(w.parts) if isinstance(w, quant.QuantizedStack) else [w]
    if len(parts) > 3 or sum(part.shape[0] for part in parts) != rows:
        return None
    matrices = [_matrix(part, int8, part.shape[0], cols) for part in parts]
    if any(m is None for m in matrices):
        return None
    empty = (_NO_BLOCKS, _NO_DENSE, _NO_LAYOUT)
    return [a for m in matrices + [empty] * (3 - len(matrices)) for a in m]


def _vector(v: Any, size: int) -> np.ndarray | None:
    """A float32 (size,) gain or bias, an empty array for none, or None where the kernel cannot take it."""
    if v is None:
        return _NO_VECTOR
    return v if type(v) is np.ndarray and v.dtype == np.float32 and v.shape == (size,) else None


def _layer_args(params: Any, config: Any, i: int, int8: bool) -> tuple[Any, ...] | None:
    """Block i's arguments of _decode_block from its norms to its last matrix: the norms, the
    norm's epsilon and kind, then per matrix (blocks, dense, layout, bias); None where the kernel
    does not take the block."""
    name, C = f"layer{i}.", config.n_embd
    D, Dkv, H = config.attn_dim, config.kv_dim, config.mlp_hidden
    swiglu = config.mlp == "swiglu"
    up, down = ("mlp_gate_up", "mlp_down") if swiglu else ("mlp_fc1", "mlp_fc2")
    shapes = {"attn_wqkv": (D + 2 * Dkv, C), "attn_wo": (C, D), up: (2 * H if swiglu else H, C), down: (C, H)}
    for stacked, parts in _STACKED.items():  # the core stacks these when the caller keeps no buffer
        if name + stacked + "_b" not in params and any(name + part + "_b" in params for part in parts):
            return None
    args = [_vector(params.get(name + n), C) for n in ("norm1", "norm1_b", "norm2", "norm2_b")]
    for short, (rows, cols) in shapes.items():
        w = params.get(name + short)
        matrix = _parts(w, int8, rows, cols) if short == "attn_wqkv" and w is not None else _matrix(w, int8, rows, cols)
        args += [None] if matrix is None else [*matrix, _vector(params.get(name + short + "_b"), rows)]
    if any(a is None for a in args):
        return None
    return (*args[:4], config.norm_eps, config.norm == "layernorm", *args[4:])


_NAMES = ("norm1", "norm1_b", "norm2", "norm2_b", "attn_wqkv", "attn_wqkv_b", "attn_wq_b", "attn_wk_b", "attn_wv_b",
          "attn_wo", "attn_wo_b", "mlp_gate_up", "mlp_gate_up_b", "mlp_gate_b", "mlp_up_b", "mlp_down", "mlp_down_b",
          "mlp_fc1", "mlp_fc1_b", "mlp_fc2", "mlp_fc2_b")  # fmt: skip
_prepared: dict[tuple[Any, ...], tuple[tuple[str, ...], tuple[Any, ...], Any]] = {}


def _model_args(params: Any, config: Any, int8: bool) -> list[tuple[Any, ...]] | None:
    """Every block's _layer_args, or None where the kernel does not take the model; kept for the
    next token while ``params`` holds the same objects (finding them again each token cost more
    than the rest of the step's Python; the check runs in C, map over map)."""
    key = (id(params), int8, config.norm_eps, config.norm)  # the norms' two are in the arguments too
    entry = _prepared.get(key)
    if entry is not None and all(map(operator.is_, map(params.get, entry[0]), entry[1])):
        return entry[2]
    layers = [_layer_args(params, config, i, int8) for i in range(config.n_layer)]
    taken = None if any(a is None for a in layers) else layers
    names = tuple(f"layer{i}.{n}" for i in range(config.n_layer) for n in _NAMES)
    if len(_prepared) >= 4:  # the last few models: a cache, not a registry that keeps weights alive
        _prepared.clear()
    _prepared[key] = (names, tuple(map(params.get, names)), taken)
    return taken


def decode_step_forward(params: Any, config: Any, x: Any, kv_cache: Any, rope: Any, kernels: Any) -> Any:
    """Every block of a decode step: x (1, 1, C) -> (1, 1, C), a compiled call per block, the
    token's keys and values stored in ``kv_cache``; None for a model it does not take (see the
    module's docstring). One call for all blocks was no faster, and its 30-fold arguments made
    numba's code (and its memory) three times larger."""
    C = config.n_embd
    if type(x) is not np.ndarray or x.dtype != np.float32 or x.shape != (1, 1, C):
        return None
    if config.mlp != "swiglu" and config.activation != "gelu_tanh":
        return None
    cos, sin = (_NO_VECTOR, _NO_VECTOR) if rope is None else (rope[0][0], rope[1][0])
    if cos.dtype != np.float32:
        return None
    int8 = kernels.quantized_linear[0] is kernel.quantized_linear_int8_forward
    layers = _model_args(params, config, int8)
    if layers is None:
        return None
    out = np.array(x[0], dtype=np.float32)  # (1, C): the blocks add to their own copy of x
    smallest = min(C, config.attn_dim + 2 * config.kv_dim, config.mlp_hidden)  # the matrices' fewest rows
    parts = _threads.chunks(smallest, MIN_ROWS_PER_THREAD) or 1
    after = (kv_cache.length, config.n_head, config.n_kv_head, config.attn_dim // config.n_head, config.mlp == "swiglu")
    like = x[:, :, : config.kv_dim]
    with _threads.held(parts) if parts > 1 else contextlib.nullcontext():  # once for the step's blocks
        block = (_decode_block_parallel if parts > 1 else _decode_block).dispatcher()
        for i, layer in enumerate(layers):
            keys, values = kv_cache.buffers(i, like)  # (1, capacity, Dkv)
            block(out, *layer, cos, sin, keys[0], values[0], *after, parts)
    return out[None]


def _no_backward(*args: Any) -> Any:
    raise RuntimeError("a decode step has no backward: generation with a KV cache keeps no activations")


SPECS = {
    "numba_decode_step": KernelSpec(
        "decode",
        loader(decode_step_forward, _no_backward),
        backends=("numpy",),
        array_types=(np.ndarray,),
        dtypes=("float32",),
        description="a one-token step, each block in one call (RMSNorm or LayerNorm, RoPE or not, SwiGLU or GELU; "
        "float32 or GGUF blocks): numba, its products' rows split over the model's threads",
    ),
}
