"""Llama-family checkpoints (Llama 2/3, Qwen2/2.5, SmolLM2, Mistral) in the Hugging Face
transformers layout, both ways.

A transformers directory holds ``config.json`` (``model_type`` ``llama``, ``qwen2`` or ``mistral``)
and ``model.safetensors`` or a sharded ``model.safetensors.index.json``. Its tensors map onto
arraygpt's names one to one; every weight is already stored (out, in) as an ``nn.Linear``, and
the rotary embedding uses transformers' rotate_half layout, which is the layout of
``arraygpt.nn.layers.rope_forward``, so nothing is transposed or permuted:

    transformers (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)   arraygpt
    model.embed_tokens.weight                       (V, C)                  wte
    model.layers.{i}.input_layernorm.weight         (C,)                    layer{i}.norm1
    model.layers.{i}.self_attn.q_proj.weight / .bias (NH*hs, C)             layer{i}.attn_wq / attn_wq_b
    model.layers.{i}.self_attn.k_proj.weight / .bias (NKV*hs, C)            layer{i}.attn_wk / attn_wk_b
    model.layers.{i}.self_attn.v_proj.weight / .bias (NKV*hs, C)            layer{i}.attn_wv / attn_wv_b
    model.layers.{i}.self_attn.o_proj.weight / .bias (C, NH*hs)             layer{i}.attn_wo / attn_wo_b
    model.layers.{i}.post_attention_layernorm.weight (C,)                   layer{i}.norm2
    model.layers.{i}.mlp.gate_proj.weight / .bias   (H, C)                  layer{i}.mlp_gate / mlp_gate_b
    model.layers.{i}.mlp.up_proj.weight / .bias     (H, C)                  layer{i}.mlp_up / mlp_up_b
    model.layers.{i}.mlp.down_proj.weight / .bias   (C, H)                  layer{i}.mlp_down / mlp_down_b
    model.norm.weight                               (C,)                    normf
    lm_head.weight                                  (V, C)                  lm_head (untied only; tied: wte)

Biases: Qwen2 has them on q/k/v only (``GPTConfig.qkv_bias``); Llama's ``attention_bias`` and
``mlp_bias`` together are ``GPTConfig.bias``. The config maps as

    hidden_size -> n_embd, intermediate_size -> mlp_hidden, num_hidden_layers -> n_layer,
    num_attention_heads -> n_head, num_key_value_heads -> n_kv_head, head_dim -> head_dim,
    max_position_embeddings -> block_size, rms_norm_eps -> norm_eps, rope_theta -> rope_theta,
    rope_scaling (rope_type "llama3") -> rope_scaling, tie_word_embeddings -> tie_embeddings,
    initializer_range -> init_std

(transformers 5's ``rope_parameters`` is read as well). A tied file that also stores
``lm_head.weight`` is accepted (the copy is ignored), and the ``rotary_emb.inv_freq`` buffers of
old files are skipped.

Every field is checked for its JSON type and range first ("false" is not false, 0 heads is not a
head count), and the message names the file and the field. The directory (config.json, the
weights or the shard index, pickle refusal) is read by ``arraygpt.io.hf.reader``, as GPT-2's is.

Deliberately not here: downloads, sliding-window attention (Mistral v0.1's 4096 window is refused
unless it covers block_size), RoPE scalings other than Llama 3.1's, and any runtime dependency on
transformers or torch. Tokenizers (the directory's ``tokenizer.json``, with BOS/EOS from
``tokenizer_config.json`` and ``config.json``): ``arraygpt.io.bpe.load_hf_tokenizer``, which
``arraygpt.load`` calls.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.config import ROPE_SCALING_KEYS, GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io.files import CONFIG_FILE, WEIGHTS_FILE, write_atomic
from arraygpt.io.hf.reader import read_config, read_tensors
from arraygpt.io.safetensors import save_file
from arraygpt.nn.model import GPT
from arraygpt.nn.params import param_shapes
from arraygpt.xp import to_numpy

__all__ = [
    "MODEL_TYPES",
    "config_from_llama",
    "config_to_llama",
    "load_llama",
    "save_llama",
    "state_dict_from_llama",
    "state_dict_to_llama",
]

MODEL_TYPES = ("llama", "qwen2", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}

# transformers' defaults (LlamaConfig, Qwen2Config, MistralConfig) for keys a config.json may omit
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        use_sliding_window=False,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        sliding_window=4096,
    ),
}


# ----------------------------------------------------------------------------------------------
# config.json <-> GPTConfig


def _rope_settings(hf: Mapping[str, Any], source: str) -> tuple[float, tuple[float, float, float, int] | None]:
    """(rope_theta, rope_scaling) as transformers 5 resolves them (``convert_rope_params_to_dict``,
    ``standardize_rope_params``): the legacy ``rope_scaling`` if set, else ``rope_parameters``; its
    ``rope_theta``, else the top-level one; for Llama 3.1's scaling, a top-level
    ``original_max_position_embeddings`` first, else its own, else ``max_position_embeddings``."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", legacy)):
        if value is not None and not isinstance(value, Mapping):
            raise CheckpointError(
                f"{source}: {name} must be null or a JSON object such as "
                f'{{"rope_type": "llama3", "factor": 8.0, ...}}, not {value!r:.80}'
            )
    rope = dict(legacy or params or {})
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if kind != "default":
        if kind != "llama3":
            raise CheckpointError(
                f"{source}: rope_scaling of type {kind!r:.60} is not supported; "
                "arraygpt implements Llama 3.1's 'llama3'"
            )
        if hf.get("original_max_position_embeddings") is not None:  # transformers gives it priority (Phi-3)
            rope["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
        missing = [key for key in ROPE_SCALING_KEYS if key not in rope]
        if missing:
            raise CheckpointError(f"{source}: rope_scaling lacks {', '.join(map(repr, missing))}")
        for key in ROPE_SCALING_KEYS:
            if not _is_number(rope[key]):
                raise CheckpointError(f"{source}: rope_scaling's {key} must be a number, not {rope[key]!r:.80}")
        scaling = tuple(rope[key] for key in ROPE_SCALING_KEYS)
    if theta is None:
        theta = 10000.0
    if not _is_number(theta) or not theta > 0:
        raise CheckpointError(f"{source}: rope_theta must be a number > 0, not {theta!r:.80}")
    return float(theta), scaling


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_COUNTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
_OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "sliding_window")  # null: not set
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
_NUMBERS = ("rms_norm_eps", "initializer_range")


