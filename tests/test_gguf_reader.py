"""arraygpt's GGUF header walk as a reader, against ``gguf.GGUFReader`` (the independent reference):
on files written by ``gguf.GGUFWriter`` (metadata of every value type, nested arrays, a
tokenizer, tensors of every read type), the walk's metadata values and GGUF types and every
tensor's bytes, dtype and shape equal the library's. GGUFWriter writes no empty array, so those
are spliced into a written file (a multiple of the alignment, so the tensor offsets stay valid).
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from arraygpt import GPT, GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io import gguf as ag_gguf
from arraygpt.io.bpe import BPETokenizer
from tiny_hf import byte_level_bpe

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


def reference(path) -> tuple[dict, dict, dict]:
    """GGUFReader's (values, types, tensors): key -> contents(), key -> [int types], name -> ReaderTensor."""
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    values = {k: f.contents() for k, f in fields.items()}
    return values, {k: [int(t) for t in f.types] for k, f in fields.items()}, {t.name: t for t in reader.tensors}


def flat(value):
    """GGUFReader flattens an array of arrays into one list of its elements."""
    return [x for v in value for x in flat(v)] if isinstance(value, list) else [value]


def assert_same(path) -> tuple[ag_gguf._Metadata, list, dict]:
    """The walk's metadata and tensors equal GGUFReader's; returns them and GGUFReader's tensors."""
    meta, tensors = ag_gguf._open(path)
    values, types, ref_tensors = reference(path)
    assert meta.types == types
    assert set(meta.values) == set(values)
    for key, value in meta.values.items():
        if types[key][:2] == [V.ARRAY, V.ARRAY]:
            assert flat(value) == values[key], key
        else:
            assert value == values[key] and type(value) is type(values[key]), key
            if isinstance(value, list):
                assert [type(v) for v in value] == [type(v) for v in values[key]], key
    assert [t.name for t in tensors] == list(ref_tensors)
    for t in tensors:
        ref = ref_tensors[t.name]
        assert t.ggml_type == int(ref.tensor_type) and t.dims == tuple(int(d) for d in ref.shape), t.name
        assert t.data.dtype == ref.data.dtype and t.data.shape == ref.data.shape, t.name
        assert t.data.tobytes() == ref.data.tobytes(), t.name
        assert not t.data.flags.writeable, t.name
    return meta, tensors, ref_tensors


