"""A GGUF's tokenizer is checked at load and built on first read (``DeferredTokenizer``): a
generation from token ids never imports the tokenizers library. Checked in fresh interpreters
(what a process has imported is the point), against the ``tokenizers`` library's own tokenizer
that the file was written from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

tokenizers = pytest.importorskip("tokenizers")

from arraygpt import GPT, GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io.bpe import BPETokenizer
from arraygpt.io.checkpoint import Checkpoint, DeferredTokenizer
from arraygpt.io.gguf import save_gguf

TEXTS = ["The quick brown fox", "hello world 1234", "Héllo wörld 🙂"]


def _trained() -> tokenizers.Tokenizer:
    pre = tokenizers.pre_tokenizers
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, show_progress=False, initial_alphabet=pre.ByteLevel.alphabet()
    )
    raw.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 4, "hello world 1234"], trainer=trainer)
    raw.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", special=True, normalized=False)])
    return raw


_PROBE = """
import json, sys
import numpy as np
import arraygpt
ckpt = arraygpt.load(sys.argv[1])
ckpt.model.forward(np.array([[1, 2, 3]]))
before = sorted(m for m in ("tokenizers", "arraygpt.io.bpe") if m in sys.modules)
tok = ckpt.tokenizer
texts = json.loads(sys.argv[2])
print(json.dumps({"before": before, "after": "tokenizers" in sys.modules,
                  "ids": [tok.encode(t) for t in texts], "same": tok is ckpt.tokenizer}))
"""


def test_a_gguf_load_and_forward_import_no_tokenizers_until_the_tokenizer_is_read(tmp_path):
    raw = _trained()
    eos = raw.token_to_id("<|endoftext|>")
    config = GPTConfig.preset("llama-tiny", vocab_size=320)
    path = save_gguf(GPT(config, seed=0), tmp_path / "m.gguf", tokenizer=BPETokenizer(raw, bos_id=eos, eos_ids=[eos]))
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), json.dumps(TEXTS)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert "tokenizers" not in seen["before"], seen  # load + forward: the library is not imported
    assert seen["after"] and seen["same"]  # built on the first read, then kept
    assert seen["ids"] == [raw.encode(t).ids for t in TEXTS]  # the library's own tokenizer's ids


def test_a_gguf_tokenizer_that_lies_is_refused_at_load_not_at_first_read(tmp_path):
    config = GPTConfig.preset("llama-tiny", vocab_size=320)
    raw = _trained()
    eos = raw.token_to_id("<|endoftext|>")
    path = save_gguf(GPT(config, seed=0), tmp_path / "m.gguf", tokenizer=BPETokenizer(raw, bos_id=eos, eos_ids=[eos]))
    data = bytearray(path.read_bytes())
    first = json.loads(raw.to_str())["model"]["merges"][0]
    merge = (first if isinstance(first, str) else " ".join(first)).encode()  # as the file stores it: "a b"
    at = data.index(merge)
    data[at : at + len(merge)] = b"Q" * len(merge)  # now not two tokens separated by a space
    path.write_bytes(bytes(data))
    code = (
        "import json, sys\nimport arraygpt\nfrom arraygpt.errors import CheckpointError\n"
        "try:\n    arraygpt.load(sys.argv[1])\nexcept CheckpointError as e:\n"
        "    print(json.dumps([str(e), 'tokenizers' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    message, imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert "not two tokens separated by one space" in message and not imported


def test_a_deferred_tokenizer_is_built_once_and_a_failed_build_raises_again():
    calls = []

    def build():
        calls.append(1)
        return "the tokenizer"

    ckpt = Checkpoint(model=None, tokenizer=DeferredTokenizer(build), optimizer_state=None)
    assert "tokenizer=DeferredTokenizer(built on first read)" in repr(ckpt) and calls == []
    assert ckpt.tokenizer == "the tokenizer" and ckpt.tokenizer == "the tokenizer"
    assert calls == [1] and "tokenizer='the tokenizer', optimizer_state=None" in repr(ckpt)

    def fail():
        calls.append(2)
        raise CheckpointError("x.gguf: bad")

    ckpt = Checkpoint(model=None, tokenizer=DeferredTokenizer(fail), optimizer_state=None)
    for _ in range(2):
        with pytest.raises(CheckpointError, match="bad"):
            ckpt.tokenizer
    assert calls == [1, 2, 2]
    with pytest.raises(TypeError, match="tokenizer"):
        Checkpoint(model=None, optimizer_state=None)  # still a required field
