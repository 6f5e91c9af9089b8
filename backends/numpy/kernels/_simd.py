"""Vector code for numba sources, as functions over LLVM vectors: eight-lane integer dot products
for the quantized kernels, sixteen-lane float tiles for attention's.

numba's loops do not become the CPU's byte dot-product instructions (VNNI's ``vpdpbusd``: 32
unsigned-by-signed byte products summed into 8 int32 lanes in one instruction), and those are
what make llama.cpp's matrix-vector products fast. These few functions give a numba source that
vocabulary, one block of 32 values at a time:

- ``dot_nibbles(row, at, xq, xat)``: the 16 bytes at ``row[at:]`` as 32 four-bit values (low
  nibbles first, then high, as GGUF's Q4 blocks store them) dotted with the int8 ``xq[xat:xat+32]``;
- ``dot_fivebits(row, at, xq, xat)``: ``dot_nibbles`` with a fifth bit for each value, bit j of
  the 4 bytes before ``row[at]`` (little-endian) for value j, as GGUF's Q5 blocks store them;
- ``dot_bytes(row, at, xq, xat)``: the 32 int8 weights at ``row[at:]`` dotted with
  ``xq[xat:xat+32]`` (as llama.cpp does: VNNI multiplies unsigned by signed bytes, so |w| by x
  with w's sign; xq must not hold -128);
- for the K-quants, whose 32 values lie in 32 bytes: ``dot_nibble_row(row, at, shift, xq, xat)``
  the nibble at ``shift`` (0 or 4) of each byte of ``row[at:at+32]``; ``dot_fivebit_row(row, at,
  shift, hat, hbit, xq, xat)`` with a fifth bit, bit ``hbit`` of ``row[hat:hat+32]``;
  ``dot_sixbits(row, at, shift, hat, hshift, xq, xat)`` with two more bits, those at ``hshift``,
  minus 32 (Q6_K);
- all return an :data:`I32x8`, lane i = the sum of products 4i..4i+3;
- ``zeros()`` an :data:`F32x8` of zeros, ``fma(acc, v, s)`` = acc + float(v) * s,
  ``fma_halves(acc, v, s0, s1)`` the same with s0 in lanes 0-3 and s1 in 4-7, ``total(acc)``
  the sum of its lanes (float32);
- ``half(row, at)``: the float16 at byte ``at`` of a uint8 row, as float32.

A prompt's loop meets 8 rows of x with each 4 weights at once: the weights' 4 bytes go to every
lane (a memory operand broadcast), each lane holding 4 bytes of another row of x:

- ``bytes32(a, at)``: the 32 bytes at ``a[at:]`` as a :data:`U8x32`, ``store32(v, a, at)``
  stores one; ``nibbles(row, at)``: the 16 bytes at ``row[at:]`` as 32 four-bit values (low
  nibbles first, as ``dot_nibbles``);
- ``int_zeros()``: an :data:`I32x8` of zeros; ``dot_dword(acc, xv, w, wat)`` = acc + lane i's
  4 unsigned bytes of xv dotted with the 4 signed bytes at ``w[wat:]``; ``dot_dword_small`` the
  same where those bytes are 0-63 (the nibble kinds' quants unpacked), which AVX2 sums in its two
  steps;
- ``scale_add(acc, a, b, c, s, at, d)`` = acc + float(a + b - c) * s[at:at+8] * d (a, b
  :data:`I32x8`, c an integer, s a float32 array, d a float32);
- ``splat(s)``: an :data:`F32x8` of s; ``load8(a, at)``: a float32 array's ``a[at:at+8]``;
  ``fmav(acc, a, b)`` = acc + a * b; ``add(a, b)``; ``lane(v, i)``: lane i of an F32x8.

``has_vnni()``, ``has_avx2()`` and ``has_avx512()`` say what the CPU numba compiles for has: the
kernels choose their paths by them (``has_avx512`` also in compiled code, as a constant).

Float32 tiles of products (attention's, ``attention.py``) use sixteen lanes, one AVX-512 register
(two of AVX2's):

- ``zeros16()`` an :data:`F32x16` of zeros; ``load16(a, at)`` a float32 array's ``a[at:at+16]``;
  ``store16(v, a, at)`` stores one; ``splat16(a, at)`` ``a[at]`` in every lane (a broadcast load);
  ``fma16(acc, a, b)`` = acc + a * b; ``add16(a, b)``; ``mul16(v, s)`` = v * the float32 s;
- and for a softmax over them: ``fill16(s)`` s in every lane; ``max16(a, b)``; ``below16(v, n,
  s)`` v with the lanes from n on replaced by s; ``exp16(v)`` (``_vecmath.exp32``'s polynomial in
  every lane); ``hmax16(v)`` and ``hsum16(v)`` the largest lane and the sum of the lanes.

Each is a plain Python function (NumPy arrays stand for the vectors: what tests and ``py_func``
run) and, once numba is imported, an ``overload`` whose intrinsic emits the LLVM vector code: with
``avx512vnni`` or ``avxvnni`` in the CPU's features the ``vpdpbusd`` intrinsic; with AVX2 alone,
for the dot products of weights whose sums of two products fit int16 (all but ``dot_dword``),
``vpmaddubsw`` then ``vpmaddwd`` by ones,
as llama.cpp's AVX2 code (3.3-4.2x faster than the portable IR on a Zen 3); elsewhere the same sums spelled in
portable vector IR (32 int32 products, which LLVM lowers to ``vpmulld`` or a NEON dot product).
The callers check the offsets: nothing here checks bounds.

Not here: the kernels that use them (``quant.py``, ``kquant.py``, ``attention.py``).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from arraygpt.backends.numpy.kernels._jit import when_numba_loads


def dot_nibbles(row: np.ndarray, at: int, xq: np.ndarray, xat: int) -> np.ndarray:
    q = row[at : at + 16]
    u = np.concatenate([q & 15, q >> 4]).astype(np.int32)
    return (u * xq[xat : xat + 32].astype(np.int32)).reshape(8, 4).sum(axis=1, dtype=np.int32)


def dot_fivebits(row: np.ndarray, at: int, xq: np.ndarray, xat: int) -> np.ndarray:
    q, high = row[at : at + 16], int(row[at - 4 : at].view(np.uint32)[0])
    fifth = (high >> np.arange(32, dtype=np.uint32)) & 1
    u = (np.concatenate([q & 15, q >> 4]) | (fifth << 4)).astype(np.int32)
    return (u * xq[xat : xat + 32].astype(np.int32)).reshape(8, 4).sum(axis=1, dtype=np.int32)


def dot_bytes(row: np.ndarray, at: int, xq: np.ndarray, xat: int) -> np.ndarray:
    u = row[at : at + 32].view(np.int8).astype(np.int32)
    return (u * xq[xat : xat + 32].astype(np.int32)).reshape(8, 4).sum(axis=1, dtype=np.int32)


def dot_nibble_row(row: np.ndarray, at: int, shift: int, xq: np.ndarray, xat: int) -> np.ndarray:
    u = ((row[at : at + 32] >> shift) & 15).astype(np.int32)
    return (u * xq[xat : xat + 32].astype(np.int32)).reshape(8, 4).sum(axis=1, dtype=np.int32)


def dot_fivebit_row(row: np.ndarray, at: int, shift: int, hat: int, hbit: int, xq: np.ndarray, xat: int) -> np.ndarray:
    low, high = (row[at : at + 32] >> shift) & 15, (row[hat : hat + 32] >> hbit) & 1
    u = (low | (high << 4)).astype(np.int32)
    return (u * xq[xat : xat + 32].astype(np.int32)).reshape(8, 4).sum(axis=1, dtype=np.int32)


def dot_sixbits(row: np.ndarray, at: int, shift: int, hat: int, hshift: int, xq: np.ndarray, xat: int) -> np.ndarray:
    low, high = (row[at : at + 32] >> shift) & 15, (row[hat : hat + 32] >> hshift) & 3
    u = (low | (high << 4)).astype(np.int32) - 32
    return (u * xq[xat : xat + 32].astype(np.int32)).reshape(8, 4).sum(axis=1, dtype=np.int32)


def zeros() -> np.ndarray:
    return np.zeros(8, np.float32)


def fma(acc: np.ndarray, v: np.ndarray, s: Any) -> np.ndarray:
    return acc + v.astype(np.float32) * np.float32(s)


def fma_halves(acc: np.ndarray, v: np.ndarray, s0: Any, s1: Any) -> np.ndarray:
    return acc + v.astype(np.float32) * np.array([s0] * 4 + [s1] * 4, np.float32)


def total(acc: np.ndarray) -> np.float32:
    return np.float32(acc.sum(dtype=np.float32))


def half(row: np.ndarray, at: int) -> np.float32:
    return np.float32(row[at : at + 2].view(np.float16)[0])


def nibbles(row: np.ndarray, at: int) -> np.ndarray:
    q = row[at : at + 16]
    return np.concatenate([q & 15, q >> 4])


def bytes32(a: np.ndarray, at: int) -> np.ndarray:
    return a.view(np.uint8)[at : at + 32].copy()


def store32(v: np.ndarray, a: np.ndarray, at: int) -> None:
    a.view(np.uint8)[at : at + 32] = v


def int_zeros() -> np.ndarray:
    return np.zeros(8, np.int32)


def dot_dword(acc: np.ndarray, xv: np.ndarray, w: np.ndarray, wat: int) -> np.ndarray:
    four = w.view(np.int8)[wat : wat + 4].astype(np.int32)
    return acc + (xv.astype(np.int32).reshape(8, 4) * four).sum(axis=1, dtype=np.int32)


def dot_dword_small(acc: np.ndarray, xv: np.ndarray, w: np.ndarray, wat: int) -> np.ndarray:
    return dot_dword(acc, xv, w, wat)


def scale_add(acc: np.ndarray, a: np.ndarray, b: np.ndarray, c: Any, s: np.ndarray, at: int, d: Any) -> np.ndarray:
    return acc + (a + b - np.int32(c)).astype(np.float32) * s[at : at + 8] * np.float32(d)


def splat(s: Any) -> np.ndarray:
    return np.full(8, s, np.float32)


def load8(a: np.ndarray, at: int) -> np.ndarray:
    return a[at : at + 8].astype(np.float32)


def fmav(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return acc + a * b


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def lane(v: np.ndarray, i: int) -> np.float32:
    return np.float32(v[i])


def zeros16() -> np.ndarray:
    return np.zeros(16, np.float32)


def load16(a: np.ndarray, at: int) -> np.ndarray:
    return a.reshape(-1)[at : at + 16].astype(np.float32)


def store16(v: np.ndarray, a: np.ndarray, at: int) -> None:
    a.reshape(-1)[at : at + 16] = v


def splat16(a: np.ndarray, at: int) -> np.ndarray:
    return np.full(16, a.reshape(-1)[at], np.float32)


def fma16(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return acc + a * b


def add16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a + b


def mul16(v: np.ndarray, s: Any) -> np.ndarray:
    return v * np.float32(s)


def fill16(s: Any) -> np.ndarray:
    return np.full(16, s, np.float32)


def max16(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(a, b)


def below16(v: np.ndarray, n: int, s: Any) -> np.ndarray:
    return np.where(np.arange(16) < n, v, np.float32(s)).astype(np.float32)


def exp16(v: np.ndarray) -> np.ndarray:
    from arraygpt.backends.numpy.kernels._vecmath import exp32

    return np.array([exp32(np.float32(x)) for x in v], np.float32)


def hmax16(v: np.ndarray) -> np.float32:
    return np.float32(v.max())


def hsum16(v: np.ndarray) -> np.float32:
    return np.float32(v.sum(dtype=np.float32))


def prefetch(row: np.ndarray, at: int) -> None:
    """A hint to bring ``row[at]``'s cache line in for reading (nothing in Python)."""


