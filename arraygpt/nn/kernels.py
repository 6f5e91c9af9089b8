"""Choosing the forward/backward pair each layer runs: the reference of ``layers.py``, or a fused
kernel registered through the plugin system that must equal it (STYLE.md section 9).

A plugin offers kernels with the ``arraygpt_register_kernels`` hook: a list of
``{name: KernelSpec}``. Each spec says which layer kind it implements (a field of
:class:`arraygpt.nn.core.Kernels`, optionally narrowed to one variant of the config, as in
``"norm:layernorm"`` or ``"activation:gelu_tanh"``), the backends and dtypes it runs on, and how
to load it. For every layer kind the model runs the best spec that takes its (config, backend,
dtype), and the reference where none does. A loaded kernel may still decline a call it cannot
take (dropout, a KV cache, grouped-query attention, an unknown argument) by calling the reference
itself; its backward then receives the reference's cache and calls the reference's backward.

An optimizer's update may have a kernel too: a spec for ``"update:adam"`` replaces the update of
the Adam and AdamW plugins (``plugins/optimizers.py``) by one pass over each parameter, and must
give the same numbers (:func:`select_update`).

``ARRAYGPT_KERNELS=reference`` (or ``GPT(kernels="reference")``, ``adam(..., kernels="reference")``)
runs the pure reference.

Not here: the kernels themselves (``arraygpt.backends.numpy_kernels`` and third-party plugins),
the math (``layers.py``), the wiring (``core.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from arraygpt.nn import core

ENV_VAR = "ARRAYGPT_KERNELS"
HOOK = "arraygpt_register_kernels"
CHOICES = ("", "auto", "reference")  # the values ENV_VAR takes (empty or unset: auto)
UPDATE = "update"  # the kind of an optimizer's update kernel: "update:<optimizer>"
UPDATES = ("adam",)  # the optimizer updates a kernel may replace (adam: Adam's and AdamW's)


class KernelUnavailable(RuntimeError):
    """A kernel cannot run here: its ``load`` raises this with what is missing (e.g. numba)."""


@dataclass(frozen=True, eq=False)
class KernelSpec:
    """A registered kernel: a forward/backward pair for one layer kind.

    Args:
        layer: the :class:`arraygpt.nn.core.Kernels` field it replaces, with the config's variant
            after a colon where the field has several (``"norm:layernorm"`` matches
            ``config.norm == "layernorm"``, ``"activation:gelu_tanh"`` ``config.activation``);
            ``"attention"``, ``"crossentropy"`` and ``"linear"`` have none; or
            ``"update:adam"``, an optimizer's update (:data:`UPDATES`).
        load: ``load() -> (forward, backward)`` (for an update: ``load() -> update``, the
            contract of :func:`select_update`), called once when the kernel is first selected
            (so registering imports and compiles nothing); raises :class:`KernelUnavailable`
            saying what is missing.
        backends: the backend names it runs on (``"numpy"``).
        array_types: it also runs on any backend whose ``array_type`` is one of these (a
            third-party backend that wraps NumPy gets the NumPy kernels).
        dtypes: the dtypes it runs on.
        supports: optional ``supports(config, backend, dtype) -> str | None``: None when it takes
            this model, else the reason it does not (for an update ``config`` is the optimizer's
            name).
        priority: the highest priority among the specs that take a model wins (ties: the
            last registered, i.e. a third-party plugin before a built-in).
        description: one line for ``arraygpt backends``.
    """

    layer: str
    load: Callable[[], tuple[Callable[..., Any], Callable[..., Any]]]
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

    def kernel(self) -> Any:
        """What ``load`` returns, loaded on first use: (forward, backward), or an update; raises
        KernelUnavailable."""
        if "kernel" not in self._loaded:
            if "error" in self._loaded:
                raise self._loaded["error"]
            try:
                loaded = self.load()
                self._loaded["kernel"] = loaded if self.kind == UPDATE else tuple(loaded)
            except KernelUnavailable as e:
                self._loaded["error"] = e
                raise
        return self._loaded["kernel"]

    def declines(self, config: Any, backend: Any, dtype: str) -> str | None:
        """Why this spec does not take the model (None: it does); for an update, ``config`` is the
        optimizer's name. Loads the kernel."""
        kind, _, variant = self.layer.partition(":")
        if kind == UPDATE:
            if variant not in UPDATES:
                return f"no optimizer update {variant!r} in this arraygpt (known: {', '.join(UPDATES)})"
            if config != variant:
                return f"for the {variant} update, not {config}"
        elif kind not in core.Kernels._fields:
            return f"no layer kind {kind!r} in this arraygpt (known: {', '.join(core.Kernels._fields)})"
        elif variant and getattr(config, kind, None) != variant:
            return f"for {kind} {variant!r}; the model uses {getattr(config, kind, None)!r}"
        backend_name = getattr(backend, "name", backend)
        if backend_name not in self.backends and getattr(backend, "array_type", None) not in self.array_types:
            return f"for backend {'/'.join(self.backends)}, not {backend_name}"
        if str(dtype) not in self.dtypes:
            return f"for {'/'.join(self.dtypes)}, not {dtype}"
        if self.supports is not None:
            reason = self.supports(config, backend, str(dtype))
            if reason:
                return reason
        try:
            self.kernel()
        except KernelUnavailable as e:
            return str(e)
        return None


