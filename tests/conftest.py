"""Shared fixtures: the array namespaces to test on, dtype tolerances, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from arraygpt.xp import BackendUnavailable, load_backend

settings.register_profile("ci", deadline=None, max_examples=60, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ("numpy", "array_api_strict", "torch", "cupy")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# A script run by hand (it needs PyTorch), not a test module: doctest collection must not import it.
collect_ignore = ["golden/make_reference.py"]


def available_backends(names=BACKENDS):
    """Backend objects that load here; the rest are left out (torch is a test extra, cupy needs a GPU)."""
    found = []
    for name in names:
        try:
            found.append(load_backend(name))
        except BackendUnavailable:
            continue
    return found


@pytest.fixture(params=[b.name for b in available_backends()])
def backend(request):
    """Each backend that can run here, by name in the test id."""
    return load_backend(request.param)


@pytest.fixture
def xp(backend):
    return backend.xp


@pytest.fixture
def pm():
    """A fresh plugin manager without third-party plugins, for one run."""
    from arraygpt.manager import get_plugin_manager

    return get_plugin_manager(autoload=False)


def tolerance(dtype: str) -> float:
    """Comparison tolerance for results computed in ``dtype`` (a few hundred ulps of 1.0)."""
    return {"float32": 1e-5, "float64": 1e-12}[dtype]


@pytest.fixture
def shared_data():
    """../shared/data (names.txt, tinyshakespeare.txt); skips when this checkout has none."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is not present")
    return SHARED_DATA


def cpu_flags() -> set[str]:
    """The CPU's flags as /proc/cpuinfo lists them (``avx2``, ``avx512f``, ...); skips where it
    cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pytest.skip("reads the CPU's flags from /proc/cpuinfo")
    return set(line.partition(":")[2].split())


def has_gpu() -> tuple[bool, str]:
    try:
        load_backend("cupy")
    except BackendUnavailable as e:
        return False, str(e)
    return True, ""


def pytest_collection_modifyitems(config, items):
    ok, why = has_gpu()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"no GPU: {why}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
