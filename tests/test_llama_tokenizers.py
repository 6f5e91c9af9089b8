"""The tokenizers of Llama 3, Qwen2 and SmolLM2 (their ``tokenizer.json``, through the optional
``tokenizers`` library) in arraygpt: encode/decode equal transformers' tokenizer on a mixed-script
text, BOS/EOS come from tokenizer_config.json and config.json, ``arraygpt.load`` and
``arraygpt sample`` work on a tiny random Llama directory with such a tokenizer, and an unreadable
tokenizer is one CheckpointError naming the file.

Nothing is downloaded: each tokenizer is a small byte-level BPE trained here with ``tokenizers``
in the style of its family (pre-tokenizer, normalizer, special tokens and their ids, post-processor),
following the published tokenizer.json files:

    Llama 3   Split(its regex, digits in runs of 1-3) then ByteLevel(use_regex=False); no normalizer;
              <|begin_of_text|> / <|end_of_text|> / <|eot_id|> after the vocabulary; the
              post-processor puts <|begin_of_text|> first; config.json's eos_token_id is a list
    Qwen2     the same family: Split(its regex, one digit at a time) then ByteLevel; NFC normalizer;
              <|endoftext|>, <|im_start|>, <|im_end|> after the vocabulary; bos_token null
    SmolLM2   GPT-2's layout: ByteLevel(add_prefix_space=False) pre-tokenizer; <|endoftext|>,
              <|im_start|>, <|im_end|> are ids 0, 1, 2
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest

tokenizers = pytest.importorskip(
    "tokenizers", reason="Hugging Face tokenizers need the extra: pip install 'arraygpt[hf]'"
)

import arraygpt
from arraygpt import GPT, GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io.bpe import BPETokenizer, load_hf_tokenizer

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

MIXED = (
    "Hello, World! I'm here; they'll see it's 2024-12-01 at 13:45:07.\n"
    "Ünïcödé café naïve façade — “quotes” «guillemets»\n"
    "日本語のテキストと中文文本，还有한국어.\n"
    "emoji 🙂👍🏽👩‍👩‍👧 and flags 🇫🇷\n"
    "مرحبا بالعالم، هذا نص عربي ١٢٣\n"
    "digits 1234567890 3.14159 -42 1e10\n"
    "   spaces\t\ttabs\n\n\n  newlines \r\n trailing   "
)
CORPUS = [
    MIXED,
    "The quick brown fox jumps over the lazy dog. " * 3,
    "hello hello world world 123 456",
    "日本語 日本語 中文 中文 🙂 🙂",
    "مرحبا مرحبا",
]

FAMILIES = {
    # name: (pre-tokenizer regex or None for GPT-2's, normalizer, special tokens after the vocabulary
    #        (None: before, ids 0..), tokenizer_config's bos/eos, config.json's bos/eos ids (names))
    "llama3": dict(
        regex=LLAMA3_REGEX,
        nfc=False,
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        first=False,
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        add_bos=True,
        config_bos="<|begin_of_text|>",
        config_eos=["<|end_of_text|>", "<|eot_id|>"],
        clean_up=True,
    ),
    "qwen2": dict(
        regex=QWEN2_REGEX,
        nfc=True,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        first=False,
        bos=None,
        eos="<|endoftext|>",
        add_bos=False,
        config_bos="<|endoftext|>",
        config_eos="<|endoftext|>",
        clean_up=False,
    ),
    "smollm2": dict(
        regex=None,
        nfc=False,
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        first=True,
        bos="<|endoftext|>",
        eos="<|endoftext|>",
        add_bos=False,
        config_bos="<|endoftext|>",
        config_eos="<|endoftext|>",
        clean_up=False,
    ),
}


def build_tokenizer(family: str, directory, *, vocab_size: int = 600, config: bool = True):
    """Train a byte-level BPE in the style of ``family`` and save tokenizer.json +
    tokenizer_config.json (+ a config.json with only the special token ids) in ``directory``."""
    f = FAMILIES[family]
    pre, dec = tokenizers.pre_tokenizers, tokenizers.decoders
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    if f["regex"] is None:
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Split(tokenizers.Regex(f["regex"]), behavior="isolated"),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if f["nfc"]:
        tok.normalizer = tokenizers.normalizers.NFC()
    tok.decoder = dec.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre.ByteLevel.alphabet(),
        special_tokens=f["specials"] if f["first"] else [],
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if not f["first"]:
        tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in f["specials"]])
    if f["add_bos"]:
        bos = f["bos"]
        tok.post_processor = tokenizers.processors.Sequence(
            [
                tokenizers.processors.ByteLevel(trim_offsets=False),
                tokenizers.processors.TemplateProcessing(
                    single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
                ),
            ]
        )
    else:
        tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": f["bos"],
        "eos_token": f["eos"],
        "clean_up_tokenization_spaces": f["clean_up"],
        "model_max_length": 131072,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config), encoding="utf-8")
    if config:
        ids = lambda v: [tok.token_to_id(s) for s in v] if isinstance(v, list) else tok.token_to_id(v)  # noqa: E731
        (directory / "config.json").write_text(
            json.dumps({"bos_token_id": ids(f["config_bos"]), "eos_token_id": ids(f["config_eos"])})
        )
    return tok


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, build_tokenizer(request.param, directory)


def transformers_tokenizer(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))


# ----------------------------------------------------------------------------------------------
# encode/decode equal transformers'


@pytest.mark.parametrize(
    "text",
    [
        MIXED,
        "",
        " ",
        "a",
        "\n\n",
        "x<|im_end|>y <|endoftext|>",
        "<|eot_id|>",
        "ÅÅ Å Å",
        "12345678901234567890",
        "don't   stop ...!!!",
    ],
)
def test_encode_and_decode_equal_transformers(family, text):
    name, directory, _ = family
    ours, theirs = load_hf_tokenizer(directory), transformers_tokenizer(directory)
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids)
    mixed_ids = ours.encode(MIXED)
    assert ours.decode(mixed_ids[:7]) == theirs.decode(mixed_ids[:7])  # a prefix, maybe inside a character


def test_automodel_tokenizer_from_the_directory_agrees(family):
    transformers = pytest.importorskip("transformers")
    name, directory, _ = family
    ours, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.encode(MIXED) == theirs.encode(MIXED, add_special_tokens=False)
    assert ours.decode(ours.encode(MIXED)) == theirs.decode(theirs.encode(MIXED, add_special_tokens=False))
    assert ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id
    with_specials = theirs.encode(MIXED)  # what transformers adds: BOS for Llama 3, nothing for the others
    assert with_specials == ([ours.bos_id] if ours.add_bos else []) + ours.encode(MIXED)


def test_the_regex_pre_tokenizers_split_as_their_families_do(family):
    """Llama 3 groups digits by up to three, Qwen2 one by one, GPT-2/SmolLM2's ByteLevel regex as runs."""
    name, directory, tok = family
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("1234567")]
    assert pieces == {"llama3": ["123", "456", "7"], "qwen2": list("1234567"), "smollm2": ["1234567"]}[name]


