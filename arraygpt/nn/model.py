"""The GPT: configuration, presets, parameter shapes and counts, and :class:`GPT`, the thin
stateful model that holds the parameters, the dropout generator and the last forward's caches,
and calls the pure core (``arraygpt.nn.core``) for the math.

Parameters live in one flat dict, name -> array, with the names of the microgpt table (weights
stored (out, in)).

Not here: the forward and backward themselves (``core.py``, ``layers.py``), splitting a batch
across threads (``runner.py``), optimizers, training loops, sampling, checkpoint formats.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from arraygpt.config import COMPUTE_DTYPES, DTYPES, GPTConfig
from arraygpt.nn import core, quant
from arraygpt.nn.core import GPTCache, KVCache
from arraygpt.nn.dropout import dropout_coins, dropout_row_seeds
from arraygpt.nn.kernels import select_kernels
from arraygpt.nn.lora import LORA_TARGETS, LoRA, init_adapters, merge
from arraygpt.nn.params import count_params, fuse, param_shapes
from arraygpt.nn.runner import BatchRunner
from arraygpt.xp import Array, Backend, get_backend, host_full, host_namespace, host_rng, load_backend, to_numpy

__all__ = ["GPT"]


class GPT:
    """A GPT whose parameters live on a backend, with a hand-written forward and backward.

    The math is in ``arraygpt.nn.core`` (pure functions over parameters, config and named caches);
    this class holds the state around it: the parameters, the dropout generator, the last
    forward's caches, the kernels and the thread runner.

    Args:
        config: the hyperparameters.
        seed: seed of the host NumPy generator that draws the initial weights, so one seed gives
            the same weights on every backend.
        dtype: ``float32`` or ``float64``; or a low precision of ``COMPUTE_DTYPES`` (``float16``,
            ``bfloat16`` where the backend has it) to compute in, for inference or as the compute
            model of :class:`arraygpt.training.precision.MixedPrecision`, which keeps float32 master weights.
        backend: a backend name or object; default the active one (``ARRAYGPT_BACKEND``).
        init: draw the initial weights (default); ``False`` leaves every parameter at zero, for
            callers that load a state dict next and need not pay for the draw.
        threads: how many host threads a forward/backward may split its batch across (rows in
            contiguous chunks; None: the backend's choice, e.g. ``ARRAYGPT_NUM_THREADS`` or the
            cores on numpy with OpenBLAS, else 1). Results equal one thread's up to rounding,
            dropout included (a row's coins depend on its index, not on its thread). Only the
            numpy backend holds BLAS to one thread per chunk (docs/architecture.md, "Threads").
        kernels: the layer pairs to run (``arraygpt.nn.kernels.select_kernels``): None for the
            backend's choice, ``"reference"`` for the pairs of ``layers.py``, or a
            :class:`arraygpt.nn.core.Kernels` record.
        params: the parameters themselves (name -> array, or an ``arraygpt.nn.quant``
            quantized weight kept as it is, e.g. over a memory-mapped file), instead of drawing
            them: what the loaders pass.

    Example:
        >>> model = GPT(GPTConfig.preset("microgpt"), seed=0)
        >>> logits, loss = model.forward([[0, 5, 3]], targets=[[5, 3, 0]])
        >>> grads = model.backward()  # name -> array, same names and shapes as state_dict()
        >>> sorted(grads) == sorted(model.state_dict())
        True
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
        kernels: core.Kernels | str | None = None,
        params: Mapping[str, Any] | None = None,
    ):
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
        if params is not None:
            self.params: dict[str, Array] = self._given_params(params)
        else:
            self.params = self._init_params(seed) if init else self._zero_params()
        self._core_params = fuse(self.params, self.config.n_layer, self.xp)
        self.kernels = select_kernels(config, self.backend, dtype, kernels)
        self.runner = BatchRunner(self.backend.threads if threads is None else threads, self.backend)
        self._dropout_rng = host_rng(seed + 1)
        self._caches: list[GPTCache] | None = None  # the last forward's, one per chunk of rows
        self.lora: LoRA | None = None  # set by add_lora: then only the adapters train
        self.adapters: dict[str, Array] = {}  # "layer{i}.<weight>.lora_a" (r, in) / ".lora_b" (out, r)

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

    def _given_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` (the ``params=`` argument) checked against the config: floats moved to the
        backend in the model's dtype, quantized weights kept as they are (no copy)."""
        shapes = param_shapes(self.config)
        missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
        if missing or extra:
            raise KeyError(f"params do not match the model: missing {missing[:6]}, unexpected {extra[:6]}")
        out = {}
        for name, value in params.items():
            if not quant.is_quantized(value):
                value = self._to_backend(value, self.dtype)
            if tuple(value.shape) != tuple(shapes[name]):
                raise ValueError(f"parameter {name!r} has shape {tuple(value.shape)}, the model expects {shapes[name]}")
            out[name] = value
        return out

    def quantize(self, kind: str) -> GPT:
        """Store the linear weights (every matrix but ``wpe``; ``wte`` too, looked up row by row
        and, tied, the vocabulary projection) as GGUF blocks of ``kind`` (``q8_0``, ``q4_0``,
        ``q4_1``, ``q5_0`` or ``q5_1``: ``arraygpt.nn.quant.QUANTIZERS``), quantized by the ``gguf`` library. A
        matrix whose rows are not whole blocks stays as it is. Inference only: :meth:`backward`
        refuses until :meth:`dequantize`. Returns the model.

        Example:
            >>> model = GPT(GPTConfig.preset("microgpt")).quantize("q8_0")  # doctest: +SKIP
        """
        quant.check_quantizer(kind)
        per_block = quant.BLOCKS[kind][0]
        for name, w in self.params.items():
            if len(w.shape) == 2 and name != "wpe" and w.shape[1] % per_block == 0:
                dense = quant.dequantize(w) if isinstance(w, quant.QuantizedWeight) else to_numpy(w)
                self.params[name] = quant.quantize(dense, kind)
        self._core_params = {**fuse(self.params, self.config.n_layer, self.xp), **self.adapters}
        return self

    def dequantize(self) -> GPT:
        """Quantized weights back to arrays of the model's dtype (what their blocks stand for), so
        that the model trains. Returns the model."""
        for name, w in self.params.items():
            if isinstance(w, quant.QuantizedWeight):
                self.params[name] = self._to_backend(to_numpy(quant.dequantize(w)), self.dtype)
        self._core_params = {**fuse(self.params, self.config.n_layer, self.xp), **self.adapters}
        return self

    @property
    def quantized(self) -> dict[str, str]:
        """Name -> kind of each parameter stored as GGUF blocks (empty for a float model)."""
        return {name: w.kind for name, w in self.params.items() if isinstance(w, quant.QuantizedWeight)}

    # -- LoRA adapters ------------------------------------------------------------------------

    def add_lora(self, lora: LoRA, seed: int = 0) -> None:
        """Attach LoRA adapters to every layer's ``lora.targets`` weights; from then on the forward
        adds ``(alpha / r) (x A^T) B^T`` to each, and :meth:`backward` returns the adapters'
        gradients only (the parameters are frozen). A (r, in) is drawn as PEFT draws it
        (``kaiming_uniform_(a=sqrt(5))``: uniform in +-1/sqrt(in)) from a host generator seeded
        ``[seed, 17]``; B (out, r) starts at zero, so the model starts as it was.

        Raises:
            ValueError: adapters are already attached, or a target is not a weight of this model.
        """
        if self.lora is not None:
            raise ValueError("this model already has LoRA adapters")
        missing = [t for t in lora.targets if "layer0." + t not in self.params]
        if missing:
            has = [t for t in LORA_TARGETS if "layer0." + t in self.params]
            raise ValueError(
                f"LoRA target(s) {', '.join(missing)} are not weights of this model; it has {', '.join(has)}"
            )
        adapters = init_adapters(self.params, self.config.n_layer, lora, seed, self.dtype, self.backend)
        self.lora, self.adapters = lora, adapters
        self._core_params.update(adapters)

    def load_adapters(self, state: Mapping[str, Any]) -> None:
        """Copy ``state`` (name -> array, the names of :attr:`adapters`) into the adapters, in place.

        Raises:
            KeyError: the names differ from the adapters'. ValueError: a shape differs.
        """
        if set(state) != set(self.adapters):
            missing, extra = sorted(set(self.adapters) - set(state)), sorted(set(state) - set(self.adapters))
            raise KeyError(f"adapters do not match the model's: missing {missing[:4]}, unexpected {extra[:4]}")
        converted = {}
        for name, value in state.items():
            converted[name] = value = self._to_backend(value, self.dtype)
            if tuple(value.shape) != tuple(self.adapters[name].shape):
                raise ValueError(
                    f"adapter {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(self.adapters[name].shape)}"
                )
        for name, value in converted.items():
            self.adapters[name][...] = value

    @property
    def trainable(self) -> dict[str, Array]:
        """What training updates: the adapters when LoRA is attached, else every parameter."""
        return self.adapters if self.lora is not None else self.params

    def merged(self) -> GPT:
        """A new GPT without adapters whose weights are W + (alpha / r) B A (PEFT's merge): the
        same function as this model, for the formats that hold plain weights."""
        model = GPT(self.config, dtype=self.dtype, backend=self.backend, init=False, threads=self.threads)
        model.load_state_dict(self.params)
        if self.lora is not None:
            for name, weight in merge(self.params, self.adapters, self.lora, self.config.n_layer).items():
                model.params[name][...] = weight
        model.set_rng_state(self.rng_state())
        return model

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
            if not quant.is_quantized(value):
                value = self._to_backend(value, self.dtype)
            if tuple(value.shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"state dict tensor {name!r} has shape {tuple(value.shape)}, "
                    f"the model expects {tuple(self.params[name].shape)}"
                )
            converted[name] = value
        for name, value in converted.items():
            if quant.is_quantized(value) or quant.is_quantized(self.params[name]):
                self.params[name] = value  # blocks are kept, not copied
            else:
                self.params[name][...] = value
        if any(quant.is_quantized(v) for v in converted.values()) or self.quantized:
            self._core_params = {**fuse(self.params, self.config.n_layer, self.xp), **self.adapters}

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
        """The state of the dropout generator (JSON-serializable), for exact resume: it keys the
        training forwards that are given no ``dropout_key``."""
        return self._dropout_rng.bit_generator.state

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state returned by :meth:`rng_state`.

        Raises:
            ValueError: ``state`` is not a state of this generator (a hostile or damaged file).
        """
        try:
            self._dropout_rng.bit_generator.state = dict(state)
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise ValueError(
                f"not a dropout generator state of {type(self._dropout_rng.bit_generator).__name__}: {e}"
            ) from None

    def _coins(self, key: tuple[int, ...], first_row: int) -> core.Coins:
        """The coins of one forward over rows ``first_row ..`` (the rule at the top of the module).
        Each call is the next dropout site; a chunk of rows gets its own function, so every chunk
        counts the sites from 0."""
        # dropout compares coins with p: a 16-bit model draws float32 coins (a float32 model's)
        dtype = self.dtype if self.dtype in DTYPES else "float32"
        sites = itertools.count()

        def coins(shape: tuple[int, ...]) -> Array:
            site = next(sites)
            if self.backend.device_uniform is None:
                host = dropout_coins(key, site, first_row, shape[0], math.prod(shape[1:]), dtype)  # (B, rest)
                return self.backend.asarray(host.reshape(shape))
            seeds = dropout_row_seeds(key, site, first_row, shape[0])  # (B,)
            # a GPU generator per row, seeded with the row's seed (its low 63 bits: any int64 seed fits)
            rows = [self.backend.device_uniform(int(seed) & (2**63 - 1), shape[1:], dtype) for seed in seeds]
            return self.xp.stack(rows)  # (B, ...)

        return coins

    # -- forward and backward -------------------------------------------------------------------

    def forward(
        self,
        idx: Any,
        targets: Any = None,
        *,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
        dropout_key: tuple[int, ...] | None = None,
        first_row: int = 0,
    ) -> tuple[Array, float | None]:
        """Logits for every position, and the mean cross-entropy when targets are given.

        Args:
            idx: integer token ids (B, T), T <= block_size; NumPy, backend array or nested lists.
            targets: the next token at each position, same shape; -1 marks a position to ignore.
            kv_cache: generation only: past keys and values; idx holds the next positions.
            last_only: unembed only the last position (generation needs no more): logits (B, 1, V).
            dropout_key, first_row: in training mode with dropout, what the coins depend on (the
                rule at the top of this module): a key of integers, such as the run's (seed,
                step), and the global index of idx's first row. Without a key, the forward draws
                one from the model's dropout generator.

        Returns:
            ``(logits, loss)``: logits (B, T, V) on the backend, loss a Python float or None.
            With LoRA adapters (:meth:`add_lora`) every adapted weight acts as W + (alpha / r) B A.
        """
        cfg = self.config
        past = kv_cache.length if kv_cache is not None else 0
        idx = check_tokens(idx, "idx", past, cfg, self.backend)
        B, T = idx.shape
        if targets is not None:
            if kv_cache is not None:
                raise ValueError("targets cannot be combined with kv_cache (the cache is for generation)")
            targets = check_tokens(targets, "targets", 0, cfg, self.backend, allow_ignore=True)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
            if last_only:
                raise ValueError("last_only=True gives no loss: the loss needs the logits of every position")
        dropout = cfg.dropout if self.training else 0.0
        if dropout > 0 and dropout_key is None:
            dropout_key = (int(self._dropout_rng.integers(2**63)),)
        key = dropout_key or ()
        chunks = self.runner.chunks(B, T * cfg.n_embd) if kv_cache is None else [slice(0, B)]
        if len(chunks) == 1:
            logits, loss, cache = self.runner.run(
                core.gpt_forward,
                self._core_params,
                cfg,
                idx,
                targets,
                kernels=self.kernels,
                dropout=dropout,
                coins=self._coins(key, first_row),
                kv_cache=kv_cache,
                last_only=last_only,
                lora_scale=self._lora_scale,
            )
            self._caches = [cache]
            return logits, None if loss is None else float(loss)
        # One chunk of rows per thread, its coins those of its rows' global indices. Each chunk
        # sums its losses; the mean divides by the whole batch's count of targets.
        results = self.runner.map(
            lambda rows: core.gpt_forward(
                self._core_params,
                cfg,
                idx[rows],
                None if targets is None else targets[rows],
                kernels=self.kernels,
                dropout=dropout,
                coins=self._coins(key, first_row + rows.start),
                last_only=last_only,
                reduction="sum",
                lora_scale=self._lora_scale,
            ),
            [(rows,) for rows in chunks],
        )
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
                dloss = loss_scale): loss scaling for float16 (``arraygpt.training.precision.LossScaler``).

        With LoRA adapters, the gradients of the adapters only (the names of :attr:`adapters`).

        Raises:
            RuntimeError: there was no forward with targets since the last backward.
        """
        caches = self._caches
        if caches is None or caches[0].loss is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        if self.quantized:
            raise RuntimeError(quant.TRAINING_MESSAGE)
        self._caches = None
        frozen = self.lora is not None
        if len(caches) == 1:
            grads = self.runner.run(
                core.gpt_backward, loss_scale, caches[0], self.config, kernels=self.kernels, frozen=frozen
            )
        else:  # loss = (sum over chunks of each chunk's summed loss) / (valid positions in the batch)
            count = sum(core.valid_positions(cache) for cache in caches)
            dloss = loss_scale / count if count else math.nan
            per_chunk = self.runner.map(
                lambda cache: core.gpt_backward(dloss, cache, self.config, kernels=self.kernels, frozen=frozen),
                [(c,) for c in caches],
            )
            grads = per_chunk[0]
            for other in per_chunk[1:]:
                for name, g in other.items():
                    grads[name] += g
        return {name: grads[name] for name in self.trainable}

    @property
    def _lora_scale(self) -> float | None:
        return None if self.lora is None else self.lora.scale

    def attention_patterns(self) -> list[Array]:
        """The attention probabilities of the last forward, one (B, NH, T, Tk) array per layer:
        entry [b, h, t, s] is how much position t of row b attends to position s in head h."""
        if self._caches is None or not self._caches[0].blocks:
            raise RuntimeError("attention_patterns() needs a forward() without kv_cache first")
        per_chunk = [[block.attn.probs for block in cache.blocks] for cache in self._caches]
        if len(per_chunk) == 1:
            return per_chunk[0]
        return [self.xp.concat(layer, axis=0) for layer in zip(*per_chunk)]

    def residual_stream(self, idx: Any) -> list[Array]:
        """The residual stream (B, T, C) after the embedding and after each block, for ``idx``
        (eval mode, no dropout): what the logit lens unembeds (``arraygpt.nn.core.unembed``)."""
        idx = check_tokens(idx, "idx", 0, self.config, self.backend)
        return core.residual_stream(self._core_params, self.config, idx, self.kernels, self._lora_scale)

    def unembed(self, x: Array) -> Array:
        """Logits (B, T, V) of a residual stream x (B, T, C): the final norm, then the unembedding."""
        return core.unembed(self._core_params, self.config, x, self.kernels)[0]

    # -- input checks ------------------------------------------------------------------------


def check_tokens(
    tokens: Any, arg: str, past: int, config: GPTConfig, backend: Backend, allow_ignore: bool = False
) -> Array:
    """Validate a (B, T) integer array of token ids and move it to the backend. Host arrays are
    checked on the host, before the transfer, so that no device sync is needed."""
    on_backend = type(tokens) is backend.array_type
    xp = backend.xp if on_backend else host_namespace()
    if not on_backend:
        tokens = to_numpy(tokens)
    if not xp.isdtype(tokens.dtype, "integral"):
        raise TypeError(f"{arg} must be an integer array of token ids, got dtype {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{arg} must be 2-D (B, T), got shape {tuple(tokens.shape)}")
    B, T = tokens.shape
    if B == 0 or T == 0:
        raise ValueError(f"{arg} must have at least one row and one position, got shape {(B, T)}")
    if past + T > config.block_size:
        where = f" after {past} cached positions" if past else ""
        raise ValueError(f"{arg} has {T} positions{where}; block_size is {config.block_size}")
    low, high = int(xp.min(tokens)), int(xp.max(tokens))
    lowest = -1 if allow_ignore else 0
    if low < lowest or high >= config.vocab_size:
        allowed = "-1 (ignore) or " if allow_ignore else ""
        raise ValueError(
            f"{arg} holds token id {low if low < lowest else high}; allowed: {allowed}0 <= id < vocab_size "
            f"({config.vocab_size})"
        )
    return tokens if on_backend else backend.asarray(tokens.astype("int64", copy=False))
