"""The plugin manager: built-in plugins first, then the ``arraygpt`` entry-point group.

Set ``ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD`` to any non-empty value to skip third-party plugins
(as pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import pluggy

from arraygpt import hookspecs

DISABLE_AUTOLOAD_ENV = "ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD"
DEFAULT_PLUGINS = (
    "arraygpt.backends",
    "arraygpt.plugins.optimizers",
    "arraygpt.plugins.samplers",
)
REGISTRY_HOOKS = {
    "backends": "arraygpt_register_backends",
    "optimizers": "arraygpt_register_optimizers",
    "samplers": "arraygpt_register_samplers",
}


class PluginError(RuntimeError):
    """A plugin misbehaved: it raised, or offered a name another plugin already offers."""


def get_plugin_manager(autoload: bool | None = None) -> pluggy.PluginManager:
    """A new plugin manager with the hook specs, the built-in plugins and, unless disabled, the
    plugins of the ``arraygpt`` entry-point group; every implementation is checked against a spec.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
    pm.check_pending()
    return pm


_default: pluggy.PluginManager | None = None


def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _default
    if _default is None:
        _default = get_plugin_manager()
    return _default


def set_plugin_manager(pm: pluggy.PluginManager | None) -> None:
    """Replace the process-wide manager (``None``: build a fresh one on next use). For tests and
    for programs that register plugins by hand."""
    global _default
    _default = pm


def registry_with_owners(kind: str, pm: pluggy.PluginManager | None = None) -> dict[str, tuple[Any, str]]:
    """``{name: (object, plugin name)}`` for one kind: ``backends``, ``optimizers`` or ``samplers``.

    Each implementation is called on its own so that a plugin that raises is named.

    Raises:
        PluginError: a plugin raised, returned something other than a list of dicts, or offered
            a name that another plugin offers too.
    """
    if kind not in REGISTRY_HOOKS:
        raise ValueError(f"unknown plugin kind {kind!r}; expected one of {sorted(REGISTRY_HOOKS)}")
    pm = pm or default_plugin_manager()
    hook_name = REGISTRY_HOOKS[kind]
    found: dict[str, tuple[Any, str]] = {}
    # get_hookimpls() is in call order reversed (first registered first): built-ins come first,
    # so a clash names the built-in as the earlier owner.
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        try:
            offered = impl.function()
        except Exception as e:
            raise PluginError(f"plugin {impl.plugin_name!r} raised in {hook_name}: {e!r}") from e
        if not isinstance(offered, list) or not all(isinstance(d, dict) for d in offered):
            raise PluginError(
                f"plugin {impl.plugin_name!r}: {hook_name} must return a list of dicts, "
                f"got {type(offered).__name__}"
            )
        for entries in offered:
            for name, obj in entries.items():
                if name in found:
                    raise PluginError(
                        f"{kind[:-1]} {name!r} is offered by two plugins: "
                        f"{found[name][1]!r} and {impl.plugin_name!r}"
                    )
                found[name] = (obj, impl.plugin_name)
    return found


def registry(kind: str, pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """``{name: object}`` for one kind of plugin; see :func:`registry_with_owners`."""
    return {name: obj for name, (obj, _) in registry_with_owners(kind, pm).items()}
