"""Where a forward+backward step's time goes, per layer kind, with the kernels and with the pure
reference; each kernel's time beside its reference's on the step's own shapes; and a decode
step's one-row linear layers: the kernel, NumPy's BLAS and PyTorch.

Run by hand (timings are not tests):

    .venv/bin/python benchmarks/kernels.py                        # shakespeare-char, B8, one thread
    .venv/bin/python benchmarks/kernels.py --config nanogpt-cpu
    .venv/bin/python benchmarks/kernels.py --micro               # every registered numpy kernel against its reference
    .venv/bin/python benchmarks/kernels.py --decode-linear       # one row through each weight matrix, 3 sides

The step profile wraps every pair of the model's Kernels record with a timer and runs everything
on one thread (the batch unsplit, OPENBLAS_NUM_THREADS=1), timing CPU time of that thread
(``time.thread_time``), which other load on the machine disturbs less than wall time. "other" is
the step minus the timed parts (the embedding, residual adds, the split of q/k/v, Python).

``--micro`` takes each kernel from its spec in ``arraygpt.backends.numpy.kernels.KERNELS`` (the
pair a model runs) and the reference from ``layers.py``; RoPE and SwiGLU run at the Llama
benchmark's shapes (B12 T64, 4 heads of 32, SwiGLU hidden 352), the linear kernel at one row.

``--decode-linear`` times x @ w.T + b for one row of x through the weight matrices of a decode
step (float32): the 24 matrices and the unembedding of a shakespeare-char model (``step``),
GPT-2's MLP matrix (3072 x 768) and GPT-2's unembedding (50257 x 768). Sides: ``kernel``
(numba_linear_rows), ``blas`` (the reference: NumPy's matmul, i.e. OpenBLAS) and ``torch``
(``torch.nn.functional.linear`` under ``no_grad``), each in its own process with the same seeded
weights, alternating, ``--rounds`` rounds (default 3) of the median of ``--repeats`` timed calls
after a warm-up, at each ``--threads`` count (default 1 and 2; the kernel splits w's rows over
that many numba threads, as BLAS and PyTorch split theirs); wall time, and the process's CPU time
(all its threads, spinning ones too; at one thread the less disturbed figure on a loaded
machine). The sides' outputs are compared before any time is shown. The frame is
benchmarks/harness.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads OpenBLAS
os.environ.setdefault("ARRAYGPT_NUM_THREADS", "1")

import argparse
import collections
import contextlib
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, median, ratio, run_worker, set_torch_threads, spread, thread_env
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
    from arraygpt.backends.numpy.kernels import KERNELS

    def pair(spec_name):  # the pair a model runs, as its spec loads it
        return KERNELS[spec_name].kernel()

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
        # the Llama benchmark's shapes (benchmarks/llama_step.py): B12 T64, 4 heads of 32, hidden 352
        gate_up = rng.standard_normal((12, 64, 2 * 352)).astype(dtype)
        q_llama = rng.standard_normal((12, 64, 3 * 128)).astype(dtype)[..., :128]
        cos, sin = layers.rope_tables(np, 64, 0, layers.rope_frequencies(32, 10000.0, None), np.dtype(dtype))
        row, w_fc, b_fc = (rng.standard_normal(shape).astype(dtype) for shape in ((1, 1, C), (H, C), (H,)))
        cases = {
            "gelu_tanh": (pair("numba_gelu_tanh"), layers.ACTIVATIONS["gelu_tanh"], (x_mlp,)),
            "layernorm": (pair("numba_layernorm"), layers.NORMS["layernorm"], (x, w, b, 1e-5)),
            "rmsnorm": (pair("numba_rmsnorm"), layers.NORMS["rmsnorm"], (x, w, None, 1e-5)),
            "attention": (
                pair("numba_causal_attention"),
                (layers.attention_forward, layers.attention_backward),
                (q, k, v, NH),
            ),
            "crossentropy": (
                pair("numba_crossentropy"),
                (layers.crossentropy_forward, layers.crossentropy_backward),
                (
                    rng.standard_normal((B * T, config.vocab_size)).astype(dtype),
                    rng.integers(0, config.vocab_size, B * T),
                ),
            ),
            "rope": (pair("numba_rope"), (layers.rope_forward, layers.rope_backward), (q_llama, cos, sin)),
            "swiglu": (
                pair("numba_swiglu"),
                (layers.swiglu_forward, layers.swiglu_backward),
                (gate_up[..., :352], gate_up[..., 352:]),
            ),
            "linear 1 row": (
                pair("numba_linear_rows"),
                (layers.linear_forward, layers.linear_backward),
                (row, w_fc, b_fc),
            ),
        }
        for case, (fused, ref, args) in cases.items():
            row_times = []
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
                row_times.append((label, statistics.median(f_ms), statistics.median(b_ms)))
            (_, kf, kb), (_, rf, rb) = row_times
            print(
                f"{name:<17} {dtype:<8} {case:<12} kernel {kf:7.2f} + {kb:7.2f} ms | reference {rf:7.2f} + "
                f"{rb:7.2f} ms | {(rf + rb) / (kf + kb):5.1f}x"
            )


# ----------------------------------------------------------------------------------------------
# a decode step's one-row linear layers: the kernel, NumPy's BLAS, PyTorch

LINEAR_SIDES = ("kernel", "blas", "torch")


def decode_weights() -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per case, the (w, b) of its matrices, float32, (out, in) as arraygpt stores them; the same
    in every process (seeded)."""
    rng = np.random.default_rng(0)

    def matrix(n_out, n_in):
        return (
            rng.standard_normal((n_out, n_in), dtype=np.float32) * 0.02,
            rng.standard_normal(n_out, dtype=np.float32),
        )

    C = 384  # shakespeare-char: 6 layers of qkv, attention projection, MLP in and out; then the unembedding
    step = [m for _ in range(6) for m in (matrix(3 * C, C), matrix(C, C), matrix(4 * C, C), matrix(C, 4 * C))]
    return {
        "step": step + [matrix(65, C)],
        "gpt2-mlp": [matrix(3072, 768)],
        "gpt2-unembedding": [matrix(50257, 768)],
    }


