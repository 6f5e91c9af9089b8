"""arraygpt <-> Hugging Face transformers GPT-2: the same weights give the same logits, loss and
gradients; checkpoints round-trip with identical weights; bad directories are clear errors;
parameter counts match the real models.

Every GPT-2 here is a tiny random GPT2LMHeadModel built and saved by transformers in a temporary
directory: nothing is downloaded. The tests that need torch and transformers skip themselves when
either is missing; the others (saving, configs, counts, errors found before any tensor) always run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import arraygpt

try:
    import torch
    import transformers
except ImportError:
    torch = transformers = None

needs_torch = pytest.mark.skipif(
    torch is None, reason="compares against PyTorch and transformers (pip install torch transformers)"
)

from arraygpt import GPT, GPTConfig, count_params
from arraygpt.io.hf.gpt2 import (
    GPT2_DEFAULTS,
    CheckpointError,
    config_from_gpt2,
    config_to_gpt2,
    load_gpt2,
    save_gpt2,
    state_dict_from_gpt2,
)
from arraygpt.io.safetensors import load_file, save_file
from arraygpt.xp import BackendUnavailable, load_backend, to_numpy

if transformers is not None:
    GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel
    transformers.logging.set_verbosity_error()

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=301)
TOL = {"float32": 1e-4, "float64": 1e-10}


def make_hf(seed: int = 0, dtype: torch.dtype | None = None, **overrides) -> GPT2LMHeadModel:
    """A tiny GPT2LMHeadModel whose every parameter (gains and biases included) is random, so
    that a swapped or mis-transposed tensor cannot hide behind an init of zeros or ones."""
    cfg = GPT2Config(**{**TINY, "bos_token_id": None, "eos_token_id": None, **overrides})
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).to(dtype or torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def save_hf(model: GPT2LMHeadModel, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


def hf_logits(model: GPT2LMHeadModel, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(idx)).logits.numpy()


def tokens(B: int, T: int, V: int = TINY["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(B, T))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(to_numpy(a), dtype=np.float64) - np.asarray(to_numpy(b), dtype=np.float64))))


def state_numpy(model: GPT) -> dict[str, np.ndarray]:
    return {name: to_numpy(value) for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """One saved tiny GPT-2 (gelu_new, tied), shared by the tests that only read it."""
    if torch is None:
        pytest.skip("needs torch and transformers to write a GPT-2 directory")
    return save_hf(make_hf(seed=0), tmp_path_factory.mktemp("hf") / "gpt2-tiny")


def copy_dir(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------
# same weights, same logits


@needs_torch
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"activation_function": "relu"},
        {"activation_function": "gelu"},
        {"activation_function": "gelu_pytorch_tanh"},
        {"activation_function": "relu2"},
        {"n_inner": 48, "layer_norm_epsilon": 1e-3},
        {"tie_word_embeddings": False},
    ],
    ids=["gelu_new", "relu", "gelu", "gelu_pytorch_tanh", "relu2", "n_inner", "untied"],
)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_weights_same_logits(tmp_path, overrides, dtype):
    hf = make_hf(seed=1, dtype=getattr(torch, dtype), **overrides)
    model = load_gpt2(save_hf(hf, tmp_path / "m"), dtype=dtype)
    assert model.config.norm_eps == hf.config.layer_norm_epsilon
    for T in (1, 5, TINY["n_positions"]):
        idx = tokens(2, T, seed=T)
        logits, _ = model.forward(idx)
        assert max_diff(logits, hf_logits(hf, idx)) <= TOL[dtype], f"T={T}"


@needs_torch
@pytest.mark.parametrize("backend", ["numpy", "array_api_strict", "torch"])
def test_load_onto_each_backend(hf_dir, backend):
    try:
        load_backend(backend)
    except BackendUnavailable as e:
        pytest.skip(str(e))
    model = load_gpt2(hf_dir, dtype="float64", backend=backend)
    idx = tokens(1, 9)
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).double().eval()
    logits, _ = model.forward(idx)
    assert max_diff(logits, hf_logits(hf, idx)) <= TOL["float64"]


@needs_torch
def test_load_and_save_a_transformers_directory(hf_dir, tmp_path):
    model = arraygpt.load(hf_dir, dtype="float64").model
    assert isinstance(model, GPT) and model.dtype == "float64"
    arraygpt.save(model, tmp_path / "out", format="gpt2")
    again = load_gpt2(tmp_path / "out", dtype="float64")
    for name, value in state_numpy(model).items():
        assert np.array_equal(value, to_numpy(again.state_dict()[name])), name


# ----------------------------------------------------------------------------------------------
# same loss and gradients as PyTorch autograd


def hf_grads(hf: GPT2LMHeadModel, config: GPTConfig) -> dict[str, np.ndarray]:
    grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    return state_dict_from_gpt2(grads, config, source="torch grads")


@needs_torch
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_loss_and_gradients_match_autograd(tmp_path, tie):
    """transformers shifts ``labels`` inside: its loss on (idx, labels=idx) is ours on
    (idx[:, :-1], targets=idx[:, 1:]), and so are all gradients (the last position has none).
    Its labels loss upcasts the logits with ``.float()`` (float32, even for a float64 model), so
    the float64 reference is the same shifted cross-entropy taken from its logits in float64."""
    hf = make_hf(seed=2, dtype=torch.float64, tie_word_embeddings=tie)
    model = load_gpt2(save_hf(hf, tmp_path / "m"), dtype="float64")
    idx = tokens(3, TINY["n_positions"], seed=5)
    out = hf(torch.as_tensor(idx), labels=torch.as_tensor(idx))
    V = out.logits.shape[-1]
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), torch.as_tensor(idx[:, 1:]).reshape(-1))
    ref.backward()
    _, loss = model.forward(idx[:, :-1], targets=idx[:, 1:])
    grads = model.backward()
    assert abs(loss - out.loss.item()) <= 1e-5  # transformers' own labels loss, in float32
    assert abs(loss - ref.item()) <= TOL["float64"]
    expected = hf_grads(hf, model.config)
    assert set(expected) == set(grads)
    report = {name: max_diff(grads[name], expected[name]) for name in grads}
    assert max(report.values()) <= TOL["float64"], {k: v for k, v in report.items() if v > TOL["float64"]}


@needs_torch
def test_gradients_with_ignored_targets_match_cross_entropy_ignore_index(hf_dir):
    """Our -1 targets are transformers' -100 labels: computed from HF logits with ignore_index."""
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).double().eval()
    model = load_gpt2(hf_dir, dtype="float64")
    idx, targets = tokens(2, 12, seed=7), tokens(2, 12, seed=8)
    targets[0, :4] = -1
    targets[1, 9] = -1
    logits = hf(torch.as_tensor(idx)).logits
    labels = torch.as_tensor(np.where(targets < 0, -100, targets))
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    _, loss = model.forward(idx, targets=targets)
    grads = model.backward()
    assert abs(loss - ref.item()) <= TOL["float64"]
    expected = hf_grads(hf, model.config)
    assert max(max_diff(grads[n], expected[n]) for n in grads) <= TOL["float64"]


