"""Issue 21's training-side debts: dropout that does not depend on how a batch is split (threads,
micro-batches), and the findings of the attack round on ``arraygpt train`` (a metrics file that is
a FIFO or /dev/zero, absurd sizes, an early Ctrl-C, a resume from another directory, a run that
never saved, bad seeds and generator states, an unknown saved option), plus ``--steps`` on resume
and the progress line's ETA (issue 23).

Hostile cases run in a fresh interpreter with an address-space limit (tests/capped.py); every
file here is built by the tests themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import arraygpt
from arraygpt import cli
from arraygpt import xp as shim
from arraygpt.errors import CheckpointError, RunFolderError, TrainingDiverged
from arraygpt.xp import to_numpy
from capped import ENV, MEMORY_LIMIT, attempt
from runs import made_up_names, max_rel_diff, params_of

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_embd=16, n_head=2, block_size=8, eval_batches=2, samples=0, log_interval=1, progress=False)


@pytest.fixture
def names_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(made_up_names(400, 6)) + "\n")
    return path


def command(*args: str, cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``arraygpt ARGS`` in a subprocess with the memory limit of tests/capped.py."""
    code = (
        f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT})); "
        "import sys; from arraygpt.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**ENV, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# dropout: a row's coins depend on (seed, step, its global row), never on the split


def _mix(z: int) -> int:
    """SplitMix64's output function (Steele, Lea & Flood 2014) in plain Python integers."""
    mask = 2**64 - 1
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_host_dropout_coins_follow_the_documented_rule():
    """The rule of arraygpt/nn/model.py: site s's coins are one PCG64 stream seeded with
    SeedSequence([*key, s]), row r taking outputs [r n, (r+1) n); drawn here from the start of the
    stream, without the jump to the first row, and turned into floats by hand."""
    key, site, first_row, n = (7, 123), 2, 5, 4
    model = arraygpt.GPT(arraygpt.GPTConfig.preset("microgpt"), dtype="float64")
    coins = model._coins(key, first_row)
    for _ in range(site):  # the sites before
        coins((3, 4))
    got = to_numpy(coins((3, 2, 2)))  # (rows, 2, 2)
    stream = np.random.PCG64(np.random.SeedSequence([*key, site])).random_raw((first_row + 3) * n)
    want = [int(out) >> 11 for out in stream[first_row * n :]]  # the top 53 bits
    np.testing.assert_array_equal(got.ravel(), np.array(want, dtype=np.float64) / 2.0**53)
    float32 = arraygpt.GPT(arraygpt.GPTConfig.preset("microgpt"), dtype="float32")._coins(key, first_row)
    for _ in range(site):
        float32((3, 4))
    want32 = [int(out) >> 40 for out in stream[first_row * n :]]  # the top 24 bits
    np.testing.assert_array_equal(to_numpy(float32((3, 4))).ravel(), np.array(want32, dtype=np.float64) / 2.0**24)


def test_gpu_row_seeds_follow_the_documented_rule():
    from arraygpt.nn.dropout import dropout_row_seeds

    key, site, first_row = (7, 123), 2, 5
    h = 0
    for part in (*key, site):
        h = _mix(((h ^ part) + 0x9E3779B97F4A7C15) & (2**64 - 1))
    want = [_mix(h ^ row) for row in range(first_row, first_row + 3)]
    assert [int(s) for s in dropout_row_seeds(key, site, first_row, 3)] == want


def test_a_rows_dropout_mask_does_not_depend_on_the_rows_around_it():
    cfg = arraygpt.GPTConfig.preset("gpt2", vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.3)
    model = arraygpt.GPT(cfg, seed=3, dtype="float64").train()
    idx = np.random.default_rng(1).integers(0, 23, (6, 8))
    whole, _ = model.forward(idx, dropout_key=(0, 4))
    parts = [model.forward(idx[lo:hi], dropout_key=(0, 4), first_row=lo)[0] for lo, hi in ((0, 1), (1, 4), (4, 6))]
    np.testing.assert_allclose(np.concatenate([to_numpy(p) for p in parts]), to_numpy(whole), rtol=1e-13, atol=1e-13)
    other_step, _ = model.forward(idx, dropout_key=(0, 5))
    assert not np.allclose(to_numpy(other_step), to_numpy(whole))  # new masks each step


