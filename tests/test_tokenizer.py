"""Character- and byte-level tokenizers: ids, BOS/EOS, round trips, errors, JSON."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from arraygpt.errors import CheckpointError
from arraygpt.io.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    load_tokenizer,
    read_tokenizer_file,
    save_tokenizer,
    tokenizer_from_dict,
)


def test_char_tokenizer_is_microgpts():
    tok = CharTokenizer.from_text("emma\nolivia\nava\n", bos=True, exclude="\n")
    assert tok.chars == sorted(set("emmaoliviaava"))
    assert tok.bos_id == tok.eos_id == len(tok.chars) and tok.vocab_size == len(tok.chars) + 1
    assert tok.encode("ava") == [tok.chars.index(c) for c in "ava"]
    assert tok.decode([tok.bos_id, *tok.encode("emma"), tok.eos_id]) == "emma"


def test_char_tokenizer_without_bos_is_nanogpts():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text, bos=False)
    assert tok.bos_id is None and tok.eos_id is None
    assert tok.vocab_size == len(set(text))
    assert tok.encode(text) == [sorted(set(text)).index(c) for c in text]
    assert tok.decode(tok.encode(text)) == text


def test_unknown_characters_raise_and_are_listed():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match=r"2 character\(s\).*'xz'"):
        tok.encode("abzcx")


def test_decode_rejects_out_of_vocabulary_ids():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CharTokenizer("abc").decode([0, 9])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ByteTokenizer(bos=False).decode([256])


@pytest.mark.parametrize("chars", ["", "aa", ["ab"]])
def test_bad_alphabets(chars):
    with pytest.raises(ValueError):
        CharTokenizer(chars)


@given(st.text())
def test_byte_tokenizer_round_trips_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text


@given(st.text(alphabet="abcxyz \n", min_size=1))
def test_char_tokenizer_round_trips_its_alphabet(text):
    tok = CharTokenizer.from_text(text, bos=False)
    assert tok.decode(tok.encode(text)) == text


def test_byte_tokenizer_sizes_and_partial_utf8():
    assert (ByteTokenizer(bos=True).vocab_size, ByteTokenizer(bos=False).vocab_size) == (257, 256)
    assert ByteTokenizer().decode(list("é".encode())[:1]) == "\ufffd"


@pytest.mark.parametrize(
    "tok", [CharTokenizer("abc\n", bos=True), CharTokenizer("xy", bos=False), ByteTokenizer(), ByteTokenizer(bos=False)]
)
def test_to_dict_round_trip_and_json_files(tok, tmp_path):
    d = tok.to_dict()
    assert json.loads(json.dumps(d)) == d
    again = tokenizer_from_dict(d)
    assert type(again) is type(tok) and again == tok
    assert (again.vocab_size, again.bos_id, again.eos_id) == (tok.vocab_size, tok.bos_id, tok.eos_id)
    save_tokenizer(tok, tmp_path / "arraygpt-tokenizer.json")
    assert read_tokenizer_file(tmp_path / "arraygpt-tokenizer.json") == tok


def test_load_tokenizer_is_a_deprecated_delegate(tmp_path):
    save_tokenizer(ByteTokenizer(), tmp_path / "t.json")
    with pytest.warns(DeprecationWarning, match="read_tokenizer_file"):
        assert load_tokenizer(tmp_path / "t.json") == ByteTokenizer()


@pytest.mark.parametrize(
    "d, match",
    [
        ({}, "type"),
        ({"type": "bpe"}, "unknown tokenizer type"),
        ({"type": "char"}, "chars"),
        ({"type": "byte", "format": 9}, "format"),
    ],
)
def test_tokenizer_from_dict_errors(d, match):
    with pytest.raises(ValueError, match=match):
        tokenizer_from_dict(d)


def test_read_tokenizer_file_rejects_broken_json(tmp_path):
    (tmp_path / "t.json").write_text('{"type": "ch')
    with pytest.raises(
        CheckpointError, match=r"t\.json: the tokenizer file is truncated or corrupted \(not valid JSON"
    ):
        read_tokenizer_file(tmp_path / "t.json")


def test_read_tokenizer_file_names_the_right_reader_for_a_hugging_face_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    with pytest.raises(CheckpointError, match="load_hf_tokenizer"):
        read_tokenizer_file(tmp_path / "tokenizer.json")


def test_a_lone_surrogate_in_a_tokenizer_file_is_refused_when_read(tmp_path):
    # JSON may spell one (\ud800); no text holds one, and UTF-8 cannot encode it
    (tmp_path / "arraygpt-tokenizer.json").write_text(
        '{"type": "char", "format": 1, "chars": "ab\\ud800", "bos": true}'
    )
    assert "\ud800" in json.loads((tmp_path / "arraygpt-tokenizer.json").read_text())["chars"]
    with pytest.raises(
        CheckpointError, match=r"arraygpt-tokenizer\.json: .*'chars' holds a lone surrogate \(\\ud800\)"
    ):
        read_tokenizer_file(tmp_path / "arraygpt-tokenizer.json")
