"""The float32 matrix products of one forward+backward step, in each BLAS at hand: NumPy's
(OpenBLAS, what arraygpt's linear layers call), PyTorch's (MKL on x86), and oneDNN's or BLIS's
where the path to their shared library is given. On the Intel Xeon these products decide the
step against PyTorch (docs/performance.md); this benchmark measures them alone.

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/gemm.py --config nanogpt-cpu
    .venv/bin/python benchmarks/gemm.py --config shakespeare-char --sides openblas,mkl,onednn \\
        --onednn /path/to/libdnnl.so.3            # e.g. from the onednn-cpu-gomp wheel
    .venv/bin/python benchmarks/gemm.py --blis /usr/lib/x86_64-linux-gnu/blis-serial/libblis.so.4

The products are those of each linear layer of the config (``step.CONFIGS``), rows N = batch x
context: the forward x @ W^T, and the backward's dx = dout @ W and dW = dout^T @ x, each with its
operands as the step holds them (row-major, transposes as flags). Each library runs in its own
process at ``--threads`` threads (default 1; more split each product, where arraygpt's step
splits its batch over one-threaded products), the sides alternating, three rounds; per product
the median of ``--repeats`` calls after a warm-up, writing into a few output buffers in turn as the
step writes fresh ones. Each side's first result for every product is checked against NumPy's
float64 product before any time counts. Shown: per kind of product (summed over the layers) and in
all, the median of the rounds per side and its ratio to the first side's (OpenBLAS unless
``--sides`` says otherwise), with the CPU model.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, cpu_model, median, ratio, run_worker, set_torch_threads, spread, thread_env
from step import CONFIGS, config_of

SIDES = ("openblas", "mkl", "onednn", "blis")
KINDS = ("forward", "dx", "dw")
OUTPUT_BUFFERS = 4


def products(config_name: str) -> list[tuple[str, tuple[int, int], bool, tuple[int, int], bool, int]]:
    """(kind, A's shape, transpose A, B's shape, transpose B, times per step) of every product of
    a step, A and B stored row-major as the step holds them."""
    config, batch = config_of(config_name)
    rows, C = batch * config.block_size, config.n_embd
    linears = [(C, config.attn_dim + 2 * config.kv_dim, config.n_layer), (config.attn_dim, C, config.n_layer)]
    linears += [
        (C, config.mlp_hidden, config.n_layer),
        (config.mlp_hidden, C, config.n_layer),
        (C, config.vocab_size, 1),
    ]
    out = []
    for cin, cout, count in linears:  # (in, out, layers)
        out.append(("forward", (rows, cin), False, (cout, cin), True, count))  # x @ W^T
        out.append(("dx", (rows, cout), False, (cout, cin), False, count))  # dout @ W
        out.append(("dw", (rows, cout), True, (rows, cin), False, count))  # dout^T @ x
    return out


def worker(side: str, config_name: str, threads: int, repeats: int, library: str | None) -> dict:
    import numpy as np

    make = _sgemm(side, threads, library)
    rng = np.random.default_rng(0)
    ms = dict.fromkeys(KINDS, 0.0)
    for kind, a_shape, trans_a, b_shape, trans_b, count in products(config_name):
        a, b = rng.standard_normal(a_shape, dtype=np.float32), rng.standard_normal(b_shape, dtype=np.float32)
        (M, K), N = (a_shape[::-1] if trans_a else a_shape), (b_shape[0] if trans_b else b_shape[1])
        outs = [np.zeros((M, N), np.float32) for _ in range(OUTPUT_BUFFERS)]
        call = make(a, trans_a, b, trans_b, M, N, K)
        call(outs[0])
        exact = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
        error = float(np.abs(outs[0] - exact).max() / np.abs(exact).max())
        if error > 1e-5:
            raise SystemExit(f"{side}: {kind} {M}x{N}x{K} is off by {error:.1e} of its largest value")
        for i in range(3):
            call(outs[i % OUTPUT_BUFFERS])
        samples = []
        for i in range(repeats):
            t0 = time.perf_counter()
            call(outs[i % OUTPUT_BUFFERS])
            samples.append(time.perf_counter() - t0)
        ms[kind] += median(samples) * count * 1e3
    return {"ms": ms}


def _sgemm(side: str, threads: int, library: str | None):
    """``make(a, trans_a, b, trans_b, M, N, K)`` -> ``call(out)`` writing op(a) @ op(b) into out."""
    import numpy as np

    if side == "openblas":
        return lambda a, ta, b, tb, M, N, K: (
            lambda out, x=(a.T if ta else a), y=(b.T if tb else b): np.matmul(x, y, out=out)
        )
    if side == "mkl":
        import torch

        set_torch_threads(threads)

        def make_torch(a, ta, b, tb, M, N, K):
            x, y = torch.from_numpy(a), torch.from_numpy(b)
            x, y = (x.T if ta else x), (y.T if tb else y)
            return lambda out: torch.mm(x, y, out=torch.from_numpy(out))

        return make_torch
    if library is None:
        raise SystemExit(f"--{side} PATH: the side {side} needs the path to its shared library")
    lib = ctypes.CDLL(library)
    if side == "onednn":  # dnnl_sgemm: row-major, transposes as 'N'/'T', int64 sizes
        f = lib.dnnl_sgemm
        i64, flt, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        f.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, flt, ptr, i64, ptr, i64, flt, ptr, i64]
        return lambda a, ta, b, tb, M, N, K: lambda out: f(
            b"T" if ta else b"N", b"T" if tb else b"N", M, N, K, 1.0,
            a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0, out.ctypes.data, N,
        )  # fmt: skip
    # BLIS's CBLAS: cblas_sgemm(CblasRowMajor=101, NoTrans=111 / Trans=112, ...), int sizes
    f = lib.cblas_sgemm
    i32, flt, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    f.argtypes = [i32, i32, i32, i32, i32, i32, flt, ptr, i32, ptr, i32, flt, ptr, i32]
    return lambda a, ta, b, tb, M, N, K: lambda out: f(
        101, 112 if ta else 111, 112 if tb else 111, M, N, K, 1.0,
        a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0, out.ctypes.data, N,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", choices=sorted(CONFIGS), default="nanogpt-cpu")
    p.add_argument("--sides", default=None, help=f"comma-separated, from {', '.join(SIDES)} (default: those at hand)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30, help="timed calls per product and round")
    p.add_argument("--onednn", metavar="PATH", help="oneDNN's libdnnl.so (dnnl_sgemm)")
    p.add_argument("--blis", metavar="PATH", help="BLIS's libblis.so (cblas_sgemm)")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    libraries = {"onednn": args.onednn, "blis": args.blis}
    if args.worker:
        result = worker(args.worker, args.config, args.threads, args.repeats, libraries.get(args.worker))
        print(json.dumps(result))
        return
    if args.sides:
        sides = args.sides.split(",")
    else:
        has_torch = importlib.util.find_spec("torch") is not None
        sides = ["openblas", *(["mkl"] if has_torch else []), *(side for side, path in libraries.items() if path)]
    if unknown := sorted(set(sides) - set(SIDES)):
        p.error(f"unknown sides {unknown}; the sides are {', '.join(SIDES)}")
    common = ["--config", args.config, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    common += [arg for side, path in libraries.items() if path for arg in (f"--{side}", path)]
    env = thread_env(args.threads)
    results = alternate(sides, args.rounds, lambda side, r: run_worker(__file__, side, common, env)["ms"])
    cpu = cpu_model()
    print(f"CPU: {cpu}; {args.config}, {args.threads} thread(s), float32")
    print(
        f"{args.rounds} rounds, each side in its own process, alternating; ms per step, median of the rounds (min-max)"
    )
    for kind in (*KINDS, "all"):
        figures = {side: [sum(r.values()) if kind == "all" else r[kind] for r in results[side]] for side in sides}
        base = median(figures[sides[0]])
        cells = [f"{side} {spread(v, '.2f')} ({ratio(median(v), base)})" for side, v in figures.items()]
        print(f"  {kind:8s} | " + " | ".join(cells) + f" | CPU: {cpu}")


if __name__ == "__main__":
    main()
