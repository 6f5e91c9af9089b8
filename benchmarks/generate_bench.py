"""Time generation: 256 new tokens at batch 1 from a shakespeare-char model (random weights).

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/generate_bench.py                 # numpy (or $ARRAYGPT_BACKEND), 3 rounds
    .venv/bin/python benchmarks/generate_bench.py --threads 1 --repeats 5 --json
    .venv/bin/python benchmarks/generate_bench.py --rounds 1 --repeats 1 --new-tokens 32   # a quick check
    ARRAYGPT_BACKEND=cupy python benchmarks/generate_bench.py      # on a GPU machine

Measures the tokens per second of:

- ``cache``: arraygpt with the KV cache (``generate(..., use_cache=True)``, the default);
- ``nocache``: arraygpt without it (``use_cache=False``: the whole context rerun for every token);
- ``torch``, when PyTorch is installed: the same network with the same weights (arraygpt's seeded
  init, built in that process) in a plain PyTorch loop with a KV cache (eager, ``torch.no_grad``),
  checked to give the same logits as arraygpt on a fixed prompt (the arraygpt processes save theirs
  to a temporary .npy file, which the PyTorch process compares against);
- ``hf``, when transformers is installed too: ``GPT2LMHeadModel.generate(use_cache=True,
  do_sample=True)`` on a GPT2Config of the same size (GPT-2 has biases, so slightly more parameters).

``--variants cache,torch`` runs only those (the no-cache variant alone takes most of a full run).
Each variant runs in its own process (two libraries in one process let one's idle thread pool spin
beside the other's), the variants alternate, ``--rounds`` rounds (default 3); in each process one
warm-up run of 16 tokens, then the median of ``--repeats`` timed runs (default 3). Shown: the median
of the rounds (min-max), the ratios of the medians, and the CPU model. ``--threads N`` (default:
the cores this process may use) sets ARRAYGPT_NUM_THREADS=N, OMP/MKL/OPENBLAS_NUM_THREADS=N and
torch.set_num_threads(N). All runs sample at temperature 1 from a one-token prompt, so the 256
tokens fill the 256-position block exactly. Targets: cache / no cache >= 5, and arraygpt with the
cache at least 1.2x the PyTorch loop's tokens/s on the CPU (issue 11). The frame
(processes, rounds, medians) is benchmarks/harness.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    alternate,
    cpu_model,
    default_threads,
    median,
    run_worker,
    set_torch_threads,
    spread,
    thread_env,
)

if TYPE_CHECKING:
    from arraygpt import GPT, GPTConfig

NEW_TOKENS = 256
VARIANTS = {
    "cache": "arraygpt (KV cache)",
    "nocache": "arraygpt (no cache)",
    "torch": "PyTorch loop (KV cache)",
    "hf": "transformers generate",
}
PROMPT = [[0, 5, 7]]  # the logits check's prompt
LOGITS_TOLERANCE = {"float32": 1e-3, "float64": 1e-9}


def time_runs(fn: Callable[[int], int], n_new: int, repeats: int) -> list[float]:
    """Tokens per second of each of ``repeats`` calls of ``fn(n_new)`` (which returns the tokens made)."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = fn(n_new)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def arraygpt_runner(model: GPT, use_cache: bool) -> Callable[[int], int]:
    import arraygpt

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
    b_qkv = [
        torch.cat([p[f"layer{i}.attn_wq_b"], p[f"layer{i}.attn_wk_b"], p[f"layer{i}.attn_wv_b"]])
        if config.bias
        else None
        for i in range(L)
    ]
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
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        bos_token_id=0,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    prompt = torch.zeros((1, 1), dtype=torch.int64)

    def run(n_new: int) -> int:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=True,
                top_k=0,
                use_cache=True,
                pad_token_id=0,
            )
        return out.shape[1] - 1

    return run


