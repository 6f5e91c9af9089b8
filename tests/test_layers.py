"""Every forward/backward pair of arraygpt.nn.layers against central finite differences (float64), on
array-api-strict (which proves the layer code uses only the standard) and the other CPU backends;
layer outputs against PyTorch's own functions where one exists; our erfc against math.erfc.

The gradient check is directional: for a random direction d in one input, <grad, d> must equal
(L(x + eps d) - L(x - eps d)) / (2 eps), where L = sum(out * dout) for a random dout. One scalar per
input is well conditioned, unlike per-element differences on tiny gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from arraygpt.nn import layers
from arraygpt.xp import load_backend, to_numpy
from conftest import available_backends

GRAD_BACKENDS = [b.name for b in available_backends() if b.name in ("numpy", "array_api_strict", "torch")]
EPS = 1e-6
REL = 1e-6


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


def gradcheck(backend, forward, backward, args, wrt, seed=0, expect_none=()):
    """Check ``backward`` against central differences of sum(forward(...) * dout).

    forward(**device_args) -> (out, cache); backward(dout, cache) -> {arg name: gradient or None}.
    ``args`` holds host values: float64 NumPy arrays are moved to ``backend``; anything else is
    passed as is. Every name in ``wrt`` gets its own random direction.
    """
    rng = np.random.default_rng(seed)

    def run(host):
        dev = {k: backend.asarray(v) if isinstance(v, np.ndarray) else v for k, v in host.items()}
        return forward(**dev)

    out, cache = run(args)
    out_host = to_numpy(out)
    assert out_host.dtype == np.float64
    assert np.all(np.isfinite(out_host))
    dout = rng.standard_normal(out_host.shape)
    grads = backward(backend.asarray(dout) if out_host.ndim else float(dout), cache)
    for name in expect_none:
        assert grads[name] is None, f"{name}: expected no gradient"
    for name in wrt:
        g = to_numpy(grads[name])
        assert g.shape == args[name].shape, f"d{name} has shape {g.shape}, expected {args[name].shape}"
        assert g.dtype == np.float64
        d = rng.standard_normal(args[name].shape)

        def probe(sign, name=name, d=d):
            host = dict(args)
            host[name] = args[name] + sign * EPS * d
            o, _ = run(host)
            return float(np.sum(to_numpy(o) * dout))

        numeric = (probe(1.0) - probe(-1.0)) / (2 * EPS)
        analytic = float(np.sum(g * d))
        assert abs(numeric) > 1e-6, f"d{name}: directional derivative {numeric} too small to test"
        assert _rel(analytic, numeric) < REL, f"d{name}: analytic {analytic!r} vs finite difference {numeric!r}"


@pytest.fixture(params=GRAD_BACKENDS)
def gbackend(request):
    return load_backend(request.param)


def _normal(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


# ---------------------------------------------------------------------------------------------
# encoder


@pytest.mark.parametrize("pos_offset", [0, 2])
def test_encoder_gradients(gbackend, pos_offset):
    rng = np.random.default_rng(1)
    C, V, block = 5, 6, 8
    idx = np.array([[1, 3, 1, 1], [0, 3, 5, 1]])  # repeated ids: the scatter-add must accumulate
    args = dict(idx=gbackend.asarray(idx), wte=_normal(rng, V, C), wpe=_normal(rng, block, C))

    def forward(idx, wte, wpe):
        return layers.encoder_forward(idx, wte, wpe, pos_offset)

    def backward(dout, cache):
        dwte, dwpe = layers.encoder_backward(dout, cache)
        return {"wte": dwte, "wpe": dwpe}

    gradcheck(gbackend, forward, backward, args, ["wte", "wpe"])


def test_encoder_forward_values(gbackend):
    rng = np.random.default_rng(2)
    wte, wpe = _normal(rng, 6, 3), _normal(rng, 8, 3)
    idx = np.array([[4, 0, 4]])
    x, _ = layers.encoder_forward(gbackend.asarray(idx), gbackend.asarray(wte), gbackend.asarray(wpe), 3)
    np.testing.assert_array_equal(to_numpy(x), wte[idx] + wpe[3:6][None])


# ---------------------------------------------------------------------------------------------
# dropout


def test_dropout_gradients(gbackend):
    rng = np.random.default_rng(3)
    p = 0.3
    coins = rng.random((2, 3, 4))
    args = dict(x=_normal(rng, 2, 3, 4), coins=gbackend.asarray(coins))

    def backward(dout, mask):
        return {"x": layers.dropout_backward(dout, mask)}

    gradcheck(gbackend, lambda x, coins: layers.dropout_forward(x, p, coins), backward, args, ["x"])


def test_dropout_forward_values(gbackend):
    rng = np.random.default_rng(4)
    x, coins, p = _normal(rng, 3, 5), rng.random((3, 5)), 0.4
    out, _ = layers.dropout_forward(gbackend.asarray(x), p, gbackend.asarray(coins))
    np.testing.assert_allclose(to_numpy(out), np.where(coins >= p, x / (1 - p), 0.0), rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------
# layernorm and rmsnorm


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", ["none", "gain", "gain+bias"])
def test_norm_gradients(gbackend, norm, affine):
    forward_fn, backward_fn = layers.NORMS[norm]
    rng = np.random.default_rng(5)
    C = 6
    args = dict(
        x=_normal(rng, 2, 3, C, scale=2.0) + 0.5,
        w=_normal(rng, C) if affine != "none" else None,
        b=_normal(rng, C) if affine == "gain+bias" else None,
    )
    wrt = ["x"] + (["w"] if affine != "none" else []) + (["b"] if affine == "gain+bias" else [])
    expect_none = [n for n in ("w", "b") if n not in wrt]

    def forward(x, w, b):
        return forward_fn(x, w, b, 1e-5)

    def backward(dout, cache):
        dx, dw, db = backward_fn(dout, cache)
        return {"x": dx, "w": dw, "b": db}

    gradcheck(gbackend, forward, backward, args, wrt, expect_none=expect_none)


def test_layernorm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    x, w, b = _normal(rng, 2, 3, 7), _normal(rng, 7), _normal(rng, 7)
    out, _ = layers.layernorm_forward(x, w, b, 1e-5)
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (7,), torch.from_numpy(w), torch.from_numpy(b), 1e-5)
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-13)


def test_rmsnorm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x, w = _normal(rng, 2, 3, 7), _normal(rng, 7)
    out, _ = layers.rmsnorm_forward(x, w, None, 1e-5)
    ref = torch.nn.functional.rms_norm(torch.from_numpy(x), (7,), torch.from_numpy(w), 1e-5)
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_linear_gradients(gbackend, bias, lead):
    rng = np.random.default_rng(8)
    Cin, Cout = 4, 3
    args = dict(x=_normal(rng, *lead, Cin), w=_normal(rng, Cout, Cin), b=_normal(rng, Cout) if bias else None)

    def backward(dout, cache):
        dx, dw, db = layers.linear_backward(dout, cache)
        return {"x": dx, "w": dw, "b": db}

    wrt = ["x", "w"] + (["b"] if bias else [])
    gradcheck(gbackend, layers.linear_forward, backward, args, wrt, expect_none=() if bias else ["b"])


def test_linear_is_x_times_w_transposed(gbackend):
    rng = np.random.default_rng(9)
    x, w, b = _normal(rng, 2, 3, 4), _normal(rng, 5, 4), _normal(rng, 5)
    out, _ = layers.linear_forward(gbackend.asarray(x), gbackend.asarray(w), gbackend.asarray(b))
    np.testing.assert_allclose(to_numpy(out), x @ w.T + b, rtol=1e-14, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# softmax with temperature


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_gradients(gbackend, temperature, axis):
    rng = np.random.default_rng(10)
    args = dict(x=_normal(rng, 2, 4, 5, scale=2.0))

    def forward(x):
        p = layers.softmax_forward(x, temperature, axis)
        return p, p

    def backward(dout, probs):
        return {"x": layers.softmax_backward(dout, probs, temperature, axis)}

    gradcheck(gbackend, forward, backward, args, ["x"])


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_softmax_matches_torch(temperature):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    x = _normal(rng, 3, 9, scale=3.0)
    ref = torch.softmax(torch.from_numpy(x) / temperature, dim=-1).numpy()
    np.testing.assert_allclose(layers.softmax_forward(x, temperature), ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_softmax_rejects_non_positive_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        layers.softmax_forward(np.zeros((2, 3)), temperature)


# ---------------------------------------------------------------------------------------------
# causal multi-head attention


@pytest.mark.parametrize(
    "T,Tk,n_head,hs,dropout_p",
    [
        (4, 4, 2, 3, 0.0),  # plain causal self-attention
        (2, 5, 2, 3, 0.0),  # queries are the last 2 of 5 positions (KV cache)
        (1, 6, 3, 2, 0.0),  # one new token against a cache
        (4, 4, 2, 3, 0.25),  # attention dropout with fixed coins
        (3, 5, 1, 4, 0.25),
    ],
)
def test_attention_gradients(gbackend, T, Tk, n_head, hs, dropout_p):
    rng = np.random.default_rng(12)
    B, D = 2, n_head * hs
    coins = gbackend.asarray(rng.random((B, n_head, T, Tk))) if dropout_p else None
    args = dict(q=_normal(rng, B, T, D), k=_normal(rng, B, Tk, D), v=_normal(rng, B, Tk, D), coins=coins)

    def forward(q, k, v, coins):
        return layers.attention_forward(q, k, v, n_head, dropout_p, coins)

    def backward(dout, cache):
        dq, dk, dv = layers.attention_backward(dout, cache)
        return {"q": dq, "k": dk, "v": dv}

    gradcheck(gbackend, forward, backward, args, ["q", "k", "v"])


def _torch_attention(torch, q, k, v, n_head):
    B, T, D = q.shape
    Tk = k.shape[1]

    def heads(a):
        return torch.from_numpy(a).view(B, a.shape[1], n_head, D // n_head).transpose(1, 2)

    if Tk == T:
        y = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    else:  # torch's is_causal aligns the mask top-left; a KV cache needs it bottom-right
        allowed = torch.ones(T, Tk, dtype=torch.bool).tril(diagonal=Tk - T)
        y = torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=allowed)
    return y.transpose(1, 2).reshape(B, T, D).numpy()


@pytest.mark.parametrize("T,Tk", [(5, 5), (2, 6)])
def test_attention_matches_torch_sdpa(T, Tk):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(13)
    q, k, v = _normal(rng, 2, T, 6), _normal(rng, 2, Tk, 6), _normal(rng, 2, Tk, 6)
    y, _ = layers.attention_forward(q, k, v, n_head=2)
    np.testing.assert_allclose(y, _torch_attention(torch, q, k, v, 2), rtol=0, atol=1e-13)


def test_attention_dropout_uses_the_coins(gbackend):
    rng = np.random.default_rng(14)
    q, k, v = (_normal(rng, 1, 3, 4) for _ in range(3))
    p = 0.5
    coins = rng.random((1, 2, 3, 3))
    xq, xk, xv = (gbackend.asarray(a) for a in (q, k, v))
    y, cache = layers.attention_forward(xq, xk, xv, 2, p, gbackend.asarray(coins))
    att = to_numpy(cache[4])  # the probabilities before dropout
    vh = v.reshape(1, 3, 2, 2).transpose(0, 2, 1, 3)
    expect = (att * (coins >= p) / (1 - p)) @ vh
    np.testing.assert_allclose(to_numpy(y), expect.transpose(0, 2, 1, 3).reshape(1, 3, 4), rtol=1e-13, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# activations


@pytest.mark.parametrize("activation", sorted(layers.ACTIVATIONS))
def test_activation_gradients(gbackend, activation):
    forward_fn, backward_fn = layers.ACTIVATIONS[activation]
    rng = np.random.default_rng(15)
    args = dict(x=_normal(rng, 2, 3, 8, scale=2.0))

    def backward(dout, cache):
        return {"x": backward_fn(dout, cache)}

    gradcheck(gbackend, forward_fn, backward, args, ["x"])


def test_erfc_matches_math_erfc_on_the_fitted_range():
    x = np.concatenate([np.linspace(-12.0, 12.0, 2001), [0.0, -0.0, 1e-8, -1e-8, 0.4769362762044699]])
    ours = layers.erfc(x)
    ref = np.array([math.erfc(v) for v in x])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)


def test_erfc_matches_math_erfc_in_the_far_tail():
    # The docstring promises ~1e-13 relative without a range; math.erfc is a normal float up to 26.
    x = np.linspace(12.0, 26.0, 57)
    ref = np.array([math.erfc(v) for v in x])
    np.testing.assert_allclose(layers.erfc(x), ref, rtol=1e-12, atol=0)


def test_erfc_on_strict_backend_matches_numpy():
    import array_api_strict as strict

    x = np.linspace(-8, 8, 101)
    out = layers.erfc(strict.asarray(x))
    np.testing.assert_allclose(to_numpy(out), layers.erfc(x), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name,approximate", [("gelu", "none"), ("gelu_tanh", "tanh")])
def test_gelu_matches_torch(name, approximate):
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.linspace(-20, 20, 4001), [0.0, 1e-9, -1e-9]])
    ours, _ = layers.ACTIVATIONS[name][0](x)
    ref = torch.nn.functional.gelu(torch.from_numpy(x), approximate=approximate).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-14)


def test_relu_and_relu2_values():
    x = np.array([-2.0, -0.0, 0.0, 0.5, 3.0])
    np.testing.assert_array_equal(layers.relu_forward(x)[0], np.maximum(x, 0))
    np.testing.assert_array_equal(layers.relu2_forward(x)[0], np.maximum(x, 0) ** 2)


# ---------------------------------------------------------------------------------------------
# residual


def test_residual_gradients(gbackend):
    rng = np.random.default_rng(16)
    args = dict(a=_normal(rng, 2, 3, 4), b=_normal(rng, 2, 3, 4))

    def backward(dout, cache):
        da, db = layers.residual_backward(dout, cache)
        return {"a": da, "b": db}

    gradcheck(gbackend, layers.residual_forward, backward, args, ["a", "b"])


# ---------------------------------------------------------------------------------------------
# softmax + cross-entropy


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [(), (1, 4), (0, 2, 3, 5)])
def test_crossentropy_gradients(gbackend, ignored, reduction):
    rng = np.random.default_rng(17)
    N, V = 6, 5
    targets = rng.integers(0, V, N)
    targets[list(ignored)] = -1
    args = dict(logits=_normal(rng, N, V, scale=2.0), targets=gbackend.asarray(targets))

    def forward(logits, targets):
        return layers.crossentropy_forward(logits, targets, reduction=reduction)

    def backward(dloss, cache):
        return {"logits": layers.crossentropy_backward(dloss, cache)}

    gradcheck(gbackend, forward, backward, args, ["logits"])


def test_crossentropy_sum_is_the_mean_times_the_valid_rows():
    rng = np.random.default_rng(20)
    logits, targets = _normal(rng, 6, 4), np.array([1, -1, 0, 3, -1, 2])
    mean, _ = layers.crossentropy_forward(logits, targets)
    total, _ = layers.crossentropy_forward(logits, targets, reduction="sum")
    assert float(total) == pytest.approx(4 * float(mean), rel=1e-14)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        layers.crossentropy_forward(logits, targets, reduction="max")


@pytest.mark.parametrize("ignored", [(), (1, 4)])
def test_crossentropy_matches_torch(ignored):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(18)
    N, V = 6, 7
    logits, targets = _normal(rng, N, V, scale=3.0), rng.integers(0, V, N)
    targets[list(ignored)] = -1
    loss, cache = layers.crossentropy_forward(logits, targets)
    tl = torch.from_numpy(logits).requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(tl, torch.from_numpy(targets), ignore_index=-1)
    ref.backward()
    assert abs(float(loss) - ref.item()) < 1e-13
    np.testing.assert_allclose(layers.crossentropy_backward(1.0, cache), tl.grad.numpy(), rtol=0, atol=1e-15)


def test_crossentropy_ignored_rows_get_no_gradient(gbackend):
    rng = np.random.default_rng(19)
    targets = np.array([2, -1, 0, -1])
    loss, cache = layers.crossentropy_forward(gbackend.asarray(_normal(rng, 4, 3)), gbackend.asarray(targets))
    dlogits = to_numpy(layers.crossentropy_backward(1.0, cache))
    assert np.all(dlogits[[1, 3]] == 0.0)
    assert np.all(dlogits[[0, 2]] != 0.0)
