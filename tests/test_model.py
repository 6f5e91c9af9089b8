"""The whole GPT: gradients against finite differences and against PyTorch autograd on the same
weights, precision and backend agreement, the KV cache, attention patterns, the state dict, dropout."""

from __future__ import annotations

import numpy as np
import pytest

from arraygpt import GPT, GPTConfig, KVCache
from arraygpt.xp import to_numpy
from conftest import available_backends

BACKENDS = [b.name for b in available_backends()]

CONFIGS = {
    # the microgpt preset as is: RMSNorm without gain after the embedding, ReLU, no biases, lm_head
    "microgpt": GPTConfig.preset("microgpt"),
    # GPT-2's architecture, small: LayerNorm with gain and bias, biases, GELU tanh, tied, final norm
    "gpt2-small": GPTConfig.preset("gpt2", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8),
    # attention width != n_embd (as gpt3-xl/13b), untied, RMSNorm with gain, norm_emb, exact GELU
    "odd": GPTConfig(
        vocab_size=9,
        block_size=6,
        n_layer=2,
        n_head=3,
        n_embd=8,
        head_dim=2,
        mlp_hidden=12,
        norm="rmsnorm",
        norm_emb=True,
        bias=True,
        activation="gelu",
        tie_embeddings=False,
    ),
    # squared ReLU, LayerNorm without affine, no final norm
    "relu2": GPTConfig(
        vocab_size=7,
        block_size=5,
        n_layer=1,
        n_head=2,
        n_embd=6,
        norm_affine=False,
        norm_final=False,
        activation="relu2",
        bias=False,
    ),
}


def _batch(config, B=2, T=None, seed=0, ignore=True):
    rng = np.random.default_rng(seed)
    T = T or config.block_size
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    if ignore:
        targets[0, 1] = targets[1, -1] = -1
    return idx, targets


def _randomized(config, backend="numpy", dtype="float64", seed=0, scale=0.3):
    """A model whose every parameter is random (microgpt starts wo and fc2 at zero, which would
    leave the attention's gradients at exactly zero and untested)."""
    model = GPT(config, seed=seed, dtype=dtype, backend=backend)
    rng = np.random.default_rng(seed + 100)
    state = {}
    for name, value in model.state_dict().items():
        shape = tuple(value.shape)
        if len(shape) == 1 and not name.endswith("_b"):
            state[name] = 1.0 + rng.standard_normal(shape) * 0.2  # gains near one
        else:
            state[name] = rng.standard_normal(shape) * scale
    model.load_state_dict(state)
    return model, state


def _loss_at(model, state, idx, targets):
    model.load_state_dict(state)
    return model.forward(idx, targets)[1]


def _directional_check(model, state, idx, targets, names, seed=1, eps=1e-5):
    """<grad, d> vs central differences of the loss for a random direction d in ``names`` together."""
    model.load_state_dict(state)
    model.forward(idx, targets)
    grads = {k: to_numpy(v) for k, v in model.backward().items()}
    rng = np.random.default_rng(seed)
    d = {n: rng.standard_normal(state[n].shape) for n in names}
    plus = {**state, **{n: state[n] + eps * d[n] for n in names}}
    minus = {**state, **{n: state[n] - eps * d[n] for n in names}}
    numeric = (_loss_at(model, plus, idx, targets) - _loss_at(model, minus, idx, targets)) / (2 * eps)
    analytic = sum(float(np.sum(grads[n] * d[n])) for n in names)
    model.load_state_dict(state)
    assert abs(numeric) > 1e-5, f"{names}: directional derivative {numeric} too small to test"
    rel = abs(analytic - numeric) / max(abs(analytic), abs(numeric))
    assert rel < 1e-6, f"{names}: analytic {analytic!r} vs finite difference {numeric!r} (rel {rel:.2e})"


