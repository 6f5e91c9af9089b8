"""Decode and prefill speed and peak memory of a SmolLM2-135M-shaped model stored as GGUF:
arraygpt on the quantized blocks, transformers in float32 from the same file, llama.cpp.

Run by hand on a quiet machine (timings are not tests):

    .venv/bin/python benchmarks/llama_cpp_decode.py                       # q4_1 and q8_0, 1 and 2 threads
    .venv/bin/python benchmarks/llama_cpp_decode.py --dtypes q8_0 --threads 2 --rounds 1   # a quick check
    .venv/bin/python benchmarks/llama_cpp_decode.py --dtypes q5_0,q4_k_m --sides arraygpt,llama_cpp
    .venv/bin/python benchmarks/llama_cpp_decode.py --profile q4_1        # where one decode step goes
    .venv/bin/python benchmarks/llama_cpp_decode.py --avx2-only /tmp/llama_avx2  # as on a CPU with AVX2 alone

The model: 30 layers, 576 wide, 9 heads / 3 KV heads, MLP 1536, vocabulary 49,152, tied
embeddings (SmolLM2-135M's shape), random weights (seed 0), written once per dtype by
``arraygpt.save(..., format="gguf", dtype=...)`` with a small byte-level BPE (its rows padded to
the vocabulary), into ``--dir`` (default a temporary folder). ``q4_k_m`` is the q5_0 file with the
kinds llama.cpp's Q4_K_M gives this shape (``_as_q4_k_m``).

Sides, each in its own process, alternating, ``--rounds`` rounds (default 3), medians:

- ``arraygpt``: ``arraygpt.load(path, quantized=True)`` (blocks memory-mapped from the file), a
  greedy loop over ``forward(..., kv_cache=..., last_only=True)``;
- ``transformers``: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` (dequantized to
  float32), ``generate(do_sample=False)`` with its KV cache;
- ``llama_cpp``: ``llama_cpp.Llama`` (llama-cpp-python, installed by hand, not a test
  requirement), greedy ``generate`` (temperature 0), with ``use_extra_bufts=False`` in its model
  parameters (its AMX matrix path crashed on prompts in the virtual machine measured; ``Llama()``
  does not pass that option on, so the worker sets it in ``llama_model_default_params``).

Per process: a ``--prompt``-token prompt (default 32) then ``--new`` tokens (default 128): decode
tokens/s over the new tokens; a ``--prefill``-token prompt (default 256) alone: prefill tokens/s;
the peak resident memory of the process (``ru_maxrss``). Each side runs one warm-up generation
of 8 tokens before the timed ones. ``--threads`` (default 1,2) sets ARRAYGPT_NUM_THREADS,
NUMBA_NUM_THREADS, OMP/MKL/OPENBLAS_NUM_THREADS and llama.cpp's ``n_threads``.

``--avx2-only DIR`` runs every side with the instructions of a CPU that has AVX2 but no AVX-512
or VNNI (a Zen 3), on a CPU that has more: numba compiles for a Zen 3 with this CPU's features
less AVX-512, VNNI, AMX, GFNI, VAES and VPCLMULQDQ (``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``),
OpenBLAS takes its Haswell kernels, PyTorch and MKL their AVX2 code, and llama.cpp is imported from
DIR, a llama-cpp-python built for AVX2 alone::

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
      -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DGGML_AVX512_VNNI=OFF" \
      pip install --no-cache-dir --no-binary llama-cpp-python --target DIR llama-cpp-python==0.3.36

The cores and caches stay this machine's: it compares the code each side runs on AVX2, not a Zen 3.
"""

from __future__ import annotations

# arraygpt before NumPy, as a program using it would: it sets how long OpenBLAS's idle threads spin
import arraygpt

# isort: split
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import alternate, cpu_model, median, ratio, run_worker, spread, thread_env

# SmolLM2-135M's shape (its preset), with a 2048-position context: more than any run here uses
CONTEXT = 2048
SIDES = ("arraygpt", "transformers", "llama_cpp")


def write_model(folder: Path, dtype: str, layers: int) -> Path:
    """The random SmolLM2-shaped model as ``folder/smollm2-<dtype>.gguf``, written once, in a
    process of its own (Linux's ru_maxrss carries a parent's peak into the workers it starts)."""
    path = folder / f"smollm2-{dtype}-{layers}.gguf"
    if not path.exists():
        command = [sys.executable, __file__, "--write", dtype, "--layers", str(layers), "--path", str(path)]
        subprocess.run(command, check=True)
    return path


