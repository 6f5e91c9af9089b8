"""The training loop end to end on tiny configs: the loss goes down, resume is bit-identical
however the run was stopped, checkpoints, metrics, bad input, divergence, samples and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import arraygpt
from arraygpt import cli, hookimpl
from arraygpt import xp as shim
from arraygpt.errors import TrainingDiverged
from arraygpt.io.checkpoint import load_checkpoint
from arraygpt.io.tokenizers import CharTokenizer
from arraygpt.xp import to_numpy
from runs import made_up_names, params_of

TINY = dict(n_embd=16, n_head=2, block_size=8, eval_batches=2, samples=0, log_interval=1)


def names_like(n=300, seed=0):
    return made_up_names(n, 5, seed)


@pytest.fixture
def names_file(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names_like()) + "\n")
    return path


@pytest.fixture
def stream_file(tmp_path):
    path = tmp_path / "stream.txt"
    path.write_text(" ".join(names_like(400, seed=1)) + "\n")
    return path


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# -- learning ------------------------------------------------------------------------------------


def test_training_lowers_the_loss(names_file, pm):
    run = arraygpt.train(
        str(names_file),
        steps=40,
        batch_size=16,
        lr=1e-2,
        eval_interval=40,
        progress=False,
        plugin_manager=pm,
        **{**TINY, "eval_batches": 0},
    )
    losses = [r["loss"] for r in run.history if r["event"] == "train"]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.4
    final = run.evaluate(max_batches=None)
    assert final["val_loss"] < np.log(run.model.config.vocab_size) - 0.4  # well below a uniform guess
    assert run.stop_reason == "done" and run.step == 40


def test_stream_mode_with_adamw_cosine_clipping_and_samples(stream_file, pm):
    run = arraygpt.train(
        str(stream_file),
        steps=30,
        batch_size=8,
        optimizer="adamw",
        lr=3e-3,
        schedule="cosine",
        warmup_steps=5,
        min_lr=3e-4,
        weight_decay=0.1,
        beta2=0.99,
        grad_clip=1.0,
        eval_interval=15,
        progress=False,
        plugin_manager=pm,
        **{**TINY, "samples": 2, "sample_length": 20},
    )
    assert run.config.mode == "stream" and run.tokenizer.bos_id is None
    train_records = [r for r in run.history if r["event"] == "train"]
    assert all("grad_norm" in r for r in train_records)
    assert train_records[0]["lr"] == pytest.approx(3e-3 / 6)  # warmup: lr * (step + 1) / (warmup + 1)
    assert train_records[5]["lr"] == pytest.approx(3e-3)  # the peak, at step 5 (0-based)
    assert 3e-4 < train_records[-1]["lr"] < 3.2e-4  # near the floor, reached at step 30
    assert len(run.samples) == 2 and all(len(s) == 20 for s in run.samples)
    assert set("".join(run.samples)) <= set(run.tokenizer.chars)


def test_samples_in_documents_mode_are_documents(names_file, pm):
    run = arraygpt.train(
        str(names_file),
        mode="documents",
        steps=30,
        batch_size=16,
        progress=False,
        plugin_manager=pm,
        **{**TINY, "samples": 5},
    )
    assert len(run.samples) == 5
    assert all("\n" not in s and set(s) <= set(run.tokenizer.chars) for s in run.samples)


def test_run_sample_is_generate_with_the_temperature_sampler(names_file, pm):
    from arraygpt.generation.generation import generate

    run = arraygpt.train(
        str(names_file), mode="documents", steps=10, batch_size=16, progress=False, plugin_manager=pm, **TINY
    )
    tok = run.tokenizer
    texts = run.sample(n=4, length=12, temperature=0.8, seed=5)
    rows = [[] for _ in range(4)]
    prompt = np.full((4, 1), tok.bos_id)
    for step in generate(
        run.model,
        prompt,
        12,
        "temperature",
        temperature=0.8,
        seed=np.random.default_rng([3, 5]),
        eos_id=tok.eos_id,
        use_cache=False,
    ):
        for row, t in zip(rows, step):
            if t is not None and t != tok.eos_id:
                row.append(t)
    assert texts == [tok.decode(r) for r in rows]
    assert run.sample(n=4, length=12, temperature=0.8, seed=5) == texts  # one seed, the same texts
    assert run.sample(n=4, length=12, temperature=0.8, seed=6) != texts


@pytest.mark.parametrize("backend", ["array_api_strict", "torch"])
def test_training_on_other_backends(names_file, pm, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    run = arraygpt.train(
        str(names_file),
        mode="documents",
        steps=5,
        batch_size=4,
        backend=backend,
        progress=False,
        plugin_manager=pm,
        **TINY,
    )
    assert run.model.backend.name == backend and run.step == 5


def test_byte_tokenizer_and_float64_through_a_resume(tmp_path, names_file, pm):
    opts = dict(
        mode="documents",
        tokenizer="byte",
        dtype="float64",
        steps=6,
        batch_size=4,
        progress=False,
        plugin_manager=pm,
        **TINY,
    )
    straight = arraygpt.train(str(names_file), **opts)
    arraygpt.train(str(names_file), out_dir=tmp_path / "b", stop_after=3, **opts)
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    assert resumed.model.config.vocab_size == 257 and resumed.tokenizer.bos_id == 256
    assert resumed.model.params["wte"].dtype == np.float64
    assert_bit_identical(params_of(resumed), params_of(straight))


# -- exact resume --------------------------------------------------------------------------------


def _opts(data, pm, **extra):
    # dropout > 0 so that the dropout generator's state matters too
    base = dict(
        data=str(data),
        steps=20,
        batch_size=8,
        lr=1e-2,
        eval_interval=5,
        dropout=0.1,
        progress=False,
        plugin_manager=pm,
        **TINY,
    )
    return {**base, **extra}


@pytest.mark.parametrize("mode", ["documents", "stream"])
def test_resume_after_stop_after_is_bit_identical(tmp_path, names_file, pm, mode):
    straight = arraygpt.train(out_dir=tmp_path / "a", **_opts(names_file, pm, mode=mode))
    half = arraygpt.train(out_dir=tmp_path / "b", stop_after=10, **_opts(names_file, pm, mode=mode))
    assert half.step == 10 and half.stop_reason == "stop_after"
    assert load_checkpoint(tmp_path / "b").extra["step"] == 10
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    assert resumed.step == 20 and resumed.stop_reason == "done"
    assert_bit_identical(params_of(resumed), params_of(straight))
    a, b = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert a["step"] == b["step"] == 20
    assert_bit_identical({k: v for k, v in a.items() if k != "step"}, {k: v for k, v in b.items() if k != "step"})
    # the checkpoints on disk agree as well, and the resumed metrics continue the file
    assert_bit_identical(
        params_of(load_checkpoint(tmp_path / "a").model), params_of(load_checkpoint(tmp_path / "b").model)
    )
    steps = [r["step"] for r in read_metrics(tmp_path / "b") if r["event"] == "train"]
    assert steps == list(range(1, 21))
    assert load_checkpoint(tmp_path / "b" / "best").extra["best_val_loss"] == pytest.approx(straight.best_val_loss)


def test_resume_is_bit_identical_with_the_batch_split_across_threads(tmp_path, names_file, pm, monkeypatch):
    from arraygpt.nn import runner

    monkeypatch.setattr(runner, "MIN_WORK_PER_THREAD", 1)  # split even this tiny batch
    two_threads = dataclasses.replace(shim.load_backend("numpy"), threads=2)  # whatever the cores here
    monkeypatch.setitem(shim._loaded, "numpy", two_threads)
    monkeypatch.setattr(shim, "_active", two_threads)
    opts = _opts(names_file, pm, mode="stream")
    straight = arraygpt.train(out_dir=tmp_path / "a", **opts)
    assert straight.model.threads == 2 and straight.model.runner.started  # it did run in threads
    arraygpt.train(out_dir=tmp_path / "b", stop_after=10, **opts)
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    assert_bit_identical(params_of(resumed), params_of(straight))


class _CtrlC:
    """Sends this process a real SIGINT during step ``at``, as a user pressing Ctrl-C."""

    def __init__(self, at):
        self.at = at

    @hookimpl
    def arraygpt_on_step(self, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_and_resume_is_bit_identical(tmp_path, names_file, pm):
    straight = arraygpt.train(out_dir=tmp_path / "a", **_opts(names_file, pm))
    pm.register(_CtrlC(at=7), name="ctrl-c")
    stopped = arraygpt.train(out_dir=tmp_path / "b", **_opts(names_file, pm))
    assert stopped.stop_reason == "interrupted" and stopped.step == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert load_checkpoint(tmp_path / "b").extra["step"] == 7
    pm.unregister(name="ctrl-c")
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    assert_bit_identical(params_of(resumed), params_of(straight))


class _Crash(Exception):
    pass


class _DieAfterCheckpoint:
    @hookimpl
    def arraygpt_on_checkpoint(self, step, path):
        if step == 10 and path.endswith("last"):
            raise _Crash("killed right after the checkpoint")


def test_crash_after_a_checkpoint_then_resume_is_bit_identical(tmp_path, names_file, pm):
    straight = arraygpt.train(out_dir=tmp_path / "a", **_opts(names_file, pm))
    pm.register(_DieAfterCheckpoint(), name="crash")
    with pytest.raises(Exception, match="killed right after the checkpoint"):
        arraygpt.train(out_dir=tmp_path / "b", **_opts(names_file, pm))
    pm.unregister(name="crash")
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    assert_bit_identical(params_of(resumed), params_of(straight))


def test_sigkill_of_a_real_process_then_resume_is_bit_identical(tmp_path, names_file, pm):
    args = [
        "train",
        "--data",
        str(names_file),
        "--mode",
        "documents",
        "--steps",
        "400",
        "--batch-size",
        "8",
        "--n-embd",
        "16",
        "--n-head",
        "2",
        "--eval-interval",
        "400",
        "--checkpoint-interval",
        "2",
        "--eval-batches",
        "1",
        "--samples",
        "0",
        "--dropout",
        "0.1",
        "--quiet",
    ]
    env = {**os.environ, "ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    code = "import sys; from arraygpt.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args, "--out-dir", str(tmp_path / "b")], env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "b" / "last").exists():
            time.sleep(0.02)
        time.sleep(0.3)  # let it write a few more checkpoints, then kill it at a random moment
    finally:
        proc.kill()
        proc.wait()
    ck = load_checkpoint(tmp_path / "b")  # whatever moment the kill hit, a complete checkpoint is there
    assert 0 < ck.extra["step"] < 400, "the process was killed before finishing"
    assert cli.main(["train", "--resume", str(tmp_path / "b"), "--quiet"]) == 0
    assert cli.main([*args, "--out-dir", str(tmp_path / "a")]) == 0
    assert_bit_identical(
        params_of(load_checkpoint(tmp_path / "b").model), params_of(load_checkpoint(tmp_path / "a").model)
    )


def test_resume_refuses_changed_options_and_changed_data(tmp_path, names_file, pm):
    arraygpt.train(out_dir=tmp_path / "b", stop_after=3, **_opts(names_file, pm))
    with pytest.raises(ValueError, match=r"cannot change \['lr'\]"):
        arraygpt.train(resume=tmp_path / "b", lr=0.5, progress=False, plugin_manager=pm)
    with pytest.raises(ValueError, match="already holds a run"):
        arraygpt.train(out_dir=tmp_path / "b", **_opts(names_file, pm))
    names_file.write_text("zed\nzack\n" * 50)
    with pytest.raises(ValueError, match="changed since the run started"):
        arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        arraygpt.train(resume=tmp_path / "nope", progress=False, plugin_manager=pm)


# -- checkpoints, metrics, divergence --------------------------------------------------------------


def test_metrics_jsonl_and_last_and_best(tmp_path, names_file, pm):
    run = arraygpt.train(out_dir=tmp_path / "r", **_opts(names_file, pm, log_interval=4))
    records = read_metrics(tmp_path / "r")
    assert records[0]["event"] == "start" and records[-1] == {
        **records[-1],
        "event": "end",
        "step": 20,
        "reason": "done",
    }
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == [4, 8, 12, 16, 20]
    assert all(r["loss"] > 0 and r["lr"] >= 0 and r["tokens_per_s"] > 0 for r in train)
    assert train[0]["lr"] == pytest.approx(1e-2 * (1 - 3 / 20))  # linear decay, lr of step 4 (0-based 3)
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10, 15, 20] and all({"train_loss", "val_loss"} <= set(r) for r in evals)
    kinds = [(r["step"], r["kind"]) for r in records if r["event"] == "checkpoint"]
    assert [k for k in kinds if k[1] == "last"] == [(5, "last"), (10, "last"), (15, "last"), (20, "last")]
    best_step = min(evals, key=lambda r: r["val_loss"])["step"]
    assert (best_step, "best") in kinds
    best = load_checkpoint(tmp_path / "r" / "best")
    assert best.extra["step"] == best_step and best.extra["best_val_loss"] == pytest.approx(run.best_val_loss)
    assert load_checkpoint(tmp_path / "r" / "last").extra["step"] == 20
    assert run.history == records


class _Poison:
    """Turns a weight into NaN after step 6, as a blown-up update would."""

    @hookimpl
    def arraygpt_on_step(self, run, step):
        if step == 6:
            run.model.params["wte"][...] = float("nan")


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path, names_file, pm):
    pm.register(_Poison())
    with pytest.raises(TrainingDiverged, match=r"diverged at step 7: the loss is nan.*last good checkpoint.*step 5"):
        arraygpt.train(out_dir=tmp_path / "r", **_opts(names_file, pm))
    ck = load_checkpoint(tmp_path / "r")
    assert ck.extra["step"] == 5 and all(np.isfinite(to_numpy(v)).all() for v in ck.model.params.values())
    assert read_metrics(tmp_path / "r")[-1]["event"] == "diverged"


class _PoisonBeforeCheckpoint:
    """Breaks a weight during step 5, whose loss was still finite, right before its checkpoint."""

    @hookimpl
    def arraygpt_on_step(self, run, step):
        if step == 5:
            run.model.params["lm_head"][0, 0] = float("inf")


def test_non_finite_parameters_are_never_checkpointed(tmp_path, names_file, pm):
    pm.register(_PoisonBeforeCheckpoint())
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5: parameter lm_head holds NaN or inf"):
        arraygpt.train(out_dir=tmp_path / "r", **_opts(names_file, pm, eval_interval=50, checkpoint_interval=5))
    assert not (tmp_path / "r" / "last").exists()


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, match",
    [
        ({"batch_size": 0}, ValueError, r"batch_size \(--batch-size\) must be a positive integer"),
        ({"lr": -1e-3}, ValueError, r"learning rate \(lr, --lr\) must be a finite number >= 0"),
        ({"steps": 0}, ValueError, r"steps \(--steps\) must be a positive integer"),
        ({"mode": "stream", "block_size": 4096}, ValueError, "block_size 4096 is larger than the train split allows"),
        ({"tokenizer": CharTokenizer("abc")}, ValueError, "does not know"),
        ({"optimizer": "lion"}, ValueError, "unknown optimizer 'lion'"),
        ({"vocab_size": 3}, ValueError, "smaller than the tokenizer"),
        ({"bogus": 1}, TypeError, "unknown option"),
    ],
)
def test_bad_input_is_a_clear_error_before_training(tmp_path, names_file, pm, options, error, match):
    with pytest.raises(error, match=match):
        arraygpt.train(str(names_file), out_dir=tmp_path / "r", progress=False, plugin_manager=pm, **options)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_empty_and_missing_data(tmp_path, pm):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    for mode in ("documents", "stream"):
        with pytest.raises(ValueError, match="empty"):
            arraygpt.train(str(empty), mode=mode, progress=False, plugin_manager=pm)
    with pytest.raises(FileNotFoundError):
        arraygpt.train(str(tmp_path / "missing.txt"), progress=False, plugin_manager=pm)


# -- the command ---------------------------------------------------------------------------------


def test_cli_train_then_resume(tmp_path, names_file, capsys):
    base = [
        "train",
        "--data",
        str(names_file),
        "--mode",
        "documents",
        "--steps",
        "12",
        "--batch-size",
        "8",
        "--n-embd",
        "16",
        "--n-head",
        "2",
        "--eval-interval",
        "6",
        "--log-interval",
        "4",
        "--samples",
        "3",
    ]
    assert cli.main([*base, "--out-dir", str(tmp_path / "r"), "--stop-after", "6"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"step +4/12 +loss \d\.\d{4} +lr \S+ +[\d,]+ tok/s", out), out
    assert "loss" in out and "tok/s" in out and "val loss" in out
    assert "stopped at step 6/12 (stop_after)" in out and f"--resume {tmp_path / 'r'}" in out
    assert cli.main(["train", "--resume", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "resuming at step 6" in out and "3 samples:" in out
    assert load_checkpoint(tmp_path / "r").extra["step"] == 12


def test_cli_bad_input_exits_2_with_a_message(tmp_path, names_file, capsys):
    assert cli.main(["train", "--data", str(names_file), "--batch-size", "0", "--out-dir", str(tmp_path / "r")]) == 2
    assert "batch_size (--batch-size) must be a positive integer" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "r")]) == 2
    assert "neither a file nor a built-in data set" in capsys.readouterr().err


def test_cli_without_arguments_trains_microgpt_on_names(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("arraygpt.training.loop.train", lambda *a, **k: calls.append((a, k)))
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 0
    ((args, kwargs),) = calls
    assert args == ("names",) and kwargs["config"] == "microgpt" and str(kwargs["out_dir"]).startswith("runs/names-")
    assert kwargs["stop_after"] is None and kwargs["progress"] is True


def test_default_job_trains_on_names_and_prints_names(tmp_path, pm, capsys):
    pytest.importorskip("names")
    run = arraygpt.train("names", steps=150, eval_interval=150, out_dir=tmp_path / "r", plugin_manager=pm)
    assert run.config.mode == "documents" and run.model.config.vocab_size == 27
    out = capsys.readouterr().out
    assert "10 samples:" in out and len(run.samples) == 10
    assert all(s.isalpha() and s.islower() for s in run.samples if s)