def write(path, kvs, tensors=()) -> None:
    """A GGUF written by GGUFWriter: kvs = [(key, value, type, sub_type)], tensors = [(name, data, raw_dtype)]."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value, vtype, sub_type in kvs:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, data, raw_dtype in tensors:
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


EVERY_TYPE = [
    ("u8", 255, V.UINT8, None),
    ("i8", -128, V.INT8, None),
    ("u16", 65535, V.UINT16, None),
    ("i16", -32768, V.INT16, None),
    ("u32", 4294967295, V.UINT32, None),
    ("i32", -(2**31), V.INT32, None),
    ("f32", 0.1, V.FLOAT32, None),
    ("yes", True, V.BOOL, None),
    ("no", False, V.BOOL, None),
    ("text", "Héllo 日本語 🙂", V.STRING, None),
    ("empty text", "", V.STRING, None),
    ("u64", 2**64 - 1, V.UINT64, None),
    ("i64", -(2**63), V.INT64, None),
    ("f64", -1.5e300, V.FLOAT64, None),
    ("a.u8", [0, 7, 255], V.ARRAY, V.UINT8),
    ("a.i16", [-3, 4], V.ARRAY, V.INT16),
    ("a.u32", [1, 2**32 - 1], V.ARRAY, V.UINT32),
    ("a.i32", [-1, 5, 6], V.ARRAY, V.INT32),
    ("a.f32", [0.5, -2.25, 3.4e38], V.ARRAY, V.FLOAT32),
    ("a.bool", [True, False, True], V.ARRAY, V.BOOL),
    ("a.u64", [0, 2**64 - 1], V.ARRAY, V.UINT64),
    ("a.i64", [-(2**63), 2**63 - 1], V.ARRAY, V.INT64),
    ("a.f64", [1e-310, 2.0**1000], V.ARRAY, V.FLOAT64),
    ("a.str", ["a", "", "▁the", "Ġ", "🙂"], V.ARRAY, V.STRING),
    ("a.nested", [[1, 2], [3], [4, 5, 6]], V.ARRAY, V.ARRAY),
    ("a.nested.str", [["x", "y"], ["z"]], V.ARRAY, V.ARRAY),
]


def splice_empty_arrays(path) -> None:
    """Put three empty arrays (of uint32, of strings, and an array holding one empty array) first in
    the metadata: 32 + 32 + 64 bytes, whole multiples of the alignment."""

    def kv(key: str, payload: bytes) -> bytes:
        return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", V.ARRAY) + payload

    blob = kv("e.uint32", struct.pack("<IQ", V.UINT32, 0)) + kv("e.string", struct.pack("<IQ", V.STRING, 0))
    blob += kv("empty.nested.array.of.uint32", struct.pack("<IQ", V.ARRAY, 1) + struct.pack("<IQ", V.UINT32, 0))
    assert len(blob) % 32 == 0
    data = bytearray(path.read_bytes())
    n_kv = struct.unpack_from("<Q", data, 16)[0]
    struct.pack_into("<Q", data, 16, n_kv + 3)
    path.write_bytes(bytes(data[:24] + blob + data[24:]))


def test_metadata_of_every_value_type_and_tensors_of_every_type(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    tensors = [
        ("f32", w, None),
        ("f16", w.astype(np.float16), None),
        ("f32.3d", rng.standard_normal((2, 3, 32)).astype(np.float32), None),
        ("norm", w[0], None),
    ]
    for qtype in (Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        tensors.append((qtype.name.lower(), gguf.quants.quantize(w, qtype), qtype))
    for qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # no quantizer in gguf: random blocks of the right size
        nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
        tensors.append((qtype.name.lower(), rng.integers(0, 256, (4, nbytes), dtype=np.uint8), qtype))
    path = tmp_path / "every.gguf"
    write(path, EVERY_TYPE, tensors)
    splice_empty_arrays(path)
    meta, read, ref = assert_same(path)
    assert meta.values["e.uint32"] == meta.values["e.string"] == [] and meta.values["empty.nested.array.of.uint32"] == [
        []
    ]
    assert meta.types["empty.nested.array.of.uint32"] == [V.ARRAY, V.ARRAY]
    for key, value, vtype, sub_type in EVERY_TYPE:  # what was written, nesting kept
        if V.FLOAT32 in (vtype, sub_type):
            assert meta.values[key] == np.float32(value).tolist(), key
        else:
            assert meta.values[key] == value, key
    for t in read:  # as load_gguf reads each: the values gguf.quants.dequantize gives
        expected = gguf.quants.dequantize(ref[t.name].data, ref[t.name].tensor_type)
        np.testing.assert_array_equal(ag_gguf.read_tensor(t), expected.reshape(tuple(reversed(t.dims))))


def test_a_written_model_and_tokenizer_read_as_gguf_reads_them(tmp_path, monkeypatch):
    bpe = byte_level_bpe(["the cat sat on the mat, the end. " * 3, "héllo wörld 123"], ("<|endoftext|>",))
    eos = bpe.token_to_id("<|endoftext|>")
    tok = BPETokenizer(bpe, bos_id=eos, eos_ids=[eos], chat_template="{{ messages[0]['content'] }}")
    model = GPT(GPTConfig.preset("llama-tiny", vocab_size=320), seed=0)
    path = ag_gguf.save_gguf(model, tmp_path / "m.gguf", dtype="q4_1", tokenizer=tok)
    meta, _, ref = assert_same(path)
    assert len(meta.values["tokenizer.ggml.tokens"]) == 320 and meta.values["tokenizer.ggml.merges"]
    monkeypatch.setattr(gguf, "GGUFReader", None)  # load_gguf reads the file without it
    ckpt = ag_gguf.load_gguf(path, quantized=True)
    assert ckpt.tokenizer.encode("the cat sat") == tok.encode("the cat sat")
    down = ckpt.model.params["layer1.mlp_down"]  # the file's blocks, not copied
    assert down.kind == "q4_1" and down.blocks.tobytes() == ref["blk.1.ffn_down.weight"].data.tobytes()
    wte = ag_gguf.load_gguf(path).model.params["wte"]
    embd = ref["token_embd.weight"]
    np.testing.assert_array_equal(wte, gguf.quants.dequantize(embd.data, embd.tensor_type))


SCALARS = {
    V.UINT8: st.integers(0, 2**8 - 1),
    V.INT8: st.integers(-(2**7), 2**7 - 1),
    V.UINT16: st.integers(0, 2**16 - 1),
    V.INT16: st.integers(-(2**15), 2**15 - 1),
    V.UINT32: st.integers(0, 2**32 - 1),
    V.INT32: st.integers(-(2**31), 2**31 - 1),
    V.UINT64: st.integers(0, 2**64 - 1),
    V.INT64: st.integers(-(2**63), 2**63 - 1),
    V.FLOAT32: st.floats(width=32, allow_nan=False),
    V.FLOAT64: st.floats(allow_nan=False),
    V.BOOL: st.booleans(),
    V.STRING: st.text(max_size=6),
}


@st.composite
def entries(draw):
    vtype = draw(st.sampled_from([*SCALARS, V.ARRAY, V.ARRAY]))
    if vtype != V.ARRAY:
        return draw(SCALARS[vtype]), vtype, None
    sub = draw(st.sampled_from(list(SCALARS)))
    return draw(st.lists(SCALARS[sub], min_size=1, max_size=5)), vtype, sub


@settings(max_examples=25, deadline=None)
@given(kvs=st.dictionaries(st.text(min_size=1, max_size=8), entries(), max_size=6))
def test_random_metadata_reads_as_gguf_reader_reads_it(tmp_path_factory, kvs):
    path = tmp_path_factory.mktemp("random") / "m.gguf"
    kvs.pop("general.architecture", None)
    write(path, [(k, v, t, sub) for k, (v, t, sub) in kvs.items()])
    meta, _, _ = assert_same(path)
    for key, (value, vtype, sub) in kvs.items():
        if V.FLOAT32 in (vtype, sub):
            value = np.float32(value).tolist()
        assert meta.values[key] == value, key


def test_metadata_string_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "m.gguf"
    write(path, [("general.name", "abc", V.STRING, None)])
    data = path.read_bytes()
    at = data.index(b"abc")
    path.write_bytes(data[:at] + b"\xff" + data[at + 1 :])
    with pytest.raises(CheckpointError, match="metadata 'general.name' holds a string that is not UTF-8"):
        ag_gguf.read_header(memoryview(path.read_bytes()), len(data), str(path))


def _resident_kb(path) -> int:
    """The kernel's count of resident kB in this process's mappings of ``path`` (/proc/self/smaps)."""
    total, mine = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header
                mine = len(fields) > 5 and fields[5] == str(path)
            elif mine and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_released_pages_of_the_map_leave_resident_memory_and_still_read_back(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 64 * mmap.PAGESIZE, dtype=np.uint8)
    path = tmp_path / "pages.bin"
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f:
        mapped = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)
    assert int(mapped.sum(dtype=np.int64)) == int(data.sum(dtype=np.int64))  # every page touched
    before = _resident_kb(path.resolve())
    start = mmap.PAGESIZE + 100
    view = mapped[start : start + 35 * mmap.PAGESIZE].reshape(-1, 5)  # holds pages 2 .. 35 whole
    ag_gguf._release([view])
    assert _resident_kb(path.resolve()) <= before - 34 * mmap.PAGESIZE // 1024
    np.testing.assert_array_equal(mapped, data)  # read again from the file
    ag_gguf._release([np.arange(10)])  # not a view of a map: nothing happens
