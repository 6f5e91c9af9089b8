"""GPT-2's byte-level BPE (arraygpt.io.bpe.load_hf_tokenizer): any text and any byte string
round-trips, both file layouts (vocab.json + merges.txt, tokenizer.json) agree with each other and
with the ``tokenizers`` library, other tokenizer.json layouts load too, and bad directories are
clear errors. Llama 3, Qwen2 and SmolLM2 tokenizers: tests/test_llama_tokenizers.py.

The tokenizer is a tiny byte-level BPE trained here with ``tokenizers`` on a few sentences:
nothing is downloaded. Skipped when the optional ``tokenizers`` library is missing.
"""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stdout

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import arraygpt

tokenizers = pytest.importorskip("tokenizers", reason="the BPE tokenizer needs the extra: pip install 'arraygpt[hf]'")

from arraygpt import GPT, GPTConfig
from arraygpt.io.bpe import BYTE_TO_CHAR, BPETokenizer, load_hf_tokenizer, load_tokenizer
from arraygpt.io.hf.gpt2 import load_gpt2

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, world.",
    "Ünïcödé and 日本語 and emoji 🙂 in a sentence.",
    "the the the and and of of to to in in",
    "  leading spaces, tabs\tand\nnewlines\r\n",
]
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte-level BPE saved both ways: (dir with vocab.json + merges.txt, dir with tokenizer.json)."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=400, min_frequency=1, special_tokens=[EOT], show_progress=False)
    files = tmp_path_factory.mktemp("vocab-merges")
    bpe.save_model(str(files))
    single = tmp_path_factory.mktemp("tokenizer-json")
    bpe.save(str(single / "tokenizer.json"))
    return files, single, bpe


@pytest.fixture(scope="module")
def tok_files(trained):
    return load_hf_tokenizer(trained[0])


@pytest.fixture(scope="module")
def tok_json(trained):
    return load_hf_tokenizer(trained[1])


@pytest.fixture(params=["vocab+merges", "tokenizer.json"])
def tok(request, tok_files, tok_json):
    return tok_files if request.param == "vocab+merges" else tok_json


# ----------------------------------------------------------------------------------------------
# round trips


@given(text=st.text())
@example(text="")
@example(text=f"a{EOT}b {EOT}")
@example(text="\x00\r\n\t\u2028\ufeff\U0010ffff")
def test_any_text_round_trips(tok_files, tok_json, text):
    for tok in (tok_files, tok_json):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode_bytes(text.encode("utf-8")) == ids


@given(data=st.binary(max_size=200))
@example(data=b"\xff\xfe\x80abc\xc3")  # stray continuation bytes, a truncated character at the end
@example(data=b"\xed\xa0\x80")  # an encoded surrogate: not valid UTF-8
@example(data="h\u00e9llo".encode()[:-3] + b"\xe6\x97")  # cut inside characters
def test_any_bytes_round_trip(tok_files, tok_json, data):
    for tok in (tok_files, tok_json):
        ids = tok.encode_bytes(data)
        assert tok.decode_bytes(ids) == data
        assert tok.decode(ids) == data.decode("utf-8", errors="replace")


@given(text=st.text(max_size=60))
def test_both_file_layouts_and_the_tokenizers_library_agree(trained, tok_files, tok_json, text):
    bpe = trained[2]
    reference = bpe.encode(text).ids
    assert tok_files.encode(text) == tok_json.encode(text) == reference
    assert tok_json.decode(reference) == bpe.decode(reference, skip_special_tokens=False)


@pytest.fixture(scope="module")
def hf_tokenizer(trained):
    transformers = pytest.importorskip("transformers", reason="comparing with transformers needs it installed")
    return transformers.GPT2Tokenizer.from_pretrained(str(trained[0]))  # a local directory: no download


@given(text=st.text(max_size=60))
@example(text=f" hello{EOT}world  x")
def test_same_ids_as_transformers_gpt2_tokenizer(hf_tokenizer, tok_files, text):
    assert tok_files.encode(text) == hf_tokenizer.encode(text)


def test_reads_the_tokenizer_json_transformers_writes(hf_tokenizer, tok_files, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)
    text = f"Hello world{EOT} 日本語 🙂"
    assert load_hf_tokenizer(tmp_path).encode(text) == tok_files.encode(text)