def worker(variant: str, dtype: str, n_new: int, repeats: int, threads: int, logits_file: str) -> dict:
    """One variant's round in this process: a warm-up, then ``repeats`` timed runs."""
    from arraygpt import GPT, GPTConfig

    config = GPTConfig.preset("shakespeare-char")
    info: dict = {}
    if variant in ("cache", "nocache"):
        model = GPT(config, seed=0, dtype=dtype)
        np.save(logits_file, model.backend.to_numpy(model.forward(PROMPT)[0])[:, -1])  # (1, V) for the torch check
        run = arraygpt_runner(model, variant == "cache")
        info = {"backend": model.backend.name, "threads": threads}
    else:
        import torch

        info = {"threads": set_torch_threads(threads), "torch": torch.__version__}
        if variant == "torch":
            model = GPT(config, seed=0, dtype=dtype)  # the weights only: the same seeded init as the arraygpt side
            state = {k: model.backend.to_numpy(v) for k, v in model.state_dict().items()}
            del model
            forward = torch_kv_model(config, state)
            if os.path.exists(logits_file):
                diff = forward(torch.tensor(PROMPT), []).numpy() - np.load(logits_file)  # (1, V)
                info["logits_max_diff"] = float(np.abs(diff).max())
            run = torch_runner(forward)
        else:
            import transformers

            info["transformers"] = transformers.__version__
            run = hf_runner(config)
    run(16)  # warm-up: first calls import, allocate and pick kernels
    rates = time_runs(run, n_new, repeats)
    return {"variant": variant, "tokens_per_s": median(rates), "runs": rates, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each variant in its own process (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per process (default 3)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens per run (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="threads per variant (default: the cores available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument(
        "--variants",
        default="cache,nocache,torch,hf",
        help="comma-separated variants to run, of cache, nocache, torch, hf (default: all that are installed)",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparisons")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--logits-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from arraygpt import GPTConfig, count_params

    config = GPTConfig.preset("shakespeare-char")
    n_new = min(args.new_tokens, config.block_size)
    threads = args.threads or default_threads()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dtype, n_new, args.repeats, threads, args.logits_file)))
        return

    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown or "cache" not in wanted:
        parser.error(f"--variants takes cache (always) and any of {', '.join(VARIANTS)}; got {args.variants!r}")
    variants = [v for v in ("cache", "nocache") if v in wanted]
    if not args.no_torch and "torch" in wanted:
        if importlib.util.find_spec("torch") is None:
            print("PyTorch is not installed: no PyTorch comparison")
        else:
            variants.append("torch")
            if not args.no_hf and "hf" in wanted:
                if importlib.util.find_spec("transformers") is None:
                    print("transformers is not installed: no GPT2LMHeadModel.generate comparison")
                else:
                    variants.append("hf")
    cpu = cpu_model()
    print(f"CPU: {cpu}; Python {platform.python_version()}")
    print(
        f"shakespeare-char ({count_params(config).total:,} parameters, {args.dtype}), batch 1, {n_new} new tokens, "
        f"backend {os.environ.get('ARRAYGPT_BACKEND') or 'numpy'}, {threads} threads; {args.rounds} rounds, each "
        f"variant in its own process, alternating; per round the median of {args.repeats} runs after a warm-up"
    )

    with tempfile.TemporaryDirectory() as tmp:
        logits_file = str(Path(tmp) / "arraygpt-logits.npy")

        def run_one(variant: str, _: int) -> dict:
            env = thread_env(threads)
            if variant in ("torch", "hf"):
                env["ARRAYGPT_MALLOC_TUNING"] = "0"  # PyTorch keeps its own allocator's behaviour
            return run_worker(
                __file__,
                variant,
                [
                    "--dtype",
                    args.dtype,
                    "--new-tokens",
                    str(n_new),
                    "--repeats",
                    str(args.repeats),
                    "--threads",
                    str(threads),
                    "--logits-file",
                    logits_file,
                ],
                env,
            )

        def show(variant: str, r: int, result: dict) -> None:
            diff = result.get("logits_max_diff")
            check = "" if diff is None else f"  logits max |diff| vs arraygpt {diff:.2e}"
            print(
                f"  round {r + 1}: {VARIANTS[variant]:<24} {result['tokens_per_s']:8.1f} tokens/s "
                f"(runs: {', '.join(f'{x:.1f}' for x in result['runs'])}){check}",
                flush=True,
            )

        results = alternate(variants, args.rounds, run_one, show)

    rates = {v: [r["tokens_per_s"] for r in results[v]] for v in variants}
    med = {v: median(x) for v, x in rates.items()}
    print(f"medians of the rounds (min-max) | CPU: {cpu}")
    for v in variants:
        print(f"  {VARIANTS[v]:<26} {spread(rates[v], unit=' tokens/s')}")
    diffs = [r["logits_max_diff"] for r in results.get("torch", []) if "logits_max_diff" in r]
    if diffs:
        same = max(diffs) <= LOGITS_TOLERANCE[args.dtype]
        print(
            f"PyTorch loop vs arraygpt logits: max |diff| = {max(diffs):.2e}"
            + ("" if same else f" > {LOGITS_TOLERANCE[args.dtype]:g}: NOT the same network")
        )
    ratios = {"cache / no cache": med["cache"] / med["nocache"]} if "nocache" in med else {}
    for v in ("torch", "hf"):
        if v in med:
            ratios[f"arraygpt cache / {VARIANTS[v]}"] = med["cache"] / med[v]
    print("ratios of the medians (>= 1 means arraygpt with the cache is faster):")
    for name, value in ratios.items():
        print(f"  {name:<45} {value:6.2f}x")
    torch_key = f"arraygpt cache / {VARIANTS['torch']}"
    targets = []
    if "cache / no cache" in ratios:
        targets.append(f"cache / no cache >= 5: {'met' if ratios['cache / no cache'] >= 5 else 'NOT met'}")
    if torch_key in ratios:
        targets.append(f"at least 1.2x the PyTorch loop: {'met' if ratios[torch_key] >= 1.2 else 'NOT met'}")
    print("targets: " + "; ".join(targets))
    if args.json:
        print(
            json.dumps(
                {
                    "tokens_per_s": {VARIANTS[v]: x for v, x in rates.items()},
                    "median_tokens_per_s": {VARIANTS[v]: x for v, x in med.items()},
                    "ratios": ratios,
                    "dtype": args.dtype,
                    "new_tokens": n_new,
                    "threads": threads,
                    "cpu": cpu,
                    "backend": results["cache"][0].get("backend"),
                    "logits_max_diff": max(diffs, default=None),
                    "workers": results,
                }
            )
        )


if __name__ == "__main__":
    main()
