"""GGUF files through the ``gguf`` library, against independent references: transformers' GGUF
loader (``from_pretrained(dir, gguf_file=...)``, which dequantizes with the ``gguf`` library and
undoes llama.cpp's Q/K permutation itself), the original transformers models, ``gguf.quants``,
and transformers' GGUF tokenizer.

Nothing is downloaded. Each file is written here with ``gguf.GGUFWriter`` from a tiny random
transformers model the way llama.cpp's converter (convert_hf_to_gguf.py) writes it: Llama's Q and K
rows permuted (``LlamaModel.permute``), GPT-2's Conv1D weights transposed to (out, in) and its tied
output stored again, 1-D tensors in F32, Llama 3.1's rope scaling as ``rope_freqs.weight``. The
tokenizers are small BPEs trained here: byte-level ones (GPT-2's, Llama 3's and Qwen2's splits)
and a SentencePiece-style one (Metaspace, byte fallback, as Llama 2's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")

import arraygpt
from arraygpt import GPT, GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io.bpe import BPETokenizer, HFTokenizer
from arraygpt.io.gguf import load_gguf, save_gguf
from arraygpt.io.tokenizers import ByteTokenizer, CharTokenizer

Q = gguf.GGMLQuantizationType
TEXTS = [
    "Héllo wörld, ça va? naïve café — “quotes”",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 🙂👍🏽👩‍👩‍👧 and 🇫🇷",
    "def f(x):\n    return x ** 2  # code {}[]\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces\t\ttabs\n\n\n digits 1234567 3.14 ",
    "",
]
CORPUS = [*TEXTS, "The quick brown fox jumps over the lazy dog. " * 3, "hello hello world world 123 456"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# ----------------------------------------------------------------------------------------------
# tokenizers trained here, and their GGUF metadata as llama.cpp's converter writes it


def byte_level(split: str | None) -> tokenizers.Tokenizer:
    """A byte-level BPE with GPT-2's pre-tokenizer (split None) or a Split regex then ByteLevel."""
    pre = tokenizers.pre_tokenizers
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    if split is None:
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    elif split == "digits":  # SmolLM2's tokenizer.json
        tok.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Split(tokenizers.Regex(split), behavior="isolated"),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=420, min_frequency=1, show_progress=False, initial_alphabet=pre.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens([tokenizers.AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_tokens([tokenizers.AddedToken("<think>", special=False, normalized=False)])
    return tok


def sentencepiece_style() -> tokenizers.Tokenizer:
    """A Llama 2-style BPE: <unk>, <s>, </s>, the 256 byte tokens <0x00>..., then pieces with ▁."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=420, min_frequency=1, show_progress=False, special_tokens=specials
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def tokenizer_metadata(
    tok: tokenizers.Tokenizer, model: str, pre: str | None, *, merges: bool = True, add_bos: bool = False
) -> dict:
    """The tokenizer.* keys llama.cpp's converter writes for ``tok``."""
    spec = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    added = {a["content"]: a for a in spec["added_tokens"]}
    types = []
    for t in tokens:
        if model == "llama" and t.startswith("<0x") and len(t) == 6:
            types.append(6)
        elif t == "<unk>":
            types.append(2)
        elif t in added:
            types.append(3 if added[t]["special"] else 4)
        else:
            types.append(1)
    meta = {
        "tokenizer.ggml.model": model,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.chat_template": CHAT,
    }
    if pre:
        meta["tokenizer.ggml.pre"] = pre
    if merges:
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    if model == "llama":
        meta["tokenizer.ggml.scores"] = [float(-i) for i in range(len(tokens))]
        meta.update({"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2})
        meta["tokenizer.ggml.unknown_token_id"] = 0
    else:
        meta.update(
            {"tokenizer.ggml.bos_token_id": vocab["<|endoftext|>"], "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"]}
        )
        meta["tokenizer.ggml.add_bos_token"] = add_bos
    return meta


TOKENIZERS = {  # name: (build, ggml model, pre, merges in the file, add_bos_token)
    "gpt2-default": (lambda: byte_level(None), "gpt2", "gpt-2", True, False),
    "gpt2-smollm": (lambda: byte_level(None), "gpt2", "smollm", True, False),
    "llama-bpe": (lambda: byte_level(LLAMA3_SPLIT), "gpt2", "llama-bpe", True, True),
    "qwen2": (lambda: byte_level(QWEN2_SPLIT), "gpt2", "qwen2", True, False),
    "sentencepiece": (sentencepiece_style, "llama", "default", True, None),
    "sentencepiece-scores-only": (sentencepiece_style, "llama", None, False, None),
}


def add_metadata(writer, meta: dict) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value[0], float):
            writer.add_array(key, value)
        else:
            writer.add_array(key, value)


# ----------------------------------------------------------------------------------------------
# the reference converter: transformers model -> GGUF, as convert_hf_to_gguf.py writes it


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs(head_dim, base, factor, low, high, old_len):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors for rope_type llama3."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def hf_tensors(arch: str, hf) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (out, in), the converter's layout."""
    c = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    out = {}
    if arch == "gpt2":
        out["token_embd.weight"] = sd["transformer.wte.weight"]
        out["position_embd.weight"] = sd["transformer.wpe.weight"]
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            out |= {
                f"blk.{i}.attn_norm.weight": sd[p + "ln_1.weight"],
                f"blk.{i}.attn_norm.bias": sd[p + "ln_1.bias"],
                f"blk.{i}.attn_qkv.weight": sd[p + "attn.c_attn.weight"].T,
                f"blk.{i}.attn_qkv.bias": sd[p + "attn.c_attn.bias"],
                f"blk.{i}.attn_output.weight": sd[p + "attn.c_proj.weight"].T,
                f"blk.{i}.attn_output.bias": sd[p + "attn.c_proj.bias"],
                f"blk.{i}.ffn_norm.weight": sd[p + "ln_2.weight"],
                f"blk.{i}.ffn_norm.bias": sd[p + "ln_2.bias"],
                f"blk.{i}.ffn_up.weight": sd[p + "mlp.c_fc.weight"].T,
                f"blk.{i}.ffn_up.bias": sd[p + "mlp.c_fc.bias"],
                f"blk.{i}.ffn_down.weight": sd[p + "mlp.c_proj.weight"].T,
                f"blk.{i}.ffn_down.bias": sd[p + "mlp.c_proj.bias"],
            }
        out["output_norm.weight"] = sd["transformer.ln_f.weight"]
        out["output_norm.bias"] = sd["transformer.ln_f.bias"]
        out["output.weight"] = sd["transformer.wte.weight"]  # the converter stores the tied matrix again
        return {k: np.ascontiguousarray(v) for k, v in out.items()}
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    out["token_embd.weight"] = sd["model.embed_tokens.weight"]
    for i in range(c.num_hidden_layers):
        for hf_name, g in names.items():
            key = f"model.layers.{i}.{hf_name}"
            if key not in sd:
                continue
            w = sd[key]
            if arch == "llama" and g.startswith("attn_q"):
                w = permute(w, c.num_attention_heads)
            elif arch == "llama" and g.startswith("attn_k"):
                w = permute(w, c.num_key_value_heads)
            out[f"blk.{i}.{g}"] = w
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not c.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_gguf(path, arch: str, hf, tok_meta: dict, *, qtype=Q.F32, tensors=None, scaling=None) -> None:
    """The file llama.cpp's converter writes for ``hf`` (2-D tensors in ``qtype``: quantized by
    gguf.quants, or given as raw blocks in ``tensors``)."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    if arch == "gpt2":
        w.add_context_length(c.n_positions)
        w.add_embedding_length(c.n_embd)
        w.add_feed_forward_length(4 * c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_head_count(c.n_head)
        w.add_layer_norm_eps(c.layer_norm_epsilon)
    else:
        head_dim = c.hidden_size // c.num_attention_heads
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_block_count(c.num_hidden_layers)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(ROPE_THETA)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(c.vocab_size)
    w.add_file_type(0 if qtype == Q.F32 else 1)
    add_metadata(w, tok_meta)
    for name, t in (tensors or hf_tensors(arch, hf)).items():
        if t.dtype == np.uint8:  # raw blocks
            w.add_tensor(name, t, raw_dtype=qtype)  # the writer reads the shape from the byte shape
        elif t.ndim == 1 or qtype == Q.F32:
            w.add_tensor(name, t.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    if scaling is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs(c.hidden_size // c.num_attention_heads, ROPE_THETA, *scaling))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


ROPE_THETA = 10000.0


def tiny_hf(arch: str, vocab_size: int, *, hidden=32, inter=64, tie=True, scaling=None, seed=0):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=1024, n_embd=hidden, n_layer=2, n_head=4, activation_function="gelu_new"
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    rope = {"rope_type": "default", "rope_theta": ROPE_THETA}
    if scaling is not None:
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        rope = {"rope_type": "llama3", "rope_theta": ROPE_THETA, **dict(zip(keys, scaling))}
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, rope_parameters=rope))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_parameters=rope))
    with torch.no_grad():  # norms away from 1, so a swapped norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


IDS = np.array([[1, 5, 9, 30, 100, 7, 250, 3]])


def logits_of(model: GPT, ids=IDS) -> np.ndarray:
    logits, _ = model.forward(ids)
    return np.asarray(logits, dtype=np.float64)


def hf_logits(hf, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.double().numpy()


def hf_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


def assert_close_logits(ours, ref, rel=1e-4):
    scale = np.abs(ref).max()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= rel * scale, (np.abs(ours - ref).max(), scale)


@pytest.fixture(scope="module")
def bpe():
    return byte_level(LLAMA3_SPLIT)


# ----------------------------------------------------------------------------------------------
# reading: llama (permuted Q/K), qwen2, gpt2 against transformers


@pytest.mark.parametrize("arch, tie", [("llama", True), ("llama", False), ("qwen2", True), ("gpt2", True)])
def test_read_matches_transformers_gguf_loader_and_the_original_model(arch, tie, bpe, tmp_path):
    meta = tokenizer_metadata(bpe, "gpt2", "llama-bpe")
    hf = tiny_hf(arch, bpe.get_vocab_size(), tie=tie)
    path = tmp_path / "m.gguf"
    write_gguf(path, arch, hf, meta)
    ckpt = arraygpt.load(path)
    assert (
        ckpt.format == "gguf"
        and ckpt.extra["architecture"] == arch
        and ckpt.config.tie_embeddings == (tie and arch != "gpt2")
    )
    ours = logits_of(ckpt.model)
    assert_close_logits(ours, hf_logits(hf_gguf(path)))
    assert_close_logits(ours, hf_logits(hf))
    assert ckpt.tokenizer.chat_template == CHAT


def test_llama_q_and_k_are_unpermuted_as_transformers_does(bpe, tmp_path):
    hf = tiny_hf("llama", bpe.get_vocab_size())
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", hf, tokenizer_metadata(bpe, "gpt2", "llama-bpe"))
    ours = load_gguf(path).model.state_dict()
    theirs = hf_gguf(path).state_dict()
    for i in range(2):
        for short, name in (("q_proj", "attn_wq"), ("k_proj", "attn_wk")):
            ref = theirs[f"model.layers.{i}.self_attn.{short}.weight"].numpy()
            np.testing.assert_array_equal(np.asarray(ours[f"layer{i}.{name}"]), ref)
            assert not np.array_equal(ref, permute(ref, 2))  # the permutation is not the identity here


@pytest.mark.parametrize("scaling", [(8.0, 1.0, 4.0, 16), (4.0, 1.0, 2.0, 32), (32.0, 1.0, 4.0, 8192)])
def test_llama3_rope_scaling_from_rope_freqs(scaling, bpe, tmp_path):
    """transformers' GGUF loader ignores rope_freqs.weight; the reference is the original model."""
    hf = tiny_hf("llama", bpe.get_vocab_size(), hidden=64, scaling=scaling)
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", hf, tokenizer_metadata(bpe, "gpt2", "llama-bpe"), scaling=scaling)
    ckpt = load_gguf(path)
    assert ckpt.config.rope_scaling is not None and ckpt.config.rope_scaling[0] == scaling[0]
    ids = np.arange(60).reshape(1, 60) % 300
    assert_close_logits(logits_of(ckpt.model, ids), hf_logits(hf, ids))


# ----------------------------------------------------------------------------------------------
# tensor types: dequantized as the gguf library does, and the logits of transformers' loader

BLOCK_SCALES = {  # byte offsets of each block's float16 scale fields
    Q.Q8_0: [0],
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}


def random_blocks(qtype, shape, rng) -> np.ndarray:
    """Random blocks of ``qtype`` for a (rows, cols) tensor, their float16 scales finite and small."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == Q.BF16:
        values = rng.normal(0, 0.05, size=shape).astype(np.float32)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(shape[0], -1)
    if qtype == Q.F16:
        return rng.normal(0, 0.05, size=shape).astype(np.float16).view(np.uint8).reshape(shape[0], -1)
    n_blocks = shape[0] * shape[1] // block
    data = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    for offset in BLOCK_SCALES[qtype]:
        scale = rng.uniform(0.0005, 0.004, size=n_blocks).astype(np.float16)
        data[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return data.reshape(shape[0], -1)


QUANT_TYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda q: q.name)
def test_every_tensor_type_dequantizes_as_the_gguf_library_and_runs_as_transformers(qtype, bpe, tmp_path):
    rng = np.random.default_rng(int(qtype))
    hf = tiny_hf("llama", bpe.get_vocab_size(), hidden=256, inter=256)
    tensors = hf_tensors("llama", hf)
    raw = {k: random_blocks(qtype, v.shape, rng) if v.ndim == 2 else v for k, v in tensors.items()}
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", hf, tokenizer_metadata(bpe, "gpt2", "llama-bpe"), qtype=qtype, tensors=raw)
    ckpt = load_gguf(path)
    assert ckpt.extra["tensor_types"] == sorted({"F32", qtype.name})
    state = ckpt.model.state_dict()
    for gguf_name, name in (
        ("token_embd.weight", "wte"),
        ("blk.1.ffn_down.weight", "layer1.mlp_down"),
        ("blk.0.attn_v.weight", "layer0.attn_wv"),
    ):
        ref = gguf.quants.dequantize(raw[gguf_name], qtype)
        np.testing.assert_array_equal(np.asarray(state[name]), ref)
    assert_close_logits(logits_of(ckpt.model), hf_logits(hf_gguf(path)))


# ----------------------------------------------------------------------------------------------
# tokenizers: transformers' ids


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_tokenizer_gives_transformers_ids(name, tmp_path):
    build, model, pre, merges, add_bos = TOKENIZERS[name]
    tok = build()
    meta = tokenizer_metadata(tok, model, pre, merges=merges, add_bos=add_bos)
    hf = tiny_hf("llama", tok.get_vocab_size(with_added_tokens=True))
    path = tmp_path / "m.gguf"
    write_gguf(path, "llama", hf, meta)
    ours = load_gguf(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert isinstance(ours, BPETokenizer if model == "gpt2" else HFTokenizer)
    assert ours.add_bos == (add_bos is not False)  # SentencePiece files without the key: BOS first
    for text in TEXTS + ["<think> then <s> and </s>"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert [ours.bos_id] * ours.add_bos + ids == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids), text
    assert ours.chat_template == theirs.chat_template == CHAT
    chat = [{"role": "user", "content": "Ça va? 日本語 🙂"}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    assert ours.bos_id == theirs.bos_token_id and ours.eos_id == theirs.eos_token_id
    assert ours.vocab_size == len(theirs)  # every token, added ones included


# ----------------------------------------------------------------------------------------------
# writing: transformers and arraygpt read it back with the same logits


def tiny_model(arch: str, vocab_size: int) -> GPT:
    if arch == "gpt2":
        config = GPTConfig(vocab_size=vocab_size, block_size=1024, n_layer=2, n_head=4, n_embd=32)
    else:
        config = GPTConfig.preset("llama-tiny", vocab_size=vocab_size, block_size=64, qkv_bias=arch == "qwen2")
    model = GPT(config, seed=0)
    rng = np.random.default_rng(1)  # norms and biases away from their initial 1 and 0
    state = {
        k: np.asarray(v) + rng.normal(0, 0.1, size=np.shape(v)) * (np.ndim(v) == 1)
        for k, v in model.state_dict().items()
    }
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize(
    "arch, dtype, rel",
    [
        ("llama", "f32", 1e-4),
        ("llama", "f16", 1e-2),
        ("llama", "q8_0", 2e-2),
        ("llama", "q4_0", 0.3),
        ("llama", "q4_1", 0.3),
        ("llama", "q5_0", 0.15),
        ("llama", "q5_1", 0.15),
        ("qwen2", "f32", 1e-4),
        ("gpt2", "f32", 1e-4),
        ("gpt2", "q8_0", 2e-2),
    ],
)
def test_written_file_reads_back_in_transformers_and_arraygpt(arch, dtype, rel, bpe, tmp_path):
    tok = BPETokenizer(
        bpe, bos_id=bpe.token_to_id("<|endoftext|>"), eos_ids=[bpe.token_to_id("<|im_end|>")], chat_template=CHAT
    )
    model = tiny_model(arch, tok.vocab_size)
    path = arraygpt.save(model, tmp_path / "out.gguf", format="gguf", dtype=dtype, tokenizer=tok)
    assert path == tmp_path / "out.gguf" and [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    back = arraygpt.load(path)
    theirs = hf_logits(hf_gguf(path))
    assert_close_logits(logits_of(back.model), theirs)  # the same file, read two ways
    assert_close_logits(logits_of(back.model), logits_of(model), rel=rel)  # the model written
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert back.tokenizer.encode(text) == tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert back.tokenizer.chat_template == hf_tok.chat_template == CHAT


@pytest.mark.parametrize("scaling", [(8.0, 1.0, 4.0, 16), (32.0, 1.0, 4.0, 8192)])
def test_rope_scaling_round_trips(scaling, tmp_path):
    model = GPT(GPTConfig.preset("llama-tiny", vocab_size=50, block_size=64, n_embd=64, rope_scaling=scaling), seed=0)
    path = save_gguf(model, tmp_path / "s.gguf")
    back = load_gguf(path).model
    ids = np.arange(60).reshape(1, 60) % 50
    assert_close_logits(logits_of(back, ids), logits_of(model, ids))


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer("abcdefghijklmnopqrstuvwxyz .")], ids=["byte", "char"])
def test_arraygpt_tokenizers_keep_their_ids(tok, tmp_path):
    model = GPT(GPTConfig.preset("llama-tiny", vocab_size=tok.vocab_size), seed=0)
    path = save_gguf(model, tmp_path / "t.gguf", tokenizer=tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    back = load_gguf(path).tokenizer
    text = "hello world. abc" if isinstance(tok, CharTokenizer) else "héllo 日本 🙂"
    assert back.encode(text) == tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)
    assert back.bos_id == tok.bos_id


def test_save_refuses_what_gguf_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        arraygpt.save(GPT(GPTConfig.preset("llama-tiny"), seed=0), tmp_path / "x.gguf", format="gguf", dtype="q2_k")
    with pytest.raises(ValueError, match="ASCII"):
        save_gguf(
            GPT(GPTConfig.preset("llama-tiny", vocab_size=4), seed=0),
            tmp_path / "x.gguf",
            tokenizer=CharTokenizer("aéb"),
        )
    with pytest.raises(ValueError, match="norm"):
        save_gguf(GPT(GPTConfig.preset("microgpt"), seed=0), tmp_path / "x.gguf")
    # llama.cpp's gpt2 reads attn_qkv as (3 n_embd, n_embd), its qwen2 attn_q as (n_embd, n_embd)
    gqa = GPTConfig.preset("gpt2", n_layer=1, n_head=4, n_kv_head=2, n_embd=32, vocab_size=40, block_size=16)
    with pytest.raises(ValueError, match=r"a gpt2 GGUF needs n_kv_head == n_head \(4\), got 2"):
        save_gguf(GPT(gqa, seed=0), tmp_path / "x.gguf")
    wide = GPTConfig.preset("llama-tiny", qkv_bias=True, bias=False, head_dim=32)
    assert wide.attn_dim != wide.n_embd
    with pytest.raises(ValueError, match=r"a qwen2 GGUF .* needs n_head \* head_dim == n_embd"):
        save_gguf(GPT(wide, seed=0), tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


def test_save_is_atomic(tmp_path, monkeypatch):
    model = GPT(GPTConfig.preset("llama-tiny"), seed=0)
    path = save_gguf(model, tmp_path / "m.gguf")
    before = path.read_bytes()

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_gguf(GPT(GPTConfig.preset("llama-tiny"), seed=1), path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_unsupported_architecture_is_named(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="'gemma3'.*'llama', 'qwen2', 'gpt2'"):
        arraygpt.load(tmp_path / "m.gguf")


def test_sample_command_runs_a_gguf(bpe, tmp_path, capsys):
    from arraygpt import cli

    tok = BPETokenizer(bpe, bos_id=bpe.token_to_id("<|endoftext|>"), eos_ids=[bpe.token_to_id("<|im_end|>")])
    path = save_gguf(tiny_model("llama", tok.vocab_size), tmp_path / "m.gguf", dtype="q8_0", tokenizer=tok)
    args = ["sample", "--checkpoint", str(path), "--prompt", "Héllo 日本語", "--max-new-tokens", "4", "--seed", "0"]
    assert cli.main(args) == 0
    assert "Héllo 日本語" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["sample", "chat"])
def test_quantized_flag_keeps_the_files_blocks_and_is_refused_for_other_formats(
    bpe, tmp_path, monkeypatch, capsys, command
):
    from arraygpt import cli
    from arraygpt.io import formats

    tok = BPETokenizer(bpe, bos_id=bpe.token_to_id("<|endoftext|>"), eos_ids=[bpe.token_to_id("<|im_end|>")])
    path = save_gguf(tiny_model("llama", tok.vocab_size), tmp_path / "m.gguf", dtype="q8_0", tokenizer=tok)
    loaded = []
    real_load = formats.load
    monkeypatch.setattr(formats, "load", lambda *a, **k: loaded.append(real_load(*a, **k)) or loaded[-1])
    args = [command, "--checkpoint", str(path), "--quantized", "--max-new-tokens", "2", "--seed", "0"]
    if command == "sample":
        assert cli.main([*args, "--prompt", "Hi"]) == 0
    else:
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("Hi\n"))
        assert cli.main([*args, "--template", "chatml"]) == 0
    assert set(loaded[0].model.quantized.values()) == {"q8_0"}  # blocks, not dequantized floats
    folder = tmp_path / "dense"
    arraygpt.save(loaded[0].model.dequantize(), folder, tokenizer=tok)
    capsys.readouterr()
    assert cli.main([command, "--checkpoint", str(folder), "--quantized"]) == 2
    assert "quantized=True keeps a GGUF file's blocks" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt-2", "llama-bpe", "qwen2", "smollm"])
def test_written_tokenizer_families_read_as_transformers_reads_them(family, tmp_path):
    split = {"gpt-2": None, "llama-bpe": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "smollm": "digits"}[family]
    raw = byte_level(split)
    bos = raw.token_to_id("<|endoftext|>")
    if family == "llama-bpe":  # Llama 3's post-processor puts BOS first
        raw.post_processor = tokenizers.processors.Sequence(
            [
                tokenizers.processors.ByteLevel(trim_offsets=False),
                tokenizers.processors.TemplateProcessing(
                    single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
                ),
            ]
        )
    tok = BPETokenizer(raw, bos_id=bos, eos_ids=[raw.token_to_id("<|im_end|>")], chat_template=CHAT)
    path = save_gguf(tiny_model("llama", tok.vocab_size), tmp_path / "t.gguf", tokenizer=tok)
    back = load_gguf(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert back.add_bos == tok.add_bos == (family == "llama-bpe")
    for text in TEXTS:
        assert back.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert [bos] * back.add_bos + back.encode(text) == theirs.encode(text), text
        if family != "smollm" or not any(c.isdigit() for c in text):  # transformers splits no digits there
            assert back.encode(text) == tok.encode(text), text


def test_written_sentencepiece_tokenizer_reads_as_transformers_reads_it(tmp_path):
    raw = sentencepiece_style()
    tok = HFTokenizer(raw, bos_id=raw.token_to_id("<s>"), eos_ids=[raw.token_to_id("</s>")], chat_template=CHAT)
    path = save_gguf(tiny_model("llama", tok.vocab_size), tmp_path / "t.gguf", tokenizer=tok)
    back = load_gguf(path).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert not back.add_bos and back.bos_id == tok.bos_id and back.eos_id == tok.eos_id
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert back.decode(back.encode(text)) == theirs.decode(back.encode(text)), text


def test_llama_with_biases_round_trips(tmp_path):
    """transformers' GGUF loader ignores llama biases; the reference is the model written."""
    config = GPTConfig.preset("llama-tiny", vocab_size=60, block_size=64, bias=True)
    model = GPT(config, seed=0)
    rng = np.random.default_rng(2)
    model.load_state_dict(
        {k: np.asarray(v) + rng.normal(0, 0.1, size=np.shape(v)) for k, v in model.state_dict().items()}
    )
    back = load_gguf(save_gguf(model, tmp_path / "b.gguf"))
    assert back.config.bias and back.config == dataclasses.replace(config, norm_eps=back.config.norm_eps)
    assert_close_logits(logits_of(back.model, IDS % 60), logits_of(model, IDS % 60))


def test_a_quantized_load_needs_the_gguf_library_only_to_dequantize(tmp_path, monkeypatch):
    pytest.importorskip("numba")
    model = GPT(GPTConfig.preset("llama-tiny", vocab_size=64, block_size=32, n_embd=64), seed=0)
    path = save_gguf(model, tmp_path / "m.gguf", dtype="q8_0")  # matrices q8_0, norms f32
    dense = load_gguf(path).model  # dequantized by gguf.quants.dequantize
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails
    kept = load_gguf(path, quantized=True).model
    assert set(kept.quantized.values()) == {"q8_0"}
    from arraygpt.backends.numpy.kernels import KERNELS

    kept.kernels = kept.kernels._replace(quantized_linear=KERNELS["numba_quantized_linear"].kernel())  # float32
    ids = np.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]])
    assert_close_logits(logits_of(kept, ids), logits_of(dense, ids), rel=1e-4)
    with pytest.raises(ImportError, match=r"pip install 'arraygpt\[gguf\]'"):
        load_gguf(path)  # dequantizing q8_0 needs the library


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_quantized_load_gives_back_the_file_pages_of_what_it_copies(arch, tmp_path, monkeypatch):
    from arraygpt.io import gguf as ag_gguf

    if arch == "gpt2":
        config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64)
        copied = ("attn_qkv.weight", "position_embd.weight")  # read as floats (split; looked up by position)
    else:
        config = GPTConfig.preset("llama-tiny", vocab_size=64, block_size=32, n_embd=64)
        copied = ("attn_q.weight", "attn_k.weight", "attn_v.weight")  # stacked, Q and K unpermuted
    path = save_gguf(GPT(config, seed=0), tmp_path / "m.gguf", dtype="q8_0")
    released = []

    def record(views):
        for view in views:
            root = view
            while isinstance(root.base, np.ndarray):
                root = root.base
            start = view.__array_interface__["data"][0] - root.__array_interface__["data"][0]
            released.append((start, view.nbytes))

    monkeypatch.setattr(ag_gguf, "_release", record)
    load_gguf(path, quantized=True)
    tensors = gguf.GGUFReader(path).tensors  # where the gguf library says each tensor lies
    expected = [(int(t.data_offset), int(t.n_bytes)) for t in tensors if t.name.endswith(copied)]
    assert len(expected) > config.n_layer and sorted(released) == sorted(expected)
