"""Generation: the predict-sample-append loop, with or without the KV cache.

A GPT makes text one token at a time: predict the distribution of the next token, sample from
it, append the sample, repeat. ``generate`` runs that loop and yields each new token as soon as
it is drawn (streaming), for one prompt or for a batch of equal-length prompts together. Each
step turns the (B, V) logits into a distribution with a :class:`~arraygpt.generation.sampling.Sampler`
(temperature, then the sampler plugins' filters) and draws one token per row with a coin drawn
on the host (``shim.host_rng``), so one seed gives the same tokens on every backend.

The sampler contract, the pipeline and their helpers (``make_sampler``, ``check_number``,
``draw``, ...) live in ``arraygpt.generation.sampling``. The loop's pieces (:class:`Decoder`,
:func:`sample_loop`, :func:`make_rng`, :func:`stop_sequences`, :func:`end_id_set`,
:func:`tokenizer_vocab`) also run a chat's replies (``arraygpt.generation.chat``).

Not here: the model (``model.py``), the samplers (``arraygpt.generation.sampling``,
``arraygpt.plugins.samplers``), checkpoint formats (``arraygpt.io.checkpoint``, ``arraygpt.io.hf``)
and the ``arraygpt sample`` command (``arraygpt.cli.sample``).

Shape legend: B batch (sequences generated together), T positions, V vocabulary, K candidates.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arraygpt.generation.sampling import (
    Filter,
    Sampler,
    check_number,
    draw,
    make_sampler,
    normalize,
    top_candidates,
    with_generation_config,
)
from arraygpt.generation.text import StopText, TextStream, encode_prompt, end_ids
from arraygpt.nn import layers
from arraygpt.xp import Array, host_rng, to_numpy

if TYPE_CHECKING:
    import numpy as np

__all__ = ["Candidates", "generate", "generation_config", "resolve_model"]


# ----------------------------------------------------------------------------------------------
# the decoders: the model's next-token logits, with or without the KV cache


class Decoder:
    """Next-token logits (B, V) for a growing context, by full recompute of the last block_size
    tokens (``use_cache=False``), or with a KV cache (one new position per step).

    With learned absolute positions, a token's keys and values depend on its position, so once
    the context outgrows block_size and the window slides by one, every cached key is stale: the
    cache is then rebuilt from the cropped window (one forward over block_size positions), which
    is exactly the full recompute of that window.
    """

    def __init__(self, model: Any, use_cache: bool, cache: Any = None):
        from arraygpt.nn.core import KVCache

        self.model = model
        self.use_cache = use_cache or cache is not None
        self.block_size = model.config.block_size
        self._new_cache = lambda: KVCache(model.config)
        self.cache = cache  # a cache whose positions continue the context (a chat), or None
        self.forwards = 0  # number of model forwards (for tests and benchmarks)
        self.positions = 0  # positions fed to the model in all
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
        self.positions += tokens.shape[1]
        return logits[:, -1, :]  # (B, V)

    def start(self, context: Any) -> Array:
        """The first logits, from the whole prompt (B, T) (cropped to the last block_size). A
        cache given to the constructor already holds context[:, :cache.length]: only the rest is fed."""
        if self.cache is not None:
            if not 0 <= self.cache.length < context.shape[1] <= self.block_size:
                raise ValueError(
                    f"the context ({context.shape[1]} tokens) must extend the {self.cache.length} cached positions "
                    f"and fit the model's block_size ({self.block_size})"
                )
            return self._forward(context[:, self.cache.length :], self.cache)
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
                raise ValueError(
                    f"the prompts of a batch must have equal lengths in tokens, got lengths {sorted(lengths)}"
                )
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


def end_id_set(eos_id: Any) -> frozenset[int]:
    if eos_id is None:
        return frozenset()
    ids = [eos_id] if isinstance(eos_id, numbers.Integral) else list(eos_id)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids):
        raise TypeError(f"eos_id must be a token id or a collection of token ids, got {eos_id!r}")
    return frozenset(int(i) for i in ids if i is not None)


def stop_sequences(stop: Any) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """(the token id sequences, the texts) of ``stop``."""
    if stop is None:
        return (), ()
    seqs, texts = [], []
    for s in stop:
        if isinstance(s, str) and s:
            texts.append(s)
            continue
        if isinstance(s, (numbers.Integral, str)) or not all(isinstance(i, numbers.Integral) for i in s) or len(s) == 0:
            raise TypeError(
                f"stop must be a list of non-empty token id sequences, e.g. [[13, 13]] (or of texts, with a "
                f"tokenizer), got {stop!r}"
            )
        seqs.append(tuple(int(i) for i in s))
    return tuple(seqs), tuple(texts)


def text_stops(tokenizer: Any, context: Any, texts: tuple[str, ...]) -> Callable[[int, int], bool] | None:
    """For :func:`sample_loop`: whether row b's text, after its prompt ``context`` (B, T), reached
    one of ``texts`` with token t (None without texts)."""
    if not texts:
        return None
    streams = [TextStream(tokenizer, row.tolist()) for row in context]
    finders = [StopText(texts) for _ in streams]
    return lambda b, t: finders[b].push(streams[b].push(t))[1]


def _is_text(prompt: Any) -> bool:
    return isinstance(prompt, str) or (
        isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(p, str) for p in prompt)
    )


def resolve_model(model: Any, tokenizer: Any = None) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, prompt prefix) from a GPT or a loaded checkpoint (``arraygpt.load``):
    a checkpoint brings its own tokenizer (unless ``tokenizer`` is given) and prompt prefix.

    Raises:
        TypeError: ``model`` is neither.
    """
    if _is_checkpoint(model):
        prefix = [int(i) for i in getattr(model, "prompt_prefix", ()) or ()]
        return model.model, tokenizer if tokenizer is not None else model.tokenizer, prefix
    if not callable(getattr(model, "forward", None)) or not hasattr(model, "config"):
        raise TypeError(
            f"model must be an arraygpt GPT or a loaded checkpoint (arraygpt.load(path)), got {type(model).__name__}"
        )
    return model, tokenizer, []


