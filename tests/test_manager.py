"""The plugin manager: built-ins as ordinary plugins, a third-party backend end to end, clashes and
raising plugins named, entry-point autoload and its switch, misspelled hooks rejected at registration.
A fresh manager per test."""

from __future__ import annotations

import importlib.metadata
import inspect
import subprocess
import sys
import types

import numpy as np
import pluggy
import pytest

import arraygpt
from arraygpt import GPT, GPTConfig, hookimpl, hookspecs, manager
from arraygpt import xp as shim
from arraygpt.manager import (
    PluginError,
    UnknownHookError,
    get_plugin_manager,
    register_plugin,
    registry,
    registry_with_owners,
    set_plugin_manager,
)

CONFIG = GPTConfig.preset("microgpt")


@pytest.fixture
def pm(monkeypatch):
    """A fresh manager without entry points, installed as the process-wide one for this test only;
    backends loaded during the test are forgotten afterwards."""
    fresh = get_plugin_manager(autoload=False)
    monkeypatch.setattr(manager, "_default", fresh)
    monkeypatch.setattr(shim, "_loaded", dict(shim._loaded))
    monkeypatch.setattr(shim, "_active", None)
    monkeypatch.delenv("ARRAYGPT_BACKEND", raising=False)
    return fresh


def _numpy_alias(name, calls):
    """A third-party backend: NumPy under another name, counting the arrays it creates."""
    from arraygpt.backends import numpy as np_backend

    def asarray(host):
        calls.append(name)
        return np.asarray(host)

    def factory():
        return shim.Backend(
            name=name,
            xp=np_backend.xp,
            array_type=np.ndarray,
            device="cpu",
            asarray=asarray,
            to_numpy=np_backend.to_numpy,
            scatter_add=np_backend.scatter_add,
            synchronize=np_backend.synchronize,
        )

    return factory


class BackendPlugin:
    def __init__(self, **factories):
        self.factories = factories

    @hookimpl
    def arraygpt_register_backends(self):
        return [self.factories]


# ---------------------------------------------------------------------------------------------
# built-ins


def test_builtins_are_registered_as_plugins():
    pm = get_plugin_manager(autoload=False)
    assert set(manager.DEFAULT_PLUGINS) <= {name for name, _ in pm.list_name_plugin()}
    owners = registry_with_owners("backends", pm)
    assert {"numpy", "array_api_strict", "cupy", "torch"} <= set(owners)
    assert owners["numpy"][1] == "arraygpt.backends"
    assert get_plugin_manager(autoload=False) is not pm  # a new manager every call


def test_unknown_registry_kind():
    with pytest.raises(ValueError, match="schedulers"):
        registry("schedulers", get_plugin_manager(autoload=False))


def test_hookimpl_is_exported_and_every_hook_is_documented():
    assert arraygpt.hookimpl is hookspecs.hookimpl
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "arraygpt_spec")]
    assert {f.__name__ for f in specs} >= set(manager.REGISTRY_HOOKS.values())
    for f in specs:
        assert f.__name__.startswith("arraygpt_"), f.__name__
        assert f.__doc__ and len(f.__doc__.strip()) > 20, f"{f.__name__} has no docstring"
        assert inspect.signature(f).return_annotation is not inspect.Signature.empty, f.__name__


# ---------------------------------------------------------------------------------------------
# a third-party backend


def test_third_party_backend_end_to_end(pm):
    calls = []
    plugin = BackendPlugin(numpy_plugin=_numpy_alias("numpy_plugin", calls))
    pm.register(plugin, name="acme-backend")
    try:
        owners = registry_with_owners("backends")
        assert owners["numpy_plugin"][1] == "acme-backend"
        model = GPT(CONFIG, seed=0, backend="numpy_plugin")
        assert model.backend.name == "numpy_plugin" and calls, "the plugin's asarray made the weights"
        idx, targets = np.array([[1, 2, 3, 4]]), np.array([[2, 3, 4, 0]])
        _, loss = model.forward(idx, targets)
        grads = model.backward()
        ref = GPT(CONFIG, seed=0, backend="numpy")
        _, ref_loss = ref.forward(idx, targets)
        ref_grads = ref.backward()
        assert loss == ref_loss
        for k in ref_grads:
            np.testing.assert_array_equal(grads[k], ref_grads[k])
        with arraygpt.use_backend("numpy_plugin") as backend:
            assert backend.name == "numpy_plugin"
        with pytest.raises(ValueError, match="numpy_plugin"):  # listed among the choices
            arraygpt.set_backend("numpy_plugn")
    finally:
        pm.unregister(plugin)
    shim._loaded.pop("numpy_plugin")
    with pytest.raises(ValueError, match="unknown backend 'numpy_plugin'"):  # gone with its plugin
        shim.load_backend("numpy_plugin")


