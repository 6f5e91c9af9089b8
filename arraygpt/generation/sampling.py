"""Sampling: the sampler contract, the pipeline that turns logits into a distribution, and the
array helpers that the generation loop and every sampler plugin share.

The pipeline of one step, for a (B, V) row of logits per sequence:

    logits -> logits filters (e.g. repeat_penalty)                       on the logits first,
           -> softmax(logits / T)  (T = 0: one-hot at the argmax)        then the temperature,
           -> filter_1 -> renormalize -> filter_2 -> renormalize ...    then the samplers' filters,
           -> draw with one pre-drawn coin per row                       then the draw.

This is transformers' order (processors, temperature, top-k, top-p, min-p); llama.cpp's default
chain applies the temperature after its filters instead.

**The sampler contract.** A sampler is a plugin: a plugin's ``arraygpt_register_samplers()``
returns ``[{name: factory}]``. ``factory(**options)`` validates its options (raising
``ValueError`` that names the option and its allowed range, :func:`check_number` helps) and
returns a *filter*: a pure function ``filter(probs) -> weights`` from a (B, V) array of
probabilities (each row sums to 1) to a (B, V) array of non-negative weights of the same dtype
and device, zero for every token it removes, positive for at least one token per row. The
weights need not sum to 1: the pipeline renormalizes. A filter uses only the array API standard
(``xp = namespace(probs)``), draws no random numbers and keeps no state, so it runs unchanged on
NumPy, CuPy, PyTorch and array-api-strict, and one seed gives the same tokens on all of them.
The factory's keyword parameters are its options; :func:`make_sampler` hands each option to the
samplers that name it, and an option named like a registered sampler that is not chosen turns
that sampler on (``top_k=5`` alone adds ``top_k``).

Two optional parts of the contract:

- **The context.** A filter that takes a keyword parameter ``context`` is called as
  ``filter(probs, context=ids)``, with ``ids`` the (B, T) integer token ids so far (the prompt and
  what was generated), on the logits' device. It may read them, never change them.
- **The logits stage.** A filter whose attribute ``stage`` is ``"logits"`` maps (B, V) logits to
  (B, V) logits (finite, or -inf for a removed token) and runs before the temperature, in the
  order given (a repetition penalty needs the logits' sign, which probabilities have lost).

The pipeline checks what every filter returns: the shape of its input, and non-negative weights
(a logits filter: no NaN and no +inf). A filter that breaks this is an error naming its sampler
and plugin (``PluginError`` for a registered one), never garbage tokens.

The draw is not part of a sampler: :func:`draw` picks the tokens, as llm.c's
``sample_mult(probs, n, coin)`` does, from one uniform coin per row drawn on the host, with
``cumulative_sum`` and a count of the entries below the coin (the standard has no multinomial).

Not here: the generation loop and the KV cache (``arraygpt.generation.generation``), the built-in samplers
(``arraygpt.plugins.samplers``). This module imports only the shim and the layers (and the
plugin manager when a sampler is looked up by name), so sampler plugins can import it.

Shape legend: B batch (sequences sampled together), V vocabulary, K candidates, T positions.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from arraygpt.nn import layers
from arraygpt.xp import Array, namespace, to_numpy

Filter = Callable[[Array], Array]

__all__ = [
    "DEFAULT_SAMPLER",
    "DEFAULT_TEMPERATURE",
    "MIN_TEMPERATURE",
    "Filter",
    "Sampler",
    "available_samplers",
    "check_number",
    "check_temperature",
    "draw",
    "make_sampler",
    "normalize",
    "one_hot_argmax",
    "top_candidates",
    "with_generation_config",
]

DEFAULT_SAMPLER = "temperature"
DEFAULT_TEMPERATURE = 1.0  # plain softmax sampling, where neither the caller nor the model chose


# ----------------------------------------------------------------------------------------------
# option checks shared by the built-in samplers and by third-party ones


def check_number(
    name: str,
    value: Any,
    low: float,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> Any:
    """Return ``value`` if it is a number in the given range, else raise a ``ValueError`` that names
    the option and the allowed range (as ``top_p must be a number in (0, 1], got 1.5``).

    Example:
        >>> check_number("top_p", 0.9, 0.0, 1.0, low_open=True)
        0.9
    """
    lo = ("(" if low_open else "[") + _fmt(low)
    hi = _fmt(high) + (")" if high_open or math.isinf(high) else "]")
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} >= {_fmt(low)}" if math.isinf(high) and not low_open else f"{kind} in {lo}, {hi}"
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_"
    if integer and is_number and not isinstance(value, numbers.Integral):
        is_number = False
    if not is_number or math.isnan(value):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value) if integer else float(value)


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


MIN_TEMPERATURE = 1.1754943508222875e-38  # float32's smallest normal number: below it logits / T is NaN in float32


def check_temperature(temperature: Any) -> float:
    """T must be 0 (greedy) or a finite number >= float32's smallest normal number (~1.18e-38);
    there is no upper cap. A smaller positive T is 0 in float32, where logits / T gives NaN."""
    t = check_number("temperature", temperature, 0.0)
    if math.isinf(t):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if 0.0 < t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature {temperature!r} is too small: use 0 for greedy decoding or at least {MIN_TEMPERATURE:.3g} "
            "(a smaller T rounds to 0 in float32, where logits / T is NaN)"
        )
    return t


# ----------------------------------------------------------------------------------------------
# array helpers: pure, array API standard only


def one_hot_argmax(x: Array) -> Array:
    """(B, V) -> (B, V): 1 at the first maximum of each row, 0 elsewhere, in ``x``'s dtype."""
    xp = namespace(x)
    best = xp.argmax(x, axis=-1, keepdims=True)  # (B, 1)
    V = x.shape[-1]
    return xp.astype(xp.arange(V, device=x.device)[None, :] == best, x.dtype)  # (B, V)


