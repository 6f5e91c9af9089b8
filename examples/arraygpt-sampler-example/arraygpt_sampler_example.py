"""Epsilon sampling and tabu sampling for arraygpt, as a third-party plugin: a worked example.

Epsilon sampling (Hewitt, Manning and Liang 2022, "Truncation Sampling as Language Model
Desmoothing") removes every token whose probability is below a fixed epsilon, and always keeps
the most likely token so that a row is never empty. Tabu sampling shows a filter that reads the
context: it removes every token among the last ``tabu`` tokens (the prompt and what was
generated), unless that would leave a row empty.

What makes this a sampler plugin:

1. ``arraygpt_register_samplers`` below, marked with ``@arraygpt.hookimpl``, returns
   ``[{"epsilon": factory, "tabu": factory}]``;
2. pyproject.toml names this module in the ``arraygpt`` entry-point group, so arraygpt's plugin
   manager registers it on start-up (unless ``ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD`` is set).

The factory takes the sampler's options as keyword arguments (here ``epsilon``), checks them
and returns a *filter*: a pure function from (B, V) probabilities (after the temperature) to
(B, V) non-negative weights, zero for the tokens it removes. It uses only the array API
standard, so it runs on every arraygpt backend. arraygpt renormalizes and draws, and checks what
a filter returns (one weight per token, none negative). A filter that declares a keyword
parameter ``context`` is also given the (B, T) token ids so far, read-only.

Use it (an option named like its sampler turns the sampler on):

    arraygpt.generate(model, prompt, 100, epsilon=0.02, tabu=8, seed=0)
    arraygpt sample --checkpoint DIR --option epsilon=0.02 --option tabu=8
"""

from __future__ import annotations

from typing import Any

import arraygpt
from arraygpt.generation.sampling import check_number
from arraygpt.xp import namespace


def epsilon_filter(probs: Any, epsilon: float) -> Any:
    """Keep tokens with p >= epsilon, and the most likely token of each row."""
    xp = namespace(probs)
    top = xp.max(probs, axis=-1, keepdims=True)  # (B, 1)
    keep = (probs >= epsilon) | (probs >= top)  # (B, V)
    return xp.where(keep, probs, xp.zeros_like(probs))


class Epsilon:
    """The filter object; a frozen option and a ``__call__``."""

    def __init__(self, epsilon: float):
        self.epsilon = epsilon

    def __repr__(self) -> str:
        return f"Epsilon(epsilon={self.epsilon:g})"

    def __call__(self, probs: Any) -> Any:
        return epsilon_filter(probs, self.epsilon)


def epsilon(*, epsilon: float) -> Epsilon:
    """``epsilon``: a number in [0, 1) (0 keeps every token)."""
    return Epsilon(check_number("epsilon", epsilon, 0.0, 1.0, high_open=True))


def tabu_filter(probs: Any, context: Any, window: int) -> Any:
    """Remove the tokens among the last ``window`` of the context; keep a row that would be empty."""
    xp = namespace(probs)
    recent = context[:, -min(window, context.shape[-1]) :]  # (B, W)
    vocab = xp.arange(probs.shape[-1], dtype=recent.dtype, device=probs.device)  # (V,)
    seen = xp.any(recent[:, :, None] == vocab[None, None, :], axis=1)  # (B, V)
    kept = xp.where(seen, xp.zeros_like(probs), probs)  # (B, V)
    empty = xp.sum(kept, axis=-1, keepdims=True) == 0  # (B, 1)
    return xp.where(empty, probs, kept)


class Tabu:
    """A filter that reads the context: ``__call__`` takes ``context`` as a keyword."""

    def __init__(self, window: int):
        self.window = window

    def __repr__(self) -> str:
        return f"Tabu(window={self.window})"

    def __call__(self, probs: Any, context: Any) -> Any:
        return tabu_filter(probs, context, self.window)


def tabu(*, tabu: int) -> Tabu:
    """``tabu``: how many of the last tokens may not come again, an integer >= 1."""
    return Tabu(check_number("tabu", tabu, 1, integer=True))


@arraygpt.hookimpl
def arraygpt_register_samplers() -> list[dict[str, Any]]:
    return [{"epsilon": epsilon, "tabu": tabu}]
