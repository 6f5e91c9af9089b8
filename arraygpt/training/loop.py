"""Training: ``arraygpt.train(...)`` and :func:`train_loop`, the loop that reads top to bottom like
nanoGPT's train.py: get the global batch, take one step (forward, backward, reduce, clip, update),
log, evaluate, checkpoint.

The paths a step can take (gradient accumulation, the all-reduce of several ranks, the sharded
optimizer of ``zero``) are functions of ``arraygpt.training.step``; the records, printed lines and
progress line are ``arraygpt.training.log``'s; checkpoints and resume are
``arraygpt.training.resume``'s; building a fresh run is ``arraygpt.training.build``'s; the run's
state is a :class:`~arraygpt.training.run.Run`; its options a
:class:`~arraygpt.training.config.TrainConfig`.

Every ``eval_interval`` steps the mean loss on the train and val splits is measured; metrics go to
``metrics.jsonl`` in the run folder, checkpoints to ``last/`` (every ``checkpoint_interval`` steps
and at the end) and ``best/`` (the lowest val loss so far). Plugins see every step, eval and
checkpoint through the ``arraygpt_on_step`` / ``arraygpt_on_eval`` / ``arraygpt_on_checkpoint``
hooks and may stop the run. Ctrl-C once finishes the step, saves and stops; twice aborts.

Under MPI (``mpiexec -n R``) every rank runs this loop on the same global batch; rank 0 alone
takes the run folder's lock, prints, writes and calls the hooks; a stop (Ctrl-C, a plugin) is
agreed by all ranks before each step (docs/distributed.md).

Not here: the ``arraygpt train`` command, its options and exit codes (``arraygpt.cli.train``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.config import GPTConfig
from arraygpt.io.tokenizers import Tokenizer
from arraygpt.training.build import new_run
from arraygpt.training.distributed import ShardedOptimizer, World, ending_all_ranks_on_error, get_world
from arraygpt.training.log import METRICS_FILE, Meter
from arraygpt.training.resume import holding_run_folder, resumed_run, save_checkpoint
from arraygpt.training.run import Run
from arraygpt.training.runfolder import resume_source
from arraygpt.training.step import train_step

__all__ = ["train", "train_loop"]


def train(
    data: str = "names",
    *,
    config: GPTConfig | str | None = None,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    tokenizer: Tokenizer | str | None = None,
    progress: bool = True,
    plugin_manager: Any = None,
    world: World | None = None,
    **options: Any,
) -> Run:
    """Train a GPT on text and return the finished :class:`~arraygpt.training.run.Run`.

    Inside an MPI job (``mpiexec -n R``), every rank calls this with the same arguments; the run
    spans the R ranks (docs/distributed.md) and every rank returns its Run (rank 0's holds the
    samples).

    Args:
        data: ``names`` (built in) or a text file path.
        config: a preset name (its vocab_size is replaced by the tokenizer's) or a GPTConfig;
            None: ``microgpt``, or with ``init_from`` the initial model's (no other may be given).
        out_dir: the run folder for metrics.jsonl and the last/ and best/ checkpoints; None
            writes nothing.
        resume: a run folder to continue exactly where its last checkpoint left off (its saved
            options are used; ``data`` and ``config`` are ignored; ``steps`` extends or shortens
            the run, docs/training.md).
        stop_after: stop (with a checkpoint) once this many steps are done, before ``steps``.
        tokenizer: ``char`` (default), ``byte``, a tokenizer JSON file, or a tokenizer object
            to use instead of building one from the data.
        progress: print progress, evaluations and samples.
        plugin_manager: the pluggy manager for optimizers and event hooks; default the process's.
        world: the ranks to span (``arraygpt.training.distributed.World``); default
            ``arraygpt.training.distributed.get_world()``: MPI's COMM_WORLD under an MPI launcher, else one
            process.
        **options: TrainConfig fields (steps, batch_size, lr, ...) and GPTConfig fields
            (n_layer, block_size, dropout, ...). ``init_from=PATH`` fine-tunes the model at PATH
            (``lora_rank=R``: LoRA adapters only); then only block_size (the training window)
            and dropout of the GPTConfig fields may be given (docs/training.md, "Fine-tuning").

    Raises:
        ValueError, TypeError, FileNotFoundError: bad options or data, before any training.
        TrainingDiverged: the loss became NaN or infinite.

    Example:
        >>> run = arraygpt.train("names", steps=200, progress=False)  # doctest: +SKIP
        >>> run.samples[:3]                                           # doctest: +SKIP
    """
    from arraygpt.manager import default_plugin_manager

    pm = plugin_manager or default_plugin_manager()
    world = world or get_world()
    if isinstance(tokenizer, (str, Path)):  # char, byte or a tokenizer JSON file: a TrainConfig option
        options["tokenizer"], tokenizer = str(tokenizer), None
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 0):
        raise ValueError(f"stop_after must be an integer >= 0, got {stop_after!r}")
    folder = Path(out_dir) if out_dir is not None else None
    if resume is not None:
        folder = resume_source(resume)[0]
        if out_dir is not None and Path(out_dir).resolve() != folder.resolve():
            raise ValueError("a resumed run writes into its own folder; do not pass out_dir with resume")
    with holding_run_folder(folder, world, fresh=resume is None):
        if resume is not None:
            run = resumed_run(resume, options, pm, progress, world)
        else:
            run = new_run(data, config, options, out_dir, tokenizer, pm, progress, world)
        if world.size > 1:
            with ending_all_ranks_on_error(world), world.starting():  # the same weights everywhere: rank 0's
                run.model.load_state_dict(world.broadcast_arrays_(run.model.params))
                world.check_identical(run.model.params)
        _print_header(run, resumed=resume is not None)
        train_loop(run, stop_after=stop_after)
    if run.stop_reason == "done" and run.config.samples and world.is_root:
        run.samples = run.sample()
        run.log.print(f"{len(run.samples)} samples:")
        for text in run.samples:
            run.log.print(("  " + text) if run.config.mode == "documents" else text)
    return run


def train_loop(run: Run, stop_after: int | None = None) -> Run:
    """Step ``run`` until ``config.steps`` (or ``stop_after``) steps are done, or a stop.

    With more than one rank, any other exception on a rank (or a second Ctrl-C) ends the whole
    job (``World.abort``, with a line naming the rank), so that no rank waits in a collective.

    Raises:
        TrainingDiverged: the loss or gradient norm became NaN/inf (nothing is saved; every
            rank raises it at the same step).
    """
    with _stopping_on_ctrl_c(run), ending_all_ranks_on_error(run.world):
        cfg = run.config
        run.model.train()
        meter = Meter(run.step)
        _record_start(run)
        while run.step < cfg.steps:
            if _should_stop(run, stop_after):
                break
            t0 = time.perf_counter()
            x, y = run.batcher.next()  # (G, T): the global batch, the same on every rank
            metrics = train_step(run, x, y)  # forward, backward, reduce, clip, update
            run.step += 1
            tokens = metrics.pop("n_tokens")
            metrics["tokens_per_s"] = tokens / max(time.perf_counter() - t0, 1e-12)
            meter.add(metrics["loss"], tokens)
            if any(r is True for r in run.call_hook("arraygpt_on_step", run=run, step=run.step, metrics=metrics)):
                run.request_stop("plugin")
            last = run.step == cfg.steps
            if run.step % cfg.log_interval == 0 or last:
                _log_progress(run, meter, metrics)
            if run.step % cfg.eval_interval == 0 or last:
                _evaluate_and_keep_best(run)
            if run.out_dir is not None and (run.step % (cfg.checkpoint_interval or cfg.eval_interval) == 0 or last):
                save_checkpoint(run, "last")
        _finish(run, meter)
    return run


# ----------------------------------------------------------------------------------------------
# the loop's parts


def _record_start(run: Run) -> None:
    start = {"event": "start", "step": run.step, "steps": run.config.steps, "time": time.time()}
    run.log.record({**start, "dropped": run.dropped_records} if run.dropped_records else start)


def _should_stop(run: Run, stop_after: int | None) -> bool:
    """Whether to stop before the next step: ``stop_after`` reached, or a stop asked for on any
    rank (rank 0's plugins, a Ctrl-C), agreed by all ranks."""
    if stop_after is not None and run.step >= stop_after:
        run.request_stop("stop_after")
    if run.world.size > 1:
        reasons = ("", "stop_after", "plugin", "interrupted")
        asked = run.stop_requested
        flag = np.array([reasons.index(asked) if asked in reasons else (2 if asked else 0)], dtype=np.int64)
        run.world.allreduce_max_(flag, what=f"the stop check before step {run.step + 1}")
        if flag[0]:
            run.request_stop(reasons[int(flag[0])])
    return bool(run.stop_requested)


def _log_progress(run: Run, meter: Meter, metrics: dict[str, float]) -> None:
    loss, tokens_per_s = meter.take()
    elapsed = meter.elapsed()
    record = {
        "event": "train",
        "step": run.step,
        "loss": loss,
        "lr": metrics["lr"],
        "tokens_per_s": tokens_per_s,
        "elapsed": elapsed,
    }
    if "grad_norm" in metrics:
        record["grad_norm"] = metrics["grad_norm"]
    run.log.record(record)
    eta = meter.eta(run.step, run.config.steps)
    run.log.progress_line(run.step, run.config.steps, loss, metrics["lr"], tokens_per_s, elapsed, eta)


def _evaluate_and_keep_best(run: Run) -> None:
    losses = run.evaluate()
    run.log.record({"event": "eval", "step": run.step, **losses})
    run.log.print(f"step {run.step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in losses.items()))
    score = losses.get("val_loss", losses.get("train_loss", float("inf")))
    if score < run.best_val_loss:
        run.best_val_loss = score
        if run.out_dir is not None:
            save_checkpoint(run, "best")
    if any(r is True for r in run.call_hook("arraygpt_on_eval", run=run, step=run.step, metrics=losses)):
        run.request_stop("plugin")


def _finish(run: Run, meter: Meter) -> None:
    """After the last step or a stop: the final checkpoint, the end record, how to resume."""
    run.stop_reason = run.stop_requested or "done"
    if run.out_dir is not None and run.last_saved != run.step:
        save_checkpoint(run, "last")
    run.log.record({"event": "end", "step": run.step, "reason": run.stop_reason, "elapsed": meter.elapsed()})
    if run.stop_reason != "done":
        where = f"; resume with: arraygpt train --resume {run.out_dir}" if run.out_dir else ""
        run.log.print(f"stopped at step {run.step}/{run.config.steps} ({run.stop_reason}){where}")


@contextlib.contextmanager
def _stopping_on_ctrl_c(run: Run) -> Iterator[None]:
    """While the loop runs (on the main thread): Ctrl-C once asks the run to stop after this step
    (with a checkpoint); Ctrl-C again raises KeyboardInterrupt. Ends the progress bar's line."""
    pressed = []

    def on_sigint(signum: int, frame: Any) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)
        run.request_stop("interrupted")
        run.log.print("\nCtrl-C: finishing this step, saving a checkpoint and stopping (Ctrl-C again aborts)")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        run.log.end_bar()


def _print_header(run: Run, resumed: bool) -> None:
    cfg, m = run.config, run.model
    what = f"resuming at step {run.step}" if resumed else "training"
    run.log.print(
        f"{what}: {m.num_params():,} parameters (n_layer={m.config.n_layer} n_embd={m.config.n_embd} "
        f"n_head={m.config.n_head} block_size={m.config.block_size} vocab={m.config.vocab_size}) "
        f"on {m.backend.name}/{m.dtype}"
    )
    if cfg.init_from:
        trained = "every weight"
        if m.lora is not None:
            n = sum(int(a.shape[0]) * int(a.shape[1]) for a in m.adapters.values())
            trained = f"LoRA rank {m.lora.rank} alpha {m.lora.alpha:g} on {','.join(m.lora.targets)}: {n:,} parameters"
        run.log.print(f"fine-tuning {cfg.init_from} in windows of {cfg.window} tokens; training {trained}")
    split = f"{run.dataset.split_size('train'):,} train / {run.dataset.split_size('val'):,} val"
    unit = "documents" if cfg.mode == "documents" else "tokens"
    batch = f"batch {cfg.batch_size}"
    if cfg.grad_accum > 1 or run.world.size > 1:
        batch = (
            f"global batch {run.global_batch} = {run.world.size} rank(s) x {cfg.batch_size} rows x "
            f"{cfg.grad_accum} micro-batch(es)"
        )
    if isinstance(run.optimizer, ShardedOptimizer):
        batch += f", optimizer state sharded over {run.world.size} ranks (zero)"
    run.log.print(
        f"data: {cfg.data} ({cfg.mode}, {split} {unit}); {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule}, "
        f"{batch}, {cfg.steps} steps" + (f"; run folder {run.out_dir}" if run.out_dir else "")
    )
    if run.dropped_records:
        run.log.print(
            f"{METRICS_FILE}: removed {run.dropped_records} line(s) after step {run.step}, the steps this "
            "run does again"
        )
