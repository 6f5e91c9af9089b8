"""Epsilon sampling for arraygpt, as a third-party plugin: a worked example.

Epsilon sampling (Hewitt, Manning and Liang 2022, "Truncation Sampling as Language Model
Desmoothing") removes every token whose probability is below a fixed epsilon, and always keeps
the most likely token so that a row is never empty.

What makes this a sampler plugin:

1. ``arraygpt_register_samplers`` below, marked with ``@arraygpt.hookimpl``, returns
   ``[{"epsilon": factory}]``;
2. pyproject.toml names this module in the ``arraygpt`` entry-point group, so arraygpt's plugin
   manager registers it on start-up (unless ``ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD`` is set).

The factory takes the sampler's options as keyword arguments (here ``epsilon``), checks them
and returns a *filter*: a pure function from (B, V) probabilities (after the temperature) to
(B, V) non-negative weights, zero for the tokens it removes. It uses only the array API
standard, so it runs on every arraygpt backend. arraygpt renormalizes and draws.

Use it:

    arraygpt.generate(model, prompt, 100, "epsilon", epsilon=0.02, seed=0)
    arraygpt sample --checkpoint DIR --sampler epsilon --option epsilon=0.02
"""

from __future__ import annotations

from typing import Any

import arraygpt
from arraygpt.generation.generation import check_number
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


@arraygpt.hookimpl
def arraygpt_register_samplers() -> list[dict[str, Any]]:
    return [{"epsilon": epsilon}]
