"""Backend selection and the array-namespace helpers: the only module that knows backends exist.

A *backend* decides where new arrays are created (parameter init, data batches, dropout masks,
sampling coins). Layer code never asks which backend is active: it takes the array namespace
of its inputs (``namespace(x)``), so NumPy, CuPy and array-api-strict arrays can live side by
side in one process. What the array API standard lacks (scatter-add, host transfer,
synchronization) is a small function on the backend that owns the array.

Not here: model math (``layers.py``), the backends themselves (``arraygpt.backends``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from arraygpt.errors import BackendUnavailable, PluginError

# An array of whichever backend (NumPy, CuPy, array-api-strict, ...): the standard has no static
# array type, so this alias only documents intent. The one alias every module imports.
Array = Any

ENV_VAR = "ARRAYGPT_BACKEND"
DEFAULT_BACKEND = "numpy"


@dataclass(frozen=True)
class Backend:
    """An array namespace plus the few things the array API standard lacks.

    Attributes:
        name: the registered name (``numpy``, ``cupy``, ``array_api_strict``, ...).
        xp: the array-API namespace (array-api-compat's wrapper where one is needed).
        array_type: the concrete array class, used to find the backend that owns an array.
        device: the device new arrays are created on.
        asarray: host NumPy array -> backend array on ``device``.
        to_numpy: backend array -> host NumPy array.
        scatter_add: ``target[indices] += values`` along axis 0, duplicates accumulated; in place.
        synchronize: wait until queued device work is done (a no-op on the CPU).
        device_uniform: optional ``(seed, shape, dtype) -> array`` of uniform [0, 1) numbers made
            on the device; without it :meth:`uniform` draws on the host and copies.
        threads: optional; how many host threads a model may split a batch across (default 1).
            A CPU backend whose elementwise operations run on one core gains from more.
        blas_threads: optional ``(n) -> context manager`` that limits the BLAS library to ``n``
            threads inside the block, so that threads splitting a batch do not oversubscribe
            the cores with BLAS's own threads.
    """

    name: str
    xp: Any
    array_type: type
    device: Any
    asarray: Callable[[Any], Any]
    to_numpy: Callable[[Any], Any]
    scatter_add: Callable[[Any, Any, Any], None]
    synchronize: Callable[[], None]
    device_uniform: Callable[[int, tuple[int, ...], str], Any] | None = None
    threads: int = 1
    blas_threads: Callable[[int], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    @classmethod
    def from_module(cls, module: ModuleType) -> Backend:
        """Build a backend from a module that defines the fields above as globals or functions
        (the optional ones may be left out)."""
        optional = {"device_uniform", "threads", "blas_threads"}
        fields = [f for f in cls.__dataclass_fields__ if f not in optional or hasattr(module, f)]
        return cls(**{name: getattr(module, name) for name in fields})

    def uniform(self, rng: Any, shape: tuple[int, ...], dtype: str) -> Any:
        """Uniform [0, 1) numbers of ``shape`` (dropout coins), driven by the host generator ``rng``.

        The host generator stays the one source of randomness (its state is what checkpoints
        save). A GPU backend takes one seed from it and draws on the device, because copying
        the coins of attention dropout (B·NH·T·T per layer) from the host would dominate a step.
        """
        if self.device_uniform is None:
            return self.asarray(rng.random(shape, dtype=dtype))
        return self.device_uniform(int(rng.integers(2**63)), shape, dtype)


_active: Backend | None = None
_loaded: dict[str, Backend] = {}


def backend_factories() -> dict[str, Callable[[], Backend]]:
    """Registered backend names -> factories, from the plugin manager."""
    from arraygpt.manager import registry

    return registry("backends")


def load_backend(name: str) -> Backend:
    """The backend registered as ``name``, loading it on first use.

    Raises:
        ValueError: ``name`` is not registered; the message lists the registered names.
        BackendUnavailable: it is registered but its library or device is missing here.
        PluginError: its factory failed otherwise, or returned something else than a Backend.
    """
    if name in _loaded:
        return _loaded[name]
    factories = backend_factories()
    if name not in factories:
        raise ValueError(
            f"unknown backend {name!r}; available backends: {', '.join(sorted(factories))} "
            f"(set {ENV_VAR} or call arraygpt.set_backend with one of them)"
        )
    try:
        backend = factories[name]()
    except BackendUnavailable:
        raise
    except Exception as e:  # a plugin's factory that broke: named, so that the others still list
        raise PluginError(f"backend {name!r} failed to load: {type(e).__name__}: {e}") from e
    if not isinstance(backend, Backend):
        raise PluginError(f"backend {name!r}'s factory returned a {type(backend).__name__}, not an arraygpt Backend")
    _loaded[name] = backend
    return backend


def get_backend() -> Backend:
    """The active backend: the last ``set_backend``, else ``$ARRAYGPT_BACKEND``, else numpy.

    The environment variable is read once, on first call; an empty value counts as unset.
    """
    global _active
    if _active is None:
        name = os.environ.get(ENV_VAR, "").strip().lower() or DEFAULT_BACKEND
        _active = load_backend(name)
    return _active


def set_backend(name: str) -> Backend:
    """Make ``name`` the active backend for new arrays and return it."""
    global _active
    _active = load_backend(name.strip().lower())
    return _active


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """``with use_backend("array_api_strict"):`` activates a backend for the block only."""
    global _active
    previous = _active
    backend = set_backend(name)
    try:
        yield backend
    finally:
        _active = previous


def namespace(*arrays: Any) -> Any:
    """The array-API namespace of ``arrays`` (array-api-compat's ``array_namespace``).

    Cached by the type of the first array because layer code calls it on every forward; arrays
    of two different libraries still raise ``TypeError``, as array-api-compat does.
    """
    first = type(arrays[0])
    xp = _namespace_by_type.get(first)
    if xp is not None and len(arrays) == 1:  # the hot path: layers pass one array
        return xp
    if xp is None or any(type(a) is not first for a in arrays[1:]):
        from array_api_compat import array_namespace

        xp = array_namespace(*arrays)
        _namespace_by_type[first] = xp
    return xp


_namespace_by_type: dict[type, Any] = {}


def backend_of(x: Any) -> Backend:
    """The loaded backend whose arrays have ``x``'s type (numpy is always loadable)."""
    for backend in _loaded.values():
        if type(x) is backend.array_type:
            return backend
    if type(x).__module__.split(".")[0] == "numpy":
        return load_backend("numpy")
    for name in backend_factories():
        try:
            backend = load_backend(name)
        except BackendUnavailable:
            continue
        if type(x) is backend.array_type:
            return backend
    raise TypeError(f"no loaded arraygpt backend owns arrays of type {type(x).__name__}")


def to_numpy(x: Any) -> Any:
    """Any backend array (or NumPy array, or nested list) -> host NumPy array."""
    import numpy as np

    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        return np.asarray(x)
    return backend_of(x).to_numpy(x)


def scatter_add(target: Any, indices: Any, values: Any) -> None:
    """``target[indices[i]] += values[i]`` along axis 0 with repeats accumulated, in place.

    The standard has no scatter-add (plain ``x[idx] += v`` drops repeated indices), so the
    backend that owns ``target`` supplies it.
    """
    backend_of(target).scatter_add(target, indices, values)


def host_rng(seed: int | None) -> Any:
    """A seeded NumPy generator on the host: the single source of randomness, so that one seed
    gives the same numbers on every backend (draw on the host, then ``backend.asarray``)."""
    import numpy as np

    return np.random.default_rng(seed)


def host_full(shape: tuple[int, ...], value: float) -> Any:
    """A float64 host NumPy array filled with ``value`` (for initial gains and biases)."""
    import numpy as np

    return np.full(shape, value)


def host_namespace() -> Any:
    """The array namespace of host NumPy arrays (for checks done before a transfer)."""
    import array_api_compat.numpy as np_xp

    return np_xp