def _is_checkpoint(model: Any) -> bool:
    return not callable(getattr(model, "forward", None)) and hasattr(model, "model") and hasattr(model, "tokenizer")


def generation_config(model: Any) -> dict[str, Any]:
    """The sampling defaults a model brings: a checkpoint's ``generation_config`` (its
    ``generation_config.json``), else none."""
    return dict(getattr(model, "generation_config", None) or {}) if _is_checkpoint(model) else {}


def generate(
    model: Any,
    prompt: Any,
    max_new_tokens: int,
    sampler: str | Sequence[str] | Filter | None = None,
    *,
    tokenizer: Any = None,
    temperature: float | None = None,
    seed: int | np.random.Generator | None = None,
    use_cache: bool = True,
    eos_id: int | Iterable[int] | None = None,
    stop: Sequence[Sequence[int] | str] | None = None,
    show_probs: int = 0,
    **sampler_options: Any,
) -> Iterator[Any]:
    """Generate tokens after ``prompt``, yielding each one as soon as it is drawn.

    Args:
        model: an ``arraygpt.GPT`` (any backend, any dtype), or a checkpoint from
            ``arraygpt.load(path)``, whose tokenizer and prompt prefix are then used.
        prompt: text (a str, or a list of str for a batch; needs a tokenizer), or token ids: one
            sequence (T,) or a batch of equal-length sequences (B, T), as lists, a NumPy array or a
            backend array. Longer than block_size: the last block_size.
        max_new_tokens: the most tokens to generate per sequence (>= 0).
        sampler: a sampler name, a list of names that compose in order, or a filter function
            (see ``arraygpt.generation.sampling``); default ``temperature`` (plain softmax sampling).
            A sampler option named like a sampler turns it on (``top_k=40`` alone is top-k).
            What ``sampler``, ``temperature`` and the sampler options leave unchosen, a checkpoint's
            ``generation_config.json`` fills in as transformers does (``do_sample: false`` is greedy;
            its temperature, top_k, top_p, min_p, repetition_penalty; see
            ``arraygpt.generation.sampling.with_generation_config``).
        tokenizer: the model's tokenizer: encodes a text prompt and text ``stop`` sequences,
            decodes the text that is yielded, supplies the default end tokens, and limits the
            draw to its vocabulary (a model whose vocabulary is padded past the tokenizer's never
            draws a padding id). Default: the checkpoint's, when ``model`` is one.
        temperature: T of softmax(logits / T), applied before every probability filter; 0 means
            greedy. Default: the checkpoint's generation_config.json, else 1.0.
        seed: seed of the host generator of the coins (one per sequence per step), or a NumPy
            ``Generator`` to draw from; None draws a fresh seed. One seed gives the same tokens on
            every backend.
        use_cache: keep each layer's keys and values (one position of work per token). False
            reruns the whole context each step (for checks and benchmarks); the tokens are the same.
        eos_id: end token(s): a sequence stops after generating one. Default: with a tokenizer,
            its end tokens (``stop_ids``, BOS, EOS); else none (pass ``()`` for none with a tokenizer).
        stop: stop sequences of token ids: a sequence stops once its generated tokens end with
            one; or texts (with a tokenizer): a sequence stops at the token whose text completes
            one, however the tokens split it (transformers' ``StopStringCriteria``).
        show_probs: K > 0 yields :class:`Candidates` (the token and the K most likely candidates
            before and after the sampler) instead of bare token ids or text.
        **sampler_options: options of the chosen samplers, e.g. ``top_k=40``, ``top_p=0.9``,
            ``repeat_penalty=1.1``.

    Returns:
        An iterator. For a text prompt: the new text, in pieces that never split a character (an
        end token is not part of it); for a batch of texts, one tuple per step with a piece per
        row ("" while a character is incomplete, None once the row has stopped), and a last tuple
        with what was held back. For token ids, one item per step: for a single sequence the token
        id (an int), or a :class:`Candidates` with ``show_probs``; for a batch a tuple with one
        such item per row, ``None`` for a row that has already stopped. The end token or the last
        token of a stop sequence is yielded, then that row stops; the iterator ends when every row
        has stopped or after ``max_new_tokens`` steps. Arguments are checked when ``generate`` is
        called, before the first token.

    Raises:
        TypeError: a text prompt without a tokenizer, or a model that is neither a GPT nor a checkpoint.
        ValueError: invalid options (see :func:`make_sampler`), prompt or counts; while iterating,
            logits that hold NaN or inf (naming the step), or a sampler that left no token.

    Memory follows what is generated: a huge ``max_new_tokens`` for a model that stops at an end
    token allocates nothing large (the host copy of the tokens grows as they come).

    Example:
        >>> from arraygpt import GPT, GPTConfig
        >>> model = GPT(GPTConfig.preset("microgpt"), seed=0)
        >>> tokens = list(generate(model, [0, 5, 3], 5, "top_p", top_p=0.9, temperature=0.8, seed=1))
        >>> len(tokens), all(0 <= t < model.config.vocab_size for t in tokens)
        (5, True)
    """
    config = generation_config(model)
    model, tokenizer, prefix = resolve_model(model, tokenizer)
    sampler, temperature, sampler_options = with_generation_config(config, sampler, temperature, sampler_options)
    chain = make_sampler(sampler, temperature=temperature, **sampler_options)
    text = _is_text(prompt)
    if text:
        if tokenizer is None:
            raise TypeError(
                "a text prompt needs the model's tokenizer: pass tokenizer=..., or pass the checkpoint from "
                "arraygpt.load(path) as the model (or pass token ids)"
            )
        rows = [prompt] if isinstance(prompt, str) else list(prompt)
        encoded = [encode_prompt(tokenizer, r, prefix) for r in rows]
        prompt = encoded[0] if isinstance(prompt, str) else encoded
    context, single = _prompt_array(prompt)
    low, high, V = int(context.min()), int(context.max()), model.config.vocab_size
    if low < 0 or high >= V:
        raise ValueError(f"prompt holds token id {low if low < 0 else high}; allowed: 0 <= id < vocab_size ({V})")
    n_new = check_number("max_new_tokens", max_new_tokens, 0, integer=True)
    k = check_number("show_probs", show_probs, 0, integer=True)
    if eos_id is None and tokenizer is not None:
        eos_id = end_ids(tokenizer)
    ends = end_id_set(eos_id)
    stops, texts = stop_sequences(stop)
    if texts and tokenizer is None:
        raise TypeError(f"text stop sequences need the model's tokenizer (tokenizer=...), got {stop!r}")
    rng = make_rng(seed)
    n_valid = tokenizer_vocab(model, tokenizer)
    decoder = Decoder(model, bool(use_cache))
    stopped = text_stops(tokenizer, context, texts)
    steps = sample_loop(model, decoder, chain, context, single, n_new, k, ends, stops, rng, n_valid, stopped)
    if not text or k:
        return steps
    return _as_text(steps, tokenizer, context, single, ends)