def test_a_device_generator_draws_each_rows_coins_from_the_rows_seed():
    """The GPU path (a backend with ``device_uniform``), on the host: one generator per row, seeded
    with the row's seed, so a row's mask again does not depend on the rows around it."""
    calls = []

    def device_uniform(seed, shape, dtype):
        calls.append(seed)
        return np.random.default_rng(seed).random(shape, dtype=dtype)

    backend = dataclasses.replace(shim.load_backend("numpy"), device_uniform=device_uniform)
    cfg = arraygpt.GPTConfig.preset("gpt2", vocab_size=23, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.3)
    model = arraygpt.GPT(cfg, seed=3, dtype="float64", backend=backend).train()
    idx = np.random.default_rng(1).integers(0, 23, (4, 8))
    whole, _ = model.forward(idx, dropout_key=(0, 4))
    rows = [model.forward(idx[r : r + 1], dropout_key=(0, 4), first_row=r)[0] for r in range(4)]
    np.testing.assert_allclose(np.concatenate(rows), whole, rtol=1e-13, atol=1e-13)
    assert all(0 <= seed < 2**63 for seed in calls) and len(set(calls)) == len(calls) // 2  # each row twice


@pytest.fixture
def numpy_threads(monkeypatch):
    """Set the numpy backend's thread count (whatever the cores here) and split even small batches."""
    from arraygpt.nn import runner

    monkeypatch.setattr(runner, "MIN_WORK_PER_THREAD", 1)

    def use(threads):
        backend = dataclasses.replace(shim.load_backend("numpy"), threads=threads)
        monkeypatch.setitem(shim._loaded, "numpy", backend)
        monkeypatch.setattr(shim, "_active", backend)

    return use


def test_one_and_two_threads_train_the_same_with_dropout(names_file, pm, numpy_threads):
    """Issue 21's case: float64, dropout 0.1, 2 layers, 64 wide, 4 heads, block 64, batch 16."""
    opts = dict(
        mode="stream", n_layer=2, n_embd=64, n_head=4, block_size=64, dropout=0.1, batch_size=16, steps=20,
        dtype="float64", lr=3e-3, eval_interval=100, samples=0, progress=False, plugin_manager=pm,
    )  # fmt: skip
    runs = {}
    for threads in (1, 2):
        numpy_threads(threads)
        runs[threads] = arraygpt.train(str(names_file), **opts)
        assert runs[threads].model.threads == threads
    assert runs[2].model.runner.started  # the batch did run in two threads
    assert max_rel_diff(params_of(runs[2]), params_of(runs[1])) < 1e-10


def test_grad_accum_2x8_trains_like_batch_16_with_dropout(names_file, pm):
    opts = dict(TINY, dropout=0.1, steps=20, dtype="float64", lr=1e-2, eval_interval=100, plugin_manager=pm)
    big = arraygpt.train(str(names_file), batch_size=16, **opts)
    accum = arraygpt.train(str(names_file), batch_size=8, grad_accum=2, **opts)
    assert max_rel_diff(params_of(accum), params_of(big)) < 1e-10
    assert [r["loss"] for r in accum.history if r["event"] == "train"] == pytest.approx(
        [r["loss"] for r in big.history if r["event"] == "train"], rel=1e-10
    )


def test_a_run_with_dropout_resumes_bit_identically(tmp_path, names_file, pm):
    opts = dict(TINY, dropout=0.2, steps=10, batch_size=4, eval_interval=100, plugin_manager=pm)
    straight = arraygpt.train(str(names_file), **opts)
    arraygpt.train(str(names_file), out_dir=tmp_path / "r", stop_after=5, **opts)
    resumed = arraygpt.train(resume=tmp_path / "r", progress=False, plugin_manager=pm)
    for name, value in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[name], value, err_msg=name)


# ----------------------------------------------------------------------------------------------
# the metrics file on resume: a regular file, bounded


def _stopped_run(folder: Path, names_file: Path) -> None:
    arraygpt.train(str(names_file), out_dir=folder, steps=4, stop_after=2, **{**TINY, "eval_interval": 100})


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_resume_refuses_a_metrics_file_that_is_a_fifo_or_a_device(tmp_path, names_file, kind):
    folder = tmp_path / "r"
    _stopped_run(folder, names_file)
    metrics = folder / "metrics.jsonl"
    metrics.unlink()
    if kind == "fifo":
        os.mkfifo(metrics)
    else:
        metrics.symlink_to("/dev/zero")
    started = time.monotonic()
    error, message = attempt(f"import arraygpt\narraygpt.train(resume={str(folder)!r}, progress=False)", timeout=60)
    assert error == "arraygpt.errors.RunFolderError", (error, message)
    assert str(metrics) in message and "not a regular file" in message
    assert ("FIFO" if kind == "fifo" else "character device") in message
    assert time.monotonic() - started < 60


