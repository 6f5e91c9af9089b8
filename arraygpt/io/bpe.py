"""Hugging Face tokenizers: GPT-2's byte-level BPE (vocab.json + merges.txt or tokenizer.json),
and any other tokenizer.json (Llama 3, Qwen2, SmolLM2, Mistral), through the ``tokenizers``
library; with each, what a chat needs from the directory: the chat template
(``apply_chat_template``, rendered by ``arraygpt.io.hf.chat_template``) and the ids that end a
reply (``stop_ids``, with generation_config.json's).

Token ids and counts are checked before anything is built from a file. Not here: arraygpt's own
character and byte tokenizers (``arraygpt.io.tokenizers``), training a tokenizer, downloads.
"""

from __future__ import annotations

import json
import operator
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from arraygpt.errors import CheckpointError
from arraygpt.io.files import CONFIG_FILE, CONFIG_LIMIT, open_regular, read_json, write_atomic
from arraygpt.io.hf.chat_template import chat_template_from_config, render_chat_template
from arraygpt.io.hf.reader import GENERATION_CONFIG_FILE, read_generation_config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 src/encoder.py, bytes_to_unicode):
    printable Latin-1 bytes map to themselves, the other 68 to chr(256 + n) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}
ENDOFTEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# the special tokens besides BOS and EOS that transformers hands a chat template (special_tokens_map)
TEMPLATE_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_INVALID_RUN = re.compile("([\udc80-\udcff]+)")  # bytes that surrogateescape could not decode
_GPT2_DEFAULT: Any = object()  # "not given": the id of <|endoftext|>, GPT-2's BOS and EOS
# tokens that end a chat turn (ChatML/Qwen2/SmolLM2, Llama 3, Phi-3, Gemma): a reply stops at them
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "Hugging Face tokenizers (tokenizer.json, vocab.json + merges.txt) need the optional 'tokenizers' "
            "library: pip install 'arraygpt[hf]'"
        ) from e
    return tokenizers


