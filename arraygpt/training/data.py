"""Training data: sources, the train/val split, and batches of token ids on the host.

Two ways to feed text to a GPT:

- **documents** (microgpt): one document per line, each tokenized and wrapped in BOS,
  ``[BOS, c1, ..., cn, BOS]``; a batch holds B documents. A document longer than ``block_size + 1``
  tokens contributes a random window of that length. Shorter rows are padded: inputs with BOS,
  targets with -1, which the loss ignores. Evaluation draws its rows the same way (one per
  document, windows fixed by a seed), so train and val losses measure the training objective.
  The documents are shuffled once with a fixed seed
  (``split_seed``, not the run's seed), then the last ``val_fraction`` of them is the validation
  split. Training walks through the training documents one epoch at a time, in an order that is a
  fixed function of (seed, epoch).
- **stream** (nanoGPT's shakespeare_char): the whole text is one token stream; the first
  ``1 - val_fraction`` is train and the rest val (``data[:int(n*0.9)]``); a batch holds B random
  windows of ``block_size + 1`` tokens.

Sources: a text file path, or ``names``: the US Census first names of the ``names`` PyPI package
(the optional extra ``arraygpt[names]``), lowercased, one per line, duplicates dropped. A text file
must be a regular file (not a FIFO, a device or a folder) of UTF-8 text without NUL bytes, of at
most :data:`MAX_TEXT_BYTES` (256 MiB; ``ARRAYGPT_MAX_DATA_BYTES`` raises it); anything else is a
:class:`DataError` before anything large is read (docs/reliability.md).

Everything here is host NumPy (int64 ids); the model moves batches to its backend. All
randomness comes from a :class:`Batcher`'s own generator, whose state is saved with checkpoints.

Not here: tokenizers (``arraygpt.io.tokenizers``), the training loop.
"""

from __future__ import annotations

import hashlib
import numbers
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.errors import DataError
from arraygpt.io.files import read_at_most
from arraygpt.io.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer

