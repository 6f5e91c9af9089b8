"""What every optimizer shares: the contract and a base class, learning-rate schedules and
global-norm gradient clipping. The optimizers themselves (SGD, Adam, AdamW) are plugins
(``arraygpt.plugins.optimizers``), found by name through the ``arraygpt_register_optimizers`` hook.

The optimizer contract (what a plugin's factory returns):

    opt = factory(params, **options)    # params: the model's name -> backend array dict
    opt.step(grads, lr)                 # update every params[name] IN PLACE from grads[name]
    opt.state_dict() -> dict            # name -> host NumPy array, or a plain number
    opt.load_state_dict(d)              # the inverse; continues bit-identically
    factory.elementwise                 # optional: True lets ``zero`` split parameters by rows

With ``TrainConfig(zero=True)`` on R ranks each rank builds its optimizer on its own pieces of the
parameters (rows of them, or whole ones), views with the parameters' names and ndim; the state
arrays must be named ``<buffer>.<parameter name>`` (as :class:`Optimizer` names them) for the
checkpoint's gather (docs/distributed.md).

Updates run on the parameters' own backend (``p -= ...``), with no round trip to the host.

Not here: the training loop (``arraygpt.training.loop``), parameter groups beyond a weight-decay mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from arraygpt.xp import backend_of, namespace, to_numpy

Array = Any


@runtime_checkable
class OptimizerProtocol(Protocol):
    """The interface the training loop relies on."""

    def step(self, grads: Mapping[str, Array], lr: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Optimizer:
    """A base class for optimizers that keep per-parameter buffers (moments, momentum).

    Subclasses set ``buffer_names`` (e.g. ``("m", "v")``) and implement ``update(name, p, g, lr)``,
    which changes ``p`` in place; buffers live in ``self.buffers[buffer_name][param_name]``, on the
    parameter's backend. ``state_dict`` stores each buffer as ``"<buffer>.<param name>"`` (a host
    NumPy array) and the step count as ``"step"``.

    Args:
        params: name -> backend array, the arrays to update in place (the model's ``params``).
    """

    buffer_names: tuple[str, ...] = ()
    # True when the update of each element depends only on that element's parameter, gradient and
    # buffers (and on the parameter's name and ndim): then ``zero`` may split a parameter's rows
    # between ranks (arraygpt.training.distributed.ShardedOptimizer); False gives each rank whole parameters
    elementwise: bool = False

    def __init__(self, params: Mapping[str, Array]):
        if not isinstance(params, Mapping) or not params:
            raise ValueError("an optimizer needs a non-empty dict of parameters, name -> array")
        self.params = params
        self.t = 0  # optimizer steps taken
        self.buffers: dict[str, dict[str, Array]] = {
            b: {name: namespace(p).zeros_like(p) for name, p in params.items()} for b in self.buffer_names
        }

    def step(self, grads: Mapping[str, Array], lr: float) -> None:
        """One update of every parameter from its gradient at learning rate ``lr``."""
        if set(grads) != set(self.params):
            missing, extra = sorted(set(self.params) - set(grads)), sorted(set(grads) - set(self.params))
            raise KeyError(f"gradients do not match the parameters: missing {missing}, unexpected {extra}")
        if not lr >= 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr!r}")
        self.t += 1
        for name, p in self.params.items():
            self.update(name, p, grads[name], float(lr))

    def update(self, name: str, p: Array, g: Array, lr: float) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.t}
        for b, arrays in self.buffers.items():
            for name, a in arrays.items():
                state[f"{b}.{name}"] = to_numpy(a).copy()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore buffers and step count from ``state_dict()`` output (host arrays or numbers).

        Raises:
            KeyError: a buffer is missing or ``state`` has names this optimizer does not keep.
            ValueError: a buffer's shape differs from its parameter's.
        """
        expected = {"step"} | {f"{b}.{name}" for b in self.buffers for name in self.params}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise KeyError(f"optimizer state does not match: missing {missing[:5]}, unexpected {extra[:5]}")
        loaded: dict[str, dict[str, Array]] = {b: {} for b in self.buffers}
        for b in self.buffers:
            for name, p in self.params.items():
                host = to_numpy(state[f"{b}.{name}"])
                if tuple(host.shape) != tuple(p.shape):
                    raise ValueError(
                        f"optimizer buffer {b}.{name} has shape {host.shape}, parameter has {tuple(p.shape)}"
                    )
                loaded[b][name] = _like(host, p)
        self.buffers = loaded
        self.t = int(state["step"])


def _like(host: Any, p: Array) -> Array:
    """A host NumPy array -> an array of ``p``'s backend, device and dtype."""
    a = backend_of(p).asarray(host)
    xp = namespace(p)
    return a if a.dtype == p.dtype else xp.astype(a, p.dtype)


def create_optimizer(name: str, params: Mapping[str, Array], pm: Any = None, **options: Any) -> Any:
    """The optimizer registered as ``name`` (through the plugin hook), built on ``params``.

    Raises:
        ValueError: no plugin offers ``name``; the message lists the registered optimizers.
    """
    from arraygpt.manager import registry

    factories = registry("optimizers", pm)
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; registered optimizers: {', '.join(sorted(factories))}")
    return factories[name](params, **options)


# ----------------------------------------------------------------------------------------------
# learning-rate schedules

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class Schedule:
    """The learning rate at each step (0-based), a pure function of the step.

    Kinds:
        constant: ``lr`` (after the warmup).
        linear: linear decay to zero at ``total_steps``: ``lr * (1 - step / total_steps)``, as
            microgpt (after the warmup, the decay runs from the end of the warmup).
        cosine: warmup, then cosine decay from ``lr`` to ``min_lr`` at ``total_steps``, then
            ``min_lr``: nanoGPT's ``get_lr`` (Loshchilov & Hutter 2017; GPT-3 decays to 10%).
    The warmup (any kind) is nanoGPT's: ``lr * (step + 1) / (warmup_steps + 1)`` for
    ``step < warmup_steps``.

    Example:
        >>> Schedule("cosine", lr=1e-3, total_steps=2000, warmup_steps=100, min_lr=1e-4)(2000)
        0.0001
    """

    kind: str = "constant"
    lr: float = 1e-3
    total_steps: int = 1
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"learning rate must be a finite number >= 0, got {self.lr!r}")
        if not (isinstance(self.min_lr, (int, float)) and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr!r}")
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {self.total_steps!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < max(self.total_steps, 1) + 1:
            raise ValueError(f"warmup_steps must be between 0 and total_steps, got {self.warmup_steps!r}")

    def __call__(self, step: int) -> float:
        lr, w, total = self.lr, self.warmup_steps, self.total_steps
        if step < w:
            return lr * (step + 1) / (w + 1)
        if self.kind == "constant":
            return lr
        if self.kind == "linear":
            return lr * max(0.0, 1.0 - (step - w) / max(total - w, 1))
        if step > total:
            return self.min_lr
        decay_ratio = (step - w) / max(total - w, 1)
        coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # 1 -> 0
        return self.min_lr + coeff * (lr - self.min_lr)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "lr": self.lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_lr": self.min_lr,
        }


