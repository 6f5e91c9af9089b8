"""Mixed-precision training: float32 master weights, a low-precision compute model, dynamic loss
scaling (docs/precision.md).

What lives in which precision:

    float32   the master weights (a float32 GPT's ``params``), the optimizer's state (it is built on
              them), the unscaled gradients, the loss and the norms' statistics
    float16   (or bfloat16 where the backend has it) the compute model's copy of the weights, the
              matmuls, the activations and the activation gradients

One step (:meth:`MixedPrecision.step`, the recipe of PyTorch's ``torch.amp.GradScaler``,
https://pytorch.org/docs/stable/amp.html#gradient-scaling and torch/amp/grad_scaler.py):
forward in the compute dtype; backward of ``S * loss`` (the chain rule starts at dloss = S, so
small activation gradients do not flush to zero in float16); gradients upcast to float32 and
multiplied by 1/S; if any is inf or nan the optimizer step is skipped, counted, and S is lowered
(``backoff_factor``); otherwise the optimizer updates the master weights, the compute copy is
refreshed from them, and after ``growth_interval`` clean steps in a row S grows by
``growth_factor``.

The loss and the norms run in float32 around the compute dtype's kernels (:func:`mixed_kernels`):
the cross-entropy's logsumexp and its mean over B*T positions, and LayerNorm's/RMSNorm's mean and
variance over C channels, lose most of their digits in float16 (a float16 sum of 512 losses of ~3
has a resolution of 1). Everything else, attention's softmax included, runs in the compute dtype.

Built on GPT's public API only (``GPT(config, dtype=...)``, ``params``, ``load_state_dict``,
``forward``, ``backward(loss_scale=...)``). Not here: the training loop (``arraygpt.training.loop``
calls :meth:`MixedPrecision.step`, or :meth:`~MixedPrecision.backward` and
:meth:`~MixedPrecision.apply` around its own accumulation), fused GPU kernels, CUDA graphs.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from arraygpt.config import COMPUTE_DTYPES
from arraygpt.nn import core
from arraygpt.nn.kernels import select_kernels
from arraygpt.nn.model import GPT
from arraygpt.training.optim import clip_grad_norm
from arraygpt.xp import Array, namespace

__all__ = [
    "PRECISIONS",
    "LossScaler",
    "MixedPrecision",
    "StepResult",
    "mixed_kernels",
    "mixed_precision",
    "overflow_expected",
    "set_tf32",
    "tf32_enabled",
]

# What TrainConfig(precision=...) may say: "full" computes in the model's own dtype.
PRECISIONS = ("full", "mixed-float16", "mixed-bfloat16")


# ----------------------------------------------------------------------------------------------
# dynamic loss scaling


@dataclass
class LossScaler:
    """Dynamic loss scaling, as ``torch.amp.GradScaler`` (same defaults and update rule).

    Each step the caller reports whether the unscaled gradients held an inf or nan
    (:meth:`update`): if so the step is skipped (counted in ``skipped``) and ``scale`` is
    multiplied by ``backoff_factor``; otherwise, after ``growth_interval`` clean steps in a row,
    ``scale`` is multiplied by ``growth_factor``. ``enabled=False`` keeps the scale at 1 (bfloat16
    has float32's range and needs none) and still counts skipped steps.

    Attributes:
        scale: S, the factor of the loss whose gradients are computed.
        growth_tracker: clean steps since the scale last changed (GradScaler's ``_growth_tracker``).
        skipped: optimizer steps skipped for an inf or nan gradient, over the run.
        steps: updates seen (skipped or not).

    Example:
        >>> s = LossScaler(init_scale=8.0, growth_interval=2)
        >>> s.update(found_inf=True); s.scale, s.skipped
        (4.0, 1)
        >>> s.update(False); s.update(False); s.scale
        8.0
    """

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    enabled: bool = True
    scale: float = math.nan  # set from init_scale
    growth_tracker: int = 0
    skipped: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {self.init_scale!r}")
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor!r}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor!r}")
        interval = self.growth_interval
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"growth_interval must be a positive integer, got {self.growth_interval!r}")
        if math.isnan(self.scale):
            self.scale = float(self.init_scale) if self.enabled else 1.0

    def update(self, found_inf: bool) -> None:
        """Count one step and adjust the scale (GradScaler's ``_amp_update_scale_``)."""
        self.steps += 1
        if found_inf:
            self.skipped += 1
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = self.scale * self.growth_factor
            if math.isfinite(grown):
                self.scale = grown
            self.growth_tracker = 0

    _KEYS = (
        "init_scale",
        "growth_factor",
        "backoff_factor",
        "growth_interval",
        "enabled",
        "scale",
        "growth_tracker",
        "skipped",
        "steps",
    )

    def state_dict(self) -> dict[str, Any]:
        """Every field, JSON-serializable (numbers and a bool), for a checkpoint's ``extra``."""
        return {key: getattr(self, key) for key in self._KEYS}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; raises ``KeyError`` naming missing or unknown keys."""
        missing, extra = sorted(set(self._KEYS) - set(state)), sorted(set(state) - set(self._KEYS))
        if missing or extra:
            raise KeyError(f"loss scaler state does not match: missing {missing}, unexpected {extra}")
        restored = LossScaler(**{key: state[key] for key in self._KEYS})  # validates
        for key in self._KEYS:
            setattr(self, key, getattr(restored, key))


# ----------------------------------------------------------------------------------------------
# float32 around the compute dtype's kernels: the loss and the norms


def _float32(x: Array | None) -> Array | None:
    if x is None:
        return None
    xp = namespace(x)
    return x if x.dtype == xp.float32 else xp.astype(x, xp.float32)


def _float32_norm(pair: core.Pair) -> core.Pair:
    """A norm pair run in float32 on low-precision inputs: out and dx come back in the input's
    dtype, the statistics (mean, rstd), the cache and dw, db stay float32."""
    forward, backward = pair

    def norm_forward(x: Array, w: Array | None, b: Array | None, eps: float) -> tuple[Array, Any]:
        out, cache = forward(_float32(x), _float32(w), _float32(b), eps)  # (..., C) float32
        return namespace(x).astype(out, x.dtype), cache

    def norm_backward(dout: Array, cache: Any) -> tuple[Array, Array | None, Array | None]:
        dx, dw, db = backward(_float32(dout), cache)
        return namespace(dout).astype(dx, dout.dtype), dw, db

    return norm_forward, norm_backward


def _float32_crossentropy(pair: core.Pair) -> core.Pair:
    """The softmax cross-entropy on float32 copies of the logits: the loss and its mean are
    float32; dlogits come back in the logits' dtype (where an overflow of the scaled loss shows)."""
    forward, backward = pair

    def crossentropy_forward(logits: Array, targets: Array, *args: Any, **kwargs: Any) -> tuple[Array, Any]:
        loss, cache = forward(_float32(logits), targets, *args, **kwargs)
        return loss, _LowCache(cache, logits.dtype)

    def crossentropy_backward(dloss: float, cache: Any) -> Array:
        dlogits = backward(dloss, cache.inner)  # (N, V) float32
        return namespace(dlogits).astype(dlogits, cache.dtype)

    return crossentropy_forward, crossentropy_backward


class _LowCache(NamedTuple):
    """The float32 cross-entropy's cache and the dtype its dlogits return in. ``weights`` is
    read by ``core.valid_positions``; ``probs`` by ``core.gpt_backward`` for the namespace."""

    inner: Any
    dtype: Any

    @property
    def weights(self) -> Array:
        return self.inner.weights

    @property
    def probs(self) -> Array:
        return self.inner.probs


def mixed_kernels(
    config: Any, backend: Any, compute_dtype: str, choice: core.Kernels | str | None = None, pm: Any = None
) -> core.Kernels:
    """The kernels of a mixed-precision compute model: those selected for ``compute_dtype``
    (linear, attention, activations), with the norm and the cross-entropy replaced by the
    float32 ones wrapped in casts (``arraygpt.nn.kernels.select_kernels`` for each dtype).

    Example:
        >>> from arraygpt import GPTConfig
        >>> k = mixed_kernels(GPTConfig.preset("microgpt"), "numpy", "float16", "reference")
        >>> k.norm[0].__name__, k.linear[0].__module__
        ('norm_forward', 'arraygpt.nn.layers')
    """
    low = select_kernels(config, backend, compute_dtype, choice, pm)
    high = select_kernels(config, backend, "float32", choice, pm)
    return low._replace(norm=_float32_norm(high.norm), crossentropy=_float32_crossentropy(high.crossentropy))


@contextlib.contextmanager
def overflow_expected() -> Iterator[None]:
    """Silence NumPy's overflow/invalid warnings: with a loss scale, an overflow is expected
    now and then, and the step that meets one is skipped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"overflow encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", r"invalid value encountered", RuntimeWarning)
        yield


# ----------------------------------------------------------------------------------------------
# the mixed-precision model


class StepResult(NamedTuple):
    loss: float  # the micro-batch's mean loss (float32 arithmetic), nan/inf where it overflowed
    skipped: bool  # True: a gradient held inf or nan; nothing was updated
    grad_norm: float | None = None  # the unscaled global norm before clipping, when clipping


class MixedPrecision:
    """A float32 GPT (the master weights) trained through a low-precision copy of itself.

    The optimizer is built on :attr:`params` (the master's float32 arrays) and so keeps its state
    in float32; checkpoints save :attr:`master` (float32) and :meth:`state_dict` (the loss scaler)
    in ``extra``. A training step keys dropout by (seed, step) and the rows' global indices
    (``GPT.forward``'s ``dropout_key`` and ``first_row``, passed through); a forward given no key
    draws one from the master's dropout generator, which each forward reads and writes back.

    It offers what ``arraygpt.training.step``'s gradient code reads from a model (``config``,
    ``params``, ``xp``, ``training``, ``forward``, ``backward``) with float32 gradients from
    :meth:`backward`, so the same accumulation code serves both.

    Args:
        model: the float32 GPT whose parameters are the master weights.
        compute_dtype: ``float16``, or ``bfloat16`` on a backend that has it.
        scaler: the loss scaler (default ``LossScaler()``, disabled for bfloat16).
        kernels: the kernel choice for both dtypes (``arraygpt.nn.kernels.select_kernels``).

    Example:
        >>> from arraygpt import GPT, GPTConfig
        >>> from arraygpt.training.optim import create_optimizer
        >>> mp = MixedPrecision(GPT(GPTConfig.preset("microgpt"), seed=0), "float16")
        >>> opt = create_optimizer("adamw", mp.params)
        >>> loss, skipped, _ = mp.step([[0, 5, 3]], [[5, 3, 0]], opt, lr=1e-3)
        >>> skipped, mp.compute.dtype, str(mp.params["wte"].dtype)
        (False, 'float16', 'float32')
    """

    def __init__(
        self,
        model: GPT,
        compute_dtype: str = "float16",
        scaler: LossScaler | None = None,
        kernels: core.Kernels | str | None = None,
    ):
        if not isinstance(model, GPT):
            raise TypeError(f"model must be an arraygpt GPT, got {type(model).__name__}")
        if model.dtype != "float32":
            raise ValueError(f"mixed precision keeps float32 master weights; the model is {model.dtype}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        self.master = model
        self.compute = GPT(
            model.config,
            dtype=compute_dtype,
            backend=model.backend,
            init=False,
            threads=model.threads,
            kernels=mixed_kernels(model.config, model.backend, compute_dtype, kernels),
        )
        self.scaler = scaler if scaler is not None else LossScaler(enabled=compute_dtype == "float16")
        self.refresh()

    # what a training loop reads from a model
    @property
    def config(self) -> Any:
        return self.master.config

    @property
    def params(self) -> dict[str, Array]:
        """The float32 master weights: build the optimizer on these."""
        return self.master.params

    @property
    def xp(self) -> Any:
        return self.master.xp

    @property
    def training(self) -> bool:
        return self.master.training

    @property
    def compute_dtype(self) -> str:
        return self.compute.dtype

    @property
    def skipped_steps(self) -> int:
        return self.scaler.skipped

    def train(self, mode: bool = True) -> MixedPrecision:
        self.master.train(mode)
        return self

    def eval(self) -> MixedPrecision:
        return self.train(False)

    def rng_state(self) -> dict[str, Any]:
        return self.master.rng_state()

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        self.master.set_rng_state(state)

    def close(self) -> None:
        """Shut down the compute model's thread pool (the master is the caller's to close)."""
        self.compute.close()

    def refresh(self) -> None:
        """Copy the master weights into the compute model, rounded to its dtype."""
        self.compute.load_state_dict(self.master.params)

    # -- one step --------------------------------------------------------------------------------

    def forward(self, idx: Any, targets: Any = None, **kwargs: Any) -> tuple[Array, float | None]:
        """The compute model's forward (``GPT.forward``), in the master's train/eval mode and with
        its dropout generator. Logits are in the compute dtype; the loss is float32 arithmetic."""
        compute = self.compute
        compute.train(self.master.training)
        compute.set_rng_state(self.master.rng_state())
        with overflow_expected():
            logits, loss = compute.forward(idx, targets, **kwargs)
        self.master.set_rng_state(compute.rng_state())
        return logits, loss

    __call__ = forward

    def backward(self) -> dict[str, Array]:
        """Float32 gradients of the last forward's loss: the compute model's gradients of
        ``scale * loss``, upcast and multiplied by 1/scale. They may hold inf or nan (an
        overflow): :meth:`apply` then skips the step."""
        scale = self.scaler.scale
        with overflow_expected():
            grads = self.compute.backward(loss_scale=scale)
        xp, inv = self.xp, 1.0 / scale
        out = {}
        for name, g in grads.items():
            g32 = xp.astype(g, xp.float32)  # a new array (copy=True), also for the float32 norm gradients
            if inv != 1.0:
                g32 *= inv
            out[name] = g32
        return out

    def all_finite(self, grads: Mapping[str, Array], reduce: Callable[[float], float] | None = None) -> bool:
        """Whether every gradient is finite (one host sync for all of them). ``reduce`` adds a
        number over the ranks when each holds a part of the gradients (sharded optimizer state,
        as for ``arraygpt.training.optim.clip_grad_norm``), so that every rank decides the same."""
        xp = self.xp
        flags = xp.stack([xp.all(xp.isfinite(g)) for g in grads.values()]) if grads else xp.ones((1,), dtype=bool)
        bad = float(xp.sum(xp.astype(xp.logical_not(flags), xp.float32)))  # tensors holding an inf or nan
        return (bad if reduce is None else reduce(bad)) == 0

    def apply(
        self,
        grads: Mapping[str, Array],
        optimizer: Any,
        lr: float,
        *,
        grad_clip: float = 0.0,
        reduce: Callable[[float], float] | None = None,
    ) -> tuple[bool, float | None]:
        """Finish a step from float32 gradients (:meth:`backward`'s, possibly accumulated): skip
        it if any is not finite, else clip (``grad_clip`` > 0), update the master weights and
        refresh the compute copy; then update the loss scale.

        Args:
            grads: name -> float32 gradient (this rank's pieces, with sharded optimizer state).
            optimizer: built on :attr:`params`.
            lr: the learning rate.
            grad_clip: clip the global norm to this (0: off).
            reduce: sums a number over the ranks that each hold a part of the gradients (the
                finiteness check and the clipping norm); None when every rank holds them all.

        Returns:
            ``(skipped, grad_norm)``: grad_norm is the norm before clipping (None unless clipping
            ran; not computed for a skipped step).
        """
        finite = self.all_finite(grads, reduce)
        norm = None
        if finite:
            if grad_clip:
                norm = clip_grad_norm(grads, grad_clip, reduce)
            optimizer.step(grads, lr)
            self.refresh()
        self.scaler.update(found_inf=not finite)
        return not finite, norm

    def step(self, idx: Any, targets: Any, optimizer: Any, lr: float, *, grad_clip: float = 0.0) -> StepResult:
        """Forward, scaled backward, unscale, check, and the optimizer step on the master weights.

        Args:
            idx, targets: a batch (B, T), as for ``GPT.forward``.
            optimizer: built on :attr:`params` (``create_optimizer(name, mp.params)``).
            lr: the learning rate.
            grad_clip: clip the unscaled global gradient norm to this (0: off).

        Returns:
            :class:`StepResult` ``(loss, skipped, grad_norm)``.
        """
        _, loss = self.forward(idx, targets)
        skipped, norm = self.apply(self.backward(), optimizer, lr, grad_clip=grad_clip)
        return StepResult(float(loss), skipped, norm)  # type: ignore[arg-type]

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """JSON: the compute dtype and the loss scaler, for a checkpoint's ``extra`` (the master
        weights are the checkpoint's model, the optimizer state its optimizer)."""
        return {"compute_dtype": self.compute.dtype, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("compute_dtype") != self.compute.dtype:
            raise ValueError(
                f"the state is of a {state.get('compute_dtype')!r} run; this one computes in {self.compute.dtype}"
            )
        self.scaler.load_state_dict(state["scaler"])
        self.refresh()


def mixed_precision(model: GPT, precision: str, **options: Any) -> MixedPrecision | None:
    """The :class:`MixedPrecision` that ``TrainConfig(precision=...)`` names, or None for
    ``full`` (the model computes in its own dtype).

    Raises:
        ValueError: an unknown name; the message lists :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "full":
        return None
    return MixedPrecision(model, precision.removeprefix("mixed-"), **options)


# ----------------------------------------------------------------------------------------------
# TF32 (CuPy)


def tf32_enabled() -> bool:
    """Whether CuPy may use TF32 for float32 matmuls: ``CUPY_TF32`` set to a non-zero value.
    Off by default (parity runs); report it beside every GPU figure."""
    return os.environ.get("CUPY_TF32", "0").strip() not in ("", "0")


def set_tf32(enabled: bool) -> None:
    """Turn TF32 on or off for CuPy's float32 matmuls (``CUPY_TF32``). CuPy reads the variable
    once, so this must run before CuPy is imported.

    Raises:
        RuntimeError: CuPy is already imported and the setting would change.
    """
    if "cupy" in sys.modules and tf32_enabled() != bool(enabled):
        raise RuntimeError(
            "CuPy is already imported and reads CUPY_TF32 once: set CUPY_TF32 (or call "
            "set_tf32) before the cupy backend loads"
        )
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
