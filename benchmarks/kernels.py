"""Where a forward+backward step's time goes, per layer kind, with the kernels and with the pure
reference; and each kernel's time beside its reference's on the step's own shapes.

Run by hand (timings are not tests):

    .venv/bin/python benchmarks/kernels.py                        # shakespeare-char, B8, one thread
    .venv/bin/python benchmarks/kernels.py --config nanogpt-cpu
    .venv/bin/python benchmarks/kernels.py --micro               # each kernel against its reference

The step profile wraps every pair of the model's Kernels record with a timer and runs everything
on one thread (the batch unsplit, OPENBLAS_NUM_THREADS=1), timing CPU time of that thread
(``time.thread_time``), which other load on the machine disturbs less than wall time. "other" is
the step minus the timed parts (the embedding, residual adds, the split of q/k/v, Python).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS
os.environ.setdefault("ARRAYGPT_NUM_THREADS", "1")

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step import CONFIGS, config_of, cpu_model

from arraygpt import GPT
from arraygpt.nn import layers


def profile(name: str, kernels: str | None, steps: int) -> tuple[float, dict[str, float]]:
    config, B = config_of(name)
    totals: collections.Counter[str] = collections.Counter()

    def timed(kind, pair):
        forward, backward = pair

        def f(*args, **kwargs):
            t0 = time.thread_time()
            out = forward(*args, **kwargs)
            totals[kind + " forward"] += time.thread_time() - t0
            return out

        def b(*args, **kwargs):
            t0 = time.thread_time()
            out = backward(*args, **kwargs)
            totals[kind + " backward"] += time.thread_time() - t0
            return out

        return f, b

    model = GPT(config, seed=0, kernels=kernels, threads=1)
    model.kernels = model.kernels._replace(**{k: timed(k, getattr(model.kernels, k)) for k in model.kernels._fields})
    batch = np.random.default_rng(0).integers(0, config.vocab_size, (B, config.block_size + 1))
    step_ms = []
    for i in range(steps + 2):
        if i == 2:
            totals.clear()
        t0 = time.thread_time()
        model.forward(batch[:, :-1], batch[:, 1:])
        model.backward()
        if i >= 2:
            step_ms.append((time.thread_time() - t0) * 1e3)
    parts = {k: v / steps * 1e3 for k, v in totals.items()}
    return statistics.median(step_ms), parts


def micro(name: str, repeats: int) -> None:
    from arraygpt.backends.numpy.kernels import attention, crossentropy, gelu, norm

    config, B = config_of(name)
    T, C, NH = config.block_size, config.n_embd, config.n_head
    H = 4 * C
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        x_mlp = rng.standard_normal((B, T, H)).astype(dtype)
        x = rng.standard_normal((B, T, C)).astype(dtype)
        w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
        qkv = rng.standard_normal((B, T, 3 * C)).astype(dtype)
        q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
        cases = {
            "gelu_tanh": (gelu.SPECS["numba_gelu_tanh"].kernel(), layers.ACTIVATIONS["gelu_tanh"], (x_mlp,)),
            "layernorm": (norm.SPECS["numba_layernorm"].kernel(), layers.NORMS["layernorm"], (x, w, b, 1e-5)),
            "rmsnorm": (norm.SPECS["numba_rmsnorm"].kernel(), layers.NORMS["rmsnorm"], (x, w, None, 1e-5)),
            "attention": (
                attention.SPECS["numba_causal_attention"].kernel(),
                (layers.attention_forward, layers.attention_backward),
                (q, k, v, NH),
            ),
            "crossentropy": (
                crossentropy.SPECS["numba_crossentropy"].kernel(),
                (layers.crossentropy_forward, layers.crossentropy_backward),
                (
                    rng.standard_normal((B * T, config.vocab_size)).astype(dtype),
                    rng.integers(0, config.vocab_size, B * T),
                ),
            ),
        }
        for case, (fused, ref, args) in cases.items():
            row = []
            for label, (forward, backward) in (("kernel", fused), ("reference", ref)):
                out, cache = forward(*args)
                dout = 1.0 if np.ndim(out) == 0 else np.ones_like(out)  # the loss takes dloss
                backward(dout, cache)
                f_ms, b_ms = [], []
                for _ in range(repeats):
                    t0 = time.thread_time()
                    out, cache = forward(*args)
                    t1 = time.thread_time()
                    backward(dout, cache)
                    t2 = time.thread_time()
                    f_ms.append((t1 - t0) * 1e3)
                    b_ms.append((t2 - t1) * 1e3)
                row.append((label, statistics.median(f_ms), statistics.median(b_ms)))
            (_, kf, kb), (_, rf, rb) = row
            print(
                f"{name:<17} {dtype:<8} {case:<12} kernel {kf:7.2f} + {kb:7.2f} ms | reference {rf:7.2f} + "
                f"{rb:7.2f} ms | {(rf + rb) / (kf + kb):5.1f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro", action="store_true", help="each kernel against its reference")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}")
    for name in args.config or ["shakespeare-char"]:
        if args.micro:
            micro(name, 2 * args.steps + 1)
            continue
        results = {
            label: profile(name, choice, args.steps)
            for label, choice in (("reference", "reference"), ("kernels", None))
        }
        keys = sorted({k for _, parts in results.values() for k in parts})
        print(f"{name}: CPU ms per forward+backward step, one thread")
        print(f"{'part':<24}" + "".join(f"{label:>12}" for label in results))
        for key in keys:
            print(f"{key:<24}" + "".join(f"{parts.get(key, 0.0):12.2f}" for _, parts in results.values()))
        print(f"{'other':<24}" + "".join(f"{step - sum(parts.values()):12.2f}" for step, parts in results.values()))
        print(f"{'step':<24}" + "".join(f"{step:12.2f}" for step, _ in results.values()))


if __name__ == "__main__":
    main()