def make_rng(seed: Any) -> Any:
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and seed >= 0):
        return host_rng(seed)
    if callable(getattr(seed, "random", None)):
        return seed  # a numpy Generator, drawn from as is
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    raise TypeError(f"seed must be an int, None or a numpy.random.Generator, got {seed!r}")


def tokenizer_vocab(model: Any, tokenizer: Any) -> int | None:
    """How many leading ids of the model's vocabulary the tokenizer has, when it has fewer
    (Qwen2.5 ships 151,936 rows for 151,665 tokens): the rest are never drawn."""
    n = getattr(tokenizer, "vocab_size", None)
    V = model.config.vocab_size
    return int(n) if isinstance(n, numbers.Integral) and 0 < n < V else None


def _as_text(steps: Iterator[Any], tokenizer: Any, context: Any, single: bool, ends: frozenset[int]) -> Iterator[Any]:
    """Token ids -> text pieces (one stream per row; end tokens are not text)."""
    streams = [TextStream(tokenizer, row.tolist()) for row in context]
    for item in steps:
        row_items = (item,) if single else item
        pieces = tuple(
            None if t is None else "" if t in ends else stream.push(t) for stream, t in zip(streams, row_items)
        )
        if single:
            if pieces[0]:
                yield pieces[0]
        else:
            yield pieces
    rest = tuple(stream.finish() for stream in streams)
    if single:
        if rest[0]:
            yield rest[0]
    elif any(rest):
        yield rest


