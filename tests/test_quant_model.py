"""Models that run on quantized weights (GPT.quantize, load_gguf(quantized=True)) against the
same weights dequantized by the ``gguf`` library (llama.cpp's own Python package) and run
through the reference float path."""

from __future__ import annotations

import mmap

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="quantizing and the reference dequantizer are the gguf package")
from gguf import GGMLQuantizationType, quants

import arraygpt
from arraygpt import GPT, GPTConfig
from arraygpt.nn import quant
from arraygpt.nn.core import KVCache
from arraygpt.nn.quant import QuantizedWeight

LLAMA = GPTConfig(
    vocab_size=96,
    block_size=32,
    n_layer=2,
    n_head=4,
    n_kv_head=2,
    n_embd=64,
    mlp_hidden=96,
    norm="rmsnorm",
    position="rope",
    mlp="swiglu",
    bias=False,
    tie_embeddings=True,
    norm_emb=False,
    dropout=0.0,
)
GPT2 = GPTConfig(vocab_size=80, block_size=32, n_layer=2, n_head=2, n_embd=64, mlp_hidden=128, dropout=0.0)


def _dense_reference(model: GPT) -> GPT:
    """The model's weights dequantized by the gguf library, in a float32 model on the reference
    kernels."""
    params = {}
    for name, w in model.state_dict().items():
        if isinstance(w, QuantizedWeight):
            kind = GGMLQuantizationType[w.kind.upper()]
            w = quants.dequantize(np.asarray(w.blocks).reshape(w.shape[0], -1), kind)
        params[name] = np.asarray(w, dtype=np.float32)
    return GPT(model.config, kernels="reference", params=params)


def _randomized(config: GPTConfig, seed: int) -> GPT:
    model = GPT(config, seed=seed)
    rng = np.random.default_rng(seed)
    for w in model.params.values():  # norm gains and biases away from 1 and 0
        if w.ndim == 1:
            w[...] = rng.uniform(0.5, 1.5, w.shape).astype(np.float32) * (1 if w[0] == 1 else 0.1)
    return model


def _with_quantized_kernel(model: GPT, name: str | None) -> GPT:
    """The model on the float32 (``numba_quantized_linear``) or int8 quantized kernel; None: as selected."""
    if name is not None:
        pytest.importorskip("numba")
        from arraygpt.backends.numpy.kernels import KERNELS

        model.kernels = model.kernels._replace(quantized_linear=KERNELS[name].kernel())
    return model


def _assert_close(model: GPT, got: np.ndarray, expected: np.ndarray) -> None:
    """Equal within float32 rounding; on the int8 kernel, whose decode steps and short prompts
    multiply int8 activations (each product is checked against its bound in tests/test_quant.py), within 10% of
    the logits' scale: the rounding of every layer's inputs adds up in these small random models,
    a wrong block or row would be off by the logits' whole scale."""
    if model.kernels.quantized_linear[0].__name__ == "quantized_linear_int8_forward":
        assert np.abs(got - expected).max() <= 0.1 * np.abs(expected).max()
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


