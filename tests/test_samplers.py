"""Samplers: Hypothesis properties of the built-in filters and the draw, on numpy and
array_api_strict (the latter proves the samplers use nothing beyond the standard), plus the
option errors.

Logits and coins are drawn on the host in float64 and moved to the backend once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from arraygpt.generation.generation import draw, make_sampler, one_hot_argmax
from arraygpt.nn import layers
from arraygpt.plugins import samplers as builtin
from arraygpt.xp import load_backend, to_numpy

PROPERTY_BACKENDS = ["numpy", "array_api_strict"]


@st.composite
def logits_arrays(draw_, max_b=3, max_v=16):
    B = draw_(st.integers(1, max_b))
    V = draw_(st.integers(1, max_v))
    elements = st.floats(-20, 20, allow_nan=False, allow_subnormal=False, width=64)
    return draw_(hnp.arrays(np.float64, (B, V), elements=elements))


def coins_for(draw_, B):
    return np.asarray(draw_(st.lists(st.floats(0, 1, exclude_max=True), min_size=B, max_size=B)))


temperatures = st.one_of(st.just(0.0), st.floats(0.05, 5.0), st.just(1.0))

SAMPLER_SPECS = st.one_of(
    st.just(("greedy", {})),
    st.just(("temperature", {})),
    st.builds(lambda k: ("top_k", {"top_k": k}), st.integers(1, 20)),
    st.builds(lambda p: ("top_p", {"top_p": p}), st.floats(0.0, 1.0, exclude_min=True)),
    st.builds(lambda m: ("min_p", {"min_p": m}), st.floats(0.0, 1.0)),
    st.builds(
        lambda k, p: (["top_k", "top_p"], {"top_k": k, "top_p": p}),
        st.integers(1, 20),
        st.floats(0.0, 1.0, exclude_min=True),
    ),
    st.builds(
        lambda p, m: (["min_p", "top_p"], {"min_p": m, "top_p": p}),
        st.floats(0.0, 1.0, exclude_min=True),
        st.floats(0.0, 1.0),
    ),
)


def tempered(backend, logits, temperature):
    """softmax(logits / T) on the backend, exactly as the sampler's first stage computes it."""
    x = backend.asarray(logits)
    return one_hot_argmax(x) if temperature == 0 else layers.softmax_forward(x, temperature)


# ----------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("name", PROPERTY_BACKENDS)
@given(data=st.data(), logits=logits_arrays(), temperature=temperatures, spec=SAMPLER_SPECS)
def test_every_sampler_draws_only_tokens_it_kept(name, data, logits, temperature, spec):
    backend = load_backend(name)
    sampler_name, options = spec
    sampler = make_sampler(sampler_name, temperature=temperature, **options)
    probs = sampler(backend.asarray(logits))  # (B, V)
    coins = coins_for(data.draw, logits.shape[0])
    tokens = to_numpy(draw(probs, backend.asarray(coins)))
    p = to_numpy(probs)
    B, V = logits.shape
    assert p.shape == (B, V)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=1e-9)
    assert np.all(p >= 0)
    assert np.all((tokens >= 0) & (tokens < V)), "a sampler returned an id outside the vocabulary"
    assert np.all(p[np.arange(B), tokens] > 0), "a token of zero probability under the filtered distribution"


@pytest.mark.parametrize("name", PROPERTY_BACKENDS)
@given(data=st.data(), logits=logits_arrays(), temperature=temperatures, k=st.integers(1, 20))
def test_top_k_keeps_only_the_k_largest(name, data, logits, temperature, k):
    backend = load_backend(name)
    q = to_numpy(tempered(backend, logits, temperature))  # (B, V)
    kept = to_numpy(builtin.top_k_filter(backend.asarray(q), k)) > 0
    kth = -np.sort(-q, axis=-1)[:, min(k, q.shape[1]) - 1 : min(k, q.shape[1])]  # (B, 1)
    np.testing.assert_array_equal(kept, (q >= kth) & (q > 0))  # the k largest (ties at the k-th kept too)
    probs = make_sampler("top_k", temperature=temperature, top_k=k)(backend.asarray(logits))
    tokens = to_numpy(draw(probs, backend.asarray(coins_for(data.draw, q.shape[0]))))
    assert np.all(q[np.arange(q.shape[0]), tokens] >= kth[:, 0]), "top-k drew a token outside the k largest"


