"""The fused decode step (``Kernels.decode``, backends/numpy/kernels/decode.py) against the same
blocks run layer by layer, and both against the weights dequantized by the ``gguf`` library on
the reference path."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("gguf", reason="quantizing and the reference dequantizer are the gguf package")
pytest.importorskip("numba", reason="the fused decode step is a numba kernel")

from arraygpt import GPT, GPTConfig
from arraygpt.backends.numpy import blas_threads
from arraygpt.backends.numpy.kernels import decode
from arraygpt.nn import core, kernels
from arraygpt.nn.core import KVCache
from test_quant_model import GPT2, LLAMA, _dense_reference, _randomized, _with_quantized_kernel

LLAMA_MHA = GPTConfig.from_dict({**LLAMA.to_dict(), "n_kv_head": 4, "tie_embeddings": False})


def _decode(model, idx, prompt=3):
    """Logits of a prompt, then one token at a time, and the cache's keys and values."""
    cache = KVCache(model.config)
    steps = [model.forward(idx[:, :prompt], kv_cache=cache)[0]]
    for t in range(prompt, idx.shape[1]):
        steps.append(model.forward(idx[:, t : t + 1], kv_cache=cache)[0])
    keys = [k[:, : cache.length].copy() for k in cache.keys]
    values = [v[:, : cache.length].copy() for v in cache.values]
    return np.concatenate(steps, axis=1), keys, values


def _layer_by_layer(model):
    """The model's decode steps from now on run its layers one by one (the core's loop)."""
    model.kernels = model.kernels._replace(decode=(core.layer_by_layer, core.no_backward))


def _fused_then_layered(model, idx, prompt=3):
    """_decode with the fused step, which must take every one-token step, then with the layers one
    by one: ((logits, keys, values) fused, (logits, keys, values) layer by layer)."""
    taken = _calls(model)
    fused = _decode(model, idx, prompt)
    assert taken == [True] * (idx.shape[1] - prompt)
    _layer_by_layer(model)
    return fused, _decode(model, idx, prompt)


def _calls(model):
    """Count the fused step's calls, True for each that took the model."""
    fused, count = model.kernels.decode[0], []

    def counted(*args):
        out = fused(*args)
        count.append(out is not None)
        return out

    model.kernels = model.kernels._replace(decode=(counted, core.no_backward))
    return count


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kernel", ["numba_quantized_linear", "numba_quantized_linear_int8"])
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
@pytest.mark.parametrize("config", [LLAMA, LLAMA_MHA], ids=["gqa-tied", "mha"])
def test_a_fused_decode_step_equals_the_layers_one_by_one(config, kind, kernel, threads):
    model = _with_quantized_kernel(_randomized(config, seed=3).quantize(kind), kernel)
    idx = np.random.default_rng(4).integers(0, config.vocab_size, (1, 14))
    with blas_threads(threads):
        (fused, fused_keys, fused_values), (layered, keys, values) = _fused_then_layered(model, idx)
    full = np.asarray(_dense_reference(model).forward(idx)[0])
    if kernel.endswith("int8"):
        # int8 activations: rounding to the nearest step is discontinuous, so the last bits in
        # which the two paths differ move a few steps by one, and the model carries that on
        # (tests/test_quant.py bounds each product; the float32 products above match to 1e-5)
        for got in (fused, layered):
            assert np.abs(got - full).max() <= 0.1 * np.abs(full).max()
    else:
        np.testing.assert_allclose(fused, layered, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fused, full, rtol=1e-4, atol=1e-4)
        for a, b in zip(fused_keys + fused_values, keys + values):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_a_decode_past_the_caches_first_capacity_grows_it():
    config = GPTConfig.from_dict({**LLAMA.to_dict(), "block_size": 300})
    model = _with_quantized_kernel(_randomized(config, seed=1).quantize("q8_0"), "numba_quantized_linear")
    idx = np.random.default_rng(2).integers(0, config.vocab_size, (1, 262))  # the cache starts at 256 positions
    (fused, _, _), (layered, _, _) = _fused_then_layered(model, idx, prompt=250)
    np.testing.assert_allclose(fused, layered, rtol=1e-5, atol=1e-5)


