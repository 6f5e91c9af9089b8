"""Time one forward+backward step of arraygpt against PyTorch eager on the same config.

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/step.py                      # nanogpt-cpu and shakespeare-char
    .venv/bin/python benchmarks/step.py --config nanogpt-cpu --steps 50
    ARRAYGPT_BACKEND=cupy python benchmarks/step.py --config shakespeare-char-b64   # GPU; PyTorch on CUDA

Prints, per config: median ms/step of each side (the two alternate in blocks of steps, three
rounds, so slow drifts of machine load hit both alike), tokens/s, achieved GFLOP/s as a fraction of this machine's measured float32
matmul peak, and the ratio arraygpt / PyTorch (<= 1.0 means arraygpt is as fast or faster).
Both sides use the same weights and the same batches; PyTorch uses the same thread count as BLAS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

import arraygpt
from arraygpt import GPT, GPTConfig, count_params

CONFIGS = {
    # nanoGPT's documented CPU recipe (GPT-2 style with biases, as ../shared/bench/torch_gpt_step.py)
    "nanogpt-cpu": (dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), 12),
    "shakespeare-char": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 8),
    "shakespeare-char-b64": (dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384), 64),  # GPU recipe
    "gpt2": ("gpt2", 8),  # GPU only: 124M parameters, context 1024
    "microgpt": ("microgpt", 1),
    "microgpt-b32": ("microgpt", 32),
}


def config_of(name: str) -> tuple[GPTConfig, int]:
    spec, batch = CONFIGS[name]
    return (GPTConfig.preset(spec) if isinstance(spec, str) else GPTConfig(**spec)), batch


def flops_per_step(config: GPTConfig, B: int) -> float:
    """Forward+backward FLOPs: 6 per parameter per token in the matmuls, plus attention (PaLM's estimate)."""
    counts = count_params(config)
    n = counts.total - counts.by_name["wpe"] + (config.vocab_size * config.n_embd if config.tie_embeddings else 0)
    T = config.block_size
    return B * T * (6 * n + 12 * config.n_layer * config.attn_dim * T)


def matmul_peak_gflops(backend, n: int = 1024, repeats: int = 10) -> float:
    """The float32 matmul ceiling of the active backend (n = 4096 on a GPU, where 1024 is too small)."""
    n = n if backend.device == "cpu" else 4096
    a = backend.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    backend.xp.matmul(a, a)
    backend.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.xp.matmul(a, a)
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def torch_model(config: GPTConfig, state: dict[str, np.ndarray], device: str = "cpu"):
    """The same network in plain PyTorch (eager), loaded with arraygpt's weights."""
    import torch
    import torch.nn.functional as F

    p = {k: torch.nn.Parameter(torch.from_numpy(np.array(v)).to(device)) for k, v in state.items()}
    L, NH, D = config.n_layer, config.n_head, config.attn_dim
    act = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu,
           "relu2": lambda x: F.relu(x).square()}[config.activation]  # fmt: skip

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


def bench(name: str, steps: int, warmup: int, with_torch: bool, peak: float) -> dict:
    config, B = config_of(name)
    model = GPT(config, seed=0)
    rng = np.random.default_rng(0)
    rounds = 3
    per_round = max(1, steps // rounds)
    batches = [rng.integers(0, config.vocab_size, (B, config.block_size + 1)) for _ in range(warmup + per_round)]
    backend = arraygpt.get_backend()

    def ours(batch):
        model.forward(batch[:, :-1], batch[:, 1:])
        model.backward()
        backend.synchronize()

    theirs = None
    if with_torch:
        import torch

        device = "cpu" if backend.device == "cpu" else "cuda"  # PyTorch on the same kind of device
        state = {k: backend.to_numpy(v) for k, v in model.state_dict().items()}
        forward, params = torch_model(config, state, device)

        def theirs(batch):
            for q in params:
                q.grad = None
            t = torch.from_numpy(batch).to(device)
            forward(t[:, :-1], t[:, 1:]).backward()
            if device == "cuda":
                torch.cuda.synchronize()

    # Alternate blocks of steps rather than single steps: OpenBLAS's and PyTorch's thread pools
    # spin for a while after each call, and interleaving single steps makes them fight.
    ours_ms, theirs_ms = [], []
    sides = [(ours, ours_ms)] + ([(theirs, theirs_ms)] if theirs is not None else [])
    for block in range(rounds):
        for run, times in sides:
            for i, batch in enumerate(batches):
                t0 = time.perf_counter()
                run(batch)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e3)
    flops = flops_per_step(config, B)
    med = statistics.median(ours_ms)
    result = {
        "config": name, "backend": backend.name, "batch": B, "params": count_params(config).total,
        "arraygpt_ms": med, "tokens_per_s": B * config.block_size / med * 1e3,
        "gflops": flops / med / 1e6, "peak_fraction": flops / med / 1e6 / peak,
    }  # fmt: skip
    if theirs is not None:
        tmed = statistics.median(theirs_ms)
        result.update(torch_ms=tmed, torch_peak_fraction=flops / tmed / 1e6 / peak, ratio=med / tmed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", choices=list(CONFIGS), help="repeatable; default nanogpt-cpu and shakespeare-char")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch

            torch.set_num_threads(_blas_threads())
        except ImportError:
            with_torch = False
    backend = arraygpt.get_backend()
    peak = matmul_peak_gflops(backend)
    print(f"float32 matmul peak ({backend.name}): {peak:.0f} GFLOP/s")
    for name in args.config or ["nanogpt-cpu", "shakespeare-char"]:
        r = bench(name, args.steps, args.warmup, with_torch, peak)
        line = (f"{name:<17} B={r['batch']:<3} arraygpt[{r['backend']}] {r['arraygpt_ms']:8.2f} ms/step "
                f"{r['tokens_per_s']:>9,.0f} tok/s {r['gflops']:6.1f} GFLOP/s ({r['peak_fraction']:.0%} of peak)")  # fmt: skip
        if "torch_ms" in r:
            line += f" | torch {r['torch_ms']:8.2f} ms ({r['torch_peak_fraction']:.0%}) | ratio {r['ratio']:.2f}"
        print(line)
        if args.json:
            print(json.dumps(r))


def _blas_threads() -> int:
    import os

    return int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


if __name__ == "__main__":
    main()
