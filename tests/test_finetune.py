"""Fine-tuning a downloaded model: ``arraygpt train --init-from DIR`` on a tiny random transformers
Llama directory (LlamaForCausalLM.save_pretrained, a byte-level BPE trained by the tokenizers
library, wrapped by transformers.PreTrainedTokenizerFast), in full and with LoRA adapters.

References are independent of arraygpt's own code: transformers' forward for the exported
directory, the tokenizer as transformers loads it, the safetensors library for the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

import arraygpt
from arraygpt.cli import main
from test_llama import _float64_transformers  # noqa: F401  (transformers' RoPE and RMSNorm in float64)
from tiny_hf import byte_level_bpe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

CONTEXT = 64  # the model's own block_size
WINDOW = 16  # the training window
STEPS = 6
TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "All that glitters is not gold. Where there is a will there is a way. "
) * 12


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM and its byte-level BPE, saved as transformers saves them."""
    directory = tmp_path_factory.mktemp("llama")
    tok = byte_level_bpe([TEXT], min_frequency=1)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


def _hashes(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir()) if f.is_file()}


def _train(base, data, out, *extra, steps=STEPS):
    args = ["train", "--init-from", str(base), "--data", str(data), "--steps", str(steps), "--out-dir", str(out)]
    args += ["--block-size", str(WINDOW), "--batch-size", "4", "--lr", "3e-3", "--schedule", "constant"]
    args += ["--dtype", "float64", "--eval-interval", str(steps), "--log-interval", "1", "--samples", "0", "--quiet"]
    assert main([*args, *extra]) == 0


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("event") == "train"]


def _resume(run, steps):
    assert main(["train", "--resume", str(run), "--steps", str(steps), "--quiet"]) == 0


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return safetensors_numpy.load_file(str(path))


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert np.array_equal(ta[name], tb[name]), f"{name} differs"


def _transformers_logits(directory: Path, ids: np.ndarray) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64)
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.numpy()


@pytest.mark.usefixtures("_float64_transformers")
def test_fine_tune_a_transformers_llama(base_dir, text_file, tmp_path):
    before = _hashes(base_dir)
    run = tmp_path / "run"
    _train(base_dir, text_file, run, steps=2 * STEPS)
    losses = _losses(run)
    assert len(losses) == 2 * STEPS and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert (run / "last" / "tokenizer.json").is_file()  # the model's own tokenizer, in the run folder

    # resumes exactly: N steps, then --resume to 2N, equals 2N in one go
    half = tmp_path / "half"
    _train(base_dir, text_file, half)
    _resume(half, 2 * STEPS)
    _same_tensors(run / "last" / "model.safetensors", half / "last" / "model.safetensors")

    # the result as a transformers directory: transformers computes the same logits
    ckpt = arraygpt.load(run)
    assert ckpt.model.config.block_size == CONTEXT  # the model keeps its context; windows were 16 tokens
    out = tmp_path / "export"
    arraygpt.save(ckpt.model, out, format="llama", tokenizer=ckpt.tokenizer)
    ids = np.array([ckpt.tokenizer.encode(TEXT[:120])[:40]])
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(TEXT[:120], add_special_tokens=False)[:40] == ids[0].tolist()
    logits, _ = ckpt.model.forward(ids)
    np.testing.assert_allclose(np.asarray(logits), _transformers_logits(out, ids), rtol=0, atol=1e-10)
    assert _hashes(base_dir) == before  # the downloaded model is never written


