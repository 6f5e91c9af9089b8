"""Compiling the numpy kernels' numba sources lazily, without replacing what a reader sees.

- ``@lazy_njit`` wraps a kernel's numba source in a :class:`LazyJit`: numba is imported and the
  source compiled on its first call (per argument types), then cached on disk.
- ``@jitable`` marks a helper that the sources call (inlined into them). It stays the plain
  Python function; numba learns to compile it (``numba.extending.register_jitable``) when numba is
  first imported. ``when_numba_loads(register)`` does the same for any other registration (an
  ``overload`` that picks an implementation by type).
- :class:`ParallelJit` compiles a source written over ``prange`` with ``parallel=True`` (its
  ``py_func`` runs the same source over ``range``).
- :func:`loader` makes a spec's ``load``: it imports numba (or raises KernelUnavailable saying it
  is missing) and returns the kernel; nothing is compiled before a call.

Options, chosen by measurement (docs/kernels.md): serial and ``nogil`` (the model already splits a
batch across threads, so the chunks' kernels run side by side); ``error_model="numpy"`` drops
the ZeroDivisionError check that otherwise keeps every loop with a division scalar; fastmath lets
LLVM reassociate sums (vectorized reductions) and use reciprocals, keeping NaN and inf semantics,
so a diverging run still shows nan. ``exact=True`` compiles without fastmath, for code that must
round as NumPy does (the optimizer update).

numba's on-disk cache checks only the file of the source it compiled, while a kernel compiles in
the helpers of other files (``_simd.py``, ``_blocks.py``, ``quant.py`` for ``decode.py``): a stale
kernel would run old code silently after an edit, a ``git pull`` or an upgrade that kept the
cache. So :func:`numba` registers cache locators whose stamp for a file of this folder is the
hash of every source in the folder (``_register_folder_stamp``): any change recompiles them all.

Not here: the kernels (one family per module beside this one).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from typing import Any

from arraygpt.errors import KernelUnavailable
from arraygpt.nn.kernels import KernelPair

FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
OPTIONS = dict(nogil=True, cache=True, error_model="numpy", fastmath=FASTMATH)
EXACT = dict(OPTIONS, fastmath=False)
PARALLEL = dict(OPTIONS, parallel=True)

_lock = threading.RLock()
_numba: list[Any] = []  # the numba module, once imported
_registrations: list[Callable[[Any], None]] = []  # run once numba is imported


def numba() -> Any:
    """The numba module, imported (and the helpers registered with it) on first use.

    Raises:
        KernelUnavailable: numba is not installed.
    """
    if _numba:
        return _numba[0]
    with _lock:
        if not _numba:
            # OpenMP's idle threads (numba's parallel kernels) spin briefly, not for a long
            # while beside BLAS's: read when numba first starts its threads (docs/kernels.md)
            os.environ.setdefault("GOMP_SPINCOUNT", "10000")
            try:
                import numba as module
            except ImportError as e:
                raise KernelUnavailable(f"numba is not installed ({e}); pip install numba") from e
            from arraygpt.backends.numpy.kernels import _compiler_pages

            _compiler_pages.register(module)
            _register_folder_stamp(module)
            for register in _registrations:
                register(module)
            _numba.append(module)
    return _numba[0]


def _folder_stamp(folder: str) -> bytes:
    """The SHA-256 of every ``.py`` file in ``folder`` (names and contents, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".py")):
        with open(os.path.join(folder, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return digest.digest()


def _register_folder_stamp(numba: Any) -> None:
    """Put, before each of numba's cache locators that go by a source file, one that takes the
    kernels of this folder and stamps them with the whole folder's hash (numba's own stamp is the
    hash of the one file): a cached kernel whose helpers changed in another file is compiled
    again. Without those locator classes (another numba), numba's own stamps stay."""
    from numba.core import caching

    folder = os.path.dirname(os.path.abspath(__file__))
    stamp = _folder_stamp(folder)  # the sources this process runs, read once

    def folder_locator(base: Any) -> Any:
        class FolderLocator(base):
            @classmethod
            def from_function(cls, py_func: Any, py_file: str) -> Any:
                if os.path.dirname(os.path.abspath(py_file)) != folder:
                    return None
                return super().from_function(py_func, py_file)

            def get_source_stamp(self) -> bytes:
                return stamp

        return FolderLocator

    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = [getattr(caching, name, None) for name in names]
    if all(bases) and isinstance(getattr(caching.CacheImpl, "_locator_classes", None), list):
        caching.CacheImpl._locator_classes[:0] = [folder_locator(base) for base in bases]


def when_numba_loads(register: Callable[[Any], None]) -> None:
    """Run ``register(numba)`` when numba is imported (now, if it already is)."""
    with _lock:
        _registrations.append(register)
        if _numba:
            register(_numba[0])


def jitable(fn: Callable[..., Any] | None = None, *, inline: bool = True) -> Any:
    """Let numba sources call ``fn`` (``@jitable``: inlined into them; ``@jitable(inline=False)``:
    compiled as a function of its own, for a helper whose branches numba's inliner mishandles);
    ``fn`` itself is returned unchanged."""
    if fn is None:
        return lambda f: jitable(f, inline=inline)
    how = "always" if inline else "never"
    when_numba_loads(lambda numba: numba.extending.register_jitable(inline=how, **OPTIONS)(fn))
    return fn


def _njit(numba: Any, fn: Callable[..., Any], options: dict[str, Any]) -> Any:
    try:
        return numba.njit(**options)(fn)
    except RuntimeError:  # no writable cache folder (numba: "no locator available")
        return numba.njit(**dict(options, cache=False))(fn)


class LazyJit:
    """A numba source (:attr:`py_func`), compiled with numba on its first call."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]):
        self.py_func = fn
        self.options = options
        self.__name__, self.__doc__, self.__module__ = fn.__name__, fn.__doc__, fn.__module__
        self._dispatcher: Any = None

    def dispatcher(self) -> Any:
        """The numba dispatcher (created on first use; it compiles per argument types)."""
        if self._dispatcher is None:
            numba_module = numba()
            with _lock:
                if self._dispatcher is None:
                    self._dispatcher = _njit(numba_module, self.py_func, self.options)
        return self._dispatcher

    def __call__(self, *args: Any) -> Any:
        return (self._dispatcher or self.dispatcher())(*args)

    def __repr__(self) -> str:
        return f"<lazy numba kernel {self.__module__}.{self.__name__}>"


class ParallelJit(LazyJit):
    """A numba source built by ``build(prange)``, compiled with ``parallel=True`` on its first
    call; :attr:`py_func` is the same source over ``range`` (serial Python)."""

    def __init__(self, build: Callable[[Any], Callable[..., Any]]):
        super().__init__(build(range), PARALLEL)
        self._build = build

    def dispatcher(self) -> Any:
        if self._dispatcher is None:
            numba_module = numba()
            with _lock:
                if self._dispatcher is None:
                    self._dispatcher = _njit(numba_module, self._build(numba_module.prange), self.options)
        return self._dispatcher


def lazy_njit(fn: Callable[..., Any] | None = None, *, exact: bool = False) -> Any:
    """``@lazy_njit`` or ``@lazy_njit(exact=True)`` (no fastmath): a :class:`LazyJit` of ``fn``."""
    options = EXACT if exact else OPTIONS
    if fn is None:
        return lambda f: LazyJit(f, options)
    return LazyJit(fn, options)


def loader(*kernel: Callable[..., Any]) -> Callable[[], Any]:
    """A spec's ``load``: numba imported (or KernelUnavailable), then ``KernelPair(forward,
    backward)`` for two functions, the function itself for one (an update)."""

    def load() -> Any:
        numba()
        return KernelPair(*kernel) if len(kernel) == 2 else kernel[0]

    return load