def normalize(weights: Array) -> Array:
    """(B, V) non-negative weights -> probabilities: each row divided by its sum (a row of zeros
    stays zeros, which the draw reports)."""
    xp = namespace(weights)
    total = xp.sum(weights, axis=-1, keepdims=True)  # (B, 1)
    return weights / xp.where(total > 0, total, xp.ones_like(total))


def draw(probs: Array, coins: Array) -> Array:
    """Sample one token per row with a pre-drawn uniform coin per row (llm.c's sample_mult).

    The standard has no multinomial, so: c = cumulative_sum(w) in float64, u = coin * c[-1], and
    the token is the first index with c > u, i.e. V - count(c > u). A token of weight 0 adds
    nothing to c and is never chosen. u is kept strictly below c[-1], so a rounding in
    ``coin * c[-1]`` cannot run past the last token.

    Args:
        probs: (B, V) non-negative weights (need not be normalized).
        coins: (B,) or (B, 1) uniform numbers in [0, 1), same namespace as ``probs``.

    Returns:
        (B,) integer token ids. A row whose weights are all zero or NaN gets the id V, which no
        token has: ``generate`` reports it as an error.
    """
    xp = namespace(probs)
    V = probs.shape[-1]
    cdf = xp.cumulative_sum(xp.astype(probs, xp.float64), axis=-1)  # (B, V)
    total = cdf[..., -1:]  # (B, 1)
    u = xp.reshape(xp.astype(coins, xp.float64), total.shape) * total  # (B, 1)
    u = xp.minimum(u, total * (1.0 - 2.0**-52))
    return V - xp.count_nonzero(cdf > u, axis=-1)  # (B,)


def top_candidates(probs: Array, k: int) -> tuple[Any, Any]:
    """The k most likely tokens of each row and their probabilities, as host NumPy arrays (B, k)."""
    xp = namespace(probs)
    k = min(k, probs.shape[-1])
    order = xp.argsort(probs, axis=-1, descending=True, stable=True)[..., :k]  # (B, k)
    values = xp.take_along_axis(probs, order, axis=-1)  # (B, k)
    return to_numpy(order), to_numpy(values)


# ----------------------------------------------------------------------------------------------
# samplers: registry lookup, option routing, composition


def available_samplers(pm: Any = None) -> dict[str, Callable[..., Filter]]:
    """Registered sampler names -> factories, from the plugin manager (built-ins and plugins)."""
    from arraygpt.manager import registry

    return registry("samplers", pm)


