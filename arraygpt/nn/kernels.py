"""Choosing the forward/backward pair each layer runs: the reference of ``layers.py``, or a fused
kernel registered through the plugin system that must equal it (STYLE.md section 9).

A plugin offers kernels with the ``arraygpt_register_kernels`` hook: a list of ``{name: spec}``
with two kinds of spec.

- :class:`KernelSpec`: a :class:`KernelPair` (``.forward``, ``.backward``) for one layer kind (a
  field of :class:`arraygpt.nn.core.Kernels`, optionally narrowed to one variant of the config,
  as in ``"norm:layernorm"`` or ``"activation:gelu_tanh"``), the backends and dtypes it runs on,
  and how to load it. For every layer kind the model runs the best spec that takes its (config,
  backend, dtype), and the reference where none does. A loaded kernel may still decline a call
  it cannot take (dropout, grouped-query attention it does not know, an unknown argument) by
  calling the reference itself; its backward then receives the reference's cache and calls the
  reference's backward.
- :class:`UpdateSpec`: an optimizer's update for one parameter (``"adam"``: the update of the
  Adam and AdamW plugins in ``plugins/optimizers.py``), which must give the same numbers
  (:func:`select_update`, :class:`AdamUpdate`).

``ARRAYGPT_KERNELS=reference`` (or ``GPT(kernels="reference")``, ``adam(..., kernels="reference")``)
runs the pure reference.

Not here: the kernels themselves (``arraygpt.backends.numpy.kernels`` and third-party plugins),
the math (``layers.py``), the wiring (``core.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from arraygpt.errors import KernelUnavailable, PluginError
from arraygpt.nn import core

ENV_VAR = "ARRAYGPT_KERNELS"
HOOK = "arraygpt_register_kernels"
CHOICES = ("", "auto", "reference")  # the values ENV_VAR takes (empty or unset: auto)
UPDATES = ("adam",)  # the optimizer updates a kernel may replace (adam: Adam's and AdamW's)


class KernelPair(NamedTuple):
    """A layer's forward and backward, as a kernel gives them (a tuple, so it stands wherever a
    field of :class:`arraygpt.nn.core.Kernels` takes a ``(forward, backward)`` pair).

    Example:
        >>> from arraygpt.nn import layers
        >>> pair = KernelPair(layers.gelu_tanh_forward, layers.gelu_tanh_backward)
        >>> pair.backward.__name__, pair == layers.ACTIVATIONS["gelu_tanh"]
        ('gelu_tanh_backward', True)
    """

    forward: Callable[..., Any]
    backward: Callable[..., Any]


class AdamUpdate(Protocol):
    """The contract of an ``"adam"`` update kernel: one Adam (``decoupled``: AdamW) step of one
    parameter ``p`` in place, with its moments ``m`` and ``v``, giving the numbers of the
    reference update of ``plugins.optimizers.Adam``. It returns False, changing nothing, for arrays
    it does not take (then the optimizer runs its reference update)."""

    def __call__(
        self,
        p: Any,
        g: Any,
        m: Any,
        v: Any,
        *,
        lr: float,
        beta1: float,
        beta2: float,
        eps: float,
        weight_decay: float,
        decoupled: bool,
        step: int,
    ) -> bool: ...


class _Loads:
    """What both kinds of spec share: where they run, and loading once (an error is kept too)."""

    load: Callable[[], Any]
    backends: tuple[str, ...]
    array_types: tuple[type, ...]
    dtypes: tuple[str, ...]
    _loaded: dict[str, Any]

    def _load_once(self, check: Callable[[Any], Any]) -> Any:
        if "kernel" not in self._loaded:
            if "error" in self._loaded:
                raise self._loaded["error"]
            try:
                self._loaded["kernel"] = check(self.load())
            except KernelUnavailable as e:
                self._loaded["error"] = e
                raise
        return self._loaded["kernel"]

    def _declines_backend(self, backend: Any, dtype: str) -> str | None:
        backend_name = getattr(backend, "name", backend)
        if backend_name not in self.backends and getattr(backend, "array_type", None) not in self.array_types:
            return f"for backend {'/'.join(self.backends)}, not {backend_name}"
        if str(dtype) not in self.dtypes:
            return f"for {'/'.join(self.dtypes)}, not {dtype}"
        return None


@dataclass(frozen=True, eq=False)
class KernelSpec(_Loads):
    """A registered kernel: a forward/backward pair for one layer kind.

    Args:
        layer: the :class:`arraygpt.nn.core.Kernels` field it replaces, with the config's variant
            after a colon where the field has several (``"norm:layernorm"`` matches
            ``config.norm == "layernorm"``, ``"activation:gelu_tanh"`` ``config.activation``);
            ``"attention"``, ``"crossentropy"``, ``"linear"``, ``"rope"`` and ``"swiglu"`` have none.
        load: ``load() -> KernelPair(forward, backward)``, called once when the kernel is first
            selected (so registering imports and compiles nothing); raises
            :class:`arraygpt.errors.KernelUnavailable` saying what is missing.
        backends: the backend names it runs on (``"numpy"``).
        array_types: it also runs on any backend whose ``array_type`` is one of these (a
            third-party backend that wraps NumPy gets the NumPy kernels).
        dtypes: the dtypes it runs on.
        supports: optional ``supports(config, backend, dtype) -> str | None``: None when it takes
            this model, else the reason it does not.
        priority: the highest priority among the specs that take a model wins (ties: the
            last registered, i.e. a third-party plugin before a built-in).
        description: one line for ``arraygpt backends``.
    """

    layer: str
    load: Callable[[], KernelPair]
    backends: tuple[str, ...] = ("numpy",)
    array_types: tuple[type, ...] = ()
    dtypes: tuple[str, ...] = ("float32", "float64")
    supports: Callable[[Any, Any, str], str | None] | None = None
    priority: int = 0
    description: str = ""
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def kind(self) -> str:
        """The Kernels field: ``"norm"`` for ``"norm:layernorm"``."""
        return self.layer.partition(":")[0]

    def kernel(self) -> KernelPair:
        """The pair ``load`` returns, loaded on first use; raises KernelUnavailable."""
        return self._load_once(self._checked)

    def _checked(self, loaded: Any) -> KernelPair:
        if isinstance(loaded, KernelPair) and callable(loaded.forward) and callable(loaded.backward):
            return loaded
        raise PluginError(
            f"the {self.layer} kernel's load() must return an arraygpt.nn.kernels.KernelPair(forward, backward), "
            f"got {type(loaded).__name__}"
        )

    def declines(self, config: Any, backend: Any, dtype: str) -> str | None:
        """Why this spec does not take the model (None: it does). Loads the kernel."""
        kind, _, variant = self.layer.partition(":")
        if kind not in core.Kernels._fields:
            hint = "; an optimizer's update is an arraygpt.nn.kernels.UpdateSpec" if kind == "update" else ""
            return f"no layer kind {kind!r} in this arraygpt (known: {', '.join(core.Kernels._fields)}){hint}"
        if variant and getattr(config, kind, None) != variant:
            return f"for {kind} {variant!r}; the model uses {getattr(config, kind, None)!r}"
        reason = self._declines_backend(backend, dtype)
        if reason is None and self.supports is not None:
            reason = self.supports(config, backend, str(dtype))
        if reason:
            return reason
        try:
            self.kernel()
        except KernelUnavailable as e:
            return str(e)
        return None


@dataclass(frozen=True, eq=False)
class UpdateSpec(_Loads):
    """A registered optimizer update: one pass over one parameter that replaces an optimizer's
    reference update and gives its numbers.

    Args:
        optimizer: the update it replaces, one of :data:`UPDATES` (``"adam"``: Adam's and AdamW's,
            contract :class:`AdamUpdate`).
        load: ``load() -> update``, called once when an optimizer first selects it; raises
            :class:`arraygpt.errors.KernelUnavailable` saying what is missing.
        backends, array_types, dtypes, priority, description: as for :class:`KernelSpec`.
        supports: optional ``supports(backend, dtype) -> str | None``: None when it takes
            parameters of this backend and dtype, else the reason it does not.
    """

    optimizer: str
    load: Callable[[], Callable[..., bool]]
    backends: tuple[str, ...] = ("numpy",)
    array_types: tuple[type, ...] = ()
    dtypes: tuple[str, ...] = ("float32", "float64")
    supports: Callable[[Any, str], str | None] | None = None
    priority: int = 0
    description: str = ""
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def update(self) -> Callable[..., bool]:
        """The update ``load`` returns, loaded on first use; raises KernelUnavailable."""
        return self._load_once(self._checked)

    def _checked(self, loaded: Any) -> Callable[..., bool]:
        if callable(loaded):
            return loaded
        raise PluginError(f"the {self.optimizer} update's load() must return a function, got {type(loaded).__name__}")

    def declines(self, backend: Any, dtype: str) -> str | None:
        """Why this spec does not take parameters on ``backend`` in ``dtype`` (None: it does).
        Loads the update."""
        if self.optimizer not in UPDATES:
            return f"no optimizer update {self.optimizer!r} in this arraygpt (known: {', '.join(UPDATES)})"
        reason = self._declines_backend(backend, dtype)
        if reason is None and self.supports is not None:
            reason = self.supports(backend, str(dtype))
        if reason:
            return reason
        try:
            self.update()
        except KernelUnavailable as e:
            return str(e)
        return None


Spec = KernelSpec | UpdateSpec


def registered_kernels(pm: Any = None) -> list[tuple[str, Spec, str]]:
    """Every registered kernel and update as ``(name, spec, plugin name)``, last-registered plugin
    first.

    Raises:
        arraygpt.errors.PluginError: a plugin raised, returned something other than a list of
            ``{name: KernelSpec | UpdateSpec}``, or offered a name another plugin offers too.
    """
    from arraygpt import manager

    found = manager.registry_with_owners("kernels", pm)
    for name, (spec, owner) in found.items():
        if not isinstance(spec, (KernelSpec, UpdateSpec)):
            raise PluginError(
                f"plugin {owner!r}: kernel {name!r} must be an arraygpt.nn.kernels.KernelSpec (a layer's pair) "
                f"or an arraygpt.nn.kernels.UpdateSpec (an optimizer's update), got {type(spec).__name__}"
            )
    return [(name, spec, owner) for name, (spec, owner) in reversed(found.items())]


def _env_choice() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be 'reference' or 'auto' (or unset), got {value!r}")
    return value


def _backend(backend: Any) -> Any:
    """The Backend of a name where it loads; else the name (specs then match by name only)."""
    if isinstance(backend, str):
        from arraygpt.xp import BackendUnavailable, load_backend

        try:
            return load_backend(backend)
        except (BackendUnavailable, ValueError):
            pass
    return backend


def _best(specs: list[tuple[str, Any]], declines: Callable[[Any], str | None]) -> tuple[str, Any, str]:
    """(name, spec, why) of the highest-priority spec that ``declines`` nothing (ties: the last
    registered), or ("reference", None, the reasons of the others)."""
    reasons = []
    for name, spec in sorted(specs, key=lambda item: -item[1].priority):  # stable: last registered first
        reason = declines(spec)
        if reason is None:
            why = spec.description or "registered kernel"
            return name, spec, why + (f" (passed over: {'; '.join(reasons)})" if reasons else "")
        reasons.append(f"{name}: {reason}")
    return "reference", None, "; ".join(reasons) if reasons else "no kernel registered"


def _resolve_layers(config: Any, backend: Any, dtype: str, pm: Any = None) -> dict[str, tuple[str, Any, str]]:
    """Per Kernels field: (kernel name or "reference", KernelSpec or None, why)."""
    backend = _backend(backend)
    specs = [(name, spec) for name, spec, _ in registered_kernels(pm) if isinstance(spec, KernelSpec)]
    return {
        kind: _best([s for s in specs if s[1].kind == kind], lambda spec: spec.declines(config, backend, dtype))
        for kind in core.Kernels._fields
    }


def _resolve_update(optimizer: str, backend: Any, dtype: str, pm: Any = None) -> tuple[str, Any, str]:
    """(update name or "reference", UpdateSpec or None, why) for ``optimizer``."""
    backend = _backend(backend)
    specs = [
        (name, spec)
        for name, spec, _ in registered_kernels(pm)
        if isinstance(spec, UpdateSpec) and spec.optimizer == optimizer
    ]
    return _best(specs, lambda spec: spec.declines(backend, dtype))


def select_kernels(
    config: Any, backend: Any, dtype: str, choice: core.Kernels | str | None = None, pm: Any = None
) -> core.Kernels:
    """The :class:`arraygpt.nn.core.Kernels` a model of ``config`` on ``backend`` in ``dtype`` runs.

    Args:
        config: the GPTConfig.
        backend: an ``arraygpt.xp.Backend`` (or its name).
        dtype: ``"float32"``, ``"float64"``, ...
        choice: None or ``"auto"``: the best registered kernel for each layer kind, unless
            ``ARRAYGPT_KERNELS=reference``; ``"reference"``: the pairs of ``layers.py``; a Kernels
            record is used as is.
        pm: the plugin manager (default ``arraygpt.manager.default_plugin_manager()``).

    Example:
        >>> from arraygpt import GPTConfig
        >>> from arraygpt.nn import kernels
        >>> k = kernels.select_kernels(GPTConfig(), "numpy", "float32", "reference")
        >>> k.norm[0].__module__
        'arraygpt.nn.layers'
    """
    if isinstance(choice, core.Kernels):
        return choice
    if choice not in (None, "auto", "reference"):
        raise ValueError(f"kernels must be None, 'auto', 'reference' or an arraygpt.nn.core.Kernels, got {choice!r}")
    reference = core.reference_kernels(config)
    if choice == "reference" or (choice is None and _env_choice() == "reference"):
        return reference
    chosen = {kind: spec.kernel() for kind, (_, spec, _) in _resolve_layers(config, backend, dtype, pm).items() if spec}
    return reference._replace(**chosen)


def select_update(
    optimizer: str, backend: Any, dtype: str, choice: str | None = None, pm: Any = None
) -> Callable[..., bool] | None:
    """The registered update of ``optimizer`` (one of :data:`UPDATES`) for parameters on
    ``backend`` in ``dtype``, or None: the optimizer then runs its reference update.

    The ``adam`` update follows :class:`AdamUpdate`: one parameter, in place, the same numbers as
    the reference update of ``plugins.optimizers.Adam`` (docs/kernels.md), False (nothing
    changed) for arrays it does not take. ``choice``: None or ``"auto"`` (the best registered one,
    unless ``ARRAYGPT_KERNELS=reference``), or ``"reference"`` (None).

    Example:
        >>> from arraygpt.nn import kernels
        >>> kernels.select_update("adam", "numpy", "float32", "reference") is None
        True
    """
    if choice not in (None, "auto", "reference"):
        raise ValueError(f"kernels must be None, 'auto' or 'reference', got {choice!r}")
    if optimizer not in UPDATES:
        raise ValueError(f"no optimizer update {optimizer!r} takes kernels; known: {', '.join(UPDATES)}")
    if choice == "reference" or (choice is None and _env_choice() == "reference"):
        return None
    _, spec, _ = _resolve_update(optimizer, backend, dtype, pm)
    return spec.update() if spec else None


def describe_kernels(
    config: Any, backend: Any, dtype: str, choice: core.Kernels | str | None = None, pm: Any = None
) -> list[tuple[str, str, str]]:
    """What :func:`select_kernels` and :func:`select_update` pick, as rows ``(kind, kernel name or
    "reference", why)`` for ``arraygpt backends``; a layer kind carries the config's variant
    (``norm:layernorm``), an update its optimizer (``update:adam``).

    Example:
        >>> from arraygpt import GPTConfig
        >>> from arraygpt.nn import kernels
        >>> kernels.describe_kernels(GPTConfig(), "numpy", "float32", "reference")[0]
        ('norm:layernorm', 'reference', 'kernels="reference"')
    """
    kinds = [
        kind + (f":{getattr(config, kind)}" if kind in ("norm", "activation") else "") for kind in core.Kernels._fields
    ]
    updates = [f"update:{name}" for name in UPDATES]
    if isinstance(choice, core.Kernels):
        return [(k, "custom", "a Kernels record passed by the caller") for k in kinds]
    if choice == "reference":
        return [(k, "reference", 'kernels="reference"') for k in kinds + updates]
    if choice is None and _env_choice() == "reference":
        return [(k, "reference", f"{ENV_VAR}=reference") for k in kinds + updates]
    rows = _resolve_layers(config, backend, dtype, pm)
    update_rows = [_resolve_update(name, backend, dtype, pm) for name in UPDATES]
    return [(label, rows[kind][0], rows[kind][2]) for label, kind in zip(kinds, core.Kernels._fields)] + [
        (label, name, why) for label, (name, _, why) in zip(updates, update_rows)
    ]