def test_text_round_trips_except_through_qwen2_nfc(family):
    name, directory, _ = family
    tok = load_hf_tokenizer(directory)
    assert isinstance(tok, BPETokenizer)
    assert tok.decode(tok.encode(MIXED)) == MIXED
    decomposed = "cafe\u0301"  # e + combining acute: NFC composes it to é
    assert tok.decode(tok.encode(decomposed)) == ("caf\u00e9" if name == "qwen2" else decomposed)
    data = MIXED.encode() + b"\xff\xfe broken \xc3"
    assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_special_tokens_come_from_tokenizer_config_and_config_json(family):
    name, directory, tok = family
    ours = load_hf_tokenizer(directory)
    f = FAMILIES[name]
    assert ours.bos_id == (None if f["bos"] is None else tok.token_to_id(f["bos"]))
    eos = [f["eos"]] + (f["config_eos"] if isinstance(f["config_eos"], list) else [f["config_eos"]])
    assert ours.eos_ids == tuple(dict.fromkeys(tok.token_to_id(s) for s in eos))
    assert ours.eos_id == tok.token_to_id(f["eos"])
    assert ours.add_bos == f["add_bos"]
    assert ours.vocab_size == tok.get_vocab_size(with_added_tokens=True)
    if name == "llama3":
        assert ours.eos_ids == (tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>"))
        assert ours.encode("<|eot_id|>") == [ours.eos_id]  # the text of a special token is that token


def test_without_tokenizer_config_config_json_gives_the_ids(tmp_path):
    tok = build_tokenizer("llama3", tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    ours = load_hf_tokenizer(tmp_path)
    assert ours.bos_id == tok.token_to_id("<|begin_of_text|>")
    assert ours.eos_ids == (tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>"))
    (tmp_path / "config.json").unlink()
    ours = load_hf_tokenizer(tmp_path)  # nothing says: GPT-2's <|endoftext|>, which Llama 3 lacks
    assert ours.bos_id is None and ours.eos_id is None and ours.eos_ids == ()


def test_save_writes_a_directory_transformers_and_arraygpt_read_back(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    name, directory, _ = family
    ours = load_hf_tokenizer(directory)
    ours.save(tmp_path)
    again, theirs = load_hf_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(MIXED) == ours.encode(MIXED) == theirs.encode(MIXED, add_special_tokens=False)
    assert (again.bos_id, again.eos_id) == (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)


def test_a_sentencepiece_style_tokenizer_loads_too(tmp_path):
    """Not byte-level (Llama 2 / Mistral style: Metaspace, no ByteLevel decoder): the library decodes."""
    from arraygpt.io.bpe import HFTokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tok.decoder = tokenizers.decoders.Metaspace()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ours, theirs = load_hf_tokenizer(tmp_path), transformers_tokenizer(tmp_path)
    assert type(ours) is HFTokenizer and (ours.bos_id, ours.eos_id) == (1, 2)
    text = "Hello world, the lazy dog 123"
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text, add_special_tokens=False))
    with pytest.raises(ValueError, match="token id 300 is not in the vocabulary"):
        ours.decode([300])


# ----------------------------------------------------------------------------------------------
# a whole directory: arraygpt.load and arraygpt sample


def tiny_llama(vocab_size: int, **overrides) -> GPT:
    return GPT(GPTConfig.preset("llama-tiny", vocab_size=vocab_size, block_size=64, **overrides), seed=0)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_arraygpt_save_then_load_and_sample(name, tmp_path):
    from arraygpt import cli

    tok = load_hf_tokenizer(_built(name, tmp_path / "tok"))
    overrides = {"qkv_bias": True} if name == "qwen2" else {}
    model = tiny_llama(tok.vocab_size, **overrides)
    out = arraygpt.save(model, tmp_path / "model", format="llama", tokenizer=tok)
    ckpt = arraygpt.load(out)
    assert ckpt.format == "llama" and isinstance(ckpt.tokenizer, BPETokenizer)
    assert ckpt.tokenizer.encode(MIXED) == tok.encode(MIXED)
    assert (ckpt.tokenizer.bos_id, ckpt.tokenizer.eos_id) == (tok.bos_id, tok.eos_id)
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        rc = cli.main(
            [
                "sample",
                "--checkpoint",
                str(out),
                "--prompt",
                "Hello, 日本語 🙂",
                "--max-new-tokens",
                "8",
                "--sampler",
                "greedy",
            ]
        )
    assert rc == 0 and stdout.getvalue().startswith("Hello, 日本語 🙂")


def _built(name, directory):
    build_tokenizer(name, directory, config=False)
    return directory


def test_sample_a_directory_written_by_transformers_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from arraygpt import cli

    build_tokenizer("llama3", tmp_path / "tok", config=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    config = transformers.LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=[hf_tok.eos_token_id, 1],
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    hf_tok.save_pretrained(tmp_path / "model")
    ckpt = arraygpt.load(tmp_path / "model")
    assert ckpt.format == "llama"
    assert ckpt.tokenizer.encode(MIXED) == hf_tok.encode(MIXED, add_special_tokens=False)
    assert ckpt.tokenizer.eos_ids == (hf_tok.eos_token_id, 1)
    prompt = "Hello, World!"
    ids = [ckpt.tokenizer.bos_id] + ckpt.tokenizer.encode(prompt)
    with torch.no_grad():
        theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model")(torch.tensor([ids])).logits.numpy()
    ours, _ = ckpt.model.forward(np.array([ids]))
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        rc = cli.main(
            [
                "sample",
                "--checkpoint",
                str(tmp_path / "model"),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "5",
                "--sampler",
                "greedy",
            ]
        )
    assert rc == 0 and stdout.getvalue().startswith(prompt)


# ----------------------------------------------------------------------------------------------
# a tokenizer that cannot be read: one CheckpointError naming the file


def _llama_dir(tmp_path):
    tok = load_hf_tokenizer(_built("llama3", tmp_path / "tok"))
    return arraygpt.save(tiny_llama(tok.vocab_size), tmp_path / "model", format="llama", tokenizer=tok)


@pytest.mark.parametrize(
    "file, content, match",
    [
        ("tokenizer.json", "{truncated", r"tokenizer\.json: the tokenizer file is not valid JSON"),
        (
            "tokenizer.json",
            json.dumps({"model": {"type": "Nope"}}),
            r"tokenizer\.json: the tokenizers library cannot read it",
        ),
        ("tokenizer_config.json", "[]", r"tokenizer_config\.json: the tokenizer config must hold a JSON object"),
        (
            "tokenizer_config.json",
            json.dumps({"eos_token": "<|nope|>"}),
            r"tokenizer_config\.json: eos_token '<\|nope\|>' is not a token",
        ),
        ("tokenizer_config.json", json.dumps({"bos_token": 7}), r"tokenizer_config\.json: bos_token must be a string"),
    ],
)
def test_load_fails_with_one_checkpoint_error_naming_the_file(tmp_path, file, content, match):
    out = _llama_dir(tmp_path)
    (out / file).write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match=match):
        arraygpt.load(out)


def test_bad_special_ids_in_config_json_are_one_checkpoint_error(tmp_path):
    out = _llama_dir(tmp_path)
    (out / "tokenizer_config.json").unlink()
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "eos_token_id": ["x"]}))
    with pytest.raises(CheckpointError, match=r"config\.json: eos_token_id must be a token id"):
        arraygpt.load(out)
    (out / "config.json").write_text(json.dumps({**config, "eos_token_id": 10**6}))
    with pytest.raises(
        CheckpointError, match=r"config\.json: eos_token_id 1000000 is not in the tokenizer's vocabulary"
    ):
        arraygpt.load(out)


