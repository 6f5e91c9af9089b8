"""Shared pieces of the command layer: argparse options built from dataclass fields.

A ``--<field>`` option is derived from each field of a dataclass (``TrainConfig``,
``GPTConfig``): its type from the field's type hint (a tuple, such as ``rope_scaling``, is given as
comma-separated values: ``--rope-scaling 8,1,4,8192``; a float is finite, ``nan`` and ``inf`` are
refused), its help from ``field.metadata["help"]``,
its choices from ``field.metadata["choices"]``, and the default shown in the help from the
field's own default, so every default is written once, on the dataclass. The options themselves
default to None ("not given"), so that the library, not argparse, fills in the defaults.

Not here: any subcommand's own options or its run function (one module per subcommand).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from typing import Any


def _base_type(hint: Any) -> type:
    """``int | None`` -> int; a plain or generic type (``tuple[int, ...]``) stays itself."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def parse_bool(text: str) -> bool:
    """An argparse type for ``{true,false}`` options."""
    lowered = text.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_finite(text: str) -> float:
    """An argparse type for a float option: any finite number (``nan`` and ``inf`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


parse_finite.__name__ = "number"  # argparse names the type in some messages


def parse_tuple(elements: tuple[Any, ...], name: str) -> Any:
    """An argparse type for a tuple-typed field: comma-separated values, each converted to its
    element type (``tuple[float, float, float, int]``: ``"8,1,4,8192"`` -> ``(8.0, 1.0, 4.0, 8192)``;
    ``tuple[int, ...]``: any number of ints). An integer element takes ``8192`` or ``8192.0``, not
    ``8192.5``; a float takes anything ``float()`` does. The field's own checks (ranges, order) stay
    with the dataclass."""
    variadic = len(elements) == 2 and elements[1] is Ellipsis
    shown = f"{_type_name(elements[0])},..." if variadic else ",".join(_type_name(t) for t in elements)

    def convert(kind: Any, text: str) -> Any:
        text = text.strip()
        if kind is int:
            value = float(text)  # ValueError for "x"
            if not value.is_integer():
                raise ValueError(text)
            return int(value)
        if kind is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(text)
            return value
        return kind(text)

    def parse(text: str) -> tuple[Any, ...]:
        parts = text.split(",")
        kinds = [elements[0]] * len(parts) if variadic else list(elements)
        if len(parts) != len(kinds) or not text.strip():
            count = "one or more" if variadic else len(kinds)
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated values ({shown}), got {text!r}")
        values = []
        for k, (kind, part) in enumerate(zip(kinds, parts), 1):
            try:
                values.append(convert(kind, part))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"value {k} of {text!r} ({part.strip()!r}) is not "
                    f"{ {int: 'an integer', float: 'a number'}.get(kind, _type_name(kind).lower()) }; expected {shown}"
                ) from None
        return tuple(values)

    parse.__name__ = f"{name} ({shown})"  # argparse names the type in some messages
    return parse


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", str(kind)).upper()


def _format_default(value: Any) -> str | None:
    if value is None:
        return None  # the help says what "unset" means
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def option_name(name: str) -> str:
    """A field name as its option: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def add_field_arguments(
    group: Any,
    cls: type,
    *,
    skip: Iterable[str] = (),
    only: Iterable[str] | None = None,
    default_text: str | None = None,
) -> list[str]:
    """Add one ``--<field>`` option per field of the dataclass ``cls`` to ``group``.

    Args:
        group: an argparse parser or argument group.
        cls: the dataclass.
        skip: field names to leave out.
        only: if given, the only field names to add.
        default_text: what the help says the default is, instead of the field's default (e.g.
            "the preset's" for GPTConfig fields, whose defaults the preset replaces).

    Returns:
        The names of the fields that got an option (their ``dest``).
    """
    hints = typing.get_type_hints(cls)
    skipped = set(skip)
    wanted = None if only is None else set(only)
    added = []
    for field in dataclasses.fields(cls):
        if field.name in skipped or (wanted is not None and field.name not in wanted):
            continue
        kind = _base_type(hints[field.name])
        help_text = field.metadata.get("help") or f"{cls.__name__}.{field.name}"
        default = field.default if field.default is not dataclasses.MISSING else None
        shown = default_text or _format_default(default)
        if shown is not None:
            help_text += f" (default {shown})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        if kind is bool:
            kwargs.update(type=parse_bool, metavar="{true,false}")
        elif typing.get_origin(kind) is tuple:
            parse = parse_tuple(typing.get_args(kind), field.name)
            kwargs.update(type=parse, metavar=field.metadata.get("metavar") or parse.__name__.split(" ", 1)[1][1:-1])
        else:
            kwargs.update(type=parse_finite if kind is float else kind, choices=field.metadata.get("choices"))
        group.add_argument(option_name(field.name), **kwargs)
        added.append(field.name)
    return added


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The options among ``names`` that were given on the command line (not None)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


# -- a model: a preset and GPTConfig overrides, shared by the subcommands that build one ---------


def add_config_arguments(
    parser: argparse.ArgumentParser, default_preset: str = "microgpt", *, preset_unset: bool = False
) -> None:
    """``--preset NAME`` plus one typed ``--<field>`` option per GPTConfig field.

    ``preset_unset``: ``args.preset`` stays None when ``--preset`` is not given (the subcommand
    then uses ``default_preset`` itself, and can tell whether the option was given).
    """
    from arraygpt.config import PRESETS, GPTConfig

    group = parser.add_argument_group("model", "a preset and any GPTConfig field to override")
    group.add_argument(
        "--preset",
        default=None if preset_unset else default_preset,
        choices=list(PRESETS),
        help=f"named configuration (default {default_preset})",
    )
    add_field_arguments(group, GPTConfig, default_text="the preset's")


def config_fields() -> list[str]:
    from arraygpt.config import GPTConfig

    return [f.name for f in dataclasses.fields(GPTConfig)]


def config_from_args(args: argparse.Namespace) -> Any:
    """The GPTConfig named by ``--preset`` with every given field override applied."""
    from arraygpt.config import GPTConfig

    return GPTConfig.preset(args.preset, **given(args, config_fields()))
