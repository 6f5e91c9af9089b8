"""arraygpt: a GPT written once against the Python array API standard, with a hand-written
backward for every layer, NumPy on the CPU and CuPy on the GPU, and pluggy plugins for
backends, optimizers and samplers.

``import arraygpt`` is light: the model, training and generation modules load on first use, and
an array library loads when its backend is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from arraygpt.hookspecs import hookimpl
from arraygpt.shim import BackendUnavailable, get_backend, set_backend, use_backend

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "ParamCount",
    "BackendUnavailable",
    "count_params",
    "get_backend",
    "hookimpl",
    "set_backend",
    "use_backend",
    "train",
    "generate",
]

_LAZY = {
    "GPT": "arraygpt.model",
    "GPTConfig": "arraygpt.model",
    "KVCache": "arraygpt.model",
    "ParamCount": "arraygpt.model",
    "count_params": "arraygpt.model",
    "train": "arraygpt.training",
    "generate": "arraygpt.generation",
}

if TYPE_CHECKING:
    from arraygpt.model import GPT, GPTConfig, KVCache, ParamCount, count_params


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'arraygpt' has no attribute {name!r}")