def test_a_weight_replaced_between_two_decodes_is_the_one_the_next_decode_reads():
    """The fused step keeps each model's prepared arguments while its parameters (the same dict)
    hold the same objects: a matrix put in their place after a decode is read by the next one."""
    model = _with_quantized_kernel(_randomized(LLAMA, seed=3).quantize("q8_0"), "numba_quantized_linear")
    idx = np.random.default_rng(4).integers(0, LLAMA.vocab_size, (1, 8))
    before, _, _ = _decode(model, idx)
    other = _randomized(LLAMA, seed=9).quantize("q8_0")
    model._core_params["layer1.attn_wo"] = other._core_params["layer1.attn_wo"]  # the same dict, a new object
    (fused, _, _), (layered, _, _) = _fused_then_layered(model, idx)
    np.testing.assert_allclose(fused, layered, rtol=1e-5, atol=1e-5)
    assert np.abs(fused - before).max() > 1e-3  # the new matrix changed the logits


def test_blocks_it_does_not_take_run_layer_by_layer():
    from arraygpt.nn.quant import QuantizedWeight

    x = np.zeros((1, 1, LLAMA.n_embd), np.float32)
    rope = core.rope_tables(LLAMA, np, 1, 0, np.float32, None)
    model = _randomized(LLAMA, seed=1).quantize("q8_0")
    params = dict(model._core_params)
    params["layer0.attn_wo"] = QuantizedWeight("q4_0", np.zeros((64, 1, 18), np.uint8), (64, 32))  # not (C, D)
    assert decode.decode_step_forward(params, LLAMA, x, KVCache(LLAMA), rope, model.kernels) is None
    floats = _randomized(LLAMA, seed=1)
    params = {k: v for k, v in floats._core_params.items() if k != "layer0.attn_wqkv"}  # Q, K, V not stacked
    assert decode.decode_step_forward(params, LLAMA, x, KVCache(LLAMA), rope, floats.kernels) is None
    x64 = x.astype(np.float64)
    assert decode.decode_step_forward(floats._core_params, LLAMA, x64, KVCache(LLAMA), rope, floats.kernels) is None

    taken = _calls(model)
    model.forward(np.array([[1, 2], [3, 4]]), kv_cache=KVCache(LLAMA))  # a batch of 2
    model.forward(np.array([[1, 2, 3]]), kv_cache=KVCache(LLAMA))  # three tokens (a prompt)
    model.forward(np.array([[1]]))  # no cache
    assert taken == []


@pytest.mark.parametrize(
    "config",
    [
        GPT2,
        GPTConfig.from_dict({**GPT2.to_dict(), "bias": False, "norm_affine": False}),
        GPTConfig.from_dict({**LLAMA.to_dict(), "qkv_bias": True, "tie_embeddings": False}),
        GPTConfig.from_dict({**LLAMA.to_dict(), "norm": "layernorm", "head_dim": 32}),
    ],
    ids=["gpt2", "gpt2-no-bias-no-gain", "qwen2-qkv-bias", "layernorm-wide-heads"],
)
@pytest.mark.parametrize("dtype", ["float32", "q8_0", "q4_0"])
def test_gpt2_and_float32_blocks_take_the_fused_step_too(config, dtype):
    model = _randomized(config, seed=5)
    if dtype != "float32":
        model = _with_quantized_kernel(model.quantize(dtype), "numba_quantized_linear")
    idx = np.random.default_rng(6).integers(0, config.vocab_size, (1, 10))
    (fused, keys, values), (layered, layered_keys, layered_values) = _fused_then_layered(model, idx)
    np.testing.assert_allclose(fused, layered, rtol=1e-5, atol=1e-5)
    for a, b in zip(keys + values, layered_keys + layered_values):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    if dtype == "float32":  # against the reference layers in float64
        reference = GPT(config, dtype="float64", kernels="reference", params=model.state_dict())
        np.testing.assert_allclose(fused, reference.forward(idx)[0], rtol=1e-4, atol=1e-4)


