"""Backend selection (set_backend, use_backend, ARRAYGPT_BACKEND), the backend extras, namespaces
derived from the inputs, and clear errors for unknown or unavailable backends."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import arraygpt
from arraygpt import GPT, GPTConfig
from arraygpt import xp as shim
from arraygpt.nn import layers
from arraygpt.xp import BackendUnavailable, load_backend, to_numpy
from conftest import available_backends

CONFIG = GPTConfig.preset("microgpt")


@pytest.fixture
def fresh_selection(monkeypatch):
    """No active backend: the next get_backend() reads the environment (restored afterwards)."""
    monkeypatch.setattr(shim, "_active", None)
    monkeypatch.delenv("ARRAYGPT_BACKEND", raising=False)


# ---------------------------------------------------------------------------------------------
# set_backend / use_backend


def test_default_backend_is_numpy(fresh_selection):
    assert arraygpt.get_backend().name == "numpy"


def test_set_backend_decides_where_new_arrays_live(fresh_selection):
    backend = arraygpt.set_backend("array_api_strict")
    assert backend.name == "array_api_strict" and arraygpt.get_backend() is backend
    model = GPT(CONFIG)
    assert all(type(v) is backend.array_type for v in model.state_dict().values())
    assert arraygpt.set_backend("  NumPy ").name == "numpy"  # names are case- and space-insensitive
    assert type(GPT(CONFIG).state_dict()["wte"]) is np.ndarray


def test_use_backend_is_scoped_and_restores_on_error(fresh_selection):
    arraygpt.set_backend("numpy")
    with arraygpt.use_backend("array_api_strict") as backend:
        assert arraygpt.get_backend() is backend
        assert type(GPT(CONFIG).state_dict()["wte"]) is backend.array_type
        with arraygpt.use_backend("numpy"):
            assert arraygpt.get_backend().name == "numpy"
        assert arraygpt.get_backend() is backend
    assert arraygpt.get_backend().name == "numpy"
    with pytest.raises(RuntimeError, match="boom"), arraygpt.use_backend("array_api_strict"):
        raise RuntimeError("boom")
    assert arraygpt.get_backend().name == "numpy"


def test_unknown_backend_lists_the_names(fresh_selection):
    with pytest.raises(ValueError) as e:
        arraygpt.set_backend("tensorflow")
    message = str(e.value)
    assert "tensorflow" in message and "ARRAYGPT_BACKEND" in message
    for name in ("numpy", "cupy", "array_api_strict", "torch"):
        assert name in message
    with pytest.raises(ValueError, match="available backends"), arraygpt.use_backend("jax"):
        pass
    assert shim._active is None  # a failed selection changes nothing


# ---------------------------------------------------------------------------------------------
# ARRAYGPT_BACKEND, through a fresh interpreter


def _run(code: str, env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ARRAYGPT_BACKEND"}
    if env_value is not None:
        env["ARRAYGPT_BACKEND"] = env_value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_env_var_selects_the_backend():
    code = (
        "import json, arraygpt\n"
        "from arraygpt import GPT, GPTConfig\n"
        "m = GPT(GPTConfig.preset('microgpt'))\n"
        "print(json.dumps([arraygpt.get_backend().name, type(m.state_dict()['wte']).__module__]))"
    )
    name, module = _run(code, "array_api_strict")
    assert name == "array_api_strict" and module.startswith("array_api_strict")
    assert _run(code, " Array_API_Strict ")[0] == "array_api_strict"


@pytest.mark.parametrize("value", [None, "", "   "])
def test_unset_or_empty_env_var_means_numpy(value):
    assert _run("import json, arraygpt; print(json.dumps(arraygpt.get_backend().name))", value) == "numpy"


def test_env_var_is_read_lazily_and_once():
    code = (
        "import json, os, sys, arraygpt\n"
        "os.environ['ARRAYGPT_BACKEND'] = 'array_api_strict'  # after the import: still honoured\n"
        "first = arraygpt.get_backend().name\n"
        "os.environ['ARRAYGPT_BACKEND'] = 'numpy'  # after the first use: ignored\n"
        "second = arraygpt.get_backend().name\n"
        "print(json.dumps([first, second]))"
    )
    assert _run(code, "numpy") == ["array_api_strict", "array_api_strict"]


def test_unknown_env_var_value_is_an_error_listing_backends():
    code = (
        "import json, arraygpt\n"
        "try:\n    arraygpt.get_backend()\nexcept ValueError as e:\n    print(json.dumps(str(e)))"
    )
    message = _run(code, "mxnet")
    assert "mxnet" in message and "numpy" in message and "array_api_strict" in message and "cupy" in message


_MALLOPT_PROBE = """
import ctypes, json
import numpy  # before the fake: only the backend's own libc lookup is intercepted
calls = []
class FakeLibc:
    def mallopt(self, param, value):
        calls.append([param, value])
        return 1
