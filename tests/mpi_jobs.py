"""Launching small ``arraygpt train`` jobs under ``mpiexec`` for the multi-rank tests
(test_distributed.py, test_zero.py): a tiny config, one thread per rank, a deadline per job."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arraygpt.io.checkpoint import load_checkpoint
from arraygpt.training import distributed
from arraygpt.xp import to_numpy

SYLLABLES = ["an", "el", "ma", "ri", "jo", "sa", "li", "na", "ka", "th", "er", "on", "ia", "be", "da", "ly"]
TINY = [
    "--n-embd",
    "16",
    "--n-head",
    "2",
    "--block-size",
    "8",
    "--eval-batches",
    "2",
    "--samples",
    "0",
    "--log-interval",
    "5",
    "--eval-interval",
    "10",
    "--dtype",
    "float64",
    "--lr",
    "0.01",
]
TIMEOUT_S = 180


def _mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason=f"needs mpi4py and mpiexec ({distributed.MPI_INSTALL_HINT})",
)


def write_names(path):
    """300 made-up names of 1 to 8 syllables, one per line (the data of every MPI test)."""
    rng = np.random.default_rng(0)
    path.write_text("\n".join("".join(rng.choice(SYLLABLES, rng.integers(1, 9))) for _ in range(300)) + "\n")
    return path


def job_env():
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ARRAYGPT_NUM_THREADS"):
        env[name] = "1"  # one thread per rank on this small machine, and the same chunks in every run
    env["ARRAYGPT_MPI_TIMEOUT"] = "60"
    env.pop("ARRAYGPT_BACKEND", None)
    return env


def launch(ranks, args, cwd, env=None):
    """``mpiexec -n ranks python ...args`` (ranks 0: no launcher), finished within TIMEOUT_S.

    A job still running then fails the test with what it printed so far. It is stopped with
    SIGTERM first, which mpiexec passes on to every rank (a SIGKILL would leave the ranks, each in
    its own session, running on), then killed."""
    command = [sys.executable, *args]
    if ranks:
        command = [MPIEXEC, "-n", str(ranks), *command]
    with subprocess.Popen(
        command, cwd=cwd, env=env or job_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as job:
        try:
            stdout, stderr = job.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            stdout, stderr = _stop(job)
            pytest.fail(
                f"{' '.join(command)} ran past {TIMEOUT_S} s; its stdout ends:\n{stdout[-3000:]}\n"
                f"its stderr ends:\n{stderr[-3000:]}"
            )
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def _stop(job):
    """SIGTERM, then SIGKILL, a job past its deadline; (stdout, stderr) as far as they came."""
    partial = None
    for stop in (job.terminate, job.kill):
        stop()
        try:
            return job.communicate(timeout=30)  # retrying after a timeout loses no output
        except subprocess.TimeoutExpired as e:
            partial = e
    return _text(partial.stdout), _text(partial.stderr)


def _text(output):
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def launch_ok(ranks, args, cwd):
    result = launch(ranks, args, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train(ranks, out_dir, names_file, *extra):
    return launch_ok(
        ranks,
        ["-m", "arraygpt.cli", "train", "--data", str(names_file), "--out-dir", str(out_dir), *TINY, *extra],
        names_file.parent,
    )


def fine_tune(ranks, out_dir, names_file, base, *extra):
    """``train`` from the trained model in ``base`` (whose architecture the run keeps)."""
    shape = ("--n-embd", "--n-head")
    settings = [a for i, a in enumerate(TINY) if a not in shape and TINY[i - 1] not in shape]
    args = ["-m", "arraygpt.cli", "train", "--data", str(names_file), "--out-dir", str(out_dir)]
    return launch_ok(ranks, [*args, "--init-from", str(base), *settings, *extra], names_file.parent)


def resume(ranks, run_dir, *extra):
    return launch_ok(ranks, ["-m", "arraygpt.cli", "train", "--resume", str(run_dir), *extra], run_dir.parent)


def weights(run_dir):
    return {k: to_numpy(v) for k, v in load_checkpoint(run_dir).model.params.items()}


def max_rel_diff(a, b):
    scale = max(float(np.abs(v).max()) for v in b.values()) or 1.0
    return max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in b) / scale


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def printed_records(stdout):
    """The JSON objects the ranks printed, however the launcher interleaved their output (it
    forwards each rank's writes as they come, so two ranks' lines can share one line)."""
    decoder, records = json.JSONDecoder(), []
    start = stdout.find("{")
    while start != -1:
        record, end = decoder.raw_decode(stdout, start)
        records.append(record)
        start = stdout.find("{", end)
    return records
