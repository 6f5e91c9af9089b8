"""Time generation: 256 new tokens at batch 1 from a shakespeare-char model (random weights).

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/generate_bench.py                 # numpy (or $ARRAYGPT_BACKEND)
    .venv/bin/python benchmarks/generate_bench.py --repeats 5 --json
    ARRAYGPT_BACKEND=cupy python benchmarks/generate_bench.py      # on a GPU machine

Measures, as the median over ``--repeats`` runs, the tokens per second of:

- arraygpt with the KV cache (``generate(..., use_cache=True)``, the default);
- arraygpt without it (``use_cache=False``: the whole context rerun for every token);
- when PyTorch is installed, the same network with the same weights in a plain PyTorch loop with
  a KV cache (eager, ``torch.no_grad``, the same thread count as BLAS), checked to give the same
  logits as arraygpt;
- when transformers is installed too, ``GPT2LMHeadModel.generate(use_cache=True, do_sample=True)``
  on a GPT2Config of the same size (GPT-2 has biases, so it has slightly more parameters).

All runs sample at temperature 1 from a one-token prompt, so the 256 tokens fill the 256-position
block exactly. Prints the medians and the ratios; targets: cache / no cache >= 5, and arraygpt
with the cache no slower than the PyTorch loop on the CPU (ratio arraygpt / torch >= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

import arraygpt
from arraygpt import GPT, GPTConfig

NEW_TOKENS = 256


def time_runs(fn: Callable[[int], int], n_new: int, repeats: int) -> list[float]:
    """Tokens per second of each of ``repeats`` calls of ``fn(n_new)`` (which returns the tokens made)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn(n_new)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def arraygpt_runner(model: GPT, use_cache: bool) -> Callable[[int], int]:
    def run(n_new: int) -> int:
        n = sum(1 for _ in arraygpt.generate(model, [0], n_new, seed=0, use_cache=use_cache))
        model.backend.synchronize()
        return n

    return run


def torch_kv_model(config: GPTConfig, state: dict[str, np.ndarray]) -> Callable:
    """The same network in plain PyTorch with a KV cache: forward(idx (B, T), cache) -> logits of
    the last position (B, V); ``cache`` is a list of per-layer (k, v), filled as it goes."""
    import torch
    import torch.nn.functional as F

    p = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    L, NH, D, C = config.n_layer, config.n_head, config.attn_dim, config.n_embd
    w_qkv = [torch.cat([p[f"layer{i}.attn_wq"], p[f"layer{i}.attn_wk"], p[f"layer{i}.attn_wv"]]) for i in range(L)]
    b_qkv = [torch.cat([p[f"layer{i}.attn_wq_b"], p[f"layer{i}.attn_wk_b"], p[f"layer{i}.attn_wv_b"]])
             if config.bias else None for i in range(L)]  # fmt: skip
    unembed = p["wte"] if config.tie_embeddings else p["lm_head"]

    def norm(x, name):
        return F.layer_norm(x, (C,), p.get(name), p.get(name + "_b"), config.norm_eps)

    @torch.no_grad()
    def forward(idx, cache):
        B, T = idx.shape
        past = cache[0][0].shape[2] if cache else 0
        x = p["wte"][idx] + p["wpe"][past : past + T]
        for i in range(L):
            n = f"layer{i}."
            q, k, v = F.linear(norm(x, n + "norm1"), w_qkv[i], b_qkv[i]).split(D, dim=2)
            q, k, v = (t.view(B, T, NH, -1).transpose(1, 2) for t in (q, k, v))  # (B, NH, T, hs)
            if len(cache) > i:
                k = torch.cat([cache[i][0], k], dim=2)
                v = torch.cat([cache[i][1], v], dim=2)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, NH, T, hs)
            x = x + F.linear(y.transpose(1, 2).reshape(B, T, D), p[n + "attn_wo"], p.get(n + "attn_wo_b"))
            h = F.gelu(F.linear(norm(x, n + "norm2"), p[n + "mlp_fc1"], p.get(n + "mlp_fc1_b")), approximate="tanh")
            x = x + F.linear(h, p[n + "mlp_fc2"], p.get(n + "mlp_fc2_b"))
        return F.linear(norm(x[:, -1, :], "normf"), unembed)  # (B, V)

    return forward


