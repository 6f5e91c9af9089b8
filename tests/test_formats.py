"""arraygpt.io.formats: ``load`` opens a training run folder (last/, .last.old, best/), a checkpoint
folder and a GPT-2 directory written by arraygpt; ``save`` round-trips in both formats; old
checkpoints (tokenizer.json) still load; unknown formats are clear errors; there is one
CheckpointError. Directories written by transformers itself are tested in test_interop.py (torch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

import arraygpt
from arraygpt import errors
from arraygpt.config import GPTConfig
from arraygpt.io import checkpoint, safetensors
from arraygpt.io.checkpoint import load_checkpoint, save_checkpoint
from arraygpt.io.formats import detect, load, save
from arraygpt.io.hf import gpt2 as interop
from arraygpt.io.tokenizers import CharTokenizer
from arraygpt.nn.model import GPT
from arraygpt.xp import to_numpy

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16)  # GPT-2's architecture
GPT2_TINY = TINY


def weights(model) -> dict[str, np.ndarray]:
    return {name: to_numpy(p) for name, p in model.state_dict().items()}


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "names"
    arraygpt.train("names", steps=5, out_dir=str(out), progress=False, samples=0)
    return out


# ----------------------------------------------------------------------------------------------
# load


def test_load_opens_a_training_run_folder(run_dir):
    ckpt = load(run_dir)
    assert ckpt.format == "arraygpt" and ckpt.path == run_dir / "last"
    assert ckpt.extra["train_config"]["mode"] == "documents"
    assert ckpt.prompt_prefix == [ckpt.tokenizer.bos_id]  # names are BOS-wrapped documents
    assert ckpt.optimizer_state is not None
    ids = ckpt.tokenizer.encode("emma")
    logits, _ = ckpt.model.forward(np.array([ckpt.prompt_prefix + ids]))
    assert logits.shape == (1, len(ids) + 1, ckpt.config.vocab_size)


def test_load_opens_best_and_falls_back_to_the_previous_checkpoint(run_dir, tmp_path):
    best = load(run_dir / "best")
    assert best.format == "arraygpt" and best.path == run_dir / "best"
    copy = tmp_path / "names"
    os.mkdir(copy)
    shutil.copytree(run_dir / "last", copy / ".last.old")  # a save interrupted between its two renames
    ckpt = load(copy)
    assert ckpt.path == copy / ".last.old"
    assert_same_weights(ckpt.model, load(run_dir).model)


def test_prompt_prefix_is_empty_for_a_model_not_trained_on_documents(tmp_path):
    tok = CharTokenizer("abc")
    save(GPT(TINY, seed=0), tmp_path / "a", tokenizer=tok, extra={"train_config": {"mode": "stream"}})
    assert load(tmp_path / "a").prompt_prefix == []
    save(GPT(TINY, seed=0), tmp_path / "b", tokenizer=tok, extra={"train_config": {"mode": "documents"}})
    assert load(tmp_path / "b").prompt_prefix == [tok.bos_id]
    save(GPT(TINY, seed=0), tmp_path / "c")
    assert load(tmp_path / "c").prompt_prefix == [] and load(tmp_path / "c").tokenizer is None


def test_load_takes_a_dtype(tmp_path):
    save(GPT(TINY, seed=0), tmp_path / "ck")
    assert load(tmp_path / "ck").model.dtype == "float32"
    wide = load(tmp_path / "ck", dtype="float64")
    assert wide.model.dtype == "float64"
    np.testing.assert_allclose(weights(wide.model)["wte"], weights(GPT(TINY, seed=0))["wte"])
    save(GPT(GPT2_TINY, seed=0), tmp_path / "g", format="gpt2")
    assert load(tmp_path / "g", dtype="float64").model.dtype == "float64"


# ----------------------------------------------------------------------------------------------
# save, both formats


def test_save_arraygpt_round_trips(tmp_path):
    model, tok = GPT(TINY, seed=3), CharTokenizer("abcdefghij")
    out = save(model, tmp_path / "ck", tokenizer=tok, extra={"step": 7})
    assert out == tmp_path / "ck"
    assert sorted(os.listdir(out)) == ["arraygpt-tokenizer.json", "config.json", "model.safetensors", "state.json"]
    ckpt = load(out)
    assert ckpt.format == "arraygpt" and ckpt.tokenizer == tok and ckpt.extra == {"step": 7}
    assert ckpt.config == model.config
    assert_same_weights(ckpt.model, model)


def test_save_gpt2_round_trips(tmp_path):
    model = GPT(GPT2_TINY, seed=4)
    out = save(model, tmp_path / "g", format="gpt2")
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"
    ckpt = load(out)
    assert ckpt.format == "gpt2" and ckpt.tokenizer is None and ckpt.prompt_prefix == [] and ckpt.extra == {}
    assert_same_weights(ckpt.model, model)
    assert detect(out) == ("gpt2", out)


def test_save_llama_round_trips(tmp_path):
    model = GPT(GPTConfig.preset("llama-tiny"), seed=5)
    out = save(model, tmp_path / "l", format="llama")
    assert json.loads((out / "config.json").read_text())["model_type"] in ("llama", "qwen2")
    ckpt = load(out)
    assert ckpt.format == "llama" and ckpt.tokenizer is None and ckpt.config == model.config
    assert_same_weights(ckpt.model, model)


def test_save_refuses_what_a_format_cannot_hold(tmp_path):
    model = GPT(GPT2_TINY, seed=0)
    with pytest.raises(ValueError, match=r"unknown model format .onnx.*.arraygpt., .gpt2., .llama."):
        save(model, tmp_path / "x", format="onnx")
    with pytest.raises(ValueError, match="a Hugging Face tokenizer"):
        save(model, tmp_path / "x", format="gpt2", tokenizer=CharTokenizer("abc"))
    with pytest.raises(ValueError, match="no optimizer state or extra data"):
        save(model, tmp_path / "x", format="gpt2", extra={"step": 1})
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------
# old checkpoints, unknown directories, one error class


def test_a_checkpoint_written_the_old_way_still_loads(tmp_path):
    """Before arraygpt-tokenizer.json, arraygpt wrote its tokenizer as tokenizer.json."""
    tok = CharTokenizer("abcdefghij")
    out = save_checkpoint(tmp_path / "old", GPT(TINY, seed=0), tok, extra={"train_config": {"mode": "documents"}})
    os.replace(out / checkpoint.TOKENIZER_FILE, out / "tokenizer.json")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "state.json", "tokenizer.json"]
    assert load_checkpoint(out).tokenizer == tok
    ckpt = load(out)
    assert ckpt.format == "arraygpt" and ckpt.tokenizer == tok and ckpt.prompt_prefix == [tok.bos_id]


def test_unknown_directories_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load(tmp_path / "nowhere")
    (tmp_path / "file").write_text("hi")
    with pytest.raises(errors.CheckpointError, match="is not a directory; arraygpt.load opens"):
        load(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.CheckpointError, match=r"holds no model arraygpt knows.*training run folder"):
        load(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"hidden_size": 4}')
    with pytest.raises(errors.CheckpointError, match="neither 'arraygpt_format' nor 'model_type'"):
        load(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(errors.CheckpointError, match="model_type is 'bert'"):
        load(tmp_path / "other")


def test_there_is_one_checkpoint_error_class():
    assert checkpoint.CheckpointError is interop.CheckpointError is errors.CheckpointError
    assert issubclass(errors.CheckpointError, ValueError)
    assert issubclass(safetensors.SafetensorsError, errors.CheckpointError)


def test_save_arraygpt_keeps_a_hugging_face_tokenizer_and_its_chat_template(tmp_path):
    """Issue 23: arraygpt.save(model, d, tokenizer=<a BPE tokenizer>) raised AttributeError to_dict."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("jinja2")
    from arraygpt.io.bpe import load_hf_tokenizer

    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    raw.train_from_iterator(["hello world, the cat sat"] * 3, trainer=trainer)
    source = tmp_path / "hf-tok"
    source.mkdir()
    raw.save(str(source / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    template += "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    tok_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}
    (source / "tokenizer_config.json").write_text(json.dumps(tok_config))
    tok = load_hf_tokenizer(source)

    model = GPT(dataclasses.replace(TINY, vocab_size=tok.vocab_size), seed=0)
    out = save(model, tmp_path / "ckpt", tokenizer=tok)
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    back = load(out)
    messages = [{"role": "user", "content": "hello cat"}]
    theirs = transformers.AutoTokenizer.from_pretrained(out)  # the saved files are Hugging Face's own
    assert back.tokenizer.encode("hello world") == raw.encode("hello world").ids
    assert (back.tokenizer.bos_id, back.tokenizer.eos_id) == (tok.bos_id, tok.eos_id)
    assert back.tokenizer.stop_ids == tok.stop_ids == {raw.token_to_id("<|im_end|>")}
    assert back.tokenizer.apply_chat_template(messages) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert_same_weights(back.model, model)


def test_save_refuses_a_tokenizer_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match="cannot save a object with a checkpoint"):
        save(GPT(TINY, seed=0), tmp_path / "ckpt", tokenizer=object())
    assert not (tmp_path / "ckpt").exists()
