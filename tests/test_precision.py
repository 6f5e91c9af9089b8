"""Mixed precision (arraygpt.training.precision, docs/precision.md): float32 master weights, a float16 compute
model on numpy, dynamic loss scaling with skipped overflow steps, checkpoints that resume exactly.
The ``gpu`` tests repeat the central checks on CuPy (conftest skips them, with the reason, without
a CUDA device)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from arraygpt import GPT, GPTConfig
from arraygpt.io.checkpoint import load_checkpoint, save_checkpoint
from arraygpt.training.data import Batcher, default_tokenizer, make_dataset
from arraygpt.training.optim import create_optimizer
from arraygpt.training.precision import (
    PRECISIONS,
    LossScaler,
    MixedPrecision,
    mixed_kernels,
    mixed_precision,
    set_tf32,
    tf32_enabled,
)
from arraygpt.xp import load_backend, to_numpy
from runs import made_up_names

EPS16 = float(np.finfo(np.float16).eps)  # 2**-10

# Measured (this file's curve test: numpy, AdamW lr 3e-3, 100 steps of 16 synthetic names, loss
# 2.73 -> 1.45): the float16 run's per-step loss differs from float32's by at most 2e-4, its
# 10-step moving average by 1e-4. The tolerances leave 10x margin. (At lr 1e-2 the runs drift
# apart chaotically, up to 0.07 after 100 steps; float32 and float64 drift too, by 0.014.)
CURVE_LR = 3e-3
CURVE_STEP_TOL = 2e-3
CURVE_AVG_TOL = 1e-3
# Measured (seeds 0-2): per-tensor relative error ||g16 - g32|| / ||g32|| of one step's gradients at
# most 2.0 float16 eps (the activations are rounded to float16 at every layer). The key biases'
# gradients are zero in exact arithmetic (softmax ignores a constant added to every score): theirs
# are compared against a thousandth of the global gradient norm instead.
GRAD_REL_TOL = 8 * EPS16
GRAD_FLOOR = 1e-3


def _assert_grads_close(got, want, tol=GRAD_REL_TOL):
    """Per tensor: ||got - want|| <= tol (||want|| + GRAD_FLOOR * global norm of want); returns
    the largest relative error seen."""
    want = {name: to_numpy(g).astype(np.float64) for name, g in want.items()}
    total = math.sqrt(sum(float(np.sum(g * g)) for g in want.values()))
    worst = 0.0
    for name, b in want.items():
        a = to_numpy(got[name]).astype(np.float64)
        err, size = float(np.linalg.norm(a - b)), float(np.linalg.norm(b))
        assert err <= tol * (size + GRAD_FLOOR * total), f"{name}: |diff| {err:.2e}, |grad| {size:.2e}"
        if size > GRAD_FLOOR * total:
            worst = max(worst, err / size)
    return worst


def _names(n=400, seed=0):
    return "\n".join(made_up_names(n, 5, seed)) + "\n"


@pytest.fixture(scope="module")
def names_data():
    text = _names()
    tok = default_tokenizer("char", text, "documents")
    return tok, make_dataset(text, tok, "documents", 16)


def _config(vocab_size, **overrides):
    return GPTConfig.preset("gpt2", vocab_size=vocab_size, block_size=16, n_layer=2, n_head=4, n_embd=32, **overrides)


def _batch(names_data, batch_size=16, seed=0):
    return Batcher(names_data[1], batch_size, seed=seed).next()


def _host(params):
    return {name: to_numpy(p).copy() for name, p in params.items()}


def _train(config, data, steps, mixed, backend=None, lr=1e-2, batch_size=16):
    model = GPT(config, seed=0, backend=backend, threads=1).train()
    mp = MixedPrecision(model, "float16") if mixed else None
    opt = create_optimizer("adamw", model.params)
    batcher = Batcher(data, batch_size, seed=0)
    losses = []
    for _ in range(steps):
        x, y = batcher.next()
        if mp is not None:
            loss, skipped, _ = mp.step(x, y, opt, lr)
            assert not skipped
        else:
            _, loss = model.forward(x, y)
            opt.step(model.backward(), lr)
        losses.append(loss)
    return np.array(losses), model, mp


# ----------------------------------------------------------------------------------------------
# the loss scaler alone


def test_loss_scaler_follows_grad_scaler():
    s = LossScaler()
    assert (s.scale, s.growth_factor, s.backoff_factor, s.growth_interval) == (65536.0, 2.0, 0.5, 2000)
    s = LossScaler(init_scale=8.0, growth_interval=3)
    s.update(found_inf=True)
    assert (s.scale, s.skipped, s.growth_tracker) == (4.0, 1, 0)
    s.update(False)
    s.update(False)
    assert s.scale == 4.0
    s.update(False)  # the third clean step in a row
    assert (s.scale, s.growth_tracker, s.skipped, s.steps) == (8.0, 0, 1, 4)
    s.update(False)
    s.update(True)  # an overflow resets the count of clean steps
    s.update(False)
    s.update(False)
    assert s.scale == 4.0


def test_loss_scaler_state_is_json_and_round_trips():
    import json

    s = LossScaler(init_scale=1024.0, growth_interval=5)
    for found in (False, True, False, False):
        s.update(found)
    state = json.loads(json.dumps(s.state_dict()))
    t = LossScaler()
    t.load_state_dict(state)
    assert t == s
    with pytest.raises(KeyError, match="missing"):
        t.load_state_dict({"scale": 1.0})
    with pytest.raises(ValueError, match="growth_factor"):
        LossScaler(growth_factor=1.0)


def test_a_disabled_scaler_stays_at_one_and_counts_skips():
    s = LossScaler(enabled=False)
    s.update(True)
    s.update(False)
    assert (s.scale, s.skipped, s.steps) == (1.0, 1, 2)


# ----------------------------------------------------------------------------------------------
# dtypes: float32 masters and optimizer state, a float16 compute model, float32 loss and norms


def test_masters_stay_float32_and_the_compute_model_is_float16(names_data):
    tok, _ = names_data
    model = GPT(_config(tok.vocab_size), seed=0)
    mp = MixedPrecision(model, "float16")
    opt = create_optimizer("adamw", mp.params)
    x, y = _batch(names_data)
    for _ in range(3):
        mp.step(x, y, opt, 1e-2)
    assert mp.params is model.params and mp.compute_dtype == "float16"
    assert {str(p.dtype) for p in model.params.values()} == {"float32"}
    assert {str(p.dtype) for p in mp.compute.params.values()} == {"float16"}
    assert {str(a.dtype) for arrays in opt.buffers.values() for a in arrays.values()} == {"float32"}
    for name, p in model.params.items():  # the compute copy is the masters rounded once
        np.testing.assert_array_equal(to_numpy(mp.compute.params[name]), to_numpy(p).astype(np.float16), name)
    logits, loss = mp.forward(x, y)
    assert str(logits.dtype) == "float16" and isinstance(loss, float)
    assert {str(g.dtype) for g in mp.backward().values()} == {"float32"}


def test_the_loss_and_norms_run_in_float32(names_data):
    """A float16 cross-entropy's mean over 256 positions would keep ~3 digits; the mixed one
    equals the float32 loss of the same float16 logits to float32 rounding."""
    tok, _ = names_data
    config = _config(tok.vocab_size)
    mp = MixedPrecision(GPT(config, seed=0), "float16", kernels="reference")
    x, y = _batch(names_data)
    logits, loss = mp.forward(x, y)
    from arraygpt.nn import layers

    V = config.vocab_size
    want, _ = layers.crossentropy_forward(to_numpy(logits).astype(np.float32).reshape(-1, V), y.reshape(-1))
    assert loss == pytest.approx(float(want), rel=1e-6)
    k = mixed_kernels(config, "numpy", "float16", "reference")
    h = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float16) * 50 + 300
    out, cache = k.norm[0](h, None, None, 1e-5)
    assert out.dtype == np.float16 and cache.rstd.dtype == np.float32
    ref, _ = layers.layernorm_forward(h.astype(np.float32), None, None, 1e-5)
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=4 * EPS16 * np.abs(ref).max())


# ----------------------------------------------------------------------------------------------
# agreement with float32


def test_one_step_gradients_equal_float32_within_float16_tolerance(names_data):
    tok, _ = names_data
    config = _config(tok.vocab_size)
    x, y = _batch(names_data)
    model = GPT(config, seed=0)
    _, loss32 = model.forward(x, y)
    g32 = model.backward()
    mp = MixedPrecision(GPT(config, seed=0), "float16")
    _, loss16 = mp.forward(x, y)
    g16 = mp.backward()
    assert loss16 == pytest.approx(loss32, abs=5 * EPS16 * loss32)
    assert _assert_grads_close(g16, g32) > EPS16 / 16  # float16 did round something


@pytest.mark.slow
def test_float16_loss_curve_tracks_float32(names_data):
    tok, data = names_data
    config = _config(tok.vocab_size)
    steps = 100
    l32, _, _ = _train(config, data, steps, mixed=False, lr=CURVE_LR)
    l16, _, mp = _train(config, data, steps, mixed=True, lr=CURVE_LR)
    assert mp.skipped_steps == 0
    assert l32[-10:].mean() < l32[:10].mean() - 0.5  # it learned something
    diff = np.abs(l16 - l32)
    avg = np.convolve(l16 - l32, np.ones(10) / 10, "valid")
    assert diff.max() <= CURVE_STEP_TOL, f"max per-step loss difference {diff.max():.4f} > {CURVE_STEP_TOL}"
    assert np.abs(avg).max() <= CURVE_AVG_TOL, f"max 10-step average difference {np.abs(avg).max():.4f}"


# ----------------------------------------------------------------------------------------------
# overflow: skipped, counted, the scale lowered; recovery; growth


def test_an_injected_inf_gradient_skips_the_step(names_data):
    tok, _ = names_data
    mp = MixedPrecision(GPT(_config(tok.vocab_size), seed=0), "float16", scaler=LossScaler(init_scale=1024.0))
    opt = create_optimizer("adamw", mp.params)
    x, y = _batch(names_data)
    mp.step(x, y, opt, 1e-2)
    before, before16, opt_before = _host(mp.params), _host(mp.compute.params), opt.state_dict()
    mp.forward(x, y)
    grads = mp.backward()
    grads["layer1.mlp_fc1"][3, 4] = math.inf
    skipped, norm = mp.apply(grads, opt, 1e-2, grad_clip=1.0)
    assert skipped and norm is None
    assert (mp.skipped_steps, mp.scaler.scale, mp.scaler.steps) == (1, 512.0, 2)
    for name, p in _host(mp.params).items():
        np.testing.assert_array_equal(p, before[name], name)
        np.testing.assert_array_equal(to_numpy(mp.compute.params[name]), before16[name], name)
    after = opt.state_dict()
    assert after["step"] == opt_before["step"]
    for key, value in opt_before.items():
        np.testing.assert_array_equal(after[key], value, key)
    _, skipped, _ = mp.step(x, y, opt, 1e-2)  # and the next clean step goes through
    assert not skipped and mp.skipped_steps == 1 and opt.state_dict()["step"] == opt_before["step"] + 1
    assert any(not np.array_equal(p, before[n]) for n, p in _host(mp.params).items())


def test_an_overflow_on_another_rank_skips_the_step_here(names_data):
    """With sharded gradients, ``reduce`` adds the count of non-finite tensors over the ranks:
    an inf on another rank skips this rank's step too."""
    tok, _ = names_data
    mp = MixedPrecision(GPT(_config(tok.vocab_size), seed=0), "float16")
    opt = create_optimizer("adamw", mp.params)
    mp.forward(*_batch(names_data))
    grads = mp.backward()
    before = _host(mp.params)
    skipped, _ = mp.apply(grads, opt, 1e-2, grad_clip=1.0, reduce=lambda bad: bad + 1.0)
    assert skipped and mp.skipped_steps == 1 and opt.state_dict()["step"] == 0
    for name, p in _host(mp.params).items():
        np.testing.assert_array_equal(p, before[name], name)


