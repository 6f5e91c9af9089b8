"""The GPT: configuration, presets, parameter shapes and counts, and the model that wires the
layer pairs of ``layers.py`` into a forward pass and its mirror-image backward pass.

Data flow (pre-norm transformer, Radford et al. 2019):

    idx (B,T) -> encoder: wte[idx] + wpe[t] -> [dropout] -> [norm_emb]
      -> n_layer x block:  x = x + dropout(attn_wo @ attention(norm1(x) -> q, k, v))
                           x = x + dropout(mlp_fc2 @ act(mlp_fc1 @ norm2(x)))
      -> [normf] -> unembedding (lm_head, or wte when tied) -> logits (B,T,V)
      -> softmax cross-entropy against targets -> loss

``backward`` walks the same steps in reverse with the caches the forward kept. Parameters live
in one flat dict, name -> array, with the names of the microgpt table (weights stored (out, in)).

Not here: optimizers, training loops, sampling, checkpoint formats.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from arraygpt import layers
from arraygpt.shim import Backend, get_backend, host_full, host_namespace, host_rng, namespace, to_numpy

Array = Any

NORM_KINDS = ("layernorm", "rmsnorm")
INIT_OUTPUT_KINDS = ("scaled", "normal", "zero")
DTYPES = ("float32", "float64")
# Measured on 2 cores: a chunk of fewer positions x channels runs slower in a thread than inline
# (16,384: 5-9% slower; 32,768: 0-12% faster; the nanoGPT CPU config's 49,152: 11-15% faster).
MIN_WORK_PER_THREAD = 32768


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
        activation: ``gelu_tanh``, ``gelu``, ``relu`` or ``relu2``.
        tie_embeddings: unembed with ``wte`` (GPT-2) instead of a separate ``lm_head``.
        init_std: std of the normal initialization of weights and embeddings.
        init_output: init of ``attn_wo`` and ``mlp_fc2``: ``scaled`` (init_std / sqrt(2 n_layer),
            GPT-2), ``normal`` (init_std) or ``zero`` (microgpt).
        dropout: probability for embedding, attention and residual dropout while training.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    head_dim: int | None = None
    mlp_hidden: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_affine: bool = True
    norm_emb: bool = False
    norm_final: bool = True
    bias: bool = True
    activation: str = "gelu_tanh"
    tie_embeddings: bool = True
    init_std: float = 0.02
    init_output: str = "scaled"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("norm_affine", "norm_emb", "norm_final", "bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("norm_eps", "init_std", "dropout"):
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
        choices = {"norm": NORM_KINDS, "activation": tuple(layers.ACTIVATIONS), "init_output": INIT_OUTPUT_KINDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"GPTConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.init_std >= 0:
            raise ValueError(f"GPTConfig.init_std must be >= 0, got {self.init_std!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def attn_dim(self) -> int:
        """n_head * head_dim: the width of the queries, keys and values (may differ from n_embd)."""
        return self.n_head * self.head_dim  # type: ignore[operator]

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


def check_fields(cls: type, given: Mapping[str, Any], what: str) -> None:
    """Raise ``ValueError`` naming every key of ``given`` that is not a field of dataclass ``cls``."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"unknown {what}(s) {unknown}; allowed: {', '.join(sorted(fields))}")


_GPT2 = dict(vocab_size=50257, block_size=1024)
_GPT3 = dict(vocab_size=50257, block_size=2048)

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
}