def has_vnni() -> bool:
    """Whether the CPU numba compiles for has byte dot products (``avx512vnni`` or ``avxvnni``)."""
    return bool(compiled_features() & {"+avx512vnni", "+avxvnni"})


def has_avx2() -> bool:
    """Whether the CPU numba compiles for has AVX2, whose byte products (``vpmaddubsw`` then
    ``vpmaddwd``) the dot products above use where VNNI is missing."""
    return "+avx2" in compiled_features()


def has_avx512() -> bool:
    """Whether the CPU numba compiles for has AVX-512 (``avx512f``): 32 vector registers of 16
    float32 lanes, where AVX2 has 16 of 8. A compiled caller sees a constant, so the branch it
    decides is compiled away."""
    return "+avx512f" in compiled_features()


@functools.cache
def compiled_features() -> frozenset[str]:
    """The CPU features numba compiles for (``+avx2``, ...), read once: numba's ``CPU_FEATURES``
    (``NUMBA_CPU_FEATURES``), else this machine's."""
    from arraygpt.backends.numpy.kernels._jit import numba

    return frozenset(_features(numba()))


def _features(numba: Any) -> list[str]:
    """The CPU features numba compiles for (``+avx2``, ...)."""
    import llvmlite.binding as llvm

    features = numba.config.CPU_FEATURES
    if features is None:  # numba compiles for this machine
        features = llvm.get_host_cpu_features().flatten()
    return features.split(",")


