"""arraygpt: a GPT written once against the Python array API standard, with a hand-written
backward for every layer, NumPy on the CPU and CuPy on the GPU, and pluggy plugins for
backends, kernels, optimizers and samplers.

``import arraygpt`` is light: the model, training and generation modules load on first use, and
an array library loads when its backend is first used. ``dir(arraygpt)`` lists every public name.

Example:
    >>> import arraygpt
    >>> arraygpt.count_params(arraygpt.GPTConfig.preset("gpt2")).total
    124439808
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from arraygpt.errors import CheckpointError
from arraygpt.hookspecs import hookimpl
from arraygpt.shim import BackendUnavailable, get_backend, set_backend, use_backend

__version__ = "0.1.0"

# name -> the module that defines it, imported on first access
_LAZY = {
    "GPT": "arraygpt.model",
    "GPTConfig": "arraygpt.model",
    "KVCache": "arraygpt.model",
    "ParamCount": "arraygpt.model",
    "count_params": "arraygpt.model",
    "TrainConfig": "arraygpt.training",
    "Run": "arraygpt.training",
    "train": "arraygpt.training",
    "TrainingDiverged": "arraygpt.training",
    "DataError": "arraygpt.data",
    "generate": "arraygpt.generation",
    "make_sampler": "arraygpt.sampling",
    "load": "arraygpt.formats",
    "save": "arraygpt.formats",
    "PluginError": "arraygpt.manager",
    "explain": "arraygpt.viz",
}

__all__ = [
    # the model
    "GPT", "GPTConfig", "KVCache", "ParamCount", "count_params",
    # training and generation
    "TrainConfig", "Run", "train", "generate", "make_sampler",
    # one way to load, one way to save
    "load", "save",
    # seeing inside
    "explain",
    # errors
    "CheckpointError", "DataError", "TrainingDiverged", "PluginError", "BackendUnavailable",
    # plugins and backends
    "hookimpl", "get_backend", "set_backend", "use_backend",
]  # fmt: skip

if TYPE_CHECKING:
    from arraygpt.data import DataError
    from arraygpt.formats import load, save
    from arraygpt.generation import generate
    from arraygpt.manager import PluginError
    from arraygpt.model import GPT, GPTConfig, KVCache, ParamCount, count_params
    from arraygpt.sampling import make_sampler
    from arraygpt.training import Run, TrainConfig, TrainingDiverged, train
    from arraygpt.viz import explain


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'arraygpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