@pytest.mark.usefixtures("_float64_transformers")
def test_lora_fine_tune(base_dir, text_file, tmp_path):
    before = _hashes(base_dir)
    run = tmp_path / "run"
    _train(base_dir, text_file, run, "--lora-rank", "4", steps=2 * STEPS)
    losses = _losses(run)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

    # the checkpoint: adapters only (small), optimizer state for the adapters only
    saved = _tensors(run / "last" / "model.safetensors")
    assert saved and all(n.endswith((".lora_a", ".lora_b")) for n in saved)
    assert sorted({n.split(".")[1] for n in saved}) == ["attn_wq", "attn_wv"]  # PEFT's default targets
    assert (run / "last" / "model.safetensors").stat().st_size * 5 < (base_dir / "model.safetensors").stat().st_size
    moments = _tensors(run / "last" / "optimizer.safetensors")
    assert sorted(moments) == sorted(f"{b}.{n}" for b in ("m", "v") for n in saved)

    # resumes exactly
    half = tmp_path / "half"
    _train(base_dir, text_file, half, "--lora-rank", "4")
    _resume(half, 2 * STEPS)
    _same_tensors(run / "last" / "model.safetensors", half / "last" / "model.safetensors")

    # the model with adapters = the merged export, in transformers; untouched tensors bit-identical
    ckpt = arraygpt.load(run)
    assert ckpt.model.lora is not None
    assert main(["eval", "--checkpoint", str(run), "--data", str(text_file), "--json"]) == 0  # opens the base too
    out = tmp_path / "export"
    arraygpt.save(ckpt.model, out, format="llama", tokenizer=ckpt.tokenizer)
    ids = np.array([ckpt.tokenizer.encode(TEXT[:100])[:30]])
    logits, _ = ckpt.model.forward(ids)
    np.testing.assert_allclose(np.asarray(logits), _transformers_logits(out, ids), rtol=0, atol=1e-10)
    base_t, merged_t = _tensors(base_dir / "model.safetensors"), _tensors(out / "model.safetensors")
    changed = {n for n in base_t if not np.array_equal(base_t[n].astype(np.float64), merged_t[n])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    assert _hashes(base_dir) == before


@pytest.mark.usefixtures("_float64_transformers")
def test_lora_on_a_lora_run_opens_resumes_and_adds_its_adapters_to_the_merged_run(base_dir, text_file, tmp_path):
    first = tmp_path / "first"
    _train(base_dir, text_file, first, "--lora-rank", "2", steps=2)
    second, half = tmp_path / "second", tmp_path / "half"
    _train(first, text_file, second, "--lora-rank", "2", steps=4)
    _train(first, text_file, half, "--lora-rank", "2", steps=2)
    _resume(half, 4)  # the run's base is the first run, opened merged as training saw it
    _same_tensors(second / "last" / "model.safetensors", half / "last" / "model.safetensors")
    assert main(["eval", "--checkpoint", str(second), "--data", str(text_file), "--json"]) == 0

    # the second run's merged export = the first run's merged weights + its own adapters' scale B A
    exports = {}
    for run in (first, second):
        ckpt = arraygpt.load(run)
        exports[run] = tmp_path / f"{run.name}-export"
        arraygpt.save(ckpt.model, exports[run], format="llama", tokenizer=ckpt.tokenizer)
    lora = json.loads((second / "last" / "config.json").read_text())["lora"]
    adapters, before = _tensors(second / "last" / "model.safetensors"), _tensors(exports[first] / "model.safetensors")
    after = _tensors(exports[second] / "model.safetensors")
    for i in range(2):
        for ours, theirs in (("attn_wq", "q_proj"), ("attn_wv", "v_proj")):
            a, b = adapters[f"layer{i}.{ours}.lora_a"], adapters[f"layer{i}.{ours}.lora_b"]
            name = f"model.layers.{i}.self_attn.{theirs}.weight"
            want = before[name] + lora["alpha"] / lora["rank"] * (b @ a)
            np.testing.assert_allclose(after[name], want, rtol=0, atol=1e-12)
    ids = np.array([arraygpt.load(second).tokenizer.encode(TEXT[:100])[:30]])
    logits, _ = arraygpt.load(second).model.forward(ids)
    np.testing.assert_allclose(np.asarray(logits), _transformers_logits(exports[second], ids), rtol=0, atol=1e-10)


def test_resuming_a_fine_tune_takes_its_own_window_and_refuses_another(base_dir, text_file, tmp_path, capsys):
    run = tmp_path / "run"
    _train(base_dir, text_file, run, steps=2)  # --block-size WINDOW: the training window, not the context
    assert main(["train", "--resume", str(run), "--steps", "3", "--block-size", str(WINDOW), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "4", "--block-size", str(WINDOW // 2), "--quiet"]) == 2
    assert "cannot change ['block_size']" in capsys.readouterr().err


def test_lora_resume_refuses_a_changed_base(base_dir, text_file, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_dir, base)
    run = tmp_path / "run"
    _train(base, text_file, run, "--lora-rank", "2", steps=2)
    config_file = run / "last" / "config.json"
    good = config_file.read_text()
    for bad in ("x", {"rank": 2, "alpha": 8, "targets": ["attn_wq"], "base": "elsewhere"}):
        config_file.write_text(json.dumps({**json.loads(good), "lora": bad}))
        with pytest.raises(arraygpt.errors.CheckpointError, match="'lora' must hold rank, alpha, targets and base"):
            arraygpt.load(run)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for hostile in ("/dev/null", str(loop)):  # a device, a symlink loop: no model file or folder
        lora = {**json.loads(good)["lora"], "base": {"path": hostile, "files": {}}}
        config_file.write_text(json.dumps({**json.loads(good), "lora": lora}))
        with pytest.raises(arraygpt.errors.CheckpointError, match="which is not a model file or folder"):
            arraygpt.load(run)
    config_file.write_text(good)
    arraygpt.load(run)
    os.utime(base / "model.safetensors", ns=(1, 1))
    with pytest.raises(arraygpt.errors.CheckpointError, match="changed since"):
        arraygpt.load(run)
    assert main(["train", "--resume", str(run), "--steps", "4", "--quiet"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n-embd", "64"], "cannot give n_embd with init_from"),
        (["--preset", "gpt2"], "cannot give a preset or config"),
        (["--tokenizer", "byte"], "cannot give tokenizer"),
        (["--block-size", "65"], "longer than the model's context 64"),
        (["--lora-rank", "2", "--lora-targets", "mlp_fc1"], "mlp_fc1 are not weights of this model"),
        (["--lora-rank", "2", "--lora-targets", "q_proj"], "LoRA targets must be distinct names among"),
    ],
)
def test_conflicting_options_are_refused(base_dir, text_file, tmp_path, capsys, extra, message):
    args = ["train", "--init-from", str(base_dir), "--data", str(text_file), "--out-dir", str(tmp_path / "r")]
    assert main([*args, "--steps", "1", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_lora_needs_an_initial_model(capsys, tmp_path):
    assert main(["train", "--lora-rank", "4", "--steps", "1", "--out-dir", str(tmp_path / "r"), "--quiet"]) == 2
    assert "give init_from (--init-from) too" in capsys.readouterr().err


def test_fine_tune_a_quantized_gguf(base_dir, text_file, tmp_path):
    """A q8_0 GGUF file is dequantized for training; the trained model writes back to GGUF."""
    gguf = pytest.importorskip("gguf")
    ckpt = arraygpt.load(base_dir)
    arraygpt.save(ckpt.model, tmp_path / "m.gguf", format="gguf", dtype="q8_0", tokenizer=ckpt.tokenizer)
    run = tmp_path / "run"
    _train(tmp_path / "m.gguf", text_file, run, "--lora-rank", "2", steps=3)
    assert np.isfinite(_losses(run)).all()
    tuned = arraygpt.load(run)
    arraygpt.save(tuned.model, tmp_path / "out.gguf", format="gguf", tokenizer=tuned.tokenizer)
    reader = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    assert any(t.name == "blk.0.attn_q.weight" for t in reader.tensors)