# ----------------------------------------------------------------------------------------------
# round trips


def tiny_config(**overrides) -> GPTConfig:
    return GPTConfig(vocab_size=TINY["vocab_size"], block_size=16, n_layer=2, n_head=2, n_embd=32, **overrides)


def randomize(model: GPT, seed: int) -> None:
    """Random gains and biases too (a fresh GPT has ones and zeros there)."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, value in state_numpy(model).items():
        gain = value.ndim == 1 and "norm" in name and not name.endswith("_b")
        state[name] = rng.standard_normal(value.shape) * 0.3 + (1.0 if gain else 0.0)
    model.load_state_dict(state)


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_through_transformers_is_exact(tmp_path, dtype, tie):
    ours = GPT(tiny_config(tie_embeddings=tie, activation="relu", mlp_hidden=40, norm_eps=1e-6), seed=3, dtype=dtype)
    randomize(ours, 3)
    save_gpt2(ours, tmp_path / "ours")
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert hf.dtype == getattr(torch, dtype)
    hf.save_pretrained(tmp_path / "hf")
    back = load_gpt2(tmp_path / "hf", dtype=dtype)
    assert back.config == ours.config
    before, after = state_numpy(ours), state_numpy(back)
    assert set(before) == set(after)
    for name in before:
        assert after[name].dtype == before[name].dtype and np.array_equal(after[name], before[name]), name


@needs_torch
def test_model_trained_a_step_in_arraygpt_loads_in_transformers_with_identical_logits(tmp_path):
    model = GPT(tiny_config(), seed=4, dtype="float64")
    idx = tokens(4, 16, seed=9)
    _, loss0 = model.forward(idx[:, :-1], targets=idx[:, 1:])
    grads = model.backward()
    model.load_state_dict({n: to_numpy(p) - 0.5 * to_numpy(grads[n]) for n, p in model.state_dict().items()})
    logits, loss1 = model.forward(idx[:, :-1], targets=idx[:, 1:])
    assert loss1 < loss0
    arraygpt.save(model, tmp_path / "trained", format="gpt2")
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "trained").eval()
    assert max_diff(logits, hf_logits(hf, idx[:, :-1])) <= TOL["float64"]
    assert max_diff(logits, hf_logits(hf.float(), idx[:, :-1])) <= TOL["float32"]


@needs_torch
def test_config_round_trip_and_defaults_match_transformers():
    config = tiny_config(activation="gelu", mlp_hidden=100, norm_eps=1e-6, dropout=0.1, init_std=0.05)
    assert config_from_gpt2(config_to_gpt2(config)) == config
    reference = GPT2Config().to_dict()
    assert {k: reference[k] for k in GPT2_DEFAULTS} == GPT2_DEFAULTS
    # the real GPT-2's config.json (written by old transformers: n_ctx, no tie_word_embeddings)
    old = {
        "model_type": "gpt2",
        "n_ctx": 1024,
        "n_positions": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "vocab_size": 50257,
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
    }
    assert config_from_gpt2(old) == GPTConfig.preset("gpt2", dropout=0.1)


# ----------------------------------------------------------------------------------------------
# what the directory may look like


@needs_torch
def test_keys_without_prefix_and_mask_buffers_are_accepted(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "d")
    tensors = load_file(f"{d}/model.safetensors")
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for i in range(TINY["n_layer"]):  # what older transformers versions stored
        plain[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), dtype=np.uint8)).astype(bool)
        plain[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    plain["lm_head.weight"] = plain["wte.weight"]  # tied, and stored anyway
    save_file(plain, f"{d}/model.safetensors", metadata={"format": "pt"})
    a, b = load_gpt2(hf_dir), load_gpt2(d)
    for name, value in state_numpy(a).items():
        assert np.array_equal(value, to_numpy(b.state_dict()[name])), name


@needs_torch
def test_half_precision_weights_are_widened(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "d")
    tensors = load_file(f"{d}/model.safetensors")
    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    save_file(half, f"{d}/model.safetensors", metadata={"format": "pt"})
    model = load_gpt2(d, dtype="float64")
    assert np.array_equal(to_numpy(model.state_dict()["wpe"]), half["transformer.wpe.weight"].astype(np.float64))


@needs_torch
def test_bfloat16_weights_written_by_transformers_are_widened_exactly(tmp_path):
    """NumPy has no bfloat16: the reader widens it to float32 (bfloat16 is float32's top half)."""
    hf = make_hf(seed=5, dtype=torch.bfloat16)
    d = save_hf(hf, tmp_path / "bf16")
    assert "BF16" in (tmp_path / "bf16" / "model.safetensors").read_bytes()[:4096].decode("latin-1")
    model = load_gpt2(d, dtype="float32")
    for name, p in hf.named_parameters():
        if name == "transformer.wpe.weight":
            expected = p.detach().float().numpy()  # torch's own widening
            assert np.array_equal(to_numpy(model.state_dict()["wpe"]), expected)
    idx = tokens(1, 8)
    with torch.no_grad():
        ref = hf.float()(torch.as_tensor(idx)).logits.numpy()
    assert max_diff(model.forward(idx)[0], ref) <= TOL["float32"]


@needs_torch
def test_formats_load_opens_a_directory_written_by_transformers(hf_dir, tmp_path):
    from arraygpt.io.formats import load

    ckpt = load(hf_dir)
    assert ckpt.format == "gpt2" and ckpt.tokenizer is None and ckpt.prompt_prefix == []
    hf = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    idx = tokens(2, 8)
    assert max_diff(ckpt.model.forward(idx)[0], hf_logits(hf, idx)) <= TOL["float32"]
    sharded = make_hf(seed=6)
    sharded.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    ckpt = load(tmp_path / "sharded", dtype="float64")
    assert ckpt.format == "gpt2" and ckpt.model.dtype == "float64"
    assert max_diff(ckpt.model.forward(idx)[0], hf_logits(sharded, idx)) <= TOL["float32"]


@needs_torch
def test_sharded_checkpoint_written_by_transformers(tmp_path):
    hf = make_hf(seed=6)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = load_gpt2(tmp_path / "sharded")
    idx = tokens(1, 8)
    assert max_diff(model.forward(idx)[0], hf_logits(hf, idx)) <= TOL["float32"]


# ----------------------------------------------------------------------------------------------
# errors


def rewrite_config(d, **changes) -> None:
    path = f"{d}/config.json"
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


@needs_torch
def test_pickle_weights_are_refused_with_the_conversion_hint(hf_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(f"{hf_dir}/config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as e:
        load_gpt2(d)
    message = str(e.value)
    assert "safetensors" in message and "save_pretrained" in message and "never unpickles" in message


@needs_torch
def test_missing_tensor_is_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "d")
    tensors = load_file(f"{d}/model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, f"{d}/model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) transformer\.h\.1\.mlp\.c_fc\.bias"):
        load_gpt2(d)


@needs_torch
def test_wrong_shape_is_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "d")
    tensors = load_file(f"{d}/model.safetensors")
    tensors["transformer.h.0.attn.c_attn.weight"] = tensors["transformer.h.0.attn.c_attn.weight"][:, :90]
    save_file(tensors, f"{d}/model.safetensors")
    match = r"transformer\.h\.0\.attn\.c_attn\.weight has shape \(32, 90\).*\(32, 96\)"
    with pytest.raises(CheckpointError, match=match):
        load_gpt2(d)


@needs_torch
def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "d")
    tensors = load_file(f"{d}/model.safetensors")
    tensors["transformer.h.0.crossattention.c_attn.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, f"{d}/model.safetensors")
    with pytest.raises(CheckpointError, match=r"not GPT2LMHeadModel parameters: transformer\.h\.0\.crossattention"):
        load_gpt2(d)


@needs_torch
def test_tied_config_with_a_different_lm_head_is_refused(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "d")
    tensors = load_file(f"{d}/model.safetensors")
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"] + 1
    save_file(tensors, f"{d}/model.safetensors")
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        load_gpt2(d)


@needs_torch
@pytest.mark.parametrize(
    "changes, match",
    [
        ({"model_type": "llama"}, "model_type is 'llama'"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
        ({"scale_attn_weights": False}, "scale_attn_weights"),
        ({"add_cross_attention": True}, "add_cross_attention"),
        ({"activation_function": "gelu_fast"}, "activation_function 'gelu_fast'"),
        ({"attn_pdrop": 0.2}, "one dropout probability"),
        ({"n_head": 3}, r"n_embd \(32\) is not divisible by n_head \(3\)"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
    ],
)
def test_config_that_is_not_plain_gpt2_is_refused(hf_dir, tmp_path, changes, match):
    d = copy_dir(hf_dir, tmp_path / "d")
    rewrite_config(d, **changes)
    with pytest.raises(CheckpointError, match=match):
        load_gpt2(d)


@needs_torch
def test_missing_directory_config_or_weights(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_gpt2(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="pass the directory"):
        load_gpt2(f"{hf_dir}/model.safetensors")
    d = copy_dir(hf_dir, tmp_path / "no-config")
    (d_path := tmp_path / "no-config" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_gpt2(d)
    shutil.copy(f"{hf_dir}/config.json", d_path)
    (tmp_path / "no-config" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_gpt2(d)
    d_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_gpt2(d)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"norm": "rmsnorm"}, "norm"),
        ({"norm_affine": False}, "norm_affine"),
        ({"bias": False}, "bias"),
        ({"norm_emb": True}, "norm_emb"),
        ({"norm_final": False}, "norm_final"),
        ({"head_dim": 8}, "head_dim"),
    ],
)
def test_save_refuses_configs_gpt2_cannot_express(tmp_path, overrides, field):
    model = GPT(tiny_config(**overrides), seed=0)
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field} is"):
        save_gpt2(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"position": "rope"}, "position"),
        ({"mlp": "swiglu"}, "mlp"),
        ({"n_kv_head": 1}, "n_kv_head"),
        ({"bias": False, "qkv_bias": True}, "qkv_bias"),
    ],
)
def test_llama_style_configs_are_refused_with_a_pointer_to_format_llama(tmp_path, overrides, field):
    from arraygpt.io.hf.gpt2 import state_dict_to_gpt2

    model = GPT(tiny_config(**overrides), seed=0)
    match = rf"cannot write a GPT-2 checkpoint: GPTConfig\.{field} is .*format='llama'"
    with pytest.raises(ValueError, match=match):
        save_gpt2(model, tmp_path / "out")
    with pytest.raises(ValueError, match=match):
        config_to_gpt2(model.config)
    with pytest.raises(ValueError, match=match):
        state_dict_to_gpt2(model.state_dict(), model.config)
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_llama_preset_is_refused_on_its_first_field_and_saves_as_llama(tmp_path):
    import arraygpt

    model = GPT(GPTConfig.preset("llama-tiny"), seed=0)
    with pytest.raises(ValueError, match=r"GPTConfig\.position is 'rope'.*format='llama'"):
        arraygpt.save(model, tmp_path / "gpt2", format="gpt2")
    assert arraygpt.load(arraygpt.save(model, tmp_path / "llama", format="llama")).format == "llama"