def test_a_huge_scale_overflows_then_backs_off_and_recovers(names_data):
    tok, _ = names_data
    scaler = LossScaler(init_scale=2.0**40, growth_interval=1000)
    mp = MixedPrecision(GPT(_config(tok.vocab_size), seed=0), "float16", scaler=scaler)
    opt = create_optimizer("adamw", mp.params)
    x, y = _batch(names_data)
    start = _host(mp.params)
    results = [mp.step(x, y, opt, 1e-2) for _ in range(40)]
    skipped = [r.skipped for r in results]
    first_clean = skipped.index(False)
    assert first_clean >= 1 and all(skipped[:first_clean])
    # then it hovers below the largest scale that fits: an overflow now and then, each halving it
    assert sum(skipped[first_clean:]) <= 3 and not any(skipped[-10:])
    n_skipped = sum(skipped)
    assert mp.skipped_steps == n_skipped and opt.state_dict()["step"] == 40 - n_skipped
    assert mp.scaler.scale == 2.0**40 * 0.5**n_skipped  # growth_interval 1000: no growth yet
    assert first_clean >= 10  # 2**40 overflows float16 by far (23 halvings measured, to 2**17)
    assert all(math.isfinite(r.loss) for r in results)  # the forward never overflowed, only the backward
    assert results[-1].loss < results[first_clean].loss  # and training proceeds
    assert all(np.isfinite(p).all() for p in _host(mp.params).values())
    assert any(not np.array_equal(p, start[n]) for n, p in _host(mp.params).items())


