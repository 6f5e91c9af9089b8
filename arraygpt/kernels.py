"""Choosing the forward/backward pair each layer runs: the reference of ``layers.py``, or a
backend's fused kernel that must equal it.

Not here: the kernels themselves (``arraygpt.backends``), the math (``layers.py``, ``core.py``).
"""

from __future__ import annotations

from typing import Any

from arraygpt import core

ENV_VAR = "ARRAYGPT_KERNELS"


def select_kernels(config: Any, backend: Any, dtype: str, choice: core.Kernels | str | None = None) -> core.Kernels:
    """The :class:`arraygpt.core.Kernels` a model of ``config`` on ``backend`` in ``dtype`` runs.

    ``choice`` None or ``"reference"``: the reference pairs of ``layers.py``; a Kernels record is
    used as is.
    """
    if choice is None or choice == "reference":
        return core.reference_kernels(config)
    if isinstance(choice, core.Kernels):
        return choice
    raise ValueError(f"kernels must be None, 'reference' or an arraygpt.core.Kernels, got {choice!r}")
