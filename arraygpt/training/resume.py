"""Checkpoints of a training run and continuing from one.

A checkpoint (``last/`` every ``checkpoint_interval`` steps and at the end, ``best/`` at the
lowest val loss) holds the parameters, the optimizer's buffers and step count, and in
``state.json``'s ``extra`` the training state (:func:`training_state`): the step, the options,
the batcher's generator and epoch position, the data's sha256, the global batch. Dropout needs no
state: its coins are a function of the run's seed, the step and the row (``arraygpt.nn.model``).
So a run of 2N steps stopped after N (Ctrl-C, a plugin, ``stop_after``, a kill after a
checkpoint) and resumed ends with the same bits as a run never stopped (on NumPy).

A resumed run keeps its saved options. It may change those that do not alter the computation
(:data:`~arraygpt.training.config.RESUME_OVERRIDABLE`), split its global batch differently over
ranks and micro-batches (:func:`split_global_batch`), and set ``steps`` to extend (or shorten) the
run: the steps after the resume then follow the learning-rate schedule of a run of the new
length, a pure function of the step (warmup and decay recomputed for the new total), so
``--steps`` equal to the saved value changes nothing and the resume stays exact.

Not here: the run folder's lock and checks (``arraygpt.training.runfolder``), the checkpoint
format (``arraygpt.io.checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from arraygpt.errors import CheckpointError, DataError, RunFolderError
from arraygpt.training.build import make_optimizer, split_options
from arraygpt.training.config import RESUME_OVERRIDABLE, TrainConfig, field_and_flag
from arraygpt.training.data import Batcher, fingerprint, make_dataset, read_source
from arraygpt.training.distributed import ShardedOptimizer, World, ending_all_ranks_on_error
from arraygpt.training.run import Run
from arraygpt.training.runfolder import (
    LOCK_FILE,
    check_new_run_folder,
    check_run_folder,
    check_training_state,
    lock_run_folder,
    resume_source,
    trim_metrics,
)

__all__ = ["holding_run_folder", "resumed_run", "save_checkpoint", "split_global_batch", "training_state"]


# ----------------------------------------------------------------------------------------------
# writing


def training_state(run: Run) -> dict[str, Any]:
    """What a checkpoint keeps besides the model, tokenizer and optimizer (``extra``)."""
    return {
        "step": run.step,
        "train_config": run.config.to_dict(),
        "data": run.batcher.state_dict(),
        "data_sha256": run.data_sha256,
        "schedule": run.schedule.to_dict(),
        "lr_next": run.schedule(run.step),
        "best_val_loss": run.best_val_loss if math.isfinite(run.best_val_loss) else None,
        "world_size": run.world.size,
        "global_batch": run.global_batch,
        **({"precision": run.mixed.state_dict()} if run.mixed is not None else {}),
    }


class _StateOnly:
    """An optimizer state already gathered, for ``save_checkpoint`` (which calls ``state_dict()``)."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def save_checkpoint(run: Run, which: str = "last") -> Path | None:
    """Write the ``last`` or ``best`` checkpoint atomically; tell the plugins. Every rank checks
    that the parameters are finite (they are the same everywhere); rank 0 alone writes."""
    from arraygpt.io.checkpoint import save_checkpoint as write

    if run.out_dir is None:
        return None
    xp = run.model.xp
    for name, p in run.model.trainable.items():
        if not bool(xp.all(xp.isfinite(p))):
            run.diverged(f"parameter {name} holds NaN or inf")
    if which == "last":
        run.last_saved = run.step
    optimizer = run.optimizer
    if isinstance(optimizer, ShardedOptimizer):  # gather the full state onto rank 0: every rank takes part
        optimizer = _StateOnly(optimizer.state_dict())
    if not run.world.is_root:
        return None
    extra = {**training_state(run), "kind": which}
    path = write(run.out_dir / which, run.model, run.tokenizer, optimizer, extra=extra, base=run.lora_base)
    run.log.record({"event": "checkpoint", "step": run.step, "kind": which, "path": str(path)})
    run.call_hook("arraygpt_on_checkpoint", run=run, step=run.step, path=str(path))
    return path


