"""GGUF files (llama.cpp's one-file format) in and out: read by a header walk here, tensors
dequantized and written through the ``gguf`` library (``gguf.quants.dequantize``,
``gguf.GGUFWriter``, ``gguf.quants.quantize``, its constants).

A GGUF holds the model's metadata (the config under ``{arch}.*`` keys, the tokenizer under
``tokenizer.*``, the chat template), then its tensors, each stored in a ggml type. Architectures
read and written, with their tensors (ggml lists dimensions fastest first; below, and in arraygpt,
(out, in) as transformers stores them):

    GGUF                              llama / qwen2 (SmolLM, Llama 2/3, Qwen2)    gpt2
    token_embd.weight                 wte (V, C)                                  wte
    position_embd.weight              -                                           wpe
    blk.{i}.attn_norm.weight/.bias    layer{i}.norm1                              norm1 / norm1_b
    blk.{i}.attn_q/k/v.weight/.bias   attn_wq/wk/wv (/_b) (llama: Q, K permuted)  -
    blk.{i}.attn_qkv.weight/.bias     -                                           attn_wq|wk|wv (/_b), split in 3
    blk.{i}.attn_output.weight/.bias  attn_wo (/_b)                               attn_wo / attn_wo_b
    blk.{i}.ffn_norm.weight/.bias     norm2                                       norm2 / norm2_b
    blk.{i}.ffn_gate/up/down          mlp_gate / mlp_up / mlp_down (/_b)          - / mlp_fc1 / mlp_fc2 (/_b)
    output_norm.weight/.bias          normf                                       normf / normf_b
    output.weight                     lm_head (absent: tied to wte)               lm_head (absent: tied to wte)
    rope_freqs.weight                 Llama 3.1's rope scaling (config only)      -

Q and K of ``llama``: llama.cpp's rotary embedding rotates adjacent pairs (x0, x1), transformers'
and arraygpt's rotate halves (x_i, x_{i+hs/2}); llama.cpp's converter (convert_hf_to_gguf.py,
``LlamaModel.permute``) reorders each head's rows so the two agree, and reading undoes it as
transformers' GGUF loader does (modeling_gguf_pytorch_utils.py, ``LlamaTensorProcessor``). Qwen2
uses llama.cpp's NEOX rotation, the halves layout: nothing is permuted.

Tensor types read: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, dequantized
to float32 by ``gguf.quants.dequantize`` (:func:`read_tensor`, the one place a tensor is read; F32
and F16 are converted without the library, which a quantized load then need not import), or,
with ``load_gguf(quantized=True)``, the quantized matrices kept as ``arraygpt.nn.quant``
weights over the memory-mapped file's blocks (inference on the blocks: docs/gguf.md). The model
reads each layer's Q, K, V (and gate, up) as one stack: where the file holds them back to back
the stack is a view of it, else they are copied once into one buffer (llama's Q and K unpermuted
on the way) and the file's pages under them given back (``madvise``), so that the process's
resident memory does not hold those weights twice (on a SmolLM2-135M-shaped file: 10 MB in
q4_1, 17 MB in q8_0).
Types written (``save_gguf(dtype=...)``): f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1 for the matrices (a matrix
whose rows are not whole blocks is written f16, as llama.cpp's converter does), 1-D tensors f32.

Files are untrusted: :func:`read_header` walks the header, decodes the metadata and refuses (one
CheckpointError naming the file, what is wrong and what is allowed) a file that is not regular, a
wrong magic or version, a truncated header, lengths and counts past the file's end or past the
limits below, duplicate keys or tensor names, strings that are not UTF-8, an unknown or
unsupported tensor type, and tensor offsets or sizes that leave the data section or overlap.
The tensors are views of one read-only memory map of the file; their shapes are compared with
the config before any array is allocated.

Why not ``gguf.GGUFReader``: it builds NumPy views for every metadata array element (~1.5 KB and
~10 us each). On a SmolLM2-135M-shaped q4_1 file (49,152 tokens) ``load_gguf(quantized=True)``
peaked at 246 MB and took 2.4 s with it, 151 MB and 0.8 s with the walk, which keeps one Python
object per string and reads each numeric array with one ``np.frombuffer`` (132 MB with the stacking
above, no get_vocab() dicts in the tokenizer and no gguf import; 121 MB with the tokenizer only
checked at load and built on first use: ``benchmarks/memory_stages.py``).

Not here: quantized matrix products (``arraygpt.nn.quant`` and the backends' kernels),
other architectures (Mistral's sliding window, MoE, Gemma, Phi...), RoPE scalings other than
Llama 3.1's, sharded (split) files, and any runtime dependency on transformers or torch.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.config import GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io.checkpoint import Checkpoint, DeferredTokenizer
from arraygpt.io.files import _fsync_dir, _umask, open_regular
from arraygpt.nn.core import GATE_UP, QKV
from arraygpt.nn.model import GPT
from arraygpt.nn.params import param_shapes
from arraygpt.nn.quant import BLOCKS, QUANTIZERS, QuantizedWeight, dequantize
from arraygpt.xp import to_numpy

__all__ = [
    "ARCHITECTURES",
    "READ_TYPES",
    "SAVE_DTYPES",
    "config_from_gguf",
    "load_gguf",
    "read_header",
    "read_tensor",
    "save_gguf",
]

ARCHITECTURES = ("llama", "qwen2", "gpt2")
# ggml type id -> (name, elements per block, bytes per block): gguf.constants.GGML_QUANT_SIZES
READ_TYPES = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    30: ("BF16", 1, 2),
    8: ("Q8_0", 32, 34),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}
SAVE_DTYPES = ("f32", "f16", *QUANTIZERS)
_FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9}  # llama.cpp's llama_ftype
_TYPE_ID = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7}

# Limits of the header walk. Real files stay far below them: Llama 3's vocabulary, token types and
# merges are 0.54 M array elements, Gemma 3's 0.79 M. The walk keeps ~0.1 KB per element (a
# Python str; strings' bytes are in the file anyway), so the budget bounds its cost at ~0.1 GB.
MAX_ARRAY_ELEMENTS = 1 << 20  # summed over every metadata array
MAX_STRING = 16 << 20  # bytes of one metadata string (a chat template is ~10 KB)
MAX_KEY = 65535  # bytes of a key (the GGUF spec's limit)
MAX_NAME = 64  # bytes of a tensor name (GGML_MAX_NAME)
MAX_TENSORS = 1 << 16  # Llama 3 405B has ~1,100
MAX_METADATA = 1 << 16  # key/value entries (llama.cpp's files have ~20-40; big data goes in arrays)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 1 << 48  # of one tensor; the file must hold its bytes anyway
MAX_NESTING = 2  # arrays of arrays
_MAGIC = b"GGUF"
_VERSIONS = (2, 3)
# GGUF value type -> struct format of one value (uint8, int8, ... bool, uint64, int64, float64)
_SCALARS = {t: struct.Struct("<" + c) for t, c in zip((0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12), "BbHhIif?Qqd")}
_FIXED = {t: s.size for t, s in _SCALARS.items()}  # value type -> bytes
_NUMERIC = {t: np.dtype(s.format) for t, s in _SCALARS.items()}  # the same as NumPy dtypes, for arrays
_U64 = struct.Struct("<Q")
_STRING, _ARRAY = 8, 9
_INTS, _FLOATS = (0, 1, 2, 3, 4, 5, 10, 11), (6, 12)
_F32_MAX = float(np.finfo(np.float32).max)


# ----------------------------------------------------------------------------------------------
# the header walk: every length checked, every value decoded


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: fastest first
    ggml_type: int
    offset: int  # from the data section's start
    nbytes: int


@dataclass(frozen=True)
class _Header:
    values: dict[str, Any]  # key -> int, float, bool, str, or a list of them (lists of lists when nested)
    types: dict[str, list[int]]  # key -> GGUF value types, gguf.GGUFReader's ReaderField.types
    tensors: list[_TensorInfo]
    data_start: int  # the data section's offset in the file
    metadata_end: int  # where the metadata ends (the tensor table starts)


class _Walk:
    def __init__(self, buf: Any, size: int, source: str):
        self.buf, self.size, self.source, self.elements = buf, size, source, 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: {what}")

    def need(self, pos: int, n: int, what: str) -> None:
        if n > self.size - pos:
            raise self.fail(
                f"truncated or lying: {what} at byte {pos} needs {n} bytes, but the file ends at {self.size}"
            )

    def unpack(self, fmt: str, pos: int, what: str) -> tuple[Any, int]:
        n = struct.calcsize(fmt)
        self.need(pos, n, what)
        return struct.unpack_from(fmt, self.buf, pos)[0], pos + n

    def string(self, pos: int, limit: int, what: str, key: str | None = None) -> tuple[str, int]:
        """The string at ``pos``; ``key``: a metadata value's key, named when it is not UTF-8."""
        n, pos = self.unpack("<Q", pos, f"the length of {what}")
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes; at most {limit} are allowed")
        self.need(pos, n, what)
        try:
            return str(self.buf[pos : pos + n], "utf-8"), pos + n
        except UnicodeDecodeError as e:
            if key is not None:
                raise self.fail(f"metadata {key!r} holds a string that is not UTF-8 ({e.reason})") from None
            raise self.fail(f"{what} at byte {pos} is not UTF-8") from None

    def strings(self, pos: int, count: int, key: str) -> tuple[list[str], int]:
        """``count`` strings from ``pos``: the vocabulary and merges, so the checks are inline."""
        buf, size, out = self.buf, self.size, []
        for _ in range(count):
            if pos <= size - 8:
                end = pos + 8 + _U64.unpack_from(buf, pos)[0]
                if end - pos - 8 <= MAX_STRING and end <= size:
                    try:
                        out.append(str(buf[pos + 8 : end], "utf-8"))
                        pos = end
                        continue
                    except UnicodeDecodeError:
                        pass
            self.string(pos, MAX_STRING, f"a string of {key!r}", key)  # raises the precise error
        return out, pos

    def value(self, pos: int, vtype: int, key: str, depth: int = 0) -> tuple[Any, list[int], int]:
        """(value, GGUF types, position after it); the types are GGUFReader's: an array's own,
        then its first element's."""
        if vtype in _SCALARS:
            self.need(pos, _FIXED[vtype], f"the value of {key!r}")
            return _SCALARS[vtype].unpack_from(self.buf, pos)[0], [vtype], pos + _FIXED[vtype]
        if vtype == _STRING:
            text, pos = self.string(pos, MAX_STRING, f"the string value of {key!r}", key)
            return text, [vtype], pos
        if vtype != _ARRAY:
            raise self.fail(f"metadata {key!r} has value type {vtype}; GGUF's types are 0 to 12")
        if depth >= MAX_NESTING:
            raise self.fail(f"metadata {key!r} nests arrays deeper than {MAX_NESTING}")
        etype, pos = self.unpack("<I", pos, f"the element type of {key!r}")
        count, pos = self.unpack("<Q", pos, f"the length of {key!r}")
        smallest = _FIXED.get(etype, 8 if etype == _STRING else 12)
        if count > (self.size - pos) // smallest:
            raise self.fail(f"array {key!r} claims {count} elements, more than the rest of the file can hold")
        self.elements += count
        if self.elements > MAX_ARRAY_ELEMENTS:
            raise self.fail(
                f"the metadata arrays hold over {MAX_ARRAY_ELEMENTS} elements (at {key!r}); at most that many"
            )
        if count == 0:
            return [], [vtype], pos
        if etype in _FIXED:
            self.need(pos, count * _FIXED[etype], f"the array {key!r}")
            values = np.frombuffer(self.buf, _NUMERIC[etype], count, pos).tolist()
            return values, [vtype, etype], pos + count * _FIXED[etype]
        if etype == _STRING:
            values, pos = self.strings(pos, count, key)
            return values, [vtype, etype], pos
        values, types = [], [vtype]
        for i in range(count):
            value, inner, pos = self.value(pos, etype, key, depth + 1)
            values.append(value)
            if i == 0:
                types += inner
        return values, types, pos