def test_the_numpy_backend_selects_the_fused_step_for_float32():
    assert kernels.select_kernels(LLAMA, "numpy", "float32").decode[0] is decode.decode_step_forward
    assert kernels.select_kernels(LLAMA, "numpy", "float64").decode[0] is core.layer_by_layer
    assert kernels.select_kernels(LLAMA, "numpy", "float32", "reference").decode[0] is core.layer_by_layer


LLAMA_K = GPTConfig.from_dict(
    {**LLAMA.to_dict(), "n_embd": 256, "n_head": 4, "n_kv_head": 2, "head_dim": 64, "mlp_hidden": 512}
)  # every matrix's input a multiple of 256: the K-quants' super-blocks


def _k_quant_model(kinds: dict[str, str], seed: int) -> GPT:
    """LLAMA_K on q8_0, then the named matrices as random K-quant blocks (gguf cannot quantize
    them) whose float16 scales keep the weights below about 1."""
    from arraygpt.nn.quant import BLOCKS, QuantizedWeight

    model = _randomized(LLAMA_K, seed=seed).quantize("q8_0")
    state = model.state_dict()
    rng = np.random.default_rng(seed)
    for name, kind in kinds.items():
        rows, cols = state[name].shape
        nbytes = BLOCKS[kind][1]
        blocks = rng.integers(0, 256, (rows, cols // 256, nbytes), dtype=np.uint8)
        for at in [208] if kind == "q6_k" else [0, 2]:  # d (and dmin) as float16
            scales = rng.uniform(-0.002, 0.002, (rows, cols // 256)).astype(np.float16)
            blocks[..., at : at + 2] = scales.view(np.uint8).reshape(rows, cols // 256, 2)
        state[name] = QuantizedWeight(kind, blocks, (rows, cols))
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("kernel", ["numba_quantized_linear", "numba_quantized_linear_int8"])
@pytest.mark.parametrize("threads", [1, 2])
def test_k_quants_and_a_stack_of_kinds_take_the_fused_step(kernel, threads):
    """llama.cpp's Q4_K_M: Q and K in Q4_K, V in Q6_K (a stack of two kinds), the MLP in Q4_K
    and Q6_K, O in Q5_K."""
    kinds = {"attn_wq": "q4_k", "attn_wk": "q4_k", "attn_wv": "q6_k", "attn_wo": "q5_k"}
    kinds |= {"mlp_gate": "q4_k", "mlp_up": "q4_k", "mlp_down": "q6_k"}
    model = _k_quant_model({f"layer{i}.{n}": kind for i in range(2) for n, kind in kinds.items()}, seed=7)
    assert type(model._core_params["layer1.attn_wqkv"]).__name__ == "QuantizedStack"
    model = _with_quantized_kernel(model, kernel)
    idx = np.random.default_rng(8).integers(0, LLAMA_K.vocab_size, (1, 9))
    with blas_threads(threads):
        (fused, fused_keys, fused_values), (layered, keys, values) = _fused_then_layered(model, idx)
    full = np.asarray(_dense_reference(model).forward(idx)[0])
    if kernel.endswith("int8"):
        # the same int8 products on both paths (each bounded against gguf in tests/test_kquant.py);
        # these random K-quant weights carry the activations' rounding far (0.27 of the logits'
        # scale from the dequantized model), so the two paths are held to each other here
        assert np.abs(fused - layered).max() <= 1e-3 * np.abs(full).max()
    else:
        np.testing.assert_allclose(fused, layered, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fused, full, rtol=1e-4, atol=1e-4)
        # the K-quants' min terms (-dmin mn sum x) cancel part of the quants' sums: the float32
        # bound, K eps sum_j |w_j x_j|, follows the terms' size, not the key's, so an element near
        # zero may differ in its fourth digit; each array is held to its largest element
        for a, b in zip(fused_keys + fused_values, keys + values):
            assert np.abs(a - b).max() <= 2e-5 * np.abs(b).max()
