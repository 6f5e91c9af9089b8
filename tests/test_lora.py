"""LoRA (arraygpt.nn.layers.lora_* and GPT.add_lora): the adapter pair and the LoRA linear against
PyTorch autograd (float64, the base weight frozen) and central differences (array-api-strict among
the backends); a model with adapters against its merged copy W + (alpha/r) B A, whose logits must
agree, and its adapter gradients against central differences of the whole model's loss; the base
weights never change and get no gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arraygpt.config import GPTConfig
from arraygpt.nn import layers
from arraygpt.nn.lora import LoRA
from arraygpt.nn.model import GPT
from arraygpt.xp import load_backend, to_numpy
from test_layers import gradcheck

torch = pytest.importorskip("torch")


@pytest.fixture(params=["numpy", "array_api_strict"])
def gbackend(request):
    return load_backend(request.param)


def _args(seed, lead=(2, 3), Cin=5, Cout=4, r=2, bias=True):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((*lead, Cin)),
        w=rng.standard_normal((Cout, Cin)),
        bias=rng.standard_normal(Cout) if bias else None,
        a=rng.standard_normal((r, Cin)),
        b=rng.standard_normal((Cout, r)),  # nonzero, unlike at init, so that dA is tested too
        scale=8.0 / r,
    )


@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_gradients(gbackend, bias):
    def backward(dout, cache):
        dx, dw, dbias, da, db = layers.lora_linear_backward(dout, cache)
        return {"x": dx, "w": dw, "bias": dbias, "a": da, "b": db}

    gradcheck(
        gbackend, layers.lora_linear_forward, backward, _args(1, bias=bias), ["x", "a", "b"], expect_none=["w", "bias"]
    )


def test_lora_adapter_gradients(gbackend):
    args = _args(2, lead=(7,))
    args = {k: args[k] for k in ("x", "a", "b", "scale")}

    def backward(dout, cache):
        dx, da, db = layers.lora_backward(dout, cache)
        return {"x": dx, "a": da, "b": db}

    gradcheck(gbackend, layers.lora_forward, backward, args, ["x", "a", "b"])


def test_lora_linear_against_torch_autograd():
    args = _args(3, lead=(2, 4), Cin=6, Cout=5, r=3)
    t = {k: torch.tensor(v, requires_grad=k in ("x", "a", "b")) for k, v in args.items() if k != "scale"}
    s = args["scale"]
    out_t = t["x"] @ t["w"].T + t["bias"] + s * (t["x"] @ t["a"].T) @ t["b"].T  # PEFT's lora.Linear
    dout = np.random.default_rng(4).standard_normal(out_t.shape)
    out_t.backward(torch.tensor(dout))
    out, cache = layers.lora_linear_forward(**args)
    dx, dw, dbias, da, db = layers.lora_linear_backward(dout, cache)
    assert dw is None and dbias is None
    np.testing.assert_allclose(out, out_t.detach().numpy(), rtol=1e-12, atol=1e-12)
    for mine, name in ((dx, "x"), (da, "a"), (db, "b")):
        np.testing.assert_allclose(mine, t[name].grad.numpy(), rtol=1e-12, atol=1e-12, err_msg=name)


def test_linear_input_backward_is_dx_of_linear():
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    xt = torch.tensor(x, requires_grad=True)
    dout = rng.standard_normal((3, 2))
    (xt @ torch.tensor(w).T).backward(torch.tensor(dout))
    _, cache = layers.linear_forward(x, w)
    np.testing.assert_allclose(layers.linear_input_backward(dout, cache), xt.grad.numpy(), rtol=1e-13)


# -----------------------------------------------------------------------------------------------
# a whole model with adapters

CONFIGS = {
    "llama": GPTConfig.preset("llama-tiny", n_layer=2, n_embd=16, n_head=4, n_kv_head=2, block_size=8, vocab_size=11),
    "gpt2": GPTConfig.preset("gpt2", n_layer=2, n_embd=12, n_head=3, block_size=8, vocab_size=11),
}
ALL_TARGETS = {
    "llama": ("attn_wq", "attn_wk", "attn_wv", "attn_wo", "mlp_gate", "mlp_up", "mlp_down"),
    "gpt2": ("attn_wq", "attn_wk", "attn_wv", "attn_wo", "mlp_fc1", "mlp_fc2"),
}


def _lora_model(kind, targets, seed=0, threads=1):
    model = GPT(CONFIGS[kind], seed=seed, dtype="float64", threads=threads)
    model.add_lora(LoRA(rank=2, alpha=3.0, targets=targets), seed=seed)
    rng = np.random.default_rng(seed + 9)
    for a in model.adapters.values():  # B starts at zero: give every adapter a nonzero value
        a[...] = model.backend.asarray(rng.standard_normal(a.shape) * 0.3)
    return model


def _batch(seed=1, B=3, T=8, V=11):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("which", ["default", "all"])
def test_adapters_equal_merged_weights(kind, which):
    targets = ("attn_wq", "attn_wv") if which == "default" else ALL_TARGETS[kind]
    model = _lora_model(kind, targets)
    merged = model.merged()
    # the merge written independently: W + (alpha/r) B A per adapted weight, with NumPy
    for name, p in model.params.items():
        expected = to_numpy(p)
        short = name.split(".", 1)[-1]
        if short in targets:
            a, b = to_numpy(model.adapters[name + ".lora_a"]), to_numpy(model.adapters[name + ".lora_b"])
            expected = expected + 1.5 * b @ a
        np.testing.assert_allclose(to_numpy(merged.params[name]), expected, rtol=1e-14, atol=1e-14, err_msg=name)
    x, y = _batch()
    logits, loss = model.forward(x, y)
    logits_m, loss_m = merged.forward(x, y)
    np.testing.assert_allclose(to_numpy(logits), to_numpy(logits_m), rtol=0, atol=1e-10)
    assert math.isclose(loss, loss_m, rel_tol=1e-12)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_model_adapter_gradients_central_differences(kind):
    model = _lora_model(kind, ALL_TARGETS[kind])
    base = {k: to_numpy(v).copy() for k, v in model.params.items()}
    x, y = _batch(2)
    model.forward(x, y)
    grads = model.backward()
    assert sorted(grads) == sorted(model.adapters), "only the adapters get gradients"
    rng = np.random.default_rng(3)
    eps = 1e-6
    for name in grads:
        d = rng.standard_normal(grads[name].shape)
        p = model.adapters[name]
        p0 = to_numpy(p).copy()
        losses = []
        for sign in (1.0, -1.0):
            p[...] = model.backend.asarray(p0 + sign * eps * d)
            losses.append(model.forward(x, y)[1])
        p[...] = model.backend.asarray(p0)
        numeric = (losses[0] - losses[1]) / (2 * eps)
        analytic = float(np.sum(to_numpy(grads[name]) * d))
        assert abs(analytic - numeric) <= 1e-6 * max(abs(numeric), 1e-3), (name, analytic, numeric)
    for k, v in model.params.items():
        assert np.array_equal(to_numpy(v), base[k]), f"{k} changed"


def test_split_batch_threads_give_the_same_adapter_gradients():
    x, y = _batch(4, B=4)
    one = _lora_model("llama", ALL_TARGETS["llama"], threads=1)
    two = _lora_model("llama", ALL_TARGETS["llama"], threads=2)
    two.runner.chunks = lambda B, work: [slice(0, 2), slice(2, 4)]  # force the split however small the model
    one.forward(x, y)
    two.forward(x, y)
    g1, g2 = one.backward(), two.backward()
    for name in g1:
        np.testing.assert_allclose(to_numpy(g2[name]), to_numpy(g1[name]), rtol=1e-10, atol=1e-12, err_msg=name)


def test_fresh_adapters_leave_the_model_as_it_was():
    model = GPT(CONFIGS["llama"], seed=0, dtype="float64")
    x, _ = _batch()
    before = to_numpy(model.forward(x)[0])
    model.add_lora(LoRA(rank=4))
    a = to_numpy(model.adapters["layer0.attn_wq.lora_a"])
    assert np.abs(a).max() <= 1 / math.sqrt(16) and a.std() > 0  # kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(in))
    assert not to_numpy(model.adapters["layer0.attn_wq.lora_b"]).any()
    assert np.array_equal(to_numpy(model.forward(x)[0]), before)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRA(rank=0)
    with pytest.raises(ValueError, match="attn_wq, attn_wk"):
        LoRA(rank=2, targets=("q_proj",))
    model = GPT(CONFIGS["llama"])
    with pytest.raises(ValueError, match="mlp_fc1 are not weights of this model; it has attn_wq"):
        model.add_lora(LoRA(rank=2, targets=("mlp_fc1",)))