# ---------------------------------------------------------------------------------------------
# gradients against finite differences


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_match_finite_differences_per_tensor(name):
    config = CONFIGS[name]
    model, state = _randomized(config)
    idx, targets = _batch(config)
    for tensor in state:
        if tensor.endswith("attn_wk_b"):
            continue  # its gradient is exactly zero (below); checked together with attn_wk instead
        _directional_check(model, state, idx, targets, [tensor])
    for tensor in [t for t in state if t.endswith("attn_wk_b")]:
        _directional_check(model, state, idx, targets, [tensor, tensor[: -len("_b")]])


def test_key_bias_gradient_is_zero():
    # softmax is shift-invariant: a key bias adds q.b to every score of a row, so it cannot change
    # the loss; its gradient must be zero (up to rounding), not merely small.
    config = CONFIGS["gpt2-small"]
    model, _ = _randomized(config)
    model.forward(*_batch(config))
    grads = model.backward()
    for i in range(config.n_layer):
        assert np.max(np.abs(to_numpy(grads[f"layer{i}.attn_wk_b"]))) < 1e-14
        assert np.max(np.abs(to_numpy(grads[f"layer{i}.attn_wq_b"]))) > 1e-4


@pytest.mark.parametrize("name", ["microgpt", "gpt2-small"])
def test_gradients_match_finite_differences_on_array_api_strict(name):
    pytest.importorskip("array_api_strict")
    config = CONFIGS[name]
    model, state = _randomized(config, backend="array_api_strict")
    idx, targets = _batch(config, seed=3)
    _directional_check(model, state, idx, targets, list(state))


def test_microgpt_preset_at_init_matches_finite_differences():
    # the preset exactly as initialized (wo and fc2 at zero)
    config = CONFIGS["microgpt"]
    model = GPT(config, seed=0, dtype="float64")
    state = {k: to_numpy(v).copy() for k, v in model.state_dict().items()}
    idx, targets = _batch(config, seed=4)
    _directional_check(model, state, idx, targets, list(state))


def test_backward_ignores_positions_marked_minus_one():
    config = CONFIGS["gpt2-small"]
    model, _ = _randomized(config)
    idx, targets = _batch(config, ignore=False)
    _, loss_all = model.forward(idx, targets)
    masked = targets.copy()
    masked[:, 3:] = -1
    _, loss_masked = model.forward(idx, masked)
    # the mean over the kept positions equals the loss of a model that only sees those positions
    _, loss_prefix = model.forward(idx[:, :3], targets[:, :3])
    assert abs(loss_masked - loss_prefix) < 1e-12
    assert abs(loss_masked - loss_all) > 1e-6


# ---------------------------------------------------------------------------------------------
# against PyTorch autograd