def _check_types(c: Mapping[str, Any], source: str) -> None:
    """Strict JSON types, as transformers' configs hold them: "false" is not false, 0 heads is not a
    head count, "4096" is not a window."""

    def bad(name: str, allowed: str) -> CheckpointError:
        return CheckpointError(f"{source}: {name} must be {allowed}, not {c[name]!r:.80}")

    for name in _COUNTS:
        if not _is_count(c.get(name)):
            raise bad(name, "a positive integer")
    for name in _OPTIONAL_COUNTS:
        if c.get(name) is not None and not _is_count(c[name]):
            raise bad(name, "null or a positive integer")
    for name in _BOOLS:
        if name in c and not isinstance(c[name], bool):
            raise bad(name, "true or false (a JSON boolean)")
    for name in _NUMBERS:
        if not _is_number(c.get(name)) or c[name] < 0:
            raise bad(name, "a number >= 0")
    if not isinstance(c.get("hidden_act"), str):
        raise bad("hidden_act", "'silu'")


def config_from_llama(hf: Mapping[str, Any], source: str = CONFIG_FILE) -> GPTConfig:
    """The GPTConfig of a transformers Llama, Qwen2 or Mistral ``config.json`` (as a dict).

    Raises:
        CheckpointError: another model type, a field of the wrong JSON type or out of range, or an
            option arraygpt does not implement (the message names the file and the field).
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r:.80} is not one of {', '.join(MODEL_TYPES)}")
    kept = ("sliding_window", "num_key_value_heads")  # null means something: no window, as many as the heads
    c = {**_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k in kept}}
    _check_types(c, source)
    if c["hidden_act"] != "silu":
        raise CheckpointError(f"{source}: hidden_act {c['hidden_act']!r:.80}; arraygpt's SwiGLU uses 'silu'")
    block_size = c["max_position_embeddings"]
    window = c.get("sliding_window")
    uses_window = model_type == "mistral"
    if model_type == "qwen2" and c.get("use_sliding_window") and window is not None:
        # Qwen2Config: layers from max_window_layers on slide, unless layer_types names each layer's kind
        types, first = c.get("layer_types"), c.get("max_window_layers", 28)
        if types is not None and not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
            raise CheckpointError(f"{source}: layer_types must be a list of strings, not {types!r:.80}")
        if types is None and not isinstance(first, int):
            raise CheckpointError(f"{source}: max_window_layers must be an integer, not {first!r:.80}")
        uses_window = "sliding_attention" in types if types is not None else first < c["num_hidden_layers"]
    if uses_window and window is not None and window < block_size:
        raise CheckpointError(
            f"{source}: sliding_window {window} < max_position_embeddings {block_size}; arraygpt has no "
            "sliding-window attention"
        )
    n_head, n_embd = c["num_attention_heads"], c["hidden_size"]
    n_kv_head = c.get("num_key_value_heads") or n_head  # LlamaConfig: null means as many as the query heads
    if n_head % n_kv_head:
        raise CheckpointError(
            f"{source}: num_attention_heads ({n_head}) is not a multiple of num_key_value_heads ({n_kv_head})"
        )
    head_dim = c.get("head_dim")
    if head_dim is None:
        if n_embd % n_head:
            raise CheckpointError(
                f"{source}: hidden_size ({n_embd}) is not divisible by num_attention_heads ({n_head}) and there is "
                "no head_dim"
            )
        head_dim = n_embd // n_head
    if model_type == "llama":
        attention_bias, mlp_bias = c.get("attention_bias", False), c.get("mlp_bias", False)
        if attention_bias != mlp_bias:
            raise CheckpointError(
                f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias}; arraygpt has biases on every "
                "linear (bias) or on q/k/v only (qkv_bias)"
            )
        bias, qkv_bias = attention_bias, False
    else:
        bias, qkv_bias = False, model_type == "qwen2"
    theta, scaling = _rope_settings(c, source)
    try:
        return GPTConfig(
            vocab_size=c["vocab_size"],
            block_size=block_size,
            n_layer=c["num_hidden_layers"],
            n_head=n_head,
            n_embd=n_embd,
            head_dim=head_dim,
            mlp_hidden=c["intermediate_size"],
            norm="rmsnorm",
            norm_eps=float(c["rms_norm_eps"]),
            norm_affine=True,
            norm_emb=False,
            norm_final=True,
            bias=bias,
            tie_embeddings=c["tie_word_embeddings"],
            init_std=float(c["initializer_range"]),
            init_output="normal",
            dropout=0.0,
            position="rope",
            rope_theta=theta,
            rope_scaling=scaling,
            n_kv_head=n_kv_head,
            mlp="swiglu",
            qkv_bias=qkv_bias,
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid config: {e}") from None


def _default_model_type(config: GPTConfig) -> str:
    return "qwen2" if config.qkv_bias else "llama"


def _check_expressible(config: GPTConfig, model_type: str) -> None:
    """Raise ValueError naming the first GPTConfig field the format cannot hold."""
    required = {
        "position": "rope",
        "mlp": "swiglu",
        "norm": "rmsnorm",
        "norm_affine": True,
        "norm_emb": False,
        "norm_final": True,
    }
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    for name, value in required.items():
        if getattr(config, name) != value:
            got = getattr(config, name)
            raise ValueError(f"a {model_type} checkpoint needs GPTConfig.{name}={value!r}, got {got!r}")
    if model_type == "qwen2" and (config.bias or not config.qkv_bias):
        raise ValueError("a qwen2 checkpoint has biases on q/k/v only: it needs GPTConfig.qkv_bias=True, bias=False")
    if model_type != "qwen2" and config.qkv_bias:
        raise ValueError(f"a {model_type} checkpoint cannot hold q/k/v-only biases (GPTConfig.qkv_bias); use qwen2")
    if model_type == "mistral" and config.bias:
        raise ValueError("a mistral checkpoint has no biases (GPTConfig.bias)")
    if model_type == "llama" and config.n_embd % config.n_head:  # transformers' LlamaConfig refuses it
        raise ValueError(
            f"a llama checkpoint needs GPTConfig.n_embd ({config.n_embd}) to be a multiple of n_head "
            f"({config.n_head}), even with head_dim set; qwen2 and mistral take any head_dim"
        )


def config_to_llama(config: GPTConfig, dtype: str = "float32", model_type: str | None = None) -> dict[str, Any]:
    """The transformers ``config.json`` (a dict) of ``config``: ``model_type`` qwen2 when it has
    q/k/v-only biases, else llama (or the ``model_type`` given).

    Raises:
        ValueError: the config cannot be expressed in that format (the message names the field).
    """
    model_type = model_type or _default_model_type(config)
    _check_expressible(config, model_type)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if config.rope_scaling is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", **dict(zip(ROPE_SCALING_KEYS, config.rope_scaling))}
    if model_type == "llama":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    elif model_type == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    else:
        hf.update(sliding_window=None)
    return hf


# ----------------------------------------------------------------------------------------------
# tensors <-> state dict

_LAYER = {
    "input_layernorm.weight": "norm1",
    "post_attention_layernorm.weight": "norm2",
    "self_attn.q_proj.weight": "attn_wq",
    "self_attn.q_proj.bias": "attn_wq_b",
    "self_attn.k_proj.weight": "attn_wk",
    "self_attn.k_proj.bias": "attn_wk_b",
    "self_attn.v_proj.weight": "attn_wv",
    "self_attn.v_proj.bias": "attn_wv_b",
    "self_attn.o_proj.weight": "attn_wo",
    "self_attn.o_proj.bias": "attn_wo_b",
    "mlp.gate_proj.weight": "mlp_gate",
    "mlp.gate_proj.bias": "mlp_gate_b",
    "mlp.up_proj.weight": "mlp_up",
    "mlp.up_proj.bias": "mlp_up_b",
    "mlp.down_proj.weight": "mlp_down",
    "mlp.down_proj.bias": "mlp_down_b",
}
_TOP = {"model.embed_tokens.weight": "wte", "model.norm.weight": "normf", "lm_head.weight": "lm_head"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _arraygpt_name(key: str) -> str | None:
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_KEY.fullmatch(key)
    if m and m.group(2) in _LAYER:
        return f"layer{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def _hf_name(name: str) -> str:
    for key, ours in _TOP.items():
        if ours == name:
            return key
    layer, short = name.split(".", 1)
    hf = {v: k for k, v in _LAYER.items()}[short]
    return f"model.layers.{layer[len('layer') :]}.{hf}"


def state_dict_from_llama(
    tensors: Mapping[str, Any], config: GPTConfig, source: str = WEIGHTS_FILE
) -> dict[str, np.ndarray]:
    """arraygpt's state dict (name -> host array) from transformers' tensors (name -> array).

    Raises:
        CheckpointError: a tensor is missing, unexpected, or has the wrong shape or dtype.
    """
    layers = {m.group(1) for key in tensors if (m := _LAYER_KEY.fullmatch(key))}
    if len(layers) != config.n_layer:  # before param_shapes, which takes time in n_layer (a config may claim 10^9)
        raise CheckpointError(
            f"{source}: config.json claims num_hidden_layers={config.n_layer}, the file holds {len(layers)} layer(s)"
        )
    shapes = param_shapes(config)
    state: dict[str, np.ndarray] = {}
    unexpected = []
    tied_copy = None
    for key, value in tensors.items():
        name = _arraygpt_name(key)
        if name == "lm_head" and config.tie_embeddings:
            tied_copy = value  # a tied file may store the shared matrix twice: checked below
            continue
        if name is None or name not in shapes:
            if not _IGNORED.fullmatch(key):
                unexpected.append(key)
            continue
        array = to_numpy(value)
        if tuple(array.shape) != shapes[name]:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(array.shape)}, expected {shapes[name]}")
        if array.dtype.kind != "f":
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {array.dtype}, expected floating point")
        state[name] = array
    missing = [_hf_name(name) for name in shapes if name not in state]
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors do not match the config: missing {missing}, unexpected {unexpected}")
    if tied_copy is not None and not np.array_equal(to_numpy(tied_copy), state["wte"]):
        raise CheckpointError(  # transformers would not tie them: it warns and keeps lm_head
            f"{source}: lm_head.weight differs from model.embed_tokens.weight, but config.json says "
            "tie_word_embeddings is true (set it to false for a separate unembedding)"
        )
    return state


def state_dict_to_llama(state: Mapping[str, Any], config: GPTConfig) -> dict[str, np.ndarray]:
    """transformers' tensors (name -> host array, the state's dtype) from arraygpt's state dict."""
    return {_hf_name(name): np.ascontiguousarray(to_numpy(state[name])) for name in param_shapes(config)}


