"""Training: ``arraygpt.train(...)``, the :class:`TrainConfig` of a run, and the :class:`Run` that
holds a training run's state and walks its loop.

One step: draw the global batch on the host (``arraygpt.training.data.Batcher``), forward and backward
through the hand-written GPT one micro-batch of ``batch_size`` rows at a time (``grad_accum`` of
them per rank), weight each micro-batch's mean-loss gradient by its share of the batch's targets,
add the ranks' gradients (one all-reduce, ``arraygpt.training.distributed``; nothing with one process),
optionally clip the global gradient norm, and let the optimizer plugin update the parameters in
place at the schedule's learning rate. Every ``eval_interval`` steps the mean
loss on the train and val splits is measured; metrics go to ``metrics.jsonl`` in the run folder,
checkpoints to ``last/`` (every ``checkpoint_interval`` steps and at the end) and ``best/`` (the
lowest val loss so far); a resume first removes the metrics records after the step it continues
from (``arraygpt.training.runfolder.trim_metrics``). Plugins see every step, eval and checkpoint through the
``arraygpt_on_step`` / ``arraygpt_on_eval`` / ``arraygpt_on_checkpoint`` hooks and may stop the run.

A run is exactly resumable: a checkpoint holds the parameters, the optimizer's buffers and step
count, the batcher's generator and epoch position, the dropout generator and the step, so a run of
2N steps stopped after N (Ctrl-C, a plugin, ``stop_after``, a kill after a checkpoint) and resumed
ends with the same bits as a run never stopped (on NumPy). The schedule is a pure function of the
step; evaluations and samples draw from their own generators and change nothing.

With ``zero`` on several ranks the optimizer state is sharded (ZeRO stage 1,
``arraygpt.training.distributed.ShardedOptimizer``): the gradients are reduce-scattered instead of
all-reduced, each rank updates its share of the parameters and an all-gather brings the rest.

Under MPI (``mpiexec -n R``) rank r takes rows ``[r P, (r+1) P)`` of every global batch
(P = batch_size x grad_accum), so which rows a rank computes depends on the global row index
only; with more than one micro-batch in the global batch, dropout coins are seeded from
(seed, step, global micro-batch index), never from the rank. Rank 0 alone takes the run folder's
lock (and tells the other ranks, in the first collective, when it is refused), prints, writes
metrics and checkpoints and calls the event hooks; a stop (Ctrl-C, a plugin) is agreed by all
ranks before each step. A checkpoint resumes on any number of ranks that divides its global batch.

The samples printed at the end come from ``arraygpt.generation.generation.generate`` with the plain
``temperature`` sampler. Not here: the ``arraygpt train`` command, its options and exit codes
(``arraygpt.cli.train``, which derives the options from TrainConfig's fields and their help).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from arraygpt.config import DTYPES, GPTConfig, check_fields
from arraygpt.errors import CheckpointError
from arraygpt.io.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, read_tokenizer_file
from arraygpt.nn.model import GPT
from arraygpt.training.data import (
    MODES,
    Batcher,
    DataError,
    Dataset,
    default_tokenizer,
    fingerprint,
    make_dataset,
    read_source,
)
from arraygpt.training.distributed import CollectiveTimeout, ShardedOptimizer, World, get_world
from arraygpt.training.optim import SCHEDULES, Schedule, clip_grad_norm, create_optimizer
from arraygpt.training.precision import PRECISIONS, mixed_precision
from arraygpt.training.runfolder import (
    RunFolderError,
    check_new_run_folder,
    check_run_folder,
    check_training_state,
    lock_run_folder,
    resume_source,
    trim_metrics,
)

METRICS_FILE = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped without saving.

    Attributes:
        run: the :class:`Run`, as it was before the failed step.
    """

    def __init__(self, message: str, run: Run):
        super().__init__(message)
        self.run = run


