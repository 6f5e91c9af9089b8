"""CuPy against NumPy, layer by layer and for the whole model on the same seed (as llm.c's dev/cuda
kernels validate against a CPU reference). Marked ``gpu``: conftest skips them, with the reason, on
a machine without CuPy or without a CUDA device. Leave TF32 off (CuPy does unless CUPY_TF32 is set).
"""

from __future__ import annotations

import numpy as np
import pytest

from arraygpt import GPT, GPTConfig
from arraygpt.nn import layers
from arraygpt.xp import load_backend, to_numpy

pytestmark = pytest.mark.gpu

TOL = {"float64": 1e-11, "float32": 2e-5}


@pytest.fixture(scope="module")
def cupy_backend():
    pytest.importorskip("cupy")
    return load_backend("cupy")


def _close(got, want, dtype, what):
    got, want = to_numpy(got).astype(np.float64), to_numpy(want).astype(np.float64)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    assert err <= TOL[dtype] * scale, f"{what}: max abs diff {err:.3e} > {TOL[dtype] * scale:.3e}"


def _layer_cases(rng, dtype):
    """(name, forward(**args) -> (out, cache), backward(dout, cache) -> tuple, host args, integer args)."""
    f = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    B, T, C, V, NH = 2, 5, 8, 11, 2
    coins = rng.random((B, NH, T, T)).astype(dtype)
    cases = [
        (
            "encoder",
            lambda idx, wte, wpe: layers.encoder_forward(idx, wte, wpe, 1),
            layers.encoder_backward,
            dict(wte=f(V, C), wpe=f(8, C)),
            dict(idx=np.array([[1, 3, 1, 1, 0], [10, 3, 5, 1, 1]])),
        ),
        (
            "dropout",
            lambda x, coins: layers.dropout_forward(x, 0.3, coins),
            lambda d, c: (layers.dropout_backward(d, c),),
            dict(x=f(B, T, C), coins=rng.random((B, T, C)).astype(dtype)),
            {},
        ),
        (
            "layernorm",
            lambda x, w, b: layers.layernorm_forward(x, w, b, 1e-5),
            layers.layernorm_backward,
            dict(x=f(B, T, C), w=f(C), b=f(C)),
            {},
        ),
        (
            "rmsnorm",
            lambda x, w: layers.rmsnorm_forward(x, w, None, 1e-5),
            lambda d, c: layers.rmsnorm_backward(d, c)[:2],
            dict(x=f(B, T, C), w=f(C)),
            {},
        ),
        ("linear", layers.linear_forward, layers.linear_backward, dict(x=f(B, T, C), w=f(3 * C, C), b=f(3 * C)), {}),
        (
            "softmax",
            lambda x: (lambda p: (p, p))(layers.softmax_forward(x, 0.7)),
            lambda d, p: (layers.softmax_backward(d, p, 0.7),),
            dict(x=f(B, T, V)),
            {},
        ),
        (
            "attention",
            lambda q, k, v: layers.attention_forward(q, k, v, NH),
            layers.attention_backward,
            dict(q=f(B, T, C), k=f(B, T, C), v=f(B, T, C)),
            {},
        ),
        (
            "attention-kv",
            lambda q, k, v: layers.attention_forward(q, k, v, NH),
            layers.attention_backward,
            dict(q=f(B, 2, C), k=f(B, T, C), v=f(B, T, C)),
            {},
        ),
        (
            "attention-dropout",
            lambda q, k, v, coins: layers.attention_forward(q, k, v, NH, 0.2, coins),
            layers.attention_backward,
            dict(q=f(B, T, C), k=f(B, T, C), v=f(B, T, C), coins=coins),
            {},
        ),
        ("residual", layers.residual_forward, layers.residual_backward, dict(a=f(B, T, C), b=f(B, T, C)), {}),
    ]
    for act, (fwd, bwd) in layers.ACTIVATIONS.items():
        cases.append((act, fwd, lambda d, c, bwd=bwd: (bwd(d, c),), dict(x=f(B, T, C) * 3), {}))
    targets = rng.integers(0, V, B * T)
    targets[[1, 6]] = -1
    cases.append(
        (
            "crossentropy",
            layers.crossentropy_forward,
            lambda d, c: (layers.crossentropy_backward(1.0, c),),
            dict(logits=f(B * T, V) * 2),
            dict(targets=targets),
        )
    )
    return cases