# ----------------------------------------------------------------------------------------------
# global-norm gradient clipping


def global_norm(grads: Mapping[str, Array], reduce: Callable[[float], float] | None = None) -> float:
    """sqrt(sum over every gradient of sum(g**2)), as one Python float.

    ``reduce`` adds the sum of squares over the ranks that each hold a part of the gradients
    (sharded optimizer state), so that every rank finds the same global norm.
    """
    total = None
    for g in grads.values():
        xp = namespace(g)
        flat = xp.reshape(g, (-1,))
        s = xp.vecdot(flat, flat)  # one pass, no g * g temporary: 7x faster than sum(g * g) on NumPy
        total = s if total is None else total + s
    squares = float(total) if total is not None else 0.0
    if reduce is not None:
        squares = float(reduce(squares))
    return math.sqrt(squares)


def clip_grad_norm(
    grads: Mapping[str, Array], max_norm: float, reduce: Callable[[float], float] | None = None
) -> float:
    """Scale every gradient in place so that their global norm is at most ``max_norm``.

    Follows ``torch.nn.utils.clip_grad_norm_``: ``coef = max_norm / (norm + 1e-6)``, applied when
    it is below 1. Returns the norm before clipping (inf or nan when a gradient is not finite; the
    gradients are then left as they are). ``reduce``: as in :func:`global_norm`, for gradients
    split over ranks; every rank then scales its part by the same ``coef``.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm = global_norm(grads, reduce)
    if not math.isfinite(norm):
        return norm
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return norm


def state_nbytes(optimizer: Any) -> int:
    """Bytes of the optimizer state this process holds: its arrays (moments, momentum), numbers
    not counted. A sharded optimizer (``zero``) counts this rank's share alone."""
    local = getattr(optimizer, "local_state_nbytes", None)
    if local is not None:
        return int(local())
    return sum(to_numpy(v).nbytes for v in optimizer.state_dict().values() if hasattr(v, "shape"))
