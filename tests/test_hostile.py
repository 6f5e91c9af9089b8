"""Hostile and careless files given as a checkpoint: every one is a CheckpointError that names the
file, what is wrong and what is allowed, and comes at once with bounded memory (each case runs in a
subprocess with an address-space limit and a generous timeout, never a timing assertion). Then the
safetensors reader agrees with the reference ``safetensors`` library: the same arrays, each in its
own memory, bfloat16 widened exactly, and under mutation only CheckpointErrors come out.

Every file here is built by the tests themselves.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as reference  # the reference implementation: a runtime dependency
from hypothesis import given, settings
from hypothesis import strategies as st

import capped
from arraygpt.config import GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io import safetensors as ag_safetensors
from arraygpt.io.checkpoint import load_checkpoint, save_checkpoint
from arraygpt.io.hf.gpt2 import save_gpt2
from arraygpt.io.tokenizers import CharTokenizer
from arraygpt.nn.model import GPT
from arraygpt.plugins.optimizers import AdamW

ROOT = Path(__file__).resolve().parents[1]
TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)
ERROR = "arraygpt.errors.CheckpointError"


def st_bytes(header: dict, data: bytes = b"") -> bytes:
    """A safetensors file from a header written as given (so it can lie) and raw data bytes."""
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def attempt(call: str) -> tuple[str, str]:
    """``call`` in a fresh interpreter with bounded memory (capped.attempt), the readers imported."""
    return capped.attempt(
        call,
        timeout=20,
        prelude=(
            "from arraygpt.io import formats, safetensors, checkpoint, bpe, tokenizers as tokenizer; "
            "from arraygpt.io.hf import gpt2 as interop"
        ),
    )


def assert_refused(call: str, *fragments: str) -> str:
    kind, message = attempt(call)
    assert kind in (ERROR, "arraygpt.io.safetensors.SafetensorsError"), (kind, message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """A valid arraygpt checkpoint folder to break one file of."""
    model = GPT(TINY, seed=0)
    opt = AdamW(model.params)
    idx = np.arange(16).reshape(2, 8) % TINY.vocab_size
    model.forward(idx, np.roll(idx, -1, axis=1))
    opt.step(model.backward(), 1e-2)  # the moments exist now
    return save_checkpoint(tmp_path / "ck", model, CharTokenizer("abcdefghij"), opt, extra={"step": 1})


@pytest.fixture
def gpt2(tmp_path) -> Path:
    """A valid transformers GPT-2 directory (written by arraygpt: no torch needed)."""
    save_gpt2(GPT(TINY, seed=0), tmp_path / "gpt2")
    return tmp_path / "gpt2"


def replace_with(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to(kind)  # a device


# ----------------------------------------------------------------------------------------------
# special files in place of any checkpoint file


SPECIAL = [
    ("fifo", "FIFO"),
    ("/dev/zero", "character device"),
    ("/dev/urandom", "character device"),
    ("dir", "directory"),
]


@pytest.mark.parametrize(
    "name", ["model.safetensors", "config.json", "state.json", "arraygpt-tokenizer.json", "optimizer.safetensors"]
)
@pytest.mark.parametrize("kind, said", SPECIAL, ids=[k for k, _ in SPECIAL])
def test_special_file_in_an_arraygpt_checkpoint(ckpt, name, kind, said):
    replace_with(ckpt / name, kind)
    assert_refused(f"formats.load({str(ckpt)!r})", name, said, "regular file")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
@pytest.mark.parametrize("kind, said", SPECIAL, ids=[k for k, _ in SPECIAL])
def test_special_file_in_a_gpt2_directory(gpt2, name, kind, said):
    replace_with(gpt2 / name, kind)
    assert_refused(f"formats.load({str(gpt2)!r})", name, said, "regular file")


def test_special_file_as_a_tokenizer_file(tmp_path):
    os.mkfifo(tmp_path / "t.json")
    assert_refused(f"tokenizer.read_tokenizer_file({str(tmp_path / 't.json')!r})", "t.json", "FIFO")


def test_special_file_as_a_hugging_face_tokenizer(gpt2):
    pytest.importorskip("tokenizers", reason="the GPT-2 tokenizer needs the optional tokenizers library")
    os.mkfifo(gpt2 / "tokenizer.json")
    assert_refused(f"bpe.load_hf_tokenizer({str(gpt2)!r})", "tokenizer.json", "FIFO")


# ----------------------------------------------------------------------------------------------
# hostile safetensors files

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE = {
    "huge header size": (
        struct.pack("<Q", 2**63) + b"{}",
        ["header of 9223372036854775808 bytes", "at most 100000000"],
    ),
    "header past the end": (struct.pack("<Q", 10_000) + b"{}", ["truncated or corrupted", "header of 10000 bytes"]),
    "no header size": (b"\x01\x02", ["truncated", "8-byte header size"]),
    "header not JSON": (struct.pack("<Q", 3) + b"{{{", ["not valid JSON"]),
    "header not UTF-8": (struct.pack("<Q", 4) + b'{"\xff"', ["not UTF-8"]),
    "header a list": (st_bytes([]), ["a JSON object is required, not list"]),  # type: ignore[arg-type]
    "deep nesting": (struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    "overlapping": (
        st_bytes({"a": F32, "b": {**F32, "data_offsets": [4, 12]}}, bytes(12)),
        ["'b' at data offset 4 overlaps", "must not share bytes"],
    ),
    "gap": (st_bytes({"a": F32, "b": {**F32, "data_offsets": [12, 20]}}, bytes(20)), ["leaves a gap of 4 bytes"]),
    "trailing bytes": (st_bytes({"a": F32}, bytes(12)), ["4 bytes after the last tensor", "cover the data exactly"]),
    "past the end": (st_bytes({"a": {**F32, "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), ["only 8 data bytes"]),
    "duplicate names": (b"", ["'a' appears twice", "names must be unique"]),
    "absurd shape": (
        st_bytes({"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 8]}}, bytes(8)),
        ["needs 4000000000000 bytes", "truncated or corrupted"],
    ),
    "shape overflowing 64 bits": (
        st_bytes({"a": {"dtype": "F64", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}, "b": F32}, bytes(8)),
        ["overflows a 64-bit element count"],
    ),
    "empty tensor NumPy cannot shape": (
        st_bytes({"a": {"dtype": "F32", "shape": [0, 2**40, 2**40], "data_offsets": [0, 0]}, "b": F32}, bytes(8)),
        ["holds no elements", "reach 2^63 bytes"],
    ),
    "empty tensors": (
        st_bytes(
            {
                "a": {"dtype": "F64", "shape": [0, 2**40], "data_offsets": [0, 0]},
                "z": {"dtype": "I8", "shape": [0], "data_offsets": [0, 0]},
                "b": F32,
            },
            bytes(8),
        ),
        [],
    ),
    "negative shape": (st_bytes({"a": {**F32, "shape": [-2]}}, bytes(8)), ["non-negative integers"]),
    "float shape": (st_bytes({"a": {**F32, "shape": [2.0]}}, bytes(8)), ["non-negative integers"]),
    "offsets not integers": (
        st_bytes({"a": {**F32, "data_offsets": ["0", "8"]}}, bytes(8)),
        ["two non-negative integers"],
    ),
    "unknown dtype": (
        st_bytes({"a": {**F32, "dtype": "F128"}}, bytes(8)),
        ["unsupported dtype 'F128'", "allowed: BF16"],
    ),
    "metadata not strings": (st_bytes({"__metadata__": {"k": 1}, "a": F32}, bytes(8)), ["__metadata__", "strings"]),
    "entry not an object": (st_bytes({"a": [1, 2]}, bytes(8)), ["needs dtype, shape and data_offsets"]),
}
dup = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
HOSTILE["duplicate names"] = (struct.pack("<Q", len(dup)) + dup + bytes(8), HOSTILE["duplicate names"][1])


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_safetensors_file(tmp_path, case):
    data, fragments = HOSTILE[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    if not fragments:  # a valid file that looks hostile
        assert attempt(f"safetensors.load_file({str(path)!r})") == ("ok", "")
        return
    message = assert_refused(f"safetensors.load_file({str(path)!r})", str(path), *fragments)
    assert len(message) < 1000


@pytest.mark.parametrize("case", ["huge header size", "overlapping", "absurd shape", "duplicate names"])
def test_hostile_safetensors_file_in_a_checkpoint_and_a_gpt2_directory(ckpt, gpt2, case):
    data, fragments = HOSTILE[case]
    for folder in (ckpt, gpt2):
        (folder / "model.safetensors").write_bytes(data)
        assert_refused(f"formats.load({str(folder)!r})", str(folder / "model.safetensors"), *fragments)


def test_the_reference_library_rejects_them_too(tmp_path):
    for case, (data, fragments) in HOSTILE.items():
        if not fragments or case == "duplicate names":
            continue  # the reference library keeps the last of two entries with one name; arraygpt refuses both
        path = tmp_path / f"{len(os.listdir(tmp_path))}.safetensors"
        path.write_bytes(data)
        with pytest.raises(Exception):
            reference.load_file(str(path))


# ----------------------------------------------------------------------------------------------
# JSON files: size, nesting, type, claimed sizes


def test_huge_and_deep_json_files(ckpt):
    (ckpt / "config.json").write_bytes(b" " * (2 * 1024 * 1024) + b"{}")
    assert_refused(f"formats.load({str(ckpt)!r})", "config.json", "at most 1048576 bytes")
    (ckpt / "config.json").write_text('{"arraygpt_format": 1, "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    assert_refused(f"formats.load({str(ckpt)!r})", "config.json", "nested too deeply")
    (ckpt / "config.json").write_text("[]")
    assert_refused(f"formats.load({str(ckpt)!r})", "config.json", "must hold a JSON object, not list")


def test_hostile_state_json(ckpt):
    state = json.loads((ckpt / "state.json").read_text())
    for change, fragments in [
        ({"extra": [1]}, ["'extra' must be a JSON object"]),
        ({"optimizer": {"step": "1"}}, ["optimizer value 'step' must be a number"]),
        ({"arraygpt_format": 99}, ["format 1", "is 99"]),
    ]:
        (ckpt / "state.json").write_text(json.dumps({**state, **change}))
        assert_refused(f"formats.load({str(ckpt)!r})", "state.json", *fragments)


def test_an_arraygpt_config_claiming_a_billion_layers(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    for field, fragment in [
        ("n_layer", "claims n_layer=1000000000"),
        ("vocab_size", "'wte' has shape (11, 16)"),
        ("block_size", "'wpe' has shape (8, 16)"),
    ]:
        (ckpt / "config.json").write_text(json.dumps({**config, field: 10**9}))
        assert_refused(f"formats.load({str(ckpt)!r})", "config.json", fragment)


def test_a_gpt2_config_claiming_huge_sizes_or_with_wrong_types(gpt2):
    config = json.loads((gpt2 / "config.json").read_text())
    for change, fragment in [
        ({"n_layer": 10**9}, "claims n_layer=1000000000, the file holds 2"),
        ({"vocab_size": 10**9}, "config.json implies (1000000000, 16)"),
        ({"n_positions": 10**9}, "config.json implies (1000000000, 16)"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        ({"n_layer": [2]}, "n_layer must be a positive integer"),
        ({"activation_function": ["gelu"]}, "activation_function must be one of"),
    ]:
        (gpt2 / "config.json").write_text(json.dumps({**config, **change}))
        assert_refused(f"formats.load({str(gpt2)!r})", fragment)


# ----------------------------------------------------------------------------------------------
# sharded directories


def sharded(gpt2: Path) -> dict[str, str]:
    """Split the directory's weights into two shards with an index; return its weight_map."""
    tensors = ag_safetensors.load_file(gpt2 / "model.safetensors")
    (gpt2 / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, part in halves.items():
        ag_safetensors.save_file({n: tensors[n] for n in part}, gpt2 / shard)
        weight_map.update({n: shard for n in part})
    write_index(gpt2, weight_map)
    return weight_map


def write_index(gpt2: Path, weight_map) -> None:
    (gpt2 / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_sharded_directory_loads_and_equals_the_single_file(gpt2):
    from arraygpt.io.formats import load

    single = load(gpt2)
    sharded(gpt2)
    again = load(gpt2)
    for name, value in single.model.state_dict().items():
        assert np.array_equal(value, again.model.state_dict()[name]), name


def test_hostile_shard_indexes(gpt2, tmp_path):
    weight_map = sharded(gpt2)
    first = next(iter(weight_map))
    (tmp_path / "evil.safetensors").write_bytes(b"")
    cases = [
        ({**weight_map, first: "../evil.safetensors"}, "a shard must be a plain file name"),
        ({**weight_map, first: "/etc/passwd"}, "a shard must be a plain file name"),
        ({**weight_map, first: ["a"]}, "a shard must be a plain file name"),
        ([], "'weight_map' must be a non-empty JSON object"),
        ({**weight_map, first: "model-00002-of-00002.safetensors"}, f"holds tensor {first!r}, but"),
        ({**weight_map, "transformer.extra": "model-00001-of-00002.safetensors"}, "which does not hold it"),
        ({**weight_map, first: "missing.safetensors"}, "not a file in"),
    ]
    for mapping, fragment in cases:
        write_index(gpt2, mapping)
        assert_refused(f"formats.load({str(gpt2)!r})", "model.safetensors.index.json", fragment)
    write_index(gpt2, weight_map)
    os.mkfifo(gpt2 / "fifo.safetensors")
    write_index(gpt2, {**weight_map, first: "fifo.safetensors"})
    assert_refused(f"formats.load({str(gpt2)!r})", "fifo.safetensors", "FIFO")


def test_a_tensor_in_two_shards_is_refused(gpt2):
    weight_map = sharded(gpt2)
    first = next(iter(weight_map))
    other = {
        "model-00001-of-00002.safetensors": "model-00002-of-00002.safetensors",
        "model-00002-of-00002.safetensors": "model-00001-of-00002.safetensors",
    }[weight_map[first]]
    tensors = ag_safetensors.load_file(gpt2 / other)
    tensors[first] = ag_safetensors.load_file(gpt2 / weight_map[first])[first]
    ag_safetensors.save_file(tensors, gpt2 / other)
    message = assert_refused(f"formats.load({str(gpt2)!r})", first)
    assert "is in two shards" in message or "but model.safetensors.index.json maps it to" in message, message


# ----------------------------------------------------------------------------------------------
# the reader agrees with the reference library


def test_reader_equals_the_reference_library_and_tensors_own_their_memory(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "f64": rng.normal(size=(3, 4)),
        "f32": rng.normal(size=(5,)).astype(np.float32),
        "f16": rng.normal(size=(2, 2)).astype(np.float16),
        "i64": np.arange(6).reshape(2, 3),
        "u8": np.arange(7, dtype=np.uint8),
        "b": np.array([True, False]),
        "empty": np.zeros((0, 3)),
        "scalar": np.array(2.5),  # 0-d: stays 0-d
        "big_endian": np.arange(4, dtype=">i4"),
        "transposed": np.arange(6.0).reshape(2, 3).T,  # written in C order
    }
    reference.save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    ours = ag_safetensors.load_file(tmp_path / "ref.safetensors")
    theirs = reference.load_file(str(tmp_path / "ref.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name
        assert ours[name].flags.writeable
    arrays = list(ours.values())
    for i, a in enumerate(arrays):
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)
    assert ag_safetensors.read_metadata(tmp_path / "ref.safetensors") == {"k": "v"}
    ag_safetensors.save_file(tensors, tmp_path / "ours.safetensors", metadata={"k": "v"})  # and the other way
    again = reference.load_file(str(tmp_path / "ours.safetensors"))
    assert all(again[n].shape == tensors[n].shape and np.array_equal(again[n], tensors[n]) for n in tensors)


def test_optimizer_state_is_copies_that_share_nothing(ckpt):
    state = load_checkpoint(ckpt).optimizer_state
    arrays = [v for v in state.values() if isinstance(v, np.ndarray)]
    assert len(arrays) >= 2
    for i, a in enumerate(arrays):
        assert a.flags.writeable
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)


def test_gpt2_state_dict_tensors_share_nothing(gpt2):
    from arraygpt.io.hf.gpt2 import config_from_gpt2, state_dict_from_gpt2

    config = config_from_gpt2(json.loads((gpt2 / "config.json").read_text()))
    state = state_dict_from_gpt2(ag_safetensors.load_file(gpt2 / "model.safetensors"), config)
    arrays = list(state.values())
    for i, a in enumerate(arrays):
        for b in arrays[i + 1 :]:
            assert not np.shares_memory(a, b)


def test_bfloat16_is_widened_exactly_to_float32(tmp_path):
    """bfloat16 is float32's top 16 bits; NumPy lacks it, so the reader widens it."""
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, np.inf, 2.0**-130, 65280.0], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    assert np.array_equal((bits.astype(np.uint32) << 16).view(np.float32), values)  # all exact in bfloat16
    header = {
        "w": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [16, 20]},
    }
    (tmp_path / "bf16.safetensors").write_bytes(st_bytes(header, bits.tobytes() + np.float32(7).tobytes()))
    out = ag_safetensors.load_file(tmp_path / "bf16.safetensors")
    assert out["w"].dtype == np.float32 and out["w"].shape == (2, 4)
    np.testing.assert_array_equal(out["w"].ravel(), values)
    assert out["b"].tolist() == [7.0]
    torch = pytest.importorskip("torch", reason="comparing with torch's own bfloat16")
    ref = torch.tensor(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(out["w"].ravel(), ref)


# ----------------------------------------------------------------------------------------------
# fuzz: mutated files give arrays equal to the reference's, or a CheckpointError, never another error


def _valid_file() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        tensors = {
            "a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.arange(4, dtype=np.int64),
            "c": np.ones((2, 2), dtype=np.float16),
        }
        ag_safetensors.save_file(tensors, Path(d) / "v.safetensors", metadata={"k": "v"})
        return (Path(d) / "v.safetensors").read_bytes()


VALID = _valid_file()


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(0, len(VALID)),
)
def test_fuzz_mutated_files(mutations, cut):
    data = bytearray(VALID)
    for position, value in mutations:
        data[position] = value
    data = bytes(data[: max(cut, 1)]) if cut < len(VALID) // 2 else bytes(data)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        path.write_bytes(data)
        try:
            ours = ag_safetensors.load_file(path)
        except CheckpointError:
            return
        theirs = reference.load_file(str(path))
        assert sorted(ours) == sorted(theirs)
        for name in ours:
            assert ours[name].dtype == theirs[name].dtype
            assert np.array_equal(ours[name], theirs[name], equal_nan=ours[name].dtype.kind == "f"), name