def _option_names(factory: Callable[..., Any]) -> tuple[set[str], set[str], bool]:
    """(all option names, required option names, takes **options) of a sampler factory."""
    params = inspect.signature(factory).parameters.values()
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = {p.name for p in params if p.kind in kinds}
    required = {p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return names, required, var_kw


def _reads_context(f: Callable[..., Any]) -> bool:
    """Whether a filter takes the keyword parameter ``context`` (the token ids so far)."""
    try:
        params = inspect.signature(f).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    p = params.get("context")
    return p is not None and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class Sampler:
    """Logits filters, temperature, then probability filters: (B, V) logits -> (B, V) distribution.

    Build one with :func:`make_sampler`. ``sampler(logits, context)`` returns probabilities (rows
    sum to 1) in the logits' dtype; :func:`draw` then picks the tokens. ``context`` is the (B, T)
    token ids so far; it is needed only when a filter reads it (``reads_context``).

    Attributes:
        names: the sampler names in the order they apply.
        filters: the filters the factories returned, same order.
        temperature: T (0 means greedy).
        owners: the plugin that registered each sampler ("" for a filter passed as a function).
        reads_context: whether any filter takes ``context``.
    """

    def __init__(
        self,
        names: Sequence[str],
        filters: Sequence[Filter],
        temperature: float,
        owners: Sequence[str] | None = None,
    ):
        self.names = tuple(names)
        self.filters = tuple(filters)
        self.temperature = temperature
        self.owners = tuple(owners) if owners is not None else ("",) * len(self.names)
        stages = [getattr(f, "stage", "probs") for f in self.filters]
        bad = [(n, s) for n, s in zip(self.names, stages) if s not in ("probs", "logits")]
        if bad:
            raise ValueError(f"sampler {bad[0][0]!r}: a filter's stage must be 'probs' or 'logits', got {bad[0][1]!r}")
        takes = [_reads_context(f) for f in self.filters]
        self._logits = [(i, takes[i]) for i, s in enumerate(stages) if s == "logits"]
        self._probs = [(i, takes[i]) for i, s in enumerate(stages) if s == "probs"]
        self.reads_context = any(takes)

    def __repr__(self) -> str:
        return f"Sampler({' -> '.join(self.names) or 'none'}, temperature={self.temperature:g})"

    def _who(self, i: int) -> str:
        owner = self.owners[i]
        return f"sampler {self.names[i]!r}" + (f" (plugin {owner!r})" if owner else "")

    def _fail(self, i: int, message: str) -> None:
        from arraygpt.errors import PluginError

        raise (PluginError if self.owners[i] else ValueError)(f"{self._who(i)} {message}")

    def _call(self, i: int, x: Array, reads: bool, context: Array | None) -> Array:
        f = self.filters[i]
        if not reads:
            return f(x)
        if context is None:
            raise ValueError(f"{self._who(i)} reads the context: call the sampler as sampler(logits, context)")
        return f(x, context=context)

    def __call__(self, logits: Array, context: Array | None = None) -> Array:
        xp = namespace(logits)
        for i, reads in self._logits:
            out = self._call(i, logits, reads, context)
            if getattr(out, "shape", None) != logits.shape:
                self._fail(i, f"returned logits of shape {_shape(out)} for logits of shape {tuple(logits.shape)}")
            if not bool(xp.all(xp.isfinite(out) | (out == -math.inf))):
                self._fail(i, "returned logits that hold NaN or +inf (a logits filter may only lower a logit to -inf)")
            logits = out
        if self.temperature == 0.0:
            probs = one_hot_argmax(logits)  # (B, V): the limit of softmax(logits / T) as T -> 0
        else:
            probs = layers.softmax_forward(logits, self.temperature)  # (B, V)
        for i, reads in self._probs:
            weights = self._call(i, probs, reads, context)
            if getattr(weights, "shape", None) != probs.shape:
                self._fail(
                    i,
                    f"returned weights of shape {_shape(weights)} for probabilities of shape {tuple(probs.shape)}: "
                    "a filter returns one weight per token",
                )
            if not bool(xp.all(weights >= 0)):
                self._fail(
                    i, "returned negative or NaN weights: a filter returns weights >= 0, zero for a removed token"
                )
            probs = normalize(weights)  # (B, V)
        return probs


def _shape(x: Any) -> Any:
    shape = getattr(x, "shape", None)
    return tuple(shape) if shape is not None else type(x).__name__


def with_generation_config(
    config: Mapping[str, Any],
    sampler: str | Sequence[str] | Filter | None = None,
    temperature: float | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    default_temperature: float = DEFAULT_TEMPERATURE,
) -> tuple[str | Sequence[str] | Filter, float, dict[str, Any]]:
    """(sampler, temperature, options) for :func:`make_sampler`: the caller's choices over a
    model's ``generation_config.json`` (``config``, as ``arraygpt.io.hf.reader.read_generation_config``
    returns it), read as transformers' ``generate`` reads it. None means "not chosen".

    - ``temperature``: the caller's; else, unless ``sampler`` was chosen, 0 (greedy) where
      ``do_sample`` is false, the file's ``temperature`` where it has one; else
      ``default_temperature``.
    - ``top_k``, ``top_p``, ``min_p``: the file's join ``options`` unless ``options`` has them or
      ``do_sample`` is false (``top_k`` 0 means off); ``repetition_penalty`` becomes
      ``repeat_penalty`` over the whole context (``repeat_last_n`` -1) unless ``options`` has it
      (1.0 means off).
    - ``sampler``: the caller's, else :data:`DEFAULT_SAMPLER`.

    Example:
        >>> with_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
        ('temperature', 0.6, {'top_p': 0.9})
        >>> with_generation_config({"do_sample": False}, temperature=0.8)
        ('temperature', 0.8, {})
    """
    options = dict(options or {})
    sampling_on = config.get("do_sample") is not False
    if temperature is None:
        temperature = default_temperature
        if sampler is None:
            if not sampling_on:
                temperature = 0.0
            elif "temperature" in config:
                temperature = float(config["temperature"])
    if sampling_on:
        for name in ("top_k", "top_p", "min_p"):
            value = config.get(name)
            if name not in options and value is not None and not (name == "top_k" and value == 0):
                options[name] = value
    penalty = config.get("repetition_penalty")
    if "repeat_penalty" not in options and penalty is not None and penalty != 1.0:
        options["repeat_penalty"] = float(penalty)
        options.setdefault("repeat_last_n", -1)  # transformers penalizes every token of the context
    return (DEFAULT_SAMPLER if sampler is None else sampler), temperature, options


def make_sampler(
    sampler: str | Sequence[str] | Filter = DEFAULT_SAMPLER,
    *,
    temperature: float = 1.0,
    pm: Any = None,
    **options: Any,
) -> Sampler:
    """Build the sampling pipeline: logits filters, temperature, then each sampler's filter, in order.

    Args:
        sampler: a registered sampler name (``greedy``, ``temperature``, ``top_k``, ``top_p``,
            ``min_p``, ``repeat_penalty``, or a plugin's), a sequence of names applied in order
            (``["top_k", "top_p"]``), or a filter function used as is.
        temperature: 0 (greedy) or T >= ~1.18e-38 (finite; no upper cap).
        pm: the plugin manager to look names up in; default the process-wide one.
        **options: sampler options (``top_k=40``, ``top_p=0.9``, ``min_p=0.05``,
            ``repeat_penalty=1.1``, a plugin's own); each goes to every chosen sampler whose
            factory takes it. An option that no chosen sampler takes but that names a registered
            sampler turns that sampler on, after the chosen ones (the built-ins in the order
            repeat_penalty, top_k, top_p, min_p): ``make_sampler(top_k=40, top_p=0.9)`` is
            ``make_sampler(["temperature", "top_k", "top_p"], top_k=40, top_p=0.9)``.

    Raises:
        ValueError: an invalid temperature or option (the message names it and its allowed range),
            an unknown sampler name (the message lists the registered ones), an option that no
            chosen sampler takes and no sampler is named after, or a sampler whose required option
            is missing.

    Example:
        >>> s = make_sampler("top_p", temperature=0.8, top_p=0.9)
    """
    from arraygpt.manager import registry_with_owners

    temperature = check_temperature(temperature)
    if callable(sampler) and not isinstance(sampler, str):
        if options:
            raise ValueError(f"options {sorted(options)} given with a sampler function; pass them to it directly")
        return Sampler([getattr(sampler, "__name__", repr(sampler))], [sampler], temperature)
    names = [sampler] if isinstance(sampler, str) else list(sampler) if isinstance(sampler, (list, tuple)) else []
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"sampler must be a name, a list of names or a filter function, got {sampler!r}")
    owned = registry_with_owners("samplers", pm)
    factories = {name: factory for name, (factory, _) in owned.items()}
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown sampler {unknown[0]!r}; registered samplers: {', '.join(sorted(factories))}")
    taken = set().union(*(_option_names(factories[n])[0] for n in names))
    implied = [o for o in options if o not in taken and o in factories and o not in names]
    names += sorted(implied, key=lambda o: _IMPLIED_ORDER.index(o) if o in _IMPLIED_ORDER else len(_IMPLIED_ORDER))
    used: set[str] = set()
    filters = []
    for name in names:
        factory = factories[name]
        accepted, required, var_kw = _option_names(factory)
        mine = dict(options) if var_kw else {k: v for k, v in options.items() if k in accepted}
        missing = sorted(required - set(mine))
        if missing:
            raise ValueError(f"sampler {name!r} needs the option {missing[0]} (e.g. {missing[0]}=...)")
        used |= set(mine)
        filters.append(factory(**mine))
    unused = sorted(set(options) - used)
    if unused:
        takes = sorted(set().union(*(_option_names(factories[n])[0] for n in names)))
        raise ValueError(
            f"option {unused[0]!r} is not used by sampler {' + '.join(names)} (its options: "
            f"{', '.join(takes) or 'none'}) and names no registered sampler ({', '.join(sorted(factories))})"
        )
    return Sampler(names, filters, temperature, [owned[n][1] for n in names])


_IMPLIED_ORDER = ("repeat_penalty", "top_k", "top_p", "min_p")  # the order of options that turn their sampler on
