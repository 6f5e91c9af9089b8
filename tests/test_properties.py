"""Hypothesis property tests of the layers and the model, on every available backend (the
``backend``/``xp`` fixtures of conftest.py), in float32 and float64 with dtype-derived tolerances."""

from __future__ import annotations

import math
import warnings

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning
from hypothesis.extra.array_api import make_strategies_namespace

from arraygpt import GPT, GPTConfig
from arraygpt.nn import layers
from arraygpt.xp import scatter_add, to_numpy
from conftest import tolerance


# The xp/backend fixtures return cached objects, so reusing them across examples is safe.
def prop(**kwargs):
    return settings(suppress_health_check=[HealthCheck.function_scoped_fixture], **kwargs)


DTYPES = st.sampled_from(["float32", "float64"])

_strategies: dict[int, object] = {}


def _xps(xp):
    """The array strategies of ``xp``, built once per namespace."""
    if id(xp) not in _strategies:
        with warnings.catch_warnings():  # array_api_compat.torch does not declare itself; it works
            warnings.simplefilter("ignore", HypothesisWarning)
            _strategies[id(xp)] = make_strategies_namespace(xp, api_version="2024.12")
    return _strategies[id(xp)]


def _elements(low, high):
    return {"min_value": low, "max_value": high, "allow_nan": False, "allow_subnormal": False}


@st.composite
def float_arrays(draw, xp, dtype, shape, low=-30.0, high=30.0, unique=False):
    return draw(_xps(xp).arrays(getattr(xp, dtype), shape, elements=_elements(low, high), unique=unique))


SHAPE2 = st.tuples(st.integers(1, 5), st.integers(1, 12))


# ---------------------------------------------------------------------------------------------
# softmax


@prop()
@given(data=st.data(), dtype=DTYPES, shape=SHAPE2, temperature=st.floats(0.05, 20.0))
def test_softmax_rows_are_distributions(xp, data, dtype, shape, temperature):
    x = data.draw(float_arrays(xp, dtype, shape))
    p = layers.softmax_forward(x, temperature)
    assert p.dtype == x.dtype and p.shape == x.shape
    ph = to_numpy(p)
    assert np.all(ph >= 0.0) and np.all(ph <= 1.0)
    np.testing.assert_allclose(ph.astype(np.float64).sum(axis=-1), 1.0, rtol=0, atol=tolerance(dtype))


@prop()
@given(data=st.data(), dtype=DTYPES, shape=SHAPE2, temperature=st.floats(0.2, 5.0))
def test_softmax_is_invariant_to_a_constant_per_row(xp, data, dtype, shape, temperature):
    x = data.draw(float_arrays(xp, dtype, shape))
    c = data.draw(float_arrays(xp, dtype, (shape[0], 1)))
    p = to_numpy(layers.softmax_forward(x, temperature))
    q = to_numpy(layers.softmax_forward(x + c, temperature))
    np.testing.assert_allclose(q, p, rtol=0, atol=tolerance(dtype))


@prop()
@given(data=st.data(), dtype=DTYPES, shape=SHAPE2, temperature=st.sampled_from([0.01, 1.0, 100.0]))
def test_softmax_is_finite_for_huge_logits(xp, data, dtype, shape, temperature):
    extremes = st.sampled_from([-1e4, 1e4]) | st.floats(-1e4, 1e4, width=32)
    x = data.draw(_xps(xp).arrays(getattr(xp, dtype), shape, elements=extremes))
    ph = to_numpy(layers.softmax_forward(x, temperature))
    assert np.all(np.isfinite(ph))
    np.testing.assert_allclose(ph.astype(np.float64).sum(axis=-1), 1.0, rtol=0, atol=tolerance(dtype))


@prop()
@given(dtype=DTYPES, values=st.lists(st.integers(-1000, 1000), min_size=2, max_size=12, unique=True))
def test_softmax_tends_to_one_hot_as_temperature_goes_to_zero(backend, dtype, values):
    xp = backend.xp
    x = backend.asarray(np.array([values], dtype=dtype))  # distinct integers: the gap to the max is >= 1
    top = int(np.argmax(values))
    previous = 0.0
    for temperature in (10.0, 1.0, 0.1, 0.02):
        p = to_numpy(layers.softmax_forward(x, temperature))[0]
        assert int(np.argmax(p)) == top
        assert p[top] >= previous - tolerance(dtype)  # sharper as the temperature falls
        previous = p[top]
    assert abs(previous - 1.0) <= tolerance(dtype)  # off-max mass <= 11 exp(-50)
    tiny = to_numpy(layers.softmax_forward(x, 1e-30))[0]
    expected = np.zeros(len(values))
    expected[top] = 1.0
    np.testing.assert_array_equal(tiny, expected)
    assert xp.isdtype(layers.softmax_forward(x, 1e-30).dtype, "real floating")


