"""Built-in samplers: greedy, temperature, top_k, top_p, min_p and repeat_penalty, registered
through the same ``arraygpt_register_samplers`` hook a third-party plugin uses.

Each name maps to a factory ``factory(*, option=...) -> filter`` (the contract is in
``arraygpt.generation.sampling``): the factory checks its options and returns a pure filter from (B, V)
probabilities, after the temperature, to (B, V) weights, zero for the tokens it removes. The
loop renormalizes and draws. ``repeat_penalty`` is a logits filter (``stage = "logits"``) that
reads the context: it runs on the logits, before the temperature. Everything here is array API
standard: no top-k in the standard, so the k-th largest value is found with ``sort`` and used as a
threshold; no scatter, so the tokens present in the context are found with ``searchsorted``.

Not here: the temperature itself (the loop applies softmax(logits / T) before every sampler)
and the random draw (the loop draws with pre-drawn coins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from arraygpt.generation.sampling import check_number, one_hot_argmax
from arraygpt.hookspecs import hookimpl
from arraygpt.xp import Array, namespace

# ----------------------------------------------------------------------------------------------
# filters: (B, V) probabilities -> (B, V) weights


def greedy_filter(probs: Array) -> Array:
    """Keep only the most likely token (the first one on a tie): argmax decoding."""
    return one_hot_argmax(probs)  # (B, V)


def top_k_filter(probs: Array, k: int) -> Array:
    """Keep the k most likely tokens: every p_i >= the k-th largest p (ties at it are kept too)."""
    xp = namespace(probs)
    if k >= probs.shape[-1]:
        return probs
    # values only, so stability is moot; NumPy's unstable sort is ~20x faster at V = 152k
    desc = xp.sort(probs, axis=-1, descending=True, stable=False)  # (B, V)
    kth = desc[..., k - 1 : k]  # (B, 1)
    return xp.where(probs >= kth, probs, xp.zeros_like(probs))


def top_p_filter(probs: Array, p: float) -> Array:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities sum to at least p. In descending order a token is kept when the mass strictly
    before it is < p; ties with the smallest kept probability are kept too."""
    xp = namespace(probs)
    if p >= 1.0:
        return probs
    # values only, so stability is moot; NumPy's unstable sort is ~20x faster at V = 152k
    desc = xp.sort(probs, axis=-1, descending=True, stable=False)  # (B, V)
    before = xp.cumulative_sum(desc, axis=-1, include_initial=True)[..., :-1]  # (B, V) mass before each
    kept = before < p  # a prefix, never empty: before[0] = 0 < p
    smallest = xp.min(xp.where(kept, desc, desc[..., :1]), axis=-1, keepdims=True)  # (B, 1)
    return xp.where(probs >= smallest, probs, xp.zeros_like(probs))


def min_p_filter(probs: Array, min_p: float) -> Array:
    """min-p sampling (Nguyen et al. 2024): keep tokens with p_i >= min_p * max_j p_j."""
    xp = namespace(probs)
    cutoff = min_p * xp.max(probs, axis=-1, keepdims=True)  # (B, 1)
    return xp.where(probs >= cutoff, probs, xp.zeros_like(probs))


def _present(context: Array, V: int) -> Array:
    """(B, T) token ids -> (B, V) bool: which tokens occur in each row (sorted row, searchsorted)."""
    xp = namespace(context)
    vocab = xp.arange(V, dtype=context.dtype, device=context.device)  # (V,)
    rows = []
    for b in range(context.shape[0]):
        seen = xp.sort(context[b, :], stable=False)  # (T,)
        at = xp.searchsorted(seen, vocab)  # (V,) where each id would go
        at = xp.minimum(at, xp.asarray(seen.shape[0] - 1, dtype=at.dtype, device=context.device))
        rows.append(xp.take(seen, at) == vocab)  # (V,)
    return xp.stack(rows)  # (B, V)


