"""The :class:`Run`: a training run's state, and what plugins see in the event hooks.

A Run holds the parts (model, tokenizer, dataset, batcher, optimizer, schedule), the step, the
best val loss and the log, and does the things that need only them: call a training-event hook,
measure the loss on the splits (:meth:`Run.evaluate`), sample texts (:meth:`Run.sample`), and
stop with :class:`~arraygpt.errors.TrainingDiverged`.

Not here: the loop that steps it (``arraygpt.training.loop``), one step
(``arraygpt.training.step``), checkpoints and resume (``arraygpt.training.resume``), building one
(``arraygpt.training.build``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from arraygpt.errors import PluginError, TrainingDiverged
from arraygpt.io.tokenizers import ByteTokenizer, Tokenizer
from arraygpt.nn.model import GPT
from arraygpt.training.config import TrainConfig
from arraygpt.training.data import Batcher, Dataset
from arraygpt.training.distributed import World
from arraygpt.training.log import Log
from arraygpt.training.optim import Schedule
from arraygpt.training.precision import mixed_precision

__all__ = ["Run"]


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
        log: where records and lines go (``arraygpt.training.log.Log``).
        last_saved: the step of the last ``last/`` checkpoint (-1 before one).
        lora_base: a LoRA run's reference to its base model (``arraygpt.io.checkpoint.base_reference``),
            which its checkpoints keep instead of the frozen weights; None otherwise.
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
        self.log = Log(out_dir, is_root=self.world.is_root, progress=progress, stream=stream)
        self.samples: list[str] = []
        self.stop_reason: str | None = None
        self.stop_requested: str | None = None
        self.last_saved = -1
        self.reduce_buffer: np.ndarray | None = None  # the all-reduce buffer, kept between steps
        self.dropped_records = 0  # metrics.jsonl lines after the resumed step, removed (rank 0)
        self.lora_base: dict[str, Any] | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.log.history

    @property
    def global_batch(self) -> int:
        """Rows per optimizer step over all ranks: ranks x batch_size x grad_accum."""
        return self.world.size * self.config.batch_size * self.config.grad_accum

    def request_stop(self, reason: str = "plugin") -> None:
        """Ask the loop to save a checkpoint and stop after the current step."""
        self.stop_requested = self.stop_requested or reason

    def call_hook(self, name: str, **kwargs: Any) -> list[Any]:
        """Call a training-event hook, each implementation on its own (last registered first), so
        that a plugin that raises is named. Rank 0 alone calls them; a stop it asks for reaches
        every rank."""
        if not self.world.is_root:
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

    def diverged(self, what: str) -> None:
        """Record and raise TrainingDiverged for ``what`` (nothing is saved)."""
        last = (
            f"; the last good checkpoint is {self.out_dir / 'last'} (step {self.last_saved})"
            if (self.out_dir is not None and self.last_saved >= 0)
            else ""
        )
        step = self.step if "parameter" in what else self.step + 1  # the step that broke the parameters is done
        message = (
            f"training diverged at step {step}: {what}. Stopped without saving{last}. "
            "Try a lower learning rate (--lr) or gradient clipping (--grad-clip 1.0)."
        )
        self.log.record({"event": "diverged", "step": step, "message": message})
        self.stop_reason = "diverged"
        raise TrainingDiverged(message, self)

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
        if start is None:  # a newline, unless a character tokenizer lacks one
            known = isinstance(tok, ByteTokenizer) or "\n" in getattr(tok, "chars", "\n")
            start = (tok.encode("\n") or [0])[0] if known else 0
        V = tok.vocab_size
        sampler = "temperature" if model.config.vocab_size == V else _tokenizer_vocabulary(V)
        rows: list[list[int]] = [[] for _ in range(n)]
        prompt = np.full((n, 1), start, dtype=np.int64)  # (n, 1)
        for step in generate(model, prompt, length, sampler, temperature=temperature, seed=rng, eos_id=tok.eos_id):
            for row, token in zip(rows, step):
                if token is not None and token != tok.eos_id:
                    row.append(token)
        return [tok.decode(row) for row in rows]


def _tokenizer_vocabulary(V: int) -> Any:
    """A sampler filter that keeps the first ``V`` ids: a model whose vocab_size was set larger
    than its tokenizer's never samples an id the tokenizer cannot decode."""
    from arraygpt.xp import namespace

    def keep_tokenizer_ids(probs: Any) -> Any:
        xp = namespace(probs)
        ids = xp.arange(probs.shape[-1], device=probs.device)[None, :]  # (1, V_model)
        return xp.where(ids < V, probs, xp.zeros_like(probs))  # (B, V_model)

    return keep_tokenizer_ids