KERNELS = [None, "numba_quantized_linear", "numba_quantized_linear_int8"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", ["q8_0", "q4_1", "q4_0"])
@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama-gqa-tied", "gpt2"])
def test_kv_cache_decoding_on_quantized_weights_equals_the_dequantized_model(config, kind, kernel):
    model = _with_quantized_kernel(_randomized(config, seed=3).quantize(kind), kernel)
    quantized = model.quantized
    assert quantized["wte"] == kind and quantized["layer1.attn_wk"] == kind and "wpe" not in quantized
    reference = _dense_reference(model)
    idx = np.random.default_rng(4).integers(0, config.vocab_size, (1, 12))
    full = np.asarray(reference.forward(idx)[0])
    cache = KVCache(config)
    steps = [model.forward(idx[:, :9], kv_cache=cache)[0]]  # a prompt past MAX_ROWS (prefill), then one at a time
    for t in range(9, idx.shape[1]):
        steps.append(model.forward(idx[:, t : t + 1], kv_cache=cache)[0])
    decoded = np.concatenate(steps, axis=1)
    _assert_close(model, decoded, full)
    # the reference kernels on the same blocks
    on_reference = GPT(config, kernels="reference", params=model.state_dict())
    np.testing.assert_allclose(on_reference.forward(idx)[0], full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
def test_q_k_v_of_different_kinds_run_as_a_stack(kernel):
    model = _with_quantized_kernel(_randomized(LLAMA, seed=5).quantize("q4_0"), kernel)
    state = model.state_dict()
    state["layer0.attn_wv"] = QuantizedWeight(
        "q8_0",
        quants.quantize(
            np.asarray(np.random.default_rng(5).standard_normal((32, 64)), np.float32), GGMLQuantizationType.Q8_0
        ).reshape(32, 2, 34),
        (32, 64),
    )
    model.load_state_dict(state)
    idx = np.array([[1, 2, 3, 4]])
    _assert_close(model, model.forward(idx)[0], _dense_reference(model).forward(idx)[0])


def test_training_quantized_weights_is_refused_until_dequantized():
    model = _randomized(LLAMA, seed=6).quantize("q8_0")
    idx = np.array([[1, 2, 3]])
    _, loss = model.forward(idx, targets=idx)
    assert np.isfinite(loss)
    with pytest.raises(RuntimeError, match=r"inference only.*model\.dequantize\(\)"):
        model.backward()
    model.dequantize()
    assert model.quantized == {}
    model.forward(idx, targets=idx)
    assert set(model.backward()) == set(model.state_dict())


@pytest.mark.parametrize("dtype", ["q8_0", "q4_1"])
def test_a_gguf_file_loads_quantized_over_the_memory_mapped_blocks(tmp_path, dtype):
    pytest.importorskip("numba")
    from arraygpt.io.gguf import load_gguf, save_gguf

    path = save_gguf(_randomized(LLAMA, seed=7), tmp_path / "m.gguf", dtype=dtype)
    kept = load_gguf(path, quantized=True).model
    assert arraygpt.load(path, quantized=True).model.quantized == kept.quantized
    dense = load_gguf(path).model  # dequantized by gguf.quants.dequantize
    assert set(kept.quantized.values()) == {dtype} and len(kept.quantized) == 1 + 7 * LLAMA.n_layer
    wo = kept.params["layer0.attn_wo"].blocks
    assert not wo.flags.writeable  # a read-only view of the file, not a copy
    while isinstance(wo.base, np.ndarray):
        wo = wo.base
    assert isinstance(wo.base.obj, mmap.mmap)  # np.frombuffer's memoryview of the map
    # gate and up lie back to back in the file: their stack is a view of it too, no copy
    fused = kept._core_params["layer1.mlp_gate_up"].blocks
    assert not fused.flags.writeable and np.shares_memory(fused, kept.params["layer1.mlp_up"].blocks)
    assert np.array_equal(fused[LLAMA.mlp_hidden :], kept.params["layer1.mlp_up"].blocks)
    # Q, K (unpermuted) and V: one read-only copy, the views the fused projection reads, whose
    # blocks gguf's dequantizer turns into the dense model's weights
    qkv = kept._core_params["layer1.attn_wqkv"].blocks
    assert not qkv.flags.writeable and not np.shares_memory(qkv, wo)
    for name in ("attn_wq", "attn_wk", "attn_wv"):
        blocks = kept.params[f"layer1.{name}"].blocks
        assert np.shares_memory(qkv, blocks)
        ours = quants.dequantize(blocks.reshape(blocks.shape[0], -1), GGMLQuantizationType[dtype.upper()])
        np.testing.assert_array_equal(ours, dense.params[f"layer1.{name}"])
    idx = np.array([[5, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    _assert_close(kept, kept.forward(idx)[0], dense.forward(idx)[0])
    with pytest.raises(RuntimeError, match="inference only"):
        kept.forward(idx, targets=idx)
        kept.backward()


def test_stacking_at_load_keeps_each_weight_and_unpermutes_q_and_k():
    from arraygpt.io.gguf import _stack_blocks, _unpermute

    rng = np.random.default_rng(3)

    def weight(rows: int, kind: str) -> QuantizedWeight:
        return quant.quantize(rng.standard_normal((rows, 64)).astype(np.float32), kind)

    def dense(w: QuantizedWeight) -> np.ndarray:  # the gguf library's dequantizer
        return quants.dequantize(w.blocks.reshape(w.shape[0], -1), GGMLQuantizationType[w.kind.upper()])

    heads = {"layer0.attn_wq": 4, "layer0.attn_wk": 2, "layer1.attn_wq": 4, "layer1.attn_wk": 2}
    state = {"layer0.attn_wq": weight(64, "q4_1"), "layer0.attn_wk": weight(32, "q4_1")}
    state |= {"layer0.attn_wv": weight(32, "q4_1"), "layer0.mlp_gate": weight(8, "q8_0")}
    state |= {"layer0.mlp_up": weight(8, "q8_0"), "layer1.attn_wq": weight(64, "q4_0")}
    state |= {"layer1.attn_wk": weight(32, "q4_0"), "layer1.attn_wv": weight(32, "q8_0")}  # V of another kind
    expected = {name: dense(w) for name, w in state.items()}
    expected = {name: _unpermute(w, heads[name]) if name in heads else w for name, w in expected.items()}
    _stack_blocks(state, heads, 2)
    for name, w in state.items():
        np.testing.assert_array_equal(dense(w), expected[name], err_msg=name)
    for group in (("attn_wq", "attn_wk", "attn_wv"), ("mlp_gate", "mlp_up")):  # layer 0: one buffer each
        blocks = [state[f"layer0.{part}"].blocks for part in group]
        assert all(b.base is blocks[0].base and not b.flags.writeable for b in blocks)