def compare_layers(dev, ref, dtype):
    """Every layer pair on ``dev`` against ``ref`` (forward output and every gradient)."""
    rng = np.random.default_rng(0)
    for name, forward, backward, floats, ints in _layer_cases(rng, dtype):
        outs = {}
        for backend in (ref, dev):
            args = {k: backend.asarray(v) for k, v in {**floats, **ints}.items()}
            out, cache = forward(**args)
            dout = np.random.default_rng(1).standard_normal(tuple(out.shape)).astype(dtype)
            grads = backward(float(dout) if dout.ndim == 0 else backend.asarray(dout), cache)
            backend.synchronize()
            outs[backend.name] = (to_numpy(out), [None if g is None else to_numpy(g) for g in grads])
        (out_ref, grads_ref), (out_dev, grads_dev) = outs[ref.name], outs[dev.name]
        _close(out_dev, out_ref, dtype, f"{name} forward")
        assert len(grads_dev) == len(grads_ref)
        for i, (g_dev, g_ref) in enumerate(zip(grads_dev, grads_ref)):
            assert (g_dev is None) == (g_ref is None), f"{name} gradient {i}"
            if g_ref is not None:
                _close(g_dev, g_ref, dtype, f"{name} gradient {i}")


CONFIGS = {
    "microgpt": GPTConfig.preset("microgpt", init_output="normal"),
    "gpt2-small": GPTConfig.preset("gpt2", vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32),
    "gpt3-style": GPTConfig.preset(
        "gpt3-xl",
        vocab_size=64,
        block_size=16,
        n_layer=2,
        n_embd=24,
        n_head=4,
        head_dim=8,
        activation="gelu",
        tie_embeddings=False,
    ),
}


def compare_models(dev, ref, config, dtype):
    rng = np.random.default_rng(2)
    idx = rng.integers(0, config.vocab_size, (3, config.block_size))
    targets = rng.integers(0, config.vocab_size, (3, config.block_size))
    targets[0, :3] = -1
    results = {}
    for backend in (ref, dev):
        model = GPT(config, seed=7, dtype=dtype, backend=backend.name)
        logits, loss = model.forward(idx, targets)
        grads = model.backward()
        backend.synchronize()
        results[backend.name] = (model.state_dict(), to_numpy(logits), loss, grads)
    (s_ref, l_ref, loss_ref, g_ref), (s_dev, l_dev, loss_dev, g_dev) = results[ref.name], results[dev.name]
    for k in s_ref:
        np.testing.assert_array_equal(to_numpy(s_dev[k]), to_numpy(s_ref[k]), err_msg=f"initial {k}")
    _close(l_dev, l_ref, dtype, "logits")
    assert abs(loss_dev - loss_ref) <= TOL[dtype] * max(1.0, abs(loss_ref))
    assert set(g_dev) == set(g_ref)
    for k in g_ref:
        _close(g_dev[k], g_ref[k], dtype, f"d{k}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cupy_layers_match_numpy(cupy_backend, dtype):
    compare_layers(cupy_backend, load_backend("numpy"), dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cupy_model_matches_numpy(cupy_backend, name, dtype):
    compare_models(cupy_backend, load_backend("numpy"), CONFIGS[name], dtype)


def test_cupy_arrays_stay_on_the_device(cupy_backend):
    import cupy

    model = GPT(CONFIGS["gpt2-small"], seed=0, backend="cupy")
    assert all(isinstance(v, cupy.ndarray) for v in model.state_dict().values())
    logits, _ = model.forward(np.zeros((1, 4), dtype=np.int64), np.zeros((1, 4), dtype=np.int64))
    assert isinstance(logits, cupy.ndarray)
    assert all(isinstance(g, cupy.ndarray) for g in model.backward().values())


def test_cupy_dropout_draws_its_coins_on_the_device(cupy_backend):
    """Attention dropout needs B·NH·T·T coins per layer: made on the GPU from one host-drawn seed,
    so the same seed (and the same saved generator state) still gives the same step."""
    import cupy

    coins = cupy_backend.uniform(np.random.default_rng(0), (4, 6, 64, 64), "float32")
    assert isinstance(coins, cupy.ndarray) and coins.dtype == cupy.float32
    assert float(coins.min()) >= 0.0 and float(coins.max()) < 1.0
    assert abs(float((coins < 0.2).mean()) - 0.2) < 0.01
    config = GPTConfig.preset("gpt2", vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.2)
    idx = np.random.default_rng(3).integers(0, 97, (3, 17))
    runs = []
    for _ in range(2):
        model = GPT(config, seed=1, backend="cupy")
        model.train()
        losses = [model.forward(idx[:, :-1], idx[:, 1:])[1] for _ in range(2)]
        runs.append((losses, {k: to_numpy(g) for k, g in model.backward().items()}))
    (losses_a, grads_a), (losses_b, grads_b) = runs
    assert losses_a == losses_b and losses_a[0] != losses_a[1]  # reproducible, and a new mask each step
    for k in grads_a:
        np.testing.assert_array_equal(grads_a[k], grads_b[k], err_msg=k)
