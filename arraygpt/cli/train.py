"""``arraygpt train``: train a GPT (default: the microgpt preset on the built-in names) into a
run folder, or continue a run with ``--resume``.

Every TrainConfig field is an option (``--batch-size``, ``--lr``, ...), and every GPTConfig field
overrides the preset (``--n-layer``, ``--dropout``, ...); their defaults and help come from the
dataclass fields. ``--grad-accum N`` sums N micro-batches per step; ``mpiexec -n R arraygpt train
...`` runs R data-parallel ranks (docs/distributed.md), of which rank 0 alone prints; with
``--zero true`` they share out the optimizer state (ZeRO stage 1).

``--config FILE.toml`` reads a recipe: any of these options by name (``batch_size = 12``), typed
as the option is; options given on the command line override it (``arraygpt.cli.options.read_recipe``).
``--log NAME`` turns on a logger (``tensorboard``, or a plugin's, from the
``arraygpt_register_loggers`` hook) for this run.

Exit codes: 0 done or stopped cleanly (Ctrl-C once, ``--stop-after``, a plugin); 1 the run
diverged; 2 bad input (sizes whose step cannot fit in memory included: one line naming them), or
a failing plugin; 130 a Ctrl-C before the loop, or a second one in it (the last checkpoint is
intact). Under MPI a refused run folder is said once, by rank 0.
Under MPI, a rank that fails otherwise ends the whole job through ``MPI_Abort`` (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from arraygpt.cli.options import (
    add_config_arguments,
    add_field_arguments,
    apply_recipe,
    config_fields,
    given,
    read_recipe,
    recipe_options,
)

DEFAULT_PRESET = "microgpt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``arraygpt train`` options: a recipe, data, training (TrainConfig), run folder, loggers,
    model (GPTConfig)."""
    from arraygpt.training.config import TrainConfig

    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE.toml",
        help="a recipe: a TOML file of these options by name (batch_size = 12); options given here override it",
    )
    add_field_arguments(parser, TrainConfig, only=("data",))
    group = parser.add_argument_group("training")
    add_field_arguments(group, TrainConfig, skip=("data",))
    run_group = parser.add_argument_group("run folder")
    run_group.add_argument("--out-dir", default=None, help="run folder (default runs/<data>-<time>)")
    run_group.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue the run in DIR exactly (with --steps N: extend it to N steps, the schedule of an N-step run)",
    )
    run_group.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="N",
        help="stop (with a checkpoint) after N steps; resume later with --resume",
    )
    run_group.add_argument("--quiet", action="store_true", help="print nothing but errors")
    log_group = parser.add_argument_group("loggers")
    log_group.add_argument(
        "--log",
        action="append",
        default=None,
        metavar="NAME",
        help="also write the metrics with this logger: tensorboard, or a plugin's (arraygpt plugins lists them); "
        "repeatable",
    )
    log_group.add_argument(
        "--log-dir", default=None, metavar="DIR", help="where the loggers write (default: <run folder>/<logger name>)"
    )
    add_config_arguments(parser, default_preset=DEFAULT_PRESET, preset_unset=True)


def _train_fields() -> list[str]:
    import dataclasses

    from arraygpt.training.config import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig)]


def run(args: argparse.Namespace) -> int:
    """Returns 0 when done or stopped cleanly, 1 when training diverged, 2 on bad input or a
    failing plugin, 130 when aborted by a second Ctrl-C."""
    from arraygpt.errors import RunFolderError, TrainingDiverged
    from arraygpt.manager import PluginError
    from arraygpt.training.loop import train

    if args.config is not None:  # a bad recipe is a ValueError: one line, exit 2
        options = recipe_options(_parser(), skip=("config",))
        apply_recipe(args, read_recipe(args.config, options), options)
    options = given(args, [f for f in _train_fields() if f != "data"] + config_fields())
    try:
        with _loggers(args.log, args.log_dir) as pm:
            if args.resume:
                if args.data is not None or args.preset is not None:
                    raise ValueError("--data and --preset cannot be changed when resuming (the run keeps its own)")
                train(
                    resume=args.resume,
                    out_dir=args.out_dir,  # train() refuses another folder than the run's own
                    stop_after=args.stop_after,
                    progress=not args.quiet,
                    plugin_manager=pm,
                    **options,
                )
                return 0
            data = args.data or "names"
            out_dir = args.out_dir
            if out_dir is None:
                stem = Path(data).stem if data != "names" else "names"
                out_dir = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
            train(
                data,
                config=args.preset or (None if args.init_from else DEFAULT_PRESET),  # None: the initial model's
                out_dir=out_dir,
                stop_after=args.stop_after,
                progress=not args.quiet,
                plugin_manager=pm,
                **options,
            )
    except TrainingDiverged as e:  # every rank of an MPI job raises it at the same step; rank 0 says so
        if _is_root():
            print(f"arraygpt train: {e}", file=sys.stderr)
        return 1
    except RunFolderError as e:  # rank 0's refusal reaches every rank of an MPI job: rank 0 says it
        if _is_root():
            print(f"arraygpt train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except (ImportError, PluginError) as e:
        print(f"arraygpt train: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:  # the estimate before the first step (arraygpt.training.memory) let it through
        print(f"arraygpt train: error: out of memory with {_sizes(args, options)}; lower one of them", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the last checkpoint is intact
        print("\narraygpt train: aborted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    """A parser of this command's options alone, whose actions say what a recipe may hold."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    return parser


@contextlib.contextmanager
def _loggers(names: list[str] | None, log_dir: str | None) -> Iterator[Any]:
    """The process's plugin manager with the loggers ``names`` registered for the run (None when
    there are none); afterwards each is unregistered and closed (its files flushed)."""
    if log_dir is not None and not names:
        raise ValueError("--log-dir needs a logger: --log NAME (e.g. --log tensorboard)")
    if not names:
        yield None
        return
    from arraygpt.manager import default_plugin_manager, registry

    pm = default_plugin_manager()
    factories = registry("loggers", pm)
    for name in names:
        if name not in factories:
            raise ValueError(f"unknown logger {name!r}; registered loggers: {', '.join(sorted(factories)) or 'none'}")
    loggers = [(name, factories[name](log_dir=log_dir)) for name in dict.fromkeys(names)]  # ImportError: exit 2
    registered = []
    try:
        for name, logger in loggers:
            registered.append(pm.register(logger, name=f"logger {name}"))
        yield pm
    finally:
        for plugin_name in registered:
            pm.unregister(name=plugin_name)
        for _, logger in loggers:
            if hasattr(logger, "close"):
                logger.close()


def _sizes(args: argparse.Namespace, options: dict) -> str:
    """The sizes that decide a step's memory, as options: those given, else the preset's."""
    import dataclasses

    from arraygpt.config import GPTConfig
    from arraygpt.training.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    fresh = not args.resume and not getattr(args, "init_from", None)  # else the sizes are the saved model's
    preset = GPTConfig.preset(args.preset or DEFAULT_PRESET) if fresh else None
    shown = []
    for name in ("batch_size", "grad_accum", "block_size", "n_embd", "n_layer", "vocab_size"):
        value = options.get(name, defaults.get(name, getattr(preset, name, None)))
        if value is not None:
            shown.append(f"--{name.replace('_', '-')} {value}")
    return ", ".join(shown)


def _is_root() -> bool:
    from arraygpt.training.distributed import get_world

    return get_world().is_root