def repeat_penalty_filter(logits: Array, context: Array, penalty: float, last_n: int = -1) -> Array:
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers' RepetitionPenaltyLogitsProcessor
    and llama.cpp apply it: the logit z of every token present in the last ``last_n`` tokens of the
    context (all of them for -1) becomes z / penalty if z > 0, else z * penalty (once per token,
    however often it occurs)."""
    xp = namespace(logits)
    if last_n == 0 or context.shape[-1] == 0:
        return logits
    window = context[:, -min(last_n, context.shape[-1]) :] if last_n > 0 else context  # (B, T')
    present = _present(window, logits.shape[-1])  # (B, V)
    penalized = xp.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return xp.where(present, penalized, logits)


# ----------------------------------------------------------------------------------------------
# factories: check the options, return a filter


@dataclass(frozen=True)
class Greedy:
    """Always the most likely token (the same as temperature 0)."""

    def __call__(self, probs: Array) -> Array:
        return greedy_filter(probs)


@dataclass(frozen=True)
class Temperature:
    """Plain sampling from softmax(logits / T): the loop applies T, this keeps every token."""

    def __call__(self, probs: Array) -> Array:
        return probs


@dataclass(frozen=True)
class TopK:
    top_k: int

    def __call__(self, probs: Array) -> Array:
        return top_k_filter(probs, self.top_k)


@dataclass(frozen=True)
class TopP:
    top_p: float

    def __call__(self, probs: Array) -> Array:
        return top_p_filter(probs, self.top_p)


@dataclass(frozen=True)
class MinP:
    min_p: float

    def __call__(self, probs: Array) -> Array:
        return min_p_filter(probs, self.min_p)


@dataclass(frozen=True)
class RepeatPenalty:
    repeat_penalty: float
    repeat_last_n: int
    stage = "logits"  # runs on the logits, before the temperature (it needs their sign)

    def __call__(self, logits: Array, context: Array) -> Array:
        return repeat_penalty_filter(logits, context, self.repeat_penalty, self.repeat_last_n)


def greedy() -> Greedy:
    """``greedy``: no options."""
    return Greedy()


def temperature() -> Temperature:
    """``temperature``: no options of its own (``temperature=T`` is the loop's, for every sampler)."""
    return Temperature()


def top_k(*, top_k: int) -> TopK:
    """``top_k``: top_k, an integer >= 1 (larger than the vocabulary keeps every token)."""
    return TopK(check_number("top_k", top_k, 1, integer=True))


def top_p(*, top_p: float) -> TopP:
    """``top_p``: top_p, a number in (0, 1] (1 keeps every token)."""
    return TopP(check_number("top_p", top_p, 0.0, 1.0, low_open=True))


def min_p(*, min_p: float) -> MinP:
    """``min_p``: min_p, a number in [0, 1] (0 keeps every token, 1 only the most likely)."""
    return MinP(check_number("min_p", min_p, 0.0, 1.0))


def repeat_penalty(*, repeat_penalty: float, repeat_last_n: int = 64) -> RepeatPenalty:
    """``repeat_penalty``: repeat_penalty, a number > 0 (1 changes nothing, above 1 discourages
    repeats); repeat_last_n, how many of the last tokens count, an integer >= -1 (-1: the whole
    context, 0: none; default 64, as llama.cpp's)."""
    penalty = check_number("repeat_penalty", repeat_penalty, 0.0, low_open=True)
    if math.isinf(penalty):
        raise ValueError(f"repeat_penalty must be a finite number > 0, got {repeat_penalty!r}")
    return RepeatPenalty(penalty, check_number("repeat_last_n", repeat_last_n, -1, integer=True))


@hookimpl
def arraygpt_register_samplers() -> list[dict[str, Any]]:
    return [
        {
            "greedy": greedy,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "min_p": min_p,
            "repeat_penalty": repeat_penalty,
        }
    ]