def test_byte_table_is_the_one_tokenizers_uses():
    assert set(BYTE_TO_CHAR.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    text = "".join(map(chr, range(0x800)))  # every 1- and 2-byte UTF-8 sequence: all 256 byte values
    pieces = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    assert "".join(p for p, _ in pieces) == "".join(BYTE_TO_CHAR[b] for b in text.encode())


# ----------------------------------------------------------------------------------------------
# the interface the training and generation code expects


def test_interface_and_special_token(tok, trained):
    bpe = trained[2]
    assert isinstance(tok, BPETokenizer)
    assert tok.vocab_size == bpe.get_vocab_size()
    assert tok.bos_id == tok.eos_id == bpe.token_to_id(EOT)
    assert tok.encode(EOT) == [tok.eos_id]
    assert tok.encode(f"Hello{EOT}world") == tok.encode("Hello") + [tok.eos_id] + tok.encode("world")
    assert tok.decode([tok.eos_id]) == EOT
    assert tok.decode(np.array(tok.encode("Hello world"))) == "Hello world"  # NumPy ids are fine


def test_bad_input_is_a_clear_error(tok):
    with pytest.raises(ValueError, match=r"token id -1 is not in the vocabulary"):
        tok.decode([-1])
    with pytest.raises(ValueError, match=rf"token id {tok.vocab_size} is not in the vocabulary"):
        tok.decode_bytes([0, tok.vocab_size])
    with pytest.raises(ValueError, match="lone surrogate at index 1"):
        tok.encode("a\ud800b")
    with pytest.raises(TypeError, match="encode_bytes"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="encode_bytes takes bytes"):
        tok.encode_bytes("text")


def test_save_then_load(tok_files, tmp_path):
    tok_files.save(tmp_path)
    again = load_hf_tokenizer(tmp_path)
    text = "Hello world, 日本語 🙂"
    assert again.encode(text) == tok_files.encode(text) and again.vocab_size == tok_files.vocab_size


# ----------------------------------------------------------------------------------------------
# errors


def test_missing_directory_or_files(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_hf_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json and no vocab.json"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_bytes((trained[0] / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="found only vocab.json"):
        load_hf_tokenizer(tmp_path)


def test_other_tokenizer_json_layouts_load_and_agree_with_the_tokenizers_library(trained, tmp_path):
    """Not only GPT-2's layout: a normalizer, a prefix space, another pre-tokenizer, another model."""
    from arraygpt.io.bpe import HFTokenizer

    spec = json.loads((trained[1] / "tokenizer.json").read_text(encoding="utf-8"))
    text = "Hello world, Ünïcödé 日本語 🙂"
    for change, cls in [
        ({"pre_tokenizer": {"type": "Whitespace"}}, BPETokenizer),
        ({"normalizer": {"type": "NFC"}}, BPETokenizer),
        ({"pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}}, BPETokenizer),
        (
            {
                "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "Hello": 1, "world": 2}, "unk_token": "[UNK]"},
                "pre_tokenizer": {"type": "Whitespace"},
                "decoder": None,
                "added_tokens": [],
            },
            HFTokenizer,
        ),
    ]:
        (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, **change}), encoding="utf-8")
        tok = load_hf_tokenizer(tmp_path)
        reference = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
        assert type(tok) is cls, change
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=False)


def test_unreadable_tokenizer_json_is_one_checkpoint_error_naming_the_file(trained, tmp_path):
    from arraygpt.errors import CheckpointError

    spec = json.loads((trained[1] / "tokenizer.json").read_text(encoding="utf-8"))
    for content, match in [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps({**spec, "model": {"type": "NoSuchModel"}}), "the tokenizers library cannot read it"),
    ]:
        (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
        with pytest.raises(CheckpointError, match=rf"tokenizer\.json: .*{match}"):
            load_hf_tokenizer(tmp_path)


def test_vocabulary_without_every_byte_loads_and_encodes_as_the_library_does(trained, tmp_path):
    vocab = json.loads((trained[0] / "vocab.json").read_text(encoding="utf-8"))
    merges = (trained[0] / "merges.txt").read_text(encoding="utf-8").splitlines()
    byte = BYTE_TO_CHAR[0xFF]
    kept = {t: i for t, i in vocab.items() if t != byte}
    (tmp_path / "vocab.json").write_text(json.dumps(kept), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(m for m in merges if byte not in m.split()) + "\n", encoding="utf-8")
    tok = load_hf_tokenizer(tmp_path)
    reference = tokenizers.Tokenizer(
        tokenizers.models.BPE.from_file(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    )
    reference.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    reference.decoder = tokenizers.decoders.ByteLevel()
    text = "ÿes, ÿ is U+00FF: its UTF-8 is c3 bf, both bytes in the vocabulary"
    assert tok.missing_bytes == (0xFF,)
    assert tok.encode(text) == reference.encode(text).ids
    assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text).ids) == text
    with pytest.raises(ValueError, match=r"no token for byte\(s\) 0xff, so no ids encode them"):
        tok.encode_bytes(b"ok \xff")


