"""The plugin manager: built-in plugins first, then the ``arraygpt`` entry-point group.

Set ``ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD`` to any non-empty value to skip third-party plugins
(as pytest's ``PYTEST_DISABLE_PLUGIN_AUTOLOAD``).

Every registration is checked at once: a plugin with a hook that no spec declares (a misspelled
``arraygpt_on_stepp``) raises :class:`UnknownHookError` naming it and the valid hooks, whether the
plugin came from an entry point, from ``pm.register(...)`` on a manager made here, or from
:func:`register_plugin` on any pluggy manager.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
from typing import Any

import pluggy

from arraygpt import hookspecs
from arraygpt.errors import PluginError

DISABLE_AUTOLOAD_ENV = "ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD"
# kind -> the built-in plugin module that offers it. The process-wide manager imports a module
# only when its kind is first asked for, so that finding the numpy backend (which the layers do
# through arraygpt.xp) never imports the optimizers or samplers: a broken plugin of one kind
# cannot break another.
BUILTIN_PLUGINS = {
    "backends": "arraygpt.backends",
    "kernels": "arraygpt.backends",
    "optimizers": "arraygpt.plugins.optimizers",
    "samplers": "arraygpt.plugins.samplers",
    "loggers": "arraygpt.plugins.tensorboard",
}
DEFAULT_PLUGINS = tuple(dict.fromkeys(BUILTIN_PLUGINS.values()))
REGISTRY_HOOKS = {
    "backends": "arraygpt_register_backends",
    "optimizers": "arraygpt_register_optimizers",
    "samplers": "arraygpt_register_samplers",
    "kernels": "arraygpt_register_kernels",
    "loggers": "arraygpt_register_loggers",
}


class UnknownHookError(PluginError, pluggy.PluginValidationError):
    """A plugin has a hook implementation (or an ``arraygpt_*`` function) that matches no hook
    spec, usually a misspelling. Also a ``pluggy.PluginValidationError``, as pluggy's own
    ``check_pending`` would raise later."""

    def __init__(self, plugin: object, message: str):
        pluggy.PluginValidationError.__init__(self, plugin, message)


def _hook_names(pm: pluggy.PluginManager) -> set[str]:
    """The hooks that ``pm`` has a spec for."""
    return {name for name, caller in vars(pm.hook).items() if hasattr(caller, "has_spec") and caller.has_spec()}


def check_hook_names(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> None:
    """Raise :class:`UnknownHookError` if ``plugin`` has a hook implementation whose hook ``pm``
    has no spec for, or an attribute named ``arraygpt_*`` that is no hook (marked or not: an
    unmarked one would be ignored silently). The message names each and lists the valid hooks."""
    valid = _hook_names(pm)
    prefix = hookspecs.PROJECT_NAME + "_"
    unknown = []
    for attr in dir(plugin):
        if attr.startswith("__"):
            continue
        try:
            value = getattr(plugin, attr)
        except Exception:
            continue
        opts = pm.parse_hookimpl_opts(plugin, attr)
        hook = (opts.get("specname") or attr) if opts is not None else attr
        if (opts is not None or (attr.startswith(prefix) and callable(value))) and hook not in valid:
            unknown.append(hook)
    if unknown:
        plugin_name = name or pm.get_canonical_name(plugin)
        details = []
        for hook in sorted(set(unknown)):
            close = difflib.get_close_matches(hook, sorted(valid), n=1)
            details.append(f"{hook!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise UnknownHookError(
            plugin,
            f"plugin {plugin_name!r} implements unknown hook(s) {', '.join(details)}; "
            f"valid hooks: {', '.join(sorted(valid))}",
        )


def register_plugin(pm: pluggy.PluginManager, plugin: object, name: str | None = None) -> str:
    """Register ``plugin`` on ``pm`` after :func:`check_hook_names`; return its name.

    Raises:
        UnknownHookError: a hook of ``plugin`` matches no spec (nothing is registered).
    """
    check_hook_names(pm, plugin, name)
    registered = _register_checked(pm, plugin, name)
    if registered is None:  # pluggy returns None for a name blocked with pm.set_blocked
        raise PluginError(f"plugin {name or pm.get_canonical_name(plugin)!r} is blocked")
    return registered


class PluginManager(pluggy.PluginManager):
    """pluggy's manager whose every ``register`` (by hand or from an entry point) goes through
    :func:`register_plugin`'s check, so that a misspelled hook fails at registration."""

    def register(self, plugin: object, name: str | None = None) -> str | None:
        check_hook_names(self, plugin, name)
        return _register_checked(self, plugin, name)