def test_the_scale_grows_after_clean_steps(names_data):
    tok, _ = names_data
    mp = MixedPrecision(
        GPT(_config(tok.vocab_size), seed=0), "float16", scaler=LossScaler(init_scale=256.0, growth_interval=3)
    )
    opt = create_optimizer("sgd", mp.params)
    x, y = _batch(names_data)
    scales = []
    for _ in range(7):
        mp.step(x, y, opt, 1e-2)
        scales.append(mp.scaler.scale)
    assert scales == [256.0, 256.0, 512.0, 512.0, 512.0, 1024.0, 1024.0]
    assert mp.skipped_steps == 0


def test_the_scale_does_not_change_the_update(names_data):
    """Powers of two scale exactly: two runs whose scales differ by 2**k take the same steps
    (up to float16 flushing of the smallest activation gradients)."""
    tok, _ = names_data
    config = _config(tok.vocab_size)
    x, y = _batch(names_data)
    grads = []
    for scale in (2.0**8, 2.0**12):
        mp = MixedPrecision(GPT(config, seed=0), "float16", scaler=LossScaler(init_scale=scale))
        mp.forward(x, y)
        grads.append(mp.backward())
    _assert_grads_close(grads[0], grads[1])


# ----------------------------------------------------------------------------------------------
# checkpoints: the master weights (float32) and the scaler; resume is exact


