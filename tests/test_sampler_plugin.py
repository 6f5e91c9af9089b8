"""Samplers are plugins: the built-ins come through the same hook as third-party samplers, a
sampler registered by hand is usable by name, a name offered twice is an error, and the worked
example package installs and generates through the ``arraygpt`` entry-point group."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import arraygpt
from arraygpt import GPT, GPTConfig
from arraygpt.generation.generation import generate
from arraygpt.generation.sampling import available_samplers, make_sampler
from arraygpt.manager import PluginError, get_plugin_manager, registry_with_owners, set_plugin_manager
from arraygpt.xp import namespace

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "arraygpt-sampler-example"
BUILTINS = {"greedy", "temperature", "top_k", "top_p", "min_p"}


def test_builtin_samplers_are_registered_through_the_hook():
    pm = get_plugin_manager(autoload=False)
    owners = {name: plugin for name, (_, plugin) in registry_with_owners("samplers", pm).items()}
    assert {name: owners[name] for name in BUILTINS} == dict.fromkeys(BUILTINS, "arraygpt.plugins.samplers")


class LastToken:
    """A plugin (any object with hook implementations): the ``last`` sampler always picks the
    highest token id that has probability at least ``floor``."""

    @arraygpt.hookimpl
    def arraygpt_register_samplers(self):
        def last(*, floor: float = 0.0):
            if not 0.0 <= floor < 1.0:
                raise ValueError(f"floor must be in [0, 1), got {floor}")

            def keep_last(probs):
                xp = namespace(probs)
                V = probs.shape[-1]
                ids = xp.astype(xp.arange(V, device=probs.device), probs.dtype)
                ok = xp.where(probs >= floor, ids + 1, xp.zeros_like(ids))  # (B, V)
                chosen = xp.max(ok, axis=-1, keepdims=True) - 1  # (B, 1)
                return xp.astype(ids[None, :] == chosen, probs.dtype)

            return keep_last

        return [{"last": last}]


def test_a_registered_sampler_is_usable_by_name():
    pm = get_plugin_manager(autoload=False)
    plugin = LastToken()
    pm.register(plugin, name="last-token")
    set_plugin_manager(pm)
    try:
        assert "last" in available_samplers()
        model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
        assert list(generate(model, [1, 2], 4, "last", seed=0)) == [10, 10, 10, 10]
        assert set(list(generate(model, [1, 2], 4, ["top_k", "last"], top_k=3, seed=0))) <= set(range(11))
        with pytest.raises(ValueError, match=r"floor must be in \[0, 1\)"):
            generate(model, [1, 2], 4, "last", floor=2.0)
        with pytest.raises(ValueError, match="registered samplers: greedy, last, min_p"):
            generate(model, [1, 2], 4, "lats")
    finally:
        set_plugin_manager(None)
        pm.unregister(plugin)


def test_a_sampler_name_offered_twice_is_an_error():
    class Clash:
        @arraygpt.hookimpl
        def arraygpt_register_samplers(self):
            return [{"top_k": lambda *, top_k: None}]

    pm = get_plugin_manager(autoload=False)
    pm.register(Clash(), name="clash")
    with pytest.raises(
        PluginError, match="sampler 'top_k' is offered by two plugins: 'arraygpt.plugins.samplers' and 'clash'"
    ):
        make_sampler("top_k", top_k=3, pm=pm)


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import arraygpt
    from arraygpt import GPT, GPTConfig
    from arraygpt.manager import registry_with_owners

    owners = {name: plugin for name, (_, plugin) in registry_with_owners("samplers").items()}
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8), seed=0, dtype="float64")
    steps = list(arraygpt.generate(model, [[1, 2], [3, 4]], 12, "epsilon", epsilon=0.09, temperature=1.5, seed=3,
                                   show_probs=11))
    rows = [[{"token": c.token, "sampler": c.sampler} for c in step] for step in steps]
    try:
        arraygpt.generate(model, [1], 3, "epsilon", epsilon=1.5)
        error = None
    except ValueError as e:
        error = str(e)
    tabu = list(arraygpt.generate(model, [1, 2, 3], 20, tabu=4, seed=0))
    json.dump({"owner": owners.get("epsilon"), "tabu_owner": owners.get("tabu"), "rows": rows, "error": error,
               "tabu": tabu}, sys.stdout)
    """
)


def test_the_example_package_installs_and_generates(tmp_path):
    target = tmp_path / "site"
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source)  # build in a copy: the shared tree stays clean
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k != "ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["owner"] == report["tabu_owner"] == "epsilon"  # the entry-point name
    context = [1, 2, 3, *report["tabu"]]  # under tabu=4: no token among the 4 before it
    assert len(report["tabu"]) == 20
    assert all(context[t] not in context[t - 4 : t] for t in range(3, len(context)))
    assert report["error"] == "epsilon must be a number in [0, 1), got 1.5"
    assert len(report["rows"]) == 12
    for step in report["rows"]:
        for item in step:
            if item is None:
                continue
            kept = dict(item["sampler"])
            assert item["token"] in kept
            # every kept token had probability >= epsilon before renormalizing, or was the top one
            assert len(kept) == 1 or min(kept.values()) >= 0.09
