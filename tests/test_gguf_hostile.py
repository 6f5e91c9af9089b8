"""Hostile and careless files named .gguf: each is one CheckpointError that names the file, what is
wrong and what is allowed, at once and with bounded memory (every case is loaded in a fresh
interpreter with an address-space limit, as tests/capped.py does), and exit status 2 with one
line on stderr from the command line. Then random byte flips in a valid file's header give only
CheckpointErrors.

The files are assembled here byte by byte (a small GGUF writer that can lie), or written by
arraygpt and patched in place.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import capped

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from arraygpt import GPT, GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io import gguf as ag_gguf
from arraygpt.io import gguf_tokenizer
from arraygpt.io.gguf_tokenizer import check_tokenizer_metadata, tokenizer_from_gguf
from arraygpt.io.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
ERROR = "arraygpt.errors.CheckpointError"


# ----------------------------------------------------------------------------------------------
# a GGUF assembler that writes what it is told


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str | bytes) -> bytes:
    return s(key) + struct.pack("<I", 8) + s(value)


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<II", 4, value)


def tensor_info(name: str, dims, ggml_type: int = 0, offset: int = 0) -> bytes:
    return (
        s(name)
        + struct.pack("<I", len(dims))
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def assemble(kvs, infos, data: bytes, *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None) -> bytes:
    head = magic + struct.pack(
        "<IQQ", version, len(infos) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = head + b"".join(kvs) + b"".join(infos)
    return body + bytes(-len(body) % 32) + data


ARCH = kv_string("general.architecture", "llama")
EMB = tensor_info("token_embd.weight", (8, 4))  # 4 rows of 8 float32: 128 bytes
DATA = bytes(128)

CASES = {
    # name: (file bytes, fragments of the message)
    "wrong magic": (b"GGUL" + assemble([ARCH], [EMB], DATA)[4:], ["not a GGUF file", "b'GGUF'"]),
    "a safetensors file": (struct.pack("<Q", 2) + b"{}" + bytes(40), ["not a GGUF file"]),
    "version 1": (assemble([ARCH], [EMB], DATA, version=1), ["GGUF version 1", "2 and 3"]),
    "empty": (b"", ["too short"]),
    "header cut": (assemble([ARCH], [EMB], DATA)[:20], ["too short"]),
    "metadata cut": (assemble([ARCH], [EMB], DATA)[:40], ["truncated or lying"]),
    "tensor table cut": (assemble([ARCH], [EMB], DATA)[:-150], ["truncated or lying"]),
    "data cut": (assemble([ARCH], [EMB], DATA)[:-10], ["past the end of the file"]),
    "offset past the end": (
        assemble([ARCH], [tensor_info("token_embd.weight", (8, 4), 0, 1 << 40)], DATA),
        ["past the end"],
    ),
    "size lies": (assemble([ARCH], [tensor_info("token_embd.weight", (8, 4000))], DATA), ["past the end"]),
    "overlapping tensors": (
        assemble([ARCH], [EMB, tensor_info("output_norm.weight", (8,), 0, 96)], DATA),
        ["overlaps"],
    ),
    "misaligned offset": (assemble([ARCH], [tensor_info("token_embd.weight", (8, 1), 0, 4)], DATA), ["alignment 32"]),
    "absurd dimensions": (
        assemble([ARCH], [tensor_info("token_embd.weight", (1 << 40, 1 << 40))], DATA),
        ["dimensions [1099511627776, 1099511627776]", "at most 281474976710656"],
    ),
    "zero dimension": (assemble([ARCH], [tensor_info("token_embd.weight", (8, 0))], DATA), [">= 1"]),
    "100 dimensions": (
        assemble([ARCH], [tensor_info("token_embd.weight", (1,) * 100)], DATA),
        ["100 dimensions", "1 to 4"],
    ),
    "2^60 tensors": (assemble([ARCH], [EMB], DATA, n_tensors=1 << 60), ["claims 1152921504606846976 tensors"]),
    "2^60 metadata entries": (assemble([ARCH], [EMB], DATA, n_kv=1 << 60), ["1152921504606846976 metadata entries"]),
    "2^16 + 1 metadata entries": (  # all there, 1.2 MB: refused before the first is read
        assemble([ARCH] + [s(f"k{i:x}") + struct.pack("<IB", 0, 1) for i in range(1 << 16)], [EMB], DATA),
        ["claims 65537 metadata entries", "at most 65536"],
    ),
    "2^60 array elements": (
        assemble([ARCH, s("x") + struct.pack("<IIQ", 9, 0, 1 << 60)], [EMB], DATA),
        ["claims 1152921504606846976 elements"],
    ),
    "2^20 + 1 array elements": (
        assemble([ARCH, s("x") + struct.pack("<IIQ", 9, 0, (1 << 20) + 1) + bytes((1 << 20) + 1)], [EMB], DATA),
        ["over 1048576 elements"],
    ),
    "2^62-byte string": (
        assemble([ARCH, s("general.name") + struct.pack("<IQ", 8, 1 << 62)], [], b""),
        ["at most 16777216"],
    ),
    "string past the end": (
        assemble([ARCH, s("general.name") + struct.pack("<IQ", 8, 5000) + b"tiny"], [], b""),
        ["truncated"],
    ),
    "nested arrays": (
        assemble(
            [ARCH, s("x") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 1)],
            [EMB],
            DATA,
        ),
        ["nests arrays deeper than 2"],
    ),
    "unknown value type": (assemble([ARCH, s("x") + struct.pack("<I", 77)], [EMB], DATA), ["value type 77"]),
    "unknown tensor type": (
        assemble([ARCH], [tensor_info("token_embd.weight", (8, 4), 99)], DATA),
        ["99 (not a ggml type)", "Q6_K"],
    ),
    "unsupported tensor type": (
        assemble([ARCH], [tensor_info("token_embd.weight", (256, 4), 16)], bytes(4096)),
        ["IQ2_XXS", "arraygpt reads F32, F16"],
    ),
    "rows not whole blocks": (
        assemble([ARCH], [tensor_info("token_embd.weight", (8, 4), 8)], DATA),
        ["not whole blocks of 32"],
    ),
    "duplicate tensor names": (
        assemble([ARCH], [EMB, tensor_info("token_embd.weight", (8, 4), 0, 128)], DATA * 2),
        ["'token_embd.weight' appears twice"],
    ),
    "duplicate keys": (assemble([ARCH, ARCH], [EMB], DATA), ["'general.architecture' appears twice"]),
    "key not UTF-8": (assemble([ARCH, s(b"\xff\xfe") + struct.pack("<II", 4, 1)], [EMB], DATA), ["not UTF-8"]),
    "alignment not a power of two": (assemble([ARCH, kv_u32("general.alignment", 3)], [EMB], DATA), ["power of two"]),
    "another architecture": (
        assemble([kv_string("general.architecture", "mamba")], [EMB], DATA),
        ["'mamba'", "'llama', 'qwen2', 'gpt2'"],
    ),
    "architecture not a string": (
        assemble([kv_u32("general.architecture", 7)], [EMB], DATA),
        ["general.architecture", "must be a string"],
    ),
    "no architecture": (assemble([kv_string("general.name", "x")], [EMB], DATA), ["lacks 'general.architecture'"]),
    "no config": (assemble([ARCH], [EMB], DATA), ["lacks 'llama.embedding_length'"]),
}


def run_capped(paths: dict[str, Path]) -> dict[str, list[str]]:
    """Load every path in one fresh interpreter under capped.MEMORY_LIMIT; name -> [exception type, message]."""
    script = f"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({capped.MEMORY_LIMIT}, {capped.MEMORY_LIMIT}))
from arraygpt.io import formats
out = {{}}
for name, path in json.loads(sys.argv[1]).items():
    try:
        formats.load(path)
    except BaseException as e:
        out[name] = [type(e).__module__ + "." + type(e).__qualname__, str(e)]
    else:
        out[name] = ["ok", ""]
print(json.dumps(out))
"""
    arg = json.dumps({k: str(v) for k, v in paths.items()})
    proc = subprocess.run(
        [sys.executable, "-c", script, arg], cwd=ROOT, env=capped.ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[str]]:
    folder = tmp_path_factory.mktemp("hostile")
    paths = {}
    for name, (data, _) in CASES.items():
        paths[name] = folder / (name.replace(" ", "_").replace("^", "") + ".gguf")
        paths[name].write_bytes(data)
    paths["directory"] = folder / "dir.gguf"
    paths["directory"].mkdir()
    paths["FIFO"] = folder / "fifo.gguf"
    os.mkfifo(paths["FIFO"])
    paths["character device"] = folder / "zero.gguf"
    paths["character device"].symlink_to("/dev/zero")
    return run_capped(paths)


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_file_is_one_checkpoint_error(outcomes, name):
    kind, message = outcomes[name]
    assert kind == ERROR, (kind, message)
    assert ".gguf:" in message, message  # names the file
    for fragment in CASES[name][1]:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize(
    "name, said", [("directory", "directory"), ("FIFO", "FIFO"), ("character device", "character device")]
)
def test_special_file_named_gguf(outcomes, name, said):
    kind, message = outcomes[name]
    assert kind == ERROR and said in message and "regular file" in message, (kind, message)


