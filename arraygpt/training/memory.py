"""How much host memory a training step needs, estimated before anything large is allocated, so
that absurd sizes (``--batch-size 1000000000``, ``--n-embd 1000000``, ``--vocab-size
2000000000``) are one clear error naming the size to lower instead of an allocation failure or
the kernel's OOM killer minutes later.

The estimate counts what a step holds at its peak, in the model's dtype: the parameters, their
gradient (twice: the accumulated sum and a new micro-batch's), the optimizer's state (two buffers
per parameter, Adam's), the activations that one micro-batch's forward keeps for the backward
(every layer's inputs, attention probabilities and MLP hidden units, and the softmax over the
vocabulary with its gradient: float32 under mixed precision too), and the global batch of token
ids. It is a lower bound of the real peak (measured 1.0-1.4x it, tests/test_training_reliability.py),
so it refuses only steps that cannot fit. The memory available is
the smaller of the kernel's ``MemAvailable`` and what the address-space limit (``ulimit -v``)
leaves.

Not here: device memory of a GPU backend (checked only where the parameters live on the host);
a MemoryError that still happens is turned into one line by ``arraygpt.cli.train``.
"""

from __future__ import annotations

from typing import Any

from arraygpt.config import GPTConfig
from arraygpt.nn.params import count_params

__all__ = ["StepMemory", "available_memory", "check_step_memory", "step_memory"]

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class StepMemory(dict):
    """Bytes per part of a step: ``parameters`` (with gradients and optimizer state),
    ``activations`` (one micro-batch's, the logits apart), ``logits`` (with their softmax and
    gradient), ``batch`` (the global batch's token ids)."""

    @property
    def total(self) -> int:
        return sum(self.values())


def step_memory(
    config: GPTConfig,
    dtype: str,
    batch_size: int,
    global_batch: int,
    precision: str = "full",
    trained: int | None = None,
) -> StepMemory:
    """The estimate of the module docstring, in bytes. ``trained``: how many parameters train when
    not all do (LoRA adapters): the frozen ones need no gradient and no optimizer state.

    Example:
        >>> from arraygpt.config import GPTConfig
        >>> m = step_memory(GPTConfig.preset("microgpt"), "float32", batch_size=64, global_batch=64)
        >>> sorted(m), m.total < 10**7
        (['activations', 'batch', 'logits', 'parameters'], True)
    """
    size = _ITEMSIZE.get(dtype, 4)
    P = count_params(config).total
    params = P * size * 5  # weights, two gradients, two optimizer buffers
    if trained is not None:  # frozen weights; the adapters' weights, gradients and buffers
        params = (P + 5 * trained) * size
    B, T, C, V = batch_size, config.block_size, config.n_embd, config.vocab_size
    logits = 2 * B * T * V * size  # the softmax and its gradient
    if precision != "full":  # float32 master weights and state, plus a 16-bit compute copy
        params = P * (4 * 5 + 2 * 2)
        size = 2
        logits = 8 * B * T * V  # the cross-entropy's float32 softmax and gradient, as in full precision
    H, NH = config.mlp_hidden, config.n_head
    probs = B * NH * T * T
    per_layer = B * T * (6 * C + 2 * H) + probs  # kept for the backward: inputs, q/k/v, norms; MLP units; probs
    activations = (config.n_layer * per_layer + probs + 2 * B * T * C) * size  # + the backward's attention gradient
    return StepMemory(parameters=params, activations=activations, logits=logits, batch=2 * global_batch * T * 8)


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, bounded by what RLIMIT_AS leaves
    (None where neither is known)."""
    limits = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            limits.append(max(0, soft - _address_space_used()))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def _address_space_used() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_step_memory(config: GPTConfig, train: Any, ranks: int, backend: Any, trained: int | None = None) -> None:
    """Refuse a run whose step cannot fit in the host memory left.

    Args:
        config: the model's configuration; train: the TrainConfig; ranks: processes of the run;
        backend: the model's backend (only host backends, those without a device generator, are
        checked); trained: the parameters that train, when not all do (LoRA).

    Raises:
        ValueError: naming the estimate, the memory available and the sizes to lower (those of
            the largest part).
    """
    if getattr(backend, "device_uniform", None) is not None:  # parameters and activations on a device
        return
    need = step_memory(
        config, train.dtype, train.batch_size, ranks * train.batch_size * train.grad_accum, train.precision, trained
    )
    available = available_memory()
    if available is None or need.total <= available:
        return
    lower = {
        "parameters": f"--n-embd ({config.n_embd}), --n-layer ({config.n_layer}) or --vocab-size ({config.vocab_size})",
        "activations": f"--batch-size ({train.batch_size}) or --block-size ({config.block_size})",
        "logits": f"--vocab-size ({config.vocab_size}), --batch-size ({train.batch_size}) or --block-size "
        f"({config.block_size})",
        "batch": f"--batch-size ({train.batch_size}) or --grad-accum ({train.grad_accum})",
    }
    part = max(need, key=need.get)
    parts = ", ".join(f"{name} {_gib(n)}" for name, n in sorted(need.items(), key=lambda kv: -kv[1]))
    raise ValueError(
        f"a training step needs about {_gib(need.total)} ({parts}) but {_gib(available)} of memory is available; "
        f"lower {lower[part]}"
    )
