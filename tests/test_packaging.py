"""Packaging: a light `import arraygpt`, standard-only model math, and a wheel that maps backends/ and
plugins/ to arraygpt.backends and arraygpt.plugins with no top-level package of those names."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = [
    "cupy",
    "torch",
    "array_api_strict",
    "transformers",
    "tokenizers",
    "safetensors",
    "hypothesis",
    "scipy",
    "numba",
    "matplotlib",
    "mpi4py",
]


def _python(code: str, cwd: Path | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=cwd)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_import_is_light(tmp_path):
    """``import arraygpt`` loads a few small modules and pluggy: no array library, no model."""
    code = (
        "import json, sys\n"
        "import arraygpt\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('arraygpt', 'numpy')) or m in "
        f"{OPTIONAL!r})))"
    )
    loaded = json.loads(_python(code, cwd=tmp_path))
    assert loaded == ["arraygpt", "arraygpt.errors", "arraygpt.hookspecs", "arraygpt.xp"]


def test_dir_lists_the_lazy_public_names(tmp_path):
    code = "import json, arraygpt; print(json.dumps(dir(arraygpt)))"
    names = set(json.loads(_python(code, cwd=tmp_path)))
    assert {"GPT", "train", "generate", "load", "save", "make_sampler", "CheckpointError", "TrainConfig"} <= names


def test_public_names_resolve_without_optional_libraries(tmp_path):
    code = (
        "import json, sys, arraygpt\n"
        "names = [n for n in arraygpt.__all__ if n not in ('train', 'generate')]\n"
        "missing = [n for n in names if getattr(arraygpt, n, None) is None]\n"
        "arraygpt.count_params(arraygpt.GPTConfig.preset('gpt3-175b'))\n"
        f"print(json.dumps([missing, sorted(m for m in {OPTIONAL!r} if m in sys.modules)]))"
    )
    assert json.loads(_python(code, cwd=tmp_path)) == [[], []]


@pytest.mark.parametrize("module", ["nn/layers.py", "nn/core.py", "nn/model.py", "config.py"])
def test_model_math_imports_no_array_library(module):
    tree = ast.parse((ROOT / "arraygpt" / module).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"numpy", "cupy", "cupyx", "torch", "array_api_strict", "array_api_compat"}, imported


def test_backends_and_plugins_live_under_arraygpt(tmp_path):
    code = (
        "import importlib.util, json\n"
        "import arraygpt.backends, arraygpt.plugins\n"
        "print(json.dumps([arraygpt.backends.__file__, arraygpt.plugins.__file__,\n"
        "                  importlib.util.find_spec('backends') is None, importlib.util.find_spec('plugins') is None]))"
    )
    backends_file, plugins_file, no_backends, no_plugins = json.loads(_python(code, cwd=tmp_path))
    assert Path(backends_file).parent.name == "backends" and Path(plugins_file).parent.name == "plugins"
    assert no_backends and no_plugins, "a top-level package named backends/plugins is importable"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree (so no build/ or egg-info lands in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("arraygpt", "backends", "plugins"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (path,) = (tmp / "dist").glob("arraygpt-*.whl")
    return path


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"arraygpt"}, f"top-level entries besides arraygpt: {top}"
    for required in (
        "arraygpt/py.typed",
        "arraygpt/__init__.py",
        "arraygpt/config.py",
        "arraygpt/xp.py",
        "arraygpt/hookspecs.py",
        "arraygpt/manager.py",
        "arraygpt/nn/layers.py",
        "arraygpt/nn/core.py",
        "arraygpt/nn/model.py",
        "arraygpt/io/hf/llama.py",
        "arraygpt/training/loop.py",
        "arraygpt/generation/generation.py",
        "arraygpt/viz/figures.py",
        "arraygpt/cli/__init__.py",
        "arraygpt/cli/train.py",
    ):
        assert required in names
    for folder in ("backends", "plugins"):
        sources = sorted(str(p.relative_to(ROOT / folder)) for p in (ROOT / folder).rglob("*.py"))
        prefix = f"arraygpt/{folder}/"
        packed = sorted(n[len(prefix) :] for n in names if n.startswith(prefix) and n.endswith(".py"))
        assert packed == sources, folder
    backends = {n.split("/backends/", 1)[1] for n in names if "/backends/" in n}
    assert {"numpy/__init__.py", "numpy/kernels/gelu.py", "cupy.py", "array_api_strict.py"} <= backends


def test_wheel_metadata(wheel):
    z = zipfile.ZipFile(wheel)
    info = next(n.split("/")[0] for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = z.read(f"{info}/METADATA").decode()
    runtime = sorted(
        line.split(":", 1)[1].strip().split(">")[0].split("=")[0].split("<")[0].strip().lower()
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    )
    assert runtime == ["array-api-compat", "numpy", "pluggy", "safetensors", "tomli"]
    assert 'Requires-Dist: tomli>=1.1; python_version < "3.11"' in metadata  # tomllib is in 3.11's standard library
    assert 'extra == "cupy"' in metadata and "cupy" in metadata
    entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert "arraygpt = arraygpt.cli:main" in entry_points