def torch_runner(forward: Callable) -> Callable[[int], int]:
    import torch

    def run(n_new: int) -> int:
        gen = torch.Generator().manual_seed(0)
        cache: list = []
        idx = torch.zeros((1, 1), dtype=torch.int64)
        with torch.no_grad():
            logits = forward(idx, cache)
            for step in range(n_new):
                probs = torch.softmax(logits, dim=-1)
                idx = torch.multinomial(probs, 1, generator=gen)  # (1, 1)
                if step < n_new - 1:
                    logits = forward(idx, cache)
        return n_new

    return run


def hf_runner(config: GPTConfig) -> Callable[[int], int]:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    hf_config = transformers.GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                                        n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                        activation_function="gelu_new", bos_token_id=0, eos_token_id=None)  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    prompt = torch.zeros((1, 1), dtype=torch.int64)

    def run(n_new: int) -> int:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                                 min_new_tokens=n_new, do_sample=True, top_k=0, use_cache=True,
                                 pad_token_id=0)  # fmt: skip
        return out.shape[1] - 1

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens per run (default 256)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparisons")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args()

    config = GPTConfig.preset("shakespeare-char")
    model = GPT(config, seed=0, dtype=args.dtype)
    n_new = min(args.new_tokens, config.block_size)
    runners: dict[str, Callable[[int], int]] = {
        "arraygpt (KV cache)": arraygpt_runner(model, True),
        "arraygpt (no cache)": arraygpt_runner(model, False),
    }
    threads = None
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("PyTorch is not installed: no PyTorch comparison")
        else:
            threads = int(os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
            torch.set_num_threads(threads)
            state = {k: model.backend.to_numpy(v) for k, v in model.state_dict().items()}
            forward = torch_kv_model(config, state)
            check = np.abs(forward(torch.tensor([[0, 5, 7]]), []).numpy()
                           - model.backend.to_numpy(model.forward([[0, 5, 7]])[0])[:, -1]).max()  # fmt: skip
            print(f"PyTorch loop vs arraygpt logits: max |diff| = {check:.2e}")
            runners["PyTorch loop (KV cache)"] = torch_runner(forward)
            if not args.no_hf:
                try:
                    runners["transformers generate"] = hf_runner(config)
                except ImportError:
                    print("transformers is not installed: no GPT2LMHeadModel.generate comparison")

    print(f"shakespeare-char ({model.num_params():,} parameters, {args.dtype}), batch 1, {n_new} new tokens, "
          f"backend {model.backend.name}, {args.repeats} runs each" + (f", torch threads {threads}" if threads else ""))  # fmt: skip
    for run in runners.values():  # warm up: first calls import, allocate and pick kernels
        run(16)
    results = {}
    for name, run in runners.items():
        rates = time_runs(run, n_new, args.repeats)
        results[name] = statistics.median(rates)
        print(f"  {name:<26} {results[name]:9.1f} tokens/s   (runs: {', '.join(f'{r:.1f}' for r in rates)})")
    cached, uncached = results["arraygpt (KV cache)"], results["arraygpt (no cache)"]
    ratios = {"cache / no cache": cached / uncached}
    for name in ("PyTorch loop (KV cache)", "transformers generate"):
        if name in results:
            ratios[f"arraygpt cache / {name}"] = cached / results[name]
    print("ratios (>= 1 means arraygpt with the cache is faster):")
    for name, value in ratios.items():
        print(f"  {name:<45} {value:6.2f}x")
    print(f"targets: cache / no cache >= 5: {'met' if ratios['cache / no cache'] >= 5 else 'NOT met'}"
          + (f"; no slower than the PyTorch loop: {'met' if ratios['arraygpt cache / PyTorch loop (KV cache)'] >= 1 else 'NOT met'}"
             if "arraygpt cache / PyTorch loop (KV cache)" in ratios else ""))  # fmt: skip
    if args.json:
        print(json.dumps({"tokens_per_s": results, "ratios": ratios, "dtype": args.dtype, "new_tokens": n_new,
                          "backend": model.backend.name, "torch_threads": threads}))  # fmt: skip


if __name__ == "__main__":
    main()