def _torch_loss(torch, config, state, idx, targets, dtype):
    """The same network in plain PyTorch from our state dict (weights are (out, in))."""
    F = torch.nn.functional
    p = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in state.items()}
    B, T = idx.shape
    NH, hs, C = config.n_head, config.head_dim, config.n_embd

    def norm(x, name):
        w, b = p.get(name), p.get(name + "_b")
        if config.norm == "layernorm":
            return F.layer_norm(x, (C,), w, b, config.norm_eps)
        y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + config.norm_eps)
        y = y if w is None else y * w
        return y if b is None else y + b

    def linear(x, name):
        y = x @ p[name].T
        return y + p[name + "_b"] if name + "_b" in p else y

    def heads(a):
        return a.view(B, T, NH, hs).transpose(1, 2)

    act = {
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": lambda x: F.gelu(x, approximate="none"),
        "relu": F.relu,
        "relu2": lambda x: F.relu(x) ** 2,
    }[config.activation]
    x = p["wte"][torch.from_numpy(idx)] + p["wpe"][:T]
    if config.norm_emb:
        x = norm(x, "norm_emb")
    for i in range(config.n_layer):
        h = norm(x, f"layer{i}.norm1")
        q, k, v = (heads(linear(h, f"layer{i}.attn_w{c}")) for c in "qkv")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, NH * hs)
        x = x + linear(y, f"layer{i}.attn_wo")
        x = x + linear(act(linear(norm(x, f"layer{i}.norm2"), f"layer{i}.mlp_fc1")), f"layer{i}.mlp_fc2")
    if config.norm_final:
        x = norm(x, "normf")
    logits = x @ (p["wte"] if config.tie_embeddings else p["lm_head"]).T
    loss = F.cross_entropy(logits.reshape(B * T, -1), torch.from_numpy(targets).reshape(-1), ignore_index=-1)
    loss.backward()
    return logits.detach().numpy(), loss.item(), {k: v.grad.numpy() for k, v in p.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
def test_matches_pytorch_autograd(name, dtype, tol):
    torch = pytest.importorskip("torch")
    config = CONFIGS[name]
    model, state = _randomized(config, dtype=dtype)
    state = {k: v.astype(dtype) for k, v in state.items()}
    idx, targets = _batch(config, seed=5)
    logits, loss = model.forward(idx, targets)
    grads = model.backward()
    ref_logits, ref_loss, ref_grads = _torch_loss(torch, config, state, idx, targets, getattr(torch, dtype))
    assert np.max(np.abs(to_numpy(logits) - ref_logits)) <= tol
    assert abs(loss - ref_loss) <= tol
    assert set(grads) == set(ref_grads)
    report = {k: float(np.max(np.abs(to_numpy(grads[k]) - ref_grads[k]))) for k in ref_grads}
    bad = {k: v for k, v in report.items() if not v <= tol}
    assert not bad, f"gradients differ from PyTorch by more than {tol}: {bad}"


# ---------------------------------------------------------------------------------------------
# precision and backends


@pytest.mark.parametrize("name", ["microgpt", "gpt2-small", "odd"])
def test_float32_forward_agrees_with_float64(name):
    config = CONFIGS[name]
    idx, targets = _batch(config, seed=6)
    l64, loss64 = GPT(config, seed=3, dtype="float64").forward(idx, targets)
    l32, loss32 = GPT(config, seed=3, dtype="float32").forward(idx, targets)
    assert to_numpy(l32).dtype == np.float32 and to_numpy(l64).dtype == np.float64
    eps32 = float(np.finfo(np.float32).eps)
    scale = max(1.0, float(np.max(np.abs(to_numpy(l64)))))
    assert np.max(np.abs(to_numpy(l32) - to_numpy(l64))) <= 50 * eps32 * scale
    assert abs(loss32 - loss64) <= 50 * eps32 * max(1.0, loss64)


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_same_seed_same_weights_and_loss_on_every_backend(dtype, tol):
    config = CONFIGS["gpt2-small"]
    idx, targets = _batch(config, seed=7)
    ref_model = GPT(config, seed=11, dtype=dtype, backend="numpy")
    ref_state = {k: to_numpy(v) for k, v in ref_model.state_dict().items()}
    _, ref_loss = ref_model.forward(idx, targets)
    ref_grads = {k: to_numpy(v) for k, v in ref_model.backward().items()}
    assert len(BACKENDS) >= 2
    for name in BACKENDS:
        model = GPT(config, seed=11, dtype=dtype, backend=name)
        for k, v in model.state_dict().items():
            assert type(v) is model.backend.array_type
            np.testing.assert_array_equal(to_numpy(v), ref_state[k], err_msg=f"{name}: {k}")
        _, loss = model.forward(idx, targets)
        assert abs(loss - ref_loss) <= tol * max(1.0, abs(ref_loss)), name
        for k, g in model.backward().items():
            np.testing.assert_allclose(to_numpy(g), ref_grads[k], rtol=0, atol=tol, err_msg=f"{name}: d{k}")
    other = GPT(config, seed=12, dtype=dtype)
    assert not np.array_equal(to_numpy(other.state_dict()["wte"]), ref_state["wte"])


def test_attention_patterns_are_causal_distributions(backend):
    config = CONFIGS["odd"]
    model = GPT(config, seed=0, dtype="float64", backend=backend.name)
    idx, _ = _batch(config, T=5)
    model.forward(idx)
    patterns = model.attention_patterns()
    assert len(patterns) == config.n_layer
    for att in patterns:
        a = to_numpy(att)
        assert a.shape == (2, config.n_head, 5, 5)
        np.testing.assert_allclose(a.sum(-1), 1.0, rtol=0, atol=1e-12)
        assert np.all(a[..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] == 0.0)
        assert np.all(a[..., np.tril_indices(5)[0], np.tril_indices(5)[1]] > 0.0)
        np.testing.assert_array_equal(a[..., 0, 0], 1.0)


def test_attention_patterns_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match="forward"):
        GPT(CONFIGS["microgpt"]).attention_patterns()


