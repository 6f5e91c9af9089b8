"""nanoGPT's CPU recipe on tinyshakespeare, start to finish: ``arraygpt train`` (the CLI) against
nanoGPT's own unmodified train.py, on the same machine, in alternating processes.

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/nanogpt_recipe.py                          # 3 rounds of 2000 iterations a side
    .venv/bin/python benchmarks/nanogpt_recipe.py --threads 1
    .venv/bin/python benchmarks/nanogpt_recipe.py --max-iters 30 --rounds 1  # a quick check
    .venv/bin/python benchmarks/nanogpt_recipe.py --activation gelu --json

The sides, A, B, A, B, A, B (``--rounds`` 3):

- **arraygpt**: ``arraygpt train`` (the console script beside this Python) with nanoGPT's recipe:
  tinyshakespeare in stream mode, char tokenizer, ``--val-fraction 0.1``, 4 layers, 4 heads, 128
  wide, block 64, batch 12, 2000 steps, AdamW lr 1e-3 (beta2 0.99, weight decay 0.1), 100 warmup
  steps then cosine decay to 1e-4, gradient clipping at 1.0, dropout 0, no biases, an eval every
  250 steps on 20 batches per split, a progress record every step (nanoGPT's recipe logs every
  iteration too), no samples, seed 1337 (``--seed``), into a temporary ``--out-dir``. The split is
  nanoGPT's: the first 90% of the token stream trains, the LAST 10% validates
  (``data[:int(n*0.9)]``; both give 1,003,854 train / 111,540 val tokens). One deliberate
  difference: the activation is GPT-2's tanh-approximate GELU (arraygpt's exact GELU, an erfc
  series, costs more; it differs from nanoGPT's exact nn.GELU by < 1e-3); ``--activation gelu``
  runs the exact one.
- **nanoGPT**: ``python ../shared/peers/nanogpt/run_recipe.py cpu``, which runs nanoGPT's train.py
  (its README's CPU recipe: config/train_shakespeare_char.py --device=cpu --compile=False
  --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
  --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0) in a temporary copy and prints
  one JSON line: val_loss, train_loss (its last eval), wall_s (train.py's process only, not the
  copy and prepare.py), ms_per_iter (the median of its logged iteration times after the first 10).

Per round and as medians (min-max) over the rounds: wall seconds (arraygpt: the whole
``arraygpt train`` process, start-up, tokenizing, evals and checkpoints included; nanoGPT: the
whole train.py process, the same), ms per iteration (arraygpt's from the per-step records of its
metrics.jsonl, the median after the first 10, as for nanoGPT), the last eval's val and train loss
of each, the CPU seconds of each process tree (with ``--threads N`` about N x wall when the
setting takes effect), the wall ratio arraygpt / nanoGPT (target <= 0.9) and the val-loss
difference (target within 0.02), with the CPU model. ``--threads N`` sets ARRAYGPT_NUM_THREADS=N
for arraygpt and OMP/MKL/OPENBLAS_NUM_THREADS=N for both (unset: each library's default); before
the rounds, each side's thread count is read back from a fresh process with the same environment
(arraygpt's backend, torch.get_num_threads()), and a mismatch stops the run. ``--max-iters N``
shortens both runs (nanoGPT: ``--max_iters=N --lr_decay_iters=N``); below 200 the warmup is N // 2
and below 250 the eval interval is N on both sides, so that each still ends with an eval (nanoGPT's
cosine divides by lr_decay_iters - warmup_iters).

Differences the figures carry (nanoGPT's train.py is run as it is):

- The val-loss estimators differ: both average 20 batches of 12 random windows of 64 tokens per
  split (15,360 tokens, a standard error of roughly 0.01-0.02), but arraygpt draws the same
  windows at every eval (seeded by the run's seed), nanoGPT fresh ones each time from its torch
  generator. Both runs are deterministic, so the rounds repeat the same losses: the difference is
  one draw of each estimator, not a mean over seeds (nanoGPT's seed, 1337, is fixed in train.py;
  ``--seed`` changes arraygpt's, to see its spread).
- nanoGPT also evaluates at iteration 0 (9 evals to arraygpt's 8), and its loop runs 2001
  updates (it stops after ``iter_num > max_iters``); its last eval comes after 2000 updates, as
  arraygpt's does.
- The initial weights and batches differ (PyTorch's and NumPy's generators).

The frame (processes, rounds, medians) is benchmarks/harness.py. Skips with a message when the
data or nanoGPT is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, cpu_model, median, ratio, run_process, spread, thread_env

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data" / "tinyshakespeare.txt"
RUN_RECIPE = SHARED / "peers" / "nanogpt" / "run_recipe.py"
MAX_ITERS, WARMUP, EVAL_INTERVAL, EVAL_BATCHES, SEED = 2000, 100, 250, 20, 1337
SKIP_ITERS = 10  # the first iterations left out of the median ms/iter (run_recipe.py's choice)
SIDES = ("arraygpt", "nanogpt")


def schedule(max_iters: int) -> tuple[int, int]:
    """(warmup, eval interval) of a run of ``max_iters``: the recipe's, shortened for short runs."""
    return (WARMUP if max_iters >= 2 * WARMUP else max_iters // 2), min(EVAL_INTERVAL, max_iters)


def arraygpt_command() -> list[str]:
    script = Path(sys.executable).with_name("arraygpt")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "arraygpt.cli"]