MODES = ("documents", "stream")
BUILTIN_SOURCES = ("names",)
NAMES_INSTALL_HINT = "pip install 'arraygpt[names]'  (or: pip install names)"
MAX_TEXT_BYTES = 256 * 1024 * 1024  # bytes of training text read; a char-tokenized token takes ~16 bytes of memory
MAX_TEXT_ENV = "ARRAYGPT_MAX_DATA_BYTES"  # raises (or lowers) that limit
_KINDS = {
    stat.S_IFDIR: "folder",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


# ----------------------------------------------------------------------------------------------
# sources


def names_documents() -> list[str]:
    """The first names of the ``names`` package (US Census 1990, female then male), lowercased,
    each once, in the package's order (by frequency).

    Raises:
        ImportError: the ``names`` package is not installed; the message says how to install it.
    """
    try:
        import names
    except ImportError:
        raise ImportError(f"the built-in 'names' data set needs the 'names' package: {NAMES_INSTALL_HINT}") from None
    seen: dict[str, None] = {}
    for key in ("first:female", "first:male"):
        with open(names.FILES[key], encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if fields:
                    seen.setdefault(fields[0].lower(), None)
    return list(seen)


def max_text_bytes() -> int:
    """The most bytes of training text :func:`read_source` reads: ``ARRAYGPT_MAX_DATA_BYTES`` when
    set, else :data:`MAX_TEXT_BYTES`."""
    value = os.environ.get(MAX_TEXT_ENV)
    if value is None:
        return MAX_TEXT_BYTES
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise DataError(f"{MAX_TEXT_ENV}={value!r} must be a positive number of bytes")
    return limit


def read_source(source: str | Path) -> str:
    """The text of a source: ``names`` (one name per line) or a UTF-8 text file path.

    The file is checked before it is read: a regular file (a symlink to one counts), never a FIFO,
    a device or a folder (opened without blocking, so a FIFO never hangs), of at most
    :func:`max_text_bytes` bytes; then read with that bound, decoded as strict UTF-8, and refused if
    it holds NUL bytes (a binary file) or nothing but whitespace.

    Raises:
        FileNotFoundError: the path does not exist (the message names the built-in sources).
        DataError: naming the file, what is wrong and what is allowed.
    """
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        return "\n".join(names_documents()) + "\n"
    path = Path(source)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"data source {str(source)!r} is neither a file nor a built-in data set ({', '.join(BUILTIN_SOURCES)})"
        ) from None
    except IsADirectoryError:
        raise DataError(f"training text {path} is a folder; give a UTF-8 text file") from None
    except OSError as e:
        raise DataError(f"training text {path} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise DataError(f"training text {path} is a folder; give a UTF-8 text file")
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
            raise DataError(f"training text {path} is a {kind}, not a regular file; give a UTF-8 text file")
        limit = max_text_bytes()
        if st.st_size > limit:
            raise DataError(
                f"training text {path} is {st.st_size:,} bytes; at most {limit:,} bytes are read "
                f"(set {MAX_TEXT_ENV} to raise the limit, or train on a part of the file)"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    with open(fd, "rb", closefd=True) as f:
        data = read_at_most(f, st.st_size, limit)
    if len(data) > limit:
        raise DataError(f"training text {path} grew past {limit:,} bytes while it was read; at most {limit:,} are read")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows Notepad's) is no text
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"training text {path} is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) "
            f"{e.reason}; convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE)"
        ) from None
    if "\x00" in text:
        raise DataError(
            f"training text {path} holds NUL bytes (first at offset {data.index(0)}): it looks like a binary file; "
            "give a UTF-8 text file"
        )
    if not text.strip():
        what = "empty" if not text else "only whitespace"
        raise DataError(f"training text {path} is {what}; give a file with at least one line of text")
    return text


def resolve_source(source: str | Path) -> str:
    """The source as a run records it: a built-in name as is, a file as its absolute path, so that
    ``--resume`` reads the same file from any working directory.

    Example:
        >>> resolve_source("names")
        'names'
    """
    if isinstance(source, str) and source in BUILTIN_SOURCES:
        return source
    return str(Path(source).absolute())


def split_documents(text: str) -> list[str]:
    """One document per line (line endings removed); empty lines are dropped."""
    return [line for line in (raw.rstrip("\r") for raw in text.split("\n")) if line]


def fingerprint(text: str) -> str:
    """sha256 of the text: a resumed run checks that its data did not change."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_tokenizer(kind: str, text: str, mode: str) -> Tokenizer:
    """The tokenizer a run builds from its data: ``char`` (the text's sorted characters; a BOS
    token in documents mode) or ``byte``."""
    if mode not in MODES:
        raise ValueError(f"unknown data mode {mode!r}; choose one of {', '.join(MODES)}")
    documents = mode == "documents"
    if kind == "char":
        chars = "".join(split_documents(text)) if documents else text
        if not chars.strip():
            raise DataError("the data set is empty: there is no text to build a tokenizer from")
        return CharTokenizer.from_text(chars, bos=documents)
    if kind == "byte":
        return ByteTokenizer(bos=documents)
    raise ValueError(f"unknown tokenizer {kind!r}; choose char, byte or a tokenizer JSON file")


# ----------------------------------------------------------------------------------------------
# data sets


@dataclass
class _Rows:
    """Eval rows of a documents split: document, window start and width, one per document."""

    doc: np.ndarray
    start: np.ndarray
    width: np.ndarray


class DocumentDataset:
    """Documents, one per line, each ``[BOS] + tokens + [BOS]``, split by whole documents.

    Args:
        text: the raw text (one document per line).
        tokenizer: must have a BOS token.
        block_size: the model's context; rows have at most ``block_size + 1`` tokens.
        val_fraction: share of documents held out (after a shuffle with ``split_seed``).
        split_seed: seed of that one shuffle (42, as microgpt's ``random.seed(42)``).

    Raises:
        DataError: no documents, too few to split, or characters the tokenizer does not know.
    """

    mode = "documents"

    def __init__(
        self, text: str, tokenizer: Tokenizer, block_size: int, val_fraction: float = 0.1, split_seed: int = 42
    ):
        _check_common(tokenizer, block_size, val_fraction)
        if tokenizer.bos_id is None:
            raise DataError("documents mode needs a tokenizer with a BOS token (build it with bos=True)")
        docs = split_documents(text)
        if not docs:
            raise DataError("the data set is empty: it has no non-empty lines (documents)")
        n_train = int(len(docs) * (1.0 - val_fraction))
        n_val = len(docs) - n_train
        if n_train < 1 or (val_fraction > 0 and n_val < 1):
            raise DataError(
                f"{len(docs)} document(s) are too few for a train/val split with val_fraction={val_fraction}"
            )
        order = np.random.default_rng(split_seed).permutation(len(docs))
        docs = [docs[i] for i in order]
        _check_known(tokenizer, "".join(docs))
        encoded = [tokenizer.encode(d) for d in docs]
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.documents = docs
        bos = tokenizer.bos_id
        lengths = np.array([len(e) + 2 for e in encoded], dtype=np.int64)  # (N,)
        # every document's [BOS, ids, BOS], one after another: memory follows the tokens, not
        # documents x the longest document
        flat = np.empty(int(lengths.sum()), dtype=np.int64)  # (sum of lengths,)
        offsets = np.zeros(len(docs), dtype=np.int64)  # (N,) where each document starts in flat
        offsets[1:] = np.cumsum(lengths)[:-1]
        for i, ids in enumerate(encoded):
            o = int(offsets[i])
            flat[o] = bos
            flat[o + 1 : o + 1 + len(ids)] = ids
            flat[o + 1 + len(ids)] = bos
        self._ids, self._offsets, self._lengths = flat, offsets, lengths
        self.splits = {"train": np.arange(n_train), "val": np.arange(n_train, len(docs))}
        self._eval_rows: dict[tuple[str, int], _Rows] = {}

    def __len__(self) -> int:
        return len(self.documents)

    def split_size(self, split: str) -> int:
        """Number of documents in a split."""
        return len(self.splits[split])

    def tokens_in(self, split: str) -> int:
        """Number of predicted tokens (targets) in a split."""
        return int((self._lengths[self.splits[split]] - 1).sum())

    def _rows(self, doc: np.ndarray, start: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``document[doc][start : start + width]``, padded with -1 to the widest -> (x, y),
        each (B, T)."""
        T = int(width.max()) - 1
        pos = start[:, None] + np.arange(T + 1)[None, :]  # (B, T+1)
        valid = np.arange(T + 1)[None, :] < width[:, None]  # (B, T+1)
        last = (self._lengths[doc] - 1)[:, None]  # (B, 1)
        index = self._offsets[doc][:, None] + np.minimum(pos, last)  # (B, T+1), inside each document
        rows = np.where(valid, self._ids[index], -1)  # (B, T+1)
        x = np.where(rows[:, :-1] < 0, self.tokenizer.bos_id, rows[:, :-1])  # pads are never attended to
        return x, rows[:, 1:]

    def train_batch(self, doc: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One row per document: the whole document, or a random window of ``block_size + 1`` tokens."""
        lengths = self._lengths[doc]
        width = np.minimum(lengths, self.block_size + 1)
        start = rng.integers(0, lengths - width + 1)  # (B,)
        return self._rows(doc, start, width)

    def eval_batches(
        self, split: str, batch_size: int, max_batches: int | None = None, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Batches of one row per document of the split, as training draws them: the whole
        document, or (longer than ``block_size + 1`` tokens) one window whose start is fixed by
        ``seed``, so the loss estimates the training objective on the split and is the same at
        every evaluation. ``max_batches``: only that many batches, of documents chosen by ``seed``."""
        key = (split, seed)
        if key not in self._eval_rows:
            docs = self.splits[split]
            lengths = self._lengths[docs]
            width = np.minimum(lengths, self.block_size + 1)
            start = np.random.default_rng([4, seed]).integers(0, lengths - width + 1)
            self._eval_rows[key] = _Rows(docs, start, width)
        rows = self._eval_rows[key]
        order = np.arange(len(rows.doc))
        if max_batches is not None and max_batches * batch_size < len(order):
            order = np.sort(np.random.default_rng(seed).permutation(len(order))[: max_batches * batch_size])
        for i in range(0, len(order), batch_size):
            sel = order[i : i + batch_size]
            yield self._rows(rows.doc[sel], rows.start[sel], rows.width[sel])


class StreamDataset:
    """One token stream, first ``1 - val_fraction`` train, the rest val; random windows.

    Raises:
        DataError: the text is empty, has unknown characters, or a split is shorter than
            ``block_size + 1`` tokens.
    """

    mode = "stream"

    def __init__(
        self, text: str, tokenizer: Tokenizer, block_size: int, val_fraction: float = 0.1, split_seed: int = 42
    ):
        _check_common(tokenizer, block_size, val_fraction)
        if not text.strip():
            raise DataError("the data set is empty (it holds no text but whitespace)")
        _check_known(tokenizer, text)
        ids = np.array(tokenizer.encode(text), dtype=np.int64)
        n_train = int(len(ids) * (1.0 - val_fraction))
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.data = {"train": ids[:n_train], "val": ids[n_train:]}
        for split, part in self.data.items():
            if split == "val" and val_fraction == 0:
                continue
            if len(part) < block_size + 1:
                raise DataError(
                    f"block_size {block_size} is larger than the {split} split allows: it has {len(part)} tokens, "
                    f"and a window needs block_size + 1 = {block_size + 1}; use a smaller --block-size or more data"
                )

    def __len__(self) -> int:
        return sum(len(d) for d in self.data.values())

    def split_size(self, split: str) -> int:
        """Number of tokens in a split."""
        return len(self.data[split])

    def tokens_in(self, split: str) -> int:
        return max(len(self.data[split]) - 1, 0)

    def _windows(self, split: str, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = starts[:, None] + np.arange(self.block_size + 1)[None, :]  # (B, T+1)
        rows = self.data[split][pos]
        return rows[:, :-1], rows[:, 1:]

    def train_batch(self, starts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return self._windows("train", starts)

    def eval_batches(
        self, split: str, batch_size: int, max_batches: int | None = None, seed: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive non-overlapping windows covering the split (all but a tail shorter than a
        window), or ``max_batches`` batches of random windows drawn with a fixed ``seed``."""
        n = len(self.data[split]) - self.block_size  # number of possible window starts
        if n <= 0:
            return
        starts = np.arange(0, n, self.block_size)
        if max_batches is not None and max_batches * batch_size < len(starts):
            starts = np.random.default_rng(seed).integers(0, n, max_batches * batch_size)
        for i in range(0, len(starts), batch_size):
            yield self._windows(split, starts[i : i + batch_size])


Dataset = DocumentDataset | StreamDataset


def _check_common(tokenizer: Tokenizer, block_size: int, val_fraction: float) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise DataError(f"block_size must be a positive integer, got {block_size!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


def _check_known(tokenizer: Tokenizer, text: str) -> None:
    """Raise DataError listing every character of ``text`` that a char tokenizer lacks."""
    if isinstance(tokenizer, CharTokenizer):
        unknown = sorted(set(text) - set(tokenizer.chars))
        if unknown:
            raise DataError(
                f"the data has {len(unknown)} character(s) the tokenizer does not know: {''.join(unknown)!r} "
                f"(the tokenizer knows {''.join(tokenizer.chars)!r})"
            )


def make_dataset(
    text: str,
    tokenizer: Tokenizer,
    mode: str,
    block_size: int,
    val_fraction: float = 0.1,
    split_seed: int = 42,
    *,
    source: str | Path | None = None,
) -> Dataset:
    """The data set of ``mode`` (``documents`` or ``stream``) over ``text``.

    Args:
        source: where the text came from (a file or ``names``); a DataError's message then names it.

    Raises:
        DataError: the text cannot make this data set (see the two classes).
    """
    if mode not in MODES:
        raise ValueError(f"unknown data mode {mode!r}; choose one of {', '.join(MODES)}")
    cls = DocumentDataset if mode == "documents" else StreamDataset
    try:
        return cls(text, tokenizer, block_size, val_fraction, split_seed)
    except DataError as e:
        if source is None:
            raise
        raise DataError(f"training text {source}: {e}") from None


# ----------------------------------------------------------------------------------------------
# the training batch sampler and its state


class Batcher:
    """Draws training batches; its whole state (generator, epoch, position) is saved and restored,
    so that a resumed run draws exactly the batches the uninterrupted run would have drawn.

    Documents: epoch e visits the training documents in the order
    ``default_rng([2, seed, e]).permutation(n)``, B at a time (an epoch's tail joins the next epoch's
    head); window starts come from the generator. Stream: B uniformly random window starts per
    batch (nanoGPT's get_batch).

    Args:
        dataset: a DocumentDataset or StreamDataset.
        batch_size: rows per batch (>= 1).
        seed: seed of the generator and of the epoch orders.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rng = np.random.default_rng([1, seed])  # not default_rng(seed): the model's init draws from that
        self.epoch = 0
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = self.dataset.split_size("train")
            self._order = (epoch, np.random.default_rng([2, self.seed, epoch]).permutation(n))
        return self._order[1]

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """The next training batch (x, y): int64 (B, T) arrays; y is -1 where nothing is predicted."""
        ds, B = self.dataset, self.batch_size
        if isinstance(ds, StreamDataset):
            starts = self.rng.integers(0, ds.split_size("train") - ds.block_size, B)
            return ds.train_batch(starts, self.rng)
        picked = []
        need = B
        while need:
            order = self._epoch_order(self.epoch)
            take = order[self.position : self.position + need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        docs = ds.splits["train"][np.concatenate(picked)]
        return ds.train_batch(docs, self.rng)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state: the generator's bit_generator state, epoch and position."""
        return {"rng": self.rng.bit_generator.state, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state, checked first: a checkpoint's saved state (which may
        be damaged or hostile) is one clear error, never a traceback or a wrong batch later.

        Checked: ``rng`` is the state of this generator's bit generator (its name, integer state
        fields); ``epoch`` an integer in [0, 10**15]; ``position`` an integer in [0, the number of
        training documents) in documents mode, 0 in stream mode.

        Raises:
            DataError: naming the field, its value and what is allowed; the batcher is unchanged.
        """
        where = "the checkpoint's batcher state (state.json, extra.data)"

        def bad(field: str, value: Any, allowed: str) -> DataError:
            shown = repr(value)
            return DataError(
                f"{where}: {field} is {shown if len(shown) <= 80 else shown[:77] + '...'}; it must be {allowed}"
            )

        if not isinstance(state, Mapping):
            raise bad("the state", state, "an object with rng, epoch and position")
        for key in ("rng", "epoch", "position"):
            if key not in state:
                raise DataError(f"{where} has no {key!r}; it must hold rng, epoch and position")
        rng, epoch, position = state["rng"], state["epoch"], state["position"]
        name = type(self.rng.bit_generator).__name__
        is_state = isinstance(rng, Mapping) and rng.get("bit_generator") == name
        if not (is_state and isinstance(rng.get("state"), Mapping)):
            raise bad("rng", rng, f"the state of a {name} generator (bit_generator {name!r} and its state)")
        fields = [*rng["state"].values(), *(v for k, v in rng.items() if k not in ("bit_generator", "state"))]
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in fields):
            raise bad("rng", rng, f"the state of a {name} generator (non-negative integers)")
        if not isinstance(epoch, numbers.Integral) or isinstance(epoch, bool) or not 0 <= epoch <= 10**15:
            raise bad("epoch", epoch, "an integer in [0, 10**15]")
        if isinstance(self.dataset, DocumentDataset):
            n = self.dataset.split_size("train")
            what = f"an integer in [0, {n}) (the number of training documents)"
        else:
            n, what = 1, "0 (stream mode keeps no position)"
        if not isinstance(position, numbers.Integral) or isinstance(position, bool) or not 0 <= position < n:
            raise bad("position", position, what)
        saved = self.rng.bit_generator.state
        try:
            self.rng.bit_generator.state = dict(rng)
        except (TypeError, ValueError, OverflowError, KeyError) as e:
            self.rng.bit_generator.state = saved
            raise bad("rng", rng, f"the state of a {name} generator ({type(e).__name__}: {e})") from None
        self.epoch, self.position = int(epoch), int(position)
        self._order = None