def _register(numba: Any) -> None:
    import llvmlite.binding as llvm_binding
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic, models, overload, register_model

    i8, i16, i32, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
    V8I, V8F, V16B, V32B = ir.VectorType(i32, 8), ir.VectorType(f32, 8), ir.VectorType(i8, 16), ir.VectorType(i8, 32)
    V16F = ir.VectorType(f32, 16)
    features = _features(numba)
    vnni = "+avx512vnni" in features or "+avxvnni" in features
    avx512 = "+avx512f" in features
    avx2 = "+avx2" in features
    triple = llvm_binding.get_process_triple()
    f16c = "+f16c" in features if triple.startswith(("x86_64", "i686")) else triple.startswith(("aarch64", "arm64"))

    def vector_type(name: str, llvm_type: Any) -> Any:
        """A numba type held in registers as ``llvm_type``, one instance."""

        class Vector(types.Type):
            def __init__(self) -> None:
                super().__init__(name=name)

        @register_model(Vector)
        class Model(models.PrimitiveModel):
            def __init__(self, dmm: Any, fe_type: Any) -> None:
                super().__init__(dmm, fe_type, llvm_type)

        return Vector()

    I32x8, F32x8 = vector_type("I32x8", V8I), vector_type("F32x8", V8F)
    U8x32, F32x16 = vector_type("U8x32", V32B), vector_type("F32x16", V16F)

    def pointer(context: Any, builder: Any, array_type: Any, array: Any, at: Any, element: Any) -> Any:
        data = cgutils.create_struct_proxy(array_type)(context, builder, value=array).data
        return builder.bitcast(builder.gep(data, [at]), element.as_pointer())

    def lanes(values: list[int]) -> Any:
        return ir.Constant(ir.VectorType(i32, len(values)), values)

    def splat_ir(builder: Any, s: Any, vector: Any = V8F) -> Any:  # s in every lane of a float vector
        v = builder.insert_element(ir.Constant(vector, ir.Undefined), s, ir.Constant(i32, 0))
        return builder.shuffle_vector(v, v, lanes([0] * vector.count))

    def vector_memory(vector: Any, vector_type: Any, align: int) -> tuple[Any, Any]:
        """load(a, at) and store(v, a, at) of one vector (its LLVM type, its numba type) at element
        ``at`` of an array, as intrinsics."""

        @intrinsic
        def load_ir(typingctx: Any, a: Any, at: Any) -> Any:
            def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
                return builder.load(pointer(context, builder, sig.args[0], args[0], args[1], vector), align=align)

            return vector_type(a, at), codegen

        @intrinsic
        def store_ir(typingctx: Any, v: Any, a: Any, at: Any) -> Any:
            def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
                builder.store(args[0], pointer(context, builder, sig.args[1], args[1], args[2], vector), align=align)
                return context.get_dummy_value()

            return types.none(v, a, at), codegen

        return load_ir, store_ir

    def float_arithmetic(vector: Any, vector_type: Any) -> tuple[Any, Any, Any]:
        """zeros(), fma(acc, a, b) = acc + a b and add(a, b) over one float vector, as intrinsics."""

        @intrinsic
        def zeros_ir(typingctx: Any) -> Any:
            return vector_type(), lambda context, builder, sig, args: ir.Constant(vector, None)

        @intrinsic
        def fma_ir(typingctx: Any, acc: Any, a: Any, b: Any) -> Any:
            def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
                product = builder.fmul(args[1], args[2], flags=("contract",))
                return builder.fadd(args[0], product, flags=("contract",))

            return vector_type(acc, a, b), codegen

        @intrinsic
        def add_ir(typingctx: Any, a: Any, b: Any) -> Any:
            return vector_type(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1])

        return zeros_ir, fma_ir, add_ir

    load8_ir, _ = vector_memory(V8F, F32x8, 4)
    zeros_ir, fmav_ir, add_ir = float_arithmetic(V8F, F32x8)
    load16_ir, store16_ir = vector_memory(V16F, F32x16, 4)
    zeros16_ir, fma16_ir, add16_ir = float_arithmetic(V16F, F32x16)
    bytes32_ir, store32_ir = vector_memory(V32B, U8x32, 1)

    def splat16_of(builder: Any, s: Any) -> Any:
        return splat_ir(builder, s, V16F)

    def dpbusd(builder: Any, unsigned: Any, signed: Any, acc: Any = None, pairs_fit: bool = False) -> Any:
        """8 lanes, lane i = acc[i] + the sum of unsigned[4i+k] * signed[4i+k]. ``pairs_fit``: the
        caller's bytes keep every sum of two adjacent products within int16 (|u s| <= 16383)."""
        acc = ir.Constant(V8I, None) if acc is None else acc
        if vnni:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(V8I, [V8I, V8I, V8I]), "llvm.x86.avx512.vpdpbusd.256"
            )
            return builder.call(fn, [acc, builder.bitcast(unsigned, V8I), builder.bitcast(signed, V8I)])
        if pairs_fit and avx2:  # AVX2's two steps, as llama.cpp's: pairs to int16, then fours to int32
            V16S = ir.VectorType(ir.IntType(16), 16)
            pairs = builder.call(
                cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(V16S, [V32B, V32B]), "llvm.x86.avx2.pmadd.ub.sw"
                ),
                [builder.bitcast(unsigned, V32B), builder.bitcast(signed, V32B)],
            )
            fours = builder.call(
                cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(V8I, [V16S, V16S]), "llvm.x86.avx2.pmadd.wd"
                ),
                [pairs, ir.Constant(V16S, [1] * 16)],
            )
            return builder.add(acc, fours)
        wide = ir.VectorType(i32, 32)
        unsigned, signed = builder.bitcast(unsigned, V32B), builder.bitcast(signed, V32B)
        products = builder.mul(builder.zext(unsigned, wide), builder.sext(signed, wide))
        parts = [builder.shuffle_vector(products, products, lanes([4 * i + k for i in range(8)])) for k in range(4)]
        return builder.add(acc, builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3])))

    def dot_intrinsic(unpack: Any) -> Any:
        @intrinsic
        def dot(typingctx: Any, row: Any, at: Any, xq: Any, xat: Any) -> Any:
            def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
                x = builder.load(pointer(context, builder, sig.args[2], args[2], args[3], V32B), align=1)
                return dpbusd(
                    builder,
                    *unpack(builder, pointer(context, builder, sig.args[0], args[0], args[1], i8), x),
                    pairs_fit=True,  # unsigned at most 128 (|w|) and |x| <= 127: 2 * 128 * 127 < 2^15
                )

            return I32x8(row, at, xq, xat), codegen

        return dot

    def unpack_nibbles(builder: Any, p: Any, x: Any) -> tuple[Any, Any]:
        q = builder.load(builder.bitcast(p, V16B.as_pointer()), align=1)
        low = builder.and_(q, ir.Constant(V16B, [15] * 16))
        high = builder.lshr(q, ir.Constant(V16B, [4] * 16))
        return builder.shuffle_vector(low, high, lanes(list(range(32)))), x

    def signed_bytes(builder: Any, p: Any, x: Any) -> tuple[Any, Any]:
        return signs(builder, builder.load(builder.bitcast(p, V32B.as_pointer()), align=1), x)

    def signs(builder: Any, w: Any, x: Any) -> tuple[Any, Any]:
        if avx2:  # vpsignb: |w| and x with w's sign (0 where w is 0), two instructions
            sign = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(V32B, [V32B, V32B]), "llvm.x86.avx2.psign.b"
            )
            return builder.call(sign, [w, w]), builder.call(sign, [x, w])
        negative = builder.icmp_signed("<", w, ir.Constant(V32B, None))
        magnitude = builder.select(negative, builder.neg(w), w)  # -128 -> 128 as an unsigned byte
        return magnitude, builder.select(negative, builder.neg(x), x)

    def unpack_fivebits(builder: Any, p: Any, x: Any) -> tuple[Any, Any]:
        # bit j of the 4 bytes before p, for value j: byte j // 8 of them in byte j (a shuffle),
        # tested against 1 << j % 8, 16 where set (llama.cpp's bytes_from_bits_32)
        low, _ = unpack_nibbles(builder, p, x)
        high = builder.load(builder.bitcast(builder.gep(p, [ir.Constant(i32, -4)]), i32.as_pointer()), align=1)
        four = builder.bitcast(builder.insert_element(ir.Constant(V8I, ir.Undefined), high, ir.Constant(i32, 0)), V32B)
        spread = builder.shuffle_vector(four, four, lanes([j // 8 for j in range(32)]))
        bit = builder.and_(spread, ir.Constant(V32B, [1 << (j % 8) for j in range(32)]))
        fifth = builder.select(
            builder.icmp_unsigned("!=", bit, ir.Constant(V32B, None)),
            ir.Constant(V32B, [16] * 32),
            ir.Constant(V32B, None),
        )
        return builder.or_(low, fifth), x

    dot_nibbles_ir, dot_bytes_ir = dot_intrinsic(unpack_nibbles), dot_intrinsic(signed_bytes)
    dot_fivebits_ir = dot_intrinsic(unpack_fivebits)

    def splat_byte(builder: Any, n: Any) -> Any:  # an integer in every byte of a V32B
        b = builder.trunc(n, i8) if n.type != i8 else n
        b = builder.insert_element(ir.Constant(V32B, ir.Undefined), b, ir.Constant(i32, 0))
        return builder.shuffle_vector(b, b, lanes([0] * 32))

    def nibble_row(builder: Any, p: Any, shift: Any) -> Any:  # (32 bytes at p >> shift) & 15
        q = builder.load(builder.bitcast(p, V32B.as_pointer()), align=1)
        return builder.and_(builder.lshr(q, splat_byte(builder, shift)), ir.Constant(V32B, [15] * 32))

    @intrinsic
    def dot_nibble_row_ir(typingctx: Any, row: Any, at: Any, shift: Any, xq: Any, xat: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            x = builder.load(pointer(context, builder, sig.args[3], args[3], args[4], V32B), align=1)
            w = nibble_row(builder, pointer(context, builder, sig.args[0], args[0], args[1], i8), args[2])
            return dpbusd(builder, w, x, pairs_fit=True)  # 15 * 127 * 2 < 2^15

        return I32x8(row, at, shift, xq, xat), codegen

    def high_bits_intrinsic(mask: int, offset: int) -> Any:
        """dot(row, at, shift, hat, hshift, xq, xat): 32 values ((row[at + l] >> shift) & 15) |
        (((row[hat + l] >> hshift) & mask) << 4), minus ``offset``, dotted with xq[xat:xat + 32]."""

        @intrinsic
        def dot(typingctx: Any, row: Any, at: Any, shift: Any, hat: Any, hshift: Any, xq: Any, xat: Any) -> Any:
            def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
                x = builder.load(pointer(context, builder, sig.args[5], args[5], args[6], V32B), align=1)
                low = nibble_row(builder, pointer(context, builder, sig.args[0], args[0], args[1], i8), args[2])
                h = builder.load(pointer(context, builder, sig.args[0], args[0], args[3], V32B), align=1)
                high = builder.and_(builder.lshr(h, splat_byte(builder, args[4])), ir.Constant(V32B, [mask] * 32))
                u = builder.or_(low, builder.shl(high, ir.Constant(V32B, [4] * 32)))
                if not offset:  # 0..31: 31 * 127 * 2 < 2^15
                    return dpbusd(builder, u, x, pairs_fit=True)
                w = builder.sub(u, ir.Constant(V32B, [offset] * 32))  # Q6_K's -32..31: 32 * 127 * 2 < 2^15
                return dpbusd(builder, *signs(builder, w, x), pairs_fit=True)

            return I32x8(row, at, shift, hat, hshift, xq, xat), codegen

        return dot

    dot_fivebit_row_ir, dot_sixbits_ir = high_bits_intrinsic(1, 0), high_bits_intrinsic(3, 32)

    @intrinsic
    def nibbles_ir(typingctx: Any, row: Any, at: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return unpack_nibbles(builder, pointer(context, builder, sig.args[0], args[0], args[1], i8), None)[0]

        return U8x32(row, at), codegen

    @intrinsic
    def int_zeros_ir(typingctx: Any) -> Any:
        return I32x8(), lambda context, builder, sig, args: ir.Constant(V8I, None)

    def dword_intrinsic(pairs_fit: bool) -> Any:
        @intrinsic
        def dot_dword(typingctx: Any, acc: Any, xv: Any, w: Any, wat: Any) -> Any:
            def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
                four = builder.load(pointer(context, builder, sig.args[2], args[2], args[3], i32), align=1)
                four = builder.insert_element(ir.Constant(V8I, ir.Undefined), four, ir.Constant(i32, 0))
                four = builder.shuffle_vector(four, four, lanes([0] * 8))  # a broadcast load
                return dpbusd(builder, args[1], four, args[0], pairs_fit=pairs_fit)

            return I32x8(acc, xv, w, wat), codegen

        return dot_dword

    # x's unsigned bytes (<= 255) by Q8_0's full-range weights overflow int16 in pairs; by 0-63, 2 * 255 * 63 do not
    dot_dword_ir, dot_dword_small_ir = dword_intrinsic(False), dword_intrinsic(True)

    @intrinsic
    def splat_intrinsic(typingctx: Any, s: Any) -> Any:
        return F32x8(types.float32), lambda context, builder, sig, args: splat_ir(builder, args[0])

    @intrinsic
    def scale_add_ir(typingctx: Any, acc: Any, a: Any, b: Any, c: Any, s: Any, at: Any, d: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            c8 = builder.insert_element(ir.Constant(V8I, ir.Undefined), args[3], ir.Constant(i32, 0))
            c8 = builder.shuffle_vector(c8, c8, lanes([0] * 8))
            summed = builder.sitofp(builder.sub(builder.add(args[1], args[2]), c8), V8F)
            scales = builder.load(pointer(context, builder, sig.args[4], args[4], args[5], V8F), align=4)
            scaled = builder.fmul(builder.fmul(summed, scales), splat_ir(builder, args[6]), flags=("contract",))
            return builder.fadd(args[0], scaled, flags=("contract",))

        return F32x8(acc, a, b, types.int32, s, at, types.float32), codegen

    @intrinsic
    def lane_ir(typingctx: Any, v: Any, i: Any) -> Any:
        return types.float32(v, i), lambda context, builder, sig, args: builder.extract_element(args[0], args[1])

    @intrinsic
    def fma_ir(typingctx: Any, acc: Any, v: Any, s: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            product = builder.fmul(builder.sitofp(args[1], V8F), splat_ir(builder, args[2]), flags=("contract",))
            return builder.fadd(args[0], product, flags=("contract",))

        return F32x8(acc, v, types.float32), codegen

    @intrinsic
    def fma_halves_ir(typingctx: Any, acc: Any, v: Any, s0: Any, s1: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            a, b = splat_ir(builder, args[2]), splat_ir(builder, args[3])
            scales = builder.shuffle_vector(a, b, lanes([0, 0, 0, 0, 8, 8, 8, 8]))  # s0 in lanes 0-3, s1 in 4-7
            product = builder.fmul(builder.sitofp(args[1], V8F), scales, flags=("contract",))
            return builder.fadd(args[0], product, flags=("contract",))

        return F32x8(acc, v, types.float32, types.float32), codegen

    @intrinsic
    def total_ir(typingctx: Any, acc: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            v = args[0]
            while v.type.count > 1:  # pairwise halves: 8 -> 4 -> 2 -> 1
                n = v.type.count // 2
                v = builder.fadd(
                    builder.shuffle_vector(v, v, lanes(list(range(n)))),
                    builder.shuffle_vector(v, v, lanes(list(range(n, 2 * n)))),
                )
            return builder.extract_element(v, ir.Constant(i32, 0))

        return types.float32(acc), codegen

    @intrinsic
    def half_ir(typingctx: Any, row: Any, at: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            if f16c:  # a conversion instruction (x86's F16C, ARM's fcvt)
                h = builder.load(pointer(context, builder, sig.args[0], args[0], args[1], ir.HalfType()), align=1)
                return builder.fpext(h, f32)
            # else by its bits (LLVM would call a runtime function that numba does not link)
            h = builder.zext(builder.load(pointer(context, builder, sig.args[0], args[0], args[1], i16), align=1), i32)
            sign = builder.shl(builder.and_(h, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
            exponent = builder.and_(builder.lshr(h, ir.Constant(i32, 10)), ir.Constant(i32, 31))
            mantissa = builder.and_(h, ir.Constant(i32, 0x3FF))
            normal = builder.or_(
                builder.shl(builder.add(exponent, ir.Constant(i32, 112)), ir.Constant(i32, 23)),
                builder.shl(mantissa, ir.Constant(i32, 13)),
            )
            special = builder.or_(ir.Constant(i32, 0x7F800000), builder.shl(mantissa, ir.Constant(i32, 13)))
            bits = builder.select(builder.icmp_unsigned("==", exponent, ir.Constant(i32, 31)), special, normal)
            value = builder.bitcast(builder.or_(sign, bits), f32)
            tiny = builder.fmul(builder.uitofp(mantissa, f32), ir.Constant(f32, 2.0**-24))  # subnormal: m 2^-24
            tiny = builder.select(builder.icmp_unsigned("!=", sign, ir.Constant(i32, 0)), builder.fneg(tiny), tiny)
            return builder.select(builder.icmp_unsigned("==", exponent, ir.Constant(i32, 0)), tiny, value)

        return types.float32(row, at), codegen

    @intrinsic
    def splat16_ir(typingctx: Any, a: Any, at: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            s = builder.load(pointer(context, builder, sig.args[0], args[0], args[1], f32), align=4)
            return splat16_of(builder, s)  # one broadcast load (vbroadcastss, or an FMA's memory operand)

        return F32x16(a, at), codegen

    @intrinsic
    def mul16_ir(typingctx: Any, v: Any, s: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            return builder.fmul(args[0], splat16_of(builder, args[1]))

        return F32x16(v, types.float32), codegen

    @intrinsic
    def fill16_ir(typingctx: Any, s: Any) -> Any:
        return F32x16(types.float32), lambda context, builder, sig, args: splat16_of(builder, args[0])

    def vector_call(builder: Any, name: str, *args: Any) -> Any:  # an LLVM intrinsic over F32x16 operands
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16F, [V16F] * len(args)), name)
        return builder.call(fn, list(args))

    @intrinsic
    def max16_ir(typingctx: Any, a: Any, b: Any) -> Any:
        return F32x16(a, b), lambda context, builder, sig, args: vector_call(builder, "llvm.maxnum.v16f32", *args)

    @intrinsic
    def below16_ir(typingctx: Any, v: Any, n: Any, s: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            n16 = builder.insert_element(
                ir.Constant(ir.VectorType(i32, 16), ir.Undefined), builder.trunc(args[1], i32), ir.Constant(i32, 0)
            )
            n16 = builder.shuffle_vector(n16, n16, lanes([0] * 16))
            keep = builder.icmp_signed("<", lanes(list(range(16))), n16)
            return builder.select(keep, args[0], splat16_of(builder, args[2]))

        return F32x16(v, types.int64, types.float32), codegen

    @intrinsic
    def exp16_ir(typingctx: Any, v: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            # _vecmath.exp32 in every lane: x = k ln2 + r, exp(r) by its polynomial, 2^k from its bits
            def c(value: float) -> Any:
                return ir.Constant(V16F, [value] * 16)

            x = vector_call(
                builder, "llvm.minnum.v16f32", vector_call(builder, "llvm.maxnum.v16f32", args[0], c(-87.0)), c(88.0)
            )
            k = vector_call(builder, "llvm.floor.v16f32", builder.fadd(builder.fmul(x, c(1.44269504088896341)), c(0.5)))
            r = builder.fsub(builder.fsub(x, builder.fmul(k, c(0.693359375))), builder.fmul(k, c(-2.12194440e-4)))
            p = c(1.9875691500e-4)
            for coefficient in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
                p = builder.fadd(builder.fmul(p, r, flags=("contract",)), c(coefficient), flags=("contract",))
            V16I = ir.VectorType(i32, 16)
            two_k = builder.bitcast(
                builder.shl(
                    builder.add(builder.fptosi(k, V16I), ir.Constant(V16I, [127] * 16)), ir.Constant(V16I, [23] * 16)
                ),
                V16F,
            )
            e = builder.fadd(builder.fadd(builder.fmul(builder.fmul(p, r), r), r), c(1.0))
            return builder.fmul(e, two_k)

        return F32x16(v), codegen

    def halves(builder: Any, v: Any, combine: Any) -> Any:  # lanes combined pairwise: 16 -> 8 -> ... -> 1
        while v.type.count > 1:
            n = v.type.count // 2
            v = combine(
                builder.shuffle_vector(v, v, lanes(list(range(n)))),
                builder.shuffle_vector(v, v, lanes(list(range(n, 2 * n)))),
            )
        return builder.extract_element(v, ir.Constant(i32, 0))

    @intrinsic
    def hmax16_ir(typingctx: Any, v: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            def larger(a: Any, b: Any) -> Any:
                fn = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(a.type, [a.type, a.type]), f"llvm.maxnum.v{a.type.count}f32"
                )
                return builder.call(fn, [a, b])

            return halves(builder, args[0], larger)

        return types.float32(v), codegen

    @intrinsic
    def hsum16_ir(typingctx: Any, v: Any) -> Any:
        return types.float32(v), lambda context, builder, sig, args: halves(builder, args[0], builder.fadd)

    @intrinsic
    def prefetch_ir(typingctx: Any, row: Any, at: Any) -> Any:
        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [i8.as_pointer(), i32, i32, i32]), "llvm.prefetch.p0"
            )
            p = builder.bitcast(pointer(context, builder, sig.args[0], args[0], args[1], i8), i8.as_pointer())
            builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, keep, data
            return context.get_dummy_value()

        return types.none(row, at), codegen

    # the Python functions above, compiled: each calls its intrinsic
    overload(dot_nibbles)(lambda row, at, xq, xat: lambda row, at, xq, xat: dot_nibbles_ir(row, at, xq, xat))
    overload(dot_bytes)(lambda row, at, xq, xat: lambda row, at, xq, xat: dot_bytes_ir(row, at, xq, xat))
    overload(dot_fivebits)(lambda row, at, xq, xat: lambda row, at, xq, xat: dot_fivebits_ir(row, at, xq, xat))
    overload(has_avx512)(lambda: lambda: avx512)
    overload(zeros)(lambda: lambda: zeros_ir())
    overload(fma)(lambda acc, v, s: lambda acc, v, s: fma_ir(acc, v, s))
    overload(fma_halves)(lambda acc, v, s0, s1: lambda acc, v, s0, s1: fma_halves_ir(acc, v, s0, s1))
    overload(dot_nibble_row)(
        lambda row, at, shift, xq, xat: lambda row, at, shift, xq, xat: dot_nibble_row_ir(row, at, shift, xq, xat)
    )
    overload(dot_fivebit_row)(
        lambda row, at, shift, hat, hshift, xq, xat: (
            lambda row, at, shift, hat, hshift, xq, xat: dot_fivebit_row_ir(row, at, shift, hat, hshift, xq, xat)
        )
    )
    overload(dot_sixbits)(
        lambda row, at, shift, hat, hshift, xq, xat: (
            lambda row, at, shift, hat, hshift, xq, xat: dot_sixbits_ir(row, at, shift, hat, hshift, xq, xat)
        )
    )
    overload(total)(lambda acc: lambda acc: total_ir(acc))
    overload(half)(lambda row, at: lambda row, at: half_ir(row, at))
    overload(prefetch)(lambda row, at: lambda row, at: prefetch_ir(row, at))
    overload(nibbles)(lambda row, at: lambda row, at: nibbles_ir(row, at))
    overload(bytes32)(lambda a, at: lambda a, at: bytes32_ir(a, at))
    overload(store32)(lambda v, a, at: lambda v, a, at: store32_ir(v, a, at))
    overload(int_zeros)(lambda: lambda: int_zeros_ir())
    overload(dot_dword)(lambda acc, xv, w, wat: lambda acc, xv, w, wat: dot_dword_ir(acc, xv, w, wat))
    overload(dot_dword_small)(lambda acc, xv, w, wat: lambda acc, xv, w, wat: dot_dword_small_ir(acc, xv, w, wat))
    overload(scale_add)(
        lambda acc, a, b, c, s, at, d: lambda acc, a, b, c, s, at, d: scale_add_ir(acc, a, b, c, s, at, d)
    )
    overload(splat)(lambda s: lambda s: splat_intrinsic(s))
    overload(load8)(lambda a, at: lambda a, at: load8_ir(a, at))
    overload(fmav)(lambda acc, a, b: lambda acc, a, b: fmav_ir(acc, a, b))
    overload(add)(lambda a, b: lambda a, b: add_ir(a, b))
    overload(lane)(lambda v, i: lambda v, i: lane_ir(v, i))
    overload(zeros16)(lambda: lambda: zeros16_ir())
    overload(load16)(lambda a, at: lambda a, at: load16_ir(a, at))
    overload(store16)(lambda v, a, at: lambda v, a, at: store16_ir(v, a, at))
    overload(splat16)(lambda a, at: lambda a, at: splat16_ir(a, at))
    overload(fma16)(lambda acc, a, b: lambda acc, a, b: fma16_ir(acc, a, b))
    overload(add16)(lambda a, b: lambda a, b: add16_ir(a, b))
    overload(mul16)(lambda v, s: lambda v, s: mul16_ir(v, s))
    overload(fill16)(lambda s: lambda s: fill16_ir(s))
    overload(max16)(lambda a, b: lambda a, b: max16_ir(a, b))
    overload(below16)(lambda v, n, s: lambda v, n, s: below16_ir(v, n, s))
    overload(exp16)(lambda v: lambda v: exp16_ir(v))
    overload(hmax16)(lambda v: lambda v: hmax16_ir(v))
    overload(hsum16)(lambda v: lambda v: hsum16_ir(v))


when_numba_loads(_register)
