"""The GPT: configuration, presets, parameter shapes and counts, and :class:`GPT`, the thin
stateful model that holds the parameters, the dropout generator and the last forward's caches,
and calls the pure core (``arraygpt.core``) for the math.

Parameters live in one flat dict, name -> array, with the names of the microgpt table (weights
stored (out, in)).

Not here: the forward and backward themselves (``core.py``, ``layers.py``), splitting a batch
across threads (``runner.py``), optimizers, training loops, sampling, checkpoint formats.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from arraygpt import core, layers
from arraygpt.core import GPTCache, KVCache
from arraygpt.kernels import select_kernels
from arraygpt.runner import BatchRunner
from arraygpt.shim import Array, Backend, get_backend, host_full, host_namespace, host_rng, load_backend, to_numpy

__all__ = ["GPT", "GPTConfig", "KVCache", "ParamCount", "PRESETS", "count_params", "param_shapes"]

NORM_KINDS = ("layernorm", "rmsnorm")
POSITION_KINDS = ("learned", "rope")
MLP_KINDS = ("standard", "swiglu")
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
INIT_OUTPUT_KINDS = ("scaled", "normal", "zero")
DTYPES = ("float32", "float64")  # parameter (and training) precisions
# Low precisions a GPT may compute in, as the compute model of arraygpt.precision.MixedPrecision
# (float32 master weights, loss scaling) or for inference. Not in DTYPES: training the parameters
# themselves in 16 bits loses small updates (Adam's eps=1e-8 is 0 in float16). bfloat16 needs a
# backend whose namespace has it (NumPy and CuPy do not).
COMPUTE_DTYPES = ("float16", "bfloat16")


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
    activation: str = _field("gelu_tanh", "the standard MLP's activation", choices=tuple(layers.ACTIVATIONS))
    tie_embeddings: bool = _field(True, "unembed with wte instead of a separate lm_head")
    init_std: float = _field(0.02, "std of the initial weights and embeddings")
    init_output: str = _field("scaled", "init of attn_wo and mlp_fc2", choices=INIT_OUTPUT_KINDS)
    dropout: float = _field(0.0, "embedding, attention and residual dropout while training")
    position: str = _field("learned", "learned (a wpe table) or rope (rotary)", choices=POSITION_KINDS)
    rope_theta: float = _field(10000.0, "RoPE's base")
    rope_scaling: tuple[float, float, float, int] | None = _field(
        None, "Llama 3.1's RoPE scaling", metavar="FACTOR,LOW_FREQ,HIGH_FREQ,ORIGINAL_MAX")
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
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(
                    f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                    "unless head_dim is given"
                )
            object.__setattr__(self, "head_dim", self.n_embd // self.n_head)
        if self.mlp_hidden is None:
            object.__setattr__(self, "mlp_hidden", 4 * self.n_embd)
        for name in ("head_dim", "mlp_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        n_kv = self.n_kv_head
        if isinstance(n_kv, bool) or not isinstance(n_kv, int) or not 1 <= n_kv <= self.n_head or self.n_head % n_kv:
            raise ValueError(
                f"GPTConfig.n_kv_head must be a positive integer that divides n_head ({self.n_head}), got {n_kv!r}"
            )
        choices = {"norm": NORM_KINDS, "activation": tuple(layers.ACTIVATIONS), "init_output": INIT_OUTPUT_KINDS,
                   "position": POSITION_KINDS, "mlp": MLP_KINDS}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"GPTConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std >= 0:
            raise ValueError(f"GPTConfig.init_std must be >= 0, got {self.init_std!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"GPTConfig.rope_theta must be > 0, got {self.rope_theta!r}")
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
        check_fields(cls, d, "GPTConfig field")
        return cls(**d)


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
        raise ValueError(
            f"GPTConfig.rope_scaling must be None or ({', '.join(ROPE_SCALING_KEYS)}), got {value!r}"
        )
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
        raise ValueError(f"GPTConfig.rope_scaling must hold numbers, got {value!r}")
    factor, low, high, old_len = value
    if not (factor > 0 and 0 < low < high and old_len >= 1 and float(old_len).is_integer()):
        raise ValueError(
            "GPTConfig.rope_scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and a positive "
            f"integer original_max_position_embeddings, got {tuple(value)!r}"
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
_LLAMA = dict(position="rope", mlp="swiglu", norm="rmsnorm", norm_eps=1e-5, bias=False, tie_embeddings=True,
              init_output="normal")  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # microgpt's parameter table: RMSNorm without gain, no biases, ReLU, separate lm_head,
    # wo and fc2 start at zero.
    "microgpt": dict(
        vocab_size=27, block_size=8, n_layer=1, n_head=4, n_embd=16, norm="rmsnorm", norm_affine=False,
        norm_emb=True, norm_final=False, bias=False, activation="relu", tie_embeddings=False,
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
    "smollm2-135m": dict(**_LLAMA, vocab_size=49152, block_size=8192, n_layer=30, n_head=9, n_kv_head=3,
                         n_embd=576, mlp_hidden=1536, rope_theta=100000.0),
    "smollm2-360m": dict(**_LLAMA, vocab_size=49152, block_size=8192, n_layer=32, n_head=15, n_kv_head=5,
                         n_embd=960, mlp_hidden=2560, rope_theta=100000.0),
    "qwen2.5-0.5b": dict(**{**_LLAMA, "norm_eps": 1e-6}, vocab_size=151936, block_size=32768, n_layer=24,
                         n_head=14, n_kv_head=2, n_embd=896, mlp_hidden=4864, rope_theta=1000000.0, qkv_bias=True),
    "llama-3.2-1b": dict(**_LLAMA, vocab_size=128256, block_size=131072, n_layer=16, n_head=32, n_kv_head=8,
                         n_embd=2048, mlp_hidden=8192, rope_theta=500000.0,
                         rope_scaling=(32.0, 1.0, 4.0, 8192)),
    # a small Llama for tests and the names data (vocab_size is replaced by the tokenizer's)
    "llama-tiny": dict(**_LLAMA, vocab_size=27, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                       mlp_hidden=96),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# parameter shapes and counts


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


CATEGORIES = ("embedding", "key", "query", "value", "output", "up_projection", "down_projection", "unembedding", "other")
_CATEGORY_OF = {
    "wte": "embedding", "attn_wk": "key", "attn_wq": "query", "attn_wv": "value", "attn_wo": "output",
    "mlp_fc1": "up_projection", "mlp_fc2": "down_projection", "lm_head": "unembedding",
    "mlp_gate": "up_projection", "mlp_up": "up_projection", "mlp_down": "down_projection",
}  # fmt: skip


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


# ----------------------------------------------------------------------------------------------
# the model


class GPT:
    """A GPT whose parameters live on a backend, with a hand-written forward and backward.

    The math is in ``arraygpt.core`` (pure functions over parameters, config and named caches);
    this class holds the state around it: the parameters, the dropout generator, the last
    forward's caches, the kernels and the thread runner.

    Args:
        config: the hyperparameters.
        seed: seed of the host NumPy generator that draws the initial weights, so one seed gives
            the same weights on every backend.
        dtype: ``float32`` or ``float64``; or a low precision of ``COMPUTE_DTYPES`` (``float16``,
            ``bfloat16`` where the backend has it) to compute in, for inference or as the compute
            model of :class:`arraygpt.precision.MixedPrecision`, which keeps float32 master weights.
        backend: a backend name or object; default the active one (``ARRAYGPT_BACKEND``).
        init: draw the initial weights (default); ``False`` leaves every parameter at zero, for
            callers that load a state dict next and need not pay for the draw.
        threads: how many host threads a forward/backward may split its batch across (rows in
            contiguous chunks; None: the backend's choice, e.g. ``ARRAYGPT_NUM_THREADS`` or the
            cores on numpy with OpenBLAS, else 1). Results equal one thread's up to rounding;
            dropout masks differ, but a fixed thread count stays exactly reproducible. Only the
            numpy backend holds BLAS to one thread per chunk (docs/architecture.md, "Threads").
        kernels: the layer pairs to run (``arraygpt.kernels.select_kernels``): None for the
            backend's choice, ``"reference"`` for the pairs of ``layers.py``, or a
            :class:`arraygpt.core.Kernels` record.

    Example:
        >>> model = GPT(GPTConfig.preset("microgpt"), seed=0)
        >>> logits, loss = model.forward([[0, 5, 3]], targets=[[5, 3, 0]])
        >>> grads = model.backward()  # name -> array, same names and shapes as state_dict()
        >>> sorted(grads) == sorted(model.state_dict())
        True
    """

    def __init__(self, config: GPTConfig, seed: int = 0, dtype: str = "float32",
                 backend: str | Backend | None = None, *, init: bool = True, threads: int | None = None,
                 kernels: core.Kernels | str | None = None):  # fmt: skip
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        if dtype not in DTYPES + COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES + COMPUTE_DTYPES)}, got {dtype!r}")
        self.config = config
        self.backend: Backend = load_backend(backend) if isinstance(backend, str) else backend or get_backend()
        self.xp = self.backend.xp
        if not hasattr(self.xp, dtype):
            has = ", ".join(d for d in DTYPES + COMPUTE_DTYPES if hasattr(self.xp, d))
            raise ValueError(f"dtype must be one of {has}: the {self.backend.name} backend has no {dtype}")
        self.dtype = dtype
        self.training = False
        self.params: dict[str, Array] = self._init_params(seed) if init else self._zero_params()
        self._core_params = self._fuse_qkv()
        self.kernels = select_kernels(config, self.backend, dtype, kernels)
        self.runner = BatchRunner(self.backend.threads if threads is None else threads, self.backend)
        self._dropout_rng = host_rng(seed + 1)
        self._caches: list[GPTCache] | None = None  # the last forward's, one per chunk of rows

    @property
    def threads(self) -> int:
        return self.runner.threads

    def close(self) -> None:
        """Shut down the batch runner's thread pool (the model stays usable: a later split batch
        starts a new one). ``with GPT(...) as model:`` closes it at the end of the block."""
        self.runner.close()

    def __enter__(self) -> GPT:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- parameters --------------------------------------------------------------------------

    def _init_params(self, seed: int) -> dict[str, Array]:
        cfg = self.config
        rng = host_rng(seed)
        out_std = {"scaled": cfg.init_std / math.sqrt(2 * cfg.n_layer), "normal": cfg.init_std, "zero": 0.0}
        params = {}
        for name, shape in param_shapes(cfg).items():
            short = name.rsplit(".", 1)[-1]
            if short.endswith("_b"):  # biases start at zero and draw nothing
                host = host_full(shape, 0.0)
            elif len(shape) == 1:  # norm gains start at one
                host = host_full(shape, 1.0)
            else:
                std = out_std[cfg.init_output] if short in ("attn_wo", "mlp_fc2", "mlp_down") else cfg.init_std
                host = rng.standard_normal(shape) * std  # drawn even when std is 0: same stream for every init
            params[name] = self.backend.asarray(host.astype(self.dtype))
        return params

    def _zero_params(self) -> dict[str, Array]:
        dtype = getattr(self.xp, self.dtype)
        return {
            name: self.xp.zeros(shape, dtype=dtype, device=self.backend.device)
            for name, shape in param_shapes(self.config).items()
        }

    def _fuse_qkv(self) -> dict[str, Array]:
        """Fused storage, the one place it is defined: each layer's query, key and value weights
        live in one (D + 2 Dkv, C) buffer ``layer{i}.attn_wqkv`` (biases in one ``attn_wqkv_b``;
        D = n_head * head_dim, Dkv = n_kv_head * head_dim, so the parts are unequal under
        grouped-query attention), a SwiGLU MLP's gate and up weights in one (2H, C) buffer
        ``layer{i}.mlp_gate_up``, and ``params[...attn_wq]`` etc. are views of them, so each
        projection is one matmul with no per-step concatenation. The core finds the buffers by
        those names; the state dict does not list them. Parameters must therefore be updated in
        place (``p -= ...``, ``p[...] = ...``), as the optimizers and ``load_state_dict`` do.

        Returns the dict the core reads: the parameters plus the fused buffers."""
        xp = self.xp
        core_params = dict(self.params)
        for i in range(self.config.n_layer):
            for fused, parts in (("attn_wqkv", core.QKV), ("mlp_gate_up", core.GATE_UP)):
                for suffix in ("", "_b"):
                    names = [f"layer{i}.{part}{suffix}" for part in parts]
                    if names[0] not in self.params:
                        continue
                    buffer = xp.concat([self.params[name] for name in names])  # (sum of widths, C) or (sum,)
                    start = 0
                    for name in names:
                        width = self.params[name].shape[0]
                        self.params[name] = core_params[name] = buffer[start : start + width, ...]
                        start += width
                    core_params[f"layer{i}.{fused}{suffix}"] = buffer
        return core_params

    def state_dict(self) -> dict[str, Array]:
        """Name -> the model's own parameter arrays (not copies), in a new dict."""
        return dict(self.params)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy ``state`` (NumPy or backend arrays) into the parameters, in place.

        Raises:
            KeyError: a parameter is missing from ``state``, or ``state`` has a name the model lacks.
            ValueError: a tensor's shape differs from the parameter's.
        """
        missing = sorted(set(self.params) - set(state))
        extra = sorted(set(state) - set(self.params))
        if missing or extra:
            raise KeyError(f"state dict does not match the model: missing {missing}, unexpected {extra}")
        converted = {}
        for name, value in state.items():
            value = self._to_backend(value, self.dtype)
            if tuple(value.shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"state dict tensor {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(self.params[name].shape)}"
                )
            converted[name] = value
        for name, value in converted.items():
            self.params[name][...] = value

    def num_params(self) -> int:
        return count_params(self.config).total

    def _to_backend(self, value: Any, dtype: str | None = None) -> Array:
        """NumPy array, list or backend array -> array of this model's backend (and dtype)."""
        if type(value) is self.backend.array_type:
            return value if dtype is None else self.xp.astype(value, getattr(self.xp, dtype))
        host = to_numpy(value)
        return self.backend.asarray(host if dtype is None else host.astype(dtype))

    # -- modes and the dropout generator ---------------------------------------------------------

    def train(self, mode: bool = True) -> GPT:
        """Training mode turns dropout on (when config.dropout > 0)."""
        self.training = mode
        return self

    def eval(self) -> GPT:
        return self.train(False)

    def rng_state(self) -> dict[str, Any]:
        """The state of the dropout generator (JSON-serializable), for exact resume."""
        return self._dropout_rng.bit_generator.state

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state returned by :meth:`rng_state`."""
        self._dropout_rng.bit_generator.state = dict(state)

    def _coins(self, rng: Any) -> core.Coins:
        # NumPy's Generator draws float32 or float64 only; dropout compares coins with p, so a
        # 16-bit model draws float32 coins (the same stream as a float32 model's).
        dtype = self.dtype if self.dtype in DTYPES else "float32"
        return lambda shape: self.backend.uniform(rng, shape, dtype)

    # -- forward and backward -------------------------------------------------------------------

    def forward(
        self, idx: Any, targets: Any = None, *, kv_cache: KVCache | None = None, last_only: bool = False
    ) -> tuple[Array, float | None]:
        """Logits for every position, and the mean cross-entropy when targets are given.

        Args:
            idx: integer token ids (B, T), T <= block_size; NumPy, backend array or nested lists.
            targets: the next token at each position, same shape; -1 marks a position to ignore.
            kv_cache: generation only: past keys and values; idx holds the next positions.
            last_only: unembed only the last position (generation needs no more): logits (B, 1, V).

        Returns:
            ``(logits, loss)``: logits (B, T, V) on the backend, loss a Python float or None.
        """
        cfg = self.config
        past = kv_cache.length if kv_cache is not None else 0
        idx = self._check_tokens(idx, "idx", past)
        B, T = idx.shape
        if targets is not None:
            if kv_cache is not None:
                raise ValueError("targets cannot be combined with kv_cache (the cache is for generation)")
            targets = self._check_tokens(targets, "targets", 0, allow_ignore=True)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
            if last_only:
                raise ValueError("last_only=True gives no loss: the loss needs the logits of every position")
        dropout = cfg.dropout if self.training else 0.0
        chunks = self.runner.chunks(B, T * cfg.n_embd) if kv_cache is None else [slice(0, B)]
        if len(chunks) == 1:
            logits, loss, cache = self.runner.run(
                core.gpt_forward, self._core_params, cfg, idx, targets, kernels=self.kernels, dropout=dropout,
                coins=self._coins(self._dropout_rng), kv_cache=kv_cache, last_only=last_only,
            )  # fmt: skip
            self._caches = [cache]
            return logits, None if loss is None else float(loss)
        # One chunk of rows per thread. Each draws its dropout coins from its own generator, seeded
        # from the model's, so that one thread count gives one result. Each chunk sums its losses;
        # the mean divides by the whole batch's count of targets.
        rngs = [host_rng(int(self._dropout_rng.integers(2**63))) if dropout > 0 else None for _ in chunks]
        results = self.runner.map(
            lambda rows, rng: core.gpt_forward(
                self._core_params, cfg, idx[rows], None if targets is None else targets[rows], kernels=self.kernels,
                dropout=dropout, coins=self._coins(rng), last_only=last_only, reduction="sum",
            ),
            list(zip(chunks, rngs)),
        )  # fmt: skip
        self._caches = [cache for _, _, cache in results]
        logits = self.xp.concat([logits for logits, _, _ in results], axis=0)  # (B, T, V)
        if targets is None:
            return logits, None
        count = sum(core.valid_positions(cache) for cache in self._caches)
        return logits, sum(float(loss) for _, loss, _ in results) / count if count else math.nan

    __call__ = forward

    def backward(self, loss_scale: float = 1.0) -> dict[str, Array]:
        """Gradients of the last forward's loss, name -> array, the names and shapes of state_dict().

        Args:
            loss_scale: the gradients are those of ``loss_scale * loss`` (the chain rule starts at
                dloss = loss_scale): loss scaling for float16 (``arraygpt.precision.LossScaler``).

        Raises:
            RuntimeError: there was no forward with targets since the last backward.
        """
        caches = self._caches
        if caches is None or caches[0].loss is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        self._caches = None
        if len(caches) == 1:
            grads = self.runner.run(core.gpt_backward, loss_scale, caches[0], self.config, kernels=self.kernels)
        else:  # loss = (sum over chunks of each chunk's summed loss) / (valid positions in the batch)
            count = sum(core.valid_positions(cache) for cache in caches)
            dloss = loss_scale / count if count else math.nan
            per_chunk = self.runner.map(
                lambda cache: core.gpt_backward(dloss, cache, self.config, kernels=self.kernels), [(c,) for c in caches]
            )
            grads = per_chunk[0]
            for other in per_chunk[1:]:
                for name, g in other.items():
                    grads[name] += g
        return {name: grads[name] for name in self.params}

    def attention_patterns(self) -> list[Array]:
        """The attention probabilities of the last forward, one (B, NH, T, Tk) array per layer:
        entry [b, h, t, s] is how much position t of row b attends to position s in head h."""
        if self._caches is None:
            raise RuntimeError("attention_patterns() needs a forward() first")
        per_chunk = [[block.attn.probs for block in cache.blocks] for cache in self._caches]
        if len(per_chunk) == 1:
            return per_chunk[0]
        return [self.xp.concat(layer, axis=0) for layer in zip(*per_chunk)]

    def residual_stream(self, idx: Any) -> list[Array]:
        """The residual stream (B, T, C) after the embedding and after each block, for ``idx``
        (eval mode, no dropout): what the logit lens unembeds (``arraygpt.core.unembed``)."""
        return core.residual_stream(self._core_params, self.config, self._check_tokens(idx, "idx", 0), self.kernels)

    def unembed(self, x: Array) -> Array:
        """Logits (B, T, V) of a residual stream x (B, T, C): the final norm, then the unembedding."""
        return core.unembed(self._core_params, self.config, x, self.kernels)[0]

    # -- input checks ------------------------------------------------------------------------

    def _check_tokens(self, tokens: Any, arg: str, past: int, allow_ignore: bool = False) -> Array:
        """Validate a (B, T) integer array of token ids and move it to the backend. Host arrays are
        checked on the host, before the transfer, so that no device sync is needed."""
        on_backend = type(tokens) is self.backend.array_type
        xp = self.xp if on_backend else host_namespace()
        if not on_backend:
            tokens = to_numpy(tokens)
        if not xp.isdtype(tokens.dtype, "integral"):
            raise TypeError(f"{arg} must be an integer array of token ids, got dtype {tokens.dtype}")
        if tokens.ndim != 2:
            raise ValueError(f"{arg} must be 2-D (B, T), got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if B == 0 or T == 0:
            raise ValueError(f"{arg} must have at least one row and one position, got shape {(B, T)}")
        if past + T > self.config.block_size:
            where = f" after {past} cached positions" if past else ""
            raise ValueError(f"{arg} has {T} positions{where}; block_size is {self.config.block_size}")
        low, high = int(xp.min(tokens)), int(xp.max(tokens))
        lowest = -1 if allow_ignore else 0
        if low < lowest or high >= self.config.vocab_size:
            allowed = "-1 (ignore) or " if allow_ignore else ""
            raise ValueError(
                f"{arg} holds token id {low if low < lowest else high}; allowed: {allowed}0 <= id < vocab_size "
                f"({self.config.vocab_size})"
            )
        return tokens if on_backend else self.backend.asarray(tokens.astype("int64", copy=False))

    # -- other formats (delegates to arraygpt.formats, which knows them) ------------------------

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs: Any) -> GPT:
        """The model of any directory ``arraygpt.load`` opens (e.g. a transformers GPT-2)."""
        from arraygpt.formats import load

        return load(directory, **kwargs).model

    def save_pretrained(self, directory: str) -> None:
        """Write a Hugging Face transformers directory: GPT-2 for a GPT-2-style config, Llama for a
        rotary one (``arraygpt.save(..., format="gpt2" or "llama")``)."""
        from arraygpt.formats import save

        save(self, directory, format="llama" if self.config.position == "rope" else "gpt2")
