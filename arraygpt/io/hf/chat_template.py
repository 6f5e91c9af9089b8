"""Chat templates: the Jinja template a Hugging Face tokenizer ships (``tokenizer_config.json``'s
``chat_template``, or a ``chat_template.jinja`` file beside it), rendered as transformers renders it.

transformers' ``apply_chat_template`` compiles the template in
``jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, its own ``tojson`` filter (no HTML escaping), ``raise_exception`` and
``strftime_now``, a plain ``dict`` and an underscore-refusing ``namespace``, and renders it with
``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the tokenizer's special tokens
(``bos_token``, ``eos_token``...) plus the caller's keyword arguments. This module does the same.

A template comes from a download and is untrusted code, so a render is bounded: the sandbox keeps
it from Python's internals, and on top of it every call, filter, ``~`` join, ``+``, ``*``, ``**``
and ``%`` of the template is checked against a size limit before or right after it runs (a format,
``%`` or ``tojson`` before, from its widths, indent and arguments), the output is counted as it
streams, and every line of Python the render runs is under a deadline. Jinja's ``lipsum`` and
``pprint``, which no chat template uses, are left out. A template that loops or explodes raises
:class:`ValueError` saying which limit it hit.

Deliberately not here: transformers' ``{% generation %}`` block (assistant masks),
``continue_final_message``, tool schemas built from Python functions (pass JSON schemas as
``tools``), and any dependency on transformers. Rendering needs ``jinja2`` (``pip install 'arraygpt[hf]'``).
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from arraygpt.errors import CheckpointError
from arraygpt.io.files import CONFIG_LIMIT, open_regular

__all__ = ["CHAT_TEMPLATE_FILE", "MAX_CHARS", "MAX_SECONDS", "chat_template_from_config", "render_chat_template"]

CHAT_TEMPLATE_FILE = "chat_template.jinja"
MAX_CHARS = 4 * 1024 * 1024  # characters of output (and of any string or list built on the way)
MAX_SECONDS = 10.0  # wall-clock seconds one render may take
_TEMPLATE_LIMIT = CONFIG_LIMIT  # bytes of chat_template.jinja; real templates are a few KB
_INT_BITS = 4096  # the largest integer a template may build (`**`, `*`), in bits
_WIDE = re.compile(r"\d{7,}")  # a format width or precision of a million or more

# (deadline, max_chars) of the render running in this thread
_LIMITS: contextvars.ContextVar[tuple[float, int]] = contextvars.ContextVar("arraygpt_chat_template_limits")


class _Refused(Exception):
    """A render over a limit; ``render_chat_template`` turns it into a ValueError."""


def _import_jinja() -> Any:
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:
        raise ImportError("chat templates need the optional 'jinja2' library: pip install 'arraygpt[hf]'") from e
    return jinja2


def _limits() -> tuple[float, int]:
    return _LIMITS.get((math.inf, MAX_CHARS))


def _check_time() -> None:
    if time.monotonic() > _limits()[0]:
        raise _Refused("it ran past its time limit (a loop that does not end, or far too much work)")


class _Shape(NamedTuple):
    """What a serializer writes for a value: ``chars`` of its strings and numbers, ``items`` (each
    list, dict, tuple and element), how deeply they ``nest``, and ``others``, values of any other type."""

    chars: int
    items: int
    nest: int
    others: int


def _number_chars(value: int | float) -> int:
    # decimal digits and sign of an int (bits/3 >= bits*log10(2)); a float's repr is at most 24
    return value.bit_length() // 3 + 2 if isinstance(value, int) else 24


def _kinds(parts: list[Any]) -> Any:
    """``of(kinds)``: the items of ``parts`` that are instances of ``kinds``, as ``isinstance``
    says. The types are counted once in C, so a list of a million numbers (which a template builds
    in one expression) is classified in a fraction of the time an ``isinstance`` per item takes."""
    types = Counter(map(type, parts))

    def of(kinds: type | tuple[type, ...]) -> list[Any]:
        chosen = {t for t in types if issubclass(t, kinds)}
        if len(chosen) == len(types):
            return parts
        return [x for x in parts if type(x) in chosen] if chosen else []

    return of


def _shape(value: Any) -> _Shape:
    """The :class:`_Shape` of ``value`` as a serializer would write it: a list that holds another
    twice counts it twice (30 such levels are 2^30 items to ``tojson``), computed once per distinct
    list or dict."""
    if isinstance(value, (str, bytes)):
        return _Shape(len(value), 0, 0, 0)
    if value is None:
        return _Shape(0, 0, 0, 0)
    if isinstance(value, (int, float)):
        return _Shape(_number_chars(value), 0, 0, 0)
    if not isinstance(value, (list, tuple, dict)):
        return _Shape(0, 0, 0, 1)
    shapes: dict[int, _Shape] = {}
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, children_done = stack.pop()
        parts = [x for kv in node.items() for x in kv] if isinstance(node, dict) else list(node)
        of = _kinds(parts)
        nested = of((list, tuple, dict))
        if children_done:
            strs, ints, floats = of((str, bytes)), of(int), len(of(float))
            # digits and sign of the ints, summed as _number_chars counts one (sum//3 >= sum of each //3)
            chars = sum(map(len, strs)) + sum(map(int.bit_length, ints)) // 3 + 2 * len(ints) + 24 * floats
            others = len(parts) - len(strs) - len(ints) - floats - len(nested) - len(of(type(None)))
            inner = [shapes.get(id(x), _Shape(0, 0, 0, 0)) for x in nested]
            shapes[id(node)] = _Shape(
                chars + sum(x.chars for x in inner),
                1 + len(parts) + sum(x.items for x in inner),
                1 + max((x.nest for x in inner), default=0),
                others + sum(x.others for x in inner),
            )
        elif id(node) not in shapes:
            shapes[id(node)] = _Shape(0, 0, 0, 0)  # in progress: a structure that holds itself counts it once
            stack.append((node, True))
            stack.extend((x, False) for x in nested if id(x) not in shapes)
    return shapes[id(value)]


def _size(value: Any) -> int:
    """Characters and items in ``value`` as a serializer would write them (see :func:`_shape`)."""
    shape = _shape(value)
    return shape.chars + shape.items


def _check_result(value: Any, what: str) -> Any:
    limit = _limits()[1]
    if _size(value) > limit:
        raise _Refused(f"{what} built a value of over {limit} characters and items, the limit")
    if isinstance(value, int) and value.bit_length() > _INT_BITS:
        raise _Refused(f"{what} built an integer of {value.bit_length()} bits, over the limit of {_INT_BITS}")
    return value


def _check_args(args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> None:
    """Refuse a size argument far beyond the limit before it allocates (``'x'.center(10**12)``)."""
    _check_time()
    limit = _limits()[1]
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > limit:
            raise _Refused(f"{what} was given {value}, over the size limit of {limit}")
        if isinstance(value, (list, tuple, dict)) and _size(value) > limit:
            raise _Refused(f"{what} was given a value of over {limit} characters and items, the limit")


# filters and str methods whose result can be far larger than their inputs; the others (split,
# strip, startswith, ...) give back at most what they were given
_GROWING = frozenset(
    {"join", "replace", "center", "ljust", "rjust", "zfill", "indent", "expandtabs", "wordwrap", "urlize"}
)
_PER = {"indent": "\n", "expandtabs": "\t"}  # an integer argument repeated per line / per tab


def _check_growth(name: str, base: Any, args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> None:
    """Refuse ``base.<name>(*args)`` whose result could pass the limit before C code builds it:
    ``sep.join(items)``, ``s.replace('', t)`` and ``indent`` grow as the product of their inputs."""
    if name not in _GROWING or not isinstance(base, (str, bytes, list, tuple, dict)):
        return
    limit, n = _limits()[1], _size(base)
    for value in (*args, *kwargs.values()):
        if isinstance(value, (str, bytes, list, tuple, dict)):
            grown = n * max(1, _size(value))
        elif name in _PER and isinstance(value, int) and isinstance(base, str):
            grown = base.count(_PER[name]) * abs(value)
        else:
            continue
        if grown > limit:
            raise _Refused(f"{what} could build {grown} characters and items, over the limit of {limit}")


def _check_format(fmt: Any, what: str) -> None:
    """Refuse a format string with a width or precision of a million or more (``'%999999999d'``)."""
    if isinstance(fmt, str) and _WIDE.search(fmt):
        raise _Refused(f"{what} has a width or precision over the size limit: {fmt!r:.60}")


def _widths(spec: str, what: str) -> int:
    """The sum of the numbers written in a conversion (``'%-08.3f'``, ``'>10,.2'``): at least its
    width plus its precision, so a repeated six-digit width adds up."""
    _check_format(spec, what)
    return sum(int(digits) for digits in re.findall(r"\d+", spec))


def _text_bound(value: Any, conversion: str, what: str) -> int:
    """The most characters ``value`` can take once formatted (``str``, ``repr``, ``ascii`` or a
    number), without building it. ``conversion`` "s" is str() of a string, "r" any other."""
    if isinstance(value, str) and conversion == "s":
        return len(value)
    if isinstance(value, _import_jinja().Undefined):  # '' and 'Undefined'
        return 9
    shape = _shape(value)
    if shape.others:  # a namespace, a dict view, an iterator...: their text is not bounded here
        raise _Refused(f"{what} formats a {type(value).__name__}; only strings, numbers, lists and dicts can be")
    if value is None or isinstance(value, (int, float)):
        return 330 + shape.chars  # '%f' of 1e308 is 316 characters; a precision is counted by _widths
    return 10 * (shape.chars + shape.items) + 2  # repr/ascii write one character as up to 10 ('\U0001f600')


# one % conversion: (key) flags width .precision length-modifier type; a key with nested
# parentheses leaves "(" as the type, which _check_percent refuses
_PERCENT = re.compile(
    r"%(?:\((?P<key>[^()]*)\))?[-+ #0]*(?P<width>\*|\d*)(?:\.(?P<precision>\*|\d*))?[hlL]?(?P<type>.?)", re.S
)


def _check_percent(fmt: str, args: Any, what: str) -> None:
    """Refuse ``fmt % args`` whose result could pass the limit, from its widths and the arguments
    each conversion takes, before C code builds it (``('%999999s' * 1500) % (('x',) * 1500)``)."""
    limit = _limits()[1]
    escaped = type(fmt) is not str  # Markup escapes its arguments: up to 6 characters each
    positional = args if isinstance(args, tuple) else (args,)
    total, index = len(fmt), 0
    for m in _PERCENT.finditer(fmt):
        if "*" in (m["width"], m["precision"]):  # no chat template takes a width from its arguments
            raise _Refused(f"{what} takes a width or precision from its arguments ('*'): {fmt!r:.60}")
        if m["type"] == "(":
            raise _Refused(f"{what} has a mapping key with parentheses: {fmt!r:.60}")
        total += _widths(m[0], what)
        if m["type"] == "%":
            continue
        if m["key"] is not None:
            if not isinstance(args, dict):
                raise _Refused(f"{what} has a %(key) conversion but its argument is not a dict")
            value = args.get(m["key"])
        elif index < len(positional):
            value, index = positional[index], index + 1
        else:
            continue  # too few arguments: the % raises
        total += _text_bound(value, "r" if escaped or m["type"] in "ra" else "s", what)
        if total > limit:
            raise _Refused(f"{what} could build over {limit} characters, the limit: {fmt!r:.60}")


def _check_json(value: Any, ensure_ascii: Any, indent: Any, separators: Any) -> None:
    """Refuse ``json.dumps(value, indent=indent, ...)`` whose result could pass the limit before it
    runs: every item can take a line holding the indent once per level of nesting."""
    limit = _limits()[1]
    shape = _shape(value)
    step = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) and indent > 0 else 0
    per_item = 3 + step * shape.nest + (4 if separators is None else _size(separators))  # quotes, newline
    per_char = 12 if ensure_ascii else 6  # '\ud83d\ude00' for one character; '\u0001' without ensure_ascii
    bound = per_char * shape.chars + per_item * shape.items
    if bound > limit:
        raise _Refused(f"the tojson filter could build {bound} characters, over the limit of {limit}")


@functools.lru_cache(maxsize=16)
def _environment() -> Any:
    """transformers' chat-template environment (``_cached_compile_jinja_template``), with size and time checks."""
    jinja2 = _import_jinja()
    import markupsafe
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter

    class Generator(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`: joined after a size check
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Environment(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_time()
            limit = _limits()[1]
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if abs(left) > 1 and right > 0 and right * abs(left).bit_length() > _INT_BITS:
                    raise _Refused(f"{left} ** {right} is over the limit of {_INT_BITS} bits")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(n, int) and _size(seq) * max(n, 0) > limit:
                        raise _Refused(f"a repetition of {_size(seq)} items {n} times is over the limit of {limit}")
            if operator == "%" and isinstance(left, str):
                _check_percent(left, right, "the % format")
            return _check_result(super().call_binop(context, operator, left, right), f"the {operator} operator")

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            _check_args(args, kwargs, "a call")
            name = getattr(__obj, "__name__", "")
            _check_growth(name, getattr(__obj, "__self__", None), args, kwargs, f"a call of {name}")
            return _check_result(super().call(__context, __obj, *args, **kwargs), "a call")

        def wrap_str_format(self, value: Any) -> Any:
            """Jinja's sandboxed ``'{:9}'.format`` (looked up before it is called), with a formatter
            that bounds each field, nested widths (``'{:{}}'``) included, before it is built."""
            if super().wrap_str_format(value) is None:
                return None
            fmt, is_format_map = value.__self__, value.__name__ == "format_map"
            if isinstance(fmt, markupsafe.Markup):
                formatter: Any = EscapeFormatter(self, escape=fmt.escape)
            else:
                formatter = Formatter(self)

            def wrapper(*args: Any, **kwargs: Any) -> str:
                if is_format_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one argument and no keywords")
                    args, kwargs = (), args[0]
                return type(fmt)(formatter.vformat(fmt, args, kwargs))

            return functools.update_wrapper(wrapper, value)

        def checked_concat(self, items: Sequence[Any]) -> str:
            strings = [str(item) for item in items]
            limit = _limits()[1]
            if sum(map(len, strings)) > limit:
                raise _Refused(f"a ~ join of {sum(map(len, strings))} characters is over the limit of {limit}")
            return "".join(strings)

    class Formatter(SandboxedFormatter):
        def vformat(self, format_string: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
            self.total = len(format_string)
            return super().vformat(format_string, args, kwargs)

        def convert_field(self, value: Any, conversion: str | None) -> Any:
            if conversion in ("r", "a"):  # repr of a large value: bounded before it is built
                self.count(_text_bound(value, "r", "a format call"))
            return super().convert_field(value, conversion)

        def format_field(self, value: Any, format_spec: str) -> Any:
            escaped = isinstance(self, SandboxedEscapeFormatter)  # Markup escapes: up to 6 characters each
            conversion = "r" if escaped else "s"
            self.count(_widths(format_spec, "a format call") + _text_bound(value, conversion, "a format call"))
            return super().format_field(value, format_spec)

        def count(self, n: int) -> None:
            self.total += n
            limit = _limits()[1]
            if self.total > limit:
                raise _Refused(f"a format call could build over {limit} characters, the limit")

    class EscapeFormatter(Formatter, SandboxedEscapeFormatter):
        pass

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        # transformers' tojson: Jinja's own escapes HTML characters
        _check_json(x, ensure_ascii, indent, separators)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:  # `dict(...)` without the class's attributes
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # refuses underscore names, as transformers' does
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
                _check_result(attrs[name], "namespace()")
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, _check_result(value, f"setting {name}"))

        @staticmethod
        def _check_name(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
                )

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    # their loops run outside template code, past the deadline, and no chat template uses them
    del env.globals["lipsum"], env.filters["pprint"]
    for name, f in list(env.filters.items()):
        env.filters[name] = _checked_filter(name, f)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


def _checked_filter(name: str, f: Any) -> Any:
    from jinja2.utils import _PassArg

    skip = 0 if _PassArg.from_obj(f) is None else 1  # the context or environment Jinja passes first

    @functools.wraps(f)  # keeps Jinja's pass_context/pass_environment mark
    def checked(*args: Any, **kwargs: Any) -> Any:
        value, rest = (args[skip], args[skip + 1 :]) if len(args) > skip else (None, ())
        _check_args(rest, kwargs, f"the {name} filter")
        _check_growth(name, value, rest, kwargs, f"the {name} filter")
        if name == "format":  # `soft_str(value) % (kwargs or args)`
            _check_percent(value if isinstance(value, str) else str(value), kwargs or tuple(rest), "the format filter")
        if name == "sum" and not isinstance(kwargs.get("start", rest[1] if len(rest) > 1 else 0), (int, float)):
            raise _Refused("the sum filter adds only numbers (lists take time that grows as their square)")
        return _check_result(f(*args, **kwargs), f"the {name} filter")

    return checked


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    return _environment().from_string(template)


def _plain(value: Any, depth: int = 0) -> Any:
    """What the template may see: JSON-like data rebuilt from plain types (transformers' ``_plain_template_data``)."""
    if depth > 64:
        raise ValueError("chat messages are nested more than 64 levels deep")
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k, depth + 1): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v, depth + 1) for v in value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return _plain(value.item(), depth + 1)  # a NumPy scalar
    return f"<{type(value).__name__}>"


def _tracer(frame: Any, event: str, arg: Any) -> Any:
    """Check the deadline on every line of Python the render runs: the template's own code (a loop
    with no call in it still ends) and the filters and globals it calls (``wordwrap``, ``map``)."""
    if event == "call" and frame.f_code.co_filename == __file__:
        return None  # this module's checks: their work is bounded by the size limit
    if event == "line":
        _check_time()
    return _tracer


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    variables: Mapping[str, Any] | None = None,
    max_chars: int = MAX_CHARS,
    seconds: float = MAX_SECONDS,
) -> str:
    """``template`` rendered with ``messages``, as transformers' ``apply_chat_template`` renders it.

    Args:
        template: the Jinja source.
        messages: the conversation, a list of ``{"role": ..., "content": ...}`` objects.
        add_generation_prompt: end with what opens the assistant's reply.
        variables: more template variables (``bos_token``, ``eos_token``, ``tools``, ...).
        max_chars: the most characters the output (or any string or list the template builds) may hold.
        seconds: the most wall-clock seconds the render may take.

    Returns:
        The rendered text.

    Raises:
        ImportError: jinja2 is missing.
        TypeError: ``messages`` is not a list of objects.
        ValueError: the template does not compile, fails (``raise_exception``, an undefined
            method), or goes over a limit; the message says which.

    Example:
        >>> render_chat_template("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
        ...                      [{"role": "user", "content": "hi"}])
        '<user>hi'
    """
    jinja2 = _import_jinja()
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} objects, not {messages!r:.80}")
    for m in messages:
        if not isinstance(m, Mapping):
            raise TypeError(f"each chat message must be a dict with 'role' and 'content', not {m!r:.80}")
    if not isinstance(template, str):
        raise TypeError(f"a chat template is a string of Jinja source, not {type(template).__name__}")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template does not compile: {e.message} (line {e.lineno})") from None
    context = {"tools": None, "documents": None, **_plain(dict(variables or {}))}
    context.update(messages=_plain(list(messages)), add_generation_prompt=bool(add_generation_prompt))
    token = _LIMITS.set((time.monotonic() + seconds, max_chars))
    previous = sys.gettrace()
    sys.settrace(_tracer)
    try:
        out, size = [], 0
        for chunk in compiled.generate(**context):
            size += len(chunk)
            if size > max_chars:
                raise _Refused(f"its output passed the limit of {max_chars} characters")
            out.append(chunk)
        return "".join(out)
    except _Refused as e:
        raise ValueError(f"the chat template was stopped: {e}") from None
    except jinja2.TemplateError as e:  # raise_exception, a sandbox refusal, an undefined value used
        raise ValueError(f"the chat template failed: {e.message or type(e).__name__}") from None
    except MemoryError:  # a bound missed: the render is refused, the caller goes on
        raise ValueError("the chat template was stopped: it ran out of memory") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RecursionError) as e:
        raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
        _LIMITS.reset(token)


def chat_template_from_config(tok_config: Mapping[str, Any], directory: Path, source: str) -> str | None:
    """The chat template of a tokenizer directory: ``chat_template.jinja`` when the directory has
    one (transformers 4.43+ writes it there), else ``tokenizer_config.json``'s ``chat_template``
    (a string, or a list of named templates of which "default" is taken), else None.

    Raises:
        CheckpointError: a template that is not a string, a list without "default", or an
            unreadable chat_template.jinja; the message names the file.
    """
    path = directory / CHAT_TEMPLATE_FILE
    if os.path.lexists(path):
        f, size = open_regular(path, "chat template")
        with f:
            if size > _TEMPLATE_LIMIT:
                raise CheckpointError(f"{path}: the chat template is {size} bytes; at most {_TEMPLATE_LIMIT} are read")
            data = f.read(_TEMPLATE_LIMIT + 1)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CheckpointError(
                f"{path}: the chat template is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
    value = tok_config.get("chat_template")
    if value is None:
        return None
    if isinstance(value, str):
        return _no_surrogates(value, source)
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)):
                raise CheckpointError(f"{source}: chat_template entries must be {{'name': ..., 'template': ...}}")
            named[entry["name"]] = entry.get("template")
        if "default" not in named:
            raise CheckpointError(
                f"{source}: chat_template is a list without a 'default' template (it has {sorted(named)!r:.200})"
            )
        if isinstance(named["default"], str):
            return _no_surrogates(named["default"], source)
    raise CheckpointError(f"{source}: chat_template must be a string or a list of named templates, not {value!r:.80}")


def _no_surrogates(text: str, source: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise CheckpointError(
            f"{source}: chat_template holds a lone surrogate (\\u{ord(text[e.start]):04x}), which is not text"
        ) from None
    return text
