"""Gradient accumulation: N micro-batches of B rows make the step of one batch of N x B rows
(float64: 1e-12 on the gradients, ignored targets counted right), the same training run to
float rounding, and a run with accumulation resumes bit-identically after a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

import arraygpt
from arraygpt import cli
from arraygpt.training.config import TrainConfig
from arraygpt.training.step import gradients
from arraygpt.xp import to_numpy
from runs import made_up_names, max_rel_diff, params_of

TINY = dict(n_embd=16, n_head=2, block_size=8, eval_batches=2, samples=0, log_interval=1, progress=False)


@pytest.fixture
def names_file(tmp_path):
    path = tmp_path / "names.txt"
    # lengths from 1 to 12 syllables: short rows are padded (ignored targets), long ones windowed
    path.write_text("\n".join(made_up_names(300, 13)) + "\n")
    return path


def _run(names_file, pm, **options):
    """A Run built but not trained (stop_after=0)."""
    base = dict(steps=20, lr=1e-2, dtype="float64", plugin_manager=pm, stop_after=0, **TINY)
    return arraygpt.train(str(names_file), **{**base, **options})


@pytest.mark.parametrize("mode", ["documents", "stream"])
def test_accumulated_gradients_equal_one_big_batch(names_file, pm, mode):
    big = _run(names_file, pm, mode=mode, batch_size=12)
    accum = _run(names_file, pm, mode=mode, batch_size=4, grad_accum=3)
    x, y = big.batcher.next()
    xa, ya = accum.batcher.next()
    assert x.shape[0] == 12
    np.testing.assert_array_equal(x, xa)  # the global batch is drawn as one batch of 12 rows
    np.testing.assert_array_equal(y, ya)
    if mode == "documents":
        assert (y < 0).any()  # padding: ignored targets, unequal counts per micro-batch
    g_big, loss_big, n_big = gradients(big, x, y)
    g_acc, loss_acc, n_acc = gradients(accum, x, y)
    assert n_big == n_acc == int((y >= 0).sum())
    assert loss_acc == pytest.approx(loss_big, rel=1e-12)
    host_big = {k: to_numpy(v) for k, v in g_big.items()}
    assert max_rel_diff({k: to_numpy(v) for k, v in g_acc.items()}, host_big) < 1e-12


def test_a_micro_batch_with_every_target_ignored_counts_for_nothing(names_file, pm):
    big = _run(names_file, pm, batch_size=12)
    accum = _run(names_file, pm, batch_size=4, grad_accum=3)
    x, y = big.batcher.next()
    y = y.copy()
    y[4:8] = -1  # the second micro-batch predicts nothing
    y[0, :3] = -1  # and the first fewer positions than it has
    g_big, loss_big, _ = gradients(big, x, y)
    g_acc, loss_acc, _ = gradients(accum, x, y)
    assert np.isfinite(loss_acc) and loss_acc == pytest.approx(loss_big, rel=1e-12)
    host_big = {k: to_numpy(v) for k, v in g_big.items()}
    assert max_rel_diff({k: to_numpy(v) for k, v in g_acc.items()}, host_big) < 1e-12


def test_a_run_with_accumulation_equals_the_run_with_one_big_batch(names_file, pm):
    opts = dict(steps=15, lr=1e-2, eval_interval=5, dtype="float64", plugin_manager=pm, **TINY)
    big = arraygpt.train(str(names_file), batch_size=12, **opts)
    accum = arraygpt.train(str(names_file), batch_size=3, grad_accum=4, **opts)
    assert max_rel_diff(params_of(accum), params_of(big)) < 1e-10
    losses = lambda run, event, key: [r[key] for r in run.history if r["event"] == event]  # noqa: E731
    np.testing.assert_allclose(losses(accum, "train", "loss"), losses(big, "train", "loss"), rtol=1e-10)
    np.testing.assert_allclose(losses(accum, "eval", "val_loss"), losses(big, "eval", "val_loss"), rtol=1e-10)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_in_the_middle_of_a_run_with_accumulation_is_bit_identical(tmp_path, names_file, pm, dropout):
    opts = dict(
        steps=8, batch_size=4, grad_accum=3, lr=1e-2, eval_interval=3, dropout=dropout, plugin_manager=pm, **TINY
    )
    straight = arraygpt.train(str(names_file), out_dir=tmp_path / "a", **opts)
    half = arraygpt.train(str(names_file), out_dir=tmp_path / "b", stop_after=5, **opts)
    assert half.step == 5
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    assert resumed.step == 8 and resumed.config.grad_accum == 3
    for k, v in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[k], v, err_msg=k)


def test_resume_with_another_split_of_the_same_global_batch(tmp_path, names_file, pm):
    opts = dict(steps=10, lr=1e-2, eval_interval=5, dtype="float64", plugin_manager=pm, **TINY)
    straight = arraygpt.train(str(names_file), batch_size=4, grad_accum=2, **opts)
    arraygpt.train(str(names_file), out_dir=tmp_path / "b", stop_after=4, batch_size=4, grad_accum=2, **opts)
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm, batch_size=2)
    assert (resumed.config.batch_size, resumed.config.grad_accum) == (2, 4)
    assert max_rel_diff(params_of(resumed), params_of(straight)) < 1e-10
    with pytest.raises(ValueError, match="global batch of 8 rows"):
        arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm, batch_size=2, grad_accum=2)
    with pytest.raises(ValueError, match="does not divide"):
        arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm, batch_size=3)


def test_grad_accum_is_validated_and_is_a_cli_option(capsys):
    with pytest.raises(ValueError, match=r"grad_accum \(--grad-accum\) must be a positive integer"):
        TrainConfig(grad_accum=0)
    assert TrainConfig().grad_accum == 1
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--grad-accum" in capsys.readouterr().out


def test_the_header_names_the_global_batch(names_file, pm, capsys):
    arraygpt.train(
        str(names_file), **{**TINY, "progress": True}, steps=1, batch_size=2, grad_accum=3, plugin_manager=pm
    )
    assert "global batch 6 = 1 rank(s) x 2 rows x 3 micro-batch(es)" in capsys.readouterr().out


def test_a_checkpoint_from_before_accumulation_resumes(tmp_path, names_file, pm):
    import json

    opts = dict(steps=6, batch_size=4, lr=1e-2, eval_interval=3, plugin_manager=pm, **TINY)
    straight = arraygpt.train(str(names_file), **opts)
    arraygpt.train(str(names_file), out_dir=tmp_path / "b", stop_after=3, **opts)
    state_file = tmp_path / "b" / "last" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("world_size", "global_batch"):  # what older checkpoints lack
        del state["extra"][key]
    del state["extra"]["train_config"]["grad_accum"]
    state_file.write_text(json.dumps(state))
    resumed = arraygpt.train(resume=tmp_path / "b", progress=False, plugin_manager=pm)
    assert (resumed.config.batch_size, resumed.config.grad_accum, resumed.step) == (4, 1, 6)
    for k, v in params_of(straight).items():
        np.testing.assert_array_equal(params_of(resumed)[k], v, err_msg=k)


def test_an_overflow_in_accumulated_mixed_precision_gradients_skips_the_step_quietly(names_file, pm):
    """The micro-batches' float32 gradients are summed with inf in them when the loss scale is too
    high: the step is skipped, and NumPy's warnings stay silenced there as in the backward."""
    import warnings

    from arraygpt.training.loop import train_loop

    options = dict(steps=30, batch_size=4, grad_accum=2, precision="mixed-float16", dtype="float32", grad_clip=0.05)
    run = _run(names_file, pm, **options)
    run.stop_requested = None
    run.mixed.scaler.scale = 2.0**38  # float16 gradients overflow: halved step after step
    run.mixed.scaler.growth_interval = 3  # then grown until they overflow again
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_loop(run)
    assert run.mixed.skipped_steps >= 10
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