def test_two_plugins_offering_one_name_is_an_error_naming_both(pm):
    first, second = BackendPlugin(shared=lambda: None), BackendPlugin(shared=lambda: None)
    pm.register(first, name="plugin-one")
    pm.register(second, name="plugin-two")
    with pytest.raises(PluginError, match=r"'shared'.*two plugins") as e:
        registry("backends")
    assert "plugin-one" in str(e.value) and "plugin-two" in str(e.value)


def test_a_plugin_cannot_take_a_builtin_name(pm):
    pm.register(BackendPlugin(numpy=lambda: None), name="sneaky")
    with pytest.raises(PluginError) as e:
        registry("backends")
    assert "sneaky" in str(e.value) and "arraygpt.backends" in str(e.value) and "numpy" in str(e.value)


def test_a_plugin_that_raises_is_named(pm):
    class Broken:
        @hookimpl
        def arraygpt_register_samplers(self):
            raise ZeroDivisionError("division by zero in the registry")

    pm.register(Broken(), name="broken-samplers")
    with pytest.raises(PluginError, match=r"broken-samplers.*arraygpt_register_samplers.*ZeroDivisionError"):
        registry("samplers")


def test_a_plugin_returning_the_wrong_type_is_named(pm):
    class Wrong:
        @hookimpl
        def arraygpt_register_optimizers(self):
            return {"sgd": object()}  # a dict, not a list of dicts

    pm.register(Wrong(), name="wrong-optimizers")
    with pytest.raises(PluginError, match=r"wrong-optimizers.*list of dicts"):
        registry("optimizers")


def test_a_backend_factory_that_raises_unavailable_is_reported(pm):
    def factory():
        raise shim.BackendUnavailable("the acme backend needs an ACME accelerator")

    pm.register(BackendPlugin(acme=factory), name="acme")
    with pytest.raises(shim.BackendUnavailable, match="ACME accelerator"):
        shim.load_backend("acme")


# ---------------------------------------------------------------------------------------------
# entry points


class _FakeDist:
    """Just enough of an importlib.metadata.Distribution for pluggy's loader."""

    def __init__(self, entry_points):
        self.entry_points = entry_points
        self.metadata = {"name": "acme-arraygpt-plugin"}
        self.version = "1.0"


@pytest.fixture
def fake_entry_point(monkeypatch):
    """An installed distribution declaring ``[project.entry-points.arraygpt] acme = <module>``; returns
    the plugin module so the test can add hooks to it."""
    module = types.ModuleType("acme_arraygpt_plugin")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ep = importlib.metadata.EntryPoint(name="acme", value=module.__name__, group="arraygpt")
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: [_FakeDist([ep])])
    monkeypatch.setattr(shim, "_loaded", dict(shim._loaded))
    return module


def test_entry_point_plugins_are_loaded(monkeypatch, fake_entry_point):
    monkeypatch.delenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    fake_entry_point.arraygpt_register_backends = hookimpl(lambda: [{"acme_numpy": _numpy_alias("acme_numpy", [])}])
    pm = get_plugin_manager()
    assert pm.get_plugin("acme") is fake_entry_point
    assert registry_with_owners("backends", pm)["acme_numpy"][1] == "acme"


@pytest.mark.parametrize("value", ["1", "true"])
def test_disable_autoload_skips_entry_points(monkeypatch, fake_entry_point, value):
    fake_entry_point.arraygpt_register_backends = hookimpl(lambda: [{"acme_numpy": _numpy_alias("acme_numpy", [])}])
    calls = []
    original = importlib.metadata.distributions
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: calls.append(1) or original())
    monkeypatch.setenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", value)
    pm = get_plugin_manager()
    assert calls == [] and pm.get_plugin("acme") is None
    assert "acme_numpy" not in registry("backends", pm)
    monkeypatch.delenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD")
    pm = get_plugin_manager()
    assert calls == [1] and "acme_numpy" in registry("backends", pm)
    assert get_plugin_manager(autoload=False).get_plugin("acme") is None


def test_a_misspelled_hook_from_an_entry_point_is_rejected(monkeypatch, fake_entry_point):
    monkeypatch.delenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    fake_entry_point.arraygpt_register_backend = hookimpl(lambda: [])  # missing the final "s"
    with pytest.raises(
        UnknownHookError, match="'arraygpt_register_backend' .did you mean 'arraygpt_register_backends'"
    ):
        get_plugin_manager()


def test_an_entry_point_that_fails_to_import_is_one_plugin_error_naming_it(monkeypatch, fake_entry_point):
    monkeypatch.delenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delitem(sys.modules, fake_entry_point.__name__)  # the module cannot be found: import fails
    with pytest.raises(PluginError, match=r"plugin 'acme' \(acme_arraygpt_plugin\) failed to import: ModuleNotFound"):
        get_plugin_manager()
    assert get_plugin_manager(autoload=False).get_plugin("acme") is None  # the documented way round it