@pytest.mark.parametrize("name", PROPERTY_BACKENDS)
@given(logits=logits_arrays(), temperature=temperatures, p=st.floats(0.0, 1.0, exclude_min=True))
def test_top_p_keeps_the_smallest_prefix_reaching_p(name, logits, temperature, p):
    backend = load_backend(name)
    q = to_numpy(tempered(backend, logits, temperature))  # (B, V)
    kept = to_numpy(builtin.top_p_filter(backend.asarray(q), p)) > 0
    for row, keep in zip(q, kept):
        desc = np.sort(row)[::-1]
        mass = np.cumsum(desc)
        assume(np.all(np.abs(mass - p) > 1e-9))  # stay off rounding knife-edges
        if p >= 1.0:
            np.testing.assert_array_equal(keep, row > 0)
            continue
        m = int(np.argmax(mass >= p)) + 1 if np.any(mass >= p) else len(desc)  # smallest prefix reaching p
        np.testing.assert_array_equal(keep, (row >= desc[m - 1]) & (row > 0))
        smallest = row[keep].min()
        assert row[keep].sum() >= p - 1e-9 or keep.all()  # reaches p
        assert row[keep & (row > smallest)].sum() < p + 1e-9  # one tie group less does not


@pytest.mark.parametrize("name", PROPERTY_BACKENDS)
@given(logits=logits_arrays(), temperature=temperatures, m=st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(name, logits, temperature, m):
    backend = load_backend(name)
    q = to_numpy(tempered(backend, logits, temperature))
    kept = to_numpy(builtin.min_p_filter(backend.asarray(q), m)) > 0
    np.testing.assert_array_equal(kept, (q >= m * q.max(axis=-1, keepdims=True)) & (q > 0))


@pytest.mark.parametrize("name", PROPERTY_BACKENDS)
@given(data=st.data(), logits=logits_arrays(), temperature=st.floats(0.05, 5.0))
def test_greedy_equals_argmax(name, data, logits, temperature):
    backend = load_backend(name)
    coins = backend.asarray(coins_for(data.draw, logits.shape[0]))
    # the greedy sampler: the argmax of the distribution it is given, whatever the coin
    q = to_numpy(tempered(backend, logits, temperature))
    tokens = to_numpy(draw(make_sampler("greedy", temperature=temperature)(backend.asarray(logits)), coins))
    np.testing.assert_array_equal(tokens, np.argmax(q, axis=-1))
    # temperature 0, with any sampler: the argmax of the logits themselves
    for spec, options in [("temperature", {}), ("top_p", {"top_p": 0.5}), ("min_p", {"min_p": 0.3})]:
        probs = make_sampler(spec, temperature=0.0, **options)(backend.asarray(logits))
        np.testing.assert_array_equal(to_numpy(draw(probs, coins)), np.argmax(logits, axis=-1))


@pytest.mark.parametrize("name", PROPERTY_BACKENDS)
@given(
    data=st.data(),
    weights=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 3), st.integers(1, 12)),
        elements=st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0, 1e-3]),
    ),
)
def test_draw_picks_only_positive_weights(name, data, weights):
    backend = load_backend(name)
    B, V = weights.shape
    coins = coins_for(data.draw, B)
    tokens = to_numpy(draw(backend.asarray(weights), backend.asarray(coins)))
    for b in range(B):
        if weights[b].sum() == 0:
            assert tokens[b] == V  # no token to draw: the out-of-vocabulary marker generate reports
        else:
            assert 0 <= tokens[b] < V and weights[b, tokens[b]] > 0


# ----------------------------------------------------------------------------------------------
# examples


@pytest.mark.parametrize("name", PROPERTY_BACKENDS)
def test_draw_follows_the_cumulative_distribution(name):
    backend = load_backend(name)
    w = np.array([[0.0, 0.2, 0.0, 0.3, 0.5, 0.0]])
    n = 1000
    coins = (np.arange(n) + 0.5) / n  # evenly spaced coins: counts are exactly the weights
    tokens = to_numpy(draw(backend.asarray(np.repeat(w, n, axis=0)), backend.asarray(coins)))
    np.testing.assert_array_equal(np.bincount(tokens, minlength=6), [0, 200, 0, 300, 500, 0])
    edge = to_numpy(draw(backend.asarray(w[:, :5]), backend.asarray(np.array([np.nextafter(1.0, 0.0)]))))
    assert edge[0] == 4  # a coin just below 1 picks the last token with weight


def test_draw_marks_nan_rows():
    backend = load_backend("numpy")
    tokens = to_numpy(
        draw(backend.asarray(np.array([[np.nan, 1.0], [1.0, 1.0]])), backend.asarray(np.array([0.3, 0.3])))
    )
    assert tokens[0] == 2 and tokens[1] == 0


