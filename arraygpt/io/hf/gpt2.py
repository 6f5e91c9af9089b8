"""GPT-2 checkpoints in the Hugging Face transformers layout, both ways: the mapping of
``config.json`` onto GPTConfig and the table of tensor names. The directory itself (config.json,
``model.safetensors`` or a sharded ``model.safetensors.index.json``, pickle refusal) is read by
``arraygpt.io.hf.reader``, as every architecture's is; its tokenizer files by ``arraygpt.io.bpe``.
This module maps the layout onto arraygpt's names and back, with nothing lost:

    transformers (GPT2LMHeadModel)          shape (Conv1D: (in, out))   arraygpt (weights (out, in))
    transformer.wte.weight                  (V, C)                      wte
    transformer.wpe.weight                  (block_size, C)             wpe
    transformer.h.{i}.ln_1.weight / .bias   (C,)                        layer{i}.norm1 / norm1_b
    transformer.h.{i}.attn.c_attn.weight    (C, 3C)  -> split, .T       layer{i}.attn_wq / attn_wk / attn_wv
    transformer.h.{i}.attn.c_attn.bias      (3C,)    -> split           layer{i}.attn_wq_b / _wk_b / _wv_b
    transformer.h.{i}.attn.c_proj.weight    (C, C)   -> .T              layer{i}.attn_wo (+ attn_wo_b)
    transformer.h.{i}.ln_2.weight / .bias   (C,)                        layer{i}.norm2 / norm2_b
    transformer.h.{i}.mlp.c_fc.weight       (C, H)   -> .T              layer{i}.mlp_fc1 (+ mlp_fc1_b)
    transformer.h.{i}.mlp.c_proj.weight     (H, C)   -> .T              layer{i}.mlp_fc2 (+ mlp_fc2_b)
    transformer.ln_f.weight / .bias         (C,)                        normf / normf_b
    lm_head.weight                          (V, C)   nn.Linear          lm_head (untied only; tied: wte)

Keys are accepted with or without the ``transformer.`` prefix (GPT2LMHeadModel vs GPT2Model
files); the causal-mask buffers some versions stored (``attn.bias``, ``attn.masked_bias``) are
ignored. Every tensor is read with arraygpt's own pickle-free safetensors reader.

Deliberately not here: downloads (point at a directory you already have), any model other than
GPT-2 (``model_type`` must be ``gpt2``; the Llama family is ``arraygpt.io.hf.llama``), and any
runtime dependency on transformers or torch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.config import GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io.files import CONFIG_FILE, WEIGHTS_FILE, write_atomic
from arraygpt.io.hf.reader import read_config, read_tensors
from arraygpt.io.safetensors import save_file
from arraygpt.nn.model import GPT
from arraygpt.xp import to_numpy

__all__ = [
    "CheckpointError",
    "config_from_gpt2",
    "config_to_gpt2",
    "load_gpt2",
    "save_gpt2",
    "state_dict_from_gpt2",
    "state_dict_to_gpt2",
]

PREFIX = "transformer."

# transformers' GPT2Config defaults: a config.json may leave any of these out.
GPT2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}

# transformers' activation_function -> GPTConfig.activation (same formula, not an approximation of it)
ACTIVATIONS_FROM_GPT2 = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "relu2": "relu2",
}
ACTIVATIONS_TO_GPT2 = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "relu2": "relu2"}

# options of GPT2Config that change the math in ways arraygpt does not implement: name -> the value it supports
_UNSUPPORTED = {
    "scale_attn_weights": (True, "arraygpt always scales attention scores by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "arraygpt does not scale attention by 1/(layer_idx + 1)"),
    "reorder_and_upcast_attn": (False, "arraygpt does not reorder or upcast the attention product"),
    "add_cross_attention": (False, "arraygpt has no cross-attention (decoder-only GPT)"),
}

# ----------------------------------------------------------------------------------------------
# config.json <-> GPTConfig


def config_from_gpt2(hf: Mapping[str, Any], source: str = CONFIG_FILE) -> GPTConfig:
    """The GPTConfig of a transformers GPT-2 ``config.json`` (already parsed into a dict).

    Args:
        hf: the JSON object; fields it leaves out take GPT2Config's defaults.
        source: where it came from, for error messages.

    Returns:
        A GPTConfig with GPT-2's architecture (layernorm with gain and bias, biases, final norm).

    Raises:
        CheckpointError: ``model_type`` is not ``gpt2``, or an option changes the math in a way
            arraygpt does not implement (the message names the field).

    Example:
        >>> config_from_gpt2({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2}).n_layer
        2
    """
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise CheckpointError(
            f"{source}: model_type is {model_type!r}; arraygpt reads GPT-2 checkpoints (model_type 'gpt2') only"
        )
    cfg = {**GPT2_DEFAULTS, **hf}
    if "n_positions" not in hf and "n_ctx" in hf:  # configs written by early transformers versions
        cfg["n_positions"] = hf["n_ctx"]
    _check_types(cfg, source)
    for name, (supported, why) in _UNSUPPORTED.items():
        if cfg[name] != supported:
            raise CheckpointError(f"{source}: {name} is {cfg[name]!r}, only {supported!r} is supported: {why}")
    activation = cfg["activation_function"]
    if activation not in ACTIVATIONS_FROM_GPT2:
        raise CheckpointError(
            f"{source}: activation_function {activation!r} is not supported; "
            f"supported: {', '.join(ACTIVATIONS_FROM_GPT2)}"
        )
    dropouts = {name: cfg[name] for name in ("embd_pdrop", "attn_pdrop", "resid_pdrop")}
    if len(set(dropouts.values())) != 1:
        raise CheckpointError(
            f"{source}: arraygpt has one dropout probability for embeddings, attention and residuals; "
            f"this config has {dropouts}"
        )
    n_embd, n_head = cfg["n_embd"], cfg["n_head"]
    if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0 and n_embd % n_head:
        raise CheckpointError(f"{source}: n_embd ({n_embd}) is not divisible by n_head ({n_head})")
    try:
        return GPTConfig(
            vocab_size=cfg["vocab_size"],
            block_size=cfg["n_positions"],
            n_layer=cfg["n_layer"],
            n_head=n_head,
            n_embd=n_embd,
            mlp_hidden=cfg["n_inner"],
            norm="layernorm",
            norm_eps=float(cfg["layer_norm_epsilon"]),
            norm_affine=True,
            norm_emb=False,
            norm_final=True,
            bias=True,
            activation=ACTIVATIONS_FROM_GPT2[activation],
            tie_embeddings=bool(cfg["tie_word_embeddings"]),
            init_std=float(cfg["initializer_range"]),
            init_output="scaled",
            dropout=float(dropouts["embd_pdrop"]),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


_INT_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
_BOOL_FIELDS = (
    "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx",
    "reorder_and_upcast_attn",
    "add_cross_attention",
    "tie_word_embeddings",
)
_FLOAT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range")


def _check_types(cfg: Mapping[str, Any], source: str) -> None:
    """Strict JSON types: "false" is not false, 1.5 is not a layer count, a list is not a name."""

    def bad(name: str, allowed: str) -> CheckpointError:
        return CheckpointError(f"{source}: {name} must be {allowed}, not {cfg[name]!r:.80}")

    for name in _INT_FIELDS:
        if not (isinstance(cfg[name], int) and not isinstance(cfg[name], bool)) or cfg[name] < 1:
            raise bad(name, "a positive integer")
    n_inner = cfg["n_inner"]
    if n_inner is not None and (not isinstance(n_inner, int) or isinstance(n_inner, bool) or n_inner < 1):
        raise bad("n_inner", "null or a positive integer")
    for name in _BOOL_FIELDS:
        if not isinstance(cfg[name], bool):
            raise bad(name, "true or false (a JSON boolean)")
    for name in _FLOAT_FIELDS:
        if not isinstance(cfg[name], (int, float)) or isinstance(cfg[name], bool):
            raise bad(name, "a number")
    if not isinstance(cfg["activation_function"], str):
        raise bad("activation_function", f"one of {', '.join(ACTIVATIONS_FROM_GPT2)}")


def _check_gpt2_expressible(config: GPTConfig) -> None:
    """Raise ValueError naming the first GPTConfig field that GPT2LMHeadModel cannot express."""
    llama = "; write it with format='llama' (a transformers Llama/Qwen2 directory) instead"
    problems = [
        (
            config.position != "learned",
            "position",
            config.position,
            "GPT-2 has a learned position table (wpe), no rotary embeddings" + llama,
        ),
        (config.mlp != "standard", "mlp", config.mlp, "GPT-2's MLP is mlp_fc2 @ act(mlp_fc1 @ x), not SwiGLU" + llama),
        (
            config.n_kv_head != config.n_head,
            "n_kv_head",
            config.n_kv_head,
            f"GPT-2 has as many key/value heads as query heads ({config.n_head}), no grouped-query attention" + llama,
        ),
        (
            config.qkv_bias,
            "qkv_bias",
            config.qkv_bias,
            "GPT-2 has biases on every linear layer or none, not on q/k/v only" + llama,
        ),
        (config.norm != "layernorm", "norm", config.norm, "GPT-2 uses layernorm"),
        (not config.norm_affine, "norm_affine", config.norm_affine, "GPT-2's layer norms have a gain and a bias"),
        (not config.bias, "bias", config.bias, "GPT-2 has biases in every linear layer and norm"),
        (config.norm_emb, "norm_emb", config.norm_emb, "GPT-2 has no norm after the embedding"),
        (not config.norm_final, "norm_final", config.norm_final, "GPT-2 always has the final norm ln_f"),
        (
            config.attn_dim != config.n_embd,
            "head_dim",
            config.head_dim,
            f"GPT-2 needs n_head * head_dim == n_embd ({config.n_head} * {config.head_dim} != {config.n_embd})",
        ),
        (
            config.activation not in ACTIVATIONS_TO_GPT2,
            "activation",
            config.activation,
            f"transformers' GPT-2 offers {', '.join(ACTIVATIONS_TO_GPT2)}",
        ),
    ]
    for bad, field, value, why in problems:
        if bad:
            raise ValueError(f"cannot write a GPT-2 checkpoint: GPTConfig.{field} is {value!r}; {why}")


def config_to_gpt2(config: GPTConfig, dtype: str = "float32") -> dict[str, Any]:
    """The transformers ``config.json`` object (model_type gpt2, GPT2LMHeadModel) of ``config``.

    Raises:
        ValueError: a field GPT-2 cannot express (rotary positions, SwiGLU, grouped key/value
            heads, q/k/v-only biases: use format='llama'; rmsnorm, no biases, norm_emb, no final
            norm, n_head * head_dim != n_embd); the message names it.
    """
    _check_gpt2_expressible(config)
    eos = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None if config.mlp_hidden == 4 * config.n_embd else config.mlp_hidden,
        "activation_function": ACTIVATIONS_TO_GPT2[config.activation],
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": config.init_std,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------
# tensors: transformers names and layouts <-> arraygpt state dict


# Per-layer tensors other than Q/K/V (which GPT-2 stores fused): arraygpt name, GPT-2 name, and
# whether GPT-2 stores it as a Conv1D weight, (in, out), the transpose of arraygpt's (out, in).
LAYER_TENSORS = (
    ("norm1", "ln_1.weight", False),
    ("norm1_b", "ln_1.bias", False),
    ("attn_wo", "attn.c_proj.weight", True),
    ("attn_wo_b", "attn.c_proj.bias", False),
    ("norm2", "ln_2.weight", False),
    ("norm2_b", "ln_2.bias", False),
    ("mlp_fc1", "mlp.c_fc.weight", True),
    ("mlp_fc1_b", "mlp.c_fc.bias", False),
    ("mlp_fc2", "mlp.c_proj.weight", True),
    ("mlp_fc2_b", "mlp.c_proj.bias", False),
)


def _gpt2_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """transformers names (without the ``transformer.`` prefix) -> shapes, Conv1D layout."""
    C, H, V = config.n_embd, config.mlp_hidden, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C), "wpe.weight": (config.block_size, C)}
    for i in range(config.n_layer):
        h = f"h.{i}."
        shapes.update(
            {
                h + "ln_1.weight": (C,),
                h + "ln_1.bias": (C,),
                h + "attn.c_attn.weight": (C, 3 * C),
                h + "attn.c_attn.bias": (3 * C,),
                h + "attn.c_proj.weight": (C, C),
                h + "attn.c_proj.bias": (C,),
                h + "ln_2.weight": (C,),
                h + "ln_2.bias": (C,),
                h + "mlp.c_fc.weight": (C, H),
                h + "mlp.c_fc.bias": (H,),
                h + "mlp.c_proj.weight": (H, C),
                h + "mlp.c_proj.bias": (C,),
            }
        )
    shapes.update({"ln_f.weight": (C,), "ln_f.bias": (C,)})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER = re.compile(r"(?:transformer\.)?h\.(\d+)\.")


def _check_claimed_sizes(tensors: Mapping[str, Any], config: GPTConfig, source: str) -> None:
    """Compare config.json's n_layer, vocab_size, n_positions and n_embd with the tensors present,
    in time proportional to the number of tensors (a config may claim 10^9 layers)."""
    layers = {int(m.group(1)) for name in tensors if (m := _LAYER.match(name))}
    if config.n_layer != len(layers):
        raise CheckpointError(
            f"{source}: config.json claims n_layer={config.n_layer}, the file holds {len(layers)} layer(s)"
        )
    for short, claimed in (
        ("wte.weight", (config.vocab_size, config.n_embd)),
        ("wpe.weight", (config.block_size, config.n_embd)),
    ):
        value = tensors.get(PREFIX + short, tensors.get(short))
        if value is not None and tuple(np.shape(value)) != claimed:
            raise CheckpointError(
                f"{source}: tensor {short} has shape {tuple(np.shape(value))}, but config.json implies {claimed} "
                "(vocab_size or n_positions, n_embd)"
            )


def state_dict_from_gpt2(
    tensors: Mapping[str, Any], config: GPTConfig, source: str = WEIGHTS_FILE
) -> dict[str, np.ndarray]:
    """arraygpt's state dict (NumPy arrays, weights (out, in)) from transformers GPT-2 tensors.

    Args:
        tensors: name -> array (NumPy, or anything ``np.asarray`` takes, e.g. CPU torch tensors),
            named as GPT2LMHeadModel (``transformer.h.0...``) or GPT2Model (``h.0...``) names them.
        config: the model's config (``config_from_gpt2``), which fixes every expected shape.
        source: where the tensors came from, for error messages.

    Raises:
        CheckpointError: a tensor is missing, has the wrong shape or is not floating point, a name
            is not a GPT-2 parameter, or a stored ``lm_head.weight`` differs from the tied ``wte``.
    """
    _check_claimed_sizes(tensors, config, source)
    prefixed = any(name.startswith(PREFIX) for name in tensors)
    found: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        short = name[len(PREFIX) :] if name.startswith(PREFIX) else name
        if _BUFFER.fullmatch(short):
            continue  # the causal mask buffer, not a parameter
        if short in found:
            raise CheckpointError(f"{source}: tensor {short!r} is stored both with and without the {PREFIX!r} prefix")
        found[short] = np.asarray(value)
    expected = _gpt2_shapes(config)

    def shown(short: str) -> str:
        return PREFIX + short if prefixed and short != "lm_head.weight" else short

    unexpected = sorted(set(found) - set(expected) - {"lm_head.weight"})
    missing = [shown(n) for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise CheckpointError(f"{source} is missing tensor(s) {', '.join(missing[:8])}{more}")
    if unexpected:
        raise CheckpointError(
            f"{source} holds tensor(s) that are not GPT2LMHeadModel parameters: "
            f"{', '.join(shown(n) for n in unexpected)}"
        )
    for short, shape in expected.items():
        value = found[short]
        if tuple(value.shape) != shape:
            raise CheckpointError(
                f"{source}: tensor {shown(short)} has shape {tuple(value.shape)}, config.json implies {shape}"
            )
        if value.dtype.kind != "f":
            raise CheckpointError(f"{source}: tensor {shown(short)} has dtype {value.dtype}, expected floating point")
    if config.tie_embeddings and "lm_head.weight" in found:
        lm_head = found["lm_head.weight"]
        if lm_head.shape != found["wte.weight"].shape or not np.array_equal(lm_head, found["wte.weight"]):
            raise CheckpointError(
                f"{source}: lm_head.weight differs from {shown('wte.weight')}, but config.json says "
                "tie_word_embeddings is true (set it to false for a separate unembedding)"
            )

    C = config.n_embd
    state: dict[str, np.ndarray] = {"wte": found["wte.weight"], "wpe": found["wpe.weight"]}
    if not config.tie_embeddings:
        state["lm_head"] = found["lm_head.weight"]  # nn.Linear: already (out, in)
    for i in range(config.n_layer):
        h, layer = f"h.{i}.", f"layer{i}."
        w_qkv = found[h + "attn.c_attn.weight"].T  # Conv1D (C, 3C) -> (3C, C)
        b_qkv = found[h + "attn.c_attn.bias"]  # (3C,)
        for j, name in enumerate(("attn_wq", "attn_wk", "attn_wv")):
            state[layer + name] = np.ascontiguousarray(w_qkv[j * C : (j + 1) * C])  # (C, C)
            state[layer + name + "_b"] = b_qkv[j * C : (j + 1) * C].copy()  # (C,), its own memory
        for ours, theirs, conv1d in LAYER_TENSORS:
            value = found[h + theirs]
            state[layer + ours] = np.ascontiguousarray(value.T) if conv1d else value
    state["normf"] = found["ln_f.weight"]
    state["normf_b"] = found["ln_f.bias"]
    return state


def state_dict_to_gpt2(state: Mapping[str, Any], config: GPTConfig) -> dict[str, np.ndarray]:
    """transformers GPT2LMHeadModel tensors (host NumPy, Conv1D layout, ``transformer.`` names)
    from an arraygpt state dict (arrays of any backend). ``lm_head.weight`` is written only when
    the embeddings are untied, as transformers does.

    Raises:
        ValueError: ``config`` is not expressible as GPT-2 (see ``config_to_gpt2``).
    """
    _check_gpt2_expressible(config)
    s = {name: to_numpy(value) for name, value in state.items()}
    out: dict[str, np.ndarray] = {PREFIX + "wte.weight": s["wte"], PREFIX + "wpe.weight": s["wpe"]}
    for i in range(config.n_layer):
        h, layer = f"{PREFIX}h.{i}.", f"layer{i}."
        w_qkv = np.concatenate([s[layer + "attn_wq"], s[layer + "attn_wk"], s[layer + "attn_wv"]])  # (3C, C)
        out[h + "attn.c_attn.weight"] = np.ascontiguousarray(w_qkv.T)  # (C, 3C)
        out[h + "attn.c_attn.bias"] = np.concatenate(
            [s[layer + "attn_wq_b"], s[layer + "attn_wk_b"], s[layer + "attn_wv_b"]]
        )  # (3C,)
        for ours, theirs, conv1d in LAYER_TENSORS:
            value = s[layer + ours]
            out[h + theirs] = np.ascontiguousarray(value.T) if conv1d else value
    out[PREFIX + "ln_f.weight"] = s["normf"]
    out[PREFIX + "ln_f.bias"] = s["normf_b"]
    if not config.tie_embeddings:
        out["lm_head.weight"] = s["lm_head"]
    return out


# ----------------------------------------------------------------------------------------------
# directories (read by arraygpt.io.hf.reader, as every architecture's are)


def load_gpt2(directory: str | os.PathLike[str], dtype: str = "float32", backend: Any = None) -> GPT:
    """A GPT with the weights and config of a transformers GPT-2 directory.

    Args:
        directory: holds ``config.json`` and ``model.safetensors`` (as written by transformers'
            ``save_pretrained`` or downloaded from the Hugging Face hub; nothing is downloaded here).
        dtype: ``float32`` or ``float64`` (float16/bfloat16 files are widened).
        backend: a backend name or object; default the active one.

    Returns:
        The model, in eval mode.

    Raises:
        FileNotFoundError: the directory, its config.json or its weights are missing.
        CheckpointError: pickle weights only (the message says how to convert them), a config
            that is not GPT-2, an unsupported option, a missing, extra or mis-shaped tensor.

    Example:
        >>> model = load_gpt2("gpt2")           # doctest: +SKIP
        >>> logits, _ = model.forward([[15496, 11, 995]])  # doctest: +SKIP
    """
    directory = Path(directory)
    config = config_from_gpt2(read_config(directory, "GPT-2"), source=str(directory / CONFIG_FILE))
    tensors, source = read_tensors(directory)
    state = state_dict_from_gpt2(tensors, config, source=source)
    del tensors  # the transposed copies in ``state`` are all that is needed now
    model = GPT(config, dtype=dtype, backend=backend, init=False)  # every weight comes from the file
    model.load_state_dict(state)
    return model.eval()


def save_gpt2(model: GPT, directory: str | os.PathLike[str]) -> None:
    """Write ``model`` as a transformers GPT-2 directory (config.json + model.safetensors), which
    ``GPT2LMHeadModel.from_pretrained(directory)`` loads. The directory is created if needed;
    each file is written atomically. Tensors keep the model's dtype.

    Raises:
        ValueError: the config is not expressible as GPT-2; the message names the field.
    """
    hf_config = config_to_gpt2(model.config, dtype=model.dtype)  # validates before anything is written
    tensors = state_dict_to_gpt2(model.state_dict(), model.config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    write_atomic(directory / CONFIG_FILE, (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode())