@pytest.mark.parametrize("name", ["gpt2-small", "odd"])
def test_kv_cache_token_by_token_equals_full_forward(backend, name):
    config = CONFIGS[name]
    model, _ = _randomized(config, backend=backend.name)
    idx, _ = _batch(config, seed=8)
    full = to_numpy(model.forward(idx)[0])
    cache = KVCache(config)
    steps = [to_numpy(model.forward(idx[:, :2], kv_cache=cache)[0])]  # a prompt of two, then one at a time
    for t in range(2, idx.shape[1]):
        steps.append(to_numpy(model.forward(idx[:, t : t + 1], kv_cache=cache)[0]))
    assert cache.length == idx.shape[1]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=0, atol=1e-10)


def test_kv_cache_rejects_going_past_block_size():
    config = CONFIGS["gpt2-small"]
    model = GPT(config, dtype="float64")
    cache = KVCache(config)
    model.forward(np.zeros((1, config.block_size), dtype=np.int64), kv_cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model.forward(np.zeros((1, 1), dtype=np.int64), kv_cache=cache)


# ---------------------------------------------------------------------------------------------
# state dict


def test_state_dict_names_and_shapes_gpt2_style():
    config = GPTConfig.preset("gpt2", vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
    shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    expected = {"wte": (11, 8), "wpe": (8, 8), "normf": (8,), "normf_b": (8,)}
    for i in range(2):
        L = f"layer{i}."
        expected.update(
            {
                L + "norm1": (8,),
                L + "norm1_b": (8,),
                L + "norm2": (8,),
                L + "norm2_b": (8,),
                L + "attn_wq": (8, 8),
                L + "attn_wk": (8, 8),
                L + "attn_wv": (8, 8),
                L + "attn_wo": (8, 8),
                L + "attn_wq_b": (8,),
                L + "attn_wk_b": (8,),
                L + "attn_wv_b": (8,),
                L + "attn_wo_b": (8,),
                L + "mlp_fc1": (32, 8),
                L + "mlp_fc1_b": (32,),
                L + "mlp_fc2": (8, 32),
                L + "mlp_fc2_b": (8,),
            }
        )
    assert shapes == expected  # tied: no lm_head


def test_state_dict_names_and_shapes_microgpt():
    shapes = {k: tuple(v.shape) for k, v in GPT(GPTConfig.preset("microgpt")).state_dict().items()}
    assert shapes == {
        "wte": (27, 16),
        "wpe": (8, 16),
        "lm_head": (27, 16),
        "layer0.attn_wq": (16, 16),
        "layer0.attn_wk": (16, 16),
        "layer0.attn_wv": (16, 16),
        "layer0.attn_wo": (16, 16),
        "layer0.mlp_fc1": (64, 16),
        "layer0.mlp_fc2": (16, 64),
    }


def test_state_dict_names_and_shapes_with_separate_head_width():
    config = CONFIGS["odd"]  # 3 heads x 2 = 6 != n_embd 8; RMSNorm gains without biases
    shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    assert shapes["lm_head"] == (9, 8)
    assert shapes["norm_emb"] == (8,) and shapes["normf"] == (8,)
    assert "normf_b" not in shapes and "layer0.norm1_b" not in shapes
    assert shapes["layer1.attn_wq"] == (6, 8) and shapes["layer1.attn_wq_b"] == (6,)
    assert shapes["layer1.attn_wo"] == (8, 6) and shapes["layer1.attn_wo_b"] == (8,)
    assert shapes["layer1.mlp_fc1"] == (12, 8) and shapes["layer1.mlp_fc2"] == (8, 12)


def test_initialization_follows_the_config():
    micro = GPT(GPTConfig.preset("microgpt"), seed=0, dtype="float64").state_dict()
    assert np.all(to_numpy(micro["layer0.attn_wo"]) == 0) and np.all(to_numpy(micro["layer0.mlp_fc2"]) == 0)
    assert abs(float(np.std(to_numpy(micro["layer0.mlp_fc1"]))) - 0.02) < 0.003
    gpt2 = GPT(GPTConfig.preset("gpt2", vocab_size=64, block_size=64, n_layer=2, n_embd=64, n_head=2), dtype="float64")
    s = {k: to_numpy(v) for k, v in gpt2.state_dict().items()}
    assert np.all(s["normf"] == 1) and np.all(s["normf_b"] == 0) and np.all(s["layer1.attn_wq_b"] == 0)
    assert abs(float(np.std(s["layer0.mlp_fc2"])) - 0.02 / np.sqrt(4)) < 0.002  # scaled by 1/sqrt(2 n_layer)


@pytest.mark.parametrize("source", ["numpy", "backend"])
def test_load_state_dict(backend, source):
    config = CONFIGS["odd"]
    donor = GPT(config, seed=5, dtype="float64", backend=backend.name)
    state = {k: to_numpy(v).copy() for k, v in donor.state_dict().items()}
    if source == "backend":
        state = {k: backend.asarray(v) for k, v in state.items()}
    model = GPT(config, seed=6, dtype="float64", backend=backend.name)
    idx, targets = _batch(config, T=4)
    assert model.forward(idx, targets)[1] != donor.forward(idx, targets)[1]
    model.load_state_dict(state)
    assert model.forward(idx, targets)[1] == donor.forward(idx, targets)[1]
    for k, v in model.state_dict().items():
        assert type(v) is backend.array_type
        np.testing.assert_array_equal(to_numpy(v), to_numpy(donor.state_dict()[k]))


def test_load_state_dict_copies_and_casts():
    config = CONFIGS["microgpt"]
    model = GPT(config, dtype="float32")
    state = {k: np.ones(tuple(v.shape), dtype=np.float64) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    state["wte"][:] = 5.0
    wte = to_numpy(model.state_dict()["wte"])
    assert wte.dtype == np.float32 and np.all(wte == 1.0)


def test_load_state_dict_errors_name_the_tensor():
    model = GPT(CONFIGS["gpt2-small"])
    state = {k: to_numpy(v) for k, v in model.state_dict().items()}
    missing = {k: v for k, v in state.items() if k != "layer1.attn_wk_b"}
    with pytest.raises(KeyError, match="layer1.attn_wk_b"):
        model.load_state_dict(missing)
    with pytest.raises(KeyError, match="lm_head"):
        model.load_state_dict({**state, "lm_head": np.zeros((11, 8))})
    with pytest.raises(ValueError, match=r"layer0\.mlp_fc1.*\(8, 32\)"):
        model.load_state_dict({**state, "layer0.mlp_fc1": np.zeros((8, 32))})
    with pytest.raises(ValueError, match="normf_b"):
        model.load_state_dict({**state, "normf_b": np.zeros((9,))})
    # a failed load leaves the parameters untouched
    np.testing.assert_array_equal(to_numpy(model.state_dict()["layer0.mlp_fc1"]), state["layer0.mlp_fc1"])


# ---------------------------------------------------------------------------------------------
# dropout


def test_dropout_gradients_match_finite_differences_with_fixed_coins(monkeypatch):
    """The coins are a function of the dropout key (nn/dropout.py), so one key fixes them for the
    finite differences."""
    config = GPTConfig.preset("gpt2", vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8, dropout=0.2)
    model, state = _randomized(config)
    model.train()
    original_forward = model.forward

    def forward(*args, **kwargs):
        return original_forward(*args, dropout_key=kwargs.pop("dropout_key", (7, 1)), **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    idx, targets = _batch(config)
    _directional_check(model, state, idx, targets, list(state))
    # dropout is really on: the train-mode loss differs from eval mode and from another key's
    _, train_loss = model.forward(idx, targets)
    _, other_loss = model.forward(idx, targets, dropout_key=(8, 1))
    model.eval()
    _, eval_loss = model.forward(idx, targets)
    assert abs(train_loss - eval_loss) > 1e-6 and abs(train_loss - other_loss) > 1e-6


def test_dropout_eval_mode_is_deterministic_and_equals_no_dropout():
    base = dict(vocab_size=11, block_size=6, n_layer=2, n_head=2, n_embd=8)
    idx, targets = _batch(GPTConfig.preset("gpt2", **base))
    model = GPT(GPTConfig.preset("gpt2", **base, dropout=0.3), seed=2, dtype="float64")
    plain = GPT(GPTConfig.preset("gpt2", **base), seed=2, dtype="float64")
    model.eval()
    a, b = model.forward(idx, targets), model.forward(idx, targets)
    ref = plain.forward(idx, targets)
    np.testing.assert_array_equal(to_numpy(a[0]), to_numpy(b[0]))
    np.testing.assert_array_equal(to_numpy(a[0]), to_numpy(ref[0]))
    model.train()
    t1, t2 = model.forward(idx, targets)[1], model.forward(idx, targets)[1]
    assert t1 != t2  # fresh coins every training forward
    assert GPT(GPTConfig.preset("gpt2", **base, dropout=0.3)).training is False  # eval by default


# -- fused QKV storage, last_only, KVCache.reset -------------------------------------------------


def test_qkv_views_share_the_fused_buffer_so_in_place_updates_reach_the_forward():
    cfg = GPTConfig(vocab_size=13, block_size=6, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg, seed=3, dtype="float64")
    idx = np.array([[1, 2, 3, 4]])
    before, _ = model.forward(idx)
    model.params["layer1.attn_wk"] += 0.5  # in place, as optimizers update
    model.params["layer0.attn_wv_b"] -= 0.25
    after, _ = model.forward(idx)
    assert np.abs(np.asarray(after) - np.asarray(before)).max() > 1e-3
    fresh = GPT(cfg, seed=99, dtype="float64")
    fresh.load_state_dict({k: np.asarray(v) for k, v in model.state_dict().items()})
    np.testing.assert_array_equal(np.asarray(fresh.forward(idx)[0]), np.asarray(after))


def test_last_only_gives_the_last_row_of_the_full_logits():
    model = GPT(GPTConfig.preset("microgpt"), seed=1, dtype="float64")
    idx = np.array([[0, 4, 9, 2, 7], [3, 3, 1, 0, 5]])
    full, _ = model.forward(idx)
    last, _ = model.forward(idx, last_only=True)
    assert last.shape == (2, 1, 27)
    np.testing.assert_allclose(np.asarray(last)[:, 0], np.asarray(full)[:, -1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="last_only"):
        model.forward(idx, targets=idx, last_only=True)


def test_kv_cache_reset_reuses_buffers_and_gives_the_same_logits():
    model = GPT(GPTConfig.preset("microgpt"), seed=2, dtype="float64")
    cache = KVCache(model.config)
    first, _ = model.forward(np.array([[0, 5, 6]]), kv_cache=cache)
    buffer = cache.keys[0]
    cache.reset()
    assert cache.length == 0
    again, _ = model.forward(np.array([[0, 5, 6]]), kv_cache=cache)
    assert cache.keys[0] is buffer
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))