def _read_metadata(w: _Walk, n_kv: int) -> tuple[dict[str, Any], dict[str, list[int]], int, int]:
    """The ``n_kv`` metadata entries after the 24-byte preamble: (values, GGUF types, alignment,
    position after them)."""
    pos, values, types, alignment = 24, {}, {}, 32  # llama.cpp's default alignment
    for _ in range(n_kv):
        key, pos = w.string(pos, MAX_KEY, "a metadata key")
        if key in values:
            raise w.fail(f"metadata key {key!r} appears twice; each key once is allowed")
        vtype, pos = w.unpack("<I", pos, f"the type of {key!r}")
        if key == "general.architecture":  # refused before the vocabulary is read
            if vtype != _STRING:
                raise w.fail(f"metadata 'general.architecture' must be a string, not GGUF type {vtype}")
            arch = w.string(pos, MAX_KEY, "general.architecture")[0]
            if arch not in ARCHITECTURES:
                raise w.fail(
                    f"general.architecture is {arch!r:.60}; arraygpt reads {', '.join(map(repr, ARCHITECTURES))}"
                )
        if key == "general.alignment":
            value, _ = w.unpack("<I", pos, "general.alignment")
            if vtype != 4 or value == 0 or value & (value - 1):
                raise w.fail(f"general.alignment must be a uint32 power of two, got type {vtype}, value {value}")
            alignment = value
        values[key], types[key], pos = w.value(pos, vtype, key)
    if "general.architecture" not in values:
        raise w.fail("the metadata lacks 'general.architecture'; every GGUF names its architecture")
    return values, types, alignment, pos