def test_checkpoint_round_trip_resumes_exactly(tmp_path, names_data):
    tok, data = names_data
    config = _config(tok.vocab_size, dropout=0.1)

    def make():
        mp = MixedPrecision(
            GPT(config, seed=0).train(), "float16", scaler=LossScaler(init_scale=2.0**20, growth_interval=2)
        )
        return mp, create_optimizer("adamw", mp.params)

    mp, opt = make()
    batcher = Batcher(data, 8, seed=0)
    for _ in range(4):  # the first steps overflow (2**20 is too large), then the scale grows
        mp.step(*batcher.next(), opt, 1e-2)
    assert mp.skipped_steps >= 1
    save_checkpoint(
        tmp_path / "ckpt", mp.master, tok, opt, extra={"precision": mp.state_dict(), "data": batcher.state_dict()}
    )
    ckpt = load_checkpoint(tmp_path / "ckpt")
    assert ckpt.model.dtype == "float32"
    resumed = MixedPrecision(ckpt.model.train(), "float16")
    resumed.load_state_dict(ckpt.extra["precision"])
    assert resumed.scaler == mp.scaler
    opt2 = create_optimizer("adamw", resumed.params)
    opt2.load_state_dict(ckpt.optimizer_state)
    batcher2 = Batcher(data, 8, seed=0)
    batcher2.load_state_dict(ckpt.extra["data"])
    for name, p in _host(mp.params).items():
        np.testing.assert_array_equal(to_numpy(resumed.params[name]), p, name)
    for _ in range(4):
        a = mp.step(*batcher.next(), opt, 1e-2)
        b = resumed.step(*batcher2.next(), opt2, 1e-2)
        assert a == b
    assert resumed.scaler == mp.scaler
    for name, p in _host(mp.params).items():
        np.testing.assert_array_equal(to_numpy(resumed.params[name]), p, name)