def linear_worker(side: str, threads: int, repeats: int) -> dict:
    """One side's median ms per case (all of a case's matrices, one row each) and a sample of its
    outputs for the comparison."""
    cases = decode_weights()
    widths = {w.shape[1] for matrices in cases.values() for w, _ in matrices}
    rows = {n: np.random.default_rng(n).standard_normal((1, n), dtype=np.float32) for n in widths}
    if side == "torch":
        import torch
        import torch.nn.functional as F

        set_torch_threads(threads)
        cases = {k: [(torch.from_numpy(w), torch.from_numpy(b)) for w, b in ms] for k, ms in cases.items()}
        rows = {n: torch.from_numpy(x) for n, x in rows.items()}
        hold = contextlib.nullcontext

        def call(x, w, b):
            with torch.no_grad():
                return F.linear(x, w, b)

    else:
        from arraygpt.backends.numpy import blas_thread_count
        from arraygpt.backends.numpy.kernels import linear
        from arraygpt.xp import load_backend

        backend = load_backend("numpy")
        forward = linear.SPECS["numba_linear_rows"].kernel().forward if side == "kernel" else layers.linear_forward

        def hold():
            return backend.blas_threads(threads)

        def call(x, w, b):
            return forward(x, w, b)[0]

        with hold():
            count = blas_thread_count()
        if side == "kernel" and count is None:
            raise SystemExit("the linear kernel declines every call: NumPy's BLAS thread count cannot be read")
    result: dict = {"threads": threads}
    with hold():
        for case, matrices in cases.items():

            def run_case(matrices=matrices):
                return [call(rows[w.shape[1]], w, b) for w, b in matrices]

            run_case()  # warm-up (the kernel compiles, or loads from numba's cache)
            ms, cpu_ms = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                outs = run_case()
                ms.append((time.perf_counter() - t0) * 1e3)
                cpu_ms.append((time.process_time() - c0) * 1e3)
            result[case] = statistics.median(ms)
            result[case + " cpu"] = statistics.median(cpu_ms)
            flat = np.concatenate([np.asarray(o, dtype=np.float64).reshape(-1) for o in outs])
            result[case + " sample"] = flat[:: max(1, flat.size // 256)].tolist()
    return result


def decode_linear(threads_list: list[int], rounds: int, repeats: int) -> None:
    sides = [side for side in LINEAR_SIDES if side != "torch" or importlib.util.find_spec("torch")]
    cases = list(decode_weights())
    for threads in threads_list:
        env = thread_env(threads)
        results = alternate(
            sides,
            rounds,
            lambda side, _: run_worker(__file__, side, ["--threads", str(threads), "--repeats", str(repeats)], env),
        )
        for case in cases:  # the same numbers on every side before any time is shown
            ref = np.asarray(results["blas"][0][case + " sample"])
            for side in sides:
                got = np.asarray(results[side][0][case + " sample"])
                scale = max(1.0, float(np.abs(ref).max()))
                assert np.allclose(got, ref, rtol=0, atol=1e-4 * scale), f"{side} differs from blas on {case}"
        for clock, suffix in (("wall", ""), ("process CPU", " cpu")):
            print(
                f"a decode step's one-row linear layers, float32, {threads} thread(s): {clock} ms per call, "
                f"median of {rounds} rounds (min-max)"
            )
            print(f"{'case':<18}" + "".join(f"{side:>26}" for side in sides) + "   kernel/torch")
            for case in cases:
                times = {side: [r[case + suffix] for r in results[side]] for side in sides}
                line = f"{case:<18}" + "".join(f"{spread(times[side], '.3f'):>26}" for side in sides)
                if "torch" in sides:
                    line += f"   {ratio(median(times['kernel']), median(times['torch']))}"
                print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro", action="store_true", help="each kernel against its reference")
    parser.add_argument("--decode-linear", action="store_true", help="one row through each weight matrix, 3 sides")
    parser.add_argument("--threads", type=int, action="append", help="--decode-linear: thread counts (default 1, 2)")
    parser.add_argument("--rounds", type=int, default=3, help="--decode-linear: rounds of alternating sides")
    parser.add_argument("--repeats", type=int, default=21, help="--decode-linear: timed calls per process")
    parser.add_argument("--worker", choices=LINEAR_SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(linear_worker(args.worker, (args.threads or [1])[0], args.repeats)))
        return
    print(f"CPU: {cpu_model()}")
    if args.decode_linear:
        decode_linear(args.threads or [1, 2], args.rounds, args.repeats)
        return
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
