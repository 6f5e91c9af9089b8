"""nanoGPT's CPU recipe for shakespeare_char in plain PyTorch, as the reference for
benchmarks/train_shakespeare_char.py.

Run by hand (timings are not tests):

    .venv/bin/python benchmarks/torch_shakespeare_char.py --seed 1337

Everything but the arithmetic is shared with the arraygpt run of the same seed: arraygpt's
character tokenizer and 90/10 split, its batcher (the same random windows), its initial weights
(drawn as nanoGPT draws them: N(0, 0.02), output projections N(0, 0.02/sqrt(2 n_layer))) and its
whole-split evaluation. The model is benchmarks/step.py's PyTorch network (no biases, tanh GELU,
tied embeddings), trained by torch.optim.AdamW (nanoGPT's decay groups: 2-D weights only),
nanoGPT's warmup + cosine schedule and torch.nn.utils.clip_grad_norm_. The two runs therefore
compute the same thing, and their val losses differ only by float32 rounding.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from step import torch_model

from arraygpt import GPT, GPTConfig
from arraygpt.training.data import Batcher, default_tokenizer, make_dataset, read_source
from arraygpt.training.optim import Schedule

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
STEPS, BATCH, WARMUP, LR, MIN_LR = 2000, 12, 100, 1e-3, 1e-4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    text = read_source(args.data)
    tokenizer = default_tokenizer("char", text, "stream")
    lr_at = Schedule("cosine", LR, STEPS, WARMUP, MIN_LR)  # the arraygpt run's (nanoGPT's get_lr)
    config = GPTConfig.preset(
        "shakespeare-char", vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False
    )
    dataset = make_dataset(text, tokenizer, "stream", config.block_size, 0.1)
    batcher = Batcher(dataset, BATCH, seed=args.seed)
    state = {k: np.asarray(v) for k, v in GPT(config, seed=args.seed).state_dict().items()}
    forward, params = torch_model(config, state)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.99),
        eps=1e-8,
    )

    times = []
    t0 = time.perf_counter()
    for step in range(STEPS):
        t_step = time.perf_counter()
        x, y = (torch.from_numpy(a) for a in batcher.next())
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        times.append(time.perf_counter() - t_step)
    wall = time.perf_counter() - t0

    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in dataset.eval_batches("val", BATCH, None, seed=args.seed):
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            n = int((y >= 0).sum())
            total += float(forward(x, y)) * n  # forward gives the mean over the batch's positions
            count += n
    print(
        f"seed {args.seed}: val loss {total / count:.4f} (the whole val split), "
        f"wall {wall:.1f} s, median {1e3 * statistics.median(times):.1f} ms/iter"
    )


if __name__ == "__main__":
    main()