def _clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (PreTrainedTokenizerBase), which it applies after
    decoding when ``clean_up_tokenization_spaces`` is set, except for BPE models."""
    for old, new in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(old, new)
    return text


class HFTokenizer:
    """Any ``tokenizer.json`` the ``tokenizers`` library reads, with the interface of arraygpt's
    other tokenizers: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
    ``bos_id``, ``eos_id``. Byte-level BPEs (GPT-2, Llama 3, Qwen2, SmolLM2) get the subclass
    :class:`BPETokenizer`; this class serves the others (SentencePiece-style BPE with byte
    fallback, as Llama 2 and Mistral ship, WordPiece, Unigram). Build one with
    ``load_hf_tokenizer(directory)``.

    ``encode`` adds no special tokens (callers put BOS where they want it) but does turn the
    text of a special token (``<|eot_id|>``) into that token, as transformers'
    ``encode(text, add_special_tokens=False)`` does; ``decode`` keeps special tokens, as
    transformers' ``decode(ids)`` does (including its ``clean_up_tokenization_spaces``, which
    transformers, and so arraygpt, skips for BPE models).

    Attributes:
        vocab_size: number of token ids (added tokens included).
        bos_id: the beginning-of-text token, or None.
        eos_id: the end-of-text token (the first of ``eos_ids``), or None.
        eos_ids: every token that ends a generation (tokenizer_config.json's ``eos_token``, then
            config.json's ``eos_token_id``, which may be a list), in that order, without repeats.
        add_bos: the tokenizer.json's post-processor puts ``bos_id`` first (Llama 3's does), so a
            prompt for this model should start with it.
        stop_ids: the ids that end a reply: ``eos_ids``, the end-of-turn tokens of the vocabulary
            (``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``, ``<end_of_turn>``) and the constructor's
            ``stop_ids`` (generation_config.json's ``eos_token_id``).
        chat_template: the Jinja chat template (tokenizer_config.json's ``chat_template`` or
            chat_template.jinja), or None; :meth:`apply_chat_template` renders it.
        special_tokens: tokenizer_config.json's other named special tokens as text (``pad_token``,
            ``unk_token``, ...: :data:`TEMPLATE_TOKENS`), which the chat template sees as
            transformers' does.
        source: the file it was read from.
    """

    byte_level = False

    def __init__(
        self,
        tokenizer: Any,
        source: str = "<memory>",
        *,
        bos_id: Any = _GPT2_DEFAULT,
        eos_ids: Any = _GPT2_DEFAULT,
        clean_up_spaces: bool = False,
        chat_template: str | None = None,
        stop_ids: Iterable[int] = (),
        vocab_size: int | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ):
        self._tokenizer = tokenizer
        self.source = source
        if vocab_size is None:  # the largest id + 1 (ids may have gaps)
            vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.vocab_size: int = vocab_size
        default = tokenizer.token_to_id(ENDOFTEXT)
        bos = default if bos_id is _GPT2_DEFAULT else bos_id
        eos = ([] if default is None else [default]) if eos_ids is _GPT2_DEFAULT else list(eos_ids)
        for i in ([] if bos is None else [bos]) + eos:
            if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size):
                raise ValueError(
                    f"{source}: special token id {i!r} is not in the vocabulary (0 <= id < {self.vocab_size})"
                )
        self.bos_id: int | None = bos
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))
        self.eos_id: int | None = self.eos_ids[0] if self.eos_ids else None
        self.clean_up_spaces = bool(clean_up_spaces) and type(tokenizer.model).__name__ != "BPE"
        self.add_bos = bos is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [bos]
        if chat_template is not None and not isinstance(chat_template, str):
            raise TypeError(
                f"{source}: a chat template is a string of Jinja source, not {type(chat_template).__name__}"
            )
        self.chat_template: str | None = chat_template
        stops = list(stop_ids)
        for i in stops:
            if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size):
                raise ValueError(
                    f"{source}: stop token id {i!r} is not in the vocabulary (0 <= id < {self.vocab_size})"
                )
        turn_ends = [tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS]
        self.stop_ids: frozenset[int] = frozenset([*self.eos_ids, *(i for i in turn_ends if i is not None), *stops])
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        for name, token in self.special_tokens.items():
            if name not in TEMPLATE_TOKENS or not isinstance(token, str) or tokenizer.token_to_id(token) is None:
                raise ValueError(
                    f"{source}: special_tokens takes tokens of the vocabulary named {', '.join(TEMPLATE_TOKENS)}; "
                    f"got {name}={token!r:.80}"
                )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, "
            f"source={self.source!r})"
        )

    def _token(self, i: int | None) -> str | None:
        return None if i is None else self._tokenizer.id_to_token(i)

    def apply_chat_template(
        self,
        messages: list[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """The conversation as the model was trained to see it, rendered with the tokenizer's chat
        template as transformers' ``apply_chat_template`` renders it (same variables: ``messages``,
        ``add_generation_prompt``, ``bos_token``, ``eos_token`` and the other ``special_tokens``,
        ``tools``/``documents`` (None unless given), plus ``kwargs``). Unlike transformers,
        ``add_generation_prompt`` is on by default: the text ends where the assistant's reply
        begins. The render is bounded in time and size (``arraygpt.io.hf.chat_template``).

        Args:
            messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
            add_generation_prompt: end with what opens the assistant's turn.
            tokenize: return token ids (``encode`` of the text: no BOS added beyond what the
                template writes) instead of the text.
            **kwargs: more template variables.

        Raises:
            ValueError: the tokenizer has no chat template, or the template fails, does not
                compile, or goes over a limit (the message says which).
            ImportError: jinja2 is missing (``pip install 'arraygpt[hf]'``).

        Example:
            >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
            '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
        """
        if self.chat_template is None:
            raise ValueError(
                f"{self.source}: this tokenizer has no chat template (tokenizer_config.json's chat_template, or "
                "chat_template.jinja); a base model takes plain text: use encode"
            )
        specials = {"bos_token": self._token(self.bos_id), "eos_token": self._token(self.eos_id), **self.special_tokens}
        variables = {**{k: v for k, v in specials.items() if v is not None}, **kwargs}
        text = render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, variables=variables
        )
        return self.encode(text) if tokenize else text

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added).

        Raises:
            TypeError: ``text`` is not a str (bytes go to ``encode_bytes`` of a byte-level BPE).
            ValueError: ``text`` holds a lone surrogate, which UTF-8 cannot encode.

        Example:
            >>> tok.encode("Hello world")  # doctest: +SKIP
            [15496, 995]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}; use encode_bytes for bytes")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"text holds a lone surrogate at index {e.start}, which UTF-8 cannot encode; pass the bytes to "
                "encode_bytes (e.g. text.encode('utf-8', 'surrogateescape'))"
            ) from None
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _checked(self, ids: Iterable[Any]) -> list[int]:
        out = []
        for i in ids:
            i = operator.index(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is not in the vocabulary (0 <= id < {self.vocab_size})")
            out.append(i)
        return out

    def decode(self, ids: Iterable[Any]) -> str:
        """The text behind ``ids``, special tokens included, as transformers' ``decode(ids)``.

        Raises:
            ValueError: an id outside [0, vocab_size).
        """
        text = self._tokenizer.decode(self._checked(ids), skip_special_tokens=False)
        return _clean_up_tokenization(text) if self.clean_up_spaces else text

    def config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` object that makes transformers read this tokenizer the same way."""
        out = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._token(self.bos_id),
            "eos_token": self._token(self.eos_id),
            "clean_up_tokenization_spaces": self.clean_up_spaces,
            **self.special_tokens,
        }
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (its BOS and EOS tokens and chat
        template) into ``directory``, each atomically; ``load_hf_tokenizer`` and transformers'
        ``AutoTokenizer`` read them. Further end tokens of ``eos_ids`` (from a config.json) and
        ``stop_ids`` (from a generation_config.json) are not written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / TOKENIZER_FILE, self._tokenizer.to_str().encode("utf-8"))
        write_atomic(directory / TOKENIZER_CONFIG_FILE, (json.dumps(self.config(), indent=2) + "\n").encode())


