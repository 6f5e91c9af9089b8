"""GPTConfig and the presets: the shape of a model, checked when it is built.

Imports nothing of arraygpt but the errors, so every layer may use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["GPTConfig", "PRESETS", "check_fields"]

ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "relu2")  # the keys of nn.layers.ACTIVATIONS
NORM_KINDS = ("layernorm", "rmsnorm")
POSITION_KINDS = ("learned", "rope")
MLP_KINDS = ("standard", "swiglu")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
INIT_OUTPUT_KINDS = ("scaled", "normal", "zero")
DTYPES = ("float32", "float64")  # parameter (and training) precisions
# Low precisions a GPT may compute in, as the compute model of arraygpt.training.precision.MixedPrecision
# (float32 master weights, loss scaling) or for inference. Not in DTYPES: training the parameters
# themselves in 16 bits loses small updates (Adam's eps=1e-8 is 0 in float16). bfloat16 needs a
# backend whose namespace has it (NumPy and CuPy do not).
COMPUTE_DTYPES = ("float16", "bfloat16")


# Fields whose unset value follows others: head_dim = n_embd / n_head, mlp_hidden = 4 n_embd,
# n_kv_head = n_head. A value filled in by that rule is a _Derived int, so that a config built from
# another (dataclasses.replace, from_dict) derives it again from the new fields.
DERIVED_FIELDS = ("head_dim", "mlp_hidden", "n_kv_head")


class _Derived(int):
    """An int that a GPTConfig filled in from other fields (equal to, and used as, a plain int)."""


def _field(default: Any, help: str, **metadata: Any) -> Any:
    """A GPTConfig field whose metadata gives the command layer its help (and choices, metavar)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT. Field names follow nanoGPT; invalid values raise ``ValueError``.

    Attributes:
        vocab_size: number of token ids.
        block_size: the longest context (number of positions with an embedding).
        n_layer, n_head, n_embd: depth, attention heads per block, width of the residual stream.
        head_dim: width of one head; default n_embd / n_head (must then divide evenly).
        mlp_hidden: the MLP's hidden width; default 4 * n_embd.
        norm: ``layernorm`` or ``rmsnorm``; norm_eps its epsilon.
        norm_affine: whether norms have a learnable gain (and a bias when ``bias`` is set).
        norm_emb: an extra norm right after the embedding (microgpt).
        norm_final: a final norm before the unembedding (GPT-2's ln_f).
        bias: biases in the linear layers and norms.
        activation: ``gelu_tanh``, ``gelu``, ``relu`` or ``relu2``: the standard MLP's activation
            (unused by ``mlp="swiglu"``, whose gate is always SiLU).
        tie_embeddings: unembed with ``wte`` (GPT-2) instead of a separate ``lm_head``.
        init_std: std of the normal initialization of weights and embeddings.
        init_output: init of ``attn_wo`` and ``mlp_fc2``: ``scaled`` (init_std / sqrt(2 n_layer),
            GPT-2), ``normal`` (init_std) or ``zero`` (microgpt).
        dropout: probability for embedding, attention and residual dropout while training.
        position: ``learned`` (a ``wpe`` table, GPT-2) or ``rope`` (rotary embeddings of the
            queries and keys, Su et al. 2021; no ``wpe``). head_dim must then be even.
        rope_theta: RoPE's base (10000 in the paper; Llama 3 uses 500000).
        rope_scaling: None, or Llama 3.1's frequency scaling as (factor, low_freq_factor,
            high_freq_factor, original_max_position_embeddings); a dict with those keys (as in
            transformers' config.json, ``rope_type`` "llama3") is accepted and stored as the tuple.
        n_kv_head: key/value heads (grouped-query attention); default n_head. Must divide n_head.
        mlp: ``standard`` (mlp_fc2 @ act(mlp_fc1 @ x)) or ``swiglu`` (mlp_down @ (silu(mlp_gate @ x)
            * (mlp_up @ x)), Llama/Qwen2/SmolLM); mlp_hidden is H in both.
        qkv_bias: biases on the query/key/value projections only (Qwen2), with ``bias=False``.
    """

    # Each field's help is what `arraygpt train/params --<field>` shows (arraygpt.cli.options).
    vocab_size: int = _field(50257, "number of token ids (train: unset takes the tokenizer's)")
    block_size: int = _field(1024, "the longest context, in positions")
    n_layer: int = _field(12, "number of transformer blocks")
    n_head: int = _field(12, "attention (query) heads per block")
    n_embd: int = _field(768, "width of the residual stream")
    head_dim: int | None = _field(None, "width of one head (unset: n_embd / n_head)")
    mlp_hidden: int | None = _field(None, "the MLP's hidden width (unset: 4 * n_embd)")
    norm: str = _field("layernorm", "layernorm or rmsnorm", choices=NORM_KINDS)
    norm_eps: float = _field(1e-5, "the norms' epsilon")
    norm_affine: bool = _field(True, "learnable norm gains (and biases with --bias)")
    norm_emb: bool = _field(False, "a norm right after the embedding (microgpt)")
    norm_final: bool = _field(True, "a final norm before the unembedding (GPT-2's ln_f)")
    bias: bool = _field(True, "biases in the linear layers and norms")
    activation: str = _field("gelu_tanh", "the standard MLP's activation", choices=ACTIVATIONS)
    tie_embeddings: bool = _field(True, "unembed with wte instead of a separate lm_head")
    init_std: float = _field(0.02, "std of the initial weights and embeddings")
    init_output: str = _field("scaled", "init of attn_wo and mlp_fc2", choices=INIT_OUTPUT_KINDS)
    dropout: float = _field(0.0, "embedding, attention and residual dropout while training")
    position: str = _field("learned", "learned (a wpe table) or rope (rotary)", choices=POSITION_KINDS)
    rope_theta: float = _field(10000.0, "RoPE's base")
    rope_scaling: tuple[float, float, float, int] | None = _field(
        None, "Llama 3.1's RoPE scaling", metavar="FACTOR,LOW_FREQ,HIGH_FREQ,ORIGINAL_MAX"
    )
    n_kv_head: int | None = _field(None, "key/value heads, grouped-query attention (unset: n_head)")
    mlp: str = _field("standard", "standard (fc1, act, fc2) or swiglu (gate, up, down)", choices=MLP_KINDS)
    qkv_bias: bool = _field(False, "biases on the query/key/value projections only (Qwen2)")

    def __post_init__(self) -> None:
        for name in ("norm_affine", "norm_emb", "norm_final", "bias", "tie_embeddings", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("norm_eps", "init_std", "dropout", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"GPTConfig.{name} must be a number, got {value!r}")
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in DERIVED_FIELDS:  # a value derived before (dataclasses.replace copies it) is derived again
            if isinstance(getattr(self, name), _Derived):
                object.__setattr__(self, name, None)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                    "unless head_dim is given"
                )
            object.__setattr__(self, "head_dim", _Derived(self.n_embd // self.n_head))
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", _Derived(4 * self.n_embd))
        for name in ("head_dim", "mlp_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", _Derived(self.n_head))
        n_kv = self.n_kv_head
        if isinstance(n_kv, bool) or not isinstance(n_kv, int) or not 1 <= n_kv <= self.n_head or self.n_head % n_kv:
            raise ValueError(
                f"GPTConfig.n_kv_head must be a positive integer that divides n_head ({self.n_head}), got {n_kv!r}"
            )
        choices = {
            "norm": NORM_KINDS,
            "activation": ACTIVATIONS,
            "init_output": INIT_OUTPUT_KINDS,
            "position": POSITION_KINDS,
            "mlp": MLP_KINDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not 0 < self.norm_eps < math.inf:
            raise ValueError(f"GPTConfig.norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        if not 0 <= self.init_std < math.inf:
            raise ValueError(f"GPTConfig.init_std must be a finite number >= 0, got {self.init_std!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 < self.rope_theta < math.inf:
            raise ValueError(f"GPTConfig.rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig.head_dim must be even with position='rope', got {self.head_dim}")
        object.__setattr__(self, "rope_scaling", _rope_scaling(self.rope_scaling))
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError("GPTConfig.rope_scaling needs position='rope' (it scales rotary frequencies)")
        if self.qkv_bias and self.bias:
            raise ValueError(
                "GPTConfig.qkv_bias adds biases to q/k/v only; with bias=True every linear has one already"
            )

    @property
    def attn_dim(self) -> int:
        """n_head * head_dim: the width of the queries and of the attention output (may differ from n_embd)."""
        return self.n_head * self.head_dim  # type: ignore[operator]

    @property
    def kv_dim(self) -> int:
        """n_kv_head * head_dim: the width of the keys and values (attn_dim unless grouped)."""
        return self.n_kv_head * self.head_dim  # type: ignore[operator]

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named configuration (see ``PRESETS``) with any field overridden.

        Example:
            >>> GPTConfig.preset("gpt2", n_layer=2).n_layer
            2
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        check_fields(cls, overrides, "GPTConfig field")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        """The config ``to_dict`` wrote; a derived field that holds what its rule gives stays derived."""
        check_fields(cls, d, "GPTConfig field")
        config = cls(**d)
        rule = {"mlp_hidden": 4 * config.n_embd, "n_kv_head": config.n_head}
        if config.n_embd % config.n_head == 0:
            rule["head_dim"] = config.n_embd // config.n_head
        for name, value in rule.items():
            if getattr(config, name) == value:
                object.__setattr__(config, name, _Derived(value))
        return config


def _rope_scaling(value: Any) -> tuple[float, float, float, int] | None:
    """GPTConfig.rope_scaling normalized to (factor, low_freq_factor, high_freq_factor,
    original_max_position_embeddings), or None; raises ValueError naming the field."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        kind = value.get("rope_type", value.get("type", "llama3"))
        if kind != "llama3":
            raise ValueError(f"GPTConfig.rope_scaling: only Llama 3.1's 'llama3' scaling is supported, got {kind!r}")
        missing = [key for key in ROPE_SCALING_KEYS if key not in value]
        if missing:
            raise ValueError(f"GPTConfig.rope_scaling lacks {missing}; it needs {', '.join(ROPE_SCALING_KEYS)}")
        value = tuple(value[key] for key in ROPE_SCALING_KEYS)
    if not isinstance(value, (tuple, list)) or len(value) != 4:
        raise ValueError(f"GPTConfig.rope_scaling must be None or ({', '.join(ROPE_SCALING_KEYS)}), got {value!r}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ValueError(f"GPTConfig.rope_scaling must hold numbers, got {value!r}")
    factor, low, high, old_len = value
    if not (0 < factor < math.inf and 0 < low < high < math.inf and old_len >= 1 and float(old_len).is_integer()):
        raise ValueError(
            "GPTConfig.rope_scaling needs a finite factor > 0, 0 < low_freq_factor < high_freq_factor < inf and "
            f"a positive integer original_max_position_embeddings, got {tuple(value)!r}"
        )
    return (float(factor), float(low), float(high), int(old_len))


def check_fields(cls: type, given: Mapping[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming every key of ``given`` that is not a field of dataclass ``cls``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; allowed: {', '.join(sorted(fields))}")


_GPT2 = dict(vocab_size=50257, block_size=1024)
_GPT3 = dict(vocab_size=50257, block_size=2048)
# what every Llama-family preset shares (transformers' LlamaConfig: RMSNorm eps 1e-5, init std 0.02
# for every weight, tied embeddings in these small models)
_LLAMA = dict(
    position="rope", mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, bias=False, tie_embeddings=True, init_output="normal"
)

PRESETS: dict[str, dict[str, Any]] = {
    # microgpt's parameter table: RMSNorm without gain, no biases, ReLU, separate lm_head,
    # wo and fc2 start at zero.
    "microgpt": dict(
        vocab_size=27,
        block_size=8,
        n_layer=1,
        n_head=4,
        n_embd=16,
        norm="rmsnorm",
        norm_affine=False,
        norm_emb=True,
        norm_final=False,
        bias=False,
        activation="relu",
        tie_embeddings=False,
        init_output="zero",
    ),
    "gpt2": dict(**_GPT2, n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(**_GPT2, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(**_GPT2, n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(**_GPT2, n_layer=48, n_head=25, n_embd=1600),
    # GPT-3 paper, Table 2.1 (n_layer, d_model, n_heads, d_head), taken literally: where
    # n_heads * d_head != d_model (XL, 13B) the attention width differs from the residual width.
    "gpt3-small": dict(**_GPT3, n_layer=12, n_embd=768, n_head=12, head_dim=64),
    "gpt3-medium": dict(**_GPT3, n_layer=24, n_embd=1024, n_head=16, head_dim=64),
    "gpt3-large": dict(**_GPT3, n_layer=24, n_embd=1536, n_head=16, head_dim=96),
    "gpt3-xl": dict(**_GPT3, n_layer=24, n_embd=2048, n_head=24, head_dim=128),
    "gpt3-2.7b": dict(**_GPT3, n_layer=32, n_embd=2560, n_head=32, head_dim=80),
    "gpt3-6.7b": dict(**_GPT3, n_layer=32, n_embd=4096, n_head=32, head_dim=128),
    "gpt3-13b": dict(**_GPT3, n_layer=40, n_embd=5140, n_head=40, head_dim=128),
    "gpt3-175b": dict(**_GPT3, n_layer=96, n_embd=12288, n_head=96, head_dim=128),
    # nanoGPT's config/train_shakespeare_char.py (with train.py's default bias=False)
    "shakespeare-char": dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, bias=False),
    # Llama-family models (docs/llama.md): RoPE, SwiGLU, grouped-query attention, RMSNorm with a
    # gain, no biases (Qwen2: q/k/v biases). Numbers from each model's published config.json.
    "smollm2-135m": dict(
        **_LLAMA,
        vocab_size=49152,
        block_size=8192,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        mlp_hidden=1536,
        rope_theta=100000.0,
    ),
    "smollm2-360m": dict(
        **_LLAMA,
        vocab_size=49152,
        block_size=8192,
        n_layer=32,
        n_head=15,
        n_kv_head=5,
        n_embd=960,
        mlp_hidden=2560,
        rope_theta=100000.0,
    ),
    "qwen2.5-0.5b": dict(
        **{**_LLAMA, "norm_eps": 1e-6},
        vocab_size=151936,
        block_size=32768,
        n_layer=24,
        n_head=14,
        n_kv_head=2,
        n_embd=896,
        mlp_hidden=4864,
        rope_theta=1000000.0,
        qkv_bias=True,
    ),
    "llama-3.2-1b": dict(
        **_LLAMA,
        vocab_size=128256,
        block_size=131072,
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        n_embd=2048,
        mlp_hidden=8192,
        rope_theta=500000.0,
        rope_scaling=(32.0, 1.0, 4.0, 8192),
    ),
    # a small Llama for tests and the names data (vocab_size is replaced by the tokenizer's)
    "llama-tiny": dict(
        **_LLAMA, vocab_size=27, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=96
    ),
}