@dataclass(frozen=True)
class TrainConfig:
    """The options that define a training run (saved with each checkpoint, restored on resume).

    Attributes:
        data: ``names`` (built in) or a text file path.
        mode: ``documents`` (one per line, wrapped in BOS) or ``stream`` (random windows);
            default documents for ``names``, stream for a file.
        tokenizer: ``char``, ``byte`` or the path of a tokenizer JSON file.
        val_fraction: share of the data held out for validation (the end of it).
        split_seed: seed of the one shuffle of documents before the split.
        steps: optimizer steps of the whole run (the schedule's length).
        batch_size: rows per micro-batch, on each rank.
        grad_accum: micro-batches per optimizer step, on each rank: the step's gradient is that of
            the mean loss over the global batch of ``ranks x batch_size x grad_accum`` rows
            (docs/distributed.md).
        optimizer: a registered optimizer name (``adam``, ``adamw``, ``sgd``, or a plugin's).
        lr: peak learning rate; schedule: ``constant``, ``linear`` (to zero) or ``cosine``
            (to min_lr); warmup_steps: linear warmup first.
        beta1, beta2, eps, weight_decay, momentum: optimizer options, passed to the factory
            when it accepts them (None: the factory's default).
        grad_clip: clip the global gradient norm to this (0: off).
        zero: shard the optimizer state over the ranks (ZeRO stage 1, ``ShardedOptimizer``): each
            rank keeps the state of its 1/R of the parameters, gradients are reduce-scattered and
            the updated parameters all-gathered; the same run as without (docs/distributed.md).
            One process: no effect.
        eval_interval: steps between evaluations (and the default checkpoint interval).
        eval_batches: batches per split per evaluation (0: the whole split).
        log_interval: steps between progress lines and metrics records.
        checkpoint_interval: steps between ``last/`` checkpoints (0: eval_interval).
        seed: seeds the weights, the dropout coins and the batches.
        backend, dtype: where and in what precision the model lives (None: the active backend).
        samples, sample_length, temperature: what to print at the end (documents: up to
            sample_length tokens each, stopping at EOS; stream: one text of sample_length tokens).
    """

    data: str = field(default="names", metadata={"help": "names (built in) or a text file path"})
    mode: str | None = field(
        default=None,
        metadata={
            "help": "documents (one per line, wrapped in BOS) or stream (random windows); unset: documents for "
            "names, stream for a file",
            "choices": MODES,
        },
    )
    tokenizer: str = field(default="char", metadata={"help": "char, byte or a tokenizer JSON file"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the data held out for validation"})
    split_seed: int = field(default=42, metadata={"help": "seed of the one shuffle of documents before the split"})
    steps: int = field(default=5000, metadata={"help": "optimizer steps in the whole run"})
    batch_size: int = field(default=64, metadata={"help": "rows per micro-batch (per rank)"})
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "micro-batches whose gradients one optimizer step sums (per rank); the global batch is "
            "ranks x batch_size x grad_accum rows"
        },
    )
    optimizer: str = field(default="adam", metadata={"help": "adam, adamw, sgd or a plugin's optimizer"})
    lr: float = field(default=1e-2, metadata={"help": "peak learning rate"})
    schedule: str = field(
        default="linear", metadata={"help": "constant, linear (to zero) or cosine (to --min-lr)", "choices": SCHEDULES}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    min_lr: float = field(default=0.0, metadata={"help": "floor of the cosine schedule"})
    beta1: float | None = field(default=0.9, metadata={"help": "Adam beta1"})
    beta2: float | None = field(default=0.95, metadata={"help": "Adam beta2"})
    eps: float | None = field(default=1e-8, metadata={"help": "Adam epsilon"})
    weight_decay: float | None = field(default=None, metadata={"help": "weight decay; unset: the optimizer's"})
    momentum: float | None = field(default=None, metadata={"help": "SGD momentum; unset: the optimizer's (0)"})
    grad_clip: float = field(default=0.0, metadata={"help": "clip the global gradient norm to this (0: off)"})
    zero: bool = field(
        default=False,
        metadata={
            "help": "with several ranks, shard the optimizer state over them (ZeRO stage 1): each rank keeps the "
            "moments of 1/R of the parameters; the same run as unsharded"
        },
    )
    eval_interval: int = field(default=500, metadata={"help": "steps between evaluations"})
    eval_batches: int = field(default=20, metadata={"help": "batches per split per evaluation, 0 for the whole split"})
    log_interval: int = field(default=250, metadata={"help": "steps between progress lines"})
    checkpoint_interval: int = field(
        default=0, metadata={"help": "steps between last/ checkpoints (0: the eval interval)"}
    )
    seed: int = field(default=0, metadata={"help": "seeds the weights, dropout and batches"})
    backend: str | None = field(
        default=None, metadata={"help": "numpy, cupy, array_api_strict, torch...; unset: $ARRAYGPT_BACKEND or numpy"}
    )
    dtype: str = field(default="float32", metadata={"help": "precision of the model", "choices": DTYPES})
    precision: str = field(
        default="full",
        metadata={
            "help": "full: compute in --dtype; mixed-float16: float32 master weights and optimizer state, float16 "
            "compute, dynamic loss scaling (docs/precision.md)",
            "choices": PRECISIONS,
        },
    )
    samples: int = field(default=10, metadata={"help": "samples printed at the end"})
    sample_length: int = field(default=32, metadata={"help": "tokens per sample at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the samples"})

    def __post_init__(self) -> None:
        mode = self.mode or ("documents" if self.data == "names" else "stream")
        object.__setattr__(self, "mode", mode)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        positive = ("steps", "batch_size", "grad_accum", "eval_interval", "log_interval", "sample_length")
        non_negative = ("warmup_steps", "eval_batches", "checkpoint_interval", "samples", "split_seed", "seed")
        for name in positive + non_negative:
            value = getattr(self, name)
            low = 1 if name in positive else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                what = "a positive integer" if low else "an integer >= 0"
                raise ValueError(f"{name} must be {what}, got {value!r}")
        for name in ("lr", "min_lr", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                label = "learning rate (lr)" if name == "lr" else name
                raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.precision != "full" and self.dtype != "float32":
            raise ValueError(f"precision {self.precision} keeps float32 master weights; dtype must be float32")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not isinstance(self.zero, bool):
            raise ValueError(f"zero must be True or False, got {self.zero!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        check_fields(cls, d, "training option")
        return cls(**d)

    def optimizer_options(self, factory: Any) -> dict[str, Any]:
        """The optimizer options that are set and that ``factory`` accepts by name."""
        candidates: dict[str, Any] = {}
        if self.beta1 is not None or self.beta2 is not None:
            candidates["betas"] = (
                0.9 if self.beta1 is None else self.beta1,
                0.999 if self.beta2 is None else self.beta2,
            )
        for name in ("eps", "weight_decay", "momentum"):
            if getattr(self, name) is not None:
                candidates[name] = getattr(self, name)
        try:
            accepted = set(inspect.signature(factory).parameters)
        except (TypeError, ValueError):
            return {}
        return {k: v for k, v in candidates.items() if k in accepted}


# options a resumed run may change: they do not alter the computation
RESUME_OVERRIDABLE = ("backend", "log_interval", "samples", "sample_length", "temperature", "zero")


class Run:
    """A training run: everything the loop needs, and what plugins see in the event hooks.

    Attributes:
        config: the TrainConfig.
        model, tokenizer, dataset, batcher, optimizer, schedule: the parts.
        out_dir: the run folder (None: nothing is written).
        step: optimizer steps done.
        best_val_loss: the lowest val loss of an evaluation so far (inf before the first).
        history: every metrics record of this process, as written to metrics.jsonl.
        dropped_records: on resume, the lines of metrics.jsonl after the resumed step that were
            removed (that run's later steps, done again now); 0 otherwise and on ranks other than 0.
        samples: the texts sampled at the end.
        stop_reason: why the loop ended: ``done``, ``stop_after``, ``interrupted``, ``plugin``.
        world: the ranks of the run (``arraygpt.training.distributed.World``; one process by default).
    """

    def __init__(
        self,
        config: TrainConfig,
        model: GPT,
        tokenizer: Tokenizer,
        dataset: Dataset,
        batcher: Batcher,
        optimizer: Any,
        out_dir: Path | None,
        pm: Any,
        *,
        step: int = 0,
        best_val_loss: float = math.inf,
        data_sha256: str = "",
        progress: bool = True,
        stream: TextIO | None = None,
        world: World | None = None,
    ):
        self.world = world or World()
        self.config = config
        self.model = model
        self.mixed = mixed_precision(model, config.precision)  # None for "full"
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.batcher = batcher
        self.optimizer = optimizer
        self.schedule = Schedule(config.schedule, config.lr, config.steps, config.warmup_steps, config.min_lr)
        self.out_dir = out_dir
        self.pm = pm
        self.step = step
        self.best_val_loss = best_val_loss
        self.data_sha256 = data_sha256
        self.progress = progress and self.world.is_root
        self.stream = stream or sys.stdout
        self.history: list[dict[str, Any]] = []
        self.samples: list[str] = []
        self.stop_reason: str | None = None
        self._stop_requested: str | None = None
        self._sigint = False
        self._last_saved = -1
        self._bar_open = False
        self._buffer: np.ndarray | None = None  # the all-reduce buffer, kept between steps
        self.dropped_records = 0  # metrics.jsonl lines after the resumed step, removed (rank 0)

    # -- events, metrics, output -------------------------------------------------------------

    def request_stop(self, reason: str = "plugin") -> None:
        """Ask the loop to save a checkpoint and stop after the current step."""
        self._stop_requested = self._stop_requested or reason

    def _call_hook(self, name: str, **kwargs: Any) -> list[Any]:
        """Call a training-event hook, each implementation on its own (last registered first), so
        that a plugin that raises is named."""
        from arraygpt.manager import PluginError

        if not self.world.is_root:  # rank 0 alone calls the hooks; a stop it asks for reaches every rank
            return []
        hook = getattr(self.pm.hook, name)
        impls = hook.get_hookimpls()
        if any(impl.hookwrapper or impl.wrapper for impl in impls):
            return hook(**kwargs)
        results = []
        for impl in reversed(impls):
            try:
                result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            except Exception as e:
                raise PluginError(f"plugin {impl.plugin_name!r} raised in {name} at step {self.step}: {e!r}") from e
            if result is not None:
                results.append(result)
        return results

    def _record(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.out_dir is not None and self.world.is_root:
            with open(self.out_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _print(self, text: str) -> None:
        if self.progress:
            if self._bar_open:  # end the progress bar's line first
                print(file=self.stream)
                self._bar_open = False
            print(text, file=self.stream, flush=True)

    def _progress_line(self, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.progress:
            return
        total = self.config.steps
        width = 20
        filled = int(width * self.step / total)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {self.step:>{len(str(total))}}/{total}  "
            f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
        )
        if self.stream.isatty():
            print("\r" + line, end="", file=self.stream, flush=True)
            self._bar_open = True
        else:
            print(line, file=self.stream, flush=True)

    # -- evaluation and sampling ---------------------------------------------------------------

    def evaluate(self, max_batches: int | None = -1, splits: tuple[str, ...] = ("train", "val")) -> dict[str, float]:
        """Mean loss per predicted token on the train and val splits (model in eval mode).

        The rows are those of ``max_batches`` global batches (``global_batch`` rows each, drawn as
        one process with that batch size would draw them), so the measure does not depend on the
        number of ranks or micro-batches. Each rank computes its contiguous share of every batch,
        ``batch_size`` rows at a time, and the ranks add their sums of losses and counts.

        Args:
            max_batches: batches per split; -1: ``config.eval_batches``; None or 0: the whole split.
            splits: which splits to measure.
        """
        if max_batches == -1:
            max_batches = self.config.eval_batches
        world, B = self.world, self.config.batch_size
        sums = np.zeros((len(splits), 2))  # per split: sum of losses over targets, count of targets
        was_training = self.model.training
        self.model.eval()
        try:
            for i, split in enumerate(splits):
                for x, y in self.dataset.eval_batches(
                    split, self.global_batch, max_batches or None, seed=self.config.seed
                ):
                    lo, hi = len(x) * world.rank // world.size, len(x) * (world.rank + 1) // world.size
                    for start in range(lo, hi, B):
                        xb, yb = x[start : min(start + B, hi)], y[start : min(start + B, hi)]  # (b, T)
                        n = int((yb >= 0).sum())
                        if n:
                            _, loss = self.model.forward(xb, yb)
                            sums[i] += (loss * n, n)
        finally:
            self.model.train(was_training)
        world.allreduce_sum_(sums, what="the evaluation all-reduce")
        return {f"{split}_loss": float(total / count) for split, (total, count) in zip(splits, sums) if count}

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all ranks: ranks x batch_size x grad_accum."""
        return self.world.size * self.config.batch_size * self.config.grad_accum

    def sample(
        self, n: int | None = None, length: int | None = None, temperature: float | None = None, seed: int | None = None
    ) -> list[str]:
        """Texts sampled from the model with ``generate`` (the KV cache, plain ``temperature``
        sampling of softmax(logits / T)), all ``n`` rows as one batch.

        Documents mode: ``n`` documents, each started at BOS and ended at EOS (or after
        ``length`` tokens). Stream mode: ``n`` texts of ``length`` tokens, started at a newline.
        The coins come from their own generator, seeded with ``[3, seed]`` (default seed:
        ``config.seed``), so sampling changes nothing in the run and one seed gives the same texts.
        """
        from arraygpt.generation.generation import generate

        cfg = self.config
        n = cfg.samples if n is None else n
        length = cfg.sample_length if length is None else length
        temperature = cfg.temperature if temperature is None else temperature
        if n < 1:
            return []
        rng = np.random.default_rng([3, cfg.seed if seed is None else seed])
        tok, model = self.tokenizer, self.model
        start = tok.bos_id
        if start is None:
            start = tok.encode("\n")[0] if isinstance(tok, ByteTokenizer) or "\n" in tok.chars else 0
        V = tok.vocab_size
        sampler = "temperature" if model.config.vocab_size == V else _tokenizer_vocabulary(V)
        rows: list[list[int]] = [[] for _ in range(n)]
        prompt = np.full((n, 1), start, dtype=np.int64)  # (n, 1)
        for step in generate(model, prompt, length, sampler, temperature=temperature, seed=rng, eos_id=tok.eos_id):
            for row, token in zip(rows, step):
                if token is not None and token != tok.eos_id:
                    row.append(token)
        return [tok.decode(row) for row in rows]

    # -- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the model, tokenizer and optimizer (``extra``)."""
        return {
            "step": self.step,
            "train_config": self.config.to_dict(),
            "data": self.batcher.state_dict(),
            "data_sha256": self.data_sha256,
            "schedule": self.schedule.to_dict(),
            "lr_next": self.schedule(self.step),
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "world_size": self.world.size,
            "global_batch": self.global_batch,
            **({"precision": self.mixed.state_dict()} if self.mixed is not None else {}),
        }

    def save(self, which: str = "last") -> Path | None:
        """Write the ``last`` or ``best`` checkpoint atomically; tell the plugins. Every rank checks
        that the parameters are finite (they are the same everywhere); rank 0 alone writes."""
        from arraygpt.io.checkpoint import save_checkpoint

        if self.out_dir is None:
            return None
        for name, p in self.model.params.items():
            xp = self.model.xp
            if not bool(xp.all(xp.isfinite(p))):
                self._diverged(f"parameter {name} holds NaN or inf")
        if which == "last":
            self._last_saved = self.step
        optimizer = self.optimizer
        if isinstance(optimizer, ShardedOptimizer):  # gather the full state onto rank 0: every rank takes part
            optimizer = _StateOnly(optimizer.state_dict())
        if not self.world.is_root:
            return None
        path = save_checkpoint(
            self.out_dir / which, self.model, self.tokenizer, optimizer, extra={**self.state(), "kind": which}
        )
        self._record({"event": "checkpoint", "step": self.step, "kind": which, "path": str(path)})
        self._call_hook("arraygpt_on_checkpoint", run=self, step=self.step, path=str(path))
        return path

    # -- the loop ------------------------------------------------------------------------------

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._sigint:
            raise KeyboardInterrupt
        self._sigint = True
        self.request_stop("interrupted")
        self._print("\nCtrl-C: finishing this step, saving a checkpoint and stopping (Ctrl-C again aborts)")

    def train(self, stop_after: int | None = None) -> Run:
        """Run the loop until ``config.steps`` (or ``stop_after``) steps are done, or a stop.

        With more than one rank, any other exception on a rank (or a second Ctrl-C) ends the whole
        job (``World.abort``, with a line naming the rank), so that no rank waits in a collective.

        Raises:
            TrainingDiverged: the loss or gradient norm became NaN/inf (nothing is saved; every
                rank raises it at the same step).
        """
        handler_installed = False
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
            handler_installed = True
        try:
            with _ending_all_ranks_on_error(self.world):
                self._loop(stop_after)
        finally:
            if handler_installed:
                signal.signal(signal.SIGINT, previous)
            if self._bar_open:
                print(file=self.stream, flush=True)
                self._bar_open = False
        return self

    def _loop(self, stop_after: int | None) -> None:
        cfg, model = self.config, self.model
        model.train()
        checkpoint_every = cfg.checkpoint_interval or cfg.eval_interval
        t_start = time.perf_counter()
        t_log, tokens_log, losses = t_start, 0, []
        start = {"event": "start", "step": self.step, "steps": cfg.steps, "time": time.time()}
        self._record({**start, "dropped": self.dropped_records} if self.dropped_records else start)
        while self.step < cfg.steps:
            if stop_after is not None and self.step >= stop_after:
                self.request_stop("stop_after")
            self._agree_on_stop()
            if self._stop_requested:
                break
            t0 = time.perf_counter()
            x, y = self.batcher.next()  # (G, T): the global batch, the same on every rank
            lr = self.schedule(self.step)
            grads, loss, n_tokens = self.gradients(x, y)
            metrics: dict[str, float] = {"loss": loss, "lr": lr}
            if self.mixed is not None:  # an inf/nan gradient skips the update and lowers the loss scale
                skipped, norm = self.mixed.apply(
                    grads, self.optimizer, lr, grad_clip=cfg.grad_clip, reduce=self._sum_over_shards
                )
                metrics.update(skipped=float(skipped), loss_scale=self.mixed.scaler.scale)
                if norm is not None:
                    metrics["grad_norm"] = norm
            else:
                if cfg.grad_clip:
                    norm = clip_grad_norm(grads, cfg.grad_clip, self._sum_over_shards)
                    if not math.isfinite(norm):
                        self._diverged(f"the gradient norm is {norm}")
                    metrics["grad_norm"] = norm
                self.optimizer.step(grads, lr)
            self.step += 1
            dt = time.perf_counter() - t0
            metrics["tokens_per_s"] = n_tokens / dt if dt > 0 else 0.0
            tokens_log += n_tokens
            losses.append(loss)
            if any(r is True for r in self._call_hook("arraygpt_on_step", run=self, step=self.step, metrics=metrics)):
                self.request_stop("plugin")
            if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                now = time.perf_counter()
                tokens_per_s = tokens_log / (now - t_log) if now > t_log else 0.0
                record = {
                    "event": "train",
                    "step": self.step,
                    "loss": float(np.mean(losses)),
                    "lr": lr,
                    "tokens_per_s": tokens_per_s,
                    "elapsed": now - t_start,
                }
                if "grad_norm" in metrics:
                    record["grad_norm"] = metrics["grad_norm"]
                self._record(record)
                self._progress_line(record["loss"], lr, tokens_per_s)
                t_log, tokens_log, losses = now, 0, []
            if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                self._evaluate_and_keep_best()
            if self.out_dir is not None and (self.step % checkpoint_every == 0 or self.step == cfg.steps):
                self.save("last")
        self.stop_reason = self._stop_requested or "done"
        if self.out_dir is not None and self._last_saved != self.step:
            self.save("last")
        self._record(
            {"event": "end", "step": self.step, "reason": self.stop_reason, "elapsed": time.perf_counter() - t_start}
        )
        if self.stop_reason != "done":
            where = f"; resume with: arraygpt train --resume {self.out_dir}" if self.out_dir else ""
            self._print(f"stopped at step {self.step}/{cfg.steps} ({self.stop_reason}){where}")

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, Any], float, int]:
        """The gradient of the mean loss over the global batch (x, y), its mean loss and its count
        of targets, the same on every rank.

        This rank takes rows ``[rank P, (rank+1) P)`` (P = batch_size x grad_accum) in micro-batches
        of batch_size rows. Micro-batch k has n_k targets and mean loss L_k, and ``model.backward()``
        gives dL_k; the batch's mean loss is L = sum_k n_k L_k / n with n = sum_k n_k over the whole
        global batch (targets of -1 count nowhere), so dL = sum_k (n_k / n) dL_k. The ranks' partial
        sums (and sum_k n_k L_k) are added with one all-reduce of one contiguous buffer.

        Args:
            x, y: the global batch, int64 (ranks x batch_size x grad_accum, T), as
                ``batcher.next()`` draws it; y is -1 where nothing is predicted.

        Returns:
            ``(grads, loss, n)``: name -> gradient on the model's backend, the mean loss, and the
            number of targets of the global batch. With the optimizer state sharded (``zero``)
            the ranks' gradients are reduce-scattered instead, and ``grads`` holds this rank's
            pieces of the parameters only (``ShardedOptimizer.reduce_gradients``).

        Raises:
            TrainingDiverged: the loss is NaN or infinite.
        """
        cfg, model, world = self.config, self.mixed or self.model, self.world
        B, P = cfg.batch_size, cfg.batch_size * cfg.grad_accum
        n_total = int((y >= 0).sum())
        if world.size == 1 and cfg.grad_accum == 1:  # one micro-batch: the plain step
            _, loss = model.forward(x, y)
            if not math.isfinite(loss):
                self._diverged(f"the loss is {loss}")
            return model.backward(), loss, n_total
        reseed = cfg.grad_accum * world.size > 1 and model.config.dropout > 0 and model.training
        grads: dict[str, Any] | None = None
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            start = world.rank * P + k * B
            xk, yk = x[start : start + B], y[start : start + B]  # (B, T)
            n_k = int((yk >= 0).sum())
            if n_k == 0:  # nothing to predict: no share of the loss or the gradient
                continue
            if reseed:  # the coins of a micro-batch depend on its global index, not on the rank
                micro = start // B
                model.set_rng_state(np.random.default_rng([5, cfg.seed, self.step, micro]).bit_generator.state)
            _, loss_k = model.forward(xk, yk)
            if world.size == 1 and not math.isfinite(loss_k):
                self._diverged(f"the loss is {loss_k}")
            weight = n_k / n_total
            loss_sum += loss_k * n_k
            g = model.backward()
            grads = (
                {name: gi * weight for name, gi in g.items()}
                if grads is None
                else {name: grads[name] + g[name] * weight for name in grads}
            )
        if grads is None:  # every target of this rank's rows is ignored
            grads = {name: model.xp.zeros_like(p) for name, p in model.params.items()}
        if isinstance(self.optimizer, ShardedOptimizer):
            grads = self.optimizer.reduce_gradients(grads, what=f"the gradient reduce-scatter of step {self.step + 1}")
            what = f"the loss all-reduce of step {self.step + 1}"
            loss_sum = float(world.allreduce_sum_(np.array([loss_sum]), what=what)[0])
        elif world.size > 1:
            grads, loss_sum = self._allreduce(grads, loss_sum)
        loss = loss_sum / n_total if n_total else math.nan
        if not math.isfinite(loss):
            self._diverged(f"the loss is {loss}")
        return grads, loss, n_total

    def _allreduce(self, grads: dict[str, Any], loss_sum: float) -> tuple[dict[str, Any], float]:
        """Add every rank's gradients and loss sum: one contiguous host buffer, one all-reduce."""
        from arraygpt.xp import to_numpy

        host = {name: to_numpy(g) for name, g in grads.items()}
        size = sum(h.size for h in host.values()) + 1
        dtype = np.result_type(*host.values())
        if self._buffer is None or self._buffer.size != size or self._buffer.dtype != dtype:
            self._buffer = np.empty(size, dtype=dtype)  # (all gradients + the loss sum,)
        buffer, start = self._buffer, 0
        for h in host.values():
            buffer[start : start + h.size] = h.ravel()
            start += h.size
        buffer[-1] = loss_sum
        self.world.allreduce_sum_(buffer, what=f"the gradient all-reduce of step {self.step + 1}")
        out, start = {}, 0
        for name, h in host.items():
            out[name] = self.model.backend.asarray(buffer[start : start + h.size].reshape(h.shape))
            start += h.size
        return out, float(buffer[-1])

    @property
    def _sum_over_shards(self) -> Any:
        """For clipping: adds a squared norm over the ranks when each holds a part of the gradients."""
        if not isinstance(self.optimizer, ShardedOptimizer):
            return None
        what = f"the gradient norm all-reduce of step {self.step + 1}"
        return lambda s: float(self.world.allreduce_sum_(np.array([s]), what=what)[0])

    def _agree_on_stop(self) -> None:
        """With several ranks, a stop asked for on any rank (rank 0's plugins, a Ctrl-C) stops all."""
        if self.world.size == 1:
            return
        reasons = ("", "stop_after", "plugin", "interrupted")
        flag = np.array(
            [
                reasons.index(self._stop_requested)
                if self._stop_requested in reasons
                else (2 if self._stop_requested else 0)
            ],
            dtype=np.int64,
        )
        self.world.allreduce_max_(flag, what=f"the stop check before step {self.step + 1}")
        if flag[0]:
            self.request_stop(reasons[int(flag[0])])

    def _evaluate_and_keep_best(self) -> None:
        losses = self.evaluate()
        self._record({"event": "eval", "step": self.step, **losses})
        self._print(f"step {self.step}: " + ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in losses.items()))
        score = losses.get("val_loss", losses.get("train_loss", math.inf))
        improved = score < self.best_val_loss
        if improved:
            self.best_val_loss = score
            if self.out_dir is not None:
                self.save("best")
        if any(r is True for r in self._call_hook("arraygpt_on_eval", run=self, step=self.step, metrics=losses)):
            self.request_stop("plugin")

    def _diverged(self, what: str) -> None:
        last = (
            f"; the last good checkpoint is {self.out_dir / 'last'} (step {self._last_saved})"
            if (self.out_dir is not None and self._last_saved >= 0)
            else ""
        )
        step = self.step if "parameter" in what else self.step + 1  # the step that broke the parameters is done
        message = (
            f"training diverged at step {step}: {what}. Stopped without saving{last}. "
            "Try a lower learning rate (--lr) or gradient clipping (--grad-clip 1.0)."
        )
        self._record({"event": "diverged", "step": step, "message": message})
        self.stop_reason = "diverged"
        raise TrainingDiverged(message, self)


class _StateOnly:
    """An optimizer state already gathered, for ``save_checkpoint`` (which calls ``state_dict()``)."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


@contextlib.contextmanager
def _ending_all_ranks_on_error(world: World) -> Iterator[None]:
    """With several ranks, turn an exception on one rank into the end of the job (MPI_Abort after
    its traceback and a line naming the rank), so no other rank waits for it in a collective.
    TrainingDiverged is left alone: every rank raises it at the same step."""
    try:
        yield
    except TrainingDiverged:
        raise
    except BaseException as e:
        if world.size == 1:
            raise
        traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 1
        what = str(e).split(": ", 1)[-1] if isinstance(e, CollectiveTimeout) else f"{type(e).__name__}: {e}"
        world.abort(f"{what}; ending all {world.size} ranks", code)
        raise


@contextlib.contextmanager
def _holding_run_folder(folder: Path | None, world: World, fresh: bool) -> Iterator[None]:
    """One run per folder: rank 0 takes the folder's lock and checks the folder (a fresh run's
    must hold no run), and holds the lock for the block. With several ranks, rank 0 then tells
    the others the outcome, in the run's first collective, so that a refused folder ends every
    rank at once with rank 0's error instead of leaving them waiting for it."""
    if folder is None:
        yield
        return
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
            with _ending_all_ranks_on_error(world), world.starting():
                refusal = world.broadcast_text(
                    "" if error is None else str(error) or type(error).__name__, what="the run folder check"
                )
            if refusal and error is None:
                raise RunFolderError(refusal)
        if error is not None:
            raise error
        yield


def _tokenizer_vocabulary(V: int) -> Any:
    """A sampler filter that keeps the first ``V`` ids: a model whose vocab_size was set larger
    than its tokenizer's never samples an id the tokenizer cannot decode."""
    from arraygpt.xp import namespace

    def keep_tokenizer_ids(probs: Any) -> Any:
        xp = namespace(probs)
        ids = xp.arange(probs.shape[-1], device=probs.device)[None, :]  # (1, V_model)
        return xp.where(ids < V, probs, xp.zeros_like(probs))  # (B, V_model)

    return keep_tokenizer_ids


# ----------------------------------------------------------------------------------------------
# building a run: fresh or resumed


def _split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - model_fields - train_fields)
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}; training options: {', '.join(sorted(train_fields))}; "
            f"model options: {', '.join(sorted(model_fields))}"
        )
    model = {k: v for k, v in options.items() if k in model_fields}
    return model, {k: v for k, v in options.items() if k in train_fields}