def test_missing_extra_says_how_to_install(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'arraygpt\[hf\]'"):
        load_hf_tokenizer(trained[1])


# ----------------------------------------------------------------------------------------------
# a whole GPT-2 directory: weights, config and tokenizer side by side


@pytest.fixture
def gpt2_dir(tok_json, tmp_path):
    config = GPTConfig(vocab_size=tok_json.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    arraygpt.save(GPT(config, seed=0), tmp_path, format="gpt2")
    tok_json.save(tmp_path)
    return tmp_path


def test_gpt2_directory_runs_end_to_end(gpt2_dir):
    model, tok = load_gpt2(gpt2_dir), load_hf_tokenizer(gpt2_dir)
    ids = tok.encode("Hello world")
    logits, _ = model.forward(np.array([ids]))
    assert logits.shape == (1, len(ids), tok.vocab_size)


def test_load_tokenizer_is_a_deprecated_delegate(gpt2_dir):
    with pytest.warns(DeprecationWarning, match="load_hf_tokenizer"):
        tok = load_tokenizer(gpt2_dir)
    assert tok.encode("Hello world") == load_hf_tokenizer(gpt2_dir).encode("Hello world")


def test_formats_load_reads_the_gpt2_directory_with_its_tokenizer(gpt2_dir):
    from arraygpt.io.formats import load

    ckpt = load(gpt2_dir)
    assert ckpt.format == "gpt2" and ckpt.prompt_prefix == [] and isinstance(ckpt.tokenizer, BPETokenizer)
    assert ckpt.tokenizer.encode("Hello") == load_hf_tokenizer(gpt2_dir).encode("Hello")


def test_formats_save_gpt2_writes_the_tokenizer(gpt2_dir, tmp_path):
    from arraygpt.io.formats import load, save

    ckpt = load(gpt2_dir)
    out = save(ckpt.model, tmp_path / "again", format="gpt2", tokenizer=ckpt.tokenizer)
    assert (out / "tokenizer.json").is_file()
    again = load(out)
    assert again.tokenizer.encode("Hello world") == ckpt.tokenizer.encode("Hello world")
    assert np.array_equal(again.model.state_dict()["wte"], ckpt.model.state_dict()["wte"])


def test_sample_command_reads_a_gpt2_directory(gpt2_dir):
    from arraygpt import cli

    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(
            [
                "sample",
                "--checkpoint",
                str(gpt2_dir),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "4",
                "--sampler",
                "greedy",
            ]
        )
    assert rc == 0
    assert out.getvalue().startswith("Hello")


def test_a_chat_template_sees_every_named_special_token_as_in_transformers(tmp_path):
    """transformers hands a template its named special tokens (pad, unk, sep, ...), not only BOS
    and EOS; a tokenizer saved by arraygpt keeps them."""
    transformers = pytest.importorskip("transformers")
    from tiny_hf import byte_level_bpe

    specials = ["<s>", "</s>", "<pad>", "<unk>", "<sep>", "<tool>", "<think>"]
    byte_level_bpe(["hello there"] * 4, specials).save(str(tmp_path / "tokenizer.json"))
    template = (
        "{{ pad_token }}|{{ unk_token }}|{{ sep_token }}|{{ bos_token }}|{{ eos_token }}|"
        "{{ cls_token is defined }}|"
        "{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    config |= {"pad_token": "<pad>", "unk_token": "<unk>", "sep_token": "<sep>", "cls_token": None}
    config |= {"additional_special_tokens": ["<tool>", "<think>"], "chat_template": template}  # not passed
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}]
    want = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(messages, tokenize=False)
    assert want == "<pad>|<unk>|<sep>|<s>|</s>|False|hi"
    ours = load_hf_tokenizer(tmp_path)
    assert ours.apply_chat_template(messages) == want
    ours.save(tmp_path / "saved")
    saved = load_hf_tokenizer(tmp_path / "saved")
    assert saved.apply_chat_template(messages) == want
    assert (
        transformers.AutoTokenizer.from_pretrained(tmp_path / "saved").apply_chat_template(messages, tokenize=False)
        == want
    )
    config["pad_token"] = "<nope>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(arraygpt.errors.CheckpointError, match="pad_token '<nope>' is not a token"):
        load_hf_tokenizer(tmp_path)