# ----------------------------------------------------------------------------------------------
# resuming


def _saved_options(extra: Mapping[str, Any], path: Path) -> TrainConfig:
    try:
        return TrainConfig.from_dict(extra["train_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'}: the saved training options (extra.train_config): {e}") from None


def _resumed_config(saved: TrainConfig, step: int, options: dict[str, Any], batch: dict[str, int]) -> TrainConfig:
    """The saved options with the allowed changes: RESUME_OVERRIDABLE, the batch split, steps."""
    steps = options.get("steps", saved.steps)
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < step:
        raise ValueError(f"steps {steps} is before the step {step} this run resumes from; give steps >= {step}")
    return dataclasses.replace(
        saved, **{k: v for k, v in options.items() if k in RESUME_OVERRIDABLE}, **batch, steps=steps
    )


def resumed_run(resume: str | Path, options: dict[str, Any], pm: Any, progress: bool, world: World) -> Run:
    """The Run that continues the checkpoint ``resume`` names (a run folder or one of its
    checkpoints) exactly where it left off."""
    from arraygpt.io.checkpoint import load_checkpoint
    from arraygpt.io.formats import load

    run_dir, source = resume_source(resume)  # the run folder, and its last/ (or the best/ given)
    model_overrides, train_options = split_options(options)
    ckpt = load_checkpoint(source, backend=train_options.get("backend"), open_base=load)  # a LoRA run's base too
    extra = ckpt.extra
    check_training_state(extra, ckpt.path)
    saved = _saved_options(extra, ckpt.path)
    step = int(extra["step"])
    batch = split_global_batch(saved, extra, world.size, train_options)
    may_change = (*RESUME_OVERRIDABLE, *batch, "steps")  # batch_size and grad_accum: checked to keep the global batch
    changed = {k: v for k, v in train_options.items() if k not in may_change and getattr(saved, k) != v}
    # a fine-tune's block_size is its training window
    saved_window = {} if saved.window is None else {"block_size": saved.window}
    changed.update({k: v for k, v in model_overrides.items() if saved_window.get(k, getattr(ckpt.config, k)) != v})
    if changed:
        raise ValueError(
            f"cannot change {sorted(changed)} when resuming (the run continues with its saved options; "
            f"only {', '.join(RESUME_OVERRIDABLE)}, --steps (to extend the run), --stop-after and --quiet may be "
            f"given, and batch_size and grad_accum when the global batch stays the same)"
        )
    tc = _resumed_config(saved, step, train_options, batch)
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.path} has no tokenizer; a training checkpoint needs one")
    text = read_source(tc.data)
    if extra.get("data_sha256") and fingerprint(text) != extra["data_sha256"]:
        raise DataError(
            f"the data {tc.data!r} changed since the run started (its sha256 differs); cannot resume exactly"
        )
    window = tc.window or ckpt.config.block_size
    dataset = make_dataset(text, ckpt.tokenizer, tc.mode, window, tc.val_fraction, tc.split_seed, source=tc.data)  # type: ignore[arg-type]
    batcher = Batcher(dataset, world.size * tc.batch_size * tc.grad_accum, seed=tc.seed)  # the global batch
    batcher.load_state_dict(extra["data"])
    model = ckpt.model
    optimizer = make_optimizer(tc, model, pm, world)
    if ckpt.optimizer_state is None:
        raise ValueError(f"{ckpt.path} has no optimizer state; cannot resume exactly")
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
    except (KeyError, ValueError, TypeError) as e:  # a tampered or foreign optimizer.safetensors
        raise CheckpointError(
            f"{ckpt.path}: the optimizer state does not fit the {tc.optimizer} optimizer of this model: {e}"
        ) from None
    best = extra.get("best_val_loss")
    run = Run(
        tc,
        model,
        ckpt.tokenizer,
        dataset,
        batcher,
        optimizer,
        run_dir,
        pm,
        step=step,
        best_val_loss=math.inf if best is None else float(best),
        data_sha256=extra.get("data_sha256", ""),
        progress=progress,
        world=world,
    )
    if run.mixed is not None:
        run.mixed.load_state_dict(extra["precision"])
    if tc.lora_rank and ckpt.base is None:
        raise CheckpointError(f"{ckpt.path}: a LoRA run's checkpoint must hold adapters and a base reference")
    run.lora_base = ckpt.base
    run.last_saved = run.step
    if world.is_root:  # the run does the steps after its checkpoint again: their old records go
        run.dropped_records = trim_metrics(run_dir, run.step)
    return run