class BPETokenizer(HFTokenizer):
    """A byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2), run by the ``tokenizers`` library,
    with ``encode_bytes``/``decode_bytes`` for byte strings that are not valid UTF-8 beside the
    interface of :class:`HFTokenizer`.

    Every byte string round-trips, ``decode_bytes(encode_bytes(b)) == b``, and so does every text,
    ``decode(encode(s)) == s``, unless the tokenizer.json normalizes text first (Qwen2's NFC
    composes characters) or adds a prefix space, or its vocabulary lacks a byte (``missing_bytes``:
    SmolLM2's has no token for some control bytes; ``encode`` drops such a character, as the
    ``tokenizers`` library and transformers do, and ``encode_bytes`` refuses it). ``decode`` is
    the library's, as transformers' is. ``<|endoftext|>`` in a text is the special token,
    as in transformers. Without a tokenizer_config.json or config.json that says otherwise,
    ``bos_id`` and ``eos_id`` are both ``<|endoftext|>`` (GPT-2's convention), or None without it.
    Build one with ``load_hf_tokenizer(directory)``.
    """

    byte_level = True

    def __init__(self, tokenizer: Any, source: str = "<memory>", **specials: Any):
        super().__init__(tokenizer, source, **specials)
        added = set(tokenizer.get_added_tokens_decoder())
        ids = {b: tokenizer.token_to_id(c) for b, c in BYTE_TO_CHAR.items()}
        self.missing_bytes: tuple[int, ...] = tuple(b for b, i in ids.items() if i is None or i in added)
        self._table: list[bytes | None] | None = None  # id -> bytes, built on first use (a large vocabulary takes ~1 s)

    def _byte_table(self) -> list[bytes | None]:
        if self._table is None:
            added = {i: t.content for i, t in self._tokenizer.get_added_tokens_decoder().items()}
            table: list[bytes | None] = [None] * self.vocab_size
            for token, i in self._tokenizer.get_vocab(with_added_tokens=True).items():
                if i in added:
                    table[i] = added[i].encode("utf-8")
                elif all(c in CHAR_TO_BYTE for c in token):
                    table[i] = bytes(CHAR_TO_BYTE[c] for c in token)
            self._table = table
        return self._table

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of a byte string, valid UTF-8 or not: valid runs are encoded as text, the
        bytes in between by the BPE model alone.

        Raises:
            ValueError: ``data`` holds a byte the vocabulary has no token for (``missing_bytes``;
                SmolLM2's lacks some control bytes): the ``tokenizers`` library, and so
                transformers and ``encode``, drop such a character from a text, so no ids give
                these bytes back.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"encode_bytes takes bytes, got {type(data).__name__}")
        data = bytes(data)
        lacking = sorted(set(data).intersection(self.missing_bytes))
        if lacking:
            raise ValueError(
                f"{self.source}: the vocabulary has no token for byte(s) {', '.join(f'0x{b:02x}' for b in lacking)}, "
                "so no ids encode them (encode drops such characters, as the tokenizers library does)"
            )
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        for k, piece in enumerate(_INVALID_RUN.split(text)):
            if not piece:
                continue
            if k % 2 == 0:  # valid UTF-8
                ids += self._tokenizer.encode(piece, add_special_tokens=False).ids
            else:  # bytes that are not UTF-8: their byte-level characters, merged by the BPE model
                chars = "".join(BYTE_TO_CHAR[ord(c) - 0xDC00] for c in piece)
                ids += [token.id for token in self._tokenizer.model.tokenize(chars)]
        return ids

    def decode_bytes(self, ids: Iterable[Any]) -> bytes:
        """The exact bytes behind ``ids``.

        Raises:
            ValueError: an id outside [0, vocab_size), or one whose token is not made of GPT-2's
                byte-level characters (it has no bytes of its own; ``decode`` gives its text).
        """
        table, out = self._byte_table(), []
        for i in ids:
            i = operator.index(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is not in the vocabulary (0 <= id < {self.vocab_size})")
            piece = table[i]
            if piece is None:
                raise ValueError(
                    f"token id {i} ({self._tokenizer.id_to_token(i)!r:.60}) is not made of byte-level characters; "
                    "decode gives its text"
                )
            out.append(piece)
        return b"".join(out)


_TOKENIZER_LIMIT = 256 * 1024 * 1024  # bytes; GPT-2's tokenizer.json is 1.4 MB, the largest real ones ~30 MB


def _read_text(path: Path, what: str) -> str:
    """A regular file of at most _TOKENIZER_LIMIT bytes, as UTF-8 text."""
    f, size = open_regular(path, what)
    with f:
        if size > _TOKENIZER_LIMIT:
            raise CheckpointError(f"{path}: the {what} is {size} bytes; at most {_TOKENIZER_LIMIT} bytes are read")
        data = f.read(_TOKENIZER_LIMIT + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None


MAX_TOKENS = 1 << 20  # four times the largest vocabulary in use (Gemma 3's 262,144)


def _spec_ids(spec: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    """(token, id) of every entry of a tokenizer.json's model vocabulary and added tokens; a
    Unigram vocabulary (a list of [piece, score]) numbers its pieces by position."""
    model = spec.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    pairs: list[tuple[Any, Any]] = []
    if isinstance(vocab, dict):
        pairs = list(vocab.items())
    elif isinstance(vocab, list):
        pairs = [(piece, i) for i, piece in enumerate(vocab)]
    added = spec.get("added_tokens")
    if isinstance(added, list):
        pairs += [(t.get("content"), t.get("id")) for t in added if isinstance(t, dict)]
    return pairs


def _check_ids(pairs: Iterable[tuple[Any, Any]], path: Path) -> int:
    """The vocabulary size (largest id + 1), after refusing, before anything is built from them,
    more than MAX_TOKENS tokens and ids that are not integers or lie far beyond the number of
    tokens (one id of 4294967295 in a 4 KB file would make a table of 4 billion entries)."""
    pairs = pairs if isinstance(pairs, list) else list(pairs)
    if len(pairs) > MAX_TOKENS:
        raise CheckpointError(
            f"{path}: {len(pairs)} tokens; arraygpt reads at most {MAX_TOKENS} (real vocabularies have up to ~262,000)"
        )
    bound = 2 * len(pairs) + 1024
    for token, i in pairs:
        if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < bound):
            raise CheckpointError(
                f"{path}: token {token!r:.60} has id {i!r:.40}; with {len(pairs)} tokens an id must be an integer "
                f"from 0 to {bound - 1}"
            )
    return max((i for _, i in pairs), default=-1) + 1


def _is_byte_level(spec: Mapping[str, Any]) -> bool:
    """A BPE model whose decoder maps GPT-2's byte characters back to bytes: GPT-2's layout (a
    ByteLevel pre-tokenizer) and Llama 3's and Qwen2's (a Split regex, then ByteLevel)."""
    model = spec.get("model") if isinstance(spec.get("model"), dict) else {}
    decoder = spec.get("decoder") if isinstance(spec.get("decoder"), dict) else {}
    return (
        model.get("type") == "BPE"
        and decoder.get("type") == "ByteLevel"
        and not (model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"))
    )


def _token_id(tokenizer: Any, value: Any, key: str, path: Path) -> int | None:
    """The id of tokenizer_config.json's ``bos_token``/``eos_token`` (a string, an AddedToken
    object with ``content``, or null)."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"{path}: {key} must be a string, an object with 'content' or null, not {value!r:.80}")
    i = tokenizer.token_to_id(value)
    if i is None:
        raise CheckpointError(f"{path}: {key} {value!r:.80} is not a token of {TOKENIZER_FILE}")
    return i


def _config_ids(value: Any, key: str, path: Path, vocab_size: int) -> list[int]:
    """config.json's ``bos_token_id``/``eos_token_id``: an id, a list of ids (Llama 3.1), or null."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise CheckpointError(f"{path}: {key} must be a token id, a list of them or null, not {value!r:.80}")
    for i in ids:
        if i >= vocab_size:
            raise CheckpointError(f"{path}: {key} {i} is not in the tokenizer's vocabulary (0 <= id < {vocab_size})")
    return ids


def _template_tokens(tokenizer: Any, tok_config: Mapping[str, Any], path: Path) -> dict[str, str]:
    """tokenizer_config.json's other named special tokens (TEMPLATE_TOKENS), as text: transformers
    passes them to a chat template beside ``bos_token`` and ``eos_token``."""
    ids = {name: _token_id(tokenizer, tok_config.get(name), name, path) for name in TEMPLATE_TOKENS}
    return {name: tokenizer.id_to_token(i) for name, i in ids.items() if i is not None}


def _special_tokens(tokenizer: Any, directory: Path, vocab_size: int) -> dict[str, Any]:
    """BOS, EOS, the clean-up setting, the chat template and the stop ids: tokenizer_config.json's
    ``bos_token``/``eos_token`` where it names them (null included, as transformers reads them),
    config.json's ``bos_token_id`` and ``eos_token_id`` for what it leaves out and as further end
    tokens, else GPT-2's ``<|endoftext|>`` for both; the chat template of chat_template.jinja or
    tokenizer_config.json; generation_config.json's ``eos_token_id`` as further stop ids."""
    tok_config_path, config_path = directory / TOKENIZER_CONFIG_FILE, directory / CONFIG_FILE
    tok_config = (
        read_json(tok_config_path, what="tokenizer config", limit=_TOKENIZER_LIMIT)
        if os.path.lexists(tok_config_path)
        else {}
    )
    config = read_json(config_path, what="model config", limit=CONFIG_LIMIT) if os.path.lexists(config_path) else {}
    bos_config = _config_ids(config.get("bos_token_id"), "bos_token_id", config_path, vocab_size)
    eos_config = _config_ids(config.get("eos_token_id"), "eos_token_id", config_path, vocab_size)
    out: dict[str, Any] = {"clean_up_spaces": tok_config.get("clean_up_tokenization_spaces") is True}
    if "bos_token" in tok_config:
        out["bos_id"] = _token_id(tokenizer, tok_config["bos_token"], "bos_token", tok_config_path)
    elif bos_config:
        out["bos_id"] = bos_config[0]
    eos = (
        _token_id(tokenizer, tok_config["eos_token"], "eos_token", tok_config_path)
        if "eos_token" in tok_config
        else None
    )
    if eos is not None or eos_config or "eos_token" in tok_config:
        out["eos_ids"] = ([] if eos is None else [eos]) + eos_config
    out["special_tokens"] = _template_tokens(tokenizer, tok_config, tok_config_path)
    out["chat_template"] = chat_template_from_config(tok_config, directory, str(tok_config_path))
    stops = read_generation_config(directory).get("eos_token_id", [])
    _config_ids(stops, "eos_token_id", directory / GENERATION_CONFIG_FILE, vocab_size)
    out["stop_ids"] = stops
    return out


def load_tokenizer(directory: str | os.PathLike[str]) -> HFTokenizer:
    """Deprecated name of :func:`load_hf_tokenizer` (kept for one release)."""
    warnings.warn(
        "arraygpt.io.bpe.load_tokenizer is deprecated: use arraygpt.io.bpe.load_hf_tokenizer "
        "(a Hugging Face tokenizer directory) or arraygpt.io.tokenizers.read_tokenizer_file (arraygpt's own file)",
        DeprecationWarning,
        stacklevel=2,
    )
    return load_hf_tokenizer(directory)


def load_hf_tokenizer(directory: str | os.PathLike[str]) -> HFTokenizer:
    """The tokenizer of a Hugging Face model directory: ``tokenizer.json`` (any the ``tokenizers``
    library reads: GPT-2, Llama 3, Qwen2, SmolLM2, Mistral...), or GPT-2's ``vocab.json`` +
    ``merges.txt`` (tokenizer.json wins when both are there). BOS and EOS come from
    ``tokenizer_config.json`` and ``config.json`` when the directory has them.

    Returns:
        A :class:`BPETokenizer` for a byte-level BPE (with ``encode_bytes``/``decode_bytes``),
        else an :class:`HFTokenizer`.

    Raises:
        ImportError: the ``tokenizers`` library is missing (``pip install 'arraygpt[hf]'``).
        FileNotFoundError: the directory or the tokenizer files are missing.
        CheckpointError: (a ValueError) a file is not valid JSON, the ``tokenizers`` library cannot
            read it, a byte-level BPE lacks a byte, or a special token is not in the vocabulary;
            the message names the file.

    Example:
        >>> tok = load_hf_tokenizer("SmolLM2-135M")  # doctest: +SKIP
        >>> tok.decode(tok.encode("Hello world"))  # doctest: +SKIP
        'Hello world'
    """
    tokenizers = _import_tokenizers()
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"{directory}: no such directory (expected tokenizer.json, or vocab.json and merges.txt)"
        )
    tokenizer_json, vocab, merges = directory / TOKENIZER_FILE, directory / "vocab.json", directory / "merges.txt"
    if os.path.lexists(tokenizer_json):
        text = _read_text(tokenizer_json, "tokenizer file")
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{tokenizer_json}: the tokenizer file is not valid JSON: {e}") from None
        except RecursionError:
            raise CheckpointError(f"{tokenizer_json}: the tokenizer file is nested too deeply") from None
        if not isinstance(spec, dict):
            raise CheckpointError(
                f"{tokenizer_json}: the tokenizer file must hold a JSON object, not {type(spec).__name__}"
            )
        vocab_size = _check_ids(_spec_ids(spec), tokenizer_json)
        try:
            tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise CheckpointError(f"{tokenizer_json}: the tokenizers library cannot read it: {e}") from None
        cls = BPETokenizer if _is_byte_level(spec) else HFTokenizer
        specials = _special_tokens(tokenizer, directory, vocab_size)
        try:
            return cls(tokenizer, str(tokenizer_json), vocab_size=vocab_size, **specials)
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if os.path.lexists(vocab) and os.path.lexists(merges):
        vocab_size = _check_ids(read_json(vocab, what="tokenizer vocabulary", limit=_TOKENIZER_LIMIT).items(), vocab)
        _read_text(merges, "tokenizer merges file")
        try:
            model = tokenizers.models.BPE.from_file(str(vocab), str(merges))
        except Exception as e:  # the tokenizers library raises its own exception types
            raise CheckpointError(f"{vocab} + {merges.name}: the tokenizers library cannot read them: {e}") from None
        tokenizer = tokenizers.Tokenizer(model)
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        if model.token_to_id(ENDOFTEXT) is not None:  # special, as transformers' GPT2Tokenizer treats it
            tokenizer.add_special_tokens([tokenizers.AddedToken(ENDOFTEXT, special=True, normalized=False)])
        specials = _special_tokens(tokenizer, directory, vocab_size)
        try:
            return BPETokenizer(tokenizer, str(vocab), vocab_size=vocab_size, **specials)
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    present = [p.name for p in (vocab, merges) if p.is_file()]
    raise FileNotFoundError(
        f"{directory} has no tokenizer.json and no vocab.json + merges.txt pair"
        + (f" (found only {', '.join(present)})" if present else "")
    )