def _write(path: str, dtype: str, layers: int) -> None:
    from arraygpt import GPT, GPTConfig

    model = GPT(GPTConfig.preset("smollm2-135m", block_size=CONTEXT, n_layer=layers), seed=0)
    if dtype != "q4_k_m":
        arraygpt.save(model, path, format="gguf", dtype=dtype, tokenizer=_tokenizer())
        return
    arraygpt.save(model, path + ".q5_0", format="gguf", dtype="q5_0", tokenizer=_tokenizer())
    _as_q4_k_m(path + ".q5_0", path)
    os.remove(path + ".q5_0")


def _as_q4_k_m(source: str, path: str) -> None:
    """The q5_0 file at ``source`` with the kinds llama.cpp's Q4_K_M gives a SmolLM2-135M: every
    row of 576 values stays Q5_0 (Q4_K's fallback where a row is not whole 256-value blocks), but
    in every other layer V becomes Q8_0 (Q6_K's fallback) and the MLP's down projection (rows of
    1536) Q6_K, elsewhere Q4_K. The K-quant blocks are random bytes with small float16 scales
    (gguf's Python cannot quantize them; speed does not depend on the values)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(path, arch=reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = 15 if field.name == "general.file_type" else field.contents()  # LLAMA_FTYPE_MOSTLY_Q4_K_M
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    rng = np.random.default_rng(0)
    types = gguf.GGMLQuantizationType
    for tensor in reader.tensors:
        data, kind = np.asarray(tensor.data), tensor.tensor_type
        layer = int(tensor.name.split(".")[1]) if tensor.name.startswith("blk.") else -1
        if tensor.name.endswith("attn_v.weight") and layer % 2 == 0:
            dense = gguf.quants.dequantize(data, kind)
            data, kind = gguf.quants.quantize(dense, types.Q8_0), types.Q8_0
        elif tensor.name.endswith("ffn_down.weight"):
            kind = types.Q6_K if layer % 2 == 0 else types.Q4_K
            rows, cols = (int(n) for n in reversed(tensor.shape))
            per_block, nbytes = gguf.GGML_QUANT_SIZES[kind]
            data = rng.integers(0, 256, (rows, cols // per_block, nbytes), dtype=np.uint8)
            for at in [208] if kind == types.Q6_K else [0, 2]:  # d (and dmin), float16
                scales = rng.uniform(-0.002, 0.002, (rows, cols // per_block)).astype(np.float16)
                data[..., at : at + 2] = scales.view(np.uint8).reshape(rows, -1, 2)
            data = data.reshape(rows, -1)
        writer.add_tensor(tensor.name, data, raw_dtype=kind if kind not in (types.F32, types.F16) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tokenizer():
    """A small byte-level BPE trained here (llama.cpp wants merges); its rows are padded to the
    vocabulary in the file."""
    import tokenizers

    from arraygpt.io.bpe import BPETokenizer

    pre = tokenizers.pre_tokenizers
    raw = tokenizers.Tokenizer(tokenizers.models.BPE())
    raw.pre_tokenizer = pre.ByteLevel(add_prefix_space=False)
    raw.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, show_progress=False, initial_alphabet=pre.ByteLevel.alphabet()
    )
    raw.train_from_iterator(["The quick brown fox jumps over the lazy dog. " * 4, "hello world 1234"], trainer=trainer)
    raw.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", special=True, normalized=False)])
    eos = raw.token_to_id("<|endoftext|>")
    return BPETokenizer(raw, bos_id=eos, eos_ids=[eos])


def _ids(n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(300, 49152, n)]


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def worker_arraygpt(path: str, prompt: list[int], new: int, prefill: list[int]) -> dict:
    from arraygpt.nn.core import KVCache

    model = arraygpt.load(path, quantized=True).model

    def generate(ids: list[int], n: int) -> tuple[list[int], float, float]:
        cache = KVCache(model.config)
        t0 = time.perf_counter()
        logits, _ = model.forward(np.array([ids]), kv_cache=cache, last_only=True)
        t1 = time.perf_counter()
        out = [int(np.argmax(logits[0, -1]))]
        for _ in range(n - 1):
            logits, _ = model.forward(np.array([[out[-1]]]), kv_cache=cache, last_only=True)
            out.append(int(np.argmax(logits[0, -1])))
        return out, t1 - t0, time.perf_counter() - t1

    generate(prompt, 8)
    tokens, _, decode_s = generate(prompt, new + 1)  # new tokens after the first (which the prompt gives)
    _, prefill_s, _ = generate(prefill, 1)
    return dict(decode_tps=new / decode_s, prefill_tps=len(prefill) / prefill_s, tokens=tokens[:8])


def worker_transformers(path: str, prompt: list[int], new: int, prefill: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = AutoModelForCausalLM.from_pretrained(
        str(Path(path).parent), gguf_file=Path(path).name, torch_dtype=torch.float32
    ).eval()

    def generate(ids: list[int], n: int) -> tuple[list[int], float]:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(
                torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
            )
            return out[0, len(ids) :].tolist(), time.perf_counter() - t0

    generate(prompt, 8)
    _, first_s = generate(prompt, 1)  # the prompt and the first token
    tokens, total_s = generate(prompt, new + 1)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(torch.tensor([prefill]))
        prefill_s = time.perf_counter() - t0
    return dict(decode_tps=new / (total_s - first_s), prefill_tps=len(prefill) / prefill_s, tokens=tokens[:8])


def worker_llama_cpp(path: str, prompt: list[int], new: int, prefill: list[int]) -> dict:
    import llama_cpp.llama_cpp as low_level
    from llama_cpp import Llama

    default_params = low_level.llama_model_default_params

    def model_params():  # Llama() does not pass use_extra_bufts on: its AMX path crashes in this VM
        params = default_params()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = model_params
    features = low_level.llama_print_system_info().decode()
    if os.environ.get("AVX2_ONLY") and any(f"{isa} = 1" in features for isa in ("AVX512", "AVX_VNNI", "AMX")):
        sys.exit(f"--avx2-only: {low_level.__file__} was built with more than AVX2 ({features}); see --help")
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)

    def generate(ids: list[int], n: int) -> tuple[list[int], float, float]:
        llm.reset()
        out, t0 = [], time.perf_counter()
        t1 = t0
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if not out:
                t1 = time.perf_counter()  # the prompt evaluated and the first token sampled
            out.append(int(token))
            if len(out) == n:
                break
        return out, t1 - t0, time.perf_counter() - t1

    generate(prompt, 8)
    tokens, _, decode_s = generate(prompt, new + 1)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prefill)
    prefill_s = time.perf_counter() - t0
    return dict(decode_tps=new / decode_s, prefill_tps=len(prefill) / prefill_s, tokens=tokens[:8])


WORKERS = {"arraygpt": worker_arraygpt, "transformers": worker_transformers, "llama_cpp": worker_llama_cpp}


def profile(path: Path, steps: int = 32) -> None:
    """cProfile of ``steps`` decode steps of arraygpt on ``path``: where a step's time goes."""
    import cProfile
    import pstats

    from arraygpt.nn.core import KVCache

    model = arraygpt.load(path, quantized=True).model
    cache = KVCache(model.config)
    model.forward(np.array([_ids(32, 1)]), kv_cache=cache, last_only=True)
    token = np.array([[1000]])
    model.forward(token, kv_cache=cache, last_only=True)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        model.forward(token, kv_cache=cache, last_only=True)
    prof.disable()
    print(f"{(time.perf_counter() - t0) / steps * 1e3:.1f} ms per decode step ({steps} steps, under the profiler)")
    stats = pstats.Stats(prof)
    groups = {"fused blocks": 0.0, "other quantized products": 0.0, "other kernels": 0.0, "Python around them": 0.0}
    for (filename, _, function), (_, _, tottime, _, _) in stats.stats.items():
        if filename.endswith("kernels/decode.py") and function.startswith("_decode_block"):
            groups["fused blocks"] += tottime  # a block in one numba call (its products included)
        elif filename.endswith("kernels/quant.py") and function.startswith("_product_rows"):
            groups["other quantized products"] += tottime  # the vocabulary projection
        elif "/kernels/" in filename and function.startswith("_"):
            groups["other kernels"] += tottime
        else:
            groups["Python around them"] += tottime
    total = sum(groups.values())
    for name, seconds in groups.items():
        print(f"  {name:22s} {seconds / steps * 1e3:6.1f} ms per step ({seconds / total:5.1%})")
    stats.sort_stats("tottime").print_stats(12)


