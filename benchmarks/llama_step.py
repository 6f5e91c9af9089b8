"""Time one forward+backward step of a Llama-style arraygpt model (RoPE, SwiGLU, grouped-query
attention, RMSNorm, no biases) against the same model in PyTorch eager (SDPA with GQA), on the
same config, weights and batches.

The config is the nanoGPT CPU recipe's size (L4 H4 C128 T64 B12, vocab 65) made Llama-style:
n_kv_head 2 of 4 heads, SwiGLU with hidden size 352 (Llama's 8/3·C rounded up to a multiple of 32,
so the MLP has about the parameters and FLOPs of GPT-2's 4·C MLP), rotary positions (theta 10000),
RMSNorm with a gain, tied embeddings.

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/llama_step.py                      # 2 and 1 threads, three rounds
    .venv/bin/python benchmarks/llama_step.py --threads 1 --steps 30 --sides kernels,torch

Each side runs in its own process (two libraries in one process let one's idle thread pool spin
beside the other's), the sides alternate, three rounds; each round reports the median of its
steps after a warm-up, and the table shows the median of the rounds per side (min-max over the
rounds), the median process CPU time per step, and the ratio to PyTorch (< 1: arraygpt is
faster). The CPU model (lscpu) is printed beside every figure. Before timing, each PyTorch
process checks that its loss equals arraygpt's on the first batch (float32, 1e-4), so both sides
compute the same network. PyTorch's grouped attention uses ``enable_gqa=True`` where SDPA has it
(torch >= 2.5), else repeat_interleave of the key/value heads.

``--threads N`` sets ARRAYGPT_NUM_THREADS=N for arraygpt, OMP/MKL/OPENBLAS_NUM_THREADS=N for
both, and torch.set_num_threads(N) for PyTorch. The frame (processes, rounds, medians) is
benchmarks/harness.py, shared with step.py, generate_bench.py and nanogpt_recipe.py.

Not here: GPU runs (benchmarks/step.py covers CuPy), other configs, plots.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, cpu_model, median, ratio, run_worker, set_torch_threads, spread, thread_env

CONFIG = dict(
    vocab_size=65,
    block_size=64,
    n_layer=4,
    n_head=4,
    n_kv_head=2,
    n_embd=128,
    mlp_hidden=352,
    position="rope",
    rope_theta=10000.0,
    mlp="swiglu",
    norm="rmsnorm",
    norm_eps=1e-5,
    bias=False,
    tie_embeddings=True,
)
BATCH = 12
SIDES = ("kernels", "reference", "torch")


def flops_per_step(config, B: int) -> float:
    """Forward+backward FLOPs: 6 per parameter per token in the matmuls (the unembedding too),
    plus causal attention's QK^T and PV at full T (PaLM's estimate)."""
    from arraygpt import count_params

    n = count_params(config).total + (config.vocab_size * config.n_embd if config.tie_embeddings else 0)
    T = config.block_size
    return B * T * (6 * n + 12 * config.n_layer * config.attn_dim * T)


def torch_model(config, state: dict):
    """The same network in plain PyTorch (eager, SDPA with GQA), loaded with arraygpt's weights."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    p = {k: torch.nn.Parameter(torch.from_numpy(np.array(v))) for k, v in state.items()}
    NH, NKV, hs = config.n_head, config.n_kv_head, config.head_dim
    T = config.block_size
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hs, 2, dtype=torch.float64) / hs))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)  # (T, hs/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, hs): transformers' rotate_half layout
    cos_all, sin_all = emb.cos().float(), emb.sin().float()
    try:
        F.scaled_dot_product_attention(*(torch.zeros(1, n, 1, 2) for n in (2, 1, 1)), is_causal=True, enable_gqa=True)
        gqa = "enable_gqa"
    except TypeError:
        gqa = "repeat_interleave"

    def rotate_half(x):
        x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
        return torch.cat([-x2, x1], dim=-1)

    def forward(idx, targets):
        B, T = idx.shape
        cos, sin = cos_all[:T], sin_all[:T]
        x = p["wte"][idx]  # (B, T, C)
        for i in range(config.n_layer):
            n = f"layer{i}."
            h = F.rms_norm(x, (config.n_embd,), p[n + "norm1"], config.norm_eps)
            q = F.linear(h, p[n + "attn_wq"]).view(B, T, NH, hs).transpose(1, 2)  # (B, NH, T, hs)
            k = F.linear(h, p[n + "attn_wk"]).view(B, T, NKV, hs).transpose(1, 2)  # (B, NKV, T, hs)
            v = F.linear(h, p[n + "attn_wv"]).view(B, T, NKV, hs).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if gqa == "enable_gqa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                k, v = (t.repeat_interleave(NH // NKV, dim=1) for t in (k, v))
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, NH * hs), p[n + "attn_wo"])
            h = F.rms_norm(x, (config.n_embd,), p[n + "norm2"], config.norm_eps)
            x = x + F.linear(F.silu(F.linear(h, p[n + "mlp_gate"])) * F.linear(h, p[n + "mlp_up"]), p[n + "mlp_down"])
        x = F.rms_norm(x, (config.n_embd,), p["normf"], config.norm_eps)
        logits = F.linear(x, p["wte"] if config.tie_embeddings else p["lm_head"])
        return F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1))

    return forward, list(p.values()), gqa


