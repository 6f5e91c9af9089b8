"""Shared pieces of the command layer: argparse options built from dataclass fields.

A ``--<field>`` option is derived from each field of a dataclass (``TrainConfig``,
``GPTConfig``): its type from the field's type hint (a tuple, such as ``rope_scaling``, is given as
comma-separated values: ``--rope-scaling 8,1,4,8192``; a float is finite, ``nan`` and ``inf`` are
refused), its help from ``field.metadata["help"]``,
its choices from ``field.metadata["choices"]``, and the default shown in the help from the
field's own default, so every default is written once, on the dataclass. The options themselves
default to None ("not given"), so that the library, not argparse, fills in the defaults.

A recipe (:func:`read_recipe`, :func:`apply_recipe`) is a TOML file of the same options, keyed by
their names (``batch_size = 12``, or ``batch-size``), each checked against what its option takes.

Not here: any subcommand's own options or its run function (one module per subcommand).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
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
    parse.elements = elements  # type: ignore[attr-defined]  # a recipe checks its arrays against them
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


# -- recipes: a TOML file of options ----------------------------------------------------------------

RECIPE_LIMIT = 1024 * 1024  # bytes; a recipe is a few hundred
_TOML_TYPES = {
    bool: "a boolean",
    int: "an integer",
    float: "a float",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def _toml_type(value: Any) -> str:
    return _TOML_TYPES.get(type(value), "a date or time")


def recipe_options(parser: argparse.ArgumentParser, skip: Iterable[str] = ()) -> dict[str, argparse.Action]:
    """The options a recipe may hold: ``{name: action}`` for every option of ``parser`` (but
    ``--help``, ``--version`` and the ``skip`` destinations), each by its destination and by its
    long option name with underscores (``out_dir`` for ``--out-dir``)."""
    skipped = set(skip)
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of its options
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)) or action.dest in skipped:
            continue
        if not action.option_strings:
            continue  # a positional argument is no option
        found[action.dest] = action
        for flag in action.option_strings:
            if flag.startswith("--"):
                found.setdefault(flag[2:].replace("-", "_"), action)
    return found


def read_recipe(path: str | Path, options: Mapping[str, argparse.Action]) -> dict[str, Any]:
    """The options of the TOML recipe at ``path``, checked against ``options`` (see
    :func:`recipe_options`): ``{dest: value}``, each value of the type its option takes.

    A key is an option's name with underscores or dashes (``batch_size``, ``batch-size``). An
    integer option takes a TOML integer; a float option an integer or a finite float; a
    ``{true,false}`` option or a flag (``--quiet``) a boolean; a comma-separated option (a tuple, such
    as ``rope_scaling``) an array of its elements; a repeatable option (``--log``) an array of
    strings; any other option a string. Choices are checked as on the command line.

    Raises:
        ValueError: the file is missing, not a regular file, over 1 MiB, not UTF-8 or not valid
            TOML, or a key is unknown, given twice, or of the wrong type: one line naming the file,
            the key and what is allowed.
    """
    text = _read_recipe_text(path)
    try:
        table = _toml().loads(text)
    except RecursionError:
        raise ValueError(f"recipe {path}: nested too deeply; a recipe is flat: one option = value per line") from None
    except ValueError as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ValueError(f"recipe {path}: not valid TOML: {' '.join(str(e).split())}") from None
    recipe: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        action = options.get(name)
        if action is None:
            close = difflib.get_close_matches(name, list(options), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"recipe {path}: unknown key {key!r}{hint}; allowed: the options of the command by name: "
                f"{', '.join(sorted(options))}"
            )
        if action.dest in keys:
            raise ValueError(f"recipe {path}: key {key!r} repeats {keys[action.dest]!r}; give each option once")
        keys[action.dest] = key
        recipe[action.dest] = _recipe_value(path, key, value, action)
    return recipe


def _read_recipe_text(path: str | Path) -> str:
    from arraygpt.io.files import open_regular

    f, size = open_regular(path, "recipe")  # a ValueError naming the file: missing, a directory, a FIFO...
    with f:
        if size > RECIPE_LIMIT:
            raise ValueError(f"recipe {path}: {size:,} bytes; a recipe is at most {RECIPE_LIMIT:,} bytes")
        data = f.read(RECIPE_LIMIT + 1)  # the file may grow after the check
    if len(data) > RECIPE_LIMIT:
        raise ValueError(f"recipe {path}: over {RECIPE_LIMIT:,} bytes; a recipe is at most {RECIPE_LIMIT:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"recipe {path}: not UTF-8 text (byte {e.start}); a recipe is a UTF-8 TOML file") from None


def _toml() -> Any:
    """tomllib (Python 3.11+), else tomli, the same parser as a package."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ImportError("reading a recipe on Python 3.10 needs tomli: pip install tomli") from None
    return tomllib