def arraygpt_args(max_iters: int, out_dir: Path, activation: str, seed: int = SEED) -> list[str]:
    warmup, eval_interval = schedule(max_iters)
    return [
        "train",
        "--data",
        str(DATA),
        "--mode",
        "stream",
        "--tokenizer",
        "char",
        "--val-fraction",
        "0.1",
        "--preset",
        "shakespeare-char",
        "--n-layer",
        "4",
        "--n-head",
        "4",
        "--n-embd",
        "128",
        "--block-size",
        "64",
        "--bias",
        "false",
        "--dropout",
        "0",
        "--activation",
        activation,
        "--batch-size",
        "12",
        "--steps",
        str(max_iters),
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--schedule",
        "cosine",
        "--warmup-steps",
        str(warmup),
        "--min-lr",
        "1e-4",
        "--beta1",
        "0.9",
        "--beta2",
        "0.99",
        "--weight-decay",
        "0.1",
        "--grad-clip",
        "1.0",
        "--eval-interval",
        str(eval_interval),
        "--eval-batches",
        str(EVAL_BATCHES),
        "--log-interval",
        "1",
        "--samples",
        "0",
        "--seed",
        str(seed),
        "--backend",
        "numpy",
        "--out-dir",
        str(out_dir),
    ]


def nanogpt_args(max_iters: int) -> list[str]:
    if max_iters == MAX_ITERS:
        return []
    warmup, eval_interval = schedule(max_iters)
    return [
        f"--max_iters={max_iters}",
        f"--lr_decay_iters={max_iters}",
        f"--warmup_iters={warmup}",
        f"--eval_interval={eval_interval}",
    ]


def run_arraygpt(max_iters: int, threads: int | None, activation: str, seed: int) -> dict:
    env = thread_env(threads)
    env.pop("ARRAYGPT_KERNELS", None)
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(tmp) / "run"
        done = run_process([*arraygpt_command(), *arraygpt_args(max_iters, out_dir, activation, seed)], env=env)
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if r["event"] == "train"]  # one per step (--log-interval 1)
    evals = [r for r in records if r["event"] == "eval"]
    step_ms = [1e3 * (b["elapsed"] - a["elapsed"]) for a, b in zip(steps, steps[1:])]
    last = evals[-1]
    return {
        "wall_s": done.wall_s,
        "cpu_s": done.cpu_s,
        "ms_per_iter": median(step_ms[SKIP_ITERS:] or step_ms),
        "val_loss": last["val_loss"],
        "train_loss": last["train_loss"],
        "last_eval_step": last["step"],
        "steps": steps[-1]["step"],
    }


def run_nanogpt(max_iters: int, threads: int | None) -> dict:
    done = run_process([sys.executable, str(RUN_RECIPE), "cpu", *nanogpt_args(max_iters)], env=thread_env(threads))
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "wall_s": out["wall_s"],
        "cpu_s": done.cpu_s,
        "ms_per_iter": out["ms_per_iter"],
        "val_loss": out["val_loss"],
        "train_loss": out["train_loss"],
        "outer_wall_s": done.wall_s,
    }


