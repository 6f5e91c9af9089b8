"""The suite where only the runtime dependencies and the test tools are installed: PyTorch,
transformers and accelerate are references of some tests, never needed to collect or run the rest.

They are hidden in a subprocess (``sys.modules[name] = None`` makes ``import name`` raise
ImportError and ``importlib.util.find_spec(name)`` return None, as for a package not installed).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = ("torch", "transformers", "accelerate")


def _pytest_without_references(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"for name in {HIDDEN!r}:\n"
        "    sys.modules[name] = None\n"
        "import pytest\n"
        f"raise SystemExit(pytest.main({['-q', '-p', 'no:cacheprovider', *args]!r}))\n"
    )
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_golden_test_runs_without_torch():
    out = _pytest_without_references("tests/test_golden.py")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout, out.stdout[-2000:]


def test_the_whole_suite_collects_without_torch():
    out = _pytest_without_references("--collect-only", "tests", "arraygpt")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "error" not in out.stdout.lower().split("collected")[-1], out.stdout[-2000:]