def test_a_fresh_run_never_appends_to_a_fifo(tmp_path):
    from arraygpt.training.log import Log

    os.mkfifo(tmp_path / "metrics.jsonl")
    with pytest.raises(RunFolderError, match="must be a regular file"):  # would block without a reader
        Log(tmp_path).record({"event": "start"})


# ----------------------------------------------------------------------------------------------
# sizes that cannot fit: one line naming the size to lower, before anything is allocated


@pytest.mark.parametrize(
    "args, size",
    [
        (["--batch-size", "10000000"], "--batch-size"),
        (["--batch-size", "1000000000"], "--batch-size"),
        (["--n-embd", "1000000", "--n-head", "1"], "--n-embd"),
        (["--vocab-size", "2000000000"], "--vocab-size"),
    ],
    ids=["batch-1e7", "batch-1e9", "n-embd-1e6", "vocab-2e9"],
)
def test_sizes_whose_step_cannot_fit_are_one_line_naming_the_size(tmp_path, args, size):
    proc = command("train", *args, "--steps", "1", "--out-dir", str(tmp_path / "r"), "--samples", "0")
    line = one_line_error(proc, "a training step needs about", "GiB", size)
    assert "of memory is available" in line


@pytest.mark.parametrize(
    "sizes",
    [
        dict(batch_size=32, block_size=32, n_embd=64, n_layer=2),
        dict(batch_size=8, block_size=128, n_embd=64, n_layer=4),  # activations and attention dominate
        dict(batch_size=8, block_size=32, n_embd=32, vocab_size=20000, n_layer=2),  # the vocabulary dominates
    ],
    ids=["small", "activations", "vocabulary"],
)
@pytest.mark.parametrize("precision", ["full", "mixed-float16"])
def test_the_memory_estimate_is_a_lower_bound_of_a_real_step(names_file, pm, sizes, precision):
    """Measured with tracemalloc (NumPy reports its allocations to it) around one training step,
    its weights and the optimizer's state made before: the estimate stays below the real peak (so
    it refuses only what cannot fit) and within a factor of 2 of it, with the kernels a run uses."""
    import tracemalloc

    from arraygpt.training.memory import step_memory
    from arraygpt.training.step import train_step

    opts = dict(TINY, n_head=4, steps=3, mode="stream", eval_interval=100, samples=0, **sizes)
    run = arraygpt.train(str(names_file), stop_after=1, plugin_manager=pm, precision=precision, **opts)
    x, y = run.batcher.next()
    tracemalloc.start()
    try:
        train_step(run, x, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    P = run.model.num_params()
    held_before = 3 * 4 * P + (2 * P if run.mixed is not None else 0)  # float32 weights, moments; a 16-bit copy
    estimate = step_memory(run.model.config, "float32", run.config.batch_size, run.global_batch, precision).total
    assert 0.5 * (peak + held_before) < estimate <= peak + held_before


def test_a_memory_error_that_still_happens_is_one_line_naming_the_sizes(monkeypatch, capsys, tmp_path):
    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("arraygpt.training.loop.train", out_of_memory)
    assert cli.main(["train", "--out-dir", str(tmp_path / "r"), "--batch-size", "512"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("arraygpt train: error: out of memory with ")
    assert "--batch-size 512" in err and "--n-embd 16" in err and "--block-size 8" in err


# ----------------------------------------------------------------------------------------------
# Ctrl-C while the command starts: a quiet exit


def test_ctrl_c_while_the_command_starts_is_a_quiet_130(tmp_path):
    """The signal lands while the parser imports the subcommands, or while the run is built."""
    code = (
        "import sys, arraygpt.cli\nprint('ready', flush=True)\n"
        "sys.exit(arraygpt.cli.main(sys.argv[1:]))"
    )  # fmt: skip
    for i, delay in enumerate((0.0, 0.03, 0.08, 0.12, 0.15, 0.2)):
        args = ["train", "--steps", "2", "--samples", "0", "--quiet", "--out-dir", str(tmp_path / f"r{i}")]
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, 130), (delay, proc.returncode, err.decode()[-2000:])
        assert b"Traceback" not in err, (delay, err.decode()[-2000:])


def _import_cut_short_by_ctrl_c(*args, **kwargs):
    """What NumPy's import does when a Ctrl-C lands in it: the KeyboardInterrupt is swallowed and
    an ImportError without it as cause or context takes its place."""
    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        pass
    raise ImportError('PyCapsule_Import could not import module "datetime"')


def test_an_import_that_a_ctrl_c_cut_short_is_the_interrupt_too(monkeypatch, capsys):
    """While the parser imports the subcommands and while a command runs, an ImportError raised
    after a Ctrl-C is the interrupt (130, one line); without a Ctrl-C it stays what it was."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with monkeypatch.context() as m:
        m.setattr(cli, "build_parser", _import_cut_short_by_ctrl_c)
        assert cli.main(["train"]) == 130
    assert capsys.readouterr().err == "arraygpt: interrupted\n"
    with monkeypatch.context() as m:
        m.setattr("arraygpt.cli.params.run", _import_cut_short_by_ctrl_c)
        assert cli.main(["params", "--preset", "microgpt"]) == 130
    assert capsys.readouterr().err == "arraygpt params: interrupted\n"

    def missing(args):
        raise ImportError("no module named 'matplotlib'")

    with monkeypatch.context() as m:
        m.setattr("arraygpt.cli.params.run", missing)
        assert cli.main(["params", "--preset", "microgpt"]) == 2
    assert capsys.readouterr().err == "arraygpt params: error: no module named 'matplotlib'\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handed back


def test_a_ctrl_c_between_the_parser_and_the_run_or_as_the_handler_is_handed_back_is_130(monkeypatch, capsys):
    """No moment of main lets a KeyboardInterrupt out: not while the expected errors are imported,
    nor when ``signal.signal`` runs a Ctrl-C pending at the moment main hands its handler back
    (CPython runs pending handlers before it changes one); the handler is handed back then too."""

    def interrupted():
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cli, "expected_errors", interrupted)
        assert cli.main(["params", "--preset", "microgpt"]) == 130
    assert capsys.readouterr().err == "arraygpt params: interrupted\n"

    real_signal = signal.signal
    pending = [True]

    def signal_with_a_ctrl_c_pending(signum, handler):
        if handler is signal.default_int_handler and pending:
            pending.clear()
            signal.getsignal(signum)(signum, None)  # raises, as CPython's signal.signal does
        return real_signal(signum, handler)

    with monkeypatch.context() as m:
        m.setattr(signal, "signal", signal_with_a_ctrl_c_pending)
        assert cli.main(["params", "--preset", "microgpt"]) == 130
    assert not pending
    assert capsys.readouterr().err.endswith("arraygpt params: interrupted\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----------------------------------------------------------------------------------------------
# resume: another directory, a run that never saved, hostile state


def test_resume_works_from_another_directory(tmp_path, names_file, pm, monkeypatch):
    monkeypatch.chdir(names_file.parent)
    arraygpt.train("names.txt", out_dir=tmp_path / "r", steps=6, stop_after=3, plugin_manager=pm, **TINY)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = arraygpt.train(resume=tmp_path / "r", progress=False, plugin_manager=pm)
    assert run.step == 6 and Path(run.config.data) == names_file


class _PoisonAtStep2:
    @arraygpt.hookimpl
    def arraygpt_on_step(self, run, step):
        if step == 2:
            run.model.params["wte"][...] = float("nan")


def test_a_run_that_stopped_before_its_first_checkpoint_is_called_the_same_by_both_messages(tmp_path, names_file, pm):
    pm.register(_PoisonAtStep2())
    folder = tmp_path / "r"
    with pytest.raises(TrainingDiverged, match="Stopped without saving"):
        arraygpt.train(str(names_file), out_dir=folder, steps=10, eval_interval=100, plugin_manager=pm, **TINY)
    assert not (folder / "last").exists() and (folder / "metrics.jsonl").exists()
    messages = []
    for call in (
        lambda: arraygpt.train(str(names_file), out_dir=folder, steps=10, plugin_manager=pm, **TINY),
        lambda: arraygpt.train(resume=folder, progress=False, plugin_manager=pm),
    ):
        with pytest.raises(RunFolderError) as info:
            call()
        messages.append(str(info.value))
    for message in messages:
        assert "stopped before its first checkpoint" in message and "nothing to resume" in message
        assert f"remove {folder / 'metrics.jsonl'}" in message and "--resume" not in message.split(":", 1)[-1]


def test_a_negative_seed_names_the_option():
    proc = command("train", "--seed", "-1", "--steps", "1")
    one_line_error(proc, "seed (--seed) must be an integer >= 0, got -1")


def _state(folder: Path) -> tuple[Path, dict]:
    path = folder / "last" / "state.json"
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("value", [-1, 2**200], ids=["minus-one", "2**200"])
@pytest.mark.parametrize("which", ["model_rng", "batcher"])
def test_a_hostile_generator_state_is_one_clear_error(tmp_path, names_file, value, which):
    folder = tmp_path / "r"
    _stopped_run(folder, names_file)
    path, state = _state(folder)
    rng = state["model_rng"] if which == "model_rng" else state["extra"]["data"]["rng"]
    rng["state"]["state"] = value
    path.write_text(json.dumps(state))
    error, message = attempt(f"import arraygpt\narraygpt.train(resume={str(folder)!r}, progress=False)")
    assert error in ("arraygpt.errors.CheckpointError", "arraygpt.errors.DataError"), (error, message)
    assert "state.json" in message and "rng" in message


def test_an_unknown_saved_option_names_the_file_and_the_field(tmp_path, names_file, pm):
    folder = tmp_path / "r"
    _stopped_run(folder, names_file)
    path, state = _state(folder)
    state["extra"]["train_config"]["warp_speed"] = 9
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError) as info:
        arraygpt.train(resume=folder, progress=False, plugin_manager=pm)
    assert str(path) in str(info.value) and "warp_speed" in str(info.value)


# ----------------------------------------------------------------------------------------------
# --steps on resume extends the run; the schedule is that of a run of the new length


def test_steps_on_resume_extends_a_finished_run_as_if_it_had_been_that_long(tmp_path, names_file, pm):
    opts = dict(TINY, batch_size=4, eval_interval=100, schedule="constant", lr=1e-2, plugin_manager=pm)
    straight = arraygpt.train(str(names_file), steps=10, **opts)
    arraygpt.train(str(names_file), out_dir=tmp_path / "r", steps=6, **opts)
    extended = arraygpt.train(resume=tmp_path / "r", steps=10, progress=False, plugin_manager=pm)
    assert extended.step == 10 and extended.config.steps == 10
    for name, value in params_of(straight).items():  # constant lr: the same run, bit for bit
        np.testing.assert_array_equal(params_of(extended)[name], value, err_msg=name)


def test_steps_on_resume_recomputes_the_decay_for_the_new_total(tmp_path, names_file, pm):
    opts = dict(TINY, batch_size=4, eval_interval=100, schedule="linear", lr=1e-2, warmup_steps=2, plugin_manager=pm)
    arraygpt.train(str(names_file), out_dir=tmp_path / "r", steps=6, **opts)
    extended = arraygpt.train(resume=tmp_path / "r", steps=12, progress=False, plugin_manager=pm)
    lrs = {r["step"]: r["lr"] for r in extended.history if r["event"] == "train"}
    # the lr of step s (1-based record, 0-based schedule step s-1): linear decay to 0 at 12, after 2 warmup steps
    for step in range(7, 13):
        assert lrs[step] == pytest.approx(1e-2 * (1 - (step - 1 - 2) / (12 - 2)), rel=1e-12), step
    with pytest.raises(ValueError, match="steps 4 is before the step 12 this run resumes from"):
        arraygpt.train(resume=tmp_path / "r", steps=4, progress=False, plugin_manager=pm)


def test_same_steps_on_resume_changes_nothing(tmp_path, names_file, pm):
    opts = dict(TINY, batch_size=4, eval_interval=100, schedule="cosine", lr=1e-2, plugin_manager=pm)
    straight = arraygpt.train(str(names_file), steps=8, **opts)
    arraygpt.train(str(names_file), out_dir=tmp_path / "r", steps=8, stop_after=4, **opts)
    resumed = arraygpt.train(resume=tmp_path / "r", steps=8, progress=False, plugin_manager=pm)
    for name, value in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[name], value, err_msg=name)


# ----------------------------------------------------------------------------------------------
# the progress line


def test_the_progress_line_shows_elapsed_time_and_eta(names_file, pm, capsys):
    arraygpt.train(str(names_file), steps=4, **{**TINY, "progress": True, "log_interval": 2}, plugin_manager=pm)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 2
    for line in lines:
        elapsed, eta = line.rsplit("tok/s  ", 1)[1].split(" elapsed, ETA ")
        assert ":" in elapsed and ":" in eta, line
    assert lines[-1].endswith("ETA 0:00")  # the last step: nothing left
