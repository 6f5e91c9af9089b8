"""Building a fresh training run from ``train()``'s arguments: the options split into model and
training options, the tokenizer, the dataset and batcher, the memory check, the model and the
optimizer.

The data source is recorded as ``arraygpt.training.data.resolve_source`` gives it (a file as its
absolute path), so that ``--resume`` finds the same file from any working directory.

Fine-tuning (``init_from``): the model, its tokenizer and its architecture come from the file
(``arraygpt.load``); options that would change the architecture are refused; ``block_size``
becomes the training window (``TrainConfig.window``) and the model keeps its context. With
``lora_rank`` the model gets LoRA adapters (``GPT.add_lora``, seeded by the run's seed) and the
optimizer sees only them.

Not here: continuing a run from a checkpoint (``arraygpt.training.resume``), the loop
(``arraygpt.training.loop``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arraygpt.config import GPTConfig
from arraygpt.io.tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, read_tokenizer_file
from arraygpt.nn.model import GPT
from arraygpt.training.config import TrainConfig
from arraygpt.training.data import Batcher, default_tokenizer, fingerprint, make_dataset, read_source, resolve_source
from arraygpt.training.distributed import ShardedOptimizer, World
from arraygpt.training.memory import check_step_memory
from arraygpt.training.optim import create_optimizer
from arraygpt.training.run import Run

__all__ = ["FINE_TUNE_OVERRIDABLE", "make_optimizer", "new_run", "split_options"]

# model options a fine-tuning run may give: the training window and dropout
FINE_TUNE_OVERRIDABLE = ("block_size", "dropout")


def split_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``train()``'s keyword options as (GPTConfig fields, TrainConfig fields).

    Raises:
        TypeError: an option is neither.
    """
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


def _model_config(config: GPTConfig | str, overrides: dict[str, Any]) -> tuple[GPTConfig, bool]:
    """The model's configuration, and whether its vocab_size was given (else the tokenizer's)."""
    if isinstance(config, str):
        return GPTConfig.preset(config, **overrides), "vocab_size" in overrides
    if isinstance(config, GPTConfig):
        return (dataclasses.replace(config, **overrides) if overrides else config), True
    raise TypeError(f"config must be a preset name or a GPTConfig, got {type(config).__name__}")


def new_run(
    data: str,
    config: GPTConfig | str | None,
    options: dict[str, Any],
    out_dir: str | Path | None,
    tokenizer: Tokenizer | None,
    pm: Any,
    progress: bool,
    world: World,
) -> Run:
    """A fresh Run at step 0 (nothing trained yet; rank 0 has created the run folder).
    ``config`` None: the microgpt preset, or with ``init_from`` the initial model's."""
    model_overrides, train_options = split_options(options)
    if train_options.get("init_from") is not None:
        return _fine_tuning_run(data, config, model_overrides, train_options, out_dir, tokenizer, pm, progress, world)
    config = "microgpt" if config is None else config
    if tokenizer is not None:
        if not isinstance(tokenizer, (CharTokenizer, ByteTokenizer)):
            raise TypeError(f"tokenizer must be a CharTokenizer or ByteTokenizer, got {type(tokenizer).__name__}")
        train_options["tokenizer"] = tokenizer.kind
    tc = TrainConfig(data=resolve_source(str(data)), **train_options)
    model_config, explicit_vocab = _model_config(config, model_overrides)
    if tc.window is not None and tc.window > model_config.block_size:
        raise ValueError(f"window {tc.window} is longer than the model's block_size {model_config.block_size}")
    text = read_source(tc.data)
    tok = _make_tokenizer(tc, text, tokenizer)
    if not explicit_vocab:
        model_config = dataclasses.replace(model_config, vocab_size=tok.vocab_size)
    elif model_config.vocab_size < tok.vocab_size:
        raise ValueError(
            f"vocab_size {model_config.vocab_size} is smaller than the tokenizer's {tok.vocab_size} tokens; "
            f"leave vocab_size unset to take the tokenizer's"
        )
    window = tc.window or model_config.block_size
    dataset = make_dataset(text, tok, tc.mode, window, tc.val_fraction, tc.split_seed, source=tc.data)  # type: ignore[arg-type]
    backend = _checked_backend(dataclasses.replace(model_config, block_size=window), tc, world)
    batcher = Batcher(dataset, world.size * tc.batch_size * tc.grad_accum, seed=tc.seed)  # the global batch
    run_dir = _run_dir(out_dir, world)
    model = GPT(model_config, seed=tc.seed, dtype=tc.dtype, backend=backend)
    optimizer = make_optimizer(tc, model, pm, world)
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