def _make_tokenizer(config: TrainConfig, text: str, given: Tokenizer | None) -> Tokenizer:
    if given is not None:
        return given
    if config.tokenizer in ("char", "byte"):
        return default_tokenizer(config.tokenizer, text, config.mode)  # type: ignore[arg-type]
    path = Path(config.tokenizer)
    if not path.is_file():
        raise ValueError(f"tokenizer must be char, byte or a tokenizer JSON file; {config.tokenizer!r} is none of them")
    return read_tokenizer_file(path)


def _new_run(
    data: str,
    config: GPTConfig | str,
    options: dict[str, Any],
    out_dir: str | Path | None,
    tokenizer: Tokenizer | None,
    pm: Any,
    progress: bool,
    world: World,
) -> Run:
    model_overrides, train_options = _split_options(options)
    if tokenizer is not None:
        if not isinstance(tokenizer, (CharTokenizer, ByteTokenizer)):
            raise TypeError(f"tokenizer must be a CharTokenizer or ByteTokenizer, got {type(tokenizer).__name__}")
        train_options["tokenizer"] = tokenizer.kind
    tc = TrainConfig(data=str(data), **train_options)
    if isinstance(config, str):
        model_config = GPTConfig.preset(config, **model_overrides)
        explicit_vocab = "vocab_size" in model_overrides
    elif isinstance(config, GPTConfig):
        model_config = dataclasses.replace(config, **model_overrides) if model_overrides else config
        explicit_vocab = True
    else:
        raise TypeError(f"config must be a preset name or a GPTConfig, got {type(config).__name__}")

    text = read_source(tc.data)
    tok = _make_tokenizer(tc, text, tokenizer)
    if not explicit_vocab:
        model_config = dataclasses.replace(model_config, vocab_size=tok.vocab_size)
    elif model_config.vocab_size < tok.vocab_size:
        raise ValueError(
            f"vocab_size {model_config.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens; "
            f"leave vocab_size unset to take the tokenizer's"
        )
    dataset = make_dataset(text, tok, tc.mode, model_config.block_size, tc.val_fraction, tc.split_seed, source=tc.data)  # type: ignore[arg-type]
    batcher = Batcher(dataset, world.size * tc.batch_size * tc.grad_accum, seed=tc.seed)  # the global batch
    run_dir = None
    if out_dir is not None:
        run_dir = Path(out_dir)
        if world.is_root:
            run_dir.mkdir(parents=True, exist_ok=True)
    model = GPT(model_config, seed=tc.seed, dtype=tc.dtype, backend=tc.backend)
    optimizer = _make_optimizer(tc, model, pm, world)
    return Run(
        tc,
        model,
        tok,
        dataset,
        batcher,
        optimizer,
        run_dir,
        pm,
        data_sha256=fingerprint(text),
        progress=progress,
        world=world,
    )