# ----------------------------------------------------------------------------------------------
# parameter shapes and counts


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in initialization order. The single source of truth for
    the state dict, the initializer and ``count_params``."""
    C, D, H, V = config.n_embd, config.attn_dim, config.mlp_hidden, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte": (V, C), "wpe": (config.block_size, C)}
    if not config.tie_embeddings:
        shapes["lm_head"] = (V, C)

    def norm(name: str) -> None:
        if config.norm_affine:
            shapes[name] = (C,)
            if config.bias and config.norm == "layernorm":
                shapes[name + "_b"] = (C,)

    def linear(name: str, n_out: int, n_in: int) -> None:
        shapes[name] = (n_out, n_in)
        if config.bias:
            shapes[name + "_b"] = (n_out,)

    if config.norm_emb:
        norm("norm_emb")
    for i in range(config.n_layer):
        norm(f"layer{i}.norm1")
        for w in ("attn_wq", "attn_wk", "attn_wv"):
            linear(f"layer{i}.{w}", D, C)
        linear(f"layer{i}.attn_wo", C, D)
        norm(f"layer{i}.norm2")
        linear(f"layer{i}.mlp_fc1", H, C)
        linear(f"layer{i}.mlp_fc2", C, H)
    if config.norm_final:
        norm("normf")
    return shapes


CATEGORIES = ("embedding", "key", "query", "value", "output", "up_projection", "down_projection", "unembedding", "other")
_CATEGORY_OF = {
    "wte": "embedding", "attn_wk": "key", "attn_wq": "query", "attn_wv": "value", "attn_wo": "output",
    "mlp_fc1": "up_projection", "mlp_fc2": "down_projection", "lm_head": "unembedding",
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
# the KV cache of generation


class KVCache:
    """Keys and values of past positions, per layer, so that each new token costs one position's
    work. Buffers of (B, block_size, D) are allocated on first use and filled left to right."""

    def __init__(self, config: GPTConfig):
        self.block_size = config.block_size
        self.keys: list[Array | None] = [None] * config.n_layer
        self.values: list[Array | None] = [None] * config.n_layer
        self.length = 0  # positions stored so far

    def append(self, layer: int, k: Array, v: Array) -> tuple[Array, Array]:
        """Store k, v (B, T, D) after the past positions; return all keys and values (B, length+T, D)."""
        xp = namespace(k)
        B, T, D = k.shape
        if self.keys[layer] is None:
            self.keys[layer] = xp.zeros((B, self.block_size, D), dtype=k.dtype, device=k.device)
            self.values[layer] = xp.zeros((B, self.block_size, D), dtype=k.dtype, device=k.device)
        keys, values = self.keys[layer], self.values[layer]
        if keys.shape[0] != B:
            raise ValueError(f"KV cache holds a batch of {keys.shape[0]}, got a batch of {B}")
        end = self.length + T
        keys[:, self.length : end, :] = k
        values[:, self.length : end, :] = v
        return keys[:, :end, :], values[:, :end, :]

    def reset(self) -> None:
        """Forget every stored position; the buffers are kept for reuse."""
        self.length = 0

    def advance(self, T: int) -> None:
        """Mark T more positions as stored (called once per forward, after every layer appended)."""
        self.length += T


# ----------------------------------------------------------------------------------------------
# the model


class GPT:
    """A GPT whose parameters live on a backend, with a hand-written forward and backward.

    Args:
        config: the hyperparameters.
        seed: seed of the host NumPy generator that draws the initial weights, so one seed gives
            the same weights on every backend.
        dtype: ``float32`` or ``float64``.
        backend: a backend name or object; default the active one (``ARRAYGPT_BACKEND``).
        init: draw the initial weights (default); ``False`` leaves every parameter at zero, for
            callers that load a state dict next and need not pay for the draw.
        threads: how many host threads a forward/backward may split its batch across (rows in
            contiguous chunks; None: the backend's choice, e.g. ``ARRAYGPT_NUM_THREADS`` or the
            cores on numpy with OpenBLAS, else 1). Results equal one thread's up to rounding;
            dropout masks differ, but a fixed thread count stays exactly reproducible. Only the
            numpy backend holds BLAS to one thread per chunk (docs/architecture.md, "Threads").

    Example:
        >>> model = GPT(GPTConfig.preset("microgpt"), seed=0)
        >>> logits, loss = model.forward([[0, 5, 3]], targets=[[5, 3, 0]])
        >>> grads = model.backward()  # name -> array, same names and shapes as state_dict()
    """

    def __init__(
        self,
        config: GPTConfig,
        seed: int = 0,
        dtype: str = "float32",
        backend: str | Backend | None = None,
        *,
        init: bool = True,
        threads: int | None = None,
    ):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if isinstance(backend, str):
            from arraygpt.shim import load_backend

            backend = load_backend(backend)
        self.config = config
        self.backend: Backend = backend or get_backend()
        self.xp = self.backend.xp
        self.dtype = dtype
        self.training = False
        self.params: dict[str, Array] = self._init_params(seed) if init else self._zero_params()
        self._qkv = self._fuse_qkv()
        self._norm_forward, self._norm_backward = layers.NORMS[config.norm]
        self._act_forward, self._act_backward = layers.ACTIVATIONS[config.activation]
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        self.threads = threads if threads is not None else self.backend.threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0
        self._dropout_rng = host_rng(seed + 1)
        self._caches: list[dict[str, Any]] | None = None  # one per chunk of rows

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
                std = out_std[cfg.init_output] if short in ("attn_wo", "mlp_fc2") else cfg.init_std
                host = rng.standard_normal(shape) * std  # drawn even when std is 0: same stream for every init
            params[name] = self.backend.asarray(host.astype(self.dtype))
        return params

    def _zero_params(self) -> dict[str, Array]:
        dtype = getattr(self.xp, self.dtype)
        return {
            name: self.xp.zeros(shape, dtype=dtype, device=self.backend.device)
            for name, shape in param_shapes(self.config).items()
        }

    def _fuse_qkv(self) -> list[tuple[Array, Array | None]]:
        """Store each layer's query, key and value weights in one (3D, C) buffer (and biases in one
        (3D,) buffer), and make ``params[...attn_wq]`` etc. views of it: the attention projection is
        then one matmul with no per-step concatenation. Parameters must therefore be updated in
        place (``p -= ...``, ``p[...] = ...``), as the optimizers and ``load_state_dict`` do."""
        xp, D = self.xp, self.config.attn_dim
        fused = []
        for i in range(self.config.n_layer):
            buffers = []
            for suffix in ("", "_b"):
                names = [f"layer{i}.attn_w{x}{suffix}" for x in "qkv"]
                if names[0] not in self.params:
                    buffers.append(None)
                    continue
                buffer = xp.concat([self.params[name] for name in names])  # (3D, C) or (3D,)
                for j, name in enumerate(names):
                    self.params[name] = buffer[j * D : (j + 1) * D, ...]
                buffers.append(buffer)
            fused.append((buffers[0], buffers[1]))
        return fused

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

    # -- modes ------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> GPT:
        """Training mode turns dropout on (when config.dropout > 0)."""
        self.training = mode
        return self

    def eval(self) -> GPT:
        return self.train(False)

    # -- forward -------------------------------------------------------------------------------

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
        chunks = self._row_chunks(B, T) if kv_cache is None else [slice(0, B)]
        if len(chunks) == 1:
            logits, loss, caches = self._forward_rows(idx, targets, past, dropout, kv_cache, last_only, self._dropout_rng)
            self._caches = [caches]
            return logits, None if loss is None else float(loss)
        # Several chunks, one per thread; each draws its dropout coins from its own generator,
        # seeded from the model's, so that one thread count gives one result.
        # Each chunk sums its losses ("sum"); the mean divides by the whole batch's count.
        rngs = [host_rng(int(self._dropout_rng.integers(2**63))) if dropout > 0 else None for _ in chunks]
        results = self._in_threads(
            self._forward_rows,
            [(idx[rows], None if targets is None else targets[rows], past, dropout, None, last_only, rng, "sum")
             for rows, rng in zip(chunks, rngs)],
        )  # fmt: skip
        self._caches = [caches for _, _, caches in results]
        logits = self.xp.concat([logits for logits, _, _ in results], axis=0)  # (B, T, V)
        if targets is None:
            return logits, None
        total = self._valid_positions(self._caches)
        return logits, sum(float(loss) for _, loss, _ in results) / total if total else math.nan

    __call__ = forward

    def _forward_rows(self, idx: Array, targets: Array | None, past: int, dropout: float, kv_cache: KVCache | None,
                      last_only: bool, rng: Any, reduction: str = "mean") -> tuple[Array, Array | None, dict[str, Any]]:
        """The forward of a chunk of rows: logits (b, T, V), the chunk's loss (0-d) or None, caches."""  # fmt: skip
        cfg, p = self.config, self.params
        B, T = idx.shape
        x, enc = layers.encoder_forward(idx, p["wte"], p["wpe"], past)  # (B, T, C)
        x, drop_emb = self._dropout(x, dropout, rng)
        norm_emb = None
        if cfg.norm_emb:
            x, norm_emb = self._norm(x, "norm_emb")
        blocks = []
        for i in range(cfg.n_layer):
            x, block = self._block_forward(i, x, dropout, kv_cache, rng)
            blocks.append(block)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
            T = 1
        normf = None
        if cfg.norm_final:
            x, normf = self._norm(x, "normf")
        logits, unembed = layers.linear_forward(x, p["wte"] if cfg.tie_embeddings else p["lm_head"])  # (B, T, V)

        loss, ce = None, None
        if targets is not None:
            loss, ce = layers.crossentropy_forward(
                self.xp.reshape(logits, (B * T, cfg.vocab_size)), self.xp.reshape(targets, (B * T,)), reduction=reduction
            )
        caches = dict(enc=enc, drop_emb=drop_emb, norm_emb=norm_emb, blocks=blocks, normf=normf,
                      unembed=unembed, ce=ce)  # fmt: skip
        return logits, loss, caches

    def _valid_positions(self, chunks: list[dict[str, Any]]) -> int:
        """How many positions of the chunks' forward have a target (not -1)."""
        return sum(int(float(self.xp.sum(caches["ce"][2]))) for caches in chunks)

    def _row_chunks(self, B: int, T: int) -> list[slice]:
        """Contiguous chunks of the batch's rows, one per thread, each of at least
        MIN_WORK_PER_THREAD positions x channels (below that, threads cost more than they give)."""
        n = min(self.threads, B, max(1, B * T * self.config.n_embd // MIN_WORK_PER_THREAD))
        bounds = [B * i // n for i in range(n + 1)]
        return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]

    def _in_threads(self, fn: Callable[..., Any], calls: list[tuple[Any, ...]]) -> list[Any]:
        """``[fn(*args) for args in calls]``, the first on this thread and the rest on the pool.
        BLAS gets the cores that the chunks leave (one each when there is a chunk per thread)."""
        if self._pool is None or self._pool_pid != os.getpid():  # a forked child has no pool threads
            self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="arraygpt")
            self._pool_pid = os.getpid()
        with self.backend.blas_threads(max(1, self.threads // len(calls))):
            futures = [self._pool.submit(fn, *args) for args in calls[1:]]
            try:
                first = fn(*calls[0])
            except BaseException:  # an error or Ctrl-C: drop the chunks not started yet
                for future in futures:
                    future.cancel()
                raise
            finally:  # and let the running ones end before BLAS gets its threads back
                wait(futures)
            return [first] + [future.result() for future in futures]

    def _block_forward(self, i: int, x: Array, dropout: float, kv_cache: KVCache | None, rng: Any) -> tuple[Array, Any]:
        cfg, p = self.config, self.params
        name = f"layer{i}."
        D = cfg.attn_dim
        h, norm1 = self._norm(x, name + "norm1")
        w_qkv, b_qkv = self._qkv[i]  # (3D, C), (3D,): attn_wq, attn_wk, attn_wv stacked
        qkv, qkv_lin = layers.linear_forward(h, w_qkv, b_qkv)  # (B, T, 3D)
        q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
        if kv_cache is not None:
            k, v = kv_cache.append(i, k, v)  # (B, Tk, D)
        coins = None
        if dropout > 0.0:
            B, T = q.shape[:2]
            coins = self._coins((B, cfg.n_head, T, k.shape[1]), rng)
        y, attn = layers.attention_forward(q, k, v, cfg.n_head, dropout, coins)  # (B, T, D)
        y, wo = layers.linear_forward(y, p[name + "attn_wo"], p.get(name + "attn_wo_b"))  # (B, T, C)
        y, drop_attn = self._dropout(y, dropout, rng)
        x, _ = layers.residual_forward(x, y)
        h, norm2 = self._norm(x, name + "norm2")
        h, fc1 = layers.linear_forward(h, p[name + "mlp_fc1"], p.get(name + "mlp_fc1_b"))  # (B, T, H)
        h, act = self._act_forward(h)
        h, fc2 = layers.linear_forward(h, p[name + "mlp_fc2"], p.get(name + "mlp_fc2_b"))  # (B, T, C)
        h, drop_mlp = self._dropout(h, dropout, rng)
        x, _ = layers.residual_forward(x, h)
        return x, (norm1, qkv_lin, attn, wo, drop_attn, norm2, fc1, act, fc2, drop_mlp)

    def _norm(self, x: Array, name: str) -> tuple[Array, Any]:
        return self._norm_forward(x, self.params.get(name), self.params.get(name + "_b"), self.config.norm_eps)

    def _coins(self, shape: tuple[int, ...], rng: Any) -> Array:
        return self.backend.uniform(rng, shape, self.dtype)

    def _dropout(self, x: Array, p: float, rng: Any) -> tuple[Array, Any]:
        if p == 0.0:
            return x, None
        return layers.dropout_forward(x, p, self._coins(tuple(x.shape), rng))

    def rng_state(self) -> dict[str, Any]:
        """The state of the dropout generator (JSON-serializable), for exact resume."""
        return self._dropout_rng.bit_generator.state

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state returned by :meth:`rng_state`."""
        self._dropout_rng.bit_generator.state = dict(state)

    def attention_patterns(self) -> list[Array]:
        """The attention probabilities of the last forward, one (B, NH, T, Tk) array per layer:
        entry [b, h, t, s] is how much position t of row b attends to position s in head h."""
        if self._caches is None:
            raise RuntimeError("attention_patterns() needs a forward() first")
        per_chunk = [[block[2][4] for block in caches["blocks"]] for caches in self._caches]
        if len(per_chunk) == 1:
            return per_chunk[0]
        return [self.xp.concat(layer, axis=0) for layer in zip(*per_chunk)]

    # -- backward ------------------------------------------------------------------------------

    def backward(self) -> dict[str, Array]:
        """Gradients of the last forward's loss, name -> array, the names and shapes of state_dict().

        Raises:
            RuntimeError: there was no forward with targets since the last backward.
        """
        chunks = self._caches
        if chunks is None or chunks[0]["ce"] is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        self._caches = None
        if len(chunks) == 1:
            return self._backward_rows(chunks[0], 1.0)
        # loss = (sum over chunks of each chunk's summed loss) / (valid positions in the batch)
        total = self._valid_positions(chunks)
        dloss = 1.0 / total if total else math.nan
        per_chunk = self._in_threads(self._backward_rows, [(caches, dloss) for caches in chunks])
        grads = per_chunk[0]
        for other in per_chunk[1:]:
            for name, g in other.items():
                grads[name] += g
        return grads

    def _backward_rows(self, caches: dict[str, Any], dloss: float) -> dict[str, Array]:
        """The gradients of ``dloss`` times one chunk's loss."""
        cfg = self.config
        grads: dict[str, Array] = {}
        B, T = caches["enc"][0].shape

        dlogits = layers.crossentropy_backward(dloss, caches["ce"])  # (B*T, V)
        dx, dw_unembed, _ = layers.linear_backward(
            self.xp.reshape(dlogits, (B, T, cfg.vocab_size)), caches["unembed"]
        )  # (B, T, C)
        if caches["normf"] is not None:
            dx = self._norm_grads(dx, caches["normf"], "normf", grads)
        for i in reversed(range(cfg.n_layer)):
            dx = self._block_backward(i, dx, caches["blocks"][i], grads)
        if caches["norm_emb"] is not None:
            dx = self._norm_grads(dx, caches["norm_emb"], "norm_emb", grads)
        if caches["drop_emb"] is not None:
            dx = layers.dropout_backward(dx, caches["drop_emb"])
        dwte, grads["wpe"] = layers.encoder_backward(dx, caches["enc"])
        if cfg.tie_embeddings:
            dwte += dw_unembed  # wte is used twice: as the embedding and as the unembedding
        else:
            grads["lm_head"] = dw_unembed
        grads["wte"] = dwte
        return {name: grads[name] for name in self.params}

    def _block_backward(self, i: int, dx: Array, cache: Any, grads: dict[str, Array]) -> Array:
        cfg, xp = self.config, self.xp
        name = f"layer{i}."
        D = cfg.attn_dim
        norm1, qkv_lin, attn, wo, drop_attn, norm2, fc1, act, fc2, drop_mlp = cache
        # x = x + mlp(norm2(x))
        dx_skip, dh = layers.residual_backward(dx, None)
        if drop_mlp is not None:
            dh = layers.dropout_backward(dh, drop_mlp)
        dh = self._linear_grads(dh, fc2, name + "mlp_fc2", grads)
        dh = self._act_backward(dh, act)
        dh = self._linear_grads(dh, fc1, name + "mlp_fc1", grads)
        dx = self._norm_grads(dh, norm2, name + "norm2", grads)
        dx += dx_skip  # the residual's two gradients meet
        # x = x + attn(norm1(x))
        dx_skip, dy = layers.residual_backward(dx, None)
        if drop_attn is not None:
            dy = layers.dropout_backward(dy, drop_attn)
        dy = self._linear_grads(dy, wo, name + "attn_wo", grads)
        dq, dk, dv = layers.attention_backward(dy, attn)
        dh, dw_qkv, db_qkv = layers.linear_backward(xp.concat([dq, dk, dv], axis=-1), qkv_lin)  # (B, T, C)
        for j, w in enumerate(("attn_wq", "attn_wk", "attn_wv")):
            grads[name + w] = dw_qkv[j * D : (j + 1) * D, :]
            if db_qkv is not None:
                grads[name + w + "_b"] = db_qkv[j * D : (j + 1) * D]
        dx = self._norm_grads(dh, norm1, name + "norm1", grads)
        dx += dx_skip
        return dx

    def _linear_grads(self, dout: Array, cache: Any, name: str, grads: dict[str, Array]) -> Array:
        dx, grads[name], db = layers.linear_backward(dout, cache)
        if db is not None:
            grads[name + "_b"] = db
        return dx

    def _norm_grads(self, dout: Array, cache: Any, name: str, grads: dict[str, Array]) -> Array:
        dx, dw, db = self._norm_backward(dout, cache)
        if dw is not None:
            grads[name] = dw
        if db is not None:
            grads[name + "_b"] = db
        return dx

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

    # -- checkpoints -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, directory: str, **kwargs: Any) -> GPT:
        """Load a Hugging Face transformers GPT-2 directory (see ``arraygpt.interop``)."""
        from arraygpt import interop

        return interop.load_gpt2(directory, **kwargs)

    def save_pretrained(self, directory: str) -> None:
        """Write a Hugging Face transformers GPT-2 directory (see ``arraygpt.interop``)."""
        from arraygpt import interop

        interop.save_gpt2(self, directory)