def test_sample_stops_at_every_end_token_and_starts_where_the_tokenizer_does(tmp_path, monkeypatch):
    """Llama 3 has several end tokens (config.json's eos_token_id list) and its tokenizer puts BOS
    first: arraygpt sample passes every end token to generate and starts the prompt with BOS."""
    import functools

    from arraygpt import cli
    from arraygpt.generation import generation

    tok = load_hf_tokenizer(_built("llama3", tmp_path / "tok"))
    model_dir = arraygpt.save(tiny_llama(tok.vocab_size), tmp_path / "model", format="llama", tokenizer=tok)
    config = json.loads((model_dir / "config.json").read_text())
    extra_eos = [tok.eos_id, tok.vocab_size - 2]  # <|eot_id|> and <|end_of_text|>
    (model_dir / "config.json").write_text(json.dumps({**config, "eos_token_id": extra_eos}))
    ckpt = arraygpt.load(model_dir)
    assert ckpt.tokenizer.add_bos and ckpt.prompt_prefix == [ckpt.tokenizer.bos_id]
    seen = {}
    real = generation.generate

    @functools.wraps(real)
    def recording(model, prompt, *args, **kwargs):
        seen.update(prompt=list(prompt), eos_id=set(kwargs["eos_id"]))
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", recording)
    with redirect_stdout(io.StringIO()):
        assert cli.main(["sample", "--checkpoint", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "3"]) == 0
    assert seen["prompt"] == [ckpt.tokenizer.bos_id] + ckpt.tokenizer.encode("Hello")
    assert set(extra_eos) <= set(ckpt.tokenizer.eos_ids) <= seen["eos_id"]