def _recipe_value(path: str | Path, key: str, value: Any, action: argparse.Action) -> Any:
    """``value`` as ``action``'s option takes it, or a ValueError naming the file, the key and the type."""

    def wrong(expected: str, got: Any = value) -> ValueError:
        shown = _toml_type(got) + ("" if isinstance(got, (list, dict)) else f" {got!r}")
        return ValueError(f"recipe {path}: key {key!r} ({action.option_strings[-1]}) must be {expected}, got {shown}")

    kind = action.type
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise wrong("a boolean (true or false)")
        return action.const if value else action.default
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong(f'an array of strings, such as {key} = ["{action.metavar or "NAME"}"]')
        converted = [_from_string(path, key, v, action, wrong) for v in value]
        return converted or None
    if kind is parse_bool:
        if not isinstance(value, bool):
            raise wrong("a boolean (true or false)")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        return _choice(value, action, wrong)
    if kind is parse_finite:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong("a finite number")
        return _choice(float(value), action, wrong)
    elements = getattr(kind, "elements", None)
    if elements is not None:
        return _recipe_tuple(value, elements, wrong)
    if not isinstance(value, str):
        raise wrong("a string")
    return _from_string(path, key, value, action, wrong)


def _from_string(path: str | Path, key: str, value: str, action: argparse.Action, wrong: Any) -> Any:
    """A string value through the option's own type (str, or a parser such as a path's)."""
    if action.type not in (None, str):
        try:
            value = action.type(value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ValueError(f"recipe {path}: key {key!r}: {e}") from None
    return _choice(value, action, wrong)


def _choice(value: Any, action: argparse.Action, wrong: Any) -> Any:
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


def _recipe_tuple(value: Any, elements: tuple[Any, ...], wrong: Any) -> tuple[Any, ...]:
    variadic = len(elements) == 2 and elements[1] is Ellipsis
    kinds = [elements[0]] * len(value) if variadic and isinstance(value, list) else list(elements)
    names = {int: "integer", float: "number", str: "string", bool: "boolean"}
    shown = (
        f"[{names.get(elements[0], _type_name(elements[0]))}, ...]"
        if variadic
        else ("[" + ", ".join(names.get(k, _type_name(k)) for k in elements) + "]")
    )
    if not isinstance(value, list) or len(value) != len(kinds) or not value:
        raise wrong(f"an array {shown}")
    converted = []
    for kind, item in zip(kinds, value):
        if kind is float and not isinstance(item, bool) and isinstance(item, (int, float)) and math.isfinite(item):
            converted.append(float(item))
        elif kind is int and not isinstance(item, bool) and isinstance(item, int):
            converted.append(item)
        elif kind in (str, bool) and type(item) is kind:
            converted.append(item)
        else:
            raise wrong(f"an array {shown}")
    return tuple(converted)


def apply_recipe(args: argparse.Namespace, recipe: Mapping[str, Any], options: Mapping[str, argparse.Action]) -> None:
    """Set each option of ``recipe`` on ``args`` unless the command line gave it (a value other
    than the option's default): flags override the file."""
    actions = {action.dest: action for action in options.values()}
    for dest, value in recipe.items():
        if getattr(args, dest, None) == actions[dest].default:
            setattr(args, dest, value)
