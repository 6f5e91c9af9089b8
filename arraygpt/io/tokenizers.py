"""Tokenizers for training from text: character-level (microgpt, nanoGPT's shakespeare_char) and
byte-level (UTF-8 bytes), each saved with the model as a small JSON document.

Character level: the vocabulary is the sorted set of characters of a text, ids 0..n-1 in that
order (nanoGPT's prepare.py), plus, when ``bos=True``, one BOS token with id n that opens and
closes every document (microgpt: ``BOS = len(uchars)``). The same token ends a generated document,
so ``eos_id == bos_id``. Byte level: ids 0..255 are the bytes of the UTF-8 encoding, and 256 is
the optional BOS/EOS token.

Not here: subword (BPE) tokenizers; GPT-2's tokenizer belongs to the interop module.

Example:
    >>> tok = CharTokenizer.from_text("emma\\nava", bos=True, exclude="\\n")  # a, e, m, v + BOS
    >>> tok.vocab_size, tok.bos_id
    (5, 4)
    >>> tok.encode("ava"), tok.decode([4, 0, 3, 0, 4])
    ([0, 3, 0], 'ava')
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

FORMAT = 1


class CharTokenizer:
    """One id per character of a fixed alphabet, plus an optional BOS/EOS token.

    Args:
        chars: the alphabet, in id order (each a single character, no repeats).
        bos: add a BOS token (id ``len(chars)``) that also serves as EOS.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], bos: bool = True):
        chars = list(chars)
        if not chars:
            raise ValueError("a character tokenizer needs at least one character (the text is empty)")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"a character tokenizer's alphabet must hold single characters, got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("a character tokenizer's alphabet has repeated characters")
        self.chars = chars
        self.bos = bool(bos)
        self._ids = {c: i for i, c in enumerate(chars)}
        self.bos_id: int | None = len(chars) if self.bos else None
        self.eos_id: int | None = self.bos_id
        self.vocab_size = len(chars) + (1 if self.bos else 0)

    @classmethod
    def from_text(cls, text: str, bos: bool = True, exclude: str = "") -> CharTokenizer:
        """The tokenizer of ``text``'s sorted distinct characters, minus those in ``exclude``."""
        return cls(sorted(set(text) - set(exclude)), bos=bos)

    def encode(self, text: str) -> list[int]:
        """Text -> ids (BOS is not added: callers wrap documents themselves).

        Raises:
            ValueError: ``text`` has characters outside the alphabet; the message lists them.
        """
        ids = self._ids
        try:
            return [ids[c] for c in text]
        except KeyError:
            unknown = sorted(set(text) - set(ids))
            raise ValueError(
                f"the text has {len(unknown)} character(s) the tokenizer does not know: "
                f"{''.join(unknown)!r} (known: {''.join(self.chars)!r})"
            ) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; the BOS/EOS token is a document boundary and decodes to nothing."""
        out = []
        n = len(self.chars)
        for i in ids:
            i = int(i)
            if i == self.bos_id:
                continue
            if not 0 <= i < n:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            out.append(self.chars[i])
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "format": FORMAT, "chars": "".join(self.chars), "bos": self.bos}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.to_dict() == self.to_dict()


class ByteTokenizer:
    """The 256 byte values of the UTF-8 encoding, plus an optional BOS/EOS token (id 256).

    Every text can be encoded; decoding replaces byte sequences that are not valid UTF-8 (a
    sample can stop in the middle of a character) with U+FFFD.
    """

    kind = "byte"

    def __init__(self, bos: bool = True):
        self.bos = bool(bos)
        self.bos_id: int | None = 256 if self.bos else None
        self.eos_id: int | None = self.bos_id
        self.vocab_size = 257 if self.bos else 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        data = bytearray()
        for i in ids:
            i = int(i)
            if i == self.bos_id:
                continue
            if not 0 <= i < 256:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            data.append(i)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "format": FORMAT, "bos": self.bos}

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and other.bos == self.bos


Tokenizer = CharTokenizer | ByteTokenizer
TOKENIZERS = ("char", "byte")


def tokenizer_from_dict(d: Mapping[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its ``to_dict()``.

    Raises:
        ValueError: ``d`` is not a tokenizer description this version can read.
    """
    if not isinstance(d, Mapping) or "type" not in d:
        raise ValueError(f"not a tokenizer description (no 'type' field): {d!r:.200}")
    if d.get("format", FORMAT) != FORMAT:
        raise ValueError(f"tokenizer format {d.get('format')!r} is not supported (this version reads {FORMAT})")
    kind = d["type"]
    bos = d.get("bos", True)
    if not isinstance(bos, bool):
        raise ValueError(f"a tokenizer description's 'bos' must be true or false (a JSON boolean), not {bos!r:.40}")
    if kind == "char":
        chars = d.get("chars")
        if not isinstance(chars, str):
            raise ValueError("a char tokenizer description needs 'chars', a string")
        try:
            chars.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's \ud800 escapes decode to one; no text holds it
            raise ValueError(
                f"a char tokenizer's 'chars' holds a lone surrogate (\\u{ord(chars[e.start]):04x}) at index {e.start}, "
                "which is not a character of any text"
            ) from None
        return CharTokenizer(chars, bos=bos)
    if kind == "byte":
        return ByteTokenizer(bos=bos)
    raise ValueError(f"unknown tokenizer type {kind!r:.60}; known: {', '.join(TOKENIZERS)}")


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> None:
    """Write ``tokenizer.to_dict()`` as JSON, atomically."""
    from arraygpt.io.files import write_atomic

    write_atomic(path, (json.dumps(tokenizer.to_dict(), indent=1) + "\n").encode())


def read_tokenizer_file(path: str | os.PathLike[str]) -> Tokenizer:
    """Read arraygpt's own tokenizer file (written by :func:`save_tokenizer`; in a checkpoint
    folder it is ``arraygpt-tokenizer.json``). A Hugging Face tokenizer directory is read by
    ``arraygpt.io.bpe.load_hf_tokenizer`` instead.

    Raises:
        CheckpointError: (a ValueError) the file is missing, not a regular file, too large, not
            valid JSON, or not a tokenizer description this version reads.
    """
    from arraygpt.errors import CheckpointError
    from arraygpt.io.files import read_json

    d = read_json(path, what="tokenizer file", limit=TOKENIZER_FILE_LIMIT)
    if "type" not in d and "model" in d:
        raise CheckpointError(
            f"{path} is a Hugging Face tokenizer.json, not arraygpt's tokenizer file; "
            "read its directory with arraygpt.io.bpe.load_hf_tokenizer"
        )
    try:
        return tokenizer_from_dict(d)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


TOKENIZER_FILE_LIMIT = 64 * 1024 * 1024  # bytes; a character tokenizer of every Unicode character is ~4 MB


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Deprecated name of :func:`read_tokenizer_file` (kept for one release)."""
    warnings.warn(
        "arraygpt.io.tokenizers.load_tokenizer is deprecated: use arraygpt.io.tokenizers.read_tokenizer_file "
        "(arraygpt's own file) or arraygpt.io.bpe.load_hf_tokenizer (a Hugging Face tokenizer directory)",
        DeprecationWarning,
        stacklevel=2,
    )
    return read_tokenizer_file(path)
