"""Presets and parameter counts: the microgpt table, GPT-2 (against the Hugging Face formula), GPT-3's
Table 2.1 taken literally, nanoGPT's shakespeare-char. tests/test_counts.py checks the counts
against hand-derived arithmetic, transformers and the GPT-3 paper's sizes."""

from __future__ import annotations

import dataclasses
import json

import pytest

from arraygpt import GPTConfig, count_params
from arraygpt.config import PRESETS

CATEGORIES = [
    "embedding",
    "key",
    "query",
    "value",
    "output",
    "up_projection",
    "down_projection",
    "unembedding",
    "other",
]
SEED_CATEGORIES = CATEGORIES[:-1]  # the eight matrix categories of the GPT-3 tallies


# ---------------------------------------------------------------------------------------------
# presets


def test_microgpt_preset_follows_its_parameter_table():
    c = GPTConfig.preset("microgpt")
    assert (c.n_embd, c.n_layer, c.n_head, c.head_dim, c.block_size, c.vocab_size) == (16, 1, 4, 4, 8, 27)
    assert c.mlp_hidden == 64
    assert c.norm == "rmsnorm" and not c.norm_affine and c.norm_emb and not c.norm_final
    assert not c.bias and c.activation == "relu" and not c.tie_embeddings
    assert c.init_std == 0.02 and c.init_output == "zero"


def test_microgpt_count_is_its_table_tally():
    # microgpt's parameter table: wte 27x16=432, wpe 8x16=128, QKV 3x16x16=768, output 256, MLP 1024 + 1024, lm_head 432
    counts = count_params(GPTConfig.preset("microgpt"))
    assert counts.total == 432 + 128 + 768 + 256 + 1024 + 1024 + 432
    assert counts.by_name == {
        "wte": 432,
        "wpe": 128,
        "lm_head": 432,
        "layer0.attn_wq": 256,
        "layer0.attn_wk": 256,
        "layer0.attn_wv": 256,
        "layer0.attn_wo": 256,
        "layer0.mlp_fc1": 1024,
        "layer0.mlp_fc2": 1024,
    }