def test_temperature_comes_before_the_filters():
    backend = load_backend("numpy")
    logits = np.log(np.array([[0.7, 0.2, 0.1]]))
    # at T = 1 the top token alone reaches top_p = 0.6; at T = 10 the distribution is flatter
    kept_cold = to_numpy(make_sampler("top_p", top_p=0.6)(backend.asarray(logits))) > 0
    kept_hot = to_numpy(make_sampler("top_p", temperature=10.0, top_p=0.6)(backend.asarray(logits))) > 0
    assert kept_cold.tolist() == [[True, False, False]]
    assert kept_hot.tolist() == [[True, True, False]]
    hot = to_numpy(make_sampler("temperature", temperature=10.0)(backend.asarray(logits)))
    expected = np.exp(logits / 10.0) / np.exp(logits / 10.0).sum()
    np.testing.assert_allclose(hot, expected, rtol=1e-12)  # p_i = exp(z_i / T) / sum_j exp(z_j / T)


def test_samplers_compose_in_the_order_given():
    backend = load_backend("numpy")
    logits = backend.asarray(np.log(np.array([[0.4, 0.3, 0.2, 0.1]])))
    s = make_sampler(["top_k", "top_p"], top_k=3, top_p=0.7)
    # top_k=3 -> [.4,.3,.2]/.9; then top_p=0.7 keeps .444+.333 = .777
    np.testing.assert_allclose(to_numpy(s(logits)), [[4 / 7, 3 / 7, 0, 0]], rtol=1e-12)
    assert s.names == ("top_k", "top_p")


# ----------------------------------------------------------------------------------------------
# option errors: each names the option and its allowed range


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, "temperature must be a number >= 0, got -0.5"),
        ({"temperature": math.nan}, "temperature must be a number >= 0"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
        ({"sampler": "top_k", "top_k": 0}, "top_k must be an integer >= 1, got 0"),
        ({"sampler": "top_k", "top_k": -3}, "top_k must be an integer >= 1, got -3"),
        ({"sampler": "top_k", "top_k": 2.5}, "top_k must be an integer >= 1, got 2.5"),
        ({"sampler": "top_k", "top_k": True}, "top_k must be an integer >= 1, got True"),
        ({"sampler": "top_p", "top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
        ({"sampler": "top_p", "top_p": 1.5}, "top_p must be a number in (0, 1], got 1.5"),
        ({"sampler": "top_p", "top_p": -0.1}, "top_p must be a number in (0, 1], got -0.1"),
        ({"sampler": "min_p", "min_p": -0.1}, "min_p must be a number in [0, 1], got -0.1"),
        ({"sampler": "min_p", "min_p": 1.01}, "min_p must be a number in [0, 1], got 1.01"),
        (
            {"sampler": "nucleus"},
            "unknown sampler 'nucleus'; registered samplers: greedy, min_p, temperature, top_k, top_p",
        ),
        ({"sampler": "top_k"}, "sampler 'top_k' needs the option top_k"),
        ({"sampler": "top_k", "top_k": 5, "top_p": 0.9}, "option 'top_p' is not used by sampler top_k"),
        ({"sampler": "temperature", "top_k": 5}, "option 'top_k' is not used by sampler temperature"),
    ],
)
def test_invalid_options_are_clear_errors(kwargs, message, monkeypatch):
    monkeypatch.setenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    from arraygpt.manager import get_plugin_manager

    with pytest.raises(ValueError) as info:
        make_sampler(pm=get_plugin_manager(), **kwargs)
    assert message in str(info.value)


def test_temperature_has_no_upper_cap():
    backend = load_backend("numpy")
    probs = to_numpy(make_sampler("temperature", temperature=1e6)(backend.asarray(np.array([[0.0, 10.0]]))))
    np.testing.assert_allclose(probs, [[0.5, 0.5]], atol=1e-5)


def test_the_built_in_samplers_use_the_sampling_module_not_generation():
    import ast
    import inspect

    from arraygpt.generation import generation, sampling

    tree = ast.parse(inspect.getsource(builtin))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "arraygpt.generation.sampling" in imported and "arraygpt.generation.generation" not in imported
    for name in (
        "check_number",
        "check_temperature",
        "draw",
        "make_sampler",
        "normalize",
        "one_hot_argmax",
        "top_candidates",
        "available_samplers",
        "Sampler",
    ):
        assert getattr(generation, name) is getattr(sampling, name), name  # re-exported, one object
