"""The microgpt preset on the built-in names data: the loss curve, the final samples, and the
model time of one training step.

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/train_microgpt.py                      # the default job's settings
    .venv/bin/python benchmarks/train_microgpt.py --steps 20 --every 5 # a quick check
    .venv/bin/python benchmarks/train_microgpt.py --data ../shared/data/names.txt

Trains exactly what ``arraygpt train`` (no arguments) trains: the microgpt preset (1 layer,
4 heads, 16 wide, context 8, RMSNorm, ReLU, 4,064 parameters with vocabulary 27), documents mode
(each name wrapped in BOS), Adam lr 1e-2 with betas (0.9, 0.95) decaying linearly to 0, batch 64,
5000 steps. Prints the mean training loss every ``--every`` steps, the train/val loss at the end,
the samples, and the wall time.

Then times one training step of the model alone (forward, backward and the Adam update, no data
loading), median over ``--repeats`` steps, at batch 1 (microgpt's one name per step, 8 positions)
and at the training batch. Target: well under a millisecond at batch 1; microgpt itself (scalar
autograd in pure Python) takes about 250 ms per step on this kind of machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import arraygpt
from arraygpt import hookimpl
from arraygpt.manager import get_plugin_manager
from arraygpt.training.optim import create_optimizer


class LossCurve:
    def __init__(self, every: int):
        self.every, self.losses, self.points = every, [], []

    @hookimpl
    def arraygpt_on_step(self, step, metrics):
        self.losses.append(metrics["loss"])
        if step % self.every == 0:
            self.points.append((step, float(np.mean(self.losses[-self.every :]))))
            print(f"step {step:>5}  loss {self.points[-1][1]:.4f}  lr {metrics['lr']:.2e}", flush=True)


def time_model_step(model, batch: int, repeats: int) -> float:
    """Median seconds of forward + backward + Adam update on random token ids."""
    rng = np.random.default_rng(0)
    T, V = model.config.block_size, model.config.vocab_size
    opt = create_optimizer("adam", model.params, betas=(0.9, 0.95))
    model.train()
    times = []
    for _ in range(repeats):
        idx = rng.integers(0, V, (batch, T))
        targets = rng.integers(0, V, (batch, T))
        t0 = time.perf_counter()
        model.forward(idx, targets)
        opt.step(model.backward(), 1e-3)
        model.backend.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="names", help="names (built in) or a file of one name per line")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--every", type=int, default=250, help="print the loss every N steps")
    parser.add_argument("--repeats", type=int, default=500, help="steps to time the model on")
    args = parser.parse_args()

    curve = LossCurve(args.every)
    pm = get_plugin_manager(autoload=False)
    pm.register(curve, name="loss-curve")
    t0 = time.perf_counter()
    run = arraygpt.train(
        args.data,
        mode="documents",
        config="microgpt",
        steps=args.steps,
        batch_size=args.batch_size,
        eval_interval=args.steps,
        log_interval=args.steps,
        eval_batches=0,
        progress=False,
        plugin_manager=pm,
    )
    wall = time.perf_counter() - t0
    final = [r for r in run.history if r["event"] == "eval"][-1]
    print(
        f"\nfinal: train loss {final['train_loss']:.4f}  val loss {final['val_loss']:.4f} (whole splits)  "
        f"wall {wall:.1f} s for {run.step} steps of batch {args.batch_size}"
    )
    print("samples:", ", ".join(run.samples))

    for batch in (1, args.batch_size):
        model = arraygpt.GPT(run.model.config, seed=0)
        median = time_model_step(model, batch, args.repeats)
        print(
            f"model time of one training step, batch {batch} x {model.config.block_size} positions: "
            f"{median * 1e3:.3f} ms (median of {args.repeats})"
        )


if __name__ == "__main__":
    main()