# ----------------------------------------------------------------------------------------------
# through the commands: one line on stderr, exit status 2


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    import arraygpt

    out = tmp_path_factory.mktemp("cli") / "run"
    arraygpt.train("names", steps=2, out_dir=str(out), progress=False, samples=0)
    return out


def break_run(run_folder: Path, tmp_path: Path, how: str) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_folder, run, symlinks=True)
    last = run / "last"
    if how == "fifo config":
        replace_with(last / "config.json", "fifo")
    elif how == "/dev/zero weights":
        replace_with(last / "model.safetensors", "/dev/zero")
    elif how == "huge header":
        (last / "model.safetensors").write_bytes(HOSTILE["huge header size"][0])
    elif how == "billion layers":
        config = json.loads((last / "config.json").read_text())
        (last / "config.json").write_text(json.dumps({**config, "n_layer": 10**9}))
    return run


@pytest.mark.parametrize(
    "how, said",
    [
        ("fifo config", "FIFO"),
        ("/dev/zero weights", "character device"),
        ("huge header", "at most 100000000"),
        ("billion layers", "n_layer=1000000000"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "train"])
def test_the_commands_refuse_hostile_checkpoints_with_exit_status_2(run_folder, tmp_path, how, said, command):
    run = break_run(run_folder, tmp_path, how)
    args = (
        ["sample", "--checkpoint", str(run), "--max-new-tokens", "2"]
        if command == "sample"
        else ["train", "--resume", str(run)]
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "arraygpt.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and f"arraygpt {command}: error:" in lines[0], proc.stderr


@pytest.mark.parametrize("bad_id", [200_000_000, 4294967295])
def test_a_small_tokenizer_json_with_an_absurd_id_is_refused_in_bounded_memory(tmp_path, bad_id):
    """Issue 21: a 4 KB tokenizer.json whose one id is 200,000,000 took 1.6 GB before it was refused
    (4294967295: a MemoryError traceback). Here the case runs under a 1 GiB address-space limit."""
    tokenizers = pytest.importorskip(
        "tokenizers", reason="Hugging Face tokenizers need the optional tokenizers library"
    )
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        ["hello world"] * 3,
        tokenizers.trainers.BpeTrainer(vocab_size=270, show_progress=False, initial_alphabet=alphabet),
    )
    spec = json.loads(tok.to_str())
    spec["model"]["vocab"]["he"] = bad_id
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert (tmp_path / "tokenizer.json").stat().st_size < 8192
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (2**30, 2**30))\n"
    assert_refused(limit + f"bpe.load_hf_tokenizer({str(tmp_path)!r})", "tokenizer.json", f"has id {bad_id}")
