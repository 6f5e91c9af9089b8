"""Data sources, the two feeding modes, the deterministic split, batches and the batcher state."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from arraygpt.io.tokenizers import ByteTokenizer, CharTokenizer
from arraygpt.training.data import (
    Batcher,
    DataError,
    DocumentDataset,
    StreamDataset,
    default_tokenizer,
    make_dataset,
    names_documents,
    read_source,
    split_documents,
)

DOCS = ["anna", "bob", "christopher", "di", "eve", "frederica", "gus", "hal", "ines", "jo", "kazimierz", "lu"]
TEXT = "\n".join(DOCS) + "\n"


def _docs(block_size=8, val_fraction=0.25):
    return DocumentDataset(TEXT, default_tokenizer("char", TEXT, "documents"), block_size, val_fraction)


def test_split_documents_drops_empty_lines_and_crlf():
    assert split_documents("a\r\n\nbb\n  \nc") == ["a", "bb", "  ", "c"]


def test_documents_split_is_deterministic_and_the_last_fraction_is_val():
    a, b = _docs(), _docs()
    assert a.documents == b.documents and sorted(a.documents) == sorted(DOCS)
    assert a.split_size("train") == 9 and a.split_size("val") == 3
    assert list(a.splits["val"]) == [9, 10, 11]  # the tail of the (fixed) shuffle
    c = DocumentDataset(TEXT, a.tokenizer, 8, 0.25, split_seed=7)
    assert c.documents != a.documents


def test_document_rows_are_wrapped_in_bos_and_padded():
    ds = _docs(block_size=16)
    bos = ds.tokenizer.bos_id
    batcher = Batcher(ds, batch_size=4, seed=0)
    x, y = batcher.next()
    assert x.shape == y.shape and x.dtype == np.int64
    for row_x, row_y in zip(x, y):
        n = int((row_y >= 0).sum())
        doc = ds.tokenizer.decode(row_x[1:n].tolist())
        assert row_x[0] == bos and row_y[n - 1] == bos  # [BOS] doc -> doc [BOS]
        assert doc in DOCS and n == len(doc) + 1
        assert (row_y[n:] == -1).all() and (row_x[n:] == bos).all()  # pads: ignored targets
        assert (row_x[1:n] == row_y[: n - 1]).all()  # targets are the inputs shifted by one


def test_long_documents_give_random_windows_of_block_size_plus_one():
    ds = _docs(block_size=4)
    for seed in range(5):
        x, y = Batcher(ds, 12, seed=seed).next()
        assert x.shape[1] <= 4
        for row_x, row_y in zip(x, y):
            n = int((row_y >= 0).sum())
            window = ds.tokenizer.decode([*row_x[:n].tolist(), int(row_y[n - 1])])
            assert any(window in d for d in DOCS)


def test_an_epoch_visits_every_training_document_once():
    ds = _docs(block_size=16)
    batcher = Batcher(ds, batch_size=3, seed=1)
    seen = []
    for _ in range(3):  # 9 training documents
        x, y = batcher.next()
        seen += [ds.tokenizer.decode(r[1 : int((ry >= 0).sum())].tolist()) for r, ry in zip(x, y)]
    assert sorted(seen) == sorted(ds.documents[:9])
    assert batcher.epoch == 1 and batcher.position == 0


def test_batcher_state_round_trip_gives_the_same_batches():
    for ds in (_docs(block_size=4), StreamDataset(TEXT * 3, CharTokenizer.from_text(TEXT, bos=False), 8)):
        a = Batcher(ds, 5, seed=3)
        for _ in range(4):
            a.next()
        state = a.state_dict()
        expected = [a.next() for _ in range(3)]
        b = Batcher(ds, 5, seed=3)
        b.load_state_dict(state)
        for ex, got in zip(expected, (b.next() for _ in range(3))):
            np.testing.assert_array_equal(ex[0], got[0])
            np.testing.assert_array_equal(ex[1], got[1])


@pytest.mark.parametrize("block_size", [2, 5, 16])
def test_document_eval_batches_hold_one_fixed_row_per_document(block_size):
    ds = _docs(block_size=block_size)
    for split in ("train", "val"):
        batches = list(ds.eval_batches(split, 4, seed=3))
        assert sum(x.shape[0] for x, _ in batches) == ds.split_size(split)
        n_targets = sum(int((y >= 0).sum()) for _, y in batches)
        assert n_targets == sum(min(len(ds.documents[d]) + 2, block_size + 1) - 1 for d in ds.splits[split])
        again = list(ds.eval_batches(split, 4, seed=3))  # the same rows at every evaluation
        for (x1, y1), (x2, y2) in zip(batches, again):
            np.testing.assert_array_equal(x1, x2)
            np.testing.assert_array_equal(y1, y2)
        for x, y in batches:  # each row is a window of a document of the split, like a training row
            for row_x, row_y in zip(x, y):
                n = int((row_y >= 0).sum())
                window = ds.tokenizer.decode([*row_x[:n].tolist(), int(row_y[n - 1])])
                assert any(window in ds.documents[d] for d in ds.splits[split])
    assert len(list(ds.eval_batches("train", 2, max_batches=2, seed=0))) == 2


def test_stream_split_windows_and_eval():
    text = "abcdefghij" * 10  # 100 tokens
    tok = CharTokenizer.from_text(text, bos=False)
    ds = StreamDataset(text, tok, block_size=8, val_fraction=0.1)
    assert ds.split_size("train") == 90 and ds.split_size("val") == 10  # first 90% / last 10%
    np.testing.assert_array_equal(ds.data["val"], tok.encode(text[90:]))
    x, y = Batcher(ds, 6, seed=0).next()
    assert x.shape == y.shape == (6, 8)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert ((y - x) % 10 == 1).all()  # each target is the next letter
    batches = list(ds.eval_batches("train", 4))
    assert sum(b[0].shape[0] for b in batches) == 11  # windows starting at 0, 8, ..., 80
    assert len(list(ds.eval_batches("train", 4, max_batches=2))) == 2


def test_empty_dataset_is_an_error():
    with pytest.raises(DataError, match="empty"):
        default_tokenizer("char", "\n\n", "documents")
    with pytest.raises(DataError, match="empty"):
        DocumentDataset("\n \n"[:1], ByteTokenizer(), 8)
    with pytest.raises(DataError, match="empty"):
        StreamDataset("", ByteTokenizer(bos=False), 8)


def test_unknown_characters_are_an_error():
    tok = CharTokenizer("abc")
    with pytest.raises(DataError, match="'xz'"):
        DocumentDataset("abc\nax\nzz\n", tok, 8, 0.3)
    with pytest.raises(DataError, match="'x'"):
        StreamDataset("abcx" * 10, CharTokenizer("abc", bos=False), 4)


def test_block_size_larger_than_the_stream_allows_is_an_error():
    tok = CharTokenizer("ab", bos=False)
    with pytest.raises(DataError, match="block_size 64 is larger than the val split"):
        StreamDataset("ab" * 100, tok, 64)  # val has 20 tokens


def test_too_few_documents_and_bad_arguments():
    tok = CharTokenizer("ab")
    with pytest.raises(DataError, match="too few"):
        DocumentDataset("ab\n", tok, 8)
    with pytest.raises(DataError, match="BOS"):
        DocumentDataset("ab\nba\n", CharTokenizer("ab", bos=False), 8, 0.5)
    with pytest.raises(DataError, match="batch_size"):
        Batcher(DocumentDataset("ab\nba\n", tok, 8, 0.5), 0)
    with pytest.raises(ValueError, match="mode"):
        make_dataset("ab", tok, "chunks", 8)


def test_missing_file_names_the_built_in_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="names"):
        read_source(tmp_path / "nope.txt")


def test_names_source_from_the_names_package():
    pytest.importorskip("names")
    docs = names_documents()
    assert len(docs) == len(set(docs)) > 5000
    assert docs[:3] == ["mary", "patricia", "linda"]
    tok = default_tokenizer("char", read_source("names"), "documents")
    assert tok.vocab_size == 27 and tok.bos_id == 26  # the microgpt preset's vocabulary


def test_names_source_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "names", None)
    with pytest.raises(ImportError, match=r"pip install 'arraygpt\[names\]'"):
        read_source("names")


def test_shared_data_files(shared_data):
    names_text = read_source(shared_data / "names.txt")
    tok = default_tokenizer("char", names_text, "documents")
    ds = DocumentDataset(names_text, tok, 16)
    assert len(ds) == 32033 and tok.vocab_size == 27
    assert ds.split_size("val") == 32033 - int(32033 * 0.9)
    shakespeare = read_source(shared_data / "tinyshakespeare.txt")
    tok = default_tokenizer("char", shakespeare, "stream")
    stream = StreamDataset(shakespeare, tok, 64)
    assert tok.vocab_size == 65 and stream.split_size("train") == 1_003_854 and stream.split_size("val") == 111_540
