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
import os
from typing import TYPE_CHECKING, Any

# NumPy's OpenBLAS keeps its idle threads spinning for 2^28 cycles (about 0.1 s) after each call;
# beside numba's threads (a quantized model's products) that halved a 2-thread prompt's speed.
# 2^16 cycles still keeps back-to-back calls warm. Read when NumPy loads: where it is loaded
# already, this does nothing (docs/kernels.md, "Threads").
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")

from arraygpt.errors import BackendUnavailable, CheckpointError, PluginError
from arraygpt.hookspecs import hookimpl
from arraygpt.xp import get_backend, set_backend, use_backend

__version__ = "0.1.0"

# name -> the module that defines it, imported on first access
_LAZY = {
    "GPT": "arraygpt.nn.model",
    "GPTConfig": "arraygpt.config",
    "KVCache": "arraygpt.nn.core",
    "ParamCount": "arraygpt.nn.params",
    "count_params": "arraygpt.nn.params",
    "TrainConfig": "arraygpt.training.config",
    "Run": "arraygpt.training.run",
    "train": "arraygpt.training.loop",
    "TrainingDiverged": "arraygpt.errors",
    "DataError": "arraygpt.errors",
    "evaluate": "arraygpt.training.evaluate",
    "generate": "arraygpt.generation.generation",
    "make_sampler": "arraygpt.generation.sampling",
    "load": "arraygpt.io.formats",
    "save": "arraygpt.io.formats",
    "explain": "arraygpt.viz",
    "Chat": "arraygpt.generation.chat",
}

__all__ = [
    # the model
    "GPT",
    "GPTConfig",
    "KVCache",
    "ParamCount",
    "count_params",
    # training and generation
    "TrainConfig",
    "Run",
    "train",
    "evaluate",
    "generate",
    "make_sampler",
    "Chat",
    # one way to load, one way to save
    "load",
    "save",
    # seeing inside
    "explain",
    # errors
    "CheckpointError",
    "DataError",
    "TrainingDiverged",
    "PluginError",
    "BackendUnavailable",
    # plugins and backends
    "hookimpl",
    "get_backend",
    "set_backend",
    "use_backend",
]

if TYPE_CHECKING:
    from arraygpt.config import GPTConfig
    from arraygpt.errors import DataError, TrainingDiverged
    from arraygpt.generation.generation import generate
    from arraygpt.generation.sampling import make_sampler
    from arraygpt.io.formats import load, save
    from arraygpt.nn.core import KVCache
    from arraygpt.nn.model import GPT
    from arraygpt.nn.params import ParamCount, count_params
    from arraygpt.training.config import TrainConfig
    from arraygpt.training.evaluate import evaluate
    from arraygpt.training.loop import train
    from arraygpt.training.run import Run
    from arraygpt.viz.page import explain


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'arraygpt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
