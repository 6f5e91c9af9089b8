"""Text in, text out: a prompt string as token ids, the end tokens of a tokenizer, and the
incremental decoder that turns a stream of token ids into text without ever splitting a UTF-8
character, in time linear in the output.

Decoding each new token on its own is wrong (a byte-level BPE token can end in the middle of a
character, and a SentencePiece token's leading space depends on what came before), and decoding
every id again for every new token is quadratic. :class:`TextStream` does neither:

- Hugging Face tokenizers (GPT-2's, Llama 3's and Qwen2's byte-level BPE, SentencePiece-style BPE
  with byte fallback, WordPiece): ``tokenizers.decoders.DecodeStream``, seeded with the prompt's
  last ids, which holds back an incomplete character;
- arraygpt's byte tokenizer: the bytes go through Python's incremental UTF-8 decoder;
- anything else with ``decode`` (arraygpt's character tokenizer): DecodeStream's algorithm in
  Python, decoding only a short window of ids each time.

:class:`StopText` finds stop strings in that text however the tokens split them, as transformers'
``StopStringCriteria`` does, holding back what may begin one.

Not here: the generation loop (``arraygpt.generation.generation``), the tokenizers themselves
(``arraygpt.io.tokenizers``, ``arraygpt.io.bpe``).
"""

from __future__ import annotations

import codecs
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["StopText", "TextStream", "encode_prompt", "end_ids"]

_SEED = 8  # prompt ids a stream starts from (enough for a SentencePiece space or a split character)


def encode_prompt(tokenizer: Any, text: str, prefix: Sequence[int] = ()) -> list[int]:
    """Token ids of a text prompt: ``prefix`` (a checkpoint's ``prompt_prefix``, the ids every
    training document began with), the tokenizer's BOS when its own encoding starts with one
    (``add_bos``, as Llama 3's does) and the prefix does not already, then ``encode(text)``. An
    empty result starts from the BOS token (or the first end token).

    Raises:
        TypeError: ``text`` is not a str.
        ValueError: the prompt is empty and the tokenizer has no BOS or end token to start from.
    """
    if not isinstance(text, str):
        raise TypeError(f"a text prompt must be a str, got {type(text).__name__}")
    ids = [int(i) for i in prefix]
    bos = getattr(tokenizer, "bos_id", None)
    if getattr(tokenizer, "add_bos", False) and bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    if text:
        ids += [int(i) for i in tokenizer.encode(text)]
    if not ids:
        start = bos if bos is not None else min(end_ids(tokenizer), default=None)
        if start is None:
            raise ValueError("the prompt is empty and the tokenizer has no BOS token to start from; give some text")
        ids = [start]
    return ids


def end_ids(tokenizer: Any) -> frozenset[int]:
    """The tokens that end a generation: the tokenizer's ``stop_ids`` (EOS and end-of-turn tokens)
    where it has them, and its BOS, EOS and ``eos_ids`` (a BOS ends a document of a model trained
    on documents wrapped in BOS, such as microgpt on names)."""
    ids = set(getattr(tokenizer, "stop_ids", ()) or ())
    ids |= {getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)}
    ids |= set(getattr(tokenizer, "eos_ids", ()) or ())
    return frozenset(int(i) for i in ids if isinstance(i, numbers.Integral))


