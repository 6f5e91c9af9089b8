"""Optimizers against torch.optim, schedules against their formulas, clipping against
torch.nn.utils.clip_grad_norm_, and the optimizer state round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arraygpt.plugins.optimizers import SGD, Adam, AdamW
from arraygpt.training.optim import Schedule, clip_grad_norm, create_optimizer, global_norm
from arraygpt.xp import to_numpy

try:
    import torch
except ImportError:  # a test extra: the tests against torch.optim skip, the rest run
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch (the test extra)")

SHAPES = {"w2d": (5, 4), "emb": (7, 3), "gain": (4,), "bias": (6,)}


def _host_params(seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}


def _host_grads(n_steps, seed=1, dtype="float64"):
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()} for _ in range(n_steps)]


def _run_ours(factory, backend, host_params, grads_seq, lrs, **options):
    params = {k: backend.asarray(v.copy()) for k, v in host_params.items()}
    ids = {k: id(v) for k, v in params.items()}
    opt = factory(params, **options)
    for grads, lr in zip(grads_seq, lrs):
        opt.step({k: backend.asarray(g) for k, g in grads.items()}, lr)
    assert {k: id(v) for k, v in params.items()} == ids, "the parameters must be updated in place"
    return {k: to_numpy(v) for k, v in params.items()}


def _run_torch(make, host_params, grads_seq, lrs, groups=None):
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in host_params.items()}
    param_groups = groups(tparams) if groups else list(tparams.values())
    opt = make(param_groups)
    for grads, lr in zip(grads_seq, lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for k, p in tparams.items():
            p.grad = torch.tensor(grads[k])
        opt.step()
    return {k: v.detach().numpy() for k, v in tparams.items()}


def _assert_close(ours, ref, rtol):
    for k in ref:
        np.testing.assert_allclose(ours[k], ref[k], rtol=rtol, atol=rtol, err_msg=k)


LRS = [1e-2, 8e-3, 5e-3, 2e-3, 1e-3]  # a decaying schedule: lr is passed per step


@needs_torch
def test_adam_matches_torch(backend):
    host, grads = _host_params(), _host_grads(len(LRS))
    ours = _run_ours(Adam, backend, host, grads, LRS, betas=(0.9, 0.95), eps=1e-8)
    ref = _run_torch(lambda p: torch.optim.Adam(p, lr=1.0, betas=(0.9, 0.95), eps=1e-8), host, grads, LRS)
    _assert_close(ours, ref, 1e-12)


@needs_torch
def test_adam_l2_weight_decay_matches_torch(backend):
    host, grads = _host_params(), _host_grads(len(LRS))
    ours = _run_ours(Adam, backend, host, grads, LRS, betas=(0.8, 0.99), weight_decay=0.05)
    ref = _run_torch(lambda p: torch.optim.Adam(p, lr=1.0, betas=(0.8, 0.99), weight_decay=0.05), host, grads, LRS)
    _assert_close(ours, ref, 1e-12)


@needs_torch
def test_adamw_matches_torch_with_decay_only_on_2d_weights(backend):
    host, grads = _host_params(), _host_grads(len(LRS))
    ours = _run_ours(AdamW, backend, host, grads, LRS, betas=(0.9, 0.99), weight_decay=0.1)

    def groups(tparams):  # nanoGPT's configure_optimizers: decay params with dim >= 2 only
        return [
            {"params": [p for p in tparams.values() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in tparams.values() if p.dim() < 2], "weight_decay": 0.0},
        ]

    ref = _run_torch(lambda g: torch.optim.AdamW(g, lr=1.0, betas=(0.9, 0.99)), host, grads, LRS, groups)
    _assert_close(ours, ref, 1e-12)
    # and the 1-D parameters really were not decayed: plain Adam gives the same values for them
    plain = _run_ours(Adam, backend, host, grads, LRS, betas=(0.9, 0.99))
    for name in ("gain", "bias"):
        np.testing.assert_array_equal(ours[name], plain[name])
    assert not np.allclose(ours["w2d"], plain["w2d"])


@needs_torch
def test_adamw_float32_matches_torch():
    from arraygpt.xp import load_backend

    backend = load_backend("numpy")
    host, grads = _host_params(dtype="float32"), _host_grads(len(LRS), dtype="float32")
    ours = _run_ours(AdamW, backend, host, grads, LRS, weight_decay=0.1)
    ref = _run_torch(
        lambda p: torch.optim.AdamW(p, lr=1.0, weight_decay=0.1),
        host,
        grads,
        LRS,
        lambda t: [
            {"params": [p for p in t.values() if p.dim() >= 2]},
            {"params": [p for p in t.values() if p.dim() < 2], "weight_decay": 0.0},
        ],
    )
    for k in ref:
        assert ours[k].dtype == np.float32
    _assert_close(ours, ref, 2e-6)


@needs_torch
@pytest.mark.parametrize("nesterov, dampening, weight_decay", [(False, 0.0, 0.0), (True, 0.0, 0.01), (False, 0.1, 0.0)])
def test_sgd_momentum_matches_torch(backend, nesterov, dampening, weight_decay):
    host, grads = _host_params(), _host_grads(len(LRS))
    opts = dict(momentum=0.9, nesterov=nesterov, dampening=dampening, weight_decay=weight_decay)
    ours = _run_ours(SGD, backend, host, grads, LRS, **opts)
    ref = _run_torch(lambda p: torch.optim.SGD(p, lr=1.0, **opts), host, grads, LRS)
    _assert_close(ours, ref, 1e-12)


def test_plain_sgd_is_p_minus_lr_g():
    host, grads = _host_params(), _host_grads(1)
    params = {k: v.copy() for k, v in host.items()}
    SGD(params).step(grads[0], 0.5)
    for k in host:
        np.testing.assert_array_equal(params[k], host[k] - 0.5 * grads[0][k])


@pytest.mark.parametrize("factory, options", [(Adam, {}), (AdamW, {"weight_decay": 0.1}), (SGD, {"momentum": 0.9})])
def test_state_dict_round_trip_continues_bit_identically(factory, options):
    host, grads = _host_params(dtype="float32"), _host_grads(6, dtype="float32")
    straight = {k: v.copy() for k, v in host.items()}
    opt = factory(straight, **options)
    for g in grads:
        opt.step(g, 1e-2)

    first = {k: v.copy() for k, v in host.items()}
    opt1 = factory(first, **options)
    for g in grads[:3]:
        opt1.step(g, 1e-2)
    state = opt1.state_dict()
    assert state["step"] == 3 and all(isinstance(v, (int, np.ndarray)) for v in state.values())
    resumed = {k: v.copy() for k, v in first.items()}
    opt2 = factory(resumed, **options)
    opt2.load_state_dict(state)
    for g in grads[3:]:
        opt2.step(g, 1e-2)
    for k in host:
        np.testing.assert_array_equal(resumed[k], straight[k])


def test_load_state_dict_rejects_a_mismatch():
    opt = Adam(_host_params())
    state = opt.state_dict()
    state.pop("m.w2d")
    with pytest.raises(KeyError, match="m.w2d"):
        Adam(_host_params()).load_state_dict(state)


def test_step_rejects_missing_gradients_and_negative_lr():
    opt = Adam(_host_params())
    grads = _host_grads(1)[0]
    with pytest.raises(ValueError, match="learning rate"):
        opt.step(grads, -1.0)
    grads.pop("bias")
    with pytest.raises(KeyError, match="bias"):
        opt.step(grads, 1e-3)


@pytest.mark.parametrize(
    "options, match",
    [({"betas": (1.0, 0.9)}, "betas"), ({"eps": 0.0}, "eps"), ({"weight_decay": -1.0}, "weight_decay")],
)
def test_bad_adam_options(options, match):
    with pytest.raises(ValueError, match=match):
        AdamW(_host_params(), **options)


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=6),
        elements=st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32),
    ),
    st.floats(1e-5, 1.0),
    st.integers(1, 4),
)
def test_adamw_zero_gradient_no_weight_decay_leaves_params_unchanged(p, lr, steps):
    params = {"p": p.copy(), "q": p.reshape(-1).copy()}
    opt = AdamW(params, weight_decay=0.0)
    for _ in range(steps):
        opt.step({k: np.zeros_like(v) for k, v in params.items()}, lr)
    np.testing.assert_array_equal(params["p"], p)
    np.testing.assert_array_equal(params["q"], p.reshape(-1))


# -- AdamW's weight-decay filter ---------------------------------------------------------------


def _decay_params():
    # a matrix, an embedding-like matrix, a 3-D tensor, a gain and a bias: the filter looks at ndim
    return {
        "layer0.attn_wq": np.full((2, 3), 2.0),
        "wte": np.full((4, 2), -1.0),
        "cube": np.full((2, 2, 2), 4.0),
        "layer0.norm1": np.full((3,), 1.5),
        "layer0.attn_wq_b": np.full((2,), 0.5),
    }


def test_adamw_decays_matrices_but_not_gains_and_biases():
    # With a zero gradient the Adam step is 0 / (0 + eps) = 0, so each parameter moves by its
    # decoupled decay alone: p * (1 - lr * wd) = p * (1 - 0.1 * 0.5) = 0.95 p where it decays.
    params = _decay_params()
    opt = create_optimizer("adamw", params, weight_decay=0.5)
    opt.step({k: np.zeros_like(v) for k, v in params.items()}, 0.1)
    np.testing.assert_array_equal(params["layer0.attn_wq"], np.full((2, 3), 1.9))
    np.testing.assert_array_equal(params["wte"], np.full((4, 2), -0.95))
    np.testing.assert_array_equal(params["cube"], np.full((2, 2, 2), 3.8))
    np.testing.assert_array_equal(params["layer0.norm1"], np.full((3,), 1.5))  # gain: not decayed
    np.testing.assert_array_equal(params["layer0.attn_wq_b"], np.full((2,), 0.5))  # bias: not decayed
    assert opt.decays == {
        "layer0.attn_wq": True,
        "wte": True,
        "cube": True,
        "layer0.norm1": False,
        "layer0.attn_wq_b": False,
    }


def test_adamw_first_step_by_hand_with_and_without_decay():
    # Step 1 with gradient g: m_hat = g, v_hat = g^2, so the Adam step is lr * g / (|g| + eps).
    # A decayed parameter first becomes p (1 - lr wd). Here p = 2, g = 0.5, lr = 0.1, wd = 0.5.
    params = {"w": np.full((2, 2), 2.0), "b": np.full((2,), 2.0)}
    opt = create_optimizer("adamw", params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5)
    opt.step({"w": np.full((2, 2), 0.5), "b": np.full((2,), 0.5)}, 0.1)
    adam_step = 0.1 * 0.5 / (0.5 + 1e-8)  # 0.099999998
    np.testing.assert_allclose(params["w"], 2.0 * 0.95 - adam_step, rtol=0, atol=1e-15)  # 1.800000002
    np.testing.assert_allclose(params["b"], 2.0 - adam_step, rtol=0, atol=1e-15)  # 1.900000002


def test_adamw_decay_filter_option_replaces_the_default():
    params = _decay_params()
    opt = create_optimizer("adamw", params, weight_decay=0.5, decay_filter=lambda name, p: name.endswith("_b"))
    opt.step({k: np.zeros_like(v) for k, v in params.items()}, 0.1)
    np.testing.assert_array_equal(params["layer0.attn_wq_b"], np.full((2,), 0.475))  # 0.5 * 0.95
    np.testing.assert_array_equal(params["layer0.attn_wq"], np.full((2, 3), 2.0))
    np.testing.assert_array_equal(params["layer0.norm1"], np.full((3,), 1.5))


def test_adamw_default_weight_decay_is_torchs_0_01_and_adam_l2_decays_everything():
    params = _decay_params()
    create_optimizer("adamw", params).step({k: np.zeros_like(v) for k, v in params.items()}, 0.1)
    np.testing.assert_array_equal(params["layer0.attn_wq"], np.full((2, 3), 2.0 * (1 - 0.1 * 0.01)))
    np.testing.assert_array_equal(params["layer0.norm1"], np.full((3,), 1.5))
    # Adam's weight decay is L2 on the gradient and by default applies to every parameter
    assert all(create_optimizer("adam", _decay_params(), weight_decay=0.1).decays.values())


def test_create_optimizer_by_name_and_unknown_name():
    opt = create_optimizer("adamw", _host_params(), weight_decay=0.1)
    assert isinstance(opt, AdamW) and opt.weight_decay == 0.1
    with pytest.raises(ValueError, match="adam, adamw, sgd"):
        create_optimizer("lion", _host_params())


# -- schedules -----------------------------------------------------------------------------------


def _nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT train.py's get_lr, verbatim."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_cosine_schedule_matches_nanogpt():
    s = Schedule("cosine", lr=1e-3, total_steps=2000, warmup_steps=100, min_lr=1e-4)
    for step in range(0, 2100, 7):
        assert s(step) == pytest.approx(_nanogpt_get_lr(step, 1e-3, 100, 2000, 1e-4), rel=1e-12)
    assert s(0) == pytest.approx(1e-3 / 101)
    assert s(99) == pytest.approx(1e-3 * 100 / 101)
    assert s(100) == pytest.approx(1e-3)  # peak right after the warmup
    assert s(1050) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the cosine
    assert s(2000) == pytest.approx(1e-4) and s(5000) == pytest.approx(1e-4)


def test_linear_schedule_decays_to_zero_as_microgpt():
    s = Schedule("linear", lr=1e-2, total_steps=1000)
    for step in (0, 1, 250, 500, 999):
        assert s(step) == pytest.approx(1e-2 * (1 - step / 1000))  # microgpt: lr * (1 - step / num_steps)
    assert s(1000) == 0.0 and s(1200) == 0.0
    w = Schedule("linear", lr=1.0, total_steps=110, warmup_steps=10)
    assert w(9) == pytest.approx(10 / 11) and w(10) == 1.0 and w(60) == pytest.approx(0.5) and w(110) == 0.0


def test_constant_schedule_and_errors():
    assert [Schedule("constant", lr=3e-4, total_steps=10)(s) for s in (0, 5, 50)] == [3e-4] * 3
    with pytest.raises(ValueError, match="learning rate"):
        Schedule("constant", lr=-1e-3, total_steps=10)
    with pytest.raises(ValueError, match="unknown schedule"):
        Schedule("step", lr=1e-3, total_steps=10)
    with pytest.raises(ValueError, match="min_lr"):
        Schedule("cosine", lr=1e-3, min_lr=1e-2, total_steps=10)


# -- clipping ------------------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("max_norm", [0.5, 1.0, 1e3])
def test_clip_grad_norm_matches_torch(backend, max_norm):
    host = _host_grads(1, seed=3)[0]
    grads = {k: backend.asarray(v.copy()) for k, v in host.items()}
    norm = clip_grad_norm(grads, max_norm)
    tgrads = [torch.tensor(v) for v in host.values()]
    tparams = [torch.zeros_like(g, requires_grad=True) for g in tgrads]
    for p, g in zip(tparams, tgrads):
        p.grad = g
    ref_norm = torch.nn.utils.clip_grad_norm_(tparams, max_norm)
    assert norm == pytest.approx(float(ref_norm), rel=1e-12)
    for (k, g), p in zip(grads.items(), tparams):
        np.testing.assert_allclose(to_numpy(g), p.grad.numpy(), rtol=1e-12, err_msg=k)
    assert global_norm(grads) == pytest.approx(min(float(ref_norm), max_norm), rel=1e-5)


def test_clip_grad_norm_reports_a_non_finite_norm():
    grads = {"a": np.array([1.0, np.nan]), "b": np.array([3.0])}
    assert math.isnan(clip_grad_norm(grads, 1.0))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads, 0.0)
