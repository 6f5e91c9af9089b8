"""Running a hostile case in a fresh interpreter with bounded memory, shared by test_hostile.py
and test_reliability.py: a case that could hang or eat memory fails with a clear assertion (or
a timeout), never by taking the machine down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 3 * 1024**3  # bytes of address space for a case: far below what an unbounded read takes
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def attempt(call: str, timeout: float = 30, prelude: str = "") -> tuple[str, str]:
    """Run ``call`` (Python statements, after ``prelude``) in a fresh interpreter limited to
    MEMORY_LIMIT bytes; return (exception type, message), or ("ok", "") when it returned."""
    body = "\n".join("    " + line for line in call.splitlines())
    script = f"""
import json, resource
resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT}))
{prelude}
try:
{body}
except BaseException as e:
    print(json.dumps([type(e).__module__ + "." + type(e).__qualname__, str(e)]))
else:
    print(json.dumps(["ok", ""]))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, message = json.loads(proc.stdout.strip().splitlines()[-1])
    return kind, message
