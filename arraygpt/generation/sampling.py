"""Sampling: the sampler contract, the pipeline that turns logits into a distribution, and the
array helpers that the generation loop and every sampler plugin share.

The pipeline of one step, for a (B, V) row of logits per sequence:

    logits -> softmax(logits / T)  (T = 0: one-hot at the argmax)        temperature first,
           -> filter_1 -> renormalize -> filter_2 -> renormalize ...    then the samplers' filters,
           -> draw with one pre-drawn coin per row                       then the draw.

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
samplers that name it.

The draw is not part of a sampler: :func:`draw` picks the tokens, as llm.c's
``sample_mult(probs, n, coin)`` does, from one uniform coin per row drawn on the host, with
``cumulative_sum`` and a count of the entries below the coin (the standard has no multinomial).

Not here: the generation loop and the KV cache (``arraygpt.generation.generation``), the built-in samplers
(``arraygpt.plugins.samplers``). This module imports only the shim and the layers (and the
plugin manager when a sampler is looked up by name), so sampler plugins can import it.

Shape legend: B batch (sequences sampled together), V vocabulary, K candidates.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from arraygpt.nn import layers
from arraygpt.xp import Array, namespace, to_numpy

Filter = Callable[[Array], Array]

DEFAULT_SAMPLER = "temperature"


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


def check_temperature(temperature: Any) -> float:
    """T must be a finite number >= 0 (0 means greedy); there is no upper cap."""
    t = check_number("temperature", temperature, 0.0)
    if math.isinf(t):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
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


class Sampler:
    """Temperature plus a chain of filters: (B, V) logits -> (B, V) distribution to draw from.

    Build one with :func:`make_sampler`. ``sampler(logits)`` returns probabilities (rows sum to
    1) in the logits' dtype; :func:`draw` then picks the tokens.

    Attributes:
        names: the sampler names in the order they apply.
        filters: the filters the factories returned, same order.
        temperature: T (0 means greedy).
    """

    def __init__(self, names: Sequence[str], filters: Sequence[Filter], temperature: float):
        self.names = tuple(names)
        self.filters = tuple(filters)
        self.temperature = temperature

    def __repr__(self) -> str:
        return f"Sampler({' -> '.join(self.names) or 'none'}, temperature={self.temperature:g})"

    def __call__(self, logits: Array) -> Array:
        if self.temperature == 0.0:
            probs = one_hot_argmax(logits)  # (B, V): the limit of softmax(logits / T) as T -> 0
        else:
            probs = layers.softmax_forward(logits, self.temperature)  # (B, V)
        for f in self.filters:
            probs = normalize(f(probs))  # (B, V)
        return probs


def make_sampler(
    sampler: str | Sequence[str] | Filter = DEFAULT_SAMPLER,
    *,
    temperature: float = 1.0,
    pm: Any = None,
    **options: Any,
) -> Sampler:
    """Build the sampling pipeline: temperature first, then each named sampler's filter, in order.

    Args:
        sampler: a registered sampler name (``greedy``, ``temperature``, ``top_k``, ``top_p``,
            ``min_p``, or a plugin's), a sequence of names applied in order (``["top_k", "top_p"]``),
            or a filter function used as is.
        temperature: T >= 0 (finite; no upper cap). 0 means greedy.
        pm: the plugin manager to look names up in; default the process-wide one.
        **options: sampler options (``top_k=40``, ``top_p=0.9``, ``min_p=0.05``, a plugin's own);
            each goes to every chosen sampler whose factory takes it.

    Raises:
        ValueError: an invalid temperature or option (the message names it and its allowed range),
            an unknown sampler name (the message lists the registered ones), an option that no
            chosen sampler takes, or a sampler whose required option is missing.

    Example:
        >>> s = make_sampler("top_p", temperature=0.8, top_p=0.9)
    """
    temperature = check_temperature(temperature)
    if callable(sampler) and not isinstance(sampler, str):
        if options:
            raise ValueError(f"options {sorted(options)} given with a sampler function; pass them to it directly")
        return Sampler([getattr(sampler, "__name__", repr(sampler))], [sampler], temperature)
    names = [sampler] if isinstance(sampler, str) else list(sampler) if isinstance(sampler, (list, tuple)) else []
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"sampler must be a name, a list of names or a filter function, got {sampler!r}")
    factories = available_samplers(pm)
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ValueError(f"unknown sampler {unknown[0]!r}; registered samplers: {', '.join(sorted(factories))}")
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
            f"{', '.join(takes) or 'none'}); to combine samplers pass a list, e.g. sampler=['top_k', 'top_p']"
        )
    return Sampler(names, filters, temperature)
