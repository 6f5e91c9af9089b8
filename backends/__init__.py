"""Built-in backends, registered through the same plugin hook a third-party backend uses.

Each module defines the fields of :class:`arraygpt.xp.Backend`: the array namespace plus what
the array API standard lacks. Importing this package imports no array library; a backend's
module is imported when the backend is first loaded.

The numpy backend's fused kernels (``numpy/kernels/``, one family per module) are offered the
same way, through ``arraygpt_register_kernels``. Registering them imports their modules and so
the numpy backend's module, whose package holds them (NumPy is imported by then anyway); numba is
imported only when a model first selects one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from arraygpt.hookspecs import hookimpl
from arraygpt.xp import Backend

BUILTIN_BACKENDS = ("numpy", "array_api_strict", "cupy", "torch")


def _loader(name: str) -> Callable[[], Backend]:
    def load() -> Backend:
        return Backend.from_module(importlib.import_module(f"arraygpt.backends.{name}"))

    load.__doc__ = f"Import arraygpt.backends.{name} and build its Backend."
    return load


@hookimpl
def arraygpt_register_backends() -> list[dict[str, Callable[[], Backend]]]:
    return [{name: _loader(name) for name in BUILTIN_BACKENDS}]


@hookimpl
def arraygpt_register_kernels() -> list[dict[str, object]]:
    from arraygpt.backends.numpy.kernels import KERNELS

    return [KERNELS]