# ----------------------------------------------------------------------------------------------
# directories (read by arraygpt.io.hf.reader, as every architecture's are)


def load_llama(directory: str | os.PathLike[str], dtype: str = "float32", backend: Any = None) -> GPT:
    """A GPT with the weights and config of a transformers Llama, Qwen2 or Mistral directory.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` (or a sharded index), as
            ``save_pretrained`` writes them or the Hugging Face hub serves them.
        dtype: ``float32`` or ``float64`` (bfloat16/float16 files are widened).
        backend: a backend name or object; default the active one.

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: the directory, its config.json or its weights are missing.
        CheckpointError: an unsupported model type or option, a config field of the wrong type, a
            missing, extra or mis-shaped tensor, pickle weights only, or a hostile shard index
            (``arraygpt.io.hf.reader.read_tensors``).

    Example:
        >>> model = load_llama("SmolLM2-135M")               # doctest: +SKIP
        >>> logits, _ = model.forward([[1, 504, 3458]])      # doctest: +SKIP
    """
    directory = Path(directory)
    config = config_from_llama(read_config(directory, "Llama-family"), source=str(directory / CONFIG_FILE))
    tensors, source = read_tensors(directory)
    state = state_dict_from_llama(tensors, config, source=source)
    model = GPT(config, dtype=dtype, backend=backend, init=False)  # every weight comes from the file
    model.load_state_dict(state)
    return model.eval()


def save_llama(model: GPT, directory: str | os.PathLike[str], model_type: str | None = None) -> None:
    """Write ``model`` as a transformers directory (config.json + model.safetensors) that
    ``AutoModelForCausalLM.from_pretrained(directory)`` loads: ``model_type`` qwen2 when the
    config has q/k/v-only biases, else llama (or the one given). Tensors keep the model's dtype;
    each file is written atomically.

    Raises:
        ValueError: the config cannot be expressed in that format (the message names the field).
    """
    hf_config = config_to_llama(model.config, dtype=model.dtype, model_type=model_type)  # validates first
    tensors = state_dict_to_llama(model.state_dict(), model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    write_atomic(directory / CONFIG_FILE, (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode())
