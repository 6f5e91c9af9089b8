"""Time and memory of one fine-tuning step (forward, backward, AdamW update) of a 135M-parameter
Llama-shaped model (``GPTConfig.preset("smollm2-135m")``, random weights, float32), arraygpt
against PyTorch, with every weight trained and with LoRA adapters only.

Sides (each in its own process, alternating, three rounds; figures are the medians of the rounds):

    arraygpt       GPT(...); forward, backward, adamw on every parameter
    torch          transformers' LlamaForCausalLM (SDPA attention), torch.optim.AdamW
    arraygpt-lora  GPT.add_lora(LoRA(rank, alpha)) on attn_wq/attn_wv; adamw on the adapters only
    torch-lora     the same LlamaForCausalLM, every parameter frozen, q_proj and v_proj wrapped by a
                   hand-written LoRA linear (PEFT's lora.Linear: x W^T + (alpha/r) (x A^T) B^T, A
                   kaiming_uniform_(a=sqrt(5)), B zeros); AdamW on A and B only

Each worker reports the median wall time of its timed steps after a warm-up step, its resident
memory after building the model and optimizer (``ready``), and its peak resident memory over the
whole process (``peak``, ru_maxrss: the model, optimizer state, activations and gradients of a
step). Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/finetune_step.py                   # B1 T256, 3 rounds, the cores
    .venv/bin/python benchmarks/finetune_step.py --batch 2 --seq 128 --steps 5 --threads 1

The frame (processes, rounds, medians, CPU model) is benchmarks/harness.py.

Not here: GPU runs, the quality of a fine-tune (tests/test_finetune.py checks the loss falls).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    alternate,
    cpu_model,
    default_threads,
    median,
    ratio,
    run_worker,
    set_torch_threads,
    spread,
    thread_env,
)

SIDES = ("arraygpt", "torch", "arraygpt-lora", "torch-lora")
PRESET = "smollm2-135m"


def _rss_mb() -> float:
    """This process's resident memory now, MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def _arraygpt_step(lora: bool, rank: int, alpha: float, lr: float):
    from arraygpt import GPT, GPTConfig
    from arraygpt.nn.lora import LoRA
    from arraygpt.training.optim import create_optimizer

    model = GPT(GPTConfig.preset(PRESET), seed=0)
    if lora:
        model.add_lora(LoRA(rank, alpha))
    optimizer = create_optimizer("adamw", model.trainable, weight_decay=0.0)
    trained = sum(math.prod(p.shape) for p in model.trainable.values())

    def step(x, y):
        _, loss = model.forward(x, y)
        optimizer.step(model.backward(), lr)
        return loss

    return step, trained


def _torch_step(lora: bool, rank: int, alpha: float, lr: float, threads: int):
    import torch
    import transformers

    from arraygpt import GPTConfig
    from arraygpt.io.hf.llama import config_to_llama

    set_torch_threads(threads)
    torch.manual_seed(0)
    hf_config = {k: v for k, v in config_to_llama(GPTConfig.preset(PRESET)).items() if k != "architectures"}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config)).float()
    model.config._attn_implementation = "sdpa"
    model.train()

    class LoRALinear(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base, self.scale = base, alpha / rank
            self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features))
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x):
            return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scale

    if lora:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers:
            layer.self_attn.q_proj = LoRALinear(layer.self_attn.q_proj)
            layer.self_attn.v_proj = LoRALinear(layer.self_attn.v_proj)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        logits = model(torch.from_numpy(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), torch.from_numpy(y).view(-1))
        loss.backward()
        optimizer.step()
        return float(loss)

    return step, sum(p.numel() for p in params)


def worker(side: str, batch: int, seq: int, steps: int, warmup: int, threads: int, rank: int, alpha: float) -> dict:
    import numpy as np

    lora = side.endswith("-lora")
    lr = 1e-4
    if side.startswith("torch"):
        step, trained = _torch_step(lora, rank, alpha, lr, threads)
    else:
        step, trained = _arraygpt_step(lora, rank, alpha, lr)
    ready = _rss_mb()
    rng = np.random.default_rng(0)
    times, losses = [], []
    for i in range(warmup + steps):
        tokens = rng.integers(0, 49152, (batch, seq + 1))
        t0 = time.perf_counter()
        losses.append(float(step(tokens[:, :-1], tokens[:, 1:])))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if not all(math.isfinite(v) for v in losses):
        raise SystemExit(f"{side}: a loss is not finite: {losses}")
    return {
        "side": side,
        "s": statistics.median(times),
        "ready_mb": ready,
        "peak_mb": _peak_mb(),
        "trained": trained,
        "first_loss": losses[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: the cores this process may use")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (PEFT's default 8)")
    parser.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (PEFT's default 8)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or default_threads()
    if args.worker:
        result = worker(args.worker, args.batch, args.seq, args.steps, args.warmup, threads, args.rank, args.alpha)
        print(json.dumps(result))
        return
    sides = [s for s in args.sides.split(",") if s]
    cpu = cpu_model()
    print(f"CPU: {cpu}; Python {platform.python_version()}; {threads} thread(s)")
    print(
        f"{PRESET} (random weights, float32), batch {args.batch} x {args.seq} tokens, AdamW; LoRA rank {args.rank} "
        f"alpha {args.alpha:g} on attn_wq/attn_wv (q_proj/v_proj); {args.rounds} rounds, each side in its own "
        f"process, alternating; per round the median of {args.steps} steps after {args.warmup} warm-up"
    )
    flags = ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
    flags += [
        "--warmup",
        str(args.warmup),
        "--threads",
        str(threads),
        "--rank",
        str(args.rank),
        "--alpha",
        str(args.alpha),
    ]
    env = thread_env(threads)
    env.pop("ARRAYGPT_BACKEND", None)

    def show(side, r, result):
        print(
            f"  round {r + 1} {side}: {result['s']:.2f} s/step, ready {result['ready_mb']:.0f} MB, "
            f"peak {result['peak_mb']:.0f} MB",
            flush=True,
        )

    results = alternate(sides, args.rounds, lambda side, _: run_worker(__file__, side, flags, env), show)
    print(f"| side | trained parameters | s/step | peak MB | ready MB | time vs torch | CPU: {cpu} |")
    print("|---|---|---|---|---|---|---|")
    summary = {}
    for side in sides:
        rs = results[side]
        sec, peak, ready = [r["s"] for r in rs], [r["peak_mb"] for r in rs], [r["ready_mb"] for r in rs]
        other = "torch-lora" if side.endswith("-lora") else "torch"
        vs = ratio(median(sec), median([r["s"] for r in results[other]])) if other in results and other != side else ""
        print(
            f"| {side} | {rs[0]['trained']:,} | {spread(sec, '.2f')} | "
            f"{median(peak):.0f} | {median(ready):.0f} | {vs} | |"
        )
        summary[side] = {"s": sec, "peak_mb": peak, "ready_mb": ready, "trained": rs[0]["trained"]}
    if args.json:
        print(json.dumps({"cpu": cpu, "threads": threads, "batch": args.batch, "seq": args.seq, "sides": summary}))


if __name__ == "__main__":
    main()
