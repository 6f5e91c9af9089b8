"""The shared frame of the side-by-side benchmarks (step.py, llama_step.py, generate_bench.py,
nanogpt_recipe.py), which follow the project's rule: each library in its own process, the sides
alternating (A, B, A, B, ...), three rounds, medians of the rounds and their ratios, the CPU model
printed beside every figure. Run by hand on a quiet machine, never as timed tests.

- :func:`cpu_model`: lscpu's model name (``/proc/cpuinfo`` where lscpu is missing) and the
  logical core count.
- :func:`thread_env`: the environment that holds a side to N threads: ARRAYGPT_NUM_THREADS for
  arraygpt (it splits a batch over N threads, each with one-threaded OpenBLAS), and
  OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS for PyTorch and the BLAS libraries.
  A PyTorch worker also calls :func:`set_torch_threads`.
- :func:`run_process` / :func:`run_worker`: launch one side as a child process; a worker (the
  script itself with ``--worker SIDE``) prints one JSON line last, which comes back as a dict.
  Every launch reports its wall time and the CPU time of the child and all its descendants.
- :func:`alternate`: the rounds, sides in a fixed order within each round.
- :func:`median`, :func:`spread`, :func:`ratio`: the figures.

Not part of the package: the scripts import it as a sibling module.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

THREAD_VARIABLES = ("ARRAYGPT_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cpu_model() -> str:
    """lscpu's model name (``/proc/cpuinfo`` where lscpu is missing) and the logical core count."""
    name = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.CalledProcessError):
        pass
    if not name:
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        except OSError:
            pass
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"


def default_threads() -> int:
    """The cores this process may use (arraygpt's default when ARRAYGPT_NUM_THREADS is unset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def thread_env(threads: int | None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of ``base`` (default ``os.environ``) with every thread variable set to ``threads``
    (None: left as in ``base``, each library's own default)."""
    env = dict(os.environ if base is None else base)
    if threads is not None:
        env.update({name: str(threads) for name in THREAD_VARIABLES})
    return env


def set_torch_threads(threads: int | None) -> int:
    """torch.set_num_threads(threads) (None: leave PyTorch's default); returns the count in force."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class Finished(NamedTuple):
    stdout: str
    stderr: str
    wall_s: float  # the child's wall time, start to exit
    cpu_s: float  # user + system CPU time of the child and its descendants


def run_process(cmd: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> Finished:
    """Run ``cmd`` to its end, capturing its output; a failure exits with its command and output tail."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(list(cmd), env=None if env is None else dict(env), cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Finished(p.stdout, p.stderr, wall, cpu)


def last_json(stdout: str) -> dict[str, Any]:
    """The JSON object on the last line of ``stdout`` that holds one."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"no JSON line in the output:\n{stdout[-2000:]}")


def run_worker(
    script: str, side: str, args: Sequence[str] = (), env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """``python script --worker side *args`` in its own process; its last JSON line, plus
    ``process_wall_s`` and ``process_cpu_s`` (the whole process: start-up and imports too)."""
    done = run_process([sys.executable, script, "--worker", side, *args], env=env)
    return {**last_json(done.stdout), "process_wall_s": done.wall_s, "process_cpu_s": done.cpu_s}


def alternate(
    sides: Iterable[str],
    rounds: int,
    run_one: Callable[[str, int], Any],
    on_result: Callable[[str, int, Any], None] | None = None,
) -> dict[str, list[Any]]:
    """``rounds`` rounds of ``run_one(side, round)`` over ``sides`` in order (A, B, A, B, ...);
    ``on_result(side, round, result)`` sees each result as it comes. Returns side -> results."""
    sides = list(sides)
    results: dict[str, list[Any]] = {side: [] for side in sides}
    for r in range(rounds):
        for side in sides:
            result = run_one(side, r)
            results[side].append(result)
            if on_result is not None:
                on_result(side, r, result)
    return results


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def spread(values: Sequence[float], spec: str = ".1f", unit: str = "") -> str:
    """``median unit (min-max)`` of ``values``; without the range when there is one value."""
    mid = f"{format(median(values), spec)}{unit}"
    return mid if len(values) == 1 else f"{mid} ({format(min(values), spec)}-{format(max(values), spec)})"


def ratio(a: float, b: float, spec: str = ".2f") -> str:
    """``a / b`` as ``1.23x``."""
    return f"{format(a / b, spec)}x" if b else "n/a"