class TextStream:
    """Token ids in, text out, one token at a time; never splits a UTF-8 character.

    Args:
        tokenizer: any arraygpt tokenizer (anything with ``decode``).
        context: the ids before the first pushed one (the prompt): the text of a token may depend
            on them (SentencePiece's leading space); their own text is not returned.

    ``push(token)`` returns the new text ("" while a character is incomplete); ``finish()``
    returns what is still held back, an incomplete character rendered as U+FFFD, so that no
    generated text is lost. The pushed texts joined equal ``tokenizer.decode(pushed ids)``, except
    where a token changes the text of tokens before it (a byte-fallback tokenizer decodes a valid
    byte followed by a stray one as two U+FFFD): the text already given stays.

    Example:
        >>> from arraygpt.io.tokenizers import ByteTokenizer
        >>> s = TextStream(ByteTokenizer())
        >>> [s.push(b) for b in "é!".encode()]
        ['', 'é', '!']
    """

    def __init__(self, tokenizer: Any, context: Iterable[int] = ()):
        self.tokenizer = tokenizer
        seed = [int(i) for i in context][-_SEED:]
        self._bytes = None
        self._hf = None
        if _hf_tokenizer(tokenizer) is not None:
            from tokenizers.decoders import DecodeStream

            self._hf = DecodeStream(ids=seed, skip_special_tokens=False)
            self._pending: list[int] = []  # ids pushed since the last text came out
            self._seen = seed  # the last ids before them
        elif getattr(tokenizer, "kind", None) == "byte":
            self._bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            self._window = seed  # DecodeStream's state, in Python: ids from the prefix's start
            self._start = len(seed)  # where the ids not yet turned into text begin
            self._prefix = tokenizer.decode(seed) if seed else ""

    def push(self, token: int) -> str:
        token = int(token)
        if self._bytes is not None:
            return self._bytes.decode(self._token_bytes(token))
        if self._hf is not None:
            self._pending.append(token)
            ids = self._seen + self._pending
            try:
                text = self._hf.step(_hf_tokenizer(self.tokenizer), token)
            except Exception:  # tokenizers' bare Exception: this token changed how earlier ones decode
                # (byte fallback: a stray byte after <0x70> makes "p" U+FFFD); keep the text already
                # given and go on from here, the rest aligned by length
                from tokenizers.decoders import DecodeStream

                before = self.tokenizer.decode(self._seen)
                text = self.tokenizer.decode(ids)[len(before) :]
                self._hf = DecodeStream(ids=ids[-_SEED:], skip_special_tokens=False)
            if text is None:
                return ""
            self._seen, self._pending = ids[-_SEED:], []
            return text
        self._window.append(token)
        text = self.tokenizer.decode(self._window)
        if len(text) <= len(self._prefix) or text.endswith("\ufffd") or not text.startswith(self._prefix):
            return ""
        new = text[len(self._prefix) :]
        self._window = self._window[self._start :]
        self._start = len(self._window)
        self._prefix = self.tokenizer.decode(self._window)
        return new

    def finish(self) -> str:
        """The text still held back (an incomplete character as U+FFFD); "" when there is none."""
        if self._bytes is not None:
            return self._bytes.decode(b"", final=True)
        if self._hf is not None:
            pending, self._pending = self._pending, []
            return self.tokenizer.decode(pending) if pending else ""
        text = self.tokenizer.decode(self._window)
        if len(text) <= len(self._prefix) or not text.startswith(self._prefix):
            return ""
        new = text[len(self._prefix) :]
        self._window, self._start, self._prefix = [], 0, ""
        return new

    def _token_bytes(self, token: int) -> bytes:
        tok = self.tokenizer
        if token == getattr(tok, "bos_id", None):
            return b""
        if not 0 <= token < 256:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{tok.vocab_size - 1})")
        return bytes((token,))


def _hf_tokenizer(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` behind an ``arraygpt.io.bpe.HFTokenizer``, else None."""
    from arraygpt.io.bpe import HFTokenizer

    return tokenizer._tokenizer if isinstance(tokenizer, HFTokenizer) else None


class StopText:
    """Stop strings in streamed text: ``push(piece)`` returns the text before the first stop
    string and whether one was reached, holding back a tail that may begin one (a stop string
    split over several tokens, or ending inside one); ``finish()`` returns what is held back.

    Example:
        >>> s = StopText(["<|im_end|>"])
        >>> s.push("Hi!<|im"), s.push("_end|> and"), s.finish()
        (('Hi!', False), ('', True), '')
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        if not self.stops or not all(isinstance(t, str) and t for t in self.stops):
            raise ValueError(f"stop strings must be non-empty texts, got {self.stops!r}")
        self._held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        text = self._held + piece
        found = [i for i in (text.find(t) for t in self.stops) if i >= 0]
        if found:
            self._held = ""
            return text[: min(found)], True
        held = max((k for t in self.stops for k in range(1, len(t)) if text.endswith(t[:k])), default=0)
        self._held = text[len(text) - held :] if held else ""
        return text[: len(text) - held], False

    def finish(self) -> str:
        held, self._held = self._held, ""
        return held
