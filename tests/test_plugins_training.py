"""Optimizers and training events as pluggy plugins, each on a fresh plugin manager."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import arraygpt
from arraygpt import hookimpl, hookspecs
from arraygpt.manager import PluginError, get_plugin_manager, registry_with_owners, set_plugin_manager
from arraygpt.plugins.optimizers import SGD

TINY = dict(
    mode="documents", n_embd=16, n_head=2, block_size=8, batch_size=8, eval_batches=2, samples=0, progress=False
)
TRAINING_HOOKS = ("arraygpt_on_step", "arraygpt_on_eval", "arraygpt_on_checkpoint")


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "names.txt"
    rng = np.random.default_rng(0)
    path.write_text(
        "\n".join("".join(rng.choice(list("aeiou"), 2)) + "".join(rng.choice(list("nrst"), 2)) for _ in range(200))
        + "\n"
    )
    return str(path)


def test_built_in_optimizers_are_ordinary_plugins(pm):
    owners = {name: plugin for name, (_, plugin) in registry_with_owners("optimizers", pm).items()}
    assert owners == {
        "sgd": "arraygpt.plugins.optimizers",
        "adam": "arraygpt.plugins.optimizers",
        "adamw": "arraygpt.plugins.optimizers",
    }


class HalfSGD(SGD):
    """A third-party optimizer: SGD at half the learning rate."""

    def step(self, grads, lr):
        super().step(grads, lr / 2)


class OptimizerPlugin:
    def __init__(self):
        self.made = []

    @hookimpl
    def arraygpt_register_optimizers(self):
        def factory(params, momentum=0.0):
            opt = HalfSGD(params, momentum=momentum)
            self.made.append(opt)
            return opt

        return [{"halfsgd": factory}]


def test_a_plugin_optimizer_trains_a_run(pm, data):
    plugin = OptimizerPlugin()
    pm.register(plugin, name="halfsgd-plugin")
    run = arraygpt.train(data, optimizer="halfsgd", momentum=0.9, steps=5, plugin_manager=pm, **TINY)
    assert plugin.made == [run.optimizer] and run.optimizer.momentum == 0.9 and run.optimizer.t == 5


def test_the_process_wide_manager_is_used_by_default(data):
    pm = get_plugin_manager(autoload=False)
    pm.register(OptimizerPlugin(), name="halfsgd-plugin")
    set_plugin_manager(pm)
    try:
        run = arraygpt.train(data, optimizer="halfsgd", steps=2, **TINY)
        assert isinstance(run.optimizer, HalfSGD)
    finally:
        set_plugin_manager(None)


def test_a_second_plugin_offering_the_same_name_is_an_error(pm, data):
    class Clash:
        @hookimpl
        def arraygpt_register_optimizers(self):
            return [{"adam": SGD}]

    pm.register(Clash(), name="clash-plugin")
    with pytest.raises(
        PluginError, match="'adam' is offered by two plugins: 'arraygpt.plugins.optimizers' and 'clash-plugin'"
    ):
        arraygpt.train(data, steps=2, plugin_manager=pm, **TINY)


class Recorder:
    """Logs every training event."""

    def __init__(self, stop_at=None):
        self.steps, self.evals, self.checkpoints = [], [], []
        self.stop_at = stop_at

    @hookimpl
    def arraygpt_on_step(self, run, step, metrics):
        self.steps.append((step, dict(metrics), run.step))
        return True if step == self.stop_at else None

    @hookimpl
    def arraygpt_on_eval(self, step, metrics):
        self.evals.append((step, dict(metrics)))

    @hookimpl
    def arraygpt_on_checkpoint(self, run, step, path):
        self.checkpoints.append((step, path))


def test_event_hooks_see_every_step_eval_and_checkpoint(pm, data, tmp_path):
    rec = Recorder()
    pm.register(rec)
    arraygpt.train(data, steps=6, eval_interval=3, out_dir=tmp_path / "r", plugin_manager=pm, **TINY)
    assert [s for s, _, _ in rec.steps] == [1, 2, 3, 4, 5, 6] and all(s == r for s, _, r in rec.steps)
    assert all({"loss", "lr", "tokens_per_s"} <= set(m) for _, m, _ in rec.steps)
    assert [s for s, _ in rec.evals] == [3, 6] and all({"train_loss", "val_loss"} <= set(m) for _, m in rec.evals)
    last = [(s, p) for s, p in rec.checkpoints if p.endswith("last")]
    assert last == [(3, str(tmp_path / "r" / "last")), (6, str(tmp_path / "r" / "last"))]


def test_a_plugin_can_stop_a_run_which_saves_first(pm, data, tmp_path):
    rec = Recorder(stop_at=4)
    pm.register(rec)
    run = arraygpt.train(data, steps=20, eval_interval=10, out_dir=tmp_path / "r", plugin_manager=pm, **TINY)
    assert run.step == 4 and run.stop_reason == "plugin"
    assert rec.checkpoints[-1] == (4, str(tmp_path / "r" / "last"))


def test_a_plugin_can_stop_a_run_after_an_eval(pm, data):
    class StopOnEval:
        @hookimpl
        def arraygpt_on_eval(self, metrics):
            return metrics["val_loss"] < 100

    pm.register(StopOnEval())
    run = arraygpt.train(data, steps=20, eval_interval=5, plugin_manager=pm, **TINY)
    assert run.step == 5 and run.stop_reason == "plugin"


def test_a_raising_event_plugin_is_named(pm, data):
    class Broken:
        @hookimpl
        def arraygpt_on_step(self, step):
            if step == 2:
                raise RuntimeError("boom")

    pm.register(Broken(), name="broken-logger")
    with pytest.raises(
        PluginError, match=r"plugin 'broken-logger' raised in arraygpt_on_step at step 2: RuntimeError\('boom'\)"
    ):
        arraygpt.train(data, steps=5, plugin_manager=pm, **TINY)


def test_training_hooks_are_documented_specs():
    for name in TRAINING_HOOKS:
        spec = getattr(hookspecs, name)
        assert spec.__doc__ and "step" in spec.__doc__
        if name != "arraygpt_on_checkpoint":
            assert "Returns" in spec.__doc__ and "True" in spec.__doc__  # how a plugin stops a run
        assert list(inspect.signature(spec).parameters)[:2] == ["run", "step"]
    pm = get_plugin_manager(autoload=False)
    for name in TRAINING_HOOKS:
        assert getattr(pm.hook, name).spec is not None


def _docs_lion_module():
    """The optimizer plugin of docs/training.md, run as written."""
    import re
    import types
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    code = next(
        block for block in re.findall(r"```python\n(.*?)```", doc, re.S) if "# arraygpt_lion/__init__.py" in block
    )
    module = types.ModuleType("arraygpt_lion")
    exec(compile(code, "docs/training.md", "exec"), module.__dict__)
    return module


def test_the_documented_optimizer_plugin_works(pm, data, tmp_path):
    lion = _docs_lion_module()
    pm.register(lion, name="lion")
    assert registry_with_owners("optimizers", pm)["lion"][1] == "lion"
    # one step by hand: p -= lr * sign(beta1 * m + (1 - beta1) * g), m starts at 0
    p = {"w": np.array([[1.0, -2.0], [0.5, 0.0]])}
    g = {"w": np.array([[0.3, -0.1], [0.0, 2.0]])}
    opt = lion.Lion(p, betas=(0.9, 0.99))
    opt.step(g, 0.1)
    np.testing.assert_array_equal(p["w"], [[0.9, -1.9], [0.5, -0.1]])
    np.testing.assert_allclose(opt.state_dict()["m.w"], 0.01 * g["w"])
    # and it trains a run, with checkpoints and exact resume like any optimizer
    run = arraygpt.train(
        data, optimizer="lion", lr=1e-3, beta2=0.99, steps=6, out_dir=tmp_path / "a", plugin_manager=pm, **TINY
    )
    assert isinstance(run.optimizer, lion.Lion) and run.optimizer.beta2 == 0.99
    arraygpt.train(
        data,
        optimizer="lion",
        lr=1e-3,
        beta2=0.99,
        steps=6,
        out_dir=tmp_path / "b",
        stop_after=3,
        plugin_manager=pm,
        **TINY,
    )
    resumed = arraygpt.train(resume=tmp_path / "b", plugin_manager=pm, progress=False)
    for name, value in run.model.params.items():
        np.testing.assert_array_equal(resumed.model.params[name], value)