def threads_in_force(side: str, threads: int | None) -> int:
    """The thread count a fresh process of ``side`` gets in this environment."""
    probe = (
        "import arraygpt.backends.numpy as b; print(b.threads)"
        if side == "arraygpt"
        else "import torch; print(torch.get_num_threads())"
    )
    return int(run_process([sys.executable, "-c", probe], env=thread_env(threads)).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, A then B in each (default 3)")
    parser.add_argument("--max-iters", type=int, default=MAX_ITERS, help="iterations of both runs (default 2000)")
    parser.add_argument("--threads", type=int, default=None, help="threads of both sides (default: each library's)")
    parser.add_argument(
        "--activation",
        default="gelu_tanh",
        choices=["gelu_tanh", "gelu"],
        help="arraygpt's GELU: gelu_tanh (GPT-2's, default) or gelu (exact, nanoGPT's)",
    )
    parser.add_argument("--seed", type=int, default=SEED, help="arraygpt's seed (default 1337, nanoGPT's fixed one)")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()
    if not DATA.is_file():
        print(f"skipped: no {DATA} (tinyshakespeare)")
        return
    if args.max_iters < 2:
        parser.error("--max-iters must be at least 2")
    sides = [s for s in args.sides.split(",") if s]
    if "nanogpt" in sides and (not RUN_RECIPE.is_file() or importlib.util.find_spec("torch") is None):
        print(f"no nanoGPT side: {'PyTorch is not installed' if RUN_RECIPE.is_file() else f'no {RUN_RECIPE}'}")
        sides.remove("nanogpt")
    if not sides:
        print("skipped: no side to run")
        return

    cpu = cpu_model()
    print(f"CPU: {cpu}; Python {platform.python_version()}")
    counts = {}
    for side in sides:
        counts[side] = threads_in_force(side, args.threads)
        if args.threads is not None and counts[side] != args.threads:
            raise SystemExit(f"{side} runs {counts[side]} threads, not the {args.threads} asked for")
    print(
        f"nanoGPT's CPU recipe, {args.max_iters} iterations, {args.rounds} rounds, each side in its own process, "
        f"alternating; threads: " + ", ".join(f"{s} {n}" for s, n in counts.items())
    )
    if "arraygpt" in sides:
        shown = [*arraygpt_command(), *arraygpt_args(args.max_iters, Path("<tmp>"), args.activation, args.seed)]
        print("arraygpt: " + " ".join(shown))
    if "nanogpt" in sides:
        print("nanoGPT:  " + " ".join([sys.executable, str(RUN_RECIPE), "cpu", *nanogpt_args(args.max_iters)]))

    def run_one(side: str, _: int) -> dict:
        if side == "arraygpt":
            return run_arraygpt(args.max_iters, args.threads, args.activation, args.seed)
        return run_nanogpt(args.max_iters, args.threads)

    def show(side: str, r: int, res: dict) -> None:
        print(
            f"  round {r + 1} {side:<8} wall {res['wall_s']:7.1f} s  {res['ms_per_iter']:6.1f} ms/iter  "
            f"val {res['val_loss']:.4f}  train {res['train_loss']:.4f}  cpu {res['cpu_s']:7.1f} s | CPU: {cpu}",
            flush=True,
        )

    results = alternate(sides, args.rounds, run_one, show)
    print(f"medians of {args.rounds} rounds (min-max) | CPU: {cpu}")
    fig = {
        s: {k: [r[k] for r in results[s]] for k in ("wall_s", "ms_per_iter", "val_loss", "train_loss", "cpu_s")}
        for s in sides
    }
    for s in sides:
        f = fig[s]
        print(
            f"  {s:<8} wall {spread(f['wall_s'], unit=' s')}  {spread(f['ms_per_iter'], unit=' ms/iter')}  "
            f"val {spread(f['val_loss'], '.4f')}  train {spread(f['train_loss'], '.4f')}  "
            f"cpu {spread(f['cpu_s'], unit=' s')}"
        )
    summary = {}
    if len(sides) == 2:
        wall = {s: median(fig[s]["wall_s"]) for s in sides}
        val = {s: median(fig[s]["val_loss"]) for s in sides}
        ms = {s: median(fig[s]["ms_per_iter"]) for s in sides}
        summary = {
            "wall_ratio": wall["arraygpt"] / wall["nanogpt"],
            "val_loss_diff": val["arraygpt"] - val["nanogpt"],
            "ms_per_iter_ratio": ms["arraygpt"] / ms["nanogpt"],
        }
        print(
            f"wall arraygpt / nanoGPT {ratio(wall['arraygpt'], wall['nanogpt'])} (target <= 0.9: "
            f"{'met' if summary['wall_ratio'] <= 0.9 else 'NOT met'}); "
            f"ms/iter ratio {ratio(ms['arraygpt'], ms['nanogpt'])}; "
            f"val loss arraygpt - nanoGPT {summary['val_loss_diff']:+.4f} (target within 0.02: "
            f"{'met' if abs(summary['val_loss_diff']) <= 0.02 else 'NOT met'}) | CPU: {cpu}"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "cpu": cpu,
                    "max_iters": args.max_iters,
                    "threads": counts,
                    "activation": args.activation,
                    "seed": args.seed,
                    "rounds": results,
                    **summary,
                }
            )
        )


if __name__ == "__main__":
    main()
