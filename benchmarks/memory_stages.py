"""Where the peak resident memory of ``benchmarks/llama_cpp_decode.py``'s arraygpt worker comes from:
the worker's steps (import, load, the warm-up generation, decode, the 256-token prefill), with the
load split into its parts, and after each the peak (``ru_maxrss``) and the current resident memory
split into anonymous memory, the GGUF file's mapped pages and the other files' (shared libraries:
numba's LLVM, NumPy's OpenBLAS).

    .venv/bin/python benchmarks/memory_stages.py /tmp/gg/smollm2-q4_1-30.gguf
    .venv/bin/python benchmarks/memory_stages.py FILE --tracemalloc     # + Python/NumPy allocations
    .venv/bin/python benchmarks/memory_stages.py FILE --threads 2
    .venv/bin/python benchmarks/memory_stages.py FILE --split-imports   # + what numba and array-api-compat cost

Each run is one fresh process (the figures are the process's own). With ``--tracemalloc`` the
table adds the memory that Python and NumPy allocated and still hold (``current``) and the peak
since the step before (``peak``), and the largest live allocation sites after the prefill;
tracing slows the run and adds its own memory, so the RSS columns of such a run read high.

With ``--split-imports`` the costs that the load and the first kernel call pay once are paid
before the load, one row each: the NumPy submodules that importing ``array_api_compat.numpy``
imports (its ``clone_module("numpy")`` runs ``from numpy import *``, and ``numpy.__all__`` names
lazily loaded submodules: ``ma``, ``testing``, ``f2py``, ``random``...), then numba's import, its CPU
target (LLVM's JIT), its runtime (NRT: functions that LLVM compiles in the process, even when every
kernel comes from numba's cache) and its lowering registries. The peak comes out the same.

Not a test: run by hand; the figures depend on the machine and the numba cache
(``backends/numpy/kernels/__pycache__``: a cold cache compiles every kernel, which costs more).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MB = 1 << 20


def _status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile (MB) of /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def _mapped(path: str) -> tuple[float, float]:
    """Resident MB of ``path``'s mappings and of every other file's, from /proc/self/smaps."""
    mine = other = 0
    name = ""
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(None, 6)
            if first and "-" in first[0] and len(first) >= 5 and ":" in first[3]:  # a mapping's header
                name = first[5].strip() if len(first) > 5 else ""
            elif line.startswith("Rss:") and name.startswith("/"):
                kb = int(line.split()[1])
                if name == path:
                    mine += kb
                else:
                    other += kb
    return mine / 1024, other / 1024


class Stages:
    def __init__(self, gguf_path: str, trace: bool):
        self.path, self.trace, self.rows, self.t0 = os.path.realpath(gguf_path), trace, [], time.perf_counter()

    def __call__(self, name: str) -> None:
        st = _status()
        gguf_mb, libs_mb = _mapped(self.path)
        row = dict(
            stage=name,
            peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            rss=st["VmRSS"],
            anon=st["RssAnon"],
            gguf=gguf_mb,
            libs=libs_mb,
            s=time.perf_counter() - self.t0,
        )
        if self.trace:
            import tracemalloc

            current, peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            row.update(py=current / MB, py_peak=peak / MB)
        self.rows.append(row)

    def print(self) -> None:
        cols = "peak rss anon gguf libs".split() + (["py", "py_peak"] if self.trace else [])
        print(f"{'stage':34s}" + "".join(f"{c:>9s}" for c in cols) + f"{'s':>8s}")
        for row in self.rows:
            print(f"{row['stage']:34s}" + "".join(f"{row[c]:9.1f}" for c in cols) + f"{row['s']:8.2f}")


def _wrap(stage: Stages, module: object, attr: str, label: str) -> None:
    """Record a stage each time ``module.attr`` returns."""
    fn = getattr(module, attr)

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        stage(label)
        return out

    setattr(module, attr, wrapped)


# numpy.__all__'s lazily loaded submodules, in the order ``from numpy import *`` imports them
_NUMPY_SUBMODULES = ("strings", "testing", "fft", "polynomial", "ctypeslib", "char", "ma", "rec", "f2py", "random")


def _split_imports(stage: Stages) -> None:
    """Pay the one-time costs of array-api-compat's NumPy namespace and of numba, one row each."""
    import importlib

    for name in _NUMPY_SUBMODULES:
        importlib.import_module(f"numpy.{name}")
        stage(f"  numpy.{name}")
    import array_api_compat.numpy  # noqa: F401

    stage("  array_api_compat.numpy (rest)")
    import numba  # noqa: F401
    from numba.core.registry import cpu_target
    from numba.core.runtime import rtsys

    stage("  numba: import")
    context = cpu_target.target_context
    stage("  numba: CPU target (LLVM JIT)")
    rtsys.initialize(context)
    stage("  numba: runtime compiled (NRT)")
    context.refresh()
    stage("  numba: lowering registries")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--split-imports", action="store_true", help="one row per one-time cost (see above)")
    args = parser.parse_args()
    for var in ("ARRAYGPT_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(8)
    stage = Stages(args.path, args.tracemalloc)
    import numpy as np

    stage("python + numpy")
    import arraygpt
    from arraygpt.io import gguf, gguf_tokenizer
    from arraygpt.nn import model as model_module
    from arraygpt.nn.core import KVCache

    stage("import arraygpt")
    if args.split_imports:
        _split_imports(stage)
    _wrap(stage, gguf, "_open", "  load: header walk, memory map")
    _wrap(stage, gguf_tokenizer, "check_tokenizer_metadata", "  load: tokenizer checked")
    _wrap(stage, gguf, "_state_dict", "  load: state dict (Q|K|V stacked)")
    _wrap(stage, model_module, "get_backend", "  load: backend (array-api-compat)")
    _wrap(stage, model_module, "fuse", "  load: fuse (Q|K|V, gate|up)")
    _wrap(stage, model_module, "select_kernels", "  load: select kernels (numba)")
    model = arraygpt.load(args.path, quantized=True).model
    stage("load")

    def generate(ids: list[int], n: int, label: str) -> None:
        cache = KVCache(model.config)
        logits, _ = model.forward(np.array([ids]), kv_cache=cache, last_only=True)
        stage(f"{label}: prompt of {len(ids)}")
        out = [int(np.argmax(logits[0, -1]))]
        for _ in range(n - 1):
            logits, _ = model.forward(np.array([[out[-1]]]), kv_cache=cache, last_only=True)
            out.append(int(np.argmax(logits[0, -1])))
        if n > 1:
            stage(f"{label}: {n - 1} decode steps")

    rng = np.random.default_rng(1)  # the token ids of llama_cpp_decode.py's _ids
    prompt = [int(i) for i in rng.integers(300, 49152, args.prompt)]
    prefill = [int(i) for i in np.random.default_rng(2).integers(300, 49152, args.prefill)]
    generate(prompt, 8, "warm-up")
    generate(prompt, args.new + 1, "decode")
    generate(prefill, 1, "prefill")
    import gc

    gc.collect()
    stage("after gc.collect()")
    print(f"{Path(args.path).name}, {args.threads} thread(s); MB (2**20 bytes): peak = ru_maxrss so far, rss now,")
    print("anon = RssAnon, gguf = the file's resident pages, libs = other files' (shared libraries)")
    stage.print()
    if args.tracemalloc:
        import tracemalloc

        snapshot = tracemalloc.take_snapshot()
        print("\nlargest live Python/NumPy allocations after the prefill:")
        for stat in snapshot.statistics("traceback")[:12]:
            frame = stat.traceback[-1]
            print(f"  {stat.size / MB:7.2f} MB  {stat.count:6d} blocks  {frame.filename}:{frame.lineno}")


if __name__ == "__main__":
    main()
