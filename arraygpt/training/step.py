"""One optimizer step of a training run: the gradient of the mean loss over the global batch, then
the update.

The global batch (G = ranks x batch_size x grad_accum rows) is drawn the same on every rank. Rank
r takes rows ``[r P, (r+1) P)`` (P = batch_size x grad_accum) in micro-batches of batch_size rows
(:func:`micro_batches`), so which rows a rank computes depends on the global row index only. The
gradient takes one of three paths, each a function here:

- :func:`accumulate`: this rank's micro-batches, each weighted by its share of the batch's
  targets (one micro-batch on one rank: the model's gradient as it is);
- :func:`allreduce`: several ranks add their sums (one all-reduce of one contiguous buffer);
- :func:`reduce_scatter`: with the optimizer state sharded (``zero``), each rank receives the sum
  of its own share of the parameters only.

The update (:func:`update`) clips the global norm if asked and lets the optimizer step; under mixed
precision ``MixedPrecision.apply`` does both and skips a step with inf/nan gradients.

Dropout's coins are keyed by the run's (seed, step) and each row's global index
(``GPT.forward``'s ``dropout_key`` and ``first_row``; the rule is written once, in
``arraygpt.nn.model``), so one global batch gives the same masks on any number of threads,
micro-batches or ranks.

Not here: the loop around the step (``arraygpt.training.loop``), the collectives themselves
(``arraygpt.training.distributed``).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from arraygpt.training.distributed import ShardedOptimizer
from arraygpt.training.optim import clip_grad_norm
from arraygpt.training.precision import overflow_expected

if TYPE_CHECKING:
    from arraygpt.training.run import Run

__all__ = ["accumulate", "allreduce", "gradients", "micro_batches", "reduce_scatter", "train_step", "update"]


def train_step(run: Run, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Forward, backward, reduce and update for the global batch (x, y) at ``run.step``.

    Returns:
        The step's metrics: ``loss``, ``lr``, ``n_tokens`` (targets in the global batch),
        ``grad_norm`` when clipped, and under mixed precision ``skipped`` and ``loss_scale``.
    """
    lr = run.schedule(run.step)
    grads, loss, n_tokens = gradients(run, x, y)
    metrics = {"loss": loss, "lr": lr, **update(run, grads, lr)}
    metrics["n_tokens"] = n_tokens
    return metrics


def gradients(run: Run, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], float, int]:
    """The gradient of the mean loss over the global batch (x, y), its mean loss and its count of
    targets, the same on every rank.

    Micro-batch k has n_k targets and mean loss L_k, and ``model.backward()`` gives dL_k; the
    batch's mean loss is L = sum_k n_k L_k / n with n = sum_k n_k over the whole global batch
    (targets of -1 count nowhere), so dL = sum_k (n_k / n) dL_k.

    Args:
        x, y: the global batch, int64 (ranks x batch_size x grad_accum, T), as ``batcher.next()``
            draws it; y is -1 where nothing is predicted.

    Returns:
        ``(grads, loss, n)``: name -> gradient on the model's backend, the mean loss, and the
        number of targets of the global batch. With the optimizer state sharded (``zero``),
        ``grads`` holds this rank's pieces of the parameters only.

    Raises:
        TrainingDiverged: the loss is NaN or infinite.
    """
    n_total = int((y >= 0).sum())
    grads, loss_sum = accumulate(run, x, y, n_total)
    if isinstance(run.optimizer, ShardedOptimizer):
        grads, loss_sum = reduce_scatter(run, grads, loss_sum)
    elif run.world.size > 1:
        grads, loss_sum = allreduce(run, grads, loss_sum)
    loss = loss_sum / n_total if n_total else math.nan
    if not math.isfinite(loss):
        run.diverged(f"the loss is {loss}")
    return grads, loss, n_total


def micro_batches(run: Run) -> list[slice]:
    """This rank's micro-batches: slices of global rows, ``batch_size`` rows each."""
    B, P = run.config.batch_size, run.config.batch_size * run.config.grad_accum
    first = run.world.rank * P
    return [slice(first + k * B, first + (k + 1) * B) for k in range(run.config.grad_accum)]