# ----------------------------------------------------------------------------------------------
# a valid file whose metadata lies, patched in place


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    model = GPT(GPTConfig.preset("llama-tiny", vocab_size=257), seed=0)
    return ag_gguf.save_gguf(model, tmp_path_factory.mktemp("valid") / "m.gguf", tokenizer=ByteTokenizer())


def patched(src: Path, dst: Path, key: str, vtype: int, value: bytes) -> Path:
    """``src`` with the value of ``key`` (a fixed-size value) replaced, type and bytes."""
    data = bytearray(src.read_bytes())
    at = data.index(s(key)) + len(s(key))
    old_type = struct.unpack_from("<I", data, at)[0]
    assert len(value) == {4: 4, 5: 4, 6: 4, 10: 8}[old_type]
    data[at : at + 4 + len(value)] = struct.pack("<I", vtype) + value
    dst.write_bytes(bytes(data))
    return dst


LIES = [
    ("llama.block_count", 4, struct.pack("<I", 10**9), ["claims 1000000000 layers", "tensors of 2"]),
    ("llama.embedding_length", 4, struct.pack("<I", 1 << 20), ["has shape", "the metadata implies"]),
    ("llama.block_count", 6, struct.pack("<f", 2.0), ["'llama.block_count' must be an integer"]),
    ("llama.attention.head_count", 4, struct.pack("<I", 0), ["invalid model config", "n_head"]),
    ("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 10**6), ["bos_token_id", "0 <= id < 257"]),
    # non-finite or non-positive float hyperparameters: NaN logits at the first generated token otherwise
    ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", math.inf), ["layer_norm_rms_epsilon' is inf"]),
    ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", math.nan), ["layer_norm_rms_epsilon' is nan"]),
    ("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 0.0), ["is 0.0", "a positive float"]),
    ("llama.rope.freq_base", 6, struct.pack("<f", math.inf), ["'llama.rope.freq_base' is inf", "finite in float32"]),
    ("llama.rope.freq_base", 6, struct.pack("<f", -1.0), ["'llama.rope.freq_base' is -1.0", "a positive float"]),
]


@pytest.mark.parametrize("key, vtype, value, said", LIES, ids=[f"{k}={v!r}" for k, _, v, _ in LIES])
def test_metadata_that_lies(valid, tmp_path, key, vtype, value, said):
    path = patched(valid, tmp_path / "lie.gguf", key, vtype, value)
    kind, message = capped.attempt(
        f"formats.load({str(path)!r})", timeout=60, prelude="from arraygpt.io import formats"
    )
    assert kind == ERROR, (kind, message)
    for fragment in said:
        assert fragment in message, (fragment, message)


def rewritten(src: Path, dst: Path, changes: dict) -> Path:
    """``src`` (float tensors) rewritten by the gguf library's GGUFWriter, the metadata in
    ``changes`` (key -> (GGUFValueType, value), arrays (ARRAY, (element type, list))) replaced or added."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    fields = {
        name: (f.types[0], (f.types[-1], f.contents()) if f.types[0] == gguf.GGUFValueType.ARRAY else f.contents())
        for name, f in reader.fields.items()
        if not name.startswith("GGUF.") and name != "general.architecture"
    }
    for key, (vtype, value) in {**fields, **changes}.items():
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value[1], vtype, sub_type=value[0])
        else:
            writer.add_key_value(key, value, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape(tuple(int(d) for d in reversed(t.shape))))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def test_metadata_entries_past_the_limit_are_refused_at_once(tmp_path):
    path = tmp_path / "many.gguf"
    path.write_bytes(CASES["2^16 + 1 metadata entries"][0])
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="claims 65537 metadata entries; at most 65536"):
        ag_gguf.load_gguf(path)
    assert time.perf_counter() - start < 1.0  # the walk never starts (4 M entries took 13 s and 0.9 GB)


def test_float_hyperparameters_that_overflow_float32_are_refused(valid, tmp_path):
    import gguf

    f64 = gguf.GGUFValueType.FLOAT64
    for key in ("llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base"):
        path = rewritten(valid, tmp_path / "f64.gguf", {key: (f64, 1e308)})  # finite in float64, inf in float32
        with pytest.raises(CheckpointError, match=f"'{key}' is 1e\\+308; a positive float finite in float32"):
            ag_gguf.load_gguf(path)
    path = rewritten(valid, tmp_path / "ok.gguf", {"llama.rope.freq_base": (f64, 5e5)})
    assert ag_gguf.load_gguf(path).config.rope_theta == 5e5  # a float64 of a sane size stays readable
    config = GPTConfig.preset("gpt2", n_layer=1, n_head=2, n_embd=32, vocab_size=257, block_size=16)
    gpt2 = ag_gguf.save_gguf(GPT(config, seed=0), tmp_path / "gpt2.gguf")
    path = patched(gpt2, tmp_path / "eps.gguf", "gpt2.attention.layer_norm_epsilon", 6, struct.pack("<f", math.inf))
    with pytest.raises(CheckpointError, match="'gpt2.attention.layer_norm_epsilon' is inf"):
        ag_gguf.load_gguf(path)


def test_rope_scaling_original_length_below_one_is_refused(tmp_path):
    import gguf

    config = GPTConfig.preset("llama-tiny", vocab_size=257, rope_scaling=(8.0, 1.0, 4.0, 16))
    path = ag_gguf.save_gguf(GPT(config, seed=0), tmp_path / "m.gguf")
    key = "llama.rope.scaling.original_context_length"
    for value in (0, -16):  # every divisor 8 fits any length; GPTConfig's ValueError escaped
        bad = rewritten(path, tmp_path / "bad.gguf", {key: (gguf.GGUFValueType.INT32, value)})
        with pytest.raises(CheckpointError, match=f"'{key}' is {value}; a length >= 1"):
            ag_gguf.load_gguf(bad)


def ab_tokens(longest: int) -> list[str]:
    """Every string of a and b up to ``longest`` letters: each splits into two tokens at every cut."""
    return ["".join(p) for n in range(1, longest + 1) for p in itertools.product("ab", repeat=n)]


def test_a_vocabulary_deriving_too_many_merges_is_refused_at_load(tmp_path, monkeypatch):
    import gguf

    tokens = ab_tokens(8)  # 510 tokens, 3,076 derived merges
    vt = gguf.GGUFValueType
    config = GPTConfig.preset("llama-tiny", vocab_size=len(tokens))
    path = ag_gguf.save_gguf(GPT(config, seed=0), tmp_path / "m.gguf")
    changes = {
        "tokenizer.ggml.model": (vt.STRING, "llama"),
        "tokenizer.ggml.tokens": (vt.ARRAY, (vt.STRING, tokens)),
        "tokenizer.ggml.scores": (vt.ARRAY, (vt.FLOAT32, [0.0] * len(tokens))),
    }
    path = rewritten(path, tmp_path / "ab.gguf", changes)
    assert ag_gguf.load_gguf(path).tokenizer.encode("abba")  # under the limit: it builds
    monkeypatch.setattr(gguf_tokenizer, "MAX_DERIVED_MERGES", 1000)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="ab.gguf: the tokens split into over 1000 pairs of tokens"):
        ag_gguf.load_gguf(path)  # at load, not when the tokenizer is first read
    assert time.perf_counter() - start < 2.0


def test_merges_are_counted_while_derived_not_after():
    tokens = ab_tokens(16)  # 131,070 tokens, 1.8 M merges: 0.7 GB and 4 s to build them all
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
    }
    for read in (check_tokenizer_metadata, tokenizer_from_gguf):
        start = time.perf_counter()
        with pytest.raises(CheckpointError, match=f"over {gguf_tokenizer.MAX_DERIVED_MERGES} pairs"):
            read(meta, "x.gguf", len(tokens))
        assert time.perf_counter() - start < 3.0, read


def test_tokenizer_metadata_that_would_panic_or_hang_is_refused():
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"]}
    with pytest.raises(CheckpointError, match="merge 'a' \\+ 'b'"):
        tokenizer_from_gguf(meta, "x.gguf")
    with pytest.raises(CheckpointError, match="two tokens separated by one space"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.merges": ["a b c"]}, "x.gguf")
    long = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["a", "a" * 40_000],
        "tokenizer.ggml.scores": [0.0, 0.0],
    }
    with pytest.raises(CheckpointError, match="too long to derive merges"):
        tokenizer_from_gguf(long, "x.gguf")  # at once: never 40,000 slices of up to 40,000 characters
    with pytest.raises(CheckpointError, match="'bert'"):
        tokenizer_from_gguf({**meta, "tokenizer.ggml.model": "bert"}, "x.gguf")


# ----------------------------------------------------------------------------------------------
# the command line: exit status 2, one line


@pytest.mark.parametrize("name", ["wrong magic", "data cut", "directory"])
def test_sample_command_refuses_with_exit_status_2(tmp_path, name):
    path = tmp_path / "bad.gguf"
    if name == "directory":
        path.mkdir()
    else:
        path.write_bytes(CASES[name][0])
    proc = subprocess.run(
        [sys.executable, "-m", "arraygpt.cli", "sample", "--checkpoint", str(path), "--max-new-tokens", "2"],
        cwd=ROOT,
        env=capped.ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "arraygpt sample: error:" in lines[0] and "bad.gguf" in lines[0], proc.stderr


# ----------------------------------------------------------------------------------------------
# random damage to a valid header: loaded, or one CheckpointError


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipped_header_bytes_give_only_checkpoint_errors(valid, tmp_path_factory, data):
    raw = bytearray(valid.read_bytes())
    header_end = raw.index(s("token_embd.weight")) + 64  # the metadata and the start of the tensor table
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, header_end))] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("flip") / "m.gguf"
    path.write_bytes(bytes(raw))
    try:
        ckpt = ag_gguf.load_gguf(path)
    except CheckpointError:
        return
    assert ckpt.format == "gguf" and ckpt.config.n_layer == 2  # a flip the checks allow (a weight, a name's letter)


def test_rope_freqs_that_follow_no_rule_are_refused(tmp_path):
    import gguf

    config = GPTConfig.preset("llama-tiny", vocab_size=257, rope_scaling=(8.0, 1.0, 4.0, 16))
    path = ag_gguf.save_gguf(GPT(config, seed=0), tmp_path / "m.gguf", tokenizer=ByteTokenizer())
    assert ag_gguf.load_gguf(path).config.rope_scaling is not None
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    data = bytearray(path.read_bytes())
    data[tensor.data_offset : tensor.data_offset + tensor.n_bytes] = np.linspace(
        1, 3, tensor.n_elements, dtype=np.float32
    ).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="rope_freqs.weight does not follow Llama 3.1's rope scaling"):
        ag_gguf.load_gguf(path)


PIECE = st.text(alphabet="ab <>|:$ĠĊ▁s0x", max_size=5)


@settings(max_examples=60, deadline=None)
@given(
    model=st.sampled_from(["gpt2", "llama"]),
    tokens=st.lists(PIECE, min_size=1, max_size=12),
    merges=st.one_of(st.none(), st.lists(PIECE, max_size=6)),
    types=st.lists(st.integers(0, 7), max_size=12),
    ids=st.lists(st.integers(-1, 13), min_size=2, max_size=2),
    add=st.lists(st.booleans(), min_size=2, max_size=2),
)
def test_random_tokenizer_metadata_builds_or_is_one_checkpoint_error(model, tokens, merges, types, ids, add):
    meta = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": tokens}
    if merges is None:
        meta["tokenizer.ggml.scores"] = [float(-i) for i in range(len(tokens))]
    else:
        meta["tokenizer.ggml.merges"] = merges
    if len(types) == len(tokens):
        meta["tokenizer.ggml.token_type"] = types
    meta.update({"tokenizer.ggml.bos_token_id": ids[0], "tokenizer.ggml.eos_token_id": ids[1]})
    meta.update({"tokenizer.ggml.add_bos_token": add[0], "tokenizer.ggml.add_eos_token": add[1]})
    try:
        tok = tokenizer_from_gguf(meta, "x.gguf")
    except CheckpointError:
        return
    assert isinstance(tok.decode(tok.encode("ab <s> a:b")), str)  # built: it encodes and decodes


@pytest.mark.parametrize("special", ["$b", "$A", "$"])
def test_a_bos_or_eos_token_that_a_template_reads_as_a_sequence_is_refused(special):
    tokens = ["a", "b", special]  # the tokenizers library reads "$b" as sequence B and panics on encoding
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * 3}
    meta.update({"tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_eos_token": True})
    with pytest.raises(CheckpointError, match=r"cannot go in a tokenizers template: a piece starting with '\$'"):
        tokenizer_from_gguf(meta, "x.gguf")
    meta["tokenizer.ggml.add_eos_token"] = False  # not in a template: the token is an ordinary one
    assert tokenizer_from_gguf(meta, "x.gguf").eos_id == 2
