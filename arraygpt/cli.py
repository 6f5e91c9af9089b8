"""The ``arraygpt`` command: a thin layer over the library.

    arraygpt params --preset gpt3-175b [--json]
    arraygpt backends
    arraygpt plugins
    arraygpt train ...     (arraygpt.training)
    arraygpt sample ...    (arraygpt.generation)

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any

SUBCOMMANDS = {
    "params": (None, "count the parameters of a preset, by matrix category"),
    "backends": (None, "list the array backends and whether each can run here"),
    "plugins": (None, "list every registered backend, optimizer and sampler and its plugin"),
    "train": ("arraygpt.training", "train a GPT (default: the microgpt preset on names)"),
    "sample": ("arraygpt.generation", "generate text from a checkpoint"),
}


# -- typed GPTConfig overrides, shared by the subcommands that build a model ---------------------


def add_config_arguments(parser: argparse.ArgumentParser, default_preset: str = "microgpt") -> None:
    """``--preset NAME`` plus one typed ``--<field>`` option per GPTConfig field."""
    from arraygpt.model import PRESETS, GPTConfig

    group = parser.add_argument_group("model", "a preset and any GPTConfig field to override")
    group.add_argument("--preset", default=default_preset, choices=list(PRESETS), help="named configuration")
    hints = typing.get_type_hints(GPTConfig)
    for field in dataclasses.fields(GPTConfig):
        kind = _base_type(hints[field.name])
        option = "--" + field.name.replace("_", "-")
        if kind is bool:
            group.add_argument(option, dest=field.name, type=_parse_bool, default=None, metavar="{true,false}")
        else:
            group.add_argument(option, dest=field.name, type=kind, default=None)


def config_from_args(args: argparse.Namespace) -> Any:
    """The GPTConfig named by ``--preset`` with every given field override applied."""
    from arraygpt.model import GPTConfig

    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(GPTConfig) if getattr(args, f.name, None) is not None
    }
    return GPTConfig.preset(args.preset, **overrides)


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# -- params --------------------------------------------------------------------------------------


def _params_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default_preset="gpt3-175b")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _params_run(args: argparse.Namespace) -> int:
    from arraygpt.model import count_params

    config = config_from_args(args)
    counts = count_params(config)
    if args.json:
        print(json.dumps({"preset": args.preset, "total": counts.total, "by_category": counts.by_category,
                          "by_name": counts.by_name}, indent=2))  # fmt: skip
        return 0
    L, C, D, H, V = config.n_layer, config.n_embd, config.attn_dim, config.mlp_hidden, config.vocab_size
    formulas = {
        "embedding": f"{V:,} x {C:,}",
        "key": f"{L} x {D:,} x {C:,}",
        "query": f"{L} x {D:,} x {C:,}",
        "value": f"{L} x {D:,} x {C:,}",
        "output": f"{L} x {C:,} x {D:,}",
        "up_projection": f"{L} x {H:,} x {C:,}",
        "down_projection": f"{L} x {C:,} x {H:,}",
        "unembedding": f"{V:,} x {C:,}" + (" (tied to embedding)" if config.tie_embeddings else ""),
        "other": "positions, norms, biases",
    }
    print(f"{args.preset}: n_layer={L} n_embd={C} n_head={config.n_head} head_dim={config.head_dim} "
          f"block_size={config.block_size} vocab_size={V}")  # fmt: skip
    print(f"{'category':<16} {'shape':<36} {'parameters':>18}")
    for category, n in counts.by_category.items():
        print(f"{category:<16} {formulas[category]:<36} {n:>18,}")
    print(f"{'total':<16} {'(distinct parameters)':<36} {counts.total:>18,}")
    return 0


# -- backends and plugins ------------------------------------------------------------------------


def _backends_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _backends_run(args: argparse.Namespace) -> int:
    from arraygpt.shim import ENV_VAR, BackendUnavailable, backend_factories, get_backend, load_backend

    try:
        active = get_backend().name
    except (ValueError, BackendUnavailable) as e:
        active = f"none ({e})"
    print(f"active backend: {active}   (choose with {ENV_VAR})")
    for name in backend_factories():
        try:
            backend = load_backend(name)
            status = f"available   device={backend.device}   threads={backend.threads}"
        except BackendUnavailable as e:
            status = f"unavailable: {e}"
        print(f"  {name:<18} {status}")
    return 0


_plugins_arguments = _backends_arguments


def _plugins_run(args: argparse.Namespace) -> int:
    from arraygpt.manager import REGISTRY_HOOKS, registry_with_owners

    for kind in REGISTRY_HOOKS:
        print(f"{kind}:")
        for name, (_, plugin) in registry_with_owners(kind).items():
            print(f"  {name:<18} from {plugin}")
    return 0


# -- entry point ---------------------------------------------------------------------------------


_LOCAL = {
    "params": (_params_arguments, _params_run),
    "backends": (_backends_arguments, _backends_run),
    "plugins": (_plugins_arguments, _plugins_run),
}


def _handlers(command: str) -> tuple[Any, Any]:
    module_name = SUBCOMMANDS[command][0]
    if module_name is None:
        return _LOCAL[command]
    module = importlib.import_module(module_name)
    return module.add_arguments, module.run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arraygpt", description="A GPT on the Python array API.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, (_, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(command, help=help_text, description=help_text)
        try:
            add_arguments, _ = _handlers(command)
        except (ImportError, AttributeError):
            continue  # a subcommand whose module is not there yet
        add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the main job: train the microgpt preset on names
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = _handlers(args.command)
    from arraygpt.manager import PluginError

    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"arraygpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError, ImportError, PluginError) as e:
        print(f"arraygpt {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
