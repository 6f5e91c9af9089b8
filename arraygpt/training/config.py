"""The options of a training run: :class:`TrainConfig`, saved with every checkpoint and restored on
resume, and which of them a resumed run may change.

Each field's help is the ``arraygpt train`` option's help (``arraygpt.cli.train`` derives the
options from these fields), so a default is written once.

Not here: the loop that runs with these options (``arraygpt.training.loop``), the model's own
hyperparameters (``arraygpt.config.GPTConfig``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from arraygpt.config import DTYPES, check_fields
from arraygpt.training.data import MODES
from arraygpt.training.optim import SCHEDULES
from arraygpt.training.precision import PRECISIONS

__all__ = ["RESUME_OVERRIDABLE", "TrainConfig"]


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
        init_from: fine-tune this model instead of a fresh one: anything ``arraygpt.load`` opens
            (an arraygpt checkpoint or run folder, a transformers GPT-2/Llama/Qwen2/Mistral
            directory, a .gguf file, dequantized); the run uses its tokenizer and architecture.
        window: tokens per training row (None: the model's block_size); with ``init_from``,
            ``block_size`` given as an option sets it, and the model keeps its own context.
        lora_rank, lora_alpha, lora_targets: with lora_rank > 0, train LoRA adapters of that rank
            on the ``lora_targets`` weights only, scaled by lora_alpha / lora_rank; the model's
            own weights stay frozen (docs/training.md, "Fine-tuning").
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
    steps: int = field(
        default=5000, metadata={"help": "optimizer steps in the whole run (with --resume: extend the run to this many)"}
    )
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
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "fine-tune this model: an arraygpt checkpoint or run, a transformers GPT-2/Llama/Qwen2/Mistral "
            "directory or a .gguf file; its tokenizer and architecture are kept (--block-size sets the training "
            "window)"
        },
    )
    window: int | None = field(
        default=None, metadata={"help": "tokens per training row; unset: the model's block_size"}
    )
    lora_rank: int = field(
        default=0,
        metadata={"help": "train LoRA adapters of this rank only, the weights frozen (0: train every weight)"},
    )
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA scale numerator: updates are scaled by alpha/rank"})
    lora_targets: tuple[str, ...] = field(
        default=("attn_wq", "attn_wv"),
        metadata={
            "help": "the weights LoRA adapts, comma-separated: attn_wq, attn_wk, attn_wv, attn_wo, mlp_fc1, mlp_fc2, "
            "mlp_gate, mlp_up, mlp_down",
            "metavar": "NAME,...",
        },
    )

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
                raise ValueError(f"{field_and_flag(name)} must be {what}, got {value!r}")
        for name in ("lr", "min_lr", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                label = "learning rate (lr, --lr)" if name == "lr" else field_and_flag(name)
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
        self._check_fine_tuning()

    def _check_fine_tuning(self) -> None:
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(f"init_from (--init-from) must be a model path, got {self.init_from!r}")
        if self.window is not None and (
            isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1
        ):
            raise ValueError(f"{field_and_flag('window')} must be a positive integer, got {self.window!r}")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"{field_and_flag('lora_rank')} must be an integer >= 0, got {self.lora_rank!r}")
        if isinstance(self.lora_targets, str) or not isinstance(self.lora_targets, (tuple, list)):
            raise ValueError(
                f"{field_and_flag('lora_targets')} must be a list of weight names, got {self.lora_targets!r}"
            )
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))  # a list from JSON
        if self.lora_rank:
            if self.init_from is None:
                raise ValueError("lora_rank (--lora-rank) adapts a trained model: give init_from (--init-from) too")
            if self.precision != "full":
                raise ValueError(
                    f"lora_rank (--lora-rank) trains in full precision; precision {self.precision} is not supported"
                )
            self.lora()  # the settings' own checks

    def lora(self) -> Any:
        """The run's ``arraygpt.nn.lora.LoRA`` settings, or None (lora_rank 0)."""
        from arraygpt.nn.lora import LoRA

        return LoRA(self.lora_rank, float(self.lora_alpha), self.lora_targets) if self.lora_rank else None

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


def field_and_flag(field: str) -> str:
    """A field as both callers know it: ``seed (--seed)``."""
    return f"{field} (--{field.replace('_', '-')})"


# options a resumed run may change: they do not alter the computation
RESUME_OVERRIDABLE = ("backend", "log_interval", "samples", "sample_length", "temperature", "zero")