def worker(side: str, steps: int, warmup: int, threads: int) -> dict:
    """One side's round in this process: the median ms of ``steps`` steps after ``warmup``."""
    import numpy as np

    from arraygpt import GPT, GPTConfig

    config = GPTConfig(**CONFIG)
    model = GPT(config, seed=0, kernels="reference" if side == "reference" else None)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (BATCH, config.block_size + 1)) for _ in range(warmup + steps)]
    extra = {}
    if side == "torch":
        import torch

        set_torch_threads(threads)
        _, expected = model.forward(batches[0][:, :-1], batches[0][:, 1:])
        state = {k: np.asarray(v) for k, v in model.state_dict().items()}
        del model
        forward, params, gqa = torch_model(config, state)
        t = torch.from_numpy(batches[0])
        got = float(forward(t[:, :-1], t[:, 1:]))
        if abs(got - float(expected)) > 1e-4:
            raise SystemExit(f"PyTorch's loss {got} differs from arraygpt's {float(expected)}: not the same network")
        extra = {"gqa": gqa, "torch": torch.__version__}

        def run(batch):
            for q in params:
                q.grad = None
            t = torch.from_numpy(batch)
            forward(t[:, :-1], t[:, 1:]).backward()
    else:

        def run(batch):
            model.forward(batch[:, :-1], batch[:, 1:])
            model.backward()

    times, cpu = [], []
    for i, batch in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        run(batch)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    return {"side": side, "threads": threads, "ms": statistics.median(times), "cpu_ms": statistics.median(cpu), **extra}


def run_side(side: str, steps: int, warmup: int, threads: int) -> dict:
    env = thread_env(threads)
    env.pop("ARRAYGPT_KERNELS", None)
    env.pop("ARRAYGPT_BACKEND", None)  # CPU: NumPy
    return run_worker(__file__, side, ["--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)], env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--threads", type=int, action="append", help="repeatable; default 2 and 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.threads[0])))
        return
    from arraygpt import GPTConfig

    sides = [s for s in args.sides.split(",") if s]
    if "torch" in sides:
        try:
            import torch  # noqa: F401
        except ImportError:
            sides.remove("torch")
    config = GPTConfig(**CONFIG)
    cpu = cpu_model()
    print(f"CPU: {cpu}; Python {platform.python_version()}")
    print(
        f"llama-style L{config.n_layer} H{config.n_head}/{config.n_kv_head}kv C{config.n_embd} "
        f"T{config.block_size} B{BATCH} swiglu H={config.mlp_hidden} rope rmsnorm, "
        f"{flops_per_step(config, BATCH) / 1e9:.2f} GFLOP/step"
    )
    print(
        f"{args.rounds} rounds, each side in its own process, alternating; per round the median of "
        f"{args.steps} steps after {args.warmup} warm-up; shown: median of the rounds (min-max)"
    )
    for threads in args.threads or [2, 1]:
        results = alternate(sides, args.rounds, lambda side, _: run_side(side, args.steps, args.warmup, threads))
        rounds = {s: [r["ms"] for r in results[s]] for s in sides}
        cpu_ms = {s: [r["cpu_ms"] for r in results[s]] for s in sides}
        info = {k: r[k] for rs in results.values() for r in rs for k in ("gqa", "torch") if k in r}
        med = {s: median(v) for s, v in rounds.items()}
        cells = []
        for s in sides:
            cell = f"{s} {spread(rounds[s], unit=' ms')}, cpu {median(cpu_ms[s]):.1f} ms"
            if "torch" in med and s != "torch":
                cell += f" ratio {ratio(med[s], med['torch'])}"
            cells.append(cell)
        torch_note = f" [torch {info['torch']}, SDPA {info['gqa']}]" if "torch" in info else ""
        print(f"threads={threads} | " + " | ".join(cells) + f" | CPU: {cpu}{torch_note}", flush=True)
        if args.json:
            print(
                json.dumps(
                    {
                        "config": CONFIG,
                        "batch": BATCH,
                        "threads": threads,
                        "cpu": cpu,
                        "rounds": rounds,
                        "cpu_ms": cpu_ms,
                        "median_ms": med,
                        **info,
                    }
                )
            )


if __name__ == "__main__":
    main()
