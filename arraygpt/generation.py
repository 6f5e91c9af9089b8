"""Generation: the predict-sample-append loop, the sampler contract, and the ``sample`` command.

A GPT makes text one token at a time: predict the distribution of the next token, sample from
it, append the sample, repeat. ``generate`` runs that loop and yields each new token as soon as
it is drawn (streaming), for one prompt or for a batch of equal-length prompts together.

The pipeline of one step, for a (B, V) row of logits per sequence:

    logits -> softmax(logits / T)  (T = 0: one-hot at the argmax)        temperature first,
           -> filter_1 -> renormalize -> filter_2 -> renormalize ...    then the samplers' filters,
           -> draw with one pre-drawn coin per row                       then the draw.

**The sampler contract.** A sampler is a plugin: a plugin's ``arraygpt_register_samplers()``
returns ``[{name: factory}]``. ``factory(**options)`` validates its options (raising
``ValueError`` that names the option and its allowed range) and returns a *filter*: a pure
function ``filter(probs) -> weights`` from a (B, V) array of probabilities (each row sums to 1)
to a (B, V) array of non-negative weights of the same dtype and device, zero for every token it
removes, positive for at least one token per row. The weights need not sum to 1: the loop
renormalizes. A filter uses only the array API standard (``xp = namespace(probs)``), draws no
random numbers and keeps no state, so it runs unchanged on NumPy, CuPy, PyTorch and
array-api-strict, and one seed gives the same tokens on all of them. The factory's keyword
parameters are its options; ``generate`` hands each option to the samplers that name it.

The draw is not part of a sampler: the loop draws it, as llm.c's ``sample_mult(probs, n, coin)``
does, from one uniform coin per row drawn on the host (``shim.host_rng``), with
``cumulative_sum`` and a count of the entries below the coin (the standard has no multinomial).

Not here: the model (``model.py``), the built-in samplers (``arraygpt.plugins.samplers``),
checkpoint formats (``arraygpt.checkpoint``, ``arraygpt.interop``).

Shape legend: B batch (sequences generated together), T positions, V vocabulary, K candidates.
"""

from __future__ import annotations

import argparse
import inspect
import io
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arraygpt import layers
from arraygpt.shim import host_rng, namespace, to_numpy

if TYPE_CHECKING:
    import numpy as np

Array = Any
Filter = Callable[[Array], Array]

DEFAULT_SAMPLER = "temperature"


# ----------------------------------------------------------------------------------------------
# option checks shared by the built-in samplers and by third-party ones