# ----------------------------------------------------------------------------------------------
# a byte-level BPE whose vocabulary lacks bytes (SmolLM2's has no token for 0x04, 0x06, ...)

CHAT_MARKERS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISSING_TEXTS = [
    "Ünïcödé café naïve façade — “quotes”",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 🙂👍🏽👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n\treturn {'a': x ** 2}  # code\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "control \x04 and \x06 bytes, a NUL \x00 and DEL \x7f",
]


@pytest.fixture(scope="module")
def gappy(tmp_path_factory):
    """SmolLM2's layout trained without the 256-byte initial alphabet, as SmolLM2's was: the
    vocabulary holds only the bytes of its corpus (ASCII letters, some UTF-8 lead bytes...)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False, special_tokens=CHAT_MARKERS)
    tok.train_from_iterator(["Hello world, the café is naïve. def f(x): return x"] * 3, trainer=trainer)
    tok.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    directory = tmp_path_factory.mktemp("gappy")
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory, tok


def test_a_byte_level_bpe_lacking_bytes_loads_and_gives_the_librarys_ids(gappy):
    transformers = pytest.importorskip("transformers")
    directory, reference = gappy
    ours, theirs = load_hf_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
    assert isinstance(ours, BPETokenizer) and 0x04 in ours.missing_bytes and 0x06 in ours.missing_bytes
    for text in MISSING_TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
    with pytest.raises(ValueError, match=r"no token for byte\(s\) 0x00, 0x04, 0x06, .*so no ids encode them"):
        ours.encode_bytes(MISSING_TEXTS[-1].encode("utf-8"))
    assert ours.decode_bytes(ours.encode_bytes(b"Hello world")) == b"Hello world"


def test_sample_runs_on_a_directory_whose_tokenizer_lacks_byte_tokens(gappy, tmp_path):
    """SmolLM2's case end to end: a transformers Llama directory with such a tokenizer.json samples,
    and the greedy continuation equals transformers' greedy generate on the same files."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    import shutil

    from arraygpt import cli

    directory, reference = gappy
    config = transformers.LlamaConfig(
        vocab_size=reference.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model_dir = tmp_path / "smol"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(directory / name, model_dir / name)
    prompt = "Hello world"
    ids = reference.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        hf = transformers.LlamaForCausalLM.from_pretrained(model_dir)
        eos = reference.token_to_id("<|im_end|>")  # tokenizer_config.json's eos_token
        out = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    expected = [t for t in out[0, len(ids) :].tolist() if t != eos]
    stdout = io.StringIO()
    with redirect_stdout(stdout):
        rc = cli.main(
            [
                "sample",
                "--checkpoint",
                str(model_dir),
                "--prompt",
                prompt,
                "-n",
                "4",
                "--sampler",
                "greedy",
            ]
        )
    assert rc == 0
    assert expected and reference.decode(expected, skip_special_tokens=False) in stdout.getvalue()


# ----------------------------------------------------------------------------------------------
# sizes checked before anything is allocated


def _spec_with(directory, change):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, show_progress=False, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world"] * 3, trainer=trainer)
    spec = json.loads(tok.to_str())
    change(spec)
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    return directory


@pytest.mark.parametrize("bad_id", [-1, "7", 1.5, 10**6])
def test_a_token_id_that_is_not_one_is_refused(tmp_path, bad_id):
    def change(spec):
        vocab = spec["model"]["vocab"]
        vocab[next(t for t in vocab if len(t) > 1)] = bad_id

    with pytest.raises(CheckpointError, match=rf"tokenizer.json: token '.*' has id {bad_id!r}; with \d+ tokens an id"):
        load_hf_tokenizer(_spec_with(tmp_path / "tok", change))


def test_an_absurd_added_token_id_is_refused_too(tmp_path):
    def change(spec):
        spec["added_tokens"] = [
            {
                "id": 10**9,
                "content": "<x>",
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
        ]

    with pytest.raises(CheckpointError, match=r"token '<x>' has id 1000000000"):
        load_hf_tokenizer(_spec_with(tmp_path / "tok", change))


def test_more_tokens_than_any_real_vocabulary_are_refused_before_the_library_reads_them(tmp_path, monkeypatch):
    import arraygpt.io.bpe as bpe

    directory = _spec_with(tmp_path / "tok", lambda spec: None)
    monkeypatch.setattr(bpe, "MAX_TOKENS", 100)  # the real limit is 2^20; 300 tokens stand in for 2.5 million
    monkeypatch.setattr(tokenizers.Tokenizer, "from_str", None)  # never reached
    with pytest.raises(CheckpointError, match=r"tokenizer.json: \d+ tokens; arraygpt reads at most 100"):
        load_hf_tokenizer(directory)