def _avx2_env(llama_cpp_dir: str | None) -> dict[str, str]:
    """The variables of ``--avx2-only`` (none without it)."""
    if llama_cpp_dir is None:
        return {}
    import llvmlite.binding as llvm

    wider = ("avx512", "avx10", "amx", "avxvnni", "avxifma", "avxneconvert", "gfni", "vaes", "vpclmulqdq", "evex512")
    features = ",".join(
        ("+" if on and not name.startswith(wider) else "-") + name
        for name, on in sorted(llvm.get_host_cpu_features().items())
    )
    return {
        "AVX2_ONLY": "1",
        "NUMBA_CPU_NAME": "znver3",
        "NUMBA_CPU_FEATURES": features,
        "OPENBLAS_CORETYPE": "Haswell",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "PYTHONPATH": os.pathsep.join(filter(None, [llama_cpp_dir, os.environ.get("PYTHONPATH")])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="q4_1,q8_0")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dir", default=None, help="where the GGUF files are written (kept)")
    parser.add_argument("--profile", default=None, metavar="DTYPE", help="profile arraygpt's decode step instead")
    parser.add_argument("--avx2-only", default=None, metavar="DIR", help="every side on AVX2 alone (see above)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompt, prefill = _ids(args.prompt, 1), _ids(args.prefill, 2)
    if args.write:
        _write(args.path, args.write, args.layers)
        return
    if args.worker:
        result = WORKERS[args.worker](args.path, prompt, args.new, prefill)
        print(json.dumps({**result, "peak_mb": _peak_mb()}))
        return
    folder = Path(args.dir or tempfile.mkdtemp(prefix="arraygpt-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    if args.profile:
        profile(write_model(folder, args.profile, args.layers))
        return
    print(f"CPU: {cpu_model()}" + (", every side on AVX2 alone" if args.avx2_only else ""))
    sides = args.sides.split(",")
    common = ["--prompt", str(args.prompt), "--new", str(args.new), "--prefill", str(args.prefill)]
    for dtype in args.dtypes.split(","):
        path = write_model(folder, dtype, args.layers)
        print(f"\n{path.name}: {path.stat().st_size / 2**20:.1f} MiB")
        for threads in [int(t) for t in args.threads.split(",")]:
            env = {**thread_env(threads), "NUMBA_NUM_THREADS": str(threads), **_avx2_env(args.avx2_only)}
            results = alternate(
                sides,
                args.rounds,
                lambda side, r: run_worker(__file__, side, ["--path", str(path), *common], env=env),
                lambda side, r, res: print(
                    f"  round {r} {side:12s} decode {res['decode_tps']:6.1f} tok/s  prefill "
                    f"{res['prefill_tps']:7.1f} tok/s  peak {res['peak_mb']:6.0f} MB  first {res['tokens'][:4]}",
                    flush=True,
                ),
            )
            print(f" {dtype}, {threads} thread(s), medians of {args.rounds} rounds:")
            med = {
                s: {k: median(r[k] for r in results[s]) for k in ("decode_tps", "prefill_tps", "peak_mb")}
                for s in sides
            }
            for side in sides:
                rows = results[side]
                print(
                    f"  {side:12s} decode {spread([r['decode_tps'] for r in rows], '.1f')} tok/s, prefill "
                    f"{spread([r['prefill_tps'] for r in rows], '.0f')} tok/s, "
                    f"peak {spread([r['peak_mb'] for r in rows], '.0f')} MB"
                )
            for other in [s for s in sides if s != "arraygpt"]:
                if "arraygpt" in med:
                    print(
                        f"  arraygpt / {other}: "
                        f"decode {ratio(med['arraygpt']['decode_tps'], med[other]['decode_tps'])}, "
                        f"prefill {ratio(med['arraygpt']['prefill_tps'], med[other]['prefill_tps'])}, "
                        f"peak memory {ratio(med['arraygpt']['peak_mb'], med[other]['peak_mb'])}"
                    )


if __name__ == "__main__":
    main()