def check_number(
    name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
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
    sampler: str | Sequence[str] | Filter = DEFAULT_SAMPLER, *, temperature: float = 1.0, pm: Any = None,
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
        raise ValueError(
            f"unknown sampler {unknown[0]!r}; registered samplers: {', '.join(sorted(factories))}"
        )
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


# ----------------------------------------------------------------------------------------------
# the decoders: the model's next-token logits, with or without the KV cache


class _Decoder:
    """Next-token logits (B, V) for a growing context, by full recompute of the last block_size
    tokens (``use_cache=False``), or with a KV cache (one new position per step).

    With learned absolute positions, a token's keys and values depend on its position, so once
    the context outgrows block_size and the window slides by one, every cached key is stale: the
    cache is then rebuilt from the cropped window (one forward over block_size positions), which
    is exactly the full recompute of that window.
    """

    def __init__(self, model: Any, use_cache: bool):
        from arraygpt.model import KVCache

        self.model = model
        self.use_cache = use_cache
        self.block_size = model.config.block_size
        self._new_cache = lambda: KVCache(model.config)
        self.cache = None
        self.forwards = 0  # number of model forwards (for tests and benchmarks)
        self.rebuilds = 0  # KV cache rebuilds after the window slid

    def _forward(self, tokens: Any, kv_cache: Any = None) -> Array:
        model = self.model
        training = model.training
        model.training = False  # no dropout while generating; restored before control returns
        try:
            logits, _ = model.forward(tokens, kv_cache=kv_cache, last_only=True)  # (B, 1, V)
        finally:
            model.training = training
        self.forwards += 1
        return logits[:, -1, :]  # (B, V)

    def start(self, context: Any) -> Array:
        """The first logits, from the whole prompt (B, T) (cropped to the last block_size)."""
        window = context[:, -self.block_size :]
        if not self.use_cache:
            return self._forward(window)
        self.cache = self._new_cache()
        return self._forward(window, self.cache)

    def step(self, context: Any) -> Array:
        """The logits after the context (B, T) gained one token at its end."""
        if not self.use_cache:
            return self._forward(context[:, -self.block_size :])
        if self.cache.length < self.block_size:
            return self._forward(context[:, -1:], self.cache)  # one new position
        self.rebuilds += 1
        self.cache.reset()
        return self._forward(context[:, -self.block_size :], self.cache)


# ----------------------------------------------------------------------------------------------
# the loop


@dataclass(frozen=True)
class Candidates:
    """One generated token with the distribution behind it (``generate(..., show_probs=K)``).

    Attributes:
        token: the token that was drawn.
        p_model: its probability under the model's own distribution, softmax(logits).
        p_sampler: its probability under the distribution it was drawn from (after temperature
            and the samplers' filters).
        model: the K most likely tokens under softmax(logits), as (token, probability), most
            likely first: what the model considered before any sampling choice.
        sampler: the at most K most likely tokens of the distribution that was sampled (after
            temperature and filtering; tokens filtered out are left out).
    """

    token: int
    p_model: float
    p_sampler: float
    model: tuple[tuple[int, float], ...]
    sampler: tuple[tuple[int, float], ...]


def _prompt_array(prompt: Any) -> tuple[Any, bool]:
    """prompt -> (host int64 array (B, T), whether it was a single sequence)."""
    import numpy as np

    if isinstance(prompt, (list, tuple)):
        rows = list(prompt)
        if rows and all(isinstance(r, (list, tuple, np.ndarray)) for r in rows):
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise ValueError(f"the prompts of a batch must have equal lengths, got lengths {sorted(lengths)}")
        host = np.asarray(rows)
    else:
        host = to_numpy(prompt)
    if host.ndim not in (1, 2):
        raise ValueError(f"prompt must be a sequence of token ids (T,) or a batch (B, T), got shape {host.shape}")
    if host.size == 0:
        raise ValueError("prompt must hold at least one token (start with the tokenizer's BOS token)")
    if host.dtype.kind not in "iu":
        raise TypeError(f"prompt must hold integer token ids, got dtype {host.dtype}")
    single = host.ndim == 1
    return host.reshape(1, -1).astype(np.int64) if single else host.astype(np.int64), single


def _end_ids(eos_id: Any) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    ids = [eos_id] if isinstance(eos_id, numbers.Integral) else list(eos_id)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_id must be a token id or a collection of token ids, got {eos_id!r}")
    return frozenset(int(i) for i in ids if i is not None)


def _stop_sequences(stop: Any) -> tuple[tuple[int, ...], ...]:
    if stop is None:
        return ()
    seqs = []
    for s in stop:
        if isinstance(s, numbers.Integral) or not all(isinstance(i, numbers.Integral) for i in s) or len(s) == 0:
            raise TypeError(f"stop must be a list of non-empty token id sequences, e.g. [[13, 13]], got {stop!r}")
        seqs.append(tuple(int(i) for i in s))
    return tuple(seqs)


def generate(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    sampler: str | Sequence[str] | Filter = DEFAULT_SAMPLER,
    *,
    temperature: float = 1.0,
    seed: int | np.random.Generator | None = None,
    use_cache: bool = True,
    eos_id: int | Iterable[int] | None = None,
    stop: Sequence[Sequence[int]] | None = None,
    show_probs: int = 0,
    **sampler_options: Any,
) -> Iterator[Any]:
    """Generate tokens after ``prompt``, yielding each one as soon as it is drawn.

    Args:
        model: an ``arraygpt.GPT`` (any backend, any dtype).
        prompt: token ids: one sequence (T,) or a batch of equal-length sequences (B, T), as
            lists, a NumPy array or a backend array. Longer than block_size: the last block_size.
        max_new_tokens: the most tokens to generate per sequence (>= 0).
        sampler: a sampler name, a list of names that compose in order, or a filter function
            (see the module docstring); default ``temperature`` (plain softmax sampling).
        temperature: T of softmax(logits / T), applied before every sampler; 0 means greedy.
        seed: seed of the host generator of the coins (one per sequence per step), or a NumPy
            ``Generator`` to draw from; None draws a fresh seed. One seed gives the same tokens on
            every backend.
        use_cache: keep each layer's keys and values (one position of work per token). False
            reruns the whole context each step (for checks and benchmarks); the tokens are the same.
        eos_id: end token(s): a sequence stops after generating one (e.g. the tokenizer's BOS/EOS).
        stop: stop sequences of token ids: a sequence stops once its generated tokens end with one.
        show_probs: K > 0 yields :class:`Candidates` (the token and the K most likely candidates
            before and after the sampler) instead of bare token ids.
        **sampler_options: options of the chosen samplers, e.g. ``top_k=40``, ``top_p=0.9``.

    Returns:
        An iterator with one item per step: for a single sequence the token id (an int), or a
        :class:`Candidates` with ``show_probs``; for a batch a tuple with one such item per row,
        ``None`` for a row that has already stopped. The end token or the last token of a stop
        sequence is yielded, then that row stops; the iterator ends when every row has stopped or
        after ``max_new_tokens`` steps. Arguments are checked when ``generate`` is called, before
        the first token.

    Raises:
        ValueError: invalid options (see :func:`make_sampler`), prompt or counts.

    Example:
        >>> for token in generate(model, [0, 5, 3], 20, "top_p", top_p=0.9, temperature=0.8, seed=1):
        ...     print(tokenizer.decode([token]), end="", flush=True)
    """
    chain = make_sampler(sampler, temperature=temperature, **sampler_options)
    context, single = _prompt_array(prompt)
    n_new = check_number("max_new_tokens", max_new_tokens, 0, integer=True)
    k = check_number("show_probs", show_probs, 0, integer=True)
    ends, stops = _end_ids(eos_id), _stop_sequences(stop)
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        rng = host_rng(seed)
    elif callable(getattr(seed, "random", None)):
        rng = seed  # a numpy Generator, drawn from as is
    else:
        raise TypeError(f"seed must be an int, None or a numpy.random.Generator, got {seed!r}")
    decoder = _Decoder(model, bool(use_cache))
    return _loop(model, decoder, chain, context, single, n_new, k, ends, stops, rng)


def _loop(
    model: Any, decoder: _Decoder, chain: Sampler, prompt: Any, single: bool, n_new: int, k: int,
    ends: frozenset[int], stops: tuple[tuple[int, ...], ...], rng: Any,
) -> Iterator[Any]:
    import numpy as np

    if n_new == 0:
        return
    backend, xp = model.backend, model.xp
    B, T0 = prompt.shape
    V = model.config.vocab_size
    context = np.empty((B, T0 + n_new), dtype=np.int64)  # host copy of every row's tokens
    context[:, :T0] = prompt
    length = T0
    done = np.zeros(B, dtype=bool)
    generated: list[list[int]] = [[] for _ in range(B)]
    logits = decoder.start(context[:, :length])  # (B, V)
    for step in range(n_new):
        coins = backend.asarray(rng.random(B))  # (B,) float64, drawn on the host
        probs = chain(logits)  # (B, V)
        tokens_dev = draw(probs, coins)  # (B,)
        tokens = np.asarray(to_numpy(tokens_dev), dtype=np.int64)
        bad = np.flatnonzero((tokens >= V) & ~done)
        if bad.size:
            raise ValueError(
                f"sampler {chain!r} left no token with positive probability in row {int(bad[0])} at step {step} "
                "(a filter removed every token, or the logits hold NaN)"
            )
        tokens[done] = 0  # stopped rows keep running in the batch; their tokens are discarded
        infos = _candidates(xp, logits, probs, tokens_dev, k) if k else None
        items: list[Any] = []
        for b in range(B):
            if done[b]:
                items.append(None)
                continue
            t = int(tokens[b])
            generated[b].append(t)
            items.append(infos[b] if infos is not None else t)
            if t in ends or any(len(generated[b]) >= len(s) and tuple(generated[b][-len(s) :]) == s for s in stops):
                done[b] = True
        context[:, length] = tokens
        length += 1
        yield items[0] if single else tuple(items)
        if done.all() or step == n_new - 1:
            return
        logits = decoder.step(context[:, :length])  # (B, V)


def _candidates(xp: Any, logits: Array, probs: Array, tokens: Array, k: int) -> list[Candidates]:
    model_probs = layers.softmax_forward(logits)  # (B, V), T = 1
    chosen = xp.reshape(xp.astype(tokens, xp.int64), (-1, 1))  # (B, 1)
    chosen = xp.where(chosen < probs.shape[-1], chosen, xp.zeros_like(chosen))
    p_model = to_numpy(xp.take_along_axis(model_probs, chosen, axis=-1))[:, 0]  # (B,)
    p_sampler = to_numpy(xp.take_along_axis(probs, chosen, axis=-1))[:, 0]  # (B,)
    m_ids, m_p = top_candidates(model_probs, k)  # (B, K)
    s_ids, s_p = top_candidates(probs, k)  # (B, K)
    chosen_host = to_numpy(chosen)[:, 0]  # (B,)
    out = []
    for b in range(probs.shape[0]):
        out.append(Candidates(
            token=int(chosen_host[b]), p_model=float(p_model[b]), p_sampler=float(p_sampler[b]),
            model=tuple((int(i), float(p)) for i, p in zip(m_ids[b], m_p[b])),
            sampler=tuple((int(i), float(p)) for i, p in zip(s_ids[b], s_p[b]) if p > 0),
        ))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# the ``arraygpt sample`` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``arraygpt sample``."""
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="an arraygpt training checkpoint or a Hugging Face GPT-2 directory")  # fmt: skip
    parser.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: the BOS token)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples to generate (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="M", help="tokens per sample (default 200)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, metavar="NAME[,NAME...]",
                        help="registered sampler(s), applied in order after the temperature "
                             "(built-in: greedy, temperature, top_k, top_p, min_p; `arraygpt plugins` lists all)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T",
                        help="softmax temperature T >= 0 (0 = greedy; no upper cap; default 1)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="top_k: keep the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="top_p: keep the smallest set of most likely tokens whose mass reaches P")  # fmt: skip
    parser.add_argument("--min-p", type=float, default=None, metavar="P",
                        help="min_p: keep tokens with probability >= P times the most likely one's")  # fmt: skip
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of a plugin's sampler (repeatable), e.g. --option epsilon=0.02")  # fmt: skip
    parser.add_argument("--show-probs", type=int, default=0, metavar="K",
                        help="for each token, print the K most likely candidates before and after the sampler")  # fmt: skip
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop a sample when it ends with TEXT (repeatable); BOS/EOS always stop")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling coins (default 1337)")
    parser.add_argument("--no-cache", dest="use_cache", action="store_false",
                        help="rerun the whole context for every token instead of using the KV cache")  # fmt: skip


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {name: getattr(args, name) for name in ("top_k", "top_p", "min_p") if getattr(args, name) is not None}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--option expects NAME=VALUE, got {item!r}")
        options[name.strip().replace("-", "_")] = _parse_value(value)
    return options