def _make_optimizer(tc: TrainConfig, model: GPT, pm: Any, world: World) -> Any:
    """The run's optimizer plugin on the model's parameters; with ``zero`` on several ranks, a
    ShardedOptimizer that builds it on this rank's share of them."""
    from arraygpt.manager import registry

    factories = registry("optimizers", pm)
    if tc.optimizer not in factories:
        raise ValueError(f"unknown optimizer {tc.optimizer!r}; registered optimizers: {', '.join(sorted(factories))}")
    factory = factories[tc.optimizer]
    if tc.zero and world.size > 1:
        return ShardedOptimizer(factory, model.params, world, **tc.optimizer_options(factory))
    return create_optimizer(tc.optimizer, model.params, pm, **tc.optimizer_options(factory))


def _resumed_run(resume: str | Path, options: dict[str, Any], pm: Any, progress: bool, world: World) -> Run:
    from arraygpt.io.checkpoint import load_checkpoint

    run_dir, source = resume_source(resume)  # the run folder, and its last/ (or the best/ given)
    model_overrides, train_options = _split_options(options)
    ckpt = load_checkpoint(source, backend=train_options.get("backend"))
    extra = ckpt.extra
    check_training_state(extra, ckpt.path)
    saved = TrainConfig.from_dict(extra["train_config"])
    batch = _split_global_batch(saved, extra, world.size, train_options)
    may_change = (*RESUME_OVERRIDABLE, *batch)  # batch_size and grad_accum: checked to keep the global batch
    changed = {k: v for k, v in train_options.items() if k not in may_change and getattr(saved, k) != v}
    changed.update({k: v for k, v in model_overrides.items() if getattr(ckpt.config, k) != v})
    if changed:
        raise ValueError(
            f"cannot change {sorted(changed)} when resuming (the run continues with its saved options; "
            f"only {', '.join(RESUME_OVERRIDABLE)}, --stop-after and --quiet may be given, and batch_size and "
            f"grad_accum when the global batch stays the same)"
        )
    tc = dataclasses.replace(saved, **{k: v for k, v in train_options.items() if k in RESUME_OVERRIDABLE}, **batch)
    if ckpt.tokenizer is None:
        raise ValueError(f"{ckpt.path} has no tokenizer; a training checkpoint needs one")
    text = read_source(tc.data)
    if extra.get("data_sha256") and fingerprint(text) != extra["data_sha256"]:
        raise DataError(
            f"the data {tc.data!r} changed since the run started (its sha256 differs); cannot resume exactly"
        )
    dataset = make_dataset(
        text, ckpt.tokenizer, tc.mode, ckpt.config.block_size, tc.val_fraction, tc.split_seed, source=tc.data
    )  # type: ignore[arg-type]
    batcher = Batcher(dataset, world.size * tc.batch_size * tc.grad_accum, seed=tc.seed)  # the global batch
    batcher.load_state_dict(extra["data"])
    model = ckpt.model
    optimizer = _make_optimizer(tc, model, pm, world)
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
        step=int(extra["step"]),
        best_val_loss=math.inf if best is None else float(best),
        data_sha256=extra.get("data_sha256", ""),
        progress=progress,
        world=world,
    )
    if run.mixed is not None:
        run.mixed.load_state_dict(extra["precision"])
    run._last_saved = run.step
    if world.is_root:  # the run does the steps after its checkpoint again: their old records go
        run.dropped_records = trim_metrics(run_dir, run.step)
    return run


