"""The tokenizer of a GGUF file, both ways: llama.cpp's ``tokenizer.*`` metadata <-> a ``tokenizers``
tokenizer wrapped as :class:`arraygpt.io.bpe.HFTokenizer`.

A GGUF has no tokenizer.json. It stores the vocabulary (``tokenizer.ggml.tokens``, in id order),
each token's type (``token_type``: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
6 byte), the BPE merges, the special ids (``bos_token_id``, ``eos_token_id``, ``eot_token_id``...),
whether BOS goes first (``add_bos_token``), the pre-tokenizer's llama.cpp name (``tokenizer.ggml.pre``)
and the chat template (``tokenizer.chat_template``). Reading rebuilds the tokenizer transformers'
GGUF loader builds (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), so the ids are
transformers' ids:

    tokenizer.ggml.model "gpt2"   byte-level BPE: GPT-2's ByteLevel pre-tokenizer, or for a known
                                  ``pre`` (llama-bpe, qwen2, ...) that family's Split regex, then ByteLevel
    tokenizer.ggml.model "llama"  SentencePiece-style BPE (Llama 2, Mistral): Metaspace "▁" before the
                                  first word, byte fallback (<0x0A>), merges from the file or, when it has
                                  none, derived from the vocabulary and scores as transformers does

Control tokens become special added tokens, user-defined ones plain added tokens (matched whole).

Writing stores an :class:`~arraygpt.io.bpe.HFTokenizer` that is a byte-level BPE (GPT-2, Llama 3,
Qwen2, SmolLM2: its pre-tokenizer must be one llama.cpp names) or a SentencePiece-style BPE (Llama 2,
Mistral: a "llama" vocabulary, scores ranking merged tokens by their merge), or one of arraygpt's own
``ByteTokenizer`` / ``CharTokenizer`` (ASCII), each as a "gpt2" vocabulary without merges whose ids are
the tokenizer's ids.

Not here: tokenizers of other kinds (WordPiece, Unigram/T5, RWKV), a normalizer (llama.cpp has
none: Qwen2's NFC is dropped on writing), and any runtime dependency on transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from arraygpt.errors import CheckpointError
from arraygpt.io.bpe import BYTE_TO_CHAR, BPETokenizer, HFTokenizer, _import_tokenizers
from arraygpt.io.tokenizers import ByteTokenizer, CharTokenizer

__all__ = ["TOKEN_TYPES", "check_tokenizer_metadata", "tokenizer_from_gguf", "tokenizer_to_gguf"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKEN_TYPES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control", USER_DEFINED: "user-defined"}
TOKEN_TYPES.update({UNUSED: "unused", BYTE: "byte"})
MODELS = ("gpt2", "llama")
_SPLIT_BUDGET = 10**9  # characters sliced while deriving merges (Llama 2's 32,000 tokens: ~10^6)
# merges derived from the scores: as many as the metadata arrays may hold (arraygpt.io.gguf's
# MAX_ARRAY_ELEMENTS), so deriving costs no more than storing them would. Real vocabularies have
# about two a token (Llama 3: 280,147 for 128,256); each costs ~0.4 KB here and in the tokenizers library.
MAX_DERIVED_MERGES = 1 << 20

# llama.cpp's pre-tokenizer names whose split transformers knows (gguf_tokenizer_mapping.py's
# GGUF_PRE_TOKENIZER_SPLITS, the families arraygpt reads); any other name keeps GPT-2's regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
_WRITTEN_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}  # the name each split is written under


# ----------------------------------------------------------------------------------------------
# GGUF metadata -> tokenizer


def _strings(meta: Mapping[str, Any], key: str, source: str, required: bool = True) -> list[str] | None:
    value = meta.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise CheckpointError(f"{source}: {key} must be an array of strings, not {type(value).__name__}")
    return value


def _numbers(meta: Mapping[str, Any], key: str, n: int, kind: type, source: str) -> list[Any] | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise CheckpointError(f"{source}: {key} must be an array of {kind.__name__}s")
    if len(value) != n:
        raise CheckpointError(f"{source}: {key} has {len(value)} entries for {n} tokens; one per token is allowed")
    return value


def _token_id(meta: Mapping[str, Any], key: str, n: int, source: str) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise CheckpointError(f"{source}: {key} is {value!r:.40}; a token id 0 <= id < {n} is allowed")
    return value


def _generate_merges(
    vocab: Mapping[str, int], scores: Mapping[str, float], source: str, keep: bool = True
) -> list[tuple[str, str]]:
    """transformers' ``generate_merges(vocab, vocab_scores)`` (tokenization_utils_base.py): every
    split of a token into two tokens, best score first, then shorter left and right pieces.
    ``keep=False`` only counts them (the check at load): an empty list.

    Raises:
        CheckpointError: more than MAX_DERIVED_MERGES, as soon as they are counted (transformers
            has no limit: a vocabulary of every short string over two letters derives millions).
    """
    merges, count = [], 0
    for merge, score in scores.items():
        local = [
            (merge[:k], merge[k:], score) for k in range(1, len(merge)) if merge[:k] in vocab and merge[k:] in vocab
        ]
        count += len(local)
        if count > MAX_DERIVED_MERGES:
            raise CheckpointError(
                f"{source}: the tokens split into over {MAX_DERIVED_MERGES} pairs of tokens, the merges derived "
                "from the scores; at most that many are allowed (a real vocabulary gives about two a token)"
            )
        if keep:
            merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _check_merges(merges: Sequence[tuple[str, ...]], vocab: Mapping[str, int], source: str) -> None:
    """Each merge joins two tokens into a token (the tokenizers library panics otherwise)."""
    for left, right in merges:
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise CheckpointError(
                f"{source}: merge {left!r:.40} + {right!r:.40} is not made of tokens, or makes none; "
                "each merge joins two tokens of the vocabulary into a third"
            )


@dataclass(frozen=True)
class _Spec:
    """What checked ``tokenizer.*`` metadata says, in plain Python: all that building needs."""

    model: str
    tokens: list[str]
    types: list[int]
    vocab: dict[str, int]  # token -> id (gpt2: spelled in GPT-2's byte alphabet)
    merges: list[tuple[str, ...]]
    bos: int | None
    eos: list[int]
    add_bos: bool
    add_eos: bool
    template: str | None
    pre: Any


def _spec(meta: Mapping[str, Any], source: str, vocab_size: int | None, derive: bool = True) -> _Spec:
    """Every check of the metadata that needs no ``tokenizers`` library, and what they read.

    With ``derive=False`` a SentencePiece-style ("llama") vocabulary without merges keeps ``merges``
    empty: the merges derived from its scores join two tokens into a token by construction, so
    there is nothing in them to check but their number.
    """
    model = meta.get("tokenizer.ggml.model")
    if model not in MODELS:
        raise CheckpointError(
            f"{source}: tokenizer.ggml.model is {model!r:.60}; arraygpt reads {', '.join(map(repr, MODELS))} "
            "(byte-level BPE, SentencePiece-style BPE)"
        )
    tokens = _strings(meta, "tokenizer.ggml.tokens", source)
    n = len(tokens)
    if n == 0 or (vocab_size is not None and n > vocab_size):
        raise CheckpointError(f"{source}: the tokenizer has {n} tokens; 1 to {vocab_size} (the model's) are allowed")
    types = _numbers(meta, "tokenizer.ggml.token_type", n, int, source) or [NORMAL] * n
    merge_lines = _strings(meta, "tokenizer.ggml.merges", source, required=False)
    merges = None
    if merge_lines is not None:
        merges = [tuple(line.split(" ")) for line in merge_lines]
        bad = next((line for line, m in zip(merge_lines, merges) if len(m) != 2), None)
        if bad is not None:
            raise CheckpointError(f"{source}: merge {bad!r:.60} is not two tokens separated by one space")
    if merges is None:  # transformers derives them from the scores (SentencePiece files have no merges)
        scores = _numbers(meta, "tokenizer.ggml.scores", n, float, source)
        if scores is None:
            raise CheckpointError(f"{source}: the tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores")
        if sum(len(t) ** 2 for t in tokens) > _SPLIT_BUDGET:  # each token is cut at every position
            raise CheckpointError(
                f"{source}: the tokens are too long to derive merges from (sum of squared lengths over "
                f"{_SPLIT_BUDGET}); a real vocabulary is far below it"
            )
        derive = derive or model == "gpt2"  # gpt2 spells the tokens anew below: its merges are checked
        # counted even when not kept, so that the load refuses a vocabulary the build would choke on
        merges = _generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)), source, derive)
    if model == "gpt2":
        spelled = set(BYTE_TO_CHAR.values())
        vocab = {
            t if set(t) <= spelled else "".join(BYTE_TO_CHAR[b] for b in t.encode("utf-8")): i
            for i, t in enumerate(tokens)
        }
    else:
        vocab = {t: i for i, t in enumerate(tokens)}
    _check_merges(merges, vocab, source)
    bos = _token_id(meta, "tokenizer.ggml.bos_token_id", n, source)
    eos = [
        i
        for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if (i := _token_id(meta, key, n, source)) is not None
    ]
    for name in ("unknown", "padding"):  # checked only: they change no id
        _token_id(meta, f"tokenizer.ggml.{name}_token_id", n, source)
    add_bos = meta.get("tokenizer.ggml.add_bos_token", model == "llama")  # llama.cpp's default for SentencePiece
    add_eos = meta.get("tokenizer.ggml.add_eos_token", False)
    if not isinstance(add_bos, bool) or not isinstance(add_eos, bool):
        raise CheckpointError(f"{source}: tokenizer.ggml.add_bos_token and add_eos_token must be booleans")
    first = [tokens[bos]] if add_bos and bos is not None else []
    last = [tokens[eos[0]]] if add_eos and eos else []
    sequence = next((t for t in first + last if t.startswith("$")), None)
    if sequence is not None:  # the library reads "$b" as sequence B, and panics on encoding
        raise CheckpointError(
            f"{source}: the BOS/EOS token {sequence!r:.40} cannot go in a tokenizers template: a piece "
            "starting with '$' names a sequence there"
        )
    template = meta.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"{source}: tokenizer.chat_template must be a string")
    pre = meta.get("tokenizer.ggml.pre")
    return _Spec(model, tokens, types, vocab, merges, bos, eos, add_bos, add_eos, template, pre)


def check_tokenizer_metadata(meta: Mapping[str, Any], source: str, vocab_size: int | None = None) -> None:
    """Check a GGUF's ``tokenizer.*`` metadata as :func:`tokenizer_from_gguf` does, without importing
    the ``tokenizers`` library or building anything (a loader builds the tokenizer on first use).

    Only what the library itself refuses is left for the build: a BOS/EOS token that its
    post-processor template cannot hold (a space or ':' in it).

    Raises:
        CheckpointError: the same errors as :func:`tokenizer_from_gguf`'s.
    """
    _spec(meta, source, vocab_size, derive=False)


def tokenizer_from_gguf(meta: Mapping[str, Any], source: str, vocab_size: int | None = None) -> HFTokenizer:
    """The tokenizer a GGUF's ``tokenizer.*`` metadata describes (see the module docstring).

    Args:
        meta: the file's metadata, key -> value (arrays as lists).
        source: the file, for messages.
        vocab_size: the model's vocabulary; the tokenizer may not have more tokens.

    Raises:
        CheckpointError: an unknown ``tokenizer.ggml.model``, a malformed array, a special id out of range.
        ImportError: the ``tokenizers`` library is missing.
    """
    tk = _import_tokenizers()
    spec = _spec(meta, source, vocab_size)
    tokens, vocab = spec.tokens, spec.vocab
    if spec.model == "gpt2":
        spelled = set(BYTE_TO_CHAR.values())
        bpe = tk.models.BPE(
            vocab=vocab, merges=spec.merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False
        )
        tokenizer = tk.Tokenizer(bpe)
        split = SPLITS.get(spec.pre)
        if split is None:
            tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence(
                [
                    tk.pre_tokenizers.Split(tk.Regex(split), behavior="isolated"),
                    tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        tokenizer.decoder = tk.decoders.ByteLevel()
        control_ok = lambda t: set(t) <= spelled  # noqa: E731  (transformers skips mislabelled controls)
    else:
        tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=spec.merges, fuse_unk=True, byte_fallback=True))
        tokenizer.pre_tokenizer = tk.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tokenizer.decoder = tk.decoders.Sequence(
            [
                tk.decoders.Replace("▁", " "),
                tk.decoders.ByteFallback(),
                tk.decoders.Fuse(),
                tk.decoders.Strip(content=" ", left=1),
            ]
        )
        control_ok = lambda t: True  # noqa: E731
    control = [t for t, kind in zip(tokens, spec.types) if kind == CONTROL and control_ok(t)]
    if control:
        tokenizer.add_special_tokens([tk.AddedToken(t, normalized=False, special=True) for t in control])
    # token_to_id, not a get_vocab() dict: ~12 MB on a 49,152-token vocabulary, little of it given back
    user = [t for t, kind in zip(tokens, spec.types) if kind == USER_DEFINED and tokenizer.token_to_id(t) is not None]
    if user:
        tokenizer.add_tokens([tk.AddedToken(t, normalized=False, special=False) for t in user])
    bos, eos = spec.bos, spec.eos
    first = [tokens[bos]] if spec.add_bos and bos is not None else []
    last = [tokens[eos[0]]] if spec.add_eos and eos else []
    if first or last:
        single = " ".join([*first, "$A", *last])
        pair = " ".join([*first, "$A", *last, *first, "$B:1", *last])
        ids = {tokens[bos]: bos} if first else {}
        ids.update({tokens[eos[0]]: eos[0]} if last else {})
        try:
            tokenizer.post_processor = tk.processors.TemplateProcessing(
                single=single, pair=pair, special_tokens=list(ids.items())
            )
        except Exception as e:  # the library's own errors: a token with a space or ':' is no template piece
            raise CheckpointError(f"{source}: the BOS/EOS token cannot go in a tokenizers template: {e}") from None
    all_bytes = spec.model == "gpt2" and all(c in vocab for c in BYTE_TO_CHAR.values())
    cls = BPETokenizer if all_bytes else HFTokenizer
    try:
        # every id is a position in `tokens` (added tokens are tokens of the file), so the vocabulary's
        # size is n: HFTokenizer need not build a get_vocab() dict to find it
        return cls(tokenizer, source, bos_id=bos, eos_ids=eos, chat_template=spec.template, vocab_size=len(tokens))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# tokenizer -> GGUF metadata


def _char_vocab(chars: Sequence[str], bos: int | None) -> tuple[list[str], list[int]]:
    """A byte-level vocabulary whose ids are a CharTokenizer's: one token per (ASCII) character,
    spelled in GPT-2's byte alphabet, and no merges, so each character stays one token."""
    wide = [c for c in chars if ord(c) > 127]
    if wide:
        raise ValueError(
            f"the gguf format writes a CharTokenizer of ASCII characters only (a byte-level vocabulary keeps "
            f"its ids), not {''.join(wide[:8])!r}; train with a ByteTokenizer or a BPE tokenizer instead"
        )
    tokens = [BYTE_TO_CHAR[ord(c)] for c in chars]
    types = [NORMAL] * len(tokens)
    if bos is not None:
        tokens.append("<|endoftext|>")
        types.append(CONTROL)
    return tokens, types


