"""Built-in samplers: greedy, temperature, top_k, top_p and min_p, registered through the same
``arraygpt_register_samplers`` hook a third-party plugin uses.

Each name maps to a factory ``factory(*, option=...) -> filter`` (the contract is in
``arraygpt.generation.sampling``): the factory checks its options and returns a pure filter from (B, V)
probabilities, after the temperature, to (B, V) weights, zero for the tokens it removes. The
loop renormalizes and draws. Everything here is array API standard: no top-k in the standard,
so the k-th largest value is found with ``sort`` and used as a threshold.

Not here: the temperature itself (the loop applies softmax(logits / T) before every sampler)
and the random draw (the loop draws with pre-drawn coins).
"""

from __future__ import annotations

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
    desc = xp.sort(probs, axis=-1, descending=True)  # (B, V)
    kth = desc[..., k - 1 : k]  # (B, 1)
    return xp.where(probs >= kth, probs, xp.zeros_like(probs))


def top_p_filter(probs: Array, p: float) -> Array:
    """Nucleus sampling (Holtzman et al. 2019): keep the smallest set of most likely tokens whose
    probabilities sum to at least p. In descending order a token is kept when the mass strictly
    before it is < p; ties with the smallest kept probability are kept too."""
    xp = namespace(probs)
    if p >= 1.0:
        return probs
    desc = xp.sort(probs, axis=-1, descending=True)  # (B, V)
    before = xp.cumulative_sum(desc, axis=-1, include_initial=True)[..., :-1]  # (B, V) mass before each
    kept = before < p  # a prefix, never empty: before[0] = 0 < p
    smallest = xp.min(xp.where(kept, desc, desc[..., :1]), axis=-1, keepdims=True)  # (B, 1)
    return xp.where(probs >= smallest, probs, xp.zeros_like(probs))


def min_p_filter(probs: Array, min_p: float) -> Array:
    """min-p sampling (Nguyen et al. 2024): keep tokens with p_i >= min_p * max_j p_j."""
    xp = namespace(probs)
    cutoff = min_p * xp.max(probs, axis=-1, keepdims=True)  # (B, 1)
    return xp.where(probs >= cutoff, probs, xp.zeros_like(probs))


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


@hookimpl
def arraygpt_register_samplers() -> list[dict[str, Any]]:
    return [{"greedy": greedy, "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}]