def split_global_batch(
    saved: TrainConfig, extra: Mapping[str, Any], ranks: int, given: Mapping[str, Any]
) -> dict[str, int]:
    """batch_size and grad_accum for resuming on ``ranks`` ranks with the saved global batch G.

    Each rank takes P = G / ranks rows. Given options are kept if they multiply to P; otherwise
    the saved micro-batch stays when it divides P, else the largest divisor of P below it.
    (Dropout's coins depend on each row's global index, so any split draws the same masks.)

    Raises:
        ValueError: ``ranks`` does not divide G, or the given options do not make P.
    """
    G = int(extra.get("global_batch") or saved.batch_size * saved.grad_accum * int(extra.get("world_size", 1)))
    if G % ranks:
        divisors = [r for r in range(1, G + 1) if G % r == 0]
        raise ValueError(
            f"the run's global batch of {G} rows cannot be split over {ranks} ranks; "
            f"resume it on a number of ranks that divides {G} ({', '.join(map(str, divisors))})"
        )
    P = G // ranks
    B, N = given.get("batch_size"), given.get("grad_accum")
    for name, value in (("batch_size", B), ("grad_accum", N)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{field_and_flag(name)} must be a positive integer, got {value!r}")
    where = f"the {P} rows per rank of the run's global batch ({G} rows over {ranks} ranks)"
    if B is not None and N is not None:
        if B * N != P:
            raise ValueError(
                f"batch_size {B} x grad_accum {N} x {ranks} ranks must make the run's global batch of {G} rows"
            )
    elif N is not None:
        if P % N:
            raise ValueError(f"grad_accum {N} does not divide {where}")
        B = P // N
    elif B is not None:
        if P % B:
            raise ValueError(f"batch_size {B} does not divide {where}")
        N = P // B
    else:
        B = max(d for d in range(1, min(saved.batch_size, P) + 1) if P % d == 0)
        N = P // B
    return {"batch_size": B, "grad_accum": N}


# ----------------------------------------------------------------------------------------------
# the run folder, held for the run


@contextlib.contextmanager
def holding_run_folder(folder: Path | None, world: World, fresh: bool) -> Iterator[None]:
    """One run per folder: rank 0 takes the folder's lock and checks the folder (a fresh run's
    must hold no run), and holds the lock for the block. With several ranks, rank 0 then tells
    the others the outcome, in the run's first collective, so that a refused folder ends every
    rank at once with rank 0's error instead of leaving them waiting for it."""
    if folder is None:
        yield
        return
    created = fresh and world.is_root and not os.path.lexists(folder)
    try:
        with _holding(folder, world, fresh):
            yield
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty folder behind
            _remove_if_only_the_lock(folder)
        raise


def _remove_if_only_the_lock(folder: Path) -> None:
    try:
        if set(os.listdir(folder)) <= {LOCK_FILE}:
            (folder / LOCK_FILE).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:  # it is only tidying
        pass


@contextlib.contextmanager
def _holding(folder: Path, world: World, fresh: bool) -> Iterator[None]:
    with contextlib.ExitStack() as held:
        error: Exception | None = None
        if world.is_root:
            try:
                held.enter_context(lock_run_folder(folder))
                if fresh:
                    check_new_run_folder(folder)
                check_run_folder(folder)
            except Exception as e:
                error = e
        if world.size > 1:
            with ending_all_ranks_on_error(world), world.starting():
                refusal = world.broadcast_text(
                    "" if error is None else str(error) or type(error).__name__, what="the run folder check"
                )
            if refusal and error is None:
                raise RunFolderError(refusal)
        if error is not None:
            raise error
        yield