def read_header(buf: Any, size: int, source: str) -> _Header:
    """Walk a GGUF header in ``buf`` (``size`` bytes), check every length, count, type, offset and
    size against the file and the limits above, and decode the metadata. Returns the metadata
    (values and GGUF types), where it ends, the tensor table and the data section's offset.

    Raises:
        CheckpointError: what is wrong, where, and what is allowed.
    """
    w = _Walk(buf, size, source)
    w.need(0, 24, "the GGUF header")
    if bytes(buf[:4]) != _MAGIC:
        raise w.fail(f"not a GGUF file: it starts with {bytes(buf[:4])!r}, a GGUF starts with {_MAGIC!r}")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in _VERSIONS:
        raise w.fail(f"GGUF version {version}; versions {' and '.join(map(str, _VERSIONS))} are read")
    if n_tensors > MAX_TENSORS or n_tensors > size // 24:
        raise w.fail(f"claims {n_tensors} tensors; at most {min(MAX_TENSORS, size // 24)} fit the limit and the file")
    if n_kv > MAX_METADATA or n_kv > size // 13:  # before the walk: each entry costs ~0.2 KB of Python objects
        raise w.fail(
            f"claims {n_kv} metadata entries; at most {min(MAX_METADATA, size // 13)} fit the limit and the file"
        )
    values, types, alignment, pos = _read_metadata(w, n_kv)
    metadata_end = pos
    infos, names = [], set()
    for _ in range(n_tensors):
        name, pos = w.string(pos, MAX_NAME, "a tensor name")
        if name in names:
            raise w.fail(f"tensor {name!r} appears twice; each name once is allowed")
        names.add(name)
        n_dims, pos = w.unpack("<I", pos, f"the dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name!r} has {n_dims} dimensions; 1 to {MAX_DIMS} are allowed")
        w.need(pos, 8 * n_dims + 12, f"the shape, type and offset of {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 8 * n_dims)
        pos += 8 * n_dims + 12
        if ggml_type not in READ_TYPES:
            supported = ", ".join(name for name, _, _ in READ_TYPES.values())
            raise w.fail(f"tensor {name!r} has ggml type {_type_name(ggml_type)}; arraygpt reads {supported}")
        type_name, block, block_bytes = READ_TYPES[ggml_type]
        if min(dims) < 1 or math.prod(dims) > MAX_ELEMENTS:
            raise w.fail(
                f"tensor {name!r} has dimensions {list(dims)}: each must be >= 1, at most {MAX_ELEMENTS} in all"
            )
        if dims[0] % block:
            raise w.fail(f"tensor {name!r} ({type_name}) has rows of {dims[0]} values, not whole blocks of {block}")
        infos.append(_TensorInfo(name, tuple(dims), ggml_type, offset, math.prod(dims) // block * block_bytes))
    data_start = -(-pos // alignment) * alignment
    end = data_start
    for info in sorted(infos, key=lambda t: t.offset):
        if info.offset % alignment:
            raise w.fail(
                f"tensor {info.name!r} starts at offset {info.offset}, not a multiple of the alignment {alignment}"
            )
        if info.offset < end - data_start:
            raise w.fail(f"tensor {info.name!r} (offset {info.offset}) overlaps the tensor before it")
        end = data_start + info.offset + info.nbytes
        if end > size:
            raise w.fail(
                f"tensor {info.name!r} claims bytes {data_start + info.offset} to {end}, past the end of the "
                f"file ({size} bytes): truncated, or its offset or size lies"
            )
    return _Header(values, types, infos, data_start, metadata_end)


def _type_name(ggml_type: int) -> str:
    try:
        import gguf

        return f"{gguf.GGMLQuantizationType(ggml_type).name} ({ggml_type})"
    except ImportError:
        return str(ggml_type)
    except ValueError:
        return f"{ggml_type} (not a ggml type)"


# ----------------------------------------------------------------------------------------------
# reading


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF files need the optional 'gguf' library: pip install 'arraygpt[gguf]'") from e
    return gguf


class _Metadata:
    """The file's metadata, key -> Python value, with typed getters that name the key on a mismatch;
    ``raw``: the file's bytes up to the end of the metadata (a view of the memory map)."""

    def __init__(self, values: dict[str, Any], types: dict[str, list[int]], source: str, raw: Any = b""):
        self.values, self.types, self.source, self.raw = values, types, source, raw

    def get(self, key: str, kinds: tuple[int, ...], what: str, default: Any = ...) -> Any:
        if key not in self.values:
            if default is ...:
                raise CheckpointError(f"{self.source}: the metadata lacks {key!r} ({what})")
            return default
        types = self.types[key]
        if len(types) != 1 or types[0] not in kinds:
            raise CheckpointError(f"{self.source}: metadata {key!r} must be {what}, not GGUF type {types}")
        return self.values[key]

    def int(self, key: str, default: Any = ...) -> int:
        return self.get(key, _INTS, "an integer", default)

    def float(self, key: str, default: Any = ...) -> float:
        return self.get(key, _FLOATS, "a float", default)

    def positive(self, key: str, default: Any = ...) -> float:
        """A float hyperparameter (an epsilon, a rope base): > 0 and finite in float32, the dtype
        the model computes in (an inf, or a float64 beyond float32, gives NaN logits only later)."""
        value = self.float(key, default)
        if not 0 < value <= _F32_MAX:
            raise CheckpointError(
                f"{self.source}: metadata {key!r} is {value!r}; a positive float finite in float32 "
                f"(at most {_F32_MAX:.4g}) is allowed"
            )
        return value

    def tokenizer_values(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k.startswith("tokenizer.")}


@dataclass(frozen=True)
class _Tensor:
    name: str
    ggml_type: int
    dims: tuple[int, ...]  # ggml order: fastest first
    data: np.ndarray  # read-only view of the file: F32/F16 (out, in) as their dtype; other types bytes, rows of blocks


def _open(path: Path) -> tuple[_Metadata, list[_Tensor]]:
    """The checked file's metadata and tensors, each a view of one read-only memory map of the file."""
    f, size = open_regular(path, "GGUF file")
    with f:
        if size < 24:
            raise CheckpointError(f"{path}: {size} bytes is too short for a GGUF file (its header alone is 24)")
        mapped = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    header = read_header(memoryview(mapped), len(mapped), str(path))
    tensors = []
    for info in header.tensors:
        start = header.data_start + info.offset
        raw = mapped[start : start + info.nbytes]
        shape = tuple(reversed(info.dims))  # (out, in)
        if info.ggml_type in _FLOAT_DTYPES:
            data = raw.view(_FLOAT_DTYPES[info.ggml_type]).reshape(shape)
        else:  # quantized, BF16: each row its blocks' bytes, as gguf.GGUFReader gives them
            _, block, block_bytes = READ_TYPES[info.ggml_type]
            data = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
        tensors.append(_Tensor(info.name, info.ggml_type, info.dims, data))
    return _Metadata(header.values, header.types, str(path), mapped[: header.metadata_end]), tensors


_FLOAT_DTYPES = {0: np.dtype("<f4"), 1: np.dtype("<f2")}  # ggml F32, F16
_KEEP = {8: "q8_0", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 12: "q4_k", 13: "q5_k", 14: "q6_k"}  # ggml id -> kind


def read_tensor(tensor: _Tensor, *, quantized: bool = False) -> np.ndarray | QuantizedWeight:
    """One tensor of the file, shape (out, in) (ggml's dimensions reversed): float32, dequantized
    by ``gguf.quants.dequantize`` (F32 and F16 converted here: the library is imported only for the
    other types); with ``quantized`` a matrix of a quantized type is a
    :class:`~arraygpt.nn.quant.QuantizedWeight` over a view of the memory-mapped file's blocks
    (read-only, not copied). The one function that reads a tensor."""
    shape = tuple(reversed(tensor.dims))
    if quantized and tensor.ggml_type in _KEEP and len(shape) == 2:
        kind = _KEEP[tensor.ggml_type]
        out, n_in = shape
        per_block, nbytes = BLOCKS[kind]
        return QuantizedWeight(kind, tensor.data.reshape(out, n_in // per_block, nbytes), (out, n_in))
    if tensor.ggml_type in _FLOAT_DTYPES:  # what gguf.quants.dequantize does, without importing it (~2 MB)
        return np.ascontiguousarray(tensor.data.reshape(shape), dtype=np.float32)
    gguf = _import_gguf()
    values = gguf.quants.dequantize(tensor.data, gguf.GGMLQuantizationType(tensor.ggml_type))
    return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)


def _unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's ``LlamaModel.permute``: each head's rows from pair order back to halves
    (of a quantized weight, its rows of blocks: rows are independent)."""
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.kind, np.ascontiguousarray(_unpermute(w.blocks, n_head)), w.shape)
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute_into(out: np.ndarray, w: np.ndarray, n_head: int) -> None:
    """``out[...] = _unpermute(w, n_head)`` without a temporary (out contiguous, w's shape)."""
    half = w.shape[0] // n_head // 2
    out.reshape(n_head, 2, half, *w.shape[1:])[...] = w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter ``LlamaModel.permute``: each head's rows from halves to pair order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_factors(head_dim: int, theta: float, scaling: tuple[float, float, float, int]) -> np.ndarray:
    """llama.cpp's converter (``LlamaModel.generate_extra_tensors``): the divisor of each rotary
    frequency under Llama 3.1's scaling, stored as ``rope_freqs.weight``."""
    factor, low, high, old_len = scaling
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    out = np.where(wavelen < old_len / high, 1.0, np.where(wavelen > old_len / low, factor, 0.0))
    mid = out == 0.0
    out[mid] = 1 / ((1 - smooth[mid]) / factor + smooth[mid])
    return out.astype(np.float32)


def _rope_scaling(factors: np.ndarray, head_dim: int, theta: float, old_len: int, source: str) -> Any:
    """Llama 3.1's (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    that give ``rope_freqs.weight``'s divisors, or None when they are all 1. Only the ratios of the
    last three matter; ``old_len`` fixes the scale (Llama 3.1's 8192 unless the file says).

    Raises:
        CheckpointError: the divisors do not follow Llama 3.1's rule.
    """
    if factors.shape != (head_dim // 2,) or not np.all(np.isfinite(factors)) or factors.min() <= 0:
        raise CheckpointError(f"{source}: rope_freqs.weight must hold {head_dim // 2} positive divisors")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    try:
        with np.errstate(all="ignore"):
            scaling = _fit_llama3(factors.astype(np.float64), head_dim, theta, old_len)
        ok = 0 < scaling[1] < scaling[2] and np.allclose(_llama3_factors(head_dim, theta, scaling), factors, rtol=1e-4)
    except (ValueError, ZeroDivisionError, FloatingPointError, np.linalg.LinAlgError):
        ok = False
    if not ok:
        raise CheckpointError(
            f"{source}: rope_freqs.weight does not follow Llama 3.1's rope scaling, the only one arraygpt implements"
        )
    return scaling


def _fit_llama3(factors: np.ndarray, head_dim: int, theta: float, old_len: int) -> tuple[float, float, float, int]:
    """Llama 3.1 scaling parameters whose divisors are ``factors`` (checked by the caller)."""
    factor = float(factors.max())
    u = old_len * (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)) / (2 * math.pi)  # old_len / wavelength
    ones, full = np.isclose(factors, 1.0, rtol=1e-6), np.isclose(factors, factor, rtol=1e-6)
    mid = ~ones & ~full
    s = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)  # smooth = (u - low) / (high - low)
    if mid.sum() >= 2:
        a, b = np.polyfit(u[mid], s, 1)
        low, high = -b / a, (1 - b) / a
    else:  # the boundaries fall between neighbouring frequencies: any low/high there give the same divisors
        lo = u[full].max() if full.any() else 0.0
        hi = u[ones].min() if ones.any() else 2 * u.max() + 1
        if mid.any():
            u0, s0 = u[mid][0], s[0]  # low < u0 < high with u0 - low = s0 (high - low), lo < low, high < hi
            high = (u0 + min(hi, (u0 - lo * (1 - s0)) / s0)) / 2 if 0 < s0 < 1 else u0
            low = (u0 - s0 * high) / (1 - s0) if s0 < 1 else lo
        else:
            low, high = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
    return (factor, float(low), float(high), int(old_len))


def config_from_gguf(meta: _Metadata, tensors: Mapping[str, Any], source: str) -> tuple[str, GPTConfig]:
    """(architecture, GPTConfig) from a GGUF's metadata and tensor names/shapes (ggml order).

    Raises:
        CheckpointError: an architecture or option arraygpt does not implement, a missing or
            mistyped key, an epsilon or rope base not positive and finite in float32 (the message
            names the key).
    """
    arch = meta.get("general.architecture", (_STRING,), "a string")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{source}: general.architecture is {arch!r:.60}; arraygpt reads {', '.join(map(repr, ARCHITECTURES))}"
        )
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{source}: the file has no token_embd.weight (the token embedding)")
    embd = tensors["token_embd.weight"]
    if len(embd) != 2:
        raise CheckpointError(f"{source}: token_embd.weight must be a matrix, has dimensions {list(embd)}")
    n_embd = meta.int(f"{arch}.embedding_length")
    n_head = meta.int(f"{arch}.attention.head_count")
    vocab_size = meta.int(f"{arch}.vocab_size", embd[1])
    if vocab_size != embd[1]:
        raise CheckpointError(f"{source}: {arch}.vocab_size is {vocab_size}, token_embd.weight has {embd[1]} rows")
    common = dict(
        vocab_size=vocab_size,
        block_size=meta.int(f"{arch}.context_length"),
        n_layer=meta.int(f"{arch}.block_count"),
        n_head=n_head,
        n_embd=n_embd,
        mlp_hidden=meta.int(f"{arch}.feed_forward_length"),
        tie_embeddings="output.weight" not in tensors,
        dropout=0.0,
    )
    try:
        if arch == "gpt2":
            return arch, GPTConfig(
                **common,
                norm="layernorm",
                norm_eps=meta.positive("gpt2.attention.layer_norm_epsilon"),
                bias=True,
                activation="gelu_tanh",
                init_output="scaled",
            )
        head_dim = meta.int(f"{arch}.attention.key_length", n_embd // n_head if n_head else 0)
        if meta.int(f"{arch}.attention.value_length", head_dim) != head_dim:
            raise CheckpointError(f"{source}: {arch}.attention.value_length differs from key_length; arraygpt has one")
        rotary = meta.int(f"{arch}.rope.dimension_count", head_dim)
        if rotary != head_dim:
            raise CheckpointError(
                f"{source}: {arch}.rope.dimension_count {rotary} != head dim {head_dim}; arraygpt rotates whole heads"
            )
        kind = meta.get(f"{arch}.rope.scaling.type", (_STRING,), "a string", "none")
        if kind not in ("none", ""):
            raise CheckpointError(
                f"{source}: {arch}.rope.scaling.type is {kind!r:.40}; "
                "arraygpt implements Llama 3.1's rope scaling (rope_freqs.weight) only"
            )
        if any(n.startswith("blk.") and n.endswith("_exps.weight") for n in tensors):
            raise CheckpointError(f"{source}: a mixture of experts; arraygpt reads dense models only")
        has = lambda suffix: "blk.0." + suffix in tensors  # noqa: E731
        attn_bias, mlp_bias = has("attn_q.bias"), has("ffn_up.bias")
        if arch == "qwen2":
            bias, qkv_bias = False, True
        elif attn_bias != mlp_bias or has("attn_output.bias") != attn_bias:
            raise CheckpointError(
                f"{source}: biases on some linear layers only; arraygpt's llama has them on every linear or none"
            )
        else:
            bias, qkv_bias = attn_bias, False
        theta = float(meta.positive(f"{arch}.rope.freq_base", 10000.0))
        return arch, GPTConfig(
            **common,
            head_dim=head_dim,
            n_kv_head=meta.int(f"{arch}.attention.head_count_kv", n_head),
            norm="rmsnorm",
            norm_eps=meta.positive(f"{arch}.attention.layer_norm_rms_epsilon"),
            norm_emb=False,
            bias=bias,
            qkv_bias=qkv_bias,
            init_output="normal",
            position="rope",
            rope_theta=theta,
            mlp="swiglu",
        )
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{source}: invalid model config: {e}") from None


_LAYER_NAMES = {  # GGUF blk.{i}.<key> -> arraygpt layer{i}.<name>, llama and qwen2
    "attn_norm.weight": "norm1",
    "attn_q.weight": "attn_wq",
    "attn_q.bias": "attn_wq_b",
    "attn_k.weight": "attn_wk",
    "attn_k.bias": "attn_wk_b",
    "attn_v.weight": "attn_wv",
    "attn_v.bias": "attn_wv_b",
    "attn_output.weight": "attn_wo",
    "attn_output.bias": "attn_wo_b",
    "ffn_norm.weight": "norm2",
    "ffn_gate.weight": "mlp_gate",
    "ffn_gate.bias": "mlp_gate_b",
    "ffn_up.weight": "mlp_up",
    "ffn_up.bias": "mlp_up_b",
    "ffn_down.weight": "mlp_down",
    "ffn_down.bias": "mlp_down_b",
}
_GPT2_LAYER_NAMES = {
    "attn_norm.weight": "norm1",
    "attn_norm.bias": "norm1_b",
    "attn_output.weight": "attn_wo",
    "attn_output.bias": "attn_wo_b",
    "ffn_norm.weight": "norm2",
    "ffn_norm.bias": "norm2_b",
    "ffn_up.weight": "mlp_fc1",
    "ffn_up.bias": "mlp_fc1_b",
    "ffn_down.weight": "mlp_fc2",
    "ffn_down.bias": "mlp_fc2_b",
}
_TOP_NAMES = {
    "token_embd.weight": "wte",
    "position_embd.weight": "wpe",
    "output_norm.weight": "normf",
    "output_norm.bias": "normf_b",
    "output.weight": "lm_head",
}


def _gguf_shapes(config: GPTConfig, arch: str) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape (out, in) that ``config`` implies (rope_freqs.weight aside)."""
    shapes = param_shapes(config)
    out = {key: shapes[name] for key, name in _TOP_NAMES.items() if name in shapes}
    names = _GPT2_LAYER_NAMES if arch == "gpt2" else _LAYER_NAMES
    for i in range(config.n_layer):
        out.update(
            {
                f"blk.{i}.{key}": shapes[f"layer{i}.{name}"]
                for key, name in names.items()
                if f"layer{i}.{name}" in shapes
            }
        )
        if arch == "gpt2":
            out[f"blk.{i}.attn_qkv.weight"] = (3 * config.n_embd, config.n_embd)
            out[f"blk.{i}.attn_qkv.bias"] = (3 * config.n_embd,)
    return out


def _state_dict(tensors: list[_Tensor], config: GPTConfig, arch: str, quantized: bool = False) -> dict[str, Any]:
    """arraygpt's state dict from the file's tensors (shapes already checked); ``quantized``:
    quantized matrices as :class:`~arraygpt.nn.quant.QuantizedWeight` (see :func:`read_tensor`),
    each layer's fused rows stacked by :func:`_stack_blocks`."""
    state: dict[str, np.ndarray] = {}
    names = _GPT2_LAYER_NAMES if arch == "gpt2" else _LAYER_NAMES
    C = config.n_embd
    permuted: dict[str, int] = {}  # quantized Q and K of llama, rows still in llama.cpp's order -> heads
    for tensor in tensors:
        key = tensor.name
        if key == "rope_freqs.weight":
            continue
        w = read_tensor(tensor, quantized=quantized and key != "position_embd.weight")
        if key.endswith("attn_qkv.weight") and isinstance(w, QuantizedWeight):
            w = read_tensor(tensor)  # GPT-2's fused Q/K/V: split as floats
        if quantized and isinstance(w, np.ndarray) and not np.may_share_memory(w, tensor.data):
            _release([tensor.data])  # a float copy (F16, or dequantized): the mapped bytes are not read again
        if key in _TOP_NAMES:
            state[_TOP_NAMES[key]] = w
            continue
        _, i, short = key.split(".", 2)
        if short.startswith("attn_qkv."):
            kind = short.rsplit(".", 1)[1]
            for name, part in zip(("attn_wq", "attn_wk", "attn_wv"), (w[:C], w[C : 2 * C], w[2 * C :])):
                state[f"layer{i}.{name}{'_b' if kind == 'bias' else ''}"] = part
            continue
        name = f"layer{i}.{names[short]}"
        if arch == "llama" and short.startswith(("attn_q.", "attn_k.")):
            heads = config.n_head if short.startswith("attn_q.") else config.n_kv_head
            if isinstance(w, QuantizedWeight):
                permuted[name] = heads  # unpermuted as it is stacked
            else:
                w = _unpermute(w, heads)
        state[name] = w
    if quantized:
        _stack_blocks(state, permuted, config.n_layer)
    return state


def _stack_blocks(state: dict[str, Any], permuted: Mapping[str, int], n_layer: int) -> None:
    """Each layer's quantized Q, K, V (and gate, up) made views of one buffer, in place, so that the
    model's fused projections (``arraygpt.nn.params.fuse``) stack them without a copy: left as
    they are where the file holds them back to back (arraygpt writes gate and up so), else copied
    once into a new read-only buffer, llama's Q and K (``permuted``: name -> heads) unpermuted on
    the way. The file's pages a copy came from are then given back (:func:`_release`): they are not
    read again, and while mapped they would count twice in the process's resident memory. Parts
    of different kinds (a Q4_K_M file's V) stay apart, a stack of their own blocks."""
    for i in range(n_layer):
        for group in (QKV, GATE_UP):
            names = [f"layer{i}.{part}" for part in group if f"layer{i}.{part}" in state]
            parts = [state[name] for name in names]
            if not parts or not all(isinstance(w, QuantizedWeight) for w in parts):
                for name in names:  # floats, or a mix that GPT refuses: unpermuted alone
                    if name in permuted:
                        state[name] = _unpermute(state[name], permuted[name])
                continue
            if any(w.kind != parts[0].kind for w in parts):
                for name in names:
                    if name in permuted:
                        old = state[name].blocks
                        state[name] = _unpermute(state[name], permuted[name])
                        _release([old])
                continue
            if not any(name in permuted for name in names) and _back_to_back([w.blocks for w in parts]):
                continue
            buffer = np.empty(sum(w.blocks.nbytes for w in parts), dtype=np.uint8)
            spans, start = [], 0
            for name, w in zip(names, parts):
                out = buffer[start : start + w.blocks.nbytes].reshape(w.blocks.shape)
                if name in permuted:
                    _unpermute_into(out, w.blocks, permuted[name])
                else:
                    out[...] = w.blocks
                spans.append((start, w))
                start += w.blocks.nbytes
            buffer.flags.writeable = False  # as the file's blocks: frozen weights
            for name, (start, w) in zip(names, spans):
                view = buffer[start : start + w.blocks.nbytes].reshape(w.blocks.shape)
                state[name] = QuantizedWeight(w.kind, view, w.shape)
            _release([w.blocks for w in parts])


def _back_to_back(arrays: list[np.ndarray]) -> bool:
    """Whether contiguous arrays lie one after the other in memory (tensors stored in a row)."""
    if not all(a.flags.c_contiguous for a in arrays):
        return False
    starts = [a.__array_interface__["data"][0] for a in arrays]
    return all(starts[j] + arrays[j].nbytes == starts[j + 1] for j in range(len(arrays) - 1))


def _release(views: list[np.ndarray]) -> None:
    """Give back the resident pages under views of the memory-mapped file that were copied and will
    not be read again (``madvise(MADV_DONTNEED)`` on the whole pages inside each view; a read-only
    shared mapping of a file reads them from the file again if they are touched, so this never
    changes what the arrays hold). Views of anything else are skipped, as are systems without
    ``madvise``."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    for view in views:
        root = view
        while isinstance(root.base, np.ndarray):
            root = root.base
        mapping = root.base.obj if isinstance(root.base, memoryview) else root.base  # np.frombuffer's
        if not isinstance(mapping, mmap.mmap):
            continue
        start = view.__array_interface__["data"][0] - root.__array_interface__["data"][0]
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (start + view.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > first:
            try:
                mapping.madvise(mmap.MADV_DONTNEED, first, end - first)
            except (OSError, ValueError):  # an optimization only
                pass


def load_gguf(
    path: str | os.PathLike[str], *, dtype: str = "float32", backend: Any = None, quantized: bool = False
) -> Checkpoint:
    """Read a GGUF file: the model (dequantized, or its quantized matrices kept as blocks), its
    tokenizer and chat template.

    Args:
        path: the .gguf file.
        dtype: "float32" or "float64" for the parameters.
        backend: a backend name or object; default the active one.
        quantized: keep each quantized matrix (q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k)
            as an ``arraygpt.nn.quant.QuantizedWeight`` over the memory-mapped file, for
            inference (``docs/gguf.md``, "Quantized weights"): the model then trains only after
            ``model.dequantize()``. F16/F32 tensors, the norms and GPT-2's fused Q/K/V are
            read as float arrays. Needs the numpy backend (the blocks are a NumPy view).

    Returns:
        A :class:`~arraygpt.io.checkpoint.Checkpoint` with ``format="gguf"``: ``model`` (in eval
        mode), ``tokenizer`` (an ``HFTokenizer`` with the chat template, or None when the file has
        no ``tokenizer.ggml.tokens``), ``extra`` = {"architecture", "file_type", "tensor_types"}.
        The tokenizer's metadata is checked here, the tokenizer built when ``tokenizer`` is first
        read (``arraygpt.io.checkpoint.DeferredTokenizer``).

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: a hostile, truncated or unsupported file (the message says why). Reading
            ``tokenizer`` raises it too for a BOS/EOS token that the tokenizers library cannot put
            in its post-processor template (a space or ':' in it).
        ImportError: the ``gguf`` library is missing and a tensor needs its dequantizer (a type
            other than F32/F16 not kept quantized). Reading ``tokenizer`` raises it when
            ``tokenizers`` is missing.

    Example:
        >>> ckpt = load_gguf("SmolLM2-135M-Instruct-Q8_0.gguf")   # doctest: +SKIP
        >>> ckpt.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', not {dtype!r}")
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    source = str(path)
    meta, tensors = _open(path)
    dims = {t.name: t.dims for t in tensors}
    arch, config = config_from_gguf(meta, dims, source)
    if arch == "llama" and "rope_freqs.weight" in dims:
        factors = read_tensor(next(t for t in tensors if t.name == "rope_freqs.weight"))
        key = "llama.rope.scaling.original_context_length"
        old_len = meta.int(key, 8192)
        if old_len < 1:  # all-equal divisors fit any length: GPTConfig would refuse it with a ValueError
            raise CheckpointError(f"{source}: metadata {key!r} is {old_len}; a length >= 1 is allowed")
        scaling = _rope_scaling(factors.reshape(-1), config.head_dim, config.rope_theta, old_len, source)
        if scaling is not None:
            config = GPTConfig.from_dict({**config.to_dict(), "rope_scaling": scaling})
    layers = {name.split(".")[1] for name in dims if name.startswith("blk.")}
    if len(layers) != config.n_layer:  # before the name table, whose size follows the claim
        raise CheckpointError(
            f"{source}: {arch}.block_count claims {config.n_layer} layers, the file holds tensors of {len(layers)}"
        )
    expected = _gguf_shapes(config, arch)
    present = {name: tuple(reversed(d)) for name, d in dims.items() if name != "rope_freqs.weight"}
    missing = sorted(set(expected) - set(present))
    unexpected = sorted(set(present) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the tensors do not match the metadata ({arch}, {config.n_layer} layers): "
            f"missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    for name, shape in expected.items():
        if present[name] != shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {present[name]} (out, in), the metadata implies {shape}"
            )
    tokenizer = None
    if "tokenizer.ggml.tokens" in meta.values:
        from arraygpt.io.gguf_tokenizer import check_tokenizer_metadata

        check_tokenizer_metadata(meta.tokenizer_values(), source, vocab_size=config.vocab_size)
        # built on first read: a generation from token ids never pays for the tokenizers library
        # and its vocabulary (~13 MB on a 49,152-token one), nor keeps the token strings until then
        tokenizer = DeferredTokenizer(functools.partial(_tokenizer, bytes(meta.raw), source, config.vocab_size))
    if quantized:
        model = GPT(config, dtype=dtype, backend=backend, params=_state_dict(tensors, config, arch, quantized=True))
        if model.quantized and model.backend.name != "numpy":
            raise ValueError(
                f"quantized=True keeps the blocks on the host: use the numpy backend, not {model.backend.name}"
            )
    else:
        model = GPT(config, dtype=dtype, backend=backend, init=False)
        model.load_state_dict(_state_dict(tensors, config, arch))
    extra = {
        "architecture": arch,
        "file_type": meta.values.get("general.file_type"),
        "tensor_types": sorted({READ_TYPES[t.ggml_type][0] for t in tensors}),
    }
    return Checkpoint(
        model=model.eval(), tokenizer=tokenizer, optimizer_state=None, extra=extra, path=path, format="gguf"
    )


def _tokenizer(header: bytes, source: str, vocab_size: int) -> Any:
    """The tokenizer of a file's metadata, from ``header``: a copy of its bytes up to the end of the
    metadata, which :func:`read_header` walked and :func:`load_gguf` checked when loading it."""
    from arraygpt.io.gguf_tokenizer import tokenizer_from_gguf

    values = _read_metadata(_Walk(header, len(header), source), _U64.unpack_from(header, 16)[0])[0]
    meta = {k: v for k, v in values.items() if k.startswith("tokenizer.")}
    return tokenizer_from_gguf(meta, source, vocab_size=vocab_size)


# ----------------------------------------------------------------------------------------------
# writing


def _architecture(config: GPTConfig) -> str:
    """The GGUF architecture that holds ``config``, or ValueError naming the field that fits none."""
    if config.position == "learned":
        gpt2 = dict(norm="layernorm", bias=True, activation="gelu_tanh", mlp="standard", norm_affine=True)
        gpt2.update(norm_emb=False, norm_final=True, qkv_bias=False)
        for field, value in gpt2.items():
            if getattr(config, field) != value:
                raise ValueError(f"a gpt2 GGUF needs GPTConfig.{field}={value!r}, got {getattr(config, field)!r}")
        if config.attn_dim != config.n_embd:
            raise ValueError("a gpt2 GGUF needs n_head * head_dim == n_embd")
        if config.n_kv_head != config.n_head:  # its attn_qkv is (3 n_embd, n_embd)
            raise ValueError(f"a gpt2 GGUF needs n_kv_head == n_head ({config.n_head}), got {config.n_kv_head}")
        return "gpt2"
    llama = dict(norm="rmsnorm", mlp="swiglu", norm_affine=True, norm_emb=False, norm_final=True)
    for field, value in llama.items():
        if getattr(config, field) != value:
            raise ValueError(f"a llama/qwen2 GGUF needs GPTConfig.{field}={value!r}, got {getattr(config, field)!r}")
    if config.qkv_bias and config.rope_scaling is not None:
        raise ValueError("a qwen2 GGUF (q/k/v biases) holds no rope scaling")
    if config.qkv_bias and config.attn_dim != config.n_embd:  # llama.cpp's qwen2 reads attn_q as (n_embd, n_embd)
        raise ValueError("a qwen2 GGUF (q/k/v biases) needs n_head * head_dim == n_embd")
    return "qwen2" if config.qkv_bias else "llama"


def _tensors(state: Mapping[str, np.ndarray], config: GPTConfig, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (out, in), in llama.cpp's order, Q and K permuted for llama."""
    out: dict[str, np.ndarray] = {}
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    for name in ("wte", "wpe"):
        if name in state:
            out[inverse_top[name]] = state[name]
    names = {v: k for k, v in (_GPT2_LAYER_NAMES if arch == "gpt2" else _LAYER_NAMES).items()}
    for i in range(config.n_layer):
        layer = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"layer{i}.")}
        if arch == "gpt2":
            out[f"blk.{i}.attn_norm.weight"] = layer.pop("norm1")
            out[f"blk.{i}.attn_norm.bias"] = layer.pop("norm1_b")
            out[f"blk.{i}.attn_qkv.weight"] = np.concatenate([layer.pop(f"attn_w{x}") for x in "qkv"])
            out[f"blk.{i}.attn_qkv.bias"] = np.concatenate([layer.pop(f"attn_w{x}_b") for x in "qkv"])
        for short, w in layer.items():
            if arch == "llama" and short.startswith(("attn_wq", "attn_wk")):
                w = _permute(w, config.n_head if short.startswith("attn_wq") else config.n_kv_head)
            out[f"blk.{i}.{names[short]}"] = w
    for name in ("normf", "normf_b", "lm_head"):
        if name in state:
            out[inverse_top[name]] = state[name]
    if arch == "llama" and config.rope_scaling is not None:
        out["rope_freqs.weight"] = _llama3_factors(config.head_dim, config.rope_theta, config.rope_scaling)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def save_gguf(
    model: GPT, path: str | os.PathLike[str], *, dtype: str = "f32", tokenizer: Any = None, name: str | None = None
) -> Path:
    """Write ``model`` as a GGUF file that llama.cpp runs and :func:`load_gguf` and transformers'
    GGUF loader read, atomically (a temporary file beside it, then a rename).

    Args:
        model: the GPT: a Llama-style config (RoPE, SwiGLU, RMSNorm; q/k/v biases make it qwen2)
            or GPT-2's.
        path: the .gguf file.
        dtype: "f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0" or "q5_1" for the matrices; 1-D tensors
            stay f32.
        tokenizer: written as ``tokenizer.*`` metadata (see ``arraygpt.io.gguf_tokenizer``),
            with its chat template.
        name: ``general.name`` (default the file's stem).

    Raises:
        ValueError: an unknown dtype, or a config or tokenizer the format cannot hold.
        ImportError: the ``gguf`` library is missing.

    Example:
        >>> save_gguf(model, "names.gguf", dtype="q8_0", tokenizer=tok)  # doctest: +SKIP
    """
    gguf = _import_gguf()
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; arraygpt writes {', '.join(map(repr, SAVE_DTYPES))}")
    config, path = model.config, Path(path)
    arch = _architecture(config)
    meta = {}
    if tokenizer is not None:
        from arraygpt.io.gguf_tokenizer import tokenizer_to_gguf

        meta = tokenizer_to_gguf(tokenizer, config.vocab_size)
    state = {k: dequantize(v) if isinstance(v, QuantizedWeight) else v for k, v in model.state_dict().items()}
    tensors = _tensors({k: to_numpy(v) for k, v in state.items()}, config, arch)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or path.stem)
        writer.add_file_type(_FILE_TYPE[dtype])
        if dtype.startswith("q"):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(config.block_size)
        writer.add_embedding_length(config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_feed_forward_length(config.mlp_hidden)
        writer.add_head_count(config.n_head)
        writer.add_vocab_size(config.vocab_size)
        if arch == "gpt2":
            writer.add_layer_norm_eps(config.norm_eps)
        else:
            writer.add_head_count_kv(config.n_kv_head)
            writer.add_layer_norm_rms_eps(config.norm_eps)
            writer.add_rope_freq_base(config.rope_theta)
            writer.add_rope_dimension_count(config.head_dim)
            writer.add_key_length(config.head_dim)
            writer.add_value_length(config.head_dim)
        _add_tokenizer(writer, meta)
        for key, w in tensors.items():
            data, raw_dtype = _encode(gguf, w, dtype)
            writer.add_tensor(key, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _encode(gguf: Any, w: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw_dtype) for ``GGUFWriter.add_tensor`` (which reads a quantized tensor's shape from
    its bytes): 1-D tensors f32; a matrix in ``dtype``, or f16 when its rows are not whole blocks
    (llama.cpp's converter does the same)."""
    if w.ndim == 1 or dtype == "f32":
        return w, None
    qtype = gguf.GGMLQuantizationType(_TYPE_ID[dtype])
    if dtype == "f16" or w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w, qtype), qtype


def _add_tokenizer(writer: Any, meta: Mapping[str, Any]) -> None:
    """The tokenizer's metadata, ids as uint32 and lists as arrays (of int32, float32 or strings)."""
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
