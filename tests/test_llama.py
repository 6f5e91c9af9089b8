"""Llama-family models: rotary positions (with Llama 3.1's scaling), the SwiGLU MLP, grouped-query
attention and q/k/v-only biases (Qwen2), from the layer pairs up to whole models.

- each new pair against central differences in float64 on numpy and array-api-strict, and
  against PyTorch autograd;
- whole models against transformers' LlamaForCausalLM / Qwen2ForCausalLM built from random tiny
  configs with the same weights (names mapped here, independently of arraygpt.io.hf.llama):
  logits (float64 1e-10, float32 1e-4), the loss and every gradient (PyTorch autograd);
- the KV cache (n_kv_head heads; cached generation equals recompute, past block_size too),
  parameter counts against transformers', training and exact resume of llama-tiny on names;
- arraygpt.io.hf.llama: arraygpt -> transformers -> arraygpt round trips, sharded files.

transformers computes RMSNorm and the rotary tables in float32 whatever the model's dtype
(LlamaRMSNorm upcasts to float32; the rotary embedding uses float32 inverse frequencies and
angles; its eager attention takes the softmax in float32, so these tests use SDPA). The float64
comparisons therefore patch those two forwards with the same formulas in float64
(``_float64_transformers``); the float32 comparisons run transformers unpatched.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import arraygpt
from arraygpt.config import PRESETS, GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.nn import core, layers
from arraygpt.nn.core import KVCache
from arraygpt.nn.model import GPT
from arraygpt.nn.params import count_params, param_shapes
from arraygpt.xp import load_backend, to_numpy
from test_layers import gradcheck

GRAD_BACKENDS = ["numpy", "array_api_strict"]


@pytest.fixture(params=GRAD_BACKENDS)
def gbackend(request):
    return load_backend(request.param)


def _torch():
    return pytest.importorskip("torch")


def _transformers():
    _torch()
    return pytest.importorskip("transformers")


# ---------------------------------------------------------------------------------------------
# config


def test_defaults_leave_existing_configs_unchanged():
    config = GPTConfig()
    assert (config.position, config.mlp, config.qkv_bias, config.rope_scaling) == ("learned", "standard", False, None)
    assert config.n_kv_head == config.n_head and config.kv_dim == config.attn_dim
    old = {
        k: v
        for k, v in config.to_dict().items()
        if k not in ("position", "rope_theta", "rope_scaling", "n_kv_head", "mlp", "qkv_bias")
    }
    assert GPTConfig.from_dict(old) == config  # a config.json written before these fields loads
    for name in ("gpt2", "microgpt", "shakespeare-char"):
        shapes = param_shapes(GPTConfig.preset(name))
        assert "wpe" in shapes and not any("mlp_gate" in k for k in shapes)


@pytest.mark.parametrize("name", ["smollm2-135m", "llama-3.2-1b", "qwen2.5-0.5b", "llama-tiny"])
def test_llama_configs_round_trip_through_json_and_hash(name):
    config = GPTConfig.preset(name)
    again = GPTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)


def test_rope_scaling_accepts_transformers_dict_and_stores_a_tuple():
    d = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = GPTConfig.preset("llama-tiny", rope_scaling=d)
    assert config.rope_scaling == (32.0, 1.0, 4.0, 8192)
    assert config == GPTConfig.preset("llama-tiny", rope_scaling=[32, 1, 4, 8192])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(n_kv_head=3), "n_kv_head"),  # does not divide n_head=4
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(n_kv_head=8), "n_kv_head"),
        (dict(position="alibi"), "position"),
        (dict(mlp="geglu"), "mlp"),
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(rope_scaling=(8.0, 4.0, 1.0, 8192)), "rope_scaling"),  # low >= high
        (dict(rope_scaling=(8.0, 1.0)), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
        (dict(position="learned", rope_scaling=(8.0, 1.0, 4.0, 8192)), "rope_scaling"),
        (dict(qkv_bias=True, bias=True), "qkv_bias"),
        (dict(qkv_bias=1), "qkv_bias"),
        (dict(head_dim=7), "head_dim"),  # odd head size with RoPE
    ],
)
def test_invalid_combinations_name_the_field(overrides, field):
    with pytest.raises((ValueError, TypeError), match=field):
        GPTConfig.preset("llama-tiny", **overrides)


def test_param_shapes_of_grouped_attention_swiglu_and_qkv_bias():
    config = GPTConfig.preset("llama-tiny", n_layer=1, qkv_bias=True, tie_embeddings=False)
    C, hs, H = 32, 8, 96
    assert param_shapes(config) == {
        "wte": (27, C),
        "lm_head": (27, C),
        "layer0.norm1": (C,),
        "layer0.attn_wq": (4 * hs, C),
        "layer0.attn_wq_b": (4 * hs,),
        "layer0.attn_wk": (2 * hs, C),
        "layer0.attn_wk_b": (2 * hs,),
        "layer0.attn_wv": (2 * hs, C),
        "layer0.attn_wv_b": (2 * hs,),
        "layer0.attn_wo": (C, 4 * hs),
        "layer0.norm2": (C,),
        "layer0.mlp_gate": (H, C),
        "layer0.mlp_up": (H, C),
        "layer0.mlp_down": (C, H),
        "normf": (C,),
    }
    counts = count_params(config).by_category
    assert counts["up_projection"] == 2 * H * C and counts["down_projection"] == C * H
    assert counts["key"] == counts["value"] == 2 * hs * C


# ---------------------------------------------------------------------------------------------
# layers: gradient checks (float64 central differences) on numpy and array-api-strict


def _tables(backend, T, offset, hs, scaling=None, theta=10000.0):
    inv = layers.rope_frequencies(hs, theta, scaling)
    return layers.rope_tables(backend.xp, T, offset, inv, backend.xp.float64, backend.device)


def test_rope_tables_are_the_angles_of_their_positions_whatever_was_asked_before(gbackend):
    """Each call's rows are cos and sin of (offset + t) inv_freq, computed in float64 and rounded
    once: a prompt, then one position at a time (rows of a kept table), past the table's end (a
    larger one), back to the start, and float32 beside float64."""
    inv = layers.rope_frequencies(8, 100.0)
    for T, offset in [(5, 0), (1, 5), (1, 6), (1, 63), (1, 64), (3, 200), (2, 0), (7, 1000)]:
        for dtype, np_dtype in ((gbackend.xp.float64, np.float64), (gbackend.xp.float32, np.float32)):
            cos, sin = layers.rope_tables(gbackend.xp, T, offset, inv, dtype, gbackend.device)
            angle = np.arange(offset, offset + T, dtype=np.float64)[:, None] * np.array(inv)[None, :]
            assert cos.shape == sin.shape == (T, 8) and cos.dtype == dtype
            np.testing.assert_array_equal(to_numpy(cos), np.tile(np.cos(angle), 2).astype(np_dtype))
            np.testing.assert_array_equal(to_numpy(sin), np.tile(np.sin(angle), 2).astype(np_dtype))


@pytest.mark.parametrize("offset", [0, 5])
@pytest.mark.parametrize("scaling", [None, (8.0, 1.0, 4.0, 16)])
def test_rope_gradients(gbackend, offset, scaling):
    rng = np.random.default_rng(3)
    B, T, NH, hs = 2, 5, 3, 8
    cos, sin = _tables(gbackend, T, offset, hs, scaling, theta=100.0)
    gradcheck(
        gbackend,
        lambda x: layers.rope_forward(x, cos, sin),
        lambda dout, cache: {"x": layers.rope_backward(dout, cache)},
        dict(x=rng.standard_normal((B, T, NH * hs))),
        ["x"],
    )


def test_rope_is_a_rotation_that_keeps_relative_positions(gbackend):
    """<rope(q, m), rope(k, n)> depends on m - n only, and norms are kept."""
    rng = np.random.default_rng(4)
    hs = 8
    q, k = rng.standard_normal((1, 1, hs)), rng.standard_normal((1, 1, hs))

    def rotated(x, pos):
        cos, sin = _tables(gbackend, 1, pos, hs)
        return to_numpy(layers.rope_forward(gbackend.asarray(x), cos, sin)[0])

    dots = [float(np.sum(rotated(q, m) * rotated(k, m - 3))) for m in (3, 7, 20)]
    np.testing.assert_allclose(dots, dots[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(rotated(q, 9)), np.linalg.norm(q), rtol=1e-14)


def test_swiglu_gradients(gbackend):
    rng = np.random.default_rng(5)
    args = dict(gate=rng.standard_normal((2, 3, 7)) * 3, up=rng.standard_normal((2, 3, 7)))
    gradcheck(
        gbackend,
        layers.swiglu_forward,
        lambda dout, cache: dict(zip(("gate", "up"), layers.swiglu_backward(dout, cache))),
        args,
        ["gate", "up"],
    )


@pytest.mark.parametrize("n_head, n_kv_head", [(4, 1), (4, 2), (6, 3), (4, 4)])
@pytest.mark.parametrize("T, Tk", [(5, 5), (2, 6), (1, 4)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_grouped_attention_gradients(gbackend, n_head, n_kv_head, T, Tk, dropout_p):
    rng = np.random.default_rng(6)
    B, hs = 2, 3
    coins = gbackend.asarray(rng.uniform(size=(B, n_head, T, Tk)))
    args = dict(
        q=rng.standard_normal((B, T, n_head * hs)),
        k=rng.standard_normal((B, Tk, n_kv_head * hs)),
        v=rng.standard_normal((B, Tk, n_kv_head * hs)),
    )

    def forward(q, k, v):
        return layers.attention_forward(q, k, v, n_head, dropout_p, coins, n_kv_head=n_kv_head)

    def backward(dout, cache):
        assert cache.k.shape[1] == n_kv_head  # the cache keeps only the key/value heads
        return dict(zip("qkv", layers.attention_backward(dout, cache)))

    gradcheck(gbackend, forward, backward, args, ["q", "k", "v"])


def test_grouped_attention_equals_attention_with_repeated_kv_heads(gbackend):
    rng = np.random.default_rng(7)
    B, T, NH, NKV, hs = 2, 4, 6, 2, 3
    q = rng.standard_normal((B, T, NH * hs))
    k, v = rng.standard_normal((B, T, NKV * hs)), rng.standard_normal((B, T, NKV * hs))

    def repeat(x):  # (B, T, NKV*hs) -> (B, T, NH*hs): kv head j serves query heads j*G .. j*G+G-1
        return np.repeat(x.reshape(B, T, NKV, 1, hs), NH // NKV, axis=3).reshape(B, T, NH * hs)

    a = layers.attention_forward(*map(gbackend.asarray, (q, k, v)), NH, n_kv_head=NKV)[0]
    b = layers.attention_forward(*map(gbackend.asarray, (q, repeat(k), repeat(v))), NH)[0]
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=0, atol=1e-14)


def test_grouped_attention_rejects_mismatched_heads():
    xp = load_backend("numpy").xp
    with pytest.raises(ValueError, match="n_kv_head"):
        layers.attention_forward(xp.zeros((1, 2, 12)), xp.zeros((1, 2, 9)), xp.zeros((1, 2, 9)), 4, n_kv_head=3)


def test_encoder_without_position_table_gradients(gbackend):
    rng = np.random.default_rng(8)
    idx = gbackend.asarray(np.array([[1, 3, 1], [0, 3, 3]]))
    out, cache = layers.encoder_forward(idx, gbackend.asarray(rng.standard_normal((5, 4))), None, 2)
    dwte, dwpe = layers.encoder_backward(out, cache)
    assert dwpe is None
    gradcheck(
        gbackend,
        lambda wte: layers.encoder_forward(idx, wte, None),
        lambda dout, cache: {"wte": layers.encoder_backward(dout, cache)[0]},
        dict(wte=rng.standard_normal((5, 4))),
        ["wte"],
    )


def test_reference_kernels_hold_the_new_pairs():
    kernels = core.reference_kernels(GPTConfig.preset("llama-tiny"))
    assert kernels.rope == (layers.rope_forward, layers.rope_backward)
    assert kernels.swiglu == (layers.swiglu_forward, layers.swiglu_backward)
    legacy = core.Kernels(*kernels[:5])  # five fields, as before: the new ones default to the reference
    assert legacy == kernels


# ---------------------------------------------------------------------------------------------
# layers against PyTorch autograd


def _autograd(torch, fn, inputs, dout):
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in inputs]
    out = fn(*ts)
    (out * torch.tensor(dout)).sum().backward()
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


def test_rope_matches_transformers_apply_rotary_pos_emb():
    torch = _torch()
    modeling = _transformers().models.llama.modeling_llama
    rng = np.random.default_rng(9)
    B, T, NH, hs, offset = 2, 6, 3, 8, 4
    xp = load_backend("numpy").xp
    cos, sin = _tables(load_backend("numpy"), T, offset, hs, theta=500.0)
    x, dout = rng.standard_normal((B, T, NH * hs)), rng.standard_normal((B, T, NH * hs))

    def hf(x):  # (B, T, NH*hs) -> transformers' (B, NH, T, hs), rotated, and back
        xh = x.reshape(B, T, NH, hs).transpose(1, 2)
        c, s = torch.tensor(np.asarray(cos))[None], torch.tensor(np.asarray(sin))[None]
        out, _ = modeling.apply_rotary_pos_emb(xh, xh, c, s)
        return out.transpose(1, 2).reshape(B, T, NH * hs)

    want, (dx_want,) = _autograd(torch, hf, [x], dout)
    out, cache = layers.rope_forward(xp.asarray(x), cos, sin)
    np.testing.assert_allclose(np.asarray(out), want, rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.asarray(layers.rope_backward(xp.asarray(dout), cache)), dx_want, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_frequencies_match_transformers(scaling):
    transformers = _transformers()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hs, theta = 64, 500000.0
    cfg = transformers.LlamaConfig(
        hidden_size=hs * 2,
        num_attention_heads=2,
        head_dim=hs,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=256,
    )
    kind = cfg.rope_parameters["rope_type"]
    init = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters
    inv_hf, _ = (init if kind == "default" else ROPE_INIT_FUNCTIONS[kind])(cfg)
    ours = layers.rope_frequencies(
        hs, theta, None if scaling is None else GPTConfig.preset("llama-tiny", rope_scaling=scaling).rope_scaling
    )
    np.testing.assert_allclose(np.array(ours), inv_hf.double().numpy(), rtol=2e-6, atol=0)  # transformers: float32


def test_swiglu_matches_torch_silu_autograd():
    torch = _torch()
    rng = np.random.default_rng(10)
    g, u, dout = (rng.standard_normal((3, 4, 9)) * 4 for _ in range(3))
    g[0, 0, :3] = [-200.0, 200.0, 0.0]  # far tails and zero
    want, (dg_want, du_want) = _autograd(torch, lambda g, u: torch.nn.functional.silu(g) * u, [g, u], dout)
    out, cache = layers.swiglu_forward(g, u)
    dg, du = layers.swiglu_backward(dout, cache)
    for a, b in ((out, want), (dg, dg_want), (du, du_want)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("T, Tk", [(5, 5), (2, 7)])
def test_grouped_attention_matches_torch_sdpa_autograd(T, Tk):
    torch = _torch()
    rng = np.random.default_rng(11)
    B, NH, NKV, hs = 2, 6, 2, 4
    q = rng.standard_normal((B, T, NH * hs))
    k, v = rng.standard_normal((B, Tk, NKV * hs)), rng.standard_normal((B, Tk, NKV * hs))
    dout = rng.standard_normal((B, T, NH * hs))
    mask = torch.ones(T, Tk, dtype=torch.bool).tril(diagonal=Tk - T)  # query t sits at Tk - T + t

    def sdpa(q, k, v):
        heads = lambda x, n: x.reshape(B, x.shape[1], n, hs).transpose(1, 2)  # noqa: E731
        kh, vh = (heads(x, NKV).repeat_interleave(NH // NKV, dim=1) for x in (k, v))
        y = torch.nn.functional.scaled_dot_product_attention(heads(q, NH), kh, vh, attn_mask=mask)
        return y.transpose(1, 2).reshape(B, T, NH * hs)

    want, grads_want = _autograd(torch, sdpa, [q, k, v], dout)
    xp = load_backend("numpy").xp
    y, cache = layers.attention_forward(xp.asarray(q), xp.asarray(k), xp.asarray(v), NH, n_kv_head=NKV)
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-13)
    for got, expected in zip(layers.attention_backward(xp.asarray(dout), cache), grads_want):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# whole models against transformers (names mapped here, independently of interop_llama)

HF_CONFIGS = {
    # GQA (6 heads, 2 key/value heads), tied embeddings
    "llama-gqa-tied": dict(
        kind="llama",
        vocab_size=37,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=100.0,
    ),
    # multi-head (n_kv_head = n_head), untied lm_head, head_dim != hidden/heads
    "llama-mha-untied": dict(
        kind="llama",
        vocab_size=29,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=6,
        tie_word_embeddings=False,
    ),
    # Qwen2: q/k/v biases, GQA with one key/value head
    "qwen2-bias": dict(
        kind="qwen2",
        vocab_size=31,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        rope_theta=1e6,
    ),
    # Llama 3.1 frequency scaling, untied
    "llama3-scaling": dict(
        kind="llama",
        vocab_size=33,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=5e5,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 4,
        },
    ),
}
BLOCK = 12


def _gpt_config(spec):
    spec = dict(spec)
    kind = spec.pop("kind")
    n_head = spec["num_attention_heads"]
    return GPTConfig(
        vocab_size=spec["vocab_size"],
        block_size=BLOCK,
        n_layer=spec["num_hidden_layers"],
        n_head=n_head,
        n_kv_head=spec["num_key_value_heads"],
        n_embd=spec["hidden_size"],
        head_dim=spec.get("head_dim", spec["hidden_size"] // n_head),
        mlp_hidden=spec["intermediate_size"],
        norm="rmsnorm",
        norm_eps=1e-5,
        bias=False,
        qkv_bias=kind == "qwen2",
        tie_embeddings=spec["tie_word_embeddings"],
        position="rope",
        rope_theta=spec.get("rope_theta", 10000.0),
        rope_scaling=spec.get("rope_scaling"),
        mlp="swiglu",
    )


def _hf_model(spec, seed=0):
    """A transformers model of ``spec`` in float64 with random weights of order one."""
    torch, transformers = _torch(), _transformers()
    spec = dict(spec)
    kind = spec.pop("kind")
    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    config = cls[0](**spec, max_position_embeddings=BLOCK, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(seed)
    model = cls[1](config).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.copy_(
                1.0 + 0.1 * noise
                if name.endswith("layernorm.weight") or name == "model.norm.weight"
                else noise * (0.3 if p.ndim == 1 else 1.0 / math.sqrt(p.shape[-1]))
            )
    return model


def _hf_name(name):
    """arraygpt's name -> transformers' (written out here, not taken from interop_llama)."""
    top = {"wte": "model.embed_tokens.weight", "lm_head": "lm_head.weight", "normf": "model.norm.weight"}
    if name in top:
        return top[name]
    layer, short = name.split(".")
    bias = short.endswith("_b")
    short = short[:-2] if bias else short
    hf = {
        "norm1": "input_layernorm",
        "norm2": "post_attention_layernorm",
        "attn_wq": "self_attn.q_proj",
        "attn_wk": "self_attn.k_proj",
        "attn_wv": "self_attn.v_proj",
        "attn_wo": "self_attn.o_proj",
        "mlp_gate": "mlp.gate_proj",
        "mlp_up": "mlp.up_proj",
        "mlp_down": "mlp.down_proj",
    }[short]
    suffix = ".bias" if bias else ".weight"
    return f"model.layers.{layer[5:]}.{hf}{suffix}"


def _arraygpt_of(hf_model, config, dtype):
    hf_state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    model = GPT(config, dtype=dtype, init=False)
    model.load_state_dict({name: hf_state[_hf_name(name)] for name in param_shapes(config)})
    return model


@pytest.fixture
def _float64_transformers(monkeypatch):
    """transformers' RMSNorm and rotary tables computed in the model's dtype (float64) instead of
    float32; the same formulas. The inverse frequencies are transformers' default formula in
    float64, or arraygpt's Llama 3.1 scaling (checked against transformers' in
    test_rope_frequencies_match_transformers)."""
    torch = _torch()
    _transformers()
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    def rms_forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary_forward(self, x, position_ids):
        rope = self.config.rope_parameters
        dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        if rope["rope_type"] == "default":
            inv = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        else:
            scaling = GPTConfig.preset("llama-tiny", rope_scaling=rope).rope_scaling
            inv = torch.tensor(layers.rope_frequencies(dim, rope["rope_theta"], scaling), dtype=torch.float64)
        freqs = position_ids[..., None].to(torch.float64) * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    for module, prefix in ((modeling_llama, "Llama"), (modeling_qwen2, "Qwen2")):
        monkeypatch.setattr(getattr(module, prefix + "RMSNorm"), "forward", rms_forward)
        monkeypatch.setattr(getattr(module, prefix + "RotaryEmbedding"), "forward", rotary_forward)


def _tokens(config, seed=0, B=3, T=BLOCK):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, config.vocab_size, size=(B, T))
    targets = rng.integers(0, config.vocab_size, size=(B, T))
    targets[0, :3] = -1  # ignored positions
    return idx, targets


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / max(1.0, float(np.max(np.abs(b)))))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_loss_and_every_gradient_equal_transformers_float64(name, _float64_transformers):
    torch = _torch()
    spec = HF_CONFIGS[name]
    config = _gpt_config(spec)
    hf = _hf_model(spec)
    model = _arraygpt_of(hf, config, "float64")
    idx, targets = _tokens(config)
    logits_hf = hf(torch.tensor(idx)).logits
    loss_hf = torch.nn.functional.cross_entropy(
        logits_hf.reshape(-1, config.vocab_size), torch.tensor(targets).reshape(-1), ignore_index=-1
    )
    loss_hf.backward()
    logits, loss = model.forward(idx, targets)
    grads = model.backward()
    np.testing.assert_allclose(to_numpy(logits), logits_hf.detach().numpy(), rtol=0, atol=1e-10)
    assert abs(loss - loss_hf.item()) < 1e-12
    hf_params = dict(hf.named_parameters())
    assert len(grads) == len(hf_params)  # every parameter, each once (a tied head is one tensor)
    for name_, g in grads.items():
        want = hf_params[_hf_name(name_)].grad.numpy()
        assert _rel_err(to_numpy(g), want) < 1e-10, f"{name_}: {_rel_err(to_numpy(g), want)}"


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_logits_equal_transformers_float32(name):
    torch = _torch()
    spec = HF_CONFIGS[name]
    config = _gpt_config(spec)
    hf = _hf_model(spec)
    model = _arraygpt_of(hf, config, "float32")
    hf = hf.to(torch.float32)
    idx, _ = _tokens(config)
    logits = to_numpy(model.forward(idx)[0])
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, hf(torch.tensor(idx)).logits.detach().numpy(), rtol=0, atol=1e-4)


def test_llama_tiny_on_array_api_strict_equals_numpy():
    config = GPTConfig.preset("llama-tiny", qkv_bias=True, tie_embeddings=False)
    a = GPT(config, seed=3, dtype="float64", backend="numpy")
    b = GPT(config, seed=3, dtype="float64", backend="array_api_strict")
    idx, targets = _tokens(config, T=config.block_size)
    la, lossa = a.forward(idx, targets)
    lb, lossb = b.forward(idx, targets)
    np.testing.assert_allclose(to_numpy(lb), to_numpy(la), rtol=0, atol=1e-12)
    ga, gb = a.backward(), b.backward()
    for name in ga:
        np.testing.assert_allclose(to_numpy(gb[name]), to_numpy(ga[name]), rtol=0, atol=1e-12)


def test_threads_split_the_batch_of_a_llama_model_like_one_thread():
    config = GPTConfig.preset("llama-tiny")
    idx, targets = _tokens(config, B=4, T=config.block_size)
    one, two = GPT(config, seed=1, dtype="float64", threads=1), GPT(config, seed=1, dtype="float64", threads=2)
    assert abs(one.forward(idx, targets)[1] - two.forward(idx, targets)[1]) < 1e-12
    g1, g2 = one.backward(), two.backward()
    for name in g1:
        np.testing.assert_allclose(to_numpy(g2[name]), to_numpy(g1[name]), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# the KV cache and generation


def test_kv_cache_stores_only_the_key_value_heads():
    config = GPTConfig.preset("llama-tiny", n_kv_head=1)
    model = GPT(config, dtype="float64")
    cache = KVCache(config)
    model.forward(np.array([[1, 2, 3]]), kv_cache=cache)
    assert cache.keys[0].shape == (1, config.block_size, config.head_dim)  # 1 of 4 heads
    assert config.kv_dim * 4 == config.attn_dim


def test_kv_cache_grows_instead_of_reserving_a_long_context():
    config = GPTConfig.preset("llama-tiny", block_size=4096, n_layer=1)
    model = GPT(config, dtype="float64")
    cache = KVCache(config)
    idx = np.random.default_rng(0).integers(0, config.vocab_size, size=(1, 300))
    steps = [to_numpy(model.forward(idx[:, :200], kv_cache=cache)[0])]
    assert cache.keys[0].shape[1] == 256
    for t in range(200, 300):
        steps.append(to_numpy(model.forward(idx[:, t : t + 1], kv_cache=cache)[0]))
    assert cache.keys[0].shape[1] == 512
    np.testing.assert_allclose(np.concatenate(steps, axis=1), to_numpy(model.forward(idx)[0]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("overrides", [dict(), dict(qkv_bias=True, n_kv_head=1), dict(rope_scaling=(4.0, 1.0, 2.0, 4))])
def test_kv_cache_token_by_token_equals_full_forward(overrides):
    config = GPTConfig.preset("llama-tiny", **overrides)
    model = GPT(config, seed=2, dtype="float64")
    idx = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, config.block_size))
    cache = KVCache(config)
    steps = [to_numpy(model.forward(idx[:, :3], kv_cache=cache)[0])]
    for t in range(3, idx.shape[1]):
        steps.append(to_numpy(model.forward(idx[:, t : t + 1], kv_cache=cache)[0]))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), to_numpy(model.forward(idx)[0]), rtol=0, atol=1e-10)


def test_cached_generation_equals_recompute_past_block_size_with_rope():
    """generation.py's decoder: with a cache, once the context outgrows block_size the window is
    rebuilt at positions 0 .. block_size-1, exactly the recompute of that window."""
    from arraygpt.generation.generation import Decoder

    config = GPTConfig.preset("llama-tiny", block_size=6)
    model = GPT(config, seed=4, dtype="float64")
    context = np.random.default_rng(2).integers(0, config.vocab_size, size=(2, 3))
    cached, full = Decoder(model, use_cache=True), Decoder(model, use_cache=False)
    pairs = [(cached.start(context), full.start(context))]
    for t in range(15):
        context = np.concatenate([context, np.array([[t % 7], [(3 * t) % 11]])], axis=1)
        pairs.append((cached.step(context), full.step(context)))
    assert context.shape[1] > 2 * config.block_size and cached.rebuilds > 0
    for a, b in pairs:
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=0, atol=1e-10)
    tokens = list(arraygpt.generate(model, context[0].tolist(), 10, "greedy", use_cache=True))
    assert tokens == list(arraygpt.generate(model, context[0].tolist(), 10, "greedy", use_cache=False))


# ---------------------------------------------------------------------------------------------
# parameter counts


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-360m", "qwen2.5-0.5b", "llama-3.2-1b", "llama-tiny"])
def test_preset_counts_equal_transformers_numel(name):
    torch, transformers = _torch(), _transformers()
    c = GPTConfig.preset(name)
    kw = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.mlp_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head,
        tie_word_embeddings=c.tie_embeddings,
        max_position_embeddings=c.block_size,
    )
    cls = (
        (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)
        if c.qkv_bias
        else (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    )
    with torch.device("meta"):  # shapes only, nothing allocated
        hf = cls[1](cls[0](**kw))
    assert count_params(c).total == sum(p.numel() for p in hf.parameters())


def test_published_sizes_of_the_presets():
    # the sizes these models are known by (their safetensors files' parameter counts)
    sizes = {
        "smollm2-135m": 134_515_008,
        "smollm2-360m": 361_821_120,
        "qwen2.5-0.5b": 494_032_768,
        "llama-3.2-1b": 1_235_814_400,
    }
    assert {name: count_params(GPTConfig.preset(name)).total for name in sizes} == sizes
    assert all(name in PRESETS for name in sizes)


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_random_config_counts_equal_transformers_numel(name):
    hf = _hf_model(HF_CONFIGS[name])
    assert count_params(_gpt_config(HF_CONFIGS[name])).total == sum(p.numel() for p in hf.parameters())


# ---------------------------------------------------------------------------------------------
# training llama-tiny on names


def test_llama_tiny_trains_on_names_and_resumes_bit_identically(tmp_path):
    from arraygpt.manager import get_plugin_manager

    pm = get_plugin_manager(autoload=False)
    opts = dict(
        data="names",
        config="llama-tiny",
        steps=8,
        batch_size=8,
        eval_interval=4,
        eval_batches=1,
        samples=0,
        log_interval=1,
        dropout=0.1,
        progress=False,
        plugin_manager=pm,
    )
    straight = arraygpt.train(out_dir=tmp_path / "a", **opts)
    assert straight.model.config.vocab_size == straight.tokenizer.vocab_size  # the preset's 27 replaced
    assert straight.model.config.position == "rope" and "wpe" not in straight.model.params
    half = arraygpt.train(out_dir=tmp_path / "b", stop_after=4, **opts)
    assert half.step == 4
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    assert resumed.step == 8
    for name, value in straight.model.params.items():
        np.testing.assert_array_equal(to_numpy(resumed.model.params[name]), to_numpy(value), err_msg=name)
    assert resumed.model.config == straight.model.config


def test_cli_trains_the_llama_tiny_preset(tmp_path):
    from arraygpt import cli

    args = [
        "train",
        "--preset",
        "llama-tiny",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--eval-interval",
        "3",
        "--eval-batches",
        "1",
        "--samples",
        "0",
        "--out-dir",
        str(tmp_path / "r"),
        "--quiet",
    ]
    assert cli.main(args) == 0
    config = json.loads((tmp_path / "r" / "last" / "config.json").read_text())
    assert config["position"] == "rope" and config["mlp"] == "swiglu" and config["n_kv_head"] == 2


# ---------------------------------------------------------------------------------------------
# interop_llama: transformers directories both ways


def _random_model(config, seed=0, dtype="float32"):
    model = GPT(config, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed)
    model.load_state_dict({k: rng.standard_normal(v.shape) * 0.5 for k, v in model.state_dict().items()})
    return model


INTEROP_CONFIGS = {
    "llama-tiny": dict(),
    "untied-scaled": dict(tie_embeddings=False, rope_scaling=(8.0, 1.0, 4.0, 4)),
    "qwen2": dict(qkv_bias=True, n_kv_head=1, norm_eps=1e-6, rope_theta=1e6),
    "all-biases": dict(bias=True, n_kv_head=4),
}


@pytest.mark.parametrize("name", list(INTEROP_CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_arraygpt_to_transformers_to_arraygpt_is_bit_identical(tmp_path, name, dtype):
    torch, transformers = _torch(), _transformers()
    from arraygpt.io.hf.llama import load_llama, save_llama

    config = GPTConfig.preset("llama-tiny", **INTEROP_CONFIGS[name])
    model = _random_model(config, dtype=dtype)
    save_llama(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=getattr(torch, dtype))
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM")
    idx, _ = _tokens(config, T=config.block_size)
    if dtype == "float32":  # transformers unpatched (its float32 norms and tables)
        np.testing.assert_allclose(
            hf(torch.tensor(idx)).logits.detach().numpy(), to_numpy(model.forward(idx)[0]), rtol=0, atol=1e-4
        )
    hf.save_pretrained(tmp_path / "again")
    back = load_llama(tmp_path / "again", dtype=dtype)
    assert back.config == config
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(to_numpy(back.params[key]), to_numpy(value), err_msg=key)
    np.testing.assert_array_equal(to_numpy(back.forward(idx)[0]), to_numpy(model.forward(idx)[0]))


def test_load_llama_reads_sharded_files_and_a_tied_copy_of_lm_head_only_when_equal(tmp_path):
    from arraygpt.io.hf.llama import config_to_llama, load_llama, state_dict_to_llama
    from arraygpt.io.safetensors import save_file

    config = GPTConfig.preset("llama-tiny")
    model = _random_model(config, dtype="float64")
    tensors = state_dict_to_llama(model.state_dict(), config)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # some tied files store it twice
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4)  # old files' buffers
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    (tmp_path / "config.json").write_text(json.dumps(config_to_llama(config, "float64")))
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    back = load_llama(tmp_path, dtype="float64")
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(to_numpy(back.params[key]), to_numpy(value), err_msg=key)
    # a different lm_head under tie_word_embeddings: transformers keeps it untied, so it is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((tmp_path / "config.json").read_text())
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1.0}, other / "model.safetensors")
    with pytest.raises(CheckpointError, match="lm_head.weight differs from model.embed_tokens.weight"):
        load_llama(other, dtype="float64")


def test_config_from_llama_reads_published_configs():
    from arraygpt.io.hf.llama import config_from_llama

    llama32 = {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }
    assert config_from_llama(llama32) == GPTConfig.preset("llama-3.2-1b")
    qwen = {
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    assert config_from_llama(qwen) == GPTConfig.preset("qwen2.5-0.5b")
    smollm = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
        "hidden_act": "silu",
        "rope_scaling": None,
    }
    assert config_from_llama(smollm) == GPTConfig.preset("smollm2-135m")
    v5 = {**smollm, "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
    del v5["rope_theta"]
    assert config_from_llama(v5) == GPTConfig.preset("smollm2-135m")  # transformers 5's spelling


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "model_type"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
        (dict(model_type="mistral", sliding_window=4), "sliding_window"),
    ],
)
def test_config_from_llama_refuses_what_arraygpt_does_not_implement(change, message):
    from arraygpt.io.hf.llama import config_from_llama

    base = {
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "max_position_embeddings": 8,
        "vocab_size": 11,
    }
    with pytest.raises(CheckpointError, match=message):
        config_from_llama({**base, **change})


def test_mistral_directories_load(tmp_path):
    torch, transformers = _torch(), _transformers()
    from arraygpt.io.hf.llama import load_llama, save_llama

    config = GPTConfig.preset("llama-tiny", tie_embeddings=False)
    model = _random_model(config)
    save_llama(model, tmp_path, model_type="mistral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(hf).__name__ == "MistralForCausalLM"
    idx, _ = _tokens(config, T=config.block_size)
    np.testing.assert_allclose(
        hf(torch.tensor(idx)).logits.detach().numpy(), to_numpy(model.forward(idx)[0]), rtol=0, atol=1e-4
    )
    assert load_llama(tmp_path).config == config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(position="learned"), "position"),
        (dict(mlp="standard"), "mlp"),
        (dict(norm="layernorm"), "norm"),
        (dict(n_embd=50, n_head=4, n_kv_head=2, head_dim=16), "n_embd"),  # transformers' LlamaConfig refuses it
    ],
)
def test_save_llama_names_the_field_it_cannot_hold(tmp_path, overrides, field):
    from arraygpt.io.hf.llama import save_llama

    config = dataclasses.replace(GPTConfig.preset("llama-tiny"), **overrides)
    with pytest.raises(ValueError, match=field):
        save_llama(GPT(config), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_a_bfloat16_directory_written_by_transformers_loads_widened(tmp_path):
    torch = _torch()
    from arraygpt.io.hf.llama import load_llama

    spec = HF_CONFIGS["qwen2-bias"]
    hf = _hf_model(spec).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    model = load_llama(tmp_path, dtype="float32")
    config = _gpt_config(spec)
    assert model.config == dataclasses.replace(config, init_std=hf.config.initializer_range, init_output="normal")
    for name in param_shapes(config):
        want = hf.state_dict()[_hf_name(name)].float().numpy()
        np.testing.assert_array_equal(to_numpy(model.params[name]), want, err_msg=name)


def test_causal_outputs_ignore_later_tokens_with_rope_and_grouped_heads():
    config = GPTConfig.preset("llama-tiny", n_kv_head=1, qkv_bias=True)
    model = GPT(config, seed=5, dtype="float64")
    idx = np.random.default_rng(3).integers(0, config.vocab_size, size=(1, config.block_size))
    changed = idx.copy()
    changed[0, 9:] = (changed[0, 9:] + 1) % config.vocab_size
    a, b = to_numpy(model.forward(idx)[0]), to_numpy(model.forward(changed)[0])
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-6


def test_save_as_llama_writes_a_llama_directory_for_a_rotary_config(tmp_path):
    model = GPT(GPTConfig.preset("llama-tiny"), seed=1, dtype="float64")
    arraygpt.save(model, tmp_path, format="llama")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    again = arraygpt.load(tmp_path, dtype="float64").model
    idx = np.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(to_numpy(again.forward(idx)[0]), to_numpy(model.forward(idx)[0]))


# ---------------------------------------------------------------------------------------------
# hostile or malformed Llama-family directories (issue 21, finding 3): one CheckpointError naming
# the file and the field, read by the same directory reader as GPT-2's

_BASE = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 8,
    "vocab_size": 11,
}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
        (dict(num_attention_heads=0), "num_attention_heads must be a positive integer"),
        (dict(num_key_value_heads=0), "num_key_value_heads must be null or a positive integer"),
        (dict(num_key_value_heads=3), r"num_attention_heads \(2\) is not a multiple of num_key_value_heads \(3\)"),
        (dict(rope_scaling="llama3"), "rope_scaling must be null or a JSON object"),
        (dict(rope_scaling=["llama3", 8.0]), "rope_scaling must be null or a JSON object"),
        (dict(rope_parameters="default"), "rope_parameters must be null or a JSON object"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling lacks 'low_freq_factor'"),
        (
            dict(
                rope_scaling=dict(
                    rope_type="llama3",
                    factor="8",
                    low_freq_factor=1,
                    high_freq_factor=4,
                    original_max_position_embeddings=4,
                )
            ),
            "rope_scaling's factor must be a number",
        ),
        (dict(model_type="mistral", sliding_window="4096"), "sliding_window must be null or a positive integer"),
        (dict(max_position_embeddings="8"), "max_position_embeddings must be a positive integer"),
        (dict(rope_theta="abc"), "rope_theta must be a number > 0, not 'abc'"),
        (dict(rope_theta=0), "rope_theta must be a number > 0"),
        (dict(rms_norm_eps=None, hidden_size=1.5), "hidden_size must be a positive integer"),
        (dict(num_hidden_layers=True), "num_hidden_layers must be a positive integer"),
        (dict(attention_bias="no"), "attention_bias must be true or false"),
        (dict(hidden_size=15), r"hidden_size \(15\) is not divisible by num_attention_heads \(2\)"),
    ],
)
def test_config_fields_of_the_wrong_type_name_the_file_and_the_field(change, message):
    from arraygpt.io.hf.llama import config_from_llama

    with pytest.raises(CheckpointError, match=rf"^some/config\.json: {message}"):
        config_from_llama({**_BASE, **change}, source="some/config.json")


def _sharded_llama_dir(directory, split):
    """A llama-tiny directory in two shards: ``split(names)`` -> the names each shard holds."""
    from arraygpt.io.hf.llama import config_to_llama, state_dict_to_llama
    from arraygpt.io.safetensors import save_file

    config = GPTConfig.preset("llama-tiny")
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(v).astype(np.float32) for k, v in param_shapes(config).items()}
    tensors = state_dict_to_llama(tensors, config)
    names = sorted(tensors)
    first, second = split(names)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config_to_llama(config)))
    save_file({k: tensors[k] for k in first}, directory / "a.safetensors")
    save_file({k: tensors[k] for k in second}, directory / "b.safetensors")
    weight_map = {**{k: "b.safetensors" for k in second}, **{k: "a.safetensors" for k in first}}  # first wins
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return names


def test_a_tensor_repeated_in_a_second_shard_is_refused_not_overwritten(tmp_path):
    from arraygpt.io.hf.llama import load_llama

    names = _sharded_llama_dir(tmp_path / "d", lambda n: (n[: len(n) // 2], n[len(n) // 2 - 1 :]))
    repeated = names[len(names) // 2 - 1]
    with pytest.raises(
        CheckpointError, match=rf"tensor '{repeated}' is in two shards, a.safetensors and b.safetensors"
    ):
        load_llama(tmp_path / "d")


@pytest.mark.parametrize(
    "weight_map, message",
    [
        ({"model.norm.weight": 7}, r"weight_map maps tensor 'model.norm.weight' to 7; a shard must be a plain file"),
        (["a.safetensors"], "'weight_map' must be a non-empty JSON object"),
        ({"model.norm.weight": "../a.safetensors"}, "a shard must be a plain file name"),
        ({}, "'weight_map' must be a non-empty JSON object"),
    ],
)
def test_a_malformed_shard_index_is_one_error_naming_it(tmp_path, weight_map, message):
    from arraygpt.io.hf.llama import load_llama

    _sharded_llama_dir(tmp_path / "d", lambda n: (n[:3], n[3:]))
    (tmp_path / "d" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json: .*{message}"):
        load_llama(tmp_path / "d")


def test_a_fifo_in_place_of_the_weights_is_refused_without_blocking(tmp_path):
    import os

    from arraygpt.io.hf.llama import config_to_llama, load_llama

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    (tmp_path / "config.json").write_text(json.dumps(config_to_llama(GPTConfig.preset("llama-tiny"))))
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"model.safetensors: the .* is a FIFO \(named pipe\), not a regular file"
    ):
        load_llama(tmp_path)


def test_pickle_weights_are_refused_with_the_command_that_converts_them(tmp_path):
    from arraygpt.io.hf.llama import config_to_llama, load_llama

    (tmp_path / "config.json").write_text(json.dumps(config_to_llama(GPTConfig.preset("llama-tiny"))))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    with pytest.raises(CheckpointError, match=r"(?s)pickle weights \(pytorch_model.bin\).*save_pretrained"):
        load_llama(tmp_path)


def test_a_config_claiming_a_billion_layers_is_refused_fast(tmp_path):
    import time

    from arraygpt.io.hf.llama import config_to_llama, load_llama, state_dict_to_llama
    from arraygpt.io.safetensors import save_file

    config = GPTConfig.preset("llama-tiny")
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(v).astype(np.float32) for k, v in param_shapes(config).items()}
    save_file(state_dict_to_llama(tensors, config), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config_to_llama(config), "num_hidden_layers": 10**9}))
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=r"claims num_hidden_layers=1000000000, the file holds 2 layer"):
        load_llama(tmp_path)
    assert time.monotonic() - start < 5


_L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_OLD_LENGTH_2 = {"original_max_position_embeddings": 2}  # top-level, as Phi-3 writes it


@pytest.mark.parametrize(
    "model_type, edit",
    [
        # the legacy rope_scaling wins over rope_parameters, as transformers reads them
        ("llama", {"rope_parameters": {**_L3, "rope_theta": 50.0, "original_max_position_embeddings": 8}}),
        ("llama", {"rope_scaling": {"rope_type": "default"}, "rope_parameters": {**_L3, "rope_theta": 50.0}}),
        # a top-level original_max_position_embeddings goes first; without any, max_position_embeddings
        ("llama", {"rope_scaling": {**_L3, "original_max_position_embeddings": 8}, **_OLD_LENGTH_2}),
        ("llama", {"rope_scaling": dict(_L3), "rope_theta": 50.0}),
        # null key/value heads: as many as the query heads
        ("qwen2", {"num_key_value_heads": None}),
        # a window no layer slides under: layers from max_window_layers on, or as layer_types names them
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 28}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["full_attention"] * 2}),
    ],
)
def test_config_fields_are_resolved_as_transformers_resolves_them(tmp_path, model_type, edit, _float64_transformers):
    torch = _torch()
    import transformers

    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[model_type]
    torch.manual_seed(0)
    hf_config = config_class(
        vocab_size=32,
        hidden_size=48,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4 if "num_key_value_heads" in edit else 2,  # null: the weights of 4
        max_position_embeddings=16,
    )
    transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float64).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids = [[1, 5, 9, 3, 7, 2, 11, 4, 8, 6, 10, 0, 12, 13, 14, 15]]
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = to_numpy(arraygpt.load(tmp_path, dtype="float64").model.forward(ids)[0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
