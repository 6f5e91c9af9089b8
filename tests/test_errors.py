"""Bad input gets a clear error that names the argument and the limit, never a silent broadcast or
a wrong answer."""

from __future__ import annotations

import re

import numpy as np
import pytest

from arraygpt import GPT, GPTConfig, set_backend
from arraygpt.config import PRESETS

CONFIG = GPTConfig.preset("microgpt")  # vocab 27, block_size 8


@pytest.fixture(scope="module")
def model():
    return GPT(CONFIG, seed=0)


# ---------------------------------------------------------------------------------------------
# idx and targets


@pytest.mark.parametrize("bad", [27, 1000, -1, -5])
def test_token_ids_outside_the_vocabulary(model, bad):
    idx = np.array([[0, 1, bad, 2]])
    with pytest.raises(ValueError, match=r"idx.*token id.*vocab_size \(27\)") as e:
        model.forward(idx)
    assert str(bad) in str(e.value)


def test_token_ids_outside_the_vocabulary_on_a_backend_array(backend):
    m = GPT(CONFIG, seed=0, backend=backend.name)
    with pytest.raises(ValueError, match=r"idx.*vocab_size \(27\)"):
        m.forward(backend.asarray(np.array([[0, 27]])))


def test_sequence_longer_than_block_size(model):
    with pytest.raises(ValueError, match=r"idx has 9 positions.*block_size is 8"):
        model.forward(np.zeros((1, 9), dtype=np.int64))


@pytest.mark.parametrize(
    "idx,dtype_name",
    [(np.array([[0.0, 1.0]]), "float64"), (np.array([[True, False]]), "bool"), ([[0.5, 1.0]], "float64")],
)
def test_non_integer_idx(model, idx, dtype_name):
    with pytest.raises(TypeError, match=rf"idx must be an integer array.*{dtype_name}"):
        model.forward(idx)


def test_non_integer_idx_on_a_backend_array(backend):
    m = GPT(CONFIG, seed=0, backend=backend.name)
    with pytest.raises(TypeError, match="idx must be an integer array"):
        m.forward(backend.asarray(np.array([[0.0, 1.0]])))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3), ()])
def test_idx_of_the_wrong_rank(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"idx must be 2-D (B, T), got shape {shape}")):
        model.forward(np.zeros(shape, dtype=np.int64))


def test_empty_idx(model):
    with pytest.raises(ValueError, match="idx must have at least one"):
        model.forward(np.zeros((1, 0), dtype=np.int64))


@pytest.mark.parametrize("shape", [(1, 3), (2, 4), (4,), (1, 4, 1)])
def test_targets_of_another_shape(model, shape):
    idx = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="targets"):
        model.forward(idx, np.zeros(shape, dtype=np.int64))


def test_targets_out_of_range_and_non_integer(model):
    idx = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"targets.*-1 \(ignore\).*vocab_size \(27\)"):
        model.forward(idx, np.array([[0, 1, -2, 3]]))
    with pytest.raises(ValueError, match=r"targets.*vocab_size \(27\)"):
        model.forward(idx, np.array([[0, 1, 27, 3]]))
    with pytest.raises(TypeError, match="targets must be an integer array"):
        model.forward(idx, np.zeros((1, 4)))


def test_backward_without_a_forward_with_targets():
    m = GPT(CONFIG, seed=0)
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a forward\(idx, targets\)"):
        m.backward()
    m.forward(np.zeros((1, 4), dtype=np.int64))  # no targets
    with pytest.raises(RuntimeError, match="targets"):
        m.backward()
    m.forward(np.zeros((1, 4), dtype=np.int64), np.zeros((1, 4), dtype=np.int64))
    m.backward()
    with pytest.raises(RuntimeError, match="targets"):  # one backward per forward
        m.backward()


# ---------------------------------------------------------------------------------------------
# GPTConfig fields


@pytest.mark.parametrize(
    "field,value,why",
    [
        ("vocab_size", 0, "positive integer"),
        ("block_size", -1, "positive integer"),
        ("n_layer", 0, "positive integer"),
        ("n_head", 0, "positive integer"),
        ("n_embd", 0, "positive integer"),
        ("n_embd", 16.0, "positive integer"),
        ("n_layer", True, "positive integer"),
        ("head_dim", 0, "positive integer"),
        ("mlp_hidden", -4, "positive integer"),
        ("norm", "batchnorm", "layernorm, rmsnorm"),
        ("activation", "swish", "gelu_tanh"),
        ("init_output", "xavier", "scaled"),
        ("norm_eps", 0.0, "> 0"),
        ("norm_eps", float("nan"), "> 0"),
        ("norm_eps", float("inf"), "finite number > 0"),
        ("init_std", -0.1, ">= 0"),
        ("init_std", float("inf"), "finite number >= 0"),
        ("rope_theta", float("inf"), "finite number > 0"),
        ("rope_scaling", (float("inf"), 1.0, 4.0, 8192), "finite factor"),
        ("rope_scaling", (8.0, 1.0, float("inf"), 8192), "high_freq_factor < inf"),
        ("dropout", 1.0, r"\[0, 1\)"),
        ("dropout", -0.1, r"\[0, 1\)"),
    ],
)
def test_invalid_config_field_is_named(field, value, why):
    with pytest.raises(ValueError, match=rf"GPTConfig\.{field}.*{why}"):
        GPTConfig.preset("microgpt", **{field: value})


def test_n_embd_not_divisible_by_n_head():
    with pytest.raises(ValueError, match=r"n_embd \(10\).*n_head \(4\).*head_dim"):
        GPTConfig(n_embd=10, n_head=4)
    assert GPTConfig(n_embd=10, n_head=4, head_dim=3).attn_dim == 12  # allowed when head_dim is given


@pytest.mark.parametrize("field", ["norm_affine", "norm_emb", "norm_final", "bias", "tie_embeddings"])
def test_non_bool_flag_is_named(field):
    # "false" is truthy: accepting it would silently turn the feature on
    with pytest.raises((ValueError, TypeError), match=field):
        GPTConfig.preset("microgpt", **{field: "false"})


@pytest.mark.parametrize("field", ["norm_eps", "init_std", "dropout"])
def test_non_numeric_float_field_is_named(field):
    with pytest.raises((ValueError, TypeError), match=field):
        GPTConfig.preset("microgpt", **{field: "0.1"})


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"n_heads"):
        GPTConfig.preset("gpt2", n_heads=4)


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="gpt5") as e:
        GPTConfig.preset("gpt5")
    for name in PRESETS:
        assert name in str(e.value)


# ---------------------------------------------------------------------------------------------
# model construction


@pytest.mark.parametrize("dtype", ["int32", "float8", np.float64])
def test_dtype_other_than_float32_or_float64(dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float64"):
        GPT(CONFIG, dtype=dtype)


def test_config_must_be_a_gptconfig():
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT({"n_layer": 1})


def test_unknown_backend_lists_backends():
    with pytest.raises(ValueError, match=r"unknown backend 'jax'.*array_api_strict.*numpy") as e:
        GPT(CONFIG, backend="jax")
    assert "cupy" in str(e.value)
    with pytest.raises(ValueError, match="available backends"):
        set_backend("NumPyy")
