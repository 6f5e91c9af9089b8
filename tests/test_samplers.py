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

from arraygpt.generation.sampling import draw, make_sampler, one_hot_argmax
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
            "unknown sampler 'nucleus'; registered samplers: greedy, min_p, repeat_penalty, temperature, top_k, top_p",
        ),
        ({"sampler": "top_k"}, "sampler 'top_k' needs the option top_k"),
        ({"sampler": "top_k", "top_k": 5, "top_q": 0.9}, "option 'top_q' is not used by sampler top_k"),
        ({"sampler": "temperature", "topk": 5}, "option 'topk' is not used by sampler temperature"),
        ({"temperature": 1e-320}, "temperature 1e-320 is too small: use 0 for greedy decoding or at least"),
        ({"repeat_penalty": 0.0}, "repeat_penalty must be a number in (0, inf), got 0.0"),
        ({"repeat_penalty": 1.1, "repeat_last_n": -2}, "repeat_last_n must be an integer >= -1, got -2"),
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
        assert name in sampling.__all__ and name not in generation.__all__, name  # one public home


# ----------------------------------------------------------------------------------------------
# the repetition penalty, the context, options that turn their sampler on, checked filter output


@pytest.mark.parametrize("name", PROPERTY_BACKENDS)
@given(data=st.data(), logits=logits_arrays(max_v=12), penalty=st.floats(0.2, 3.0), last_n=st.integers(-1, 6))
def test_repeat_penalty_matches_transformers(name, data, logits, penalty, last_n):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    backend = load_backend(name)
    B, V = logits.shape
    T = data.draw(st.integers(1, 9))
    context = np.asarray(data.draw(hnp.arrays(np.int64, (B, T), elements=st.integers(0, V - 1))))
    sampler = make_sampler("greedy", repeat_penalty=penalty, repeat_last_n=last_n)
    assert sampler.names == ("greedy", "repeat_penalty") and sampler.reads_context
    stage = sampler.filters[1]
    out = to_numpy(stage(backend.asarray(logits), context=backend.asarray(context)))
    window = context if last_n == -1 else context[:, T - min(last_n, T) :]
    if last_n == 0:
        expected = logits
    else:
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        expected = processor(torch.from_numpy(window), torch.from_numpy(logits.copy())).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=0)


def test_the_repeat_penalty_runs_on_the_logits_before_the_temperature():
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

    logits = np.array([[2.0, -1.0, 0.5, 1.5]])
    context = np.array([[0, 1, 1]])
    sampler = make_sampler("temperature", temperature=0.7, repeat_penalty=1.5, repeat_last_n=-1)
    got = to_numpy(sampler(load_backend("numpy").asarray(logits), np.asarray(context)))
    z = RepetitionPenaltyLogitsProcessor(1.5)(torch.from_numpy(context), torch.from_numpy(logits.copy()))
    z = TemperatureLogitsWarper(0.7)(torch.from_numpy(context), z)
    np.testing.assert_allclose(got, torch.softmax(z, -1).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="reads the context: call the sampler as sampler"):
        sampler(load_backend("numpy").asarray(logits))


def test_an_option_named_like_a_sampler_turns_it_on_in_the_usual_order():
    backend = load_backend("numpy")
    logits = backend.asarray(np.random.default_rng(0).normal(size=(3, 20)))
    implied = make_sampler(temperature=0.8, min_p=0.05, top_p=0.9, top_k=5)
    assert implied.names == ("temperature", "top_k", "top_p", "min_p")
    explicit = make_sampler(["temperature", "top_k", "top_p", "min_p"], temperature=0.8, min_p=0.05, top_p=0.9, top_k=5)
    np.testing.assert_array_equal(to_numpy(implied(logits)), to_numpy(explicit(logits)))
    # independent reference: transformers' warpers in the same order
    import torch
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    z = torch.from_numpy(to_numpy(logits).copy())
    for warper in (TemperatureLogitsWarper(0.8), TopKLogitsWarper(5), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)):
        z = warper(None, z)
    np.testing.assert_allclose(to_numpy(implied(logits)), torch.softmax(z, -1).numpy(), rtol=1e-9, atol=1e-12)
    assert make_sampler("top_p", top_p=0.9, top_k=4).names == ("top_p", "top_k")  # after the chosen ones


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (lambda p: p[:, :-1], r"returned weights of shape \(1, 10\) for probabilities of shape \(1, 11\)"),
        (lambda p: -p, "returned negative or NaN weights"),
        (lambda p: p - 1.0 / p.shape[-1], "returned negative or NaN weights"),
        (lambda p: p * float("nan"), "returned negative or NaN weights"),
    ],
    ids=["too-few-columns", "negative", "mixed-sign", "nan"],
)
def test_a_plugin_filter_that_breaks_the_contract_is_an_error_naming_it(returned, message):
    import arraygpt
    from arraygpt import GPT, GPTConfig
    from arraygpt.generation.generation import generate
    from arraygpt.manager import PluginError, get_plugin_manager, set_plugin_manager

    class Broken:
        @arraygpt.hookimpl
        def arraygpt_register_samplers(self):
            return [{"broken": lambda: returned}]

    pm = get_plugin_manager(autoload=False)
    pm.register(Broken(), name="broken-plugin")
    set_plugin_manager(pm)
    try:
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
        with pytest.raises(PluginError, match=rf"sampler 'broken' \(plugin 'broken-plugin'\) {message}"):
            list(generate(model, [1, 2], 3, "broken", seed=0))
    finally:
        set_plugin_manager(None)
    with pytest.raises(ValueError, match=rf"sampler '<lambda>' {message}"):  # a filter function: no plugin to name
        list(generate(model, [1, 2], 3, returned, seed=0))