# ----------------------------------------------------------------------------------------------
# parameter counts


def hf_count(config: GPT2Config) -> int:
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once


@needs_torch
@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_gpt2_preset_counts_equal_transformers(name):
    config = GPTConfig.preset(name)
    hf = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
    )
    assert count_params(config).total == hf_count(hf)
    if name == "gpt2":
        assert count_params(config).total == 124_439_808


# GPT-3 paper (Brown et al. 2020), Table 2.1: the preset's count and the size in the model's name.
# XL and 13B list n_heads * d_head != d_model; the presets follow the table literally.
GPT3 = {
    "gpt3-small": (125_226_240, 125e6),
    "gpt3-medium": (355_871_744, 350e6),
    "gpt3-large": (760_300_032, 760e6),
    "gpt3-2.7b": (2_651_553_280, 2.7e9),
    "gpt3-6.7b": (6_658_404_352, 6.7e9),
    "gpt3-175b": (174_604_259_328, 175e9),
    "gpt3-xl": (1_517_123_584, 1.3e9),  # attention width 24 * 128 = 3072 != 2048
    "gpt3-13b": (12_936_488_380, 13e9),  # attention width 40 * 128 = 5120 != 5140
}


@pytest.mark.parametrize("name", list(GPT3))
def test_gpt3_presets_land_on_the_papers_sizes(name):
    total, paper = GPT3[name]
    assert count_params(GPTConfig.preset(name)).total == total
    if name == "gpt3-xl":  # the literal table is 17% over "1.3B"; an attention width of d_model lands on it
        assert abs(total / paper - 1) > 0.1
        assert abs(count_params(GPTConfig.preset(name, n_head=16, head_dim=128)).total / paper - 1) < 0.02
    else:  # names are rounded: 356M is "350M", 2.65B is "2.7B"
        assert abs(total / paper - 1) < 0.02
