"""Time training steps of one process against R data-parallel ranks under ``mpiexec`` on the
nanoGPT CPU config (block 64, 4 layers, 4 heads, 128 wide, vocab 65, global batch 12) on tiny
Shakespeare, float32. Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/distributed.py                  # R=1 with 2 threads, R=1 with 1, R=2 with 1 each
    .venv/bin/python benchmarks/distributed.py --steps 40 --ranks 2 4
    .venv/bin/python benchmarks/distributed.py --zero --ranks 2 4   # and each R again with zero (ZeRO-1)

Each case is a fresh job (``mpiexec -n R python benchmarks/distributed.py --worker ...``) that
trains ``warmup + steps`` steps through ``arraygpt.train`` and reports, from rank 0: the median
and mean ms per step (from the step hook's timestamps, warmup left out), tokens/s of the whole
job, the bytes one all-reduce adds per step, and the median ms spent in it (timed around
``World.allreduce_sum_`` on rank 0, including the wait for the slower rank; with ``--zero``, the
reduce-scatter and the all-gather instead) and the bytes of optimizer state on each rank
(``arraygpt.training.optim.state_nbytes``). Prints one JSON line per case, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NANOGPT_CPU = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
GLOBAL_BATCH = 12
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    import arraygpt
    from arraygpt import GPTConfig, hookimpl
    from arraygpt.manager import get_plugin_manager
    from arraygpt.training.distributed import World, get_world
    from arraygpt.training.optim import state_nbytes

    world = get_world()
    reduce_times: list[float] = []
    reduced_bytes: list[int] = []
    plain = World.allreduce_sum_

    def timed(self, buffer, what="the gradient all-reduce"):
        t0 = time.perf_counter()
        out = plain(self, buffer, what)
        if "gradient" in what:
            reduce_times.append(time.perf_counter() - t0)
            reduced_bytes.append(buffer.nbytes)
        return out

    World.allreduce_sum_ = timed  # type: ignore[method-assign]
    plain_scatter, plain_gather = World.reduce_scatter_sum, World.allgatherv_

    def timed_scatter(self, send, recv, counts, what="the gradient reduce-scatter"):
        t0 = time.perf_counter()
        out = plain_scatter(self, send, recv, counts, what)
        reduce_times.append(time.perf_counter() - t0)
        reduced_bytes.append(send.nbytes)
        return out

    def timed_gather(self, buffer, counts, what="the parameter all-gather"):
        t0 = time.perf_counter()
        out = plain_gather(self, buffer, counts, what)
        reduce_times[-1] += time.perf_counter() - t0  # with the step's reduce-scatter
        reduced_bytes[-1] += buffer.nbytes
        return out

    World.reduce_scatter_sum = timed_scatter  # type: ignore[method-assign]
    World.allgatherv_ = timed_gather  # type: ignore[method-assign]
    stamps: list[float] = []

    class Clock:
        @hookimpl
        def arraygpt_on_step(self, step):
            stamps.append(time.perf_counter())

    pm = get_plugin_manager(autoload=False)
    pm.register(Clock())
    data = str(SHAKESPEARE) if SHAKESPEARE.is_file() else _fallback_text()
    per_rank = GLOBAL_BATCH // world.size
    steps = args.warmup + args.steps
    run = arraygpt.train(
        data,
        config=GPTConfig(**NANOGPT_CPU),
        steps=steps,
        batch_size=per_rank,
        lr=1e-3,
        optimizer="adamw",
        zero=args.zero,
        eval_interval=10**6,
        eval_batches=1,
        log_interval=10**6,
        samples=0,
        progress=False,
        plugin_manager=pm,
        seed=0,
    )
    optimizer_bytes = world.allgather(np.array([state_nbytes(run.optimizer)], dtype=np.int64))[:, 0]
    if world.is_root:
        dts = np.diff(stamps)[args.warmup - 1 :] * 1e3  # ms between step hooks, after the warmup
        tokens = GLOBAL_BATCH * NANOGPT_CPU["block_size"]
        print(
            json.dumps(
                {
                    "ranks": world.size,
                    "zero": bool(args.zero and world.size > 1),
                    "threads_per_rank": int(os.environ.get("ARRAYGPT_NUM_THREADS", "0")),
                    "ms_per_step_median": float(np.median(dts)),
                    "ms_per_step_mean": float(np.mean(dts)),
                    "tokens_per_s": tokens / (float(np.median(dts)) / 1e3),
                    "allreduce_bytes_per_step": reduced_bytes[0] if reduced_bytes else 0,
                    "allreduce_ms_median": float(np.median(reduce_times[args.warmup :]) * 1e3) if reduce_times else 0.0,
                    "optimizer_bytes_per_rank": [int(b) for b in optimizer_bytes],
                }
            ),
            flush=True,
        )


def _fallback_text() -> str:
    path = Path(tempfile.gettempdir()) / "arraygpt-bench-text.txt"
    if not path.exists():
        import numpy as np

        rng = np.random.default_rng(0)
        words = ["the", "king", "and", "queen", "of", "all", "that", "is", "said", "to", "thee", "my", "lord"]
        path.write_text(" ".join(rng.choice(words, 200_000)) + "\n")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2], help="rank counts to run with one thread each")
    parser.add_argument(
        "--zero", action="store_true", help="run each rank count again with zero (sharded optimizer state)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    cores = os.cpu_count() or 1
    cases = [(1, cores, False), (1, 1, False)] + [(r, max(1, cores // r), False) for r in args.ranks]
    if args.zero:
        cases += [(r, max(1, cores // r), True) for r in args.ranks]
    print(f"# {platform.processor() or platform.machine()}, {cores} cores; {_cpu_model()}", flush=True)
    results = []
    for ranks, threads, zero in cases:
        env = dict(os.environ)
        for name in ("ARRAYGPT_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(threads)
        command = [sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--zero"] if zero else []
        if ranks > 1:
            if mpiexec is None:
                print(f"# skipping {ranks} ranks: no mpiexec (pip install 'arraygpt[mpi]')")
                continue
            command = [mpiexec, "-n", str(ranks), *command]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        result = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(result), flush=True)
        results.append(result)
    print(
        "\n| ranks x threads | zero | ms/step (median) | tokens/s | collective bytes/step | collective ms (median) "
        "| optimizer bytes per rank (max) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['ranks']} x {r['threads_per_rank']} | {'yes' if r['zero'] else 'no'} | "
            f"{r['ms_per_step_median']:.1f} | {r['tokens_per_s']:,.0f} | {r['allreduce_bytes_per_step']:,} | "
            f"{r['allreduce_ms_median']:.2f} | {max(r['optimizer_bytes_per_rank']):,} |"
        )


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "lscpu unavailable"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


if __name__ == "__main__":
    main()
