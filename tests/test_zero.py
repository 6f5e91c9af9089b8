"""Sharded optimizer state (ZeRO stage 1, ``TrainConfig(zero=True)`` / ``--zero true``): the same
run as unsharded (float64, 1e-10 relative on the final weights after 20 steps, R = 2 and 4, with
and without gradient clipping), optimizer state per rank in proportion to 1/R, and checkpoints that
hold the full state, loadable by one process and resumable on any number of ranks, sharded or not.

In this process: the layout (balanced, every element once), the sharded update simulated rank by
rank (bit-identical to the unsharded optimizer, AdamW's decay mask included) and one process with
``zero`` (equal to without). The multi-rank tests launch real ``mpiexec`` jobs in subprocesses with
timeouts and skip, saying why, without mpi4py or mpiexec.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

import arraygpt
from arraygpt.io.checkpoint import load_checkpoint
from arraygpt.manager import get_plugin_manager
from arraygpt.training import distributed
from arraygpt.training.distributed import ShardedOptimizer, ShardLayout, World
from arraygpt.training.optim import Optimizer, create_optimizer, state_nbytes
from arraygpt.xp import to_numpy
from mpi_jobs import (
    fine_tune,
    job_env,
    launch,
    launch_ok,
    max_rel_diff,
    metrics,
    needs_mpi,
    printed_records,
    resume,
    train,
    weights,
    write_names,
)


@pytest.fixture
def names_file(tmp_path):
    return write_names(tmp_path / "names.txt")


def _optimizer_arrays(run_dir):
    state = load_checkpoint(run_dir).optimizer_state
    return {k: to_numpy(v) for k, v in state.items() if hasattr(v, "shape") and np.ndim(v)}


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"wte": (13, 6), "ln_g": (6,), "w1": (6, 10), "b1": (10,), "w2": (10, 6), "scale": ()}
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


# -- the layout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("by_rows", [True, False])
def test_the_layout_covers_every_element_once_in_balanced_contiguous_ranges(ranks, by_rows):
    if ranks == 7 and not by_rows:
        pytest.skip("6 whole parameters cannot fill 7 ranks (the next test)")
    params = _params()
    layout = ShardLayout([(n, p.shape) for n, p in params.items()], ranks, by_rows=by_rows)
    n = sum(p.size for p in params.values())
    assert layout.cuts[0] == 0 and layout.cuts[-1] == n == sum(layout.counts)
    owner = np.full(n, -1)
    for rank, pieces in enumerate(layout.pieces):
        for name, r0, r1 in pieces:
            p = params[name]
            rows = p.shape[0] if p.ndim else 1
            assert 0 <= r0 < r1 <= rows
            if not by_rows:
                assert (r0, r1) == (0, rows)  # whole parameters
            start = layout.start(name, r0)
            size = p.size // rows * (r1 - r0)
            assert (owner[start : start + size] == -1).all()
            owner[start : start + size] = rank
    assert (owner == np.repeat(np.arange(ranks), layout.counts)).all()  # rank r owns [cuts[r], cuts[r+1])
    if by_rows:  # balanced to within the longest row
        longest_row = max(p.size // (p.shape[0] if p.ndim else 1) for p in params.values())
        assert max(layout.counts) - n / ranks <= longest_row


def test_more_ranks_than_parameters_cannot_shard_whole_parameters():
    with pytest.raises(ValueError, match="a rank would own nothing"):
        ShardLayout([("w", (4, 3)), ("b", (3,))], 3, by_rows=False)


def test_the_builtin_optimizers_are_elementwise_and_the_base_class_is_not():
    from plugins.optimizers import SGD, Adam, AdamW

    assert SGD.elementwise and Adam.elementwise and AdamW.elementwise
    assert not Optimizer.elementwise


# -- the sharded update, rank by rank, in this process ---------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("adamw", {"weight_decay": 0.1, "betas": (0.9, 0.95)}),
        ("adam", {"weight_decay": 0.01}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),
        ("sgd", {"momentum": 0.9, "dampening": 0.1}),
    ],
)
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_updating_each_ranks_rows_is_the_unsharded_update_bit_for_bit(name, options, ranks):
    pm = get_plugin_manager(autoload=False)
    full = _params()
    whole = create_optimizer(name, full, pm, **options)
    layout = ShardLayout([(n, p.shape) for n, p in full.items()], ranks)
    copies = [{n: p.copy() for n, p in _params().items()} for _ in range(ranks)]  # each rank's parameters
    shards = []
    for rank, pieces in enumerate(layout.pieces):
        views = {n: distributed._rows(copies[rank][n], r0, r1) for n, r0, r1 in pieces}
        shards.append((views, create_optimizer(name, views, pm, **options)))
    if name == "adamw":  # the decay mask sees each piece's ndim, the same as its parameter's
        for views, opt in shards:
            assert all(opt.decays[n] == whole.decays[n] for n in views)
    rng = np.random.default_rng(1)
    for step in range(5):
        grads = {n: rng.standard_normal(p.shape) for n, p in full.items()}
        whole.step(grads, 0.01)
        for rank, (views, opt) in enumerate(shards):
            opt.step({n: distributed._rows(grads[n], r0, r1) for n, r0, r1 in layout.pieces[rank]}, 0.01)
    for rank, pieces in enumerate(layout.pieces):
        for n, r0, r1 in pieces:
            np.testing.assert_array_equal(
                distributed._rows(copies[rank][n], r0, r1), distributed._rows(full[n], r0, r1)
            )


def test_a_sharded_optimizer_of_one_rank_equals_the_optimizer_and_keeps_its_state_format():
    from plugins.optimizers import AdamW

    a, b = _params(), _params()
    plain = AdamW(a, weight_decay=0.1)
    sharded = ShardedOptimizer(AdamW, b, World(), weight_decay=0.1)
    rng = np.random.default_rng(2)
    for _ in range(3):
        grads = {n: rng.standard_normal(p.shape) for n, p in a.items()}
        plain.step(grads, 0.01)
        sharded.step(sharded.reduce_gradients(grads), 0.01)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n])
    state = sharded.state_dict()
    assert sorted(state) == sorted(plain.state_dict()) and state["step"] == 3
    for key, value in plain.state_dict().items():
        np.testing.assert_array_equal(state[key], value)
    assert state_nbytes(sharded) == state_nbytes(plain) == 2 * 8 * sum(p.size for p in a.values())
    again = ShardedOptimizer(AdamW, _params(), World(), weight_decay=0.1)
    again.load_state_dict(plain.state_dict())  # an unsharded state loads into a sharded optimizer
    assert again.inner.t == 3


def test_one_process_with_zero_is_the_same_run(tmp_path, names_file):
    pm = get_plugin_manager(autoload=False)
    common = dict(
        steps=6,
        batch_size=3,
        grad_accum=2,
        n_embd=16,
        n_head=2,
        block_size=8,
        samples=0,
        dtype="float64",
        optimizer="adamw",
        grad_clip=0.05,
        eval_interval=3,
        progress=False,
        plugin_manager=pm,
    )
    a = arraygpt.train(str(names_file), out_dir=tmp_path / "a", zero=True, **common)
    b = arraygpt.train(str(names_file), out_dir=tmp_path / "b", **common)
    assert not isinstance(a.optimizer, ShardedOptimizer)  # nothing to shard over
    for n, p in b.model.params.items():
        np.testing.assert_array_equal(to_numpy(a.model.params[n]), to_numpy(p))
    assert load_checkpoint(tmp_path / "a").extra["train_config"]["zero"] is True


def test_zero_must_be_a_bool():
    with pytest.raises(ValueError, match="zero must be True or False"):
        arraygpt.TrainConfig(zero="yes")


# -- several ranks ------------------------------------------------------------------------------------


@needs_mpi
@pytest.mark.parametrize(
    ("ranks", "clip", "optimizer"),
    [
        (2, "0", ["--optimizer", "adamw", "--weight-decay", "0.1"]),
        (2, "0.05", ["--optimizer", "adam"]),
        (4, "0", ["--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.1"]),
        (4, "0.05", ["--optimizer", "adamw", "--weight-decay", "0.1"]),
    ],
    ids=["R2-adamw", "R2-adam-clip", "R4-sgd-momentum", "R4-adamw-clip"],
)
def test_sharded_ranks_equal_one_process_with_the_same_global_batch(tmp_path, names_file, ranks, clip, optimizer):
    common = ["--steps", "20", "--batch-size", "2", "--grad-clip", clip, *optimizer]
    result = train(ranks, tmp_path / "zero", names_file, *common, "--zero", "true")
    assert f"optimizer state sharded over {ranks} ranks (zero)" in result.stdout
    train(0, tmp_path / "one", names_file, *common, "--grad-accum", str(ranks))
    assert max_rel_diff(weights(tmp_path / "zero"), weights(tmp_path / "one")) < 1e-10
    # the checkpoint holds the full state, as one process writes it
    zero_state, one_state = _optimizer_arrays(tmp_path / "zero"), _optimizer_arrays(tmp_path / "one")
    assert sorted(zero_state) == sorted(one_state) and zero_state
    assert all(zero_state[k].shape == one_state[k].shape for k in one_state)
    assert max_rel_diff(zero_state, one_state) < 1e-10
    a, b = metrics(tmp_path / "zero"), metrics(tmp_path / "one")
    for event, key in (("train", "loss"), ("eval", "val_loss"), *((("train", "grad_norm"),) if clip != "0" else ())):
        np.testing.assert_allclose(
            [r[key] for r in a if r["event"] == event], [r[key] for r in b if r["event"] == event], rtol=1e-10
        )
    if clip != "0":  # the clip is active: the norms are above it
        assert all(r["grad_norm"] > float(clip) for r in a if r["event"] == "train")


_MEMORY = textwrap.dedent(
    """
    import json, sys
    import arraygpt
    from arraygpt.training.distributed import get_world
    from arraygpt.manager import get_plugin_manager
    from arraygpt.training.optim import state_nbytes

    run = arraygpt.train(sys.argv[1], steps=2, batch_size=1, n_embd=16, n_head=2, block_size=8, samples=0,
                         optimizer="adamw", zero=True, progress=False,
                         plugin_manager=get_plugin_manager(autoload=False))
    world = get_world()
    record = {"rank": world.rank, "bytes": state_nbytes(run.optimizer),
              "params": sum(int(p.size) for p in run.model.params.values()),
              "row": max(int(p.size) // (p.shape[0] if p.ndim else 1) for p in run.model.params.values())}
    sys.stdout.write(json.dumps(record) + "\\n")  # one write: the launcher may interleave the ranks' writes
    """
)


@needs_mpi
def test_optimizer_state_per_rank_is_one_rth_of_the_whole(tmp_path, names_file):
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY)
    per_rank = {}
    for ranks in (1, 2, 4):
        out = launch_ok(0 if ranks == 1 else ranks, [str(script), str(names_file)], tmp_path).stdout
        per_rank[ranks] = sorted(printed_records(out), key=lambda r: r["rank"])
        assert len(per_rank[ranks]) == ranks
    whole = per_rank[1][0]["bytes"]
    assert whole == 2 * 4 * per_rank[1][0]["params"]  # AdamW: m and v, float32
    row_bytes = 2 * 4 * per_rank[1][0]["row"]
    for ranks in (2, 4):
        sizes = [r["bytes"] for r in per_rank[ranks]]
        assert sum(sizes) == whole  # every element's moments on exactly one rank
        assert max(sizes) <= whole / ranks + row_bytes  # balanced to within one row


@needs_mpi
def test_a_sharded_checkpoint_resumes_in_one_process_and_a_plain_one_on_sharded_ranks(tmp_path, names_file):
    common = ["--steps", "20", "--batch-size", "2", "--optimizer", "adamw", "--grad-clip", "0.05"]
    train(0, tmp_path / "one", names_file, *common, "--grad-accum", "4")
    # 4 sharded ranks stop at 10; one process without zero finishes
    train(4, tmp_path / "a", names_file, *common, "--zero", "true", "--stop-after", "10")
    assert load_checkpoint(tmp_path / "a").optimizer_state["step"] == 10
    result = resume(0, tmp_path / "a", "--zero", "false")
    assert "global batch 8 = 1 rank(s) x 2 rows x 4 micro-batch(es)" in result.stdout
    assert max_rel_diff(weights(tmp_path / "a"), weights(tmp_path / "one")) < 1e-10
    # one process stops at 10; 2 sharded ranks finish
    train(0, tmp_path / "b", names_file, *common, "--grad-accum", "4", "--stop-after", "10")
    result = resume(2, tmp_path / "b", "--zero", "true")
    assert "optimizer state sharded over 2 ranks (zero)" in result.stdout
    assert max_rel_diff(weights(tmp_path / "b"), weights(tmp_path / "one")) < 1e-10
    assert max_rel_diff(_optimizer_arrays(tmp_path / "b"), _optimizer_arrays(tmp_path / "one")) < 1e-10


_HANGING = textwrap.dedent(
    """
    import sys, time
    import arraygpt
    from arraygpt.training import step
    from arraygpt.training.distributed import get_world

    original = step.gradients

    def hanging(run, x, y):
        if get_world().rank == 1 and run.step == 3:
            time.sleep(600)
        return original(run, x, y)

    step.gradients = hanging
    arraygpt.train(sys.argv[1], steps=10, batch_size=2, n_embd=16, n_head=2, block_size=8, zero=True,
                   eval_interval=100, samples=0, progress=False)
    """
)


@needs_mpi
def test_a_hung_rank_ends_a_sharded_job_from_the_reduce_scatter(tmp_path, names_file):
    script = tmp_path / "hanging.py"
    script.write_text(_HANGING)
    env = {**job_env(), "ARRAYGPT_MPI_TIMEOUT": "10"}  # more than rank 1 may fall behind on a loaded machine
    result = launch(2, [str(script), str(names_file)], tmp_path, env=env)
    assert result.returncode != 0
    assert "rank 0 of 2" in result.stderr and "the gradient reduce-scatter of step 4 waited 10 s" in result.stderr


@needs_mpi
@pytest.mark.parametrize("zero", ["false", "true"])
def test_lora_on_ranks_equals_lora_in_one_process(tmp_path, names_file, zero):
    """LoRA adapters of a trained model, fine-tuned data-parallel (with and without the sharded
    optimizer state): the same adapters as one process with the same global batch."""
    train(0, tmp_path / "base", names_file, "--steps", "10", "--batch-size", "4")
    common = ["--lora-rank", "2", "--steps", "10", "--batch-size", "2"]
    fine_tune(2, tmp_path / "ranks", names_file, tmp_path / "base", *common, "--zero", zero)
    fine_tune(0, tmp_path / "one", names_file, tmp_path / "base", *common, "--grad-accum", "2")
    ranks, one = (arraygpt.load(tmp_path / name).model.adapters for name in ("ranks", "one"))
    ranks, one = ({k: np.asarray(v) for k, v in a.items()} for a in (ranks, one))
    assert sorted(ranks) == sorted(one) and ranks
    assert max_rel_diff(ranks, one) < 1e-10
    assert max(float(np.abs(v).max()) for k, v in one.items() if k.endswith(".lora_b")) > 0  # B starts at zero
