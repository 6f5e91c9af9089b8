"""Quantized weights as GGUF stores them, and the reference quantized linear layer.

A :class:`QuantizedWeight` keeps a weight matrix (out, in) as llama.cpp's blocks: each row is cut
into blocks of 32 (or 256, the K-quants) values, each block stored as a few bytes of small
integers with one or two float16 scales. The reference is the definition, written once against
the array API so that every backend runs it:

    linear(x, W) = x @ dequantize(W).T + b

``dequantize`` decodes the bytes with integer and float arithmetic only (the standard has no
bit-cast, so float16 scales are rebuilt from their sign, exponent and mantissa bits). The layouts
follow ggml-quants.c; tests/test_quant.py checks each against the ``gguf`` library's dequantizer.
A backend's kernel that works on the blocks directly must equal this reference.

Not here: reading or writing files (``arraygpt.io``) and training (quantized weights are
frozen). Quantizing is the ``gguf`` library's (llama.cpp's own quantizers, on the host).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from arraygpt.xp import Array, namespace

__all__ = [
    "BLOCKS",
    "QuantizedLinearCache",
    "QuantizedStack",
    "QuantizedWeight",
    "concat_rows",
    "dequantize",
    "embedding_rows",
    "is_quantized",
    "quantize",
    "quantized_linear_backward",
    "quantized_linear_forward",
    "quantized_linear_pair_forward",
    "split_rows",
]

# kind -> (values per block, bytes per block), as GGML_QUANT_SIZES
BLOCKS = {
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q4_k": (256, 144),
    "q5_k": (256, 176),
    "q6_k": (256, 210),
}
QUANTIZERS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # the kinds the gguf library quantizes (K-quants: read only)


@dataclass(frozen=True)
class QuantizedWeight:
    """A (out, in) weight kept as GGUF blocks.

    Attributes:
        kind: a key of ``BLOCKS`` (``q8_0``, ``q4_1``, ...).
        blocks: uint8 array (out, in // values_per_block, bytes_per_block), for example a view of
            a memory-mapped file.
        shape: (out, in), the shape of the weight it stands for.
    """

    kind: str
    blocks: Any
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.kind not in BLOCKS:
            raise ValueError(f"unknown quantization {self.kind!r}; supported: {', '.join(BLOCKS)}")
        per_block, nbytes = BLOCKS[self.kind]
        out, n_in = self.shape
        expected = (out, n_in // per_block, nbytes)
        if n_in % per_block or tuple(self.blocks.shape) != expected:
            raise ValueError(
                f"{self.kind} weight of shape {self.shape}: blocks must have shape {expected} "
                f"(in = {n_in} must be a multiple of {per_block}), got {tuple(self.blocks.shape)}"
            )

    @property
    def nbytes(self) -> int:
        out, n_in = self.shape
        per_block, nbytes = BLOCKS[self.kind]
        return out * (n_in // per_block) * nbytes


# ----------------------------------------------------------------------------------------------
# decoding bytes with array-API arithmetic


def _u(xp: Any, b: Array) -> Array:
    """uint8 bytes as int32, so that shifts and sums do not overflow."""
    return xp.astype(b, xp.int32)


def _f16(xp: Any, lo: Array, hi: Array) -> Array:
    """Little-endian float16 bytes -> float32 values (IEEE 754 binary16: sign, 5-bit exponent with
    bias 15, 10-bit mantissa; exponent 0 is subnormal, 31 is inf/nan)."""
    bits = _u(xp, lo) | (_u(xp, hi) << 8)
    sign = 1.0 - 2.0 * xp.astype(bits >> 15, xp.float32)
    exponent = xp.astype((bits >> 10) & 0x1F, xp.float32)
    mantissa = xp.astype(bits & 0x3FF, xp.float32) / 1024.0
    normal = (1.0 + mantissa) * xp.pow(xp.full_like(exponent, 2.0), exponent - 15.0)
    subnormal = mantissa * 2.0**-14
    value = xp.where(exponent == 0, subnormal, normal)
    special = xp.where(mantissa == 0, xp.full_like(value, float("inf")), xp.full_like(value, float("nan")))
    return sign * xp.where(exponent == 31, special, value)


def _i8(xp: Any, b: Array) -> Array:
    """uint8 bytes read as two's-complement int8, as int32."""
    v = _u(xp, b)
    return v - 256 * xp.astype(v >= 128, xp.int32)


def _nibbles(xp: Any, qs: Array) -> Array:
    """(..., n) packed bytes -> (..., 2n): the low nibbles of all bytes, then the high ones."""
    v = _u(xp, qs)
    return xp.concat([v & 0x0F, v >> 4], axis=-1)


def _bits(xp: Any, qh: Array, count: int) -> Array:
    """(..., count // 8) bytes -> (..., count) bits, bit j of the little-endian word first."""
    v = _u(xp, qh)
    return xp.concat([(v[..., j // 8 : j // 8 + 1] >> (j % 8)) & 1 for j in range(count)], axis=-1)


def _scale_min_k4(xp: Any, scales: Array) -> tuple[Array, Array]:
    """The 12 bytes of a Q4_K/Q5_K block -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    s = _u(xp, scales)
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = xp.concat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = xp.concat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return xp.astype(sc, xp.float32), xp.astype(mn, xp.float32)


def _dequantize_blocks(xp: Any, kind: str, b: Array) -> Array:
    """(..., bytes_per_block) uint8 -> (..., values_per_block) float32."""
    if kind == "q8_0":
        return _f16(xp, b[..., 0:1], b[..., 1:2]) * xp.astype(_i8(xp, b[..., 2:]), xp.float32)
    if kind in ("q4_0", "q4_1"):
        d = _f16(xp, b[..., 0:1], b[..., 1:2])
        if kind == "q4_0":
            return d * xp.astype(_nibbles(xp, b[..., 2:]) - 8, xp.float32)
        m = _f16(xp, b[..., 2:3], b[..., 3:4])
        return d * xp.astype(_nibbles(xp, b[..., 4:]), xp.float32) + m
    if kind in ("q5_0", "q5_1"):
        d = _f16(xp, b[..., 0:1], b[..., 1:2])
        start = 2 if kind == "q5_0" else 4
        q = _nibbles(xp, b[..., start + 4 :]) | (_bits(xp, b[..., start : start + 4], 32) << 4)
        if kind == "q5_0":
            return d * xp.astype(q - 16, xp.float32)
        return d * xp.astype(q, xp.float32) + _f16(xp, b[..., 2:3], b[..., 3:4])
    if kind in ("q4_k", "q5_k"):
        # d, dmin (float16), 12 bytes of scales/mins, [32 bytes of high bits,] 128 bytes of nibbles;
        # 8 sub-blocks of 32: value = d * scale * q - dmin * min
        d = _f16(xp, b[..., 0:1], b[..., 1:2])
        dmin = _f16(xp, b[..., 2:3], b[..., 3:4])
        sc, mn = _scale_min_k4(xp, b[..., 4:16])
        qs = b[..., 16:] if kind == "q4_k" else b[..., 48:]
        shape = (*qs.shape[:-1], 4, 32)
        pairs = xp.reshape(_u(xp, qs), shape)  # each 32 bytes hold sub-blocks 2j (low) and 2j+1 (high)
        q = xp.reshape(xp.stack([pairs & 0x0F, pairs >> 4], axis=-2), (*qs.shape[:-1], 8, 32))
        if kind == "q5_k":
            high = _u(xp, b[..., 16:48])  # bit j of byte l is the fifth bit of value l of sub-block j
            q = q | xp.stack([((high >> j) & 1) << 4 for j in range(8)], axis=-2)
        out = (d * sc)[..., None] * xp.astype(q, xp.float32) - (dmin * mn)[..., None]
        return xp.reshape(out, (*b.shape[:-1], 256))
    if kind == "q6_k":
        # 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d (float16)
        ql = xp.reshape(_u(xp, b[..., 0:128]), (*b.shape[:-1], 2, 64))
        qh = xp.reshape(_u(xp, b[..., 128:192]), (*b.shape[:-1], 2, 32))
        low = xp.concat([ql & 0x0F, ql >> 4], axis=-1)  # (..., 2, 128)
        high = xp.concat([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)  # (..., 2, 128)
        q = xp.reshape((low | (high << 4)) - 32, (*b.shape[:-1], 16, 16))
        scales = xp.astype(_i8(xp, b[..., 192:208]), xp.float32)
        d = _f16(xp, b[..., 208:209], b[..., 209:210])
        return xp.reshape((d * scales)[..., None] * xp.astype(q, xp.float32), (*b.shape[:-1], 256))
    raise ValueError(f"unknown quantization {kind!r}; supported: {', '.join(BLOCKS)}")


def dequantize(w: QuantizedWeight) -> Array:
    """The float32 (out, in) matrix that ``w``'s blocks stand for."""
    xp = namespace(w.blocks)
    return xp.reshape(_dequantize_blocks(xp, w.kind, w.blocks), w.shape)


@dataclass(frozen=True)
class QuantizedStack:
    """Quantized weights of different kinds stacked along their output axis (a fused Q/K/V whose
    V is stored in another kind, as llama.cpp's Q4_K_M files do): (sum of outs, in)."""

    parts: tuple[QuantizedWeight, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(w.shape[0] for w in self.parts), self.parts[0].shape[1])

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.parts)


def is_quantized(w: Any) -> bool:
    """Whether ``w`` is a :class:`QuantizedWeight` or a :class:`QuantizedStack`."""
    return isinstance(w, (QuantizedWeight, QuantizedStack))


def quantized_linear_forward(x: Array, w: QuantizedWeight | QuantizedStack, b: Array | None = None) -> Array:
    """forward: out = x @ dequantize(w).T + b; x (..., in) -> (..., out). The reference that every
    quantized kernel must equal; frozen weights, so there is no backward for ``w``. A stack is
    its parts' outputs side by side."""
    xp = namespace(x)
    if isinstance(w, QuantizedStack):
        out = xp.concat([quantized_linear_forward(x, part) for part in w.parts], axis=-1)
    else:
        out = x @ xp.astype(dequantize(w), x.dtype).T
    return out if b is None else out + b


class QuantizedLinearCache(NamedTuple):
    x: Array
    w: QuantizedWeight
    has_bias: bool


TRAINING_MESSAGE = (
    "quantized weights are for inference only: load the model with dtype='float32' (arraygpt.load(path, "
    "dtype='float32')) or dequantize it (model.dequantize()) to train"
)


def quantized_linear_pair_forward(x: Array, w: QuantizedWeight, b: Array | None = None) -> tuple[Array, Any]:
    """The reference as a layer pair's forward (``core.Kernels.quantized_linear``): (out, cache)."""
    return quantized_linear_forward(x, w, b), QuantizedLinearCache(x, w, b is not None)


def quantized_linear_backward(dout: Array, cache: Any) -> tuple[Array, Array, Array | None]:
    """No backward: quantized weights are frozen. Raises RuntimeError saying how to train."""
    raise RuntimeError(TRAINING_MESSAGE)


def embedding_rows(w: QuantizedWeight, ids: Array) -> Array:
    """Rows ``ids`` (N,) of the float32 matrix ``w`` stands for, (N, in): only those rows' blocks
    are decoded (an embedding lookup in a quantized token table)."""
    xp = namespace(w.blocks)
    picked = xp.take(w.blocks, ids, axis=0)  # (N, in // per_block, bytes_per_block)
    return xp.reshape(_dequantize_blocks(xp, w.kind, picked), (ids.shape[0], w.shape[1]))


def concat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight | QuantizedStack:
    """Weights of one input width stacked along their output axis: one weight over their blocks
    stacked (rows are independent) when they share a kind, else a :class:`QuantizedStack`."""
    first = weights[0]
    if any(w.shape[1] != first.shape[1] for w in weights):
        raise ValueError("concat_rows needs weights of one input width")
    if any(w.kind != first.kind for w in weights):
        return QuantizedStack(tuple(weights))
    blocks = _adjacent([w.blocks for w in weights])
    if blocks is None:
        blocks = namespace(first.blocks).concat([w.blocks for w in weights], axis=0)
    return QuantizedWeight(first.kind, blocks, (int(blocks.shape[0]), first.shape[1]))


def _adjacent(parts: list[Any]) -> Any:
    """NumPy blocks that lie one after the other in one buffer (tensors stored back to back in a
    memory-mapped GGUF file) as one view of that buffer, so that stacking them copies nothing;
    None for anything else."""
    import numpy as np

    if not all(type(b) in (np.ndarray, np.memmap) and b.flags.c_contiguous for b in parts):
        return None
    roots = []
    for b in parts:
        while isinstance(b.base, np.ndarray):
            b = b.base
        roots.append(b)
    root = roots[0]
    if any(r is not root for r in roots) or root.ndim != 1 or root.dtype != np.uint8 or not root.flags.c_contiguous:
        return None
    start = parts[0].__array_interface__["data"][0] - root.__array_interface__["data"][0]
    end = start
    for b in parts:
        if b.__array_interface__["data"][0] - root.__array_interface__["data"][0] != end:
            return None
        end += b.nbytes
    return root[start:end].reshape(sum(int(b.shape[0]) for b in parts), *parts[0].shape[1:])


def split_rows(w: QuantizedWeight | QuantizedStack, widths: list[int]) -> list[QuantizedWeight]:
    """The inverse of :func:`concat_rows`: consecutive row ranges of ``widths`` rows, views of
    the blocks (a stack gives back its parts)."""
    if isinstance(w, QuantizedStack):
        return list(w.parts)
    out, start = [], 0
    for width in widths:
        out.append(QuantizedWeight(w.kind, w.blocks[start : start + width, ...], (width, w.shape[1])))
        start += width
    return out


def check_quantizer(kind: str) -> None:
    """ValueError unless ``kind`` is one of :data:`QUANTIZERS`."""
    if kind not in QUANTIZERS:
        read_only = " (it is read from GGUF files, but not made)" if kind in BLOCKS else ""
        raise ValueError(f"cannot quantize as {kind!r}{read_only}; arraygpt quantizes as {', '.join(QUANTIZERS)}")


def quantize(w: Any, kind: str) -> QuantizedWeight:
    """A host (out, in) float weight quantized as ``kind`` by the ``gguf`` library's quantizer
    (the optional dependency ``pip install 'arraygpt[gguf]'``); in must be a multiple of the block size."""
    import numpy as np

    try:
        from gguf import GGMLQuantizationType, quants
    except ImportError as e:
        raise ImportError("quantizing needs the gguf package: pip install 'arraygpt[gguf]'") from e
    check_quantizer(kind)
    w = np.asarray(w, dtype=np.float32)
    per_block, nbytes = BLOCKS[kind]
    if w.ndim != 2 or w.shape[1] % per_block:
        raise ValueError(
            f"{kind} quantizes (out, in) weights whose in is a multiple of {per_block}, got shape {w.shape}"
        )
    blocks = quants.quantize(w, GGMLQuantizationType[kind.upper()])  # (out, in // per_block * nbytes)
    return QuantizedWeight(kind, blocks.reshape(w.shape[0], -1, nbytes), (int(w.shape[0]), int(w.shape[1])))