GPT2_FAMILY = {
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


@pytest.mark.parametrize("name", sorted(GPT2_FAMILY))
def test_gpt2_presets(name):
    c = GPTConfig.preset(name)
    assert (c.n_layer, c.n_head, c.n_embd) == GPT2_FAMILY[name]
    assert (c.vocab_size, c.block_size) == (50257, 1024)
    assert c.norm == "layernorm" and c.norm_eps == 1e-5 and c.norm_affine and c.bias and c.norm_final
    assert not c.norm_emb
    assert c.activation == "gelu_tanh" and c.tie_embeddings
    assert c.head_dim * c.n_head == c.n_embd and c.mlp_hidden == 4 * c.n_embd


def test_gpt2_total_is_124439808():
    assert count_params(GPTConfig.preset("gpt2")).total == 124_439_808


def _hf_gpt2_formula(V, P, L, C):
    """Hugging Face GPT2LMHeadModel's parameter count: wte + wpe + L blocks (ln_1, c_attn (C, 3C) + 3C,
    c_proj, ln_2, c_fc, c_proj) + ln_f; lm_head is tied to wte."""
    block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    return V * C + P * C + L * block + 2 * C


@pytest.mark.parametrize("name", sorted(GPT2_FAMILY))
def test_gpt2_family_counts_match_the_hugging_face_formula(name):
    L, _, C = GPT2_FAMILY[name]
    assert count_params(GPTConfig.preset(name)).total == _hf_gpt2_formula(50257, 1024, L, C)


# GPT-3 paper, Table 2.1: n_layer, d_model, n_heads, d_head
GPT3_TABLE = {
    "gpt3-small": (12, 768, 12, 64),
    "gpt3-medium": (24, 1024, 16, 64),
    "gpt3-large": (24, 1536, 16, 96),
    "gpt3-xl": (24, 2048, 24, 128),
    "gpt3-2.7b": (32, 2560, 32, 80),
    "gpt3-6.7b": (32, 4096, 32, 128),
    "gpt3-13b": (40, 5140, 40, 128),
    "gpt3-175b": (96, 12288, 96, 128),
}


@pytest.mark.parametrize("name", sorted(GPT3_TABLE))
def test_gpt3_presets_follow_table_2_1_literally(name):
    c = GPTConfig.preset(name)
    assert (c.n_layer, c.n_embd, c.n_head, c.head_dim) == GPT3_TABLE[name]
    assert (c.vocab_size, c.block_size) == (50257, 2048)
    assert c.tie_embeddings and c.norm == "layernorm" and c.activation == "gelu_tanh" and c.bias
    assert c.mlp_hidden == 4 * c.n_embd
    assert c.attn_dim == c.n_head * c.head_dim


def test_gpt3_columns_that_disagree_are_kept():
    xl, b13 = GPTConfig.preset("gpt3-xl"), GPTConfig.preset("gpt3-13b")
    assert xl.attn_dim == 24 * 128 == 3072 and xl.n_embd == 2048
    assert b13.attn_dim == 40 * 128 == 5120 and b13.n_embd == 5140
    by_name = count_params(xl).by_name
    assert by_name["layer0.attn_wq"] == 3072 * 2048 and by_name["layer0.attn_wo"] == 2048 * 3072


def test_shakespeare_char_preset():
    c = GPTConfig.preset("shakespeare-char")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (6, 6, 384, 256, 65)
    # nanoGPT prints "number of parameters: 10.65M" for this config (it leaves out wpe)
    counts = count_params(c)
    assert round((counts.total - counts.by_name["wpe"]) / 1e6, 2) == 10.65


def test_every_preset_builds_and_overrides_apply():
    assert {"microgpt", "shakespeare-char", *GPT2_FAMILY, *GPT3_TABLE} <= set(PRESETS)
    for name in PRESETS:
        c = GPTConfig.preset(name, n_layer=1)
        assert c.n_layer == 1
        assert GPTConfig.from_dict(c.to_dict()) == c
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPTConfig.preset("gpt2").n_layer = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# count_params


def test_tied_unembedding_is_tallied_but_not_in_total():
    tied = GPTConfig.preset("gpt2", n_layer=2)
    untied = GPTConfig.preset("gpt2", n_layer=2, tie_embeddings=False)
    t, u = count_params(tied), count_params(untied)
    assert "lm_head" not in t.by_name and u.by_name["lm_head"] == 50257 * 768
    assert t.by_category["unembedding"] == u.by_category["unembedding"] == 50257 * 768
    assert u.total - t.total == 50257 * 768


def test_gpt3_175b_matches_the_published_tally():
    counts = count_params(GPTConfig.preset("gpt3-175b"))
    cat = counts.by_category
    # the GPT-3 walk-through's tally: vocabulary 50,257, embedding dimension 12,288, 96 layers
    V, C, L = 50_257, 12_288, 96
    assert cat["embedding"] == cat["unembedding"] == V * C  # "about 617 million weights"
    assert round(cat["embedding"] / 1e6) == 618 and 617e6 < cat["embedding"] < 618e6
    for kind in ("key", "query", "value", "output"):
        assert cat[kind] == L * C * C
    attention = cat["key"] + cat["query"] + cat["value"] + cat["output"]
    assert 57e9 < attention < 58e9  # "just under 58 billion parameters devoted to all attention heads"
    assert cat["up_projection"] == cat["down_projection"] == L * 4 * C * C
    assert sum(cat[k] for k in SEED_CATEGORIES) == 175_181_291_520
    assert counts.total == sum(counts.by_name.values())
    assert counts.total == 175_181_291_520 - V * C + cat["other"]  # tied: the unembedding is wte


# ---------------------------------------------------------------------------------------------
# derived fields follow the fields they derive from, on every path that builds a config from another


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"n_embd": 128, "n_head": 4}, {"head_dim": 32, "mlp_hidden": 512, "n_kv_head": 4}),
        ({"n_head": 6}, {"head_dim": 128, "n_kv_head": 6}),
        ({"n_embd": 96}, {"head_dim": 8, "mlp_hidden": 384}),
    ],
)
def test_replace_derives_head_dim_mlp_hidden_and_n_kv_head_again(changes, expected):
    base = GPTConfig.preset("gpt2")
    for start in (base, GPTConfig.from_dict(json.loads(json.dumps(base.to_dict())))):
        changed = dataclasses.replace(start, **changes)
        assert {name: getattr(changed, name) for name in expected} == expected


def test_a_field_that_was_set_stays_set_through_replace():
    grouped = GPTConfig(n_head=8, n_embd=64, n_kv_head=2, head_dim=16, mlp_hidden=100)
    changed = dataclasses.replace(grouped, n_layer=3)
    assert (changed.n_kv_head, changed.head_dim, changed.mlp_hidden) == (2, 16, 100)
    with pytest.raises(ValueError, match="n_kv_head must be a positive integer that divides n_head \\(9\\), got 2"):
        dataclasses.replace(grouped, n_head=9)  # 2 was given, so it does not follow n_head
    loaded = GPTConfig.from_dict(json.loads(json.dumps(grouped.to_dict())))
    assert loaded == grouped and dataclasses.replace(loaded, n_layer=3).n_kv_head == 2


def test_preset_overrides_and_the_smollm_preset_derive_the_same_way():
    smol = GPTConfig.preset("smollm2-135m")
    assert dataclasses.replace(smol, n_head=4, n_kv_head=None).n_kv_head == 4
    assert GPTConfig.preset("gpt2", n_head=4).n_kv_head == 4