def registered_kernels(pm: Any = None) -> list[tuple[str, KernelSpec, str]]:
    """Every registered kernel as ``(name, spec, plugin name)``, last-registered plugin first.

    Raises:
        arraygpt.manager.PluginError: a plugin raised, returned something other than a list of
            ``{name: KernelSpec}``, or offered a name another plugin offers too.
    """
    from arraygpt import manager

    found = manager.registry_with_owners("kernels", pm)
    for name, (spec, owner) in found.items():
        if not isinstance(spec, KernelSpec):
            raise manager.PluginError(
                f"plugin {owner!r}: kernel {name!r} must be an arraygpt.nn.kernels.KernelSpec, got {type(spec).__name__}"
            )
    return [(name, spec, owner) for name, (spec, owner) in reversed(found.items())]


def _env_choice() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR} must be 'reference' or 'auto' (or unset), got {value!r}")
    return value


def _resolve(
    config: Any, backend: Any, dtype: str, pm: Any = None, kinds: tuple[str, ...] = core.Kernels._fields
) -> dict[str, tuple[str, KernelSpec | None, str]]:
    """Per kind (the Kernels fields, or ``(UPDATE,)`` with ``config`` an optimizer's name):
    (kernel name or "reference", spec or None, why)."""
    if isinstance(backend, str):
        from arraygpt.xp import BackendUnavailable, load_backend

        try:
            backend = load_backend(backend)
        except (BackendUnavailable, ValueError):
            pass  # matched by name only
    candidates: dict[str, list[tuple[str, KernelSpec]]] = {kind: [] for kind in kinds}
    for name, spec, _ in registered_kernels(pm):
        if spec.kind in candidates:
            candidates[spec.kind].append((name, spec))
    rows: dict[str, tuple[str, KernelSpec | None, str]] = {}
    for kind, specs in candidates.items():
        specs.sort(key=lambda item: -item[1].priority)  # stable: last registered first among equals
        reasons = []
        for name, spec in specs:
            reason = spec.declines(config, backend, dtype)
            if reason is None:
                why = spec.description or "registered kernel"
                rows[kind] = (name, spec, why + (f" (passed over: {'; '.join(reasons)})" if reasons else ""))
                break
            reasons.append(f"{name}: {reason}")
        else:
            rows[kind] = ("reference", None, "; ".join(reasons) if reasons else "no kernel registered")
    return rows


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
    chosen = {kind: spec.kernel() for kind, (_, spec, _) in _resolve(config, backend, dtype, pm).items() if spec}
    return reference._replace(**chosen)


def select_update(
    optimizer: str, backend: Any, dtype: str, choice: str | None = None, pm: Any = None
) -> Callable[..., bool] | None:
    """The registered update kernel of ``optimizer`` (one of :data:`UPDATES`) for parameters on
    ``backend`` in ``dtype``, or None: the optimizer then runs its reference update.

    The ``adam`` update's contract, for one parameter, in place, the same numbers as the
    reference update of ``plugins.optimizers.Adam`` (docs/kernels.md)::

        update(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, decoupled, step) -> bool

    It returns False, changing nothing, for arrays it does not take (then the caller runs the
    reference). ``choice``: None or ``"auto"`` (the best registered one, unless
    ``ARRAYGPT_KERNELS=reference``), or ``"reference"`` (None).

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
    _, spec, _ = _resolve(optimizer, backend, dtype, pm, kinds=(UPDATE,))[UPDATE]
    return spec.kernel() if spec else None


def describe_kernels(
    config: Any, backend: Any, dtype: str, choice: core.Kernels | str | None = None, pm: Any = None
) -> list[tuple[str, str, str]]:
    """What :func:`select_kernels` picks, as rows ``(layer kind, kernel name or "reference", why)``
    for ``arraygpt backends``; the layer kind carries the config's variant (``norm:layernorm``).

    Example:
        >>> from arraygpt import GPTConfig
        >>> from arraygpt.nn import kernels
        >>> kernels.describe_kernels(GPTConfig(), "numpy", "float32", "reference")[0]
        ('norm:layernorm', 'reference', 'kernels="reference"')
    """
    kinds = [
        kind + (f":{getattr(config, kind)}" if kind in ("norm", "activation") else "") for kind in core.Kernels._fields
    ]
    updates = [f"{UPDATE}:{name}" for name in UPDATES]
    if isinstance(choice, core.Kernels):
        return [(k, "custom", "a Kernels record passed by the caller") for k in kinds]
    if choice == "reference":
        return [(k, "reference", 'kernels="reference"') for k in kinds + updates]
    if choice is None and _env_choice() == "reference":
        return [(k, "reference", f"{ENV_VAR}=reference") for k in kinds + updates]
    rows = _resolve(config, backend, dtype, pm)
    update_rows = [_resolve(name, backend, dtype, pm, kinds=(UPDATE,))[UPDATE] for name in UPDATES]
    return [(label, rows[kind][0], rows[kind][2]) for label, kind in zip(kinds, core.Kernels._fields)] + [
        (label, name, why) for label, (name, _, why) in zip(updates, update_rows)
    ]