def sample_loop(
    model: Any,
    decoder: Decoder,
    chain: Sampler,
    prompt: Any,
    single: bool,
    n_new: int,
    k: int,
    ends: frozenset[int],
    stops: tuple[tuple[int, ...], ...],
    rng: Any,
    n_valid: int | None = None,
    stop_text: Callable[[int, int], bool] | None = None,
) -> Iterator[Any]:
    """Draw up to ``n_new`` tokens per row of ``prompt`` (B, T); a row stops at a token of
    ``ends``, once its tokens end with one of ``stops``, or when ``stop_text(row, token)`` says
    its text reached a stop string (:func:`text_stops`)."""
    import numpy as np

    if n_new == 0:
        return
    backend, xp = model.backend, model.xp
    B, T0 = prompt.shape
    V = model.config.vocab_size
    # host copy of every row's tokens, grown by doubling: memory follows what is generated, not
    # max_new_tokens (which may be huge for a model that stops at an end token)
    context = np.empty((B, T0 + min(n_new, _FIRST_GROWTH)), dtype=np.int64)  # (B, capacity)
    context[:, :T0] = prompt
    length = T0
    done = np.zeros(B, dtype=bool)
    generated: list[list[int]] = [[] for _ in range(B)]
    logits = decoder.start(context[:, :length])  # (B, V)
    keep = None
    if n_valid is not None:  # ids past the tokenizer's vocabulary (padding rows) get logit -inf, probability 0
        keep = xp.arange(V, device=logits.device) < n_valid  # (V,)
        masked = xp.full((V,), -math.inf, dtype=logits.dtype, device=logits.device)  # (V,)
    for step in range(n_new):
        _check_finite(xp, logits, step)
        if keep is not None:
            logits = xp.where(keep, logits, masked)  # (B, V)
        coins = backend.asarray(rng.random(B))  # (B,) float64, drawn on the host
        seen = backend.asarray(context[:, :length]) if chain.reads_context else None  # (B, T)
        probs = chain(logits, seen)  # (B, V)
        if keep is not None:  # nor may a filter give them weight
            probs = normalize(xp.where(keep, probs, xp.zeros_like(probs)))  # (B, V)
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
            elif stop_text is not None and stop_text(b, t):
                done[b] = True
        if length == context.shape[1]:
            grown = np.empty((B, T0 + min(n_new, 2 * (length - T0))), dtype=np.int64)  # (B, new capacity)
            grown[:, :length] = context
            context = grown
        context[:, length] = tokens
        length += 1
        yield items[0] if single else tuple(items)
        if done.all() or step == n_new - 1:
            return
        logits = decoder.step(context[:, :length])  # (B, V)


_FIRST_GROWTH = 256  # new tokens the host context first has room for; it doubles when full


def _check_finite(xp: Any, logits: Array, step: int) -> None:
    """Refuse logits that hold NaN or inf: no sampler can draw a meaningful token from them (greedy
    would silently pick an arbitrary one)."""
    finite = xp.isfinite(logits)  # (B, V)
    if bool(xp.all(finite)):
        return
    rows = to_numpy(xp.all(finite, axis=-1))  # (B,)
    row = int(rows.tolist().index(False))
    raise ValueError(
        f"the model's logits hold NaN or inf at step {step} (row {row}), so no token can be drawn: its weights "
        "hold NaN or inf, or overflow in this dtype (check the checkpoint, or load it in float64)"
    )


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
        out.append(
            Candidates(
                token=int(chosen_host[b]),
                p_model=float(p_model[b]),
                p_sampler=float(p_sampler[b]),
                model=tuple((int(i), float(p)) for i, p in zip(m_ids[b], m_p[b])),
                sampler=tuple((int(i), float(p)) for i, p in zip(s_ids[b], s_p[b]) if p > 0),
            )
        )
    return out