def _register_checked(pm: pluggy.PluginManager, plugin: object, name: str | None) -> str | None:
    """pluggy's register, its validation error (a hook whose arguments its spec lacks) a PluginError."""
    try:
        return pluggy.PluginManager.register(pm, plugin, name=name)
    except pluggy.PluginValidationError as e:
        plugin_name = name or pm.get_canonical_name(plugin)
        raise PluginError(f"plugin {plugin_name!r} does not fit its hooks: {' '.join(str(e).split())}") from e


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """pluggy's ``load_setuptools_entrypoints``, with a plugin that fails to import named in a
    PluginError (not a traceback from every command)."""
    entries = [e for dist in importlib.metadata.distributions() for e in dist.entry_points]
    for entry in entries:
        if entry.group != hookspecs.PROJECT_NAME or pm.get_plugin(entry.name) is not None or pm.is_blocked(entry.name):
            continue
        try:
            plugin = entry.load()
        except Exception as e:
            raise PluginError(
                f"plugin {entry.name!r} ({entry.value}) failed to import: {type(e).__name__}: {e} "
                f"(uninstall it, or set {DISABLE_AUTOLOAD_ENV}=1 to load no installed plugin)"
            ) from e
        pm.register(plugin, name=entry.name)


def get_plugin_manager(autoload: bool | None = None, builtins: bool = True) -> pluggy.PluginManager:
    """A new plugin manager with the hook specs, the built-in plugins (all of them, or with
    ``builtins=False`` each kind's when :func:`registry_with_owners` first asks for it) and, unless
    disabled, the plugins of the ``arraygpt`` entry-point group; every implementation is checked
    against a spec when it is registered (:class:`PluginManager`), and ``pm.register`` on the result
    checks too.
    """
    pm = PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    for module_name in DEFAULT_PLUGINS if builtins else ():
        _register_builtin(pm, module_name)
    if autoload is None:
        autoload = not os.environ.get(DISABLE_AUTOLOAD_ENV)
    if autoload:
        _load_entry_points(pm)
    pm.check_pending()
    return pm


_default: pluggy.PluginManager | None = None


def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created on first use."""
    global _default
    if _default is None:
        _default = get_plugin_manager(builtins=False)
    return _default


def _register_builtin(pm: pluggy.PluginManager, module_name: str) -> None:
    if pm.get_plugin(module_name) is None:
        register_plugin(pm, importlib.import_module(module_name), name=module_name)


def set_plugin_manager(pm: pluggy.PluginManager | None) -> None:
    """Replace the process-wide manager (``None``: build a fresh one on next use). For tests and
    for programs that register plugins by hand."""
    global _default
    _default = pm


def registry_with_owners(kind: str, pm: pluggy.PluginManager | None = None) -> dict[str, tuple[Any, str]]:
    """``{name: (object, plugin name)}`` for one kind: ``backends``, ``optimizers``, ``samplers``,
    ``kernels`` or ``loggers``.

    Each implementation is called on its own so that a plugin that raises is named.

    Raises:
        PluginError: a plugin raised, returned something other than a list of dicts, or offered
            a name that another plugin offers too.
    """
    if kind not in REGISTRY_HOOKS:
        raise ValueError(f"unknown plugin kind {kind!r}; expected one of {sorted(REGISTRY_HOOKS)}")
    pm = pm or default_plugin_manager()
    _register_builtin(pm, BUILTIN_PLUGINS[kind])
    hook_name = REGISTRY_HOOKS[kind]
    found: dict[str, tuple[Any, str]] = {}
    # Built-ins first, then in registration order, so that a clash names the built-in as the
    # earlier owner.
    impls = sorted(getattr(pm.hook, hook_name).get_hookimpls(), key=lambda i: i.plugin_name not in DEFAULT_PLUGINS)
    for impl in impls:
        try:
            offered = impl.function()
        except Exception as e:
            raise PluginError(f"plugin {impl.plugin_name!r} raised in {hook_name}: {e!r}") from e
        if not isinstance(offered, list) or not all(isinstance(d, dict) for d in offered):
            raise PluginError(
                f"plugin {impl.plugin_name!r}: {hook_name} must return a list of dicts, got {type(offered).__name__}"
            )
        for entries in offered:
            for name, obj in entries.items():
                if name in found:
                    raise PluginError(
                        f"{kind[:-1]} {name!r} is offered by two plugins: {found[name][1]!r} and {impl.plugin_name!r}"
                    )
                found[name] = (obj, impl.plugin_name)
    return found


def registry(kind: str, pm: pluggy.PluginManager | None = None) -> dict[str, Any]:
    """``{name: object}`` for one kind of plugin; see :func:`registry_with_owners`."""
    return {name: obj for name, (obj, _) in registry_with_owners(kind, pm).items()}