def load_for_sampling(directory: str) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, prefix) from an arraygpt training checkpoint or a Hugging Face GPT-2
    directory. ``prefix`` is what every training document started with: ``[bos_id]`` for a model
    trained on documents wrapped in BOS (microgpt's names), else empty; a prompt goes after it.

    A directory whose ``config.json`` carries no arraygpt marker and that holds
    ``model.safetensors`` is a Hugging Face GPT-2 (``GPT.from_pretrained`` and
    ``interop.load_tokenizer``); anything else goes to ``checkpoint.load_checkpoint``, which also
    accepts a training run's folder (its ``last/``) and says what is missing.
    """
    import json
    from pathlib import Path

    from arraygpt import checkpoint

    path = Path(directory)
    config_file = path / "config.json"
    if config_file.is_file() and (path / "model.safetensors").is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file} is not valid JSON: {e}") from None
        if isinstance(config, dict) and checkpoint.MARKER not in config:
            from arraygpt import interop
            from arraygpt.model import GPT

            return GPT.from_pretrained(str(path)), interop.load_tokenizer(str(path)), []
    loaded = checkpoint.load_checkpoint(path)
    if loaded.tokenizer is None:
        raise ValueError(f"checkpoint {directory} has no tokenizer.json, so its tokens cannot be turned into text")
    documents = loaded.extra.get("train_config", {}).get("mode") == "documents"
    bos = getattr(loaded.tokenizer, "bos_id", None)
    return loaded.model, loaded.tokenizer, [bos] if documents and bos is not None else []


class _TextStream:
    """Decode a growing list of ids and print only the new text, holding back an incomplete
    multi-byte character (a byte-level BPE token can end mid-character)."""

    def __init__(self, tokenizer: Any, out: Any):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def _label(tokenizer: Any, token: int, ends: Sequence[int]) -> str:
    """How --show-probs prints a token: its text quoted, or <end> for an end token (whose text is empty)."""
    return "<end>" if token in ends else repr(tokenizer.decode([token]))


def _show(tokenizer: Any, pairs: Sequence[tuple[int, float]], ends: Sequence[int]) -> str:
    return "  ".join(f"{_label(tokenizer, i, ends)} {p:.3f}" for i, p in pairs)


def run(args: argparse.Namespace) -> int:
    """``arraygpt sample``: load a checkpoint and print samples as they are generated."""
    options = _sampler_options(args)
    sampler = [s.strip() for s in args.sampler.split(",")] if "," in args.sampler else args.sampler.strip()
    check_number("--num-samples", args.num_samples, 1, integer=True)
    make_sampler(sampler, temperature=args.temperature, **options)  # report bad options before loading
    model, tokenizer, prefix = load_for_sampling(args.checkpoint)
    specials = [getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)]
    ends = sorted({int(i) for i in specials if i is not None})
    prompt = prefix + (list(tokenizer.encode(args.prompt)) if args.prompt else [])
    if not prompt:
        if not ends:
            raise ValueError("--prompt is empty and the tokenizer has no BOS token to start from; give --prompt")
        prompt = [getattr(tokenizer, "bos_id", None) if getattr(tokenizer, "bos_id", None) is not None else ends[0]]
    stop = [list(tokenizer.encode(s)) for s in args.stop]
    rng = host_rng(args.seed)
    out = sys.stdout
    for i in range(args.num_samples):
        if i:
            out.write("\n---------------\n")
        if not args.show_probs:
            out.write(args.prompt)
        stream = _TextStream(tokenizer, io.StringIO() if args.show_probs else out)
        steps = generate(model, prompt, args.max_new_tokens, sampler, temperature=args.temperature, seed=rng,
                         use_cache=args.use_cache, eos_id=ends, stop=stop or None, show_probs=args.show_probs,
                         **options)  # fmt: skip
        for item in steps:
            token = item.token if args.show_probs else item
            if args.show_probs:
                out.write(f"[{_label(tokenizer, token, ends)} p={item.p_sampler:.3f} (model {item.p_model:.3f})]"
                          f"  model: {_show(tokenizer, item.model, ends)}  |  sampler: {_show(tokenizer, item.sampler, ends)}\n")  # fmt: skip
                out.flush()
            if token in ends:
                break
            stream.push(token)
        if args.show_probs:
            out.write(f"=> {args.prompt}{stream.text()}")
    out.write("\n")
    out.flush()
    return 0
