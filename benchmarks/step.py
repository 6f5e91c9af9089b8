"""Time one forward+backward step of arraygpt (with its kernels, and the pure reference) against
PyTorch eager with scaled_dot_product_attention, on the same config, weights and batches.

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/step.py                          # nanogpt-cpu and shakespeare-char, 2 and 1 threads
    .venv/bin/python benchmarks/step.py --config nanogpt-cpu --threads 2 --steps 20
    .venv/bin/python benchmarks/step.py --sides kernels,reference  # without PyTorch
    .venv/bin/python benchmarks/step.py --sides kernels,kernels-openblas,torch  # MKL's products and OpenBLAS's

``kernels`` runs arraygpt as installed (with the ``mkl`` extra on an Intel CPU, its linear
layers' products are MKL's); ``kernels-openblas`` the same with ``ARRAYGPT_GEMM=numpy``.
    ARRAYGPT_BACKEND=cupy python benchmarks/step.py --config shakespeare-char-b64 --sides kernels,torch

Each side runs in its own process (two libraries in one process let one's idle thread pool spin
beside the other's), the sides alternate, three rounds; each round reports the median of its
steps after a warm-up, and the table shows the median of the three rounds per side and the ratio
to PyTorch (< 1: arraygpt is faster), with the range over the rounds and the median process CPU
time per step (less sensitive than wall time to other load on the machine, but it counts spinning
threads too). The CPU model and thread counts are printed with the figures.
``--threads N`` sets ARRAYGPT_NUM_THREADS=N for arraygpt, OMP/MKL/OPENBLAS_NUM_THREADS=N for
both, and torch.set_num_threads(N) for PyTorch. The frame (processes, rounds, medians) is
benchmarks/harness.py, shared with llama_step.py, generate_bench.py and nanogpt_recipe.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, cpu_model, median, ratio, run_worker, set_torch_threads, spread, thread_env

CONFIGS = {
    # nanoGPT's documented CPU recipe (GPT-2 style with biases, as ../shared/bench/torch_gpt_step.py)
    "nanogpt-cpu": (dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), 12),
    "shakespeare-char": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 8),
    "shakespeare-char-b64": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 64),  # GPU recipe
    "gpt2": ("gpt2", 8),  # GPU only: 124M parameters, context 1024
    "microgpt": ("microgpt", 1),
    "microgpt-b32": ("microgpt", 32),
}
SIDES = ("kernels", "kernels-openblas", "reference", "torch")  # kernels-openblas: ARRAYGPT_GEMM=numpy


def config_of(name: str):
    from arraygpt import GPTConfig

    spec, batch = CONFIGS[name]
    return (GPTConfig.preset(spec) if isinstance(spec, str) else GPTConfig(**spec)), batch


def flops_per_step(config, B: int) -> float:
    """Forward+backward FLOPs: 6 per parameter per token in the matmuls, plus attention (PaLM's estimate)."""
    from arraygpt import count_params

    counts = count_params(config)
    n = (
        counts.total
        - counts.by_name.get("wpe", 0)
        + (config.vocab_size * config.n_embd if config.tie_embeddings else 0)
    )
    T = config.block_size
    return B * T * (6 * n + 12 * config.n_layer * config.attn_dim * T)


def torch_model(config, state: dict, device: str = "cpu"):
    """The same network in plain PyTorch (eager, SDPA), loaded with arraygpt's weights."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    p = {k: torch.nn.Parameter(torch.from_numpy(np.array(v)).to(device)) for k, v in state.items()}
    L, NH, D = config.n_layer, config.n_head, config.attn_dim
    act = {
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu": F.gelu,
        "relu": F.relu,
        "relu2": lambda x: F.relu(x).square(),
    }[config.activation]

    def norm(x, name):
        w, b = p.get(name), p.get(name + "_b")
        if config.norm == "layernorm":
            return F.layer_norm(x, (config.n_embd,), w, b, config.norm_eps)
        return F.rms_norm(x, (config.n_embd,), w, config.norm_eps) + (0 if b is None else b)

    def forward(idx, targets):
        B, T = idx.shape
        x = p["wte"][idx] + p["wpe"][:T]
        if config.norm_emb:
            x = norm(x, "norm_emb")
        for i in range(L):
            n = f"layer{i}."
            h = norm(x, n + "norm1")
            w = torch.cat([p[n + "attn_wq"], p[n + "attn_wk"], p[n + "attn_wv"]])
            b = torch.cat([p[n + "attn_wq_b"], p[n + "attn_wk_b"], p[n + "attn_wv_b"]]) if config.bias else None
            q, k, v = F.linear(h, w, b).split(D, dim=2)
            q, k, v = (t.view(B, T, NH, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
            x = x + F.linear(y, p[n + "attn_wo"], p.get(n + "attn_wo_b"))
            h = act(F.linear(norm(x, n + "norm2"), p[n + "mlp_fc1"], p.get(n + "mlp_fc1_b")))
            x = x + F.linear(h, p[n + "mlp_fc2"], p.get(n + "mlp_fc2_b"))
        if config.norm_final:
            x = norm(x, "normf")
        logits = F.linear(x, p["wte"] if config.tie_embeddings else p["lm_head"])
        return F.cross_entropy(logits.view(B * T, -1), targets.reshape(-1))

    return forward, list(p.values())


def worker(side: str, name: str, steps: int, warmup: int, threads: int) -> dict:
    """One side's round in this process: the median ms of ``steps`` steps after ``warmup``."""
    import numpy as np

    import arraygpt
    from arraygpt import GPT

    config, B = config_of(name)
    backend = arraygpt.get_backend()
    model = GPT(config, seed=0, kernels=None if side.startswith("kernels") else "reference")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.vocab_size, (B, config.block_size + 1)) for _ in range(warmup + steps)]
    if side == "torch":
        import torch

        set_torch_threads(threads)
        device = "cpu" if backend.device == "cpu" else "cuda"
        state = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
        del model
        forward, params = torch_model(config, state, device)

        def run(batch):
            for q in params:
                q.grad = None
            t = torch.from_numpy(batch).to(device)
            forward(t[:, :-1], t[:, 1:]).backward()
            if device == "cuda":
                torch.cuda.synchronize()
    else:

        def run(batch):
            model.forward(batch[:, :-1], batch[:, 1:])
            model.backward()
            backend.synchronize()

    times, cpu = [], []
    for i, batch in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        run(batch)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
    return {
        "side": side,
        "config": name,
        "threads": threads,
        "ms": statistics.median(times),
        "cpu_ms": statistics.median(cpu),
    }