def test_a_state_of_another_compute_dtype_is_refused(names_data):
    tok, _ = names_data
    mp = MixedPrecision(GPT(_config(tok.vocab_size), seed=0), "float16")
    with pytest.raises(ValueError, match="bfloat16"):
        mp.load_state_dict({"compute_dtype": "bfloat16", "scaler": mp.scaler.state_dict()})


# ----------------------------------------------------------------------------------------------
# plumbing: GPT's loss_scale, threads, choices, errors, TF32


def test_gpt_backward_loss_scale_scales_every_gradient_also_across_threads(names_data):
    tok, _ = names_data
    config = _config(tok.vocab_size)
    x, y = _batch(names_data, batch_size=128)
    for threads in (1, 2):
        model = GPT(config, seed=0, threads=threads)
        assert len(model.runner.chunks(128, 16 * 32)) == threads
        model.forward(x, y)
        g1 = model.backward()
        model.forward(x, y)
        g8 = model.backward(loss_scale=8.0)
        for name in g1:
            np.testing.assert_allclose(to_numpy(g8[name]), 8.0 * to_numpy(g1[name]), rtol=1e-6, atol=1e-9)


def test_mixed_precision_across_threads_matches_one_thread(names_data):
    tok, _ = names_data
    config = _config(tok.vocab_size)
    x, y = _batch(names_data, batch_size=128)
    grads = []
    for threads in (1, 2):
        mp = MixedPrecision(GPT(config, seed=0, threads=threads), "float16")
        mp.forward(x, y)
        grads.append(mp.backward())
        mp.close()
        mp.master.close()
    _assert_grads_close(grads[1], grads[0])