real_cdll = ctypes.CDLL
ctypes.CDLL = lambda name, *a, **k: FakeLibc() if "libc" in str(name) else real_cdll(name, *a, **k)
import arraygpt.backends.numpy
print(json.dumps(calls))
"""


@pytest.mark.parametrize("value, tuned", [(None, True), ("1", True), ("0", False)])
def test_malloc_tuning_env_var(value, tuned):
    # The numpy backend tunes glibc's allocator with mallopt when it is imported, unless
    # ARRAYGPT_MALLOC_TUNING=0. A fake libc in a fresh interpreter records the calls.
    env = {k: v for k, v in os.environ.items() if k != "ARRAYGPT_MALLOC_TUNING"}
    if value is not None:
        env["ARRAYGPT_MALLOC_TUNING"] = value
    out = subprocess.run([sys.executable, "-c", _MALLOPT_PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = json.loads(out.stdout.strip().splitlines()[-1])
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
    if tuned:
        assert sorted(calls) == sorted(
            [[M_MMAP_THRESHOLD, 32 * 2**20], [M_TRIM_THRESHOLD, 2**30], [M_TOP_PAD, 64 * 2**20]]
        )
    else:
        assert calls == []


def test_importing_arraygpt_selects_nothing():
    # an invalid value must not break `import arraygpt`: the variable is read on first use only
    code = "import json, arraygpt, arraygpt.nn.model; from arraygpt import xp; print(json.dumps(xp._active))"
    assert _run(code, "no-such-backend") is None


# ---------------------------------------------------------------------------------------------
# unavailable backends


def _forget_cupy(monkeypatch):
    monkeypatch.delitem(sys.modules, "arraygpt.backends.cupy", raising=False)
    monkeypatch.delitem(shim._loaded, "cupy", raising=False)


def test_cupy_without_cupy_says_cupy_is_missing(monkeypatch):
    _forget_cupy(monkeypatch)
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendUnavailable, match=r"CuPy.*not installed.*arraygpt\[cupy\]"):
        load_backend("cupy")
    assert "cupy" not in shim._loaded


@pytest.mark.parametrize("device_count", [0, RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")])
def test_cupy_without_a_device_says_the_device_is_missing(monkeypatch, device_count):
    _forget_cupy(monkeypatch)

    def get_device_count():
        if isinstance(device_count, Exception):
            raise device_count
        return device_count

    fake = types.ModuleType("cupy")
    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(BackendUnavailable, match="CUDA device") as e:
        load_backend("cupy")
    assert "not installed" not in str(e.value)


def test_backend_unavailable_is_exported():
    assert arraygpt.BackendUnavailable is BackendUnavailable
    assert issubclass(BackendUnavailable, Exception)


# ---------------------------------------------------------------------------------------------
# the backend extras and namespaces


def test_backend_extras(backend):
    rng = np.random.default_rng(0)
    host = rng.standard_normal((5, 3))
    x = backend.asarray(host)
    assert type(x) is backend.array_type
    np.testing.assert_array_equal(backend.to_numpy(x), host)
    np.testing.assert_array_equal(to_numpy(x), host)  # the shim finds the owning backend
    assert shim.backend_of(x) is backend
    assert shim.namespace(x) is backend.xp
    target = backend.asarray(np.zeros((4, 3)))
    indices = backend.asarray(np.array([1, 1, 3, 1, 0]))
    backend.scatter_add(target, indices, x)
    expected = np.zeros((4, 3))
    np.add.at(expected, [1, 1, 3, 1, 0], host)
    np.testing.assert_allclose(backend.to_numpy(target), expected, rtol=1e-15, atol=1e-15)
    assert backend.synchronize() is None


def test_uniform_coins_are_driven_by_the_host_generator(backend):
    """Dropout coins: uniform [0, 1) on the backend, reproducible from the host generator's state
    (which checkpoints save), also where a GPU backend draws them on the device."""
    first, again = (backend.uniform(np.random.default_rng(5), (3, 4, 50), "float32") for _ in range(2))
    assert type(first) is backend.array_type and tuple(first.shape) == (3, 4, 50)
    host = to_numpy(first)
    assert host.dtype == np.float32 and host.min() >= 0.0 and host.max() < 1.0
    assert 0.4 < host.mean() < 0.6
    np.testing.assert_array_equal(to_numpy(again), host)
    if backend.device_uniform is None:  # drawn on the host: exactly the generator's numbers
        np.testing.assert_array_equal(host, np.random.default_rng(5).random((3, 4, 50), dtype=np.float32))


def test_device_uniform_gets_one_seed_from_the_host_generator():
    seeds = []

    def device_uniform(seed, shape, dtype):
        seeds.append(seed)
        return np.random.default_rng(seed).random(shape, dtype=dtype)

    gpu_like = dataclasses.replace(load_backend("numpy"), device_uniform=device_uniform)
    rng = np.random.default_rng(9)
    gpu_like.uniform(rng, (2, 2), "float64")
    assert seeds == [int(np.random.default_rng(9).integers(2**63))]
    assert rng.bit_generator.state == _advanced(np.random.default_rng(9))


def _advanced(rng):
    rng.integers(2**63)
    return rng.bit_generator.state


def test_layers_take_the_namespace_of_their_inputs(fresh_selection):
    """The active backend does not matter to layer code: arrays of several libraries side by side."""
    arraygpt.set_backend("numpy")
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 4)), rng.standard_normal((3, 4))
    results = []
    for backend in available_backends():
        out, _ = layers.linear_forward(backend.asarray(x), backend.asarray(w))
        assert type(out) is backend.array_type
        results.append(to_numpy(out))
    for r in results:
        np.testing.assert_allclose(r, x @ w.T, rtol=1e-14, atol=1e-14)


def test_mixing_array_libraries_is_a_type_error():
    import array_api_strict as strict

    with pytest.raises(TypeError):
        shim.namespace(np.zeros(3), strict.zeros(3))


def test_model_on_one_backend_accepts_numpy_input(backend):
    model = GPT(CONFIG, seed=0, backend=backend.name)
    logits, loss = model.forward(np.array([[1, 2, 3]]), targets=[[2, 3, 0]])
    assert type(logits) is backend.array_type and isinstance(loss, float)
    logits2, loss2 = model.forward(backend.asarray(np.array([[1, 2, 3]])), backend.asarray(np.array([[2, 3, 0]])))
    assert loss2 == loss
