"""What the training tests share: made-up names to train on, and the parameters of a run compared."""

from __future__ import annotations

import numpy as np

from arraygpt.xp import to_numpy

SYLLABLES = ["an", "el", "ma", "ri", "jo", "sa", "li", "na", "ka", "th", "er", "on", "ia", "be", "da", "ly"]


def made_up_names(n: int, max_syllables: int, seed: int = 0) -> list[str]:
    """``n`` names of 1 to ``max_syllables - 1`` syllables, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(SYLLABLES, rng.integers(1, max_syllables))) for _ in range(n)]


def params_of(run_or_model) -> dict[str, np.ndarray]:
    """Host copies of a run's (or a model's) parameters."""
    model = getattr(run_or_model, "model", run_or_model)
    return {k: to_numpy(v).copy() for k, v in model.params.items()}


def max_rel_diff(a, b) -> float:
    """max |a - b| / max |b| over every array of two name -> array dicts."""
    scale = max(float(np.abs(v).max()) for v in b.values())
    return max(float(np.abs(a[k] - b[k]).max()) for k in b) / scale