@prop()
@given(data=st.data(), dtype=DTYPES, shape=SHAPE2)
def test_softmax_tends_to_uniform_as_temperature_grows(xp, data, dtype, shape):
    x = data.draw(float_arrays(xp, dtype, shape))
    V = shape[1]
    deviations = []
    for temperature in (1.0, 10.0, 1e3, 1e14):
        p = to_numpy(layers.softmax_forward(x, temperature)).astype(np.float64)
        deviations.append(float(np.max(np.abs(p - 1.0 / V))))
    for a, b in zip(deviations, deviations[1:]):
        assert b <= a + tolerance(dtype)  # flatter as the temperature rises
    assert deviations[-1] <= tolerance(dtype)


@prop()
@given(dtype=DTYPES, values=st.lists(st.floats(-1e4, 1e4), min_size=2, max_size=12), masked=st.data())
def test_a_temperature_past_the_dtype_range_is_the_uniform_limit_over_kept_tokens(backend, dtype, values, masked):
    # T = 1e308 overflows float32: dividing by inf would make a masked -inf logit NaN
    removed = masked.draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values)))
    removed[0] = False  # at least one token kept
    logits = np.where(removed, -np.inf, values)
    x = backend.asarray(np.array([logits], dtype=dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow in a cast either
        p = to_numpy(layers.softmax_forward(x, 1e308))[0].astype(np.float64)
    kept = ~np.array(removed)
    expected = np.where(kept, 1.0 / kept.sum(), 0.0)
    np.testing.assert_allclose(p, expected, rtol=0, atol=tolerance(dtype))


# ---------------------------------------------------------------------------------------------
# causal mask and attention


@prop()
@given(data=st.data(), dtype=DTYPES, T=st.integers(1, 7), past=st.integers(0, 4), n_head=st.integers(1, 3))
def test_causal_mask_then_softmax(xp, data, dtype, T, past, n_head):
    Tk = T + past
    scores = data.draw(float_arrays(xp, dtype, (n_head, T, Tk)))
    mask = layers.causal_mask(xp, T, Tk, scores.dtype, scores.device)
    p = to_numpy(layers.softmax_forward(scores + mask))
    np.testing.assert_allclose(p.astype(np.float64).sum(axis=-1), 1.0, rtol=0, atol=tolerance(dtype))
    for t in range(T):
        assert np.all(p[:, t, past + t + 1 :] == 0.0), "a query attends to its future"
    if past == 0:
        assert np.all(p[:, 0, 0] == 1.0)  # the first position can only look at itself


@prop()
@given(data=st.data(), dtype=DTYPES, T=st.integers(2, 6), n_head=st.integers(1, 3), hs=st.integers(1, 3))
def test_attention_output_at_t_ignores_later_positions(xp, data, dtype, T, n_head, hs):
    t = data.draw(st.integers(0, T - 2))
    D = n_head * hs
    q, k, v = (data.draw(float_arrays(xp, dtype, (1, T, D), -3.0, 3.0)) for _ in range(3))
    k2, v2 = (data.draw(float_arrays(xp, dtype, (1, T, D), -3.0, 3.0)) for _ in range(2))
    keep = xp.arange(T, device=q.device)[None, :, None] <= t  # (1, T, 1)
    y1, _ = layers.attention_forward(q, k, v, n_head)
    y2, _ = layers.attention_forward(q, xp.where(keep, k, k2), xp.where(keep, v, v2), n_head)
    np.testing.assert_allclose(to_numpy(y2)[:, : t + 1], to_numpy(y1)[:, : t + 1], rtol=0, atol=tolerance(dtype))


_models: dict[tuple[str, str], GPT] = {}


def _small_model(backend, dtype):
    key = (backend.name, dtype)
    if key not in _models:
        config = GPTConfig.preset("gpt2", vocab_size=13, block_size=8, n_layer=2, n_head=2, n_embd=8)
        _models[key] = GPT(config, seed=0, dtype=dtype, backend=backend.name)
    return _models[key]


@prop(max_examples=30)
@given(data=st.data(), dtype=DTYPES, B=st.integers(1, 2), T=st.integers(2, 8))
def test_model_logits_do_not_depend_on_future_tokens(backend, data, dtype, B, T):
    model = _small_model(backend, dtype)
    t = data.draw(st.integers(0, T - 2))
    tokens = st.lists(st.lists(st.integers(0, 12), min_size=T, max_size=T), min_size=B, max_size=B)
    idx = np.array(data.draw(tokens))
    other = idx.copy()
    other[:, t + 1 :] = np.array(data.draw(tokens))[:, t + 1 :]
    a = to_numpy(model.forward(idx)[0])
    b = to_numpy(model.forward(other)[0])
    np.testing.assert_allclose(b[:, : t + 1], a[:, : t + 1], rtol=0, atol=tolerance(dtype))


# ---------------------------------------------------------------------------------------------
# layernorm, scatter-add, cross-entropy


@prop()
@given(data=st.data(), dtype=DTYPES, rows=st.integers(1, 4), C=st.integers(2, 16))
def test_layernorm_normalizes_before_the_affine_step(xp, data, dtype, rows, C):
    x = data.draw(float_arrays(xp, dtype, (rows, C), -10.0, 10.0))
    host = to_numpy(x).astype(np.float64)
    var = host.var(axis=-1)
    assume(np.all(np.sqrt(var) >= 0.5))
    eps = 1e-5
    w = data.draw(float_arrays(xp, dtype, (C,), 0.5, 2.0))
    b = data.draw(float_arrays(xp, dtype, (C,), -1.0, 1.0))
    for gain, bias in ((None, None), (w, b)):
        out, cache = layers.layernorm_forward(x, gain, bias, eps)
        xhat = to_numpy(cache[0] if gain is not None else out).astype(np.float64)
        atol = 50 * tolerance(dtype)
        np.testing.assert_allclose(xhat.mean(axis=-1), 0.0, rtol=0, atol=atol)
        np.testing.assert_allclose(xhat.var(axis=-1), var / (var + eps), rtol=0, atol=atol)
    # and the affine step is xhat * w + b
    expected = xhat * to_numpy(w).astype(np.float64) + to_numpy(b).astype(np.float64)
    np.testing.assert_allclose(to_numpy(out).astype(np.float64), expected, rtol=0, atol=atol)


@prop()
@given(data=st.data(), dtype=DTYPES, V=st.integers(1, 8), N=st.integers(0, 12), C=st.integers(1, 4))
def test_scatter_add_matches_one_hot_matmul(backend, data, dtype, V, N, C):
    """Repeated indices accumulate; no indices at all (N = 0) leave the target unchanged."""
    xp = backend.xp
    indices = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=N, max_size=N)), dtype=np.int64)
    values = data.draw(float_arrays(xp, dtype, (N, C), -5.0, 5.0))
    start = data.draw(float_arrays(xp, dtype, (V, C), -5.0, 5.0))
    target = xp.asarray(start, copy=True)
    scatter_add(target, backend.asarray(indices), values)
    onehot = (indices[:, None] == np.arange(V)[None, :]).astype(np.float64)  # (N, V)
    expected = to_numpy(start).astype(np.float64) + onehot.T @ to_numpy(values).astype(np.float64)
    assert target.shape == (V, C) and target.dtype == start.dtype
    np.testing.assert_allclose(to_numpy(target).astype(np.float64), expected, rtol=0, atol=N * 5 * tolerance(dtype))


@prop()
@given(data=st.data(), dtype=DTYPES, N=st.integers(1, 8), V=st.integers(2, 10), dloss=st.floats(0.1, 10.0))
def test_crossentropy_dlogits_rows_sum_to_zero(backend, data, dtype, N, V, dloss):
    xp = backend.xp
    logits = data.draw(float_arrays(xp, dtype, (N, V)))
    targets = np.array(data.draw(st.lists(st.integers(-1, V - 1), min_size=N, max_size=N)))
    assume(np.any(targets >= 0))
    loss, cache = layers.crossentropy_forward(logits, backend.asarray(targets))
    assert math.isfinite(float(loss)) and float(loss) >= 0.0
    dlogits = to_numpy(layers.crossentropy_backward(dloss, cache)).astype(np.float64)
    np.testing.assert_allclose(dlogits.sum(axis=-1), 0.0, rtol=0, atol=dloss * tolerance(dtype))
    assert np.all(dlogits[targets == -1] == 0.0)
    kept = targets >= 0
    # the target entry is the only negative one in a kept row: p - 1 < 0, every other entry p >= 0
    rows = np.flatnonzero(kept)
    assert np.all(dlogits[rows, targets[kept]] <= 0.0)