def test_a_hook_whose_arguments_its_spec_lacks_is_one_plugin_error(monkeypatch, fake_entry_point):
    monkeypatch.delenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    fake_entry_point.arraygpt_register_samplers = hookimpl(lambda foo: [])
    with pytest.raises(PluginError, match=r"plugin 'acme' does not fit its hooks: .*\{'foo'\}") as info:
        get_plugin_manager()
    assert "\n" not in str(info.value)


def test_a_backend_whose_factory_breaks_is_a_plugin_error_and_the_others_still_list(
    monkeypatch, fake_entry_point, capsys
):
    from arraygpt.cli import main

    def exploded():
        raise RuntimeError("gpu exploded")

    monkeypatch.delenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    fake_entry_point.arraygpt_register_backends = hookimpl(lambda: [{"acme_gpu": exploded, "acme_int": lambda: 3}])
    set_plugin_manager(get_plugin_manager())
    try:
        with pytest.raises(PluginError, match="backend 'acme_gpu' failed to load: RuntimeError: gpu exploded"):
            shim.load_backend("acme_gpu")
        with pytest.raises(PluginError, match="backend 'acme_int''s factory returned a int, not an arraygpt Backend"):
            shim.load_backend("acme_int")
        assert main(["backends"]) == 0
    finally:
        set_plugin_manager(None)
    out = capsys.readouterr().out
    assert "acme_gpu" in out and "broken: backend 'acme_gpu' failed to load" in out
    assert "numpy              available" in out


class Typo:
    @hookimpl
    def arraygpt_on_stepp(self, run, step, metrics):  # the spec is arraygpt_on_step
        return None


def _assert_names_the_typo(excinfo):
    message = str(excinfo.value)
    assert "'typo'" in message and "'arraygpt_on_stepp'" in message and "did you mean 'arraygpt_on_step'" in message
    assert "valid hooks: arraygpt_on_checkpoint, arraygpt_on_eval, arraygpt_on_step, " in message
    assert isinstance(excinfo.value, pluggy.PluginValidationError)  # what pluggy's check_pending raises


def test_a_misspelled_hook_registered_by_hand_is_rejected_by_arraygpt():
    pm = get_plugin_manager(autoload=False)
    with pytest.raises(UnknownHookError) as excinfo:
        pm.register(Typo(), name="typo")  # no check_pending: registration itself refuses
    _assert_names_the_typo(excinfo)
    assert pm.get_plugin("typo") is None


def test_the_default_manager_rejects_a_misspelled_hook(pm):
    with pytest.raises(PluginError) as excinfo:
        manager.default_plugin_manager().register(Typo(), name="typo")
    _assert_names_the_typo(excinfo)


def test_register_plugin_checks_any_pluggy_manager():
    plain = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    plain.add_hookspecs(hookspecs)
    with pytest.raises(UnknownHookError) as excinfo:
        register_plugin(plain, Typo(), name="typo")
    _assert_names_the_typo(excinfo)
    assert plain.get_plugin("typo") is None
    assert register_plugin(plain, BackendPlugin(acme=lambda: None), name="acme") == "acme"
    assert "acme" in registry("backends", plain)


def test_an_unmarked_misspelled_hook_is_rejected_too():
    # without @hookimpl pluggy would ignore the function silently
    module = types.ModuleType("unmarked_plugin")
    module.arraygpt_register_sampler = lambda: [{"x": None}]  # missing the final "s", and unmarked
    with pytest.raises(
        UnknownHookError, match="'arraygpt_register_sampler' .did you mean 'arraygpt_register_samplers'"
    ):
        get_plugin_manager(autoload=False).register(module, name="unmarked")


def test_valid_hooks_and_helpers_register():
    class Fine:
        @hookimpl
        def arraygpt_on_step(self, run, step, metrics):
            return None

        def helper(self):  # not a hook: ignored
            return 1

    pm = get_plugin_manager(autoload=False)
    assert pm.register(Fine(), name="fine") == "fine"
    assert len(pm.hook.arraygpt_on_step.get_hookimpls()) == 1


def test_set_plugin_manager_none_builds_a_fresh_one(monkeypatch):
    monkeypatch.setattr(manager, "_default", None)
    first = manager.default_plugin_manager()
    assert manager.default_plugin_manager() is first
    manager.set_plugin_manager(None)
    assert manager.default_plugin_manager() is not first


def test_finding_the_numpy_backend_imports_no_optimizer_or_sampler_plugin():
    """The layers find the numpy backend (scatter_add) through the plugin registry; that must not
    import the other kinds' plugins, or a broken optimizer plugin could break the layers."""
    code = (
        "import sys\n"
        "sys.modules['arraygpt.plugins.optimizers'] = None\n"  # importing it would now raise
        "sys.modules['arraygpt.plugins.samplers'] = None\n"
        "import numpy as np\n"
        "from arraygpt import GPT, GPTConfig\n"
        "model = GPT(GPTConfig.preset('microgpt'), seed=0)\n"
        "model.forward(np.array([[1, 2, 3]]), targets=np.array([[2, 3, 4]]))\n"
        "print(sorted(model.backward())[:1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