def _split_global_batch(
    saved: TrainConfig, extra: Mapping[str, Any], ranks: int, given: Mapping[str, Any]
) -> dict[str, int]:
    """batch_size and grad_accum for resuming on ``ranks`` ranks with the saved global batch G.

    Each rank takes P = G / ranks rows. Given options are kept if they multiply to P; otherwise
    the saved micro-batch stays when it divides P (so the micro-batches, and their dropout coins,
    are those of the saved run), else the largest divisor of P below it.

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
    if B is not None and N is not None:
        if B * N != P:
            raise ValueError(
                f"batch_size {B} x grad_accum {N} x {ranks} ranks must make the run's global batch of {G} rows"
            )
    elif N is not None:
        if P % N:
            raise ValueError(
                f"grad_accum {N} does not divide the {P} rows per rank of the run's global batch "
                f"({G} rows over {ranks} ranks)"
            )
        B = P // N
    elif B is not None:
        if P % B:
            raise ValueError(
                f"batch_size {B} does not divide the {P} rows per rank of the run's global batch "
                f"({G} rows over {ranks} ranks)"
            )
        N = P // B
    else:
        B = max(d for d in range(1, min(saved.batch_size, P) + 1) if P % d == 0)
        N = P // B
    return {"batch_size": B, "grad_accum": N}


def train(
    data: str = "names",
    *,
    config: GPTConfig | str = "microgpt",
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    tokenizer: Tokenizer | str | None = None,
    progress: bool = True,
    plugin_manager: Any = None,
    world: World | None = None,
    **options: Any,
) -> Run:
    """Train a GPT on text and return the finished :class:`Run`.

    Inside an MPI job (``mpiexec -n R``), every rank calls this with the same arguments; the run
    spans the R ranks (docs/distributed.md) and every rank returns its Run (rank 0's holds the
    samples).

    Args:
        data: ``names`` (built in) or a text file path.
        config: a preset name (its vocab_size is replaced by the tokenizer's) or a GPTConfig.
        out_dir: the run folder for metrics.jsonl and the last/ and best/ checkpoints; None
            writes nothing.
        resume: a run folder to continue exactly where its last checkpoint left off (its saved
            options are used; ``data`` and ``config`` are ignored).
        stop_after: stop (with a checkpoint) once this many steps are done, before ``steps``.
        tokenizer: ``char`` (default), ``byte``, a tokenizer JSON file, or a tokenizer object
            to use instead of building one from the data.
        progress: print progress, evaluations and samples.
        plugin_manager: the pluggy manager for optimizers and event hooks; default the process's.
        world: the ranks to span (``arraygpt.training.distributed.World``); default
            ``arraygpt.training.distributed.get_world()``: MPI's COMM_WORLD under an MPI launcher, else one
            process.
        **options: TrainConfig fields (steps, batch_size, lr, ...) and GPTConfig fields
            (n_layer, block_size, dropout, ...).

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
    with _holding_run_folder(folder, world, fresh=resume is None):
        if resume is not None:
            run = _resumed_run(resume, options, pm, progress, world)
        else:
            run = _new_run(data, config, options, out_dir, tokenizer, pm, progress, world)
        if world.size > 1:
            with _ending_all_ranks_on_error(world), world.starting():  # the same weights everywhere: rank 0's
                run.model.load_state_dict(world.broadcast_arrays_(run.model.params))
                world.check_identical(run.model.params)
        _print_header(run, resumed=resume is not None)
        run.train(stop_after=stop_after)
    if run.stop_reason == "done" and run.config.samples and world.is_root:
        run.samples = run.sample()
        run._print(f"{len(run.samples)} samples:")
        for text in run.samples:
            run._print(("  " + text) if run.config.mode == "documents" else text)
    return run


def _print_header(run: Run, resumed: bool) -> None:
    cfg, m = run.config, run.model
    what = f"resuming at step {run.step}" if resumed else "training"
    run._print(
        f"{what}: {m.num_params():,} parameters (n_layer={m.config.n_layer} n_embd={m.config.n_embd} "
        f"n_head={m.config.n_head} block_size={m.config.block_size} vocab={m.config.vocab_size}) "
        f"on {m.backend.name}/{m.dtype}"
    )
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
    run._print(
        f"data: {cfg.data} ({cfg.mode}, {split} {unit}); {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule}, "
        f"{batch}, {cfg.steps} steps" + (f"; run folder {run.out_dir}" if run.out_dir else "")
    )
    if run.dropped_records:
        run._print(
            f"{METRICS_FILE}: removed {run.dropped_records} line(s) after step {run.step}, the steps this "
            "run does again"
        )
