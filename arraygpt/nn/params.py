"""Parameter names, shapes and counts of a config: the single source of the state dict's names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from arraygpt.config import GPTConfig
from arraygpt.nn import quant
from arraygpt.nn.core import GATE_UP, QKV

__all__ = ["CATEGORIES", "ParamCount", "count_params", "fuse", "param_shapes"]


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in initialization order. The single source of truth for
    the state dict, the initializer and ``count_params``."""
    C, D, Dkv, H, V = config.n_embd, config.attn_dim, config.kv_dim, config.mlp_hidden, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte": (V, C)}
    if config.position == "learned":
        shapes["wpe"] = (config.block_size, C)
    if not config.tie_embeddings:
        shapes["lm_head"] = (V, C)

    def norm(name: str) -> None:
        if config.norm_affine:
            shapes[name] = (C,)
            if config.bias and config.norm == "layernorm":
                shapes[name + "_b"] = (C,)

    def linear(name: str, n_out: int, n_in: int, bias: bool = config.bias) -> None:
        shapes[name] = (n_out, n_in)
        if bias:
            shapes[name + "_b"] = (n_out,)

    if config.norm_emb:
        norm("norm_emb")
    for i in range(config.n_layer):
        norm(f"layer{i}.norm1")
        for w, width in (("attn_wq", D), ("attn_wk", Dkv), ("attn_wv", Dkv)):
            linear(f"layer{i}.{w}", width, C, config.bias or config.qkv_bias)
        linear(f"layer{i}.attn_wo", C, D)
        norm(f"layer{i}.norm2")
        if config.mlp == "swiglu":
            linear(f"layer{i}.mlp_gate", H, C)
            linear(f"layer{i}.mlp_up", H, C)
            linear(f"layer{i}.mlp_down", C, H)
        else:
            linear(f"layer{i}.mlp_fc1", H, C)
            linear(f"layer{i}.mlp_fc2", C, H)
    if config.norm_final:
        norm("normf")
    return shapes


CATEGORIES = (
    "embedding",
    "key",
    "query",
    "value",
    "output",
    "up_projection",
    "down_projection",
    "unembedding",
    "other",
)
_CATEGORY_OF = {
    "wte": "embedding",
    "attn_wk": "key",
    "attn_wq": "query",
    "attn_wv": "value",
    "attn_wo": "output",
    "mlp_fc1": "up_projection",
    "mlp_fc2": "down_projection",
    "lm_head": "unembedding",
    "mlp_gate": "up_projection",
    "mlp_up": "up_projection",
    "mlp_down": "down_projection",
}


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of a config.

    Attributes:
        total: every distinct parameter once (a tied unembedding is not counted again).
        by_name: state-dict name -> number of parameters.
        by_category: the eight matrix categories of the GPT-3 tallies plus ``other`` (positions,
            norms, biases). ``unembedding`` is the unembedding matrix's size even when it is tied.
    """

    total: int
    by_name: dict[str, int]
    by_category: dict[str, int]


def count_params(config: GPTConfig) -> ParamCount:
    """Count parameters from shapes alone, without allocating (instant even for gpt3-175b)."""
    by_name = {name: math.prod(shape) for name, shape in param_shapes(config).items()}
    by_category = dict.fromkeys(CATEGORIES, 0)
    for name, n in by_name.items():
        by_category[_CATEGORY_OF.get(name.rsplit(".", 1)[-1], "other")] += n
    if config.tie_embeddings:
        by_category["unembedding"] = config.vocab_size * config.n_embd
    return ParamCount(total=sum(by_name.values()), by_name=by_name, by_category=by_category)


def fuse(params: dict[str, Any], n_layer: int, xp: Any) -> dict[str, Any]:
    """The GPT's fused storage, the one place it is defined: each layer's query, key and value weights
    live in one (D + 2 Dkv, C) buffer ``layer{i}.attn_wqkv`` (biases in one ``attn_wqkv_b``;
    D = n_head * head_dim, Dkv = n_kv_head * head_dim, so the parts are unequal under
    grouped-query attention), a SwiGLU MLP's gate and up weights in one (2H, C) buffer
    ``layer{i}.mlp_gate_up``, and ``params[...attn_wq]`` etc. are views of them, so each
    projection is one matmul with no per-step concatenation. The core finds the buffers by
    those names; the state dict does not list them. Parameters must therefore be updated in
    place (``p -= ...``, ``p[...] = ...``), as the optimizers and ``load_state_dict`` do.

    ``params``' entries are replaced by the views, in place. Returns the dict the core reads: the
    parameters plus the fused buffers."""
    core_params = dict(params)
    for i in range(n_layer):
        for fused, parts in (("attn_wqkv", QKV), ("mlp_gate_up", GATE_UP)):
            for suffix in ("", "_b"):
                names = [f"layer{i}.{part}{suffix}" for part in parts]
                if names[0] not in params:
                    continue
                values = [params[name] for name in names]
                widths = [value.shape[0] for value in values]
                if any(quant.is_quantized(value) for value in values):  # GGUF blocks: rows stack as they are
                    if not all(isinstance(value, quant.QuantizedWeight) for value in values):
                        raise ValueError(f"{', '.join(names)}: all quantized or none (a GPT fuses them)")
                    buffer = quant.concat_rows(values)
                    views = quant.split_rows(buffer, widths)
                else:
                    buffer = xp.concat(values)  # (sum of widths, C) or (sum,)
                    starts = [sum(widths[:j]) for j in range(len(widths))]
                    views = [buffer[a : a + width, ...] for a, width in zip(starts, widths)]
                for name, view in zip(names, views):
                    params[name] = core_params[name] = view
                core_params[f"layer{i}.{fused}{suffix}"] = buffer
    return core_params