def run_side(side: str, name: str, steps: int, warmup: int, threads: int) -> dict:
    env = thread_env(threads)
    env.pop("ARRAYGPT_KERNELS", None)
    env.pop("ARRAYGPT_GEMM", None)
    if side == "kernels-openblas":
        env["ARRAYGPT_GEMM"] = "numpy"  # NumPy's BLAS, where "kernels" takes MKL if installed on Intel
    if side == "torch":
        env["ARRAYGPT_MALLOC_TUNING"] = (
            "0"  # PyTorch keeps its own allocator's behaviour (arraygpt only builds the weights)
        )
    args = ["--config", name, "--steps", str(steps), "--warmup", str(warmup), "--threads", str(threads)]
    return run_worker(__file__, side, args, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", action="append", choices=list(CONFIGS), help="repeatable; default nanogpt-cpu and shakespeare-char"
    )
    parser.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, from {', '.join(SIDES)}")
    parser.add_argument("--threads", type=int, action="append", help="repeatable; default 2 and 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.config[0], args.steps, args.warmup, args.threads[0])))
        return
    sides = [s for s in args.sides.split(",") if s]
    if "torch" in sides and importlib.util.find_spec("torch") is None:
        sides.remove("torch")
    cpu = cpu_model()
    print(f"CPU: {cpu}; Python {platform.python_version()}")
    print(
        f"{args.rounds} rounds, each side in its own process, alternating; per round the median of "
        f"{args.steps} steps after {args.warmup} warm-up; shown: median of the rounds (min-max)"
    )
    for name in args.config or ["nanogpt-cpu", "shakespeare-char"]:
        config, B = config_of(name)
        flops = flops_per_step(config, B)
        for threads in args.threads or [2, 1]:
            results = alternate(
                sides, args.rounds, lambda side, _: run_side(side, name, args.steps, args.warmup, threads)
            )
            rounds = {s: [r["ms"] for r in results[s]] for s in sides}
            cpu_ms = {s: [r["cpu_ms"] for r in results[s]] for s in sides}
            med = {s: median(v) for s, v in rounds.items()}
            cells = []
            for s in sides:
                cell = f"{s} {spread(rounds[s], unit=' ms')}, cpu {median(cpu_ms[s]):.1f} ms"
                if "torch" in med and s != "torch":
                    cell += f" ratio {ratio(med[s], med['torch'])}"
                cells.append(cell)
            print(
                f"{name:<17} B={B:<3} threads={threads} {flops / 1e9:.1f} GFLOP | "
                + " | ".join(cells)
                + f" | CPU: {cpu}",
                flush=True,
            )
            if args.json:
                print(
                    json.dumps(
                        {
                            "config": name,
                            "batch": B,
                            "threads": threads,
                            "cpu": cpu,
                            "rounds": rounds,
                            "cpu_ms": cpu_ms,
                            "median_ms": med,
                        }
                    )
                )


if __name__ == "__main__":
    main()