def _run_dir(out_dir: str | Path | None, world: World) -> Path | None:
    if out_dir is None:
        return None
    if world.is_root:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    return Path(out_dir)


def _fine_tuning_run(
    data: str,
    config: GPTConfig | str | None,
    model_overrides: dict[str, Any],
    train_options: dict[str, Any],
    out_dir: str | Path | None,
    tokenizer: Tokenizer | None,
    pm: Any,
    progress: bool,
    world: World,
) -> Run:
    """A fresh Run that fine-tunes the model ``init_from`` names, with its own tokenizer."""
    from arraygpt.io.checkpoint import base_reference
    from arraygpt.io.formats import load

    path = train_options["init_from"]
    refused = sorted(set(model_overrides) - set(FINE_TUNE_OVERRIDABLE))
    if config is not None:
        refused.insert(0, "a preset or config")
    if tokenizer is not None or "tokenizer" in train_options:
        refused.append("tokenizer")
    if refused:
        raise ValueError(
            f"cannot give {', '.join(refused)} with init_from {path}: the model keeps its own architecture and "
            f"tokenizer; only block_size (the training window) and dropout may be given"
        )
    window = model_overrides.get("block_size", train_options.get("window"))
    if train_options.get("window") not in (None, window):
        raise ValueError("give the training window once: block_size and window differ")
    tc = TrainConfig(
        data=resolve_source(str(data)),
        **{**train_options, "init_from": str(Path(path).resolve()), "window": window, "tokenizer": "init_from"},
    )
    backend = tc.backend
    ckpt = load(path, backend=backend, dtype=tc.dtype)
    model = ckpt.model.merged() if ckpt.model.lora is not None else ckpt.model  # a LoRA run's result, merged
    if ckpt.tokenizer is None:
        raise ValueError(f"init_from {path} has no tokenizer; fine-tuning trains with the model's own tokenizer")
    if "dropout" in model_overrides:
        model.config = dataclasses.replace(model.config, dropout=model_overrides["dropout"])
    window = tc.window or model.config.block_size
    if window > model.config.block_size:
        raise ValueError(
            f"block_size {window} (the training window) is longer than the model's context {model.config.block_size}"
        )
    if tc.window is None:
        tc = dataclasses.replace(tc, window=window)  # resume reads the window from here
    text = read_source(tc.data)
    dataset = make_dataset(text, ckpt.tokenizer, tc.mode, window, tc.val_fraction, tc.split_seed, source=tc.data)  # type: ignore[arg-type]
    base = None
    if tc.lora_rank:
        model.add_lora(tc.lora(), seed=tc.seed)
        base = base_reference(tc.init_from)
    trained = sum(math.prod(a.shape) for a in model.adapters.values()) if tc.lora_rank else None
    check_step_memory(dataclasses.replace(model.config, block_size=window), tc, world.size, model.backend, trained)
    batcher = Batcher(dataset, world.size * tc.batch_size * tc.grad_accum, seed=tc.seed)  # the global batch
    run = Run(
        tc,
        model,
        ckpt.tokenizer,
        dataset,
        batcher,
        make_optimizer(tc, model, pm, world),
        _run_dir(out_dir, world),
        pm,
        data_sha256=fingerprint(text),
        progress=progress,
        world=world,
    )
    run.lora_base = base
    return run


def _checked_backend(model_config: GPTConfig, tc: TrainConfig, world: World) -> Any:
    """The model's backend, once the memory check (which depends on it) has passed."""
    from arraygpt.xp import get_backend, load_backend

    backend = load_backend(tc.backend) if tc.backend else get_backend()
    check_step_memory(model_config, tc, world.size, backend)
    return backend


def make_optimizer(tc: TrainConfig, model: GPT, pm: Any, world: World) -> Any:
    """The run's optimizer plugin on the model's parameters; with ``zero`` on several ranks, a
    ShardedOptimizer that builds it on this rank's share of them."""
    from arraygpt.manager import registry

    factories = registry("optimizers", pm)
    if tc.optimizer not in factories:
        raise ValueError(f"unknown optimizer {tc.optimizer!r}; registered optimizers: {', '.join(sorted(factories))}")
    factory = factories[tc.optimizer]
    if tc.zero and world.size > 1:
        return ShardedOptimizer(factory, model.trainable, world, **tc.optimizer_options(factory))
    return create_optimizer(tc.optimizer, model.trainable, pm, **tc.optimizer_options(factory))
