"""The tensorboard logger (arraygpt.plugins.tensorboard): the event files of a run, read back with
TensorBoard's own reader (EventAccumulator), hold the numbers of the run's metrics.jsonl, at the same
steps; a resume leaves TensorBoard showing what metrics.jsonl says; the logger is on only when
asked for; without the tensorboard package the command says what to install.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import arraygpt
from arraygpt import cli
from arraygpt.manager import get_plugin_manager, registry_with_owners

TEXT = "".join(f"{w} the quick brown fox jumps over the lazy dog.\n" for w in ("one", "two", "three")) * 30
TINY = ["--preset", "microgpt", "--batch-size", "4", "--eval-batches", "1", "--samples", "0", "--quiet"]


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return str(path)


def scalars(folder):
    """{tag: [(step, value)]} as TensorBoard reads the folder."""
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def from_metrics(run_dir):
    """{tag: [(step, value)]}: what metrics.jsonl says, each number as a float32 (TensorBoard's scalars)."""
    expected: dict[str, list] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["event"] in ("train", "eval"):
            for field, value in record.items():
                if field not in ("event", "step", "elapsed"):
                    expected.setdefault(f"{record['event']}/{field}", []).append(
                        (record["step"], float(np.float32(value)))
                    )
    return expected


def test_the_event_files_hold_the_metrics_of_the_run(tmp_path, data):
    out = tmp_path / "run"
    argv = ["train", "--data", data, *TINY, "--steps", "6", "--log-interval", "1", "--eval-interval", "3"]
    rc, _, err = run([*argv, "--grad-clip", "1.0", "--out-dir", str(out), "--log", "tensorboard"])
    assert rc == 0, err
    got, want = scalars(out / "tensorboard"), from_metrics(out)
    assert set(want) == {
        "train/loss",
        "train/lr",
        "train/tokens_per_s",
        "train/grad_norm",
        "eval/train_loss",
        "eval/val_loss",
    }
    assert got == want
    assert [step for step, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in got["eval/val_loss"]] == [3, 6]


def test_a_resume_leaves_tensorboard_showing_what_metrics_jsonl_says(tmp_path, data):
    """Session 2 runs steps 3-6 and logs each; its checkpoint is then lost (as if killed before it),
    so session 3 redoes steps 3-6 from step 2's checkpoint, logging every second step. metrics.jsonl
    drops session 2's records; TensorBoard must drop its events too (step 5 is session 2's alone)."""
    out = tmp_path / "run"
    base = ["train", "--data", data, *TINY, "--steps", "6", "--eval-interval", "2", "--log", "tensorboard"]
    assert run([*base, "--log-interval", "1", "--out-dir", str(out), "--stop-after", "2"])[0] == 0
    shutil.copytree(out / "last", tmp_path / "step2")
    rc, _, err = run(["train", "--resume", str(out), "--log", "tensorboard", "--log-interval", "1", "--quiet"])
    assert rc == 0, err
    assert 5 in [step for step, _ in scalars(out / "tensorboard")["train/loss"]]
    shutil.rmtree(out / "last")
    shutil.copytree(tmp_path / "step2", out / "last")
    rc, _, err = run(["train", "--resume", str(out), "--log", "tensorboard", "--log-interval", "2", "--quiet"])
    assert rc == 0, err
    assert len(list((out / "tensorboard").iterdir())) == 3  # one event file per session
    got, want = scalars(out / "tensorboard"), from_metrics(out)
    assert [step for step, _ in want["train/loss"]] == [1, 2, 4, 6]
    assert got == want


def test_a_log_dir_and_the_python_api(tmp_path, data):
    from arraygpt.plugins.tensorboard import TensorBoardLogger

    pm = get_plugin_manager(autoload=False)
    logger = TensorBoardLogger(tmp_path / "tb")
    pm.register(logger)
    options = dict(steps=4, log_interval=2, eval_interval=4, eval_batches=1, samples=0, progress=False)
    run_ = arraygpt.train(data, plugin_manager=pm, **options)
    logger.close()  # no run folder: no checkpoint event flushes; close writes and flushes what is left
    got = scalars(tmp_path / "tb")
    want = [(r["step"], float(np.float32(r["loss"]))) for r in run_.history if r["event"] == "train"]
    assert got["train/loss"] == want and [s for s, _ in want] == [2, 4]
    assert got["eval/val_loss"] == [(4, float(np.float32(run_.history[-2]["val_loss"])))]

    rc, _, err = run(["train", "--data", data, *TINY, "--steps", "2", "--out-dir", str(tmp_path / "r"),
                      "--log", "tensorboard", "--log-dir", str(tmp_path / "tb2")])  # fmt: skip
    assert rc == 0, err
    assert not (tmp_path / "r" / "tensorboard").exists() and scalars(tmp_path / "tb2")["train/loss"]


def test_the_logger_is_on_only_when_asked_for(tmp_path, data):
    rc, _, err = run(["train", "--data", data, *TINY, "--steps", "2", "--out-dir", str(tmp_path / "run")])
    assert rc == 0, err
    assert not (tmp_path / "run" / "tensorboard").exists()
    owners = registry_with_owners("loggers", get_plugin_manager(autoload=False))
    assert owners["tensorboard"][1] == "arraygpt.plugins.tensorboard"
    rc, out, _ = run(["plugins"])
    assert "loggers:\n  tensorboard" in out


def test_only_rank_0_writes(tmp_path):
    from arraygpt.plugins.tensorboard import TensorBoardLogger

    class Rank1:
        world = type("World", (), {"is_root": False})()
        out_dir, step, history = tmp_path, 1, [{"event": "train", "step": 1, "loss": 1.0}]

    logger = TensorBoardLogger()
    logger.arraygpt_on_step(run=Rank1())
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_without_tensorboard_the_command_says_what_to_install(tmp_path, data, monkeypatch):
    for name in [m for m in sys.modules if m == "tensorboard" or m.startswith("tensorboard.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    rc, out, err = run(["train", "--data", data, *TINY, "--out-dir", str(tmp_path / "run"), "--log", "tensorboard"])
    assert rc == 2 and out == ""
    assert err == (
        "arraygpt train: error: the tensorboard logger needs the tensorboard package: "
        "pip install 'arraygpt[tensorboard]'\n"
    )
    assert not (tmp_path / "run").exists()  # said before anything was written


def _docs_csv_module():
    """The logger plugin of docs/training.md ("Writing a logger"), run as written."""
    import re
    import types
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", doc, re.S) if "# arraygpt_csv/" in block)
    module = types.ModuleType("arraygpt_csv")
    exec(compile(code, "docs/training.md", "exec"), module.__dict__)
    return module


def test_the_documented_logger_shape_works(tmp_path, data):
    from arraygpt.manager import set_plugin_manager

    pm = get_plugin_manager(autoload=False)
    pm.register(_docs_csv_module(), name="csv")
    set_plugin_manager(pm)
    try:
        rc, out, _ = run(["plugins"])
        assert "loggers:\n  tensorboard" in out and "  csv                from csv" in out
        argv = [
            "train",
            "--data",
            data,
            *TINY,
            "--steps",
            "4",
            "--log-interval",
            "1",
            "--out-dir",
            str(tmp_path / "run"),
        ]
        rc, _, err = run([*argv, "--log", "csv"])
        assert rc == 0, err
        assert pm.get_plugin("logger csv") is None  # registered for that run only
    finally:
        set_plugin_manager(None)
    rows = [line.split(",") for line in (tmp_path / "run" / "csv" / "steps.csv").read_text().splitlines()]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    want = [(r["step"], r["loss"], r["lr"]) for r in records if r["event"] == "train"]
    assert [(int(s), float(loss), float(lr)) for s, loss, lr in rows] == want and len(want) == 4