def tokenizer_to_gguf(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata (key -> value; the writer picks the GGUF types) of ``tokenizer``.

    Raises:
        ValueError: a tokenizer GGUF cannot hold (the message says which are allowed).
    """
    meta: dict[str, Any] = {"tokenizer.ggml.model": "gpt2"}
    if isinstance(tokenizer, ByteTokenizer):
        tokens = [BYTE_TO_CHAR[b] for b in range(256)]
        types = [NORMAL] * 256
        if tokenizer.bos_id is not None:
            tokens.append("<|endoftext|>")
            types.append(CONTROL)
        merges: list[str] = []
        meta["tokenizer.ggml.pre"] = "gpt-2"
    elif isinstance(tokenizer, CharTokenizer):
        tokens, types = _char_vocab(tokenizer.chars, tokenizer.bos_id)
        merges = []
        meta["tokenizer.ggml.pre"] = "gpt-2"
    elif isinstance(tokenizer, HFTokenizer) and (tokenizer.byte_level or _sentencepiece_style(tokenizer)):
        spec = json.loads(tokenizer._tokenizer.to_str())
        vocab = tokenizer._tokenizer.get_vocab(with_added_tokens=True)
        added = tokenizer._tokenizer.get_added_tokens_decoder()
        tokens = [f"[PAD{i}]" for i in range(tokenizer.vocab_size)]
        types = [UNUSED] * tokenizer.vocab_size
        for token, i in vocab.items():
            tokens[i] = token
            types[i] = NORMAL if i not in added else CONTROL if added[i].special else USER_DEFINED
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        if tokenizer.byte_level:
            meta["tokenizer.ggml.pre"] = _pre_name(spec.get("pre_tokenizer"))
        else:  # llama.cpp's SentencePiece tokenizer merges by score: a merge's result scores above later ones'
            meta["tokenizer.ggml.model"] = "llama"
            scores, scored = [0.0] * vocab_size, set()
            for rank, merge in enumerate(merges):
                i = vocab[merge.replace(" ", "", 1)]
                if i not in scored:  # the first merge that makes a token ranks it
                    scored.add(i)
                    scores[i] = -float(rank + 1)
            unk = spec["model"].get("unk_token")
            for token, i in vocab.items():
                if len(token) == 6 and token.startswith("<0x") and token.endswith(">") and i not in added:
                    types[i] = BYTE
                elif token == unk:
                    types[i] = UNKNOWN
                    meta["tokenizer.ggml.unknown_token_id"] = i
            meta["tokenizer.ggml.scores"] = scores
        meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
        if tokenizer.chat_template is not None:
            meta["tokenizer.chat_template"] = tokenizer.chat_template
    else:
        raise ValueError(
            f"the gguf format writes a byte-level BPE tokenizer (arraygpt.io.bpe.BPETokenizer: GPT-2, Llama 3, "
            f"Qwen2, SmolLM2), a SentencePiece-style BPE (Llama 2, Mistral: Metaspace, byte fallback), a "
            f"ByteTokenizer or a CharTokenizer, not {tokenizer!r:.80}"
        )
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size}")
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]  # llama.cpp wants one token per row
    types += [UNUSED] * (vocab_size - len(types))
    meta["tokenizer.ggml.tokens"] = tokens
    meta["tokenizer.ggml.token_type"] = types
    if merges:
        meta["tokenizer.ggml.merges"] = merges
    elif "tokenizer.ggml.scores" not in meta:  # GGUFWriter writes no empty array; transformers then
        meta["tokenizer.ggml.scores"] = [0.0] * vocab_size  # derives the (no) merges from the scores
    if tokenizer.bos_id is not None:
        meta["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    eos_ids = getattr(tokenizer, "eos_ids", None) or ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
    if eos_ids:
        meta["tokenizer.ggml.eos_token_id"] = eos_ids[0]
    if len(eos_ids) > 1:
        meta["tokenizer.ggml.eot_token_id"] = eos_ids[1]
    meta.setdefault("tokenizer.ggml.add_bos_token", False)
    return meta


def _sentencepiece_style(tokenizer: HFTokenizer) -> bool:
    """A BPE with byte fallback that marks spaces with "▁" through a Metaspace pre-tokenizer, the
    layout transformers rebuilds for a GGUF's "llama" vocabulary."""
    spec = json.loads(tokenizer._tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    return (
        model.get("type") == "BPE"
        and bool(model.get("byte_fallback"))
        and pre.get("type") == "Metaspace"
        and pre.get("replacement") == "▁"
        and spec.get("normalizer") is None
    )


def _pre_name(pre: Any) -> str:
    """llama.cpp's name of a byte-level pre-tokenizer (as tokenizer.json spells it)."""
    if isinstance(pre, dict) and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    kinds = [step.get("type") for step in steps or []]
    if kinds == ["Split", "ByteLevel"]:
        name = _WRITTEN_PRE.get(steps[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM's: llama.cpp splits digits; transformers' GGUF loader splits as GPT-2
    raise ValueError(
        "the tokenizer's pre-tokenizer has no llama.cpp name; the gguf format writes GPT-2's ByteLevel, "
        "Llama 3's split (llama-bpe), Qwen2's (qwen2) and SmolLM's single digits then ByteLevel (smollm)"
    )