def test_precision_names_and_errors(names_data):
    tok, _ = names_data
    model = GPT(_config(tok.vocab_size), seed=0)
    assert PRECISIONS == ("full", "mixed-float16", "mixed-bfloat16")
    assert mixed_precision(model, "full") is None
    assert mixed_precision(model, "mixed-float16").compute_dtype == "float16"
    with pytest.raises(ValueError, match="mixed-float16"):
        mixed_precision(model, "fp16")
    with pytest.raises(ValueError, match="float32 master"):
        MixedPrecision(GPT(_config(tok.vocab_size), dtype="float64"))
    with pytest.raises(ValueError, match="compute_dtype"):
        MixedPrecision(model, "float32")
    with pytest.raises(ValueError, match="numpy backend has no bfloat16"):
        mixed_precision(model, "mixed-bfloat16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        GPT(_config(tok.vocab_size), dtype="int8")


def test_bfloat16_where_the_backend_has_it(names_data):
    backend = load_backend("numpy")
    if not hasattr(backend.xp, "bfloat16"):
        pytest.skip("NumPy has no bfloat16 (nor does CuPy): the bfloat16 path is generic but untested here")
    tok, _ = names_data  # pragma: no cover - for a backend that has bfloat16
    mp = MixedPrecision(GPT(_config(tok.vocab_size), seed=0), "bfloat16")
    assert not mp.scaler.enabled and mp.scaler.scale == 1.0
    loss, skipped, _ = mp.step(*_batch(names_data), create_optimizer("adamw", mp.params), 1e-2)
    assert not skipped and math.isfinite(loss)


def test_tf32_switch(monkeypatch):
    monkeypatch.setenv("CUPY_TF32", "0")  # recorded first, so the test leaves the variable as it found it
    assert not tf32_enabled()
    monkeypatch.delenv("CUPY_TF32")
    assert not tf32_enabled()  # off by default
    import sys

    if "cupy" not in sys.modules:
        set_tf32(True)
        assert tf32_enabled()
        set_tf32(False)
        assert not tf32_enabled()


# ----------------------------------------------------------------------------------------------
# the same on the GPU (CuPy): float16 there runs on tensor cores with float32 accumulation


@pytest.fixture(scope="module")
def cupy_backend():
    pytest.importorskip("cupy")
    return load_backend("cupy")


@pytest.mark.gpu
def test_gpu_float16_loss_curve_tracks_float32(cupy_backend, names_data):
    tok, data = names_data
    config = _config(tok.vocab_size)
    l32, _, _ = _train(config, data, 100, mixed=False, backend=cupy_backend, lr=CURVE_LR)
    l16, _, mp = _train(config, data, 100, mixed=True, backend=cupy_backend, lr=CURVE_LR)
    assert mp.skipped_steps == 0
    assert np.abs(l16 - l32).max() <= CURVE_STEP_TOL
    assert np.abs(np.convolve(l16 - l32, np.ones(10) / 10, "valid")).max() <= CURVE_AVG_TOL


@pytest.mark.gpu
def test_gpu_gradients_equal_float32_and_overflow_is_skipped(cupy_backend, names_data):
    tok, _ = names_data
    config = _config(tok.vocab_size)
    x, y = _batch(names_data)
    model = GPT(config, seed=0, backend=cupy_backend)
    model.forward(x, y)
    g32 = model.backward()
    mp = MixedPrecision(GPT(config, seed=0, backend=cupy_backend), "float16")
    assert str(mp.compute.params["wte"].dtype) == "float16" and str(mp.params["wte"].dtype) == "float32"
    mp.forward(x, y)
    g16 = mp.backward()
    _assert_grads_close(g16, g32)
    mp.scaler.scale = 2.0**40
    opt = create_optimizer("adamw", mp.params)
    before = _host(mp.params)
    loss, skipped, _ = mp.step(x, y, opt, 1e-2)
    assert skipped and mp.scaler.scale == 2.0**39 and mp.skipped_steps == 1
    for name, p in _host(mp.params).items():
        np.testing.assert_array_equal(p, before[name], name)


def test_train_with_mixed_float16_records_the_scale_and_resumes_exactly(tmp_path):
    """arraygpt.train(precision="mixed-float16"): the loop runs the mixed step, records the loss
    scale, checkpoints the scaler and master weights, and a stopped run resumes bit-identically."""
    import json

    import arraygpt

    text = tmp_path / "names.txt"
    text.write_text("\n".join(_names(200)) + "\n")
    options = dict(
        mode="documents",
        steps=12,
        batch_size=8,
        eval_interval=6,
        eval_batches=1,
        samples=0,
        precision="mixed-float16",
        progress=False,
    )
    straight = arraygpt.train(str(text), out_dir=tmp_path / "a", **options)
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert straight.mixed is not None and straight.model.dtype == "float32"
    assert any(r.get("event") == "train" for r in records)
    arraygpt.train(str(text), out_dir=tmp_path / "b", stop_after=6, **options)
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False)
    assert resumed.mixed.scaler.state_dict() == straight.mixed.scaler.state_dict()
    for name, p in straight.model.params.items():
        np.testing.assert_array_equal(to_numpy(resumed.model.params[name]), to_numpy(p), err_msg=name)
    with pytest.raises(ValueError, match="precision"):
        arraygpt.TrainConfig(precision="mixed-float8")


def test_gelu_backward_is_finite_in_float16_for_large_inputs():
    """The polynomial of GELU's backward would overflow float16 (x^3 at |x| >= 40): past |x| = 16
    the derivative is 1 (x > 0) or 0 (x < 0) to float16 precision, and it stays finite."""
    from arraygpt.nn import layers

    x = np.array([-300.0, -40.0, -16.0, -1.0, 0.0, 1.0, 16.0, 40.0, 300.0], dtype=np.float16)
    _, cache = layers.gelu_tanh_forward(x)
    dx = layers.gelu_tanh_backward(np.ones_like(x), cache)
    wide = layers.gelu_tanh_backward(np.ones(9), layers.gelu_tanh_forward(x.astype(np.float64))[1])
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx.astype(np.float64), wide, atol=2e-3)
    np.testing.assert_array_equal(dx[[0, 1, 7, 8]], [0.0, 0.0, 1.0, 1.0])