def accumulate(run: Run, x: np.ndarray, y: np.ndarray, n_total: int) -> tuple[dict[str, Any], float]:
    """sum_k (n_k / n) dL_k and sum_k n_k L_k over this rank's micro-batches; a micro-batch with
    no target counts for nothing (and a rank with none returns zeros)."""
    model = run.mixed or run.model
    key = (run.config.seed, run.step)  # dropout's coins: this step's, at each row's global index
    grads: dict[str, Any] | None = None
    loss_sum = 0.0
    for rows in micro_batches(run):
        xk, yk = x[rows], y[rows]  # (B, T)
        n_k = int((yk >= 0).sum())
        if n_k == 0:
            continue
        _, loss_k = model.forward(xk, yk, dropout_key=key, first_row=rows.start)
        loss_sum += loss_k * n_k
        g = model.backward()
        weight = n_k / n_total
        with overflow_expected() if run.mixed is not None else contextlib.nullcontext():  # inf: a skipped step
            if grads is None:
                grads = g if weight == 1.0 else {name: gi * weight for name, gi in g.items()}
            else:
                grads = {name: grads[name] + g[name] * weight for name in grads}
    if grads is None:  # every target of this rank's rows is ignored
        grads = {name: model.xp.zeros_like(p) for name, p in run.model.trainable.items()}
    return grads, loss_sum


def allreduce(run: Run, grads: dict[str, Any], loss_sum: float) -> tuple[dict[str, Any], float]:
    """Add every rank's gradients and loss sum: one contiguous host buffer, one all-reduce."""
    from arraygpt.xp import to_numpy

    host = {name: to_numpy(g) for name, g in grads.items()}
    size = sum(h.size for h in host.values()) + 1
    dtype = np.result_type(*host.values())
    buffer = run.reduce_buffer
    if buffer is None or buffer.size != size or buffer.dtype != dtype:
        buffer = run.reduce_buffer = np.empty(size, dtype=dtype)  # (all gradients + the loss sum,)
    start = 0
    for h in host.values():
        buffer[start : start + h.size] = h.ravel()
        start += h.size
    buffer[-1] = loss_sum
    run.world.allreduce_sum_(buffer, what=f"the gradient all-reduce of step {run.step + 1}")
    out, start = {}, 0
    for name, h in host.items():
        out[name] = run.model.backend.asarray(buffer[start : start + h.size].reshape(h.shape))
        start += h.size
    return out, float(buffer[-1])


def reduce_scatter(run: Run, grads: dict[str, Any], loss_sum: float) -> tuple[dict[str, Any], float]:
    """ZeRO stage 1: this rank's pieces of the summed gradients, and the summed loss."""
    step = run.step + 1
    grads = run.optimizer.reduce_gradients(grads, what=f"the gradient reduce-scatter of step {step}")
    total = run.world.allreduce_sum_(np.array([loss_sum]), what=f"the loss all-reduce of step {step}")
    return grads, float(total[0])


def update(run: Run, grads: dict[str, Any], lr: float) -> dict[str, float]:
    """Clip (``grad_clip``) and step the optimizer; return the metrics this adds (``grad_norm``;
    under mixed precision ``skipped`` and ``loss_scale`` too).

    Raises:
        TrainingDiverged: the gradient norm is NaN or infinite (full precision; mixed precision
            skips such a step instead and lowers the loss scale).
    """
    cfg, metrics = run.config, {}
    if run.mixed is not None:
        skipped, norm = run.mixed.apply(grads, run.optimizer, lr, grad_clip=cfg.grad_clip, reduce=_sum_over_shards(run))
        metrics.update(skipped=float(skipped), loss_scale=run.mixed.scaler.scale)
        if norm is not None:
            metrics["grad_norm"] = norm
        return metrics
    if cfg.grad_clip:
        norm = clip_grad_norm(grads, cfg.grad_clip, _sum_over_shards(run))
        if not math.isfinite(norm):
            run.diverged(f"the gradient norm is {norm}")
        metrics["grad_norm"] = norm
    run.optimizer.step(grads, lr)
    return metrics


def _sum_over_shards(run: Run) -> Any:
    """For clipping: adds a squared norm over the ranks when each holds a part of the gradients."""
    if not isinstance(run.optimizer, ShardedOptimizer):
        return None
    what = f"the gradient norm all-reduce of step {run.step + 1}"
    return lambda s: float(run.world.allreduce_sum_(np.array([s]), what=what)[0])
