"""Data parallel over MPI: ``mpiexec -n R`` runs equal one process with the same global batch
(float64, 1e-10 relative on the final weights after 20 steps), rank 0 alone writes, a checkpoint of
R ranks resumes on one, and a rank that raises, dies or hangs ends the job promptly.

The multi-rank tests launch real jobs with the ``mpiexec`` next to this Python (the ``mpich``
wheel's, from ``pip install 'arraygpt[mpi]'``) in subprocesses with timeouts; they skip, saying
why, when mpi4py or mpiexec is missing. The single-process World is tested in this process.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import arraygpt
from arraygpt.io.checkpoint import load_checkpoint
from arraygpt.manager import get_plugin_manager
from arraygpt.training import distributed
from arraygpt.training.distributed import World
from arraygpt.training.runfolder import lock_run_folder
from mpi_jobs import TINY, job_env, launch, max_rel_diff, metrics, needs_mpi, resume, train, weights, write_names


@pytest.fixture
def names_file(tmp_path):
    return write_names(tmp_path / "names.txt")


# -- one process: the World of a normal run ---------------------------------------------------------


def test_a_single_process_world_does_nothing():
    world = World()
    assert (world.rank, world.size, world.is_root) == (0, 1, True)
    buffer = np.arange(4.0)
    assert world.allreduce_sum_(buffer) is buffer and buffer.tolist() == [0, 1, 2, 3]
    assert world.broadcast_(buffer) is buffer
    assert world.allgather(np.array([7])).tolist() == [[7]]
    world.check_identical({"w": np.ones(3)})


def test_without_a_launcher_mpi4py_is_not_imported(monkeypatch):
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_WORLD", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # importing it would fail
    assert distributed.get_world().size == 1


def test_several_launched_ranks_without_mpi4py_say_how_to_install(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(distributed, "_WORLD", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(ImportError, match=r"arraygpt\[mpi\]"):
        distributed.get_world()


def test_the_collective_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
    assert World().timeout == 2.5
    assert World().start_timeout == 600  # the start-up waits at least ARRAYGPT_MPI_START_TIMEOUT
    monkeypatch.setenv(distributed.START_TIMEOUT_ENV, "1")
    assert World().start_timeout == 2.5  # never less than the timeout
    assert World(timeout=0).start_timeout == 0  # 0: wait forever, also at the start
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="ARRAYGPT_MPI_TIMEOUT must be a number"):
        World()


def test_the_digest_sees_one_changed_bit():
    a = {"w": np.ones(5), "b": np.zeros(2)}
    b = {"w": np.ones(5), "b": np.zeros(2)}
    assert distributed.array_digest(a) == distributed.array_digest(b)
    b["w"][3] = np.nextafter(1.0, 2.0)
    assert distributed.array_digest(a) != distributed.array_digest(b)


_DRAINING = textwrap.dedent(
    """
    import pathlib, sys
    from arraygpt.training.distributed import wait_until_output_is_read

    written, drained = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    sys.stderr.write("x" * 5000)
    sys.stderr.flush()
    written.touch()
    drained.write_text(str(wait_until_output_is_read(120)))
    """
)


def test_an_aborting_rank_waits_until_its_output_is_read(tmp_path):
    written, drained = tmp_path / "written", tmp_path / "drained"
    child = subprocess.Popen(
        [sys.executable, "-c", _DRAINING, str(written), str(drained)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not written.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        assert not drained.exists()  # its stderr is still unread in the pipe
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert err == "x" * 5000 and drained.read_text() == "True"


def test_a_run_in_one_process_records_its_world_in_the_checkpoint(tmp_path, names_file):
    arraygpt.train(
        str(names_file),
        out_dir=tmp_path / "r",
        steps=2,
        batch_size=3,
        grad_accum=2,
        n_embd=16,
        n_head=2,
        block_size=8,
        samples=0,
        progress=False,
        plugin_manager=get_plugin_manager(autoload=False),
    )
    extra = load_checkpoint(tmp_path / "r").extra
    assert (extra["world_size"], extra["global_batch"]) == (1, 6)


# -- several ranks ------------------------------------------------------------------------------------


@needs_mpi
@pytest.mark.parametrize(
    ("ranks", "batch", "accum", "dropout"),
    [(2, 4, 1, 0.0), (2, 2, 2, 0.0), (4, 2, 1, 0.0), (2, 4, 1, 0.1)],
    ids=["R2", "R2-accum2", "R4", "R2-dropout"],
)
def test_ranks_equal_one_process_with_the_same_global_batch(tmp_path, names_file, ranks, batch, accum, dropout):
    common = ["--steps", "20", "--batch-size", str(batch), "--dropout", str(dropout)]
    train(ranks, tmp_path / "ranks", names_file, *common, "--grad-accum", str(accum))
    # one process, the same micro-batches of the same global batch, one after another
    train(0, tmp_path / "one", names_file, *common, "--grad-accum", str(ranks * accum))
    assert max_rel_diff(weights(tmp_path / "ranks"), weights(tmp_path / "one")) < 1e-10
    a, b = metrics(tmp_path / "ranks"), metrics(tmp_path / "one")
    for event, key in (("train", "loss"), ("eval", "val_loss")):
        np.testing.assert_allclose(
            [r[key] for r in a if r["event"] == event], [r[key] for r in b if r["event"] == event], rtol=1e-10
        )


@needs_mpi
def test_rank_0_alone_prints_and_writes(tmp_path, names_file):
    result = train(2, tmp_path / "r", names_file, "--steps", "10", "--batch-size", "2", "--samples", "3")
    assert result.stdout.count("training: ") == 1  # one header
    assert "global batch 4 = 2 rank(s) x 2 rows x 1 micro-batch(es)" in result.stdout
    assert result.stdout.count("3 samples:") == 1
    records = metrics(tmp_path / "r")
    assert [r["step"] for r in records if r["event"] == "train"] == [5, 10]  # once each, not once per rank
    assert sum(r["event"] == "start" for r in records) == 1
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".arraygpt.lock", "best", "last", "metrics.jsonl"]
    extra = load_checkpoint(tmp_path / "r").extra
    assert (extra["world_size"], extra["global_batch"], extra["step"]) == (2, 4, 10)


@needs_mpi
def test_a_checkpoint_of_two_ranks_resumes_in_one_process_and_continues_the_same(tmp_path, names_file):
    common = ["--steps", "20", "--batch-size", "3", "--dropout", "0.1"]
    train(0, tmp_path / "one", names_file, *common, "--grad-accum", "2")
    train(2, tmp_path / "two", names_file, *common, "--stop-after", "10")
    assert load_checkpoint(tmp_path / "two").extra["step"] == 10
    result = resume(0, tmp_path / "two")
    assert "global batch 6 = 1 rank(s) x 3 rows x 2 micro-batch(es)" in result.stdout
    assert load_checkpoint(tmp_path / "two").extra["step"] == 20
    assert max_rel_diff(weights(tmp_path / "two"), weights(tmp_path / "one")) < 1e-10
    steps = [r["step"] for r in metrics(tmp_path / "two") if r["event"] == "train"]
    assert steps == [5, 10, 15, 20]


@needs_mpi
def test_a_one_process_checkpoint_resumes_on_two_ranks(tmp_path, names_file):
    common = ["--steps", "20", "--batch-size", "2", "--grad-accum", "2"]
    train(0, tmp_path / "one", names_file, *common)
    train(0, tmp_path / "split", names_file, *common, "--stop-after", "10")
    resume(2, tmp_path / "split")
    assert max_rel_diff(weights(tmp_path / "split"), weights(tmp_path / "one")) < 1e-10


@needs_mpi
def test_resuming_on_ranks_that_do_not_divide_the_global_batch_is_refused(tmp_path, names_file):
    train(0, tmp_path / "r", names_file, "--steps", "4", "--batch-size", "3", "--stop-after", "2")
    result = launch(2, ["-m", "arraygpt.cli", "train", "--resume", str(tmp_path / "r")], tmp_path)
    assert result.returncode == 2
    assert "global batch of 3 rows cannot be split over 2 ranks" in result.stderr


@needs_mpi
@pytest.mark.parametrize("refusal", ["locked", "holds a run"])
def test_a_run_folder_refused_to_rank_0_ends_every_rank_at_once_with_its_error(tmp_path, names_file, refusal):
    folder = tmp_path / "r"
    if refusal == "holds a run":
        (folder / "last").mkdir(parents=True)
        message = f"{folder} already holds a run (last)"
    else:
        message = f"run folder {folder} is in use by another arraygpt run (PID {os.getpid()})"
    args = ["-m", "arraygpt.cli", "train", "--data", str(names_file), "--out-dir", str(folder), *TINY, "--steps", "2"]
    # without the news from rank 0, rank 1 would wait for the start-up broadcast until the launch times out
    with lock_run_folder(folder) if refusal == "locked" else contextlib.nullcontext():
        result = launch(2, args, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count(f"arraygpt train: error: {message}") == 1, result.stderr[-3000:]  # rank 0 says it
    assert "waited" not in result.stderr and "Abort" not in result.stderr


_FAULTY = textwrap.dedent(
    """
    import os, signal, sys, time
    import arraygpt
    from arraygpt.training import step
    from arraygpt.training.distributed import get_world

    fault, out_dir, data = sys.argv[1], sys.argv[2], sys.argv[3]
    original = step.gradients

    def faulty(run, x, y):
        if get_world().rank == 1 and run.step == 7:
            if fault == "raise":
                raise RuntimeError("injected failure")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "hang":
                time.sleep(600)
        return original(run, x, y)

    step.gradients = faulty
    if get_world().rank == 1:  # rank 1 waits for rank 0's checkpoints: only rank 0's wait is timed here
        get_world().timeout = 600
    arraygpt.train(data, out_dir=out_dir, steps=20, batch_size=2, n_embd=16, n_head=2, block_size=8,
                   checkpoint_interval=5, eval_interval=100, samples=0, progress=False)
    """
)


@needs_mpi
@pytest.mark.parametrize("fault", ["raise", "kill", "hang"])
def test_a_rank_that_raises_dies_or_hangs_ends_the_job_and_the_checkpoint_survives(tmp_path, names_file, fault):
    script = tmp_path / "faulty.py"
    script.write_text(_FAULTY)
    # rank 0's wait for rank 1 (hang): 15 s, more than rank 1 falls behind on a loaded machine;
    # the start-up waits up to ARRAYGPT_MPI_START_TIMEOUT (600 s) whatever this says
    env = {**job_env(), "ARRAYGPT_MPI_TIMEOUT": "15" if fault == "hang" else "120"}
    result = launch(2, [str(script), fault, str(tmp_path / "r"), str(names_file)], tmp_path, env=env)
    assert result.returncode != 0
    if fault == "raise":
        assert "rank 1 of 2: RuntimeError: injected failure; ending all 2 ranks" in result.stderr
    if fault == "hang":  # rank 0 waits 15 s in the all-reduce of step 8, then ends the job
        assert "rank 0 of 2" in result.stderr and "all-reduce of step 8 waited 15 s" in result.stderr
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt.extra["step"] == 5  # the last checkpoint before the fault, intact


_STOPPING = textwrap.dedent(
    """
    import os, signal, sys
    import arraygpt
    from arraygpt import hookimpl
    from arraygpt.training import step
    from arraygpt.training.distributed import get_world
    from arraygpt.manager import get_plugin_manager

    how, out_dir, data = sys.argv[1], sys.argv[2], sys.argv[3]

    class StopAtSix:
        @hookimpl
        def arraygpt_on_step(self, step):
            return how == "plugin" and step == 6  # called on rank 0 only

    original = step.gradients

    def interrupted(run, x, y):
        if how == "sigint" and get_world().rank == 1 and run.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C reaching rank 1 alone, during step 6
        return original(run, x, y)

    step.gradients = interrupted
    pm = get_plugin_manager(autoload=False)
    pm.register(StopAtSix())
    run = arraygpt.train(data, out_dir=out_dir, steps=12, batch_size=2, n_embd=16, n_head=2, block_size=8,
                         dtype="float64", eval_interval=100, samples=0, progress=False, plugin_manager=pm)
    print(f"rank {get_world().rank} stopped at {run.step}: {run.stop_reason}")
    """
)


@needs_mpi
@pytest.mark.parametrize("how", ["plugin", "sigint"])
def test_a_stop_on_one_rank_stops_every_rank_after_the_same_step(tmp_path, names_file, how):
    script = tmp_path / "stopping.py"
    script.write_text(_STOPPING)
    result = launch(2, [str(script), how, str(tmp_path / "r"), str(names_file)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reason = "plugin" if how == "plugin" else "interrupted"
    assert f"rank 0 stopped at 6: {reason}" in result.stdout and "rank 1 stopped at 6:" in result.stdout
    assert load_checkpoint(tmp_path / "r").extra["step"] == 6
    resume(2, tmp_path / "r")
    train(
        0,
        tmp_path / "one",
        names_file,
        "--steps",
        "12",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--eval-interval",
        "100",
    )
    assert max_rel_diff(weights(tmp_path / "r"), weights(tmp_path / "one")) < 1e-10


@needs_mpi
def test_a_diverged_run_stops_every_rank_at_the_same_step_and_says_so_once(tmp_path, names_file):
    diverging = [
        "--steps",
        "50",
        "--batch-size",
        "2",
        "--lr",
        "1e9",
        "--dtype",
        "float32",
        "--checkpoint-interval",
        "2",
    ]
    result = launch(
        2,
        ["-m", "arraygpt.cli", "train", "--data", str(names_file), "--out-dir", str(tmp_path / "r"), *TINY, *diverging],
        tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("training diverged at step") == 1
    step = load_checkpoint(tmp_path / "r").extra["step"]  # the last good checkpoint, intact
    assert step >= 2 and f"(step {step})" in result.stderr
