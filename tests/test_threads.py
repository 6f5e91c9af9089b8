"""A batch split across host threads (GPT(threads=N), ARRAYGPT_NUM_THREADS) computes what one
thread computes, up to rounding, and a fixed thread count stays exactly reproducible."""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest

from arraygpt import GPT, GPTConfig, generate
from arraygpt.nn import core
from arraygpt.nn import runner as runner_module
from arraygpt.nn.runner import BatchRunner
from arraygpt.xp import load_backend, to_numpy

CONFIG = GPTConfig.preset("gpt2", vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=12)


@pytest.fixture
def split_every_batch(monkeypatch):
    """Let even these tiny batches split (the real threshold keeps small work on one thread)."""
    monkeypatch.setattr(runner_module, "MIN_WORK_PER_THREAD", 1)


def _model(threads, state=None, dropout=0.0, dtype="float64"):
    model = GPT(dataclasses.replace(CONFIG, dropout=dropout), seed=3, dtype=dtype, threads=threads)
    if state is not None:
        model.load_state_dict(state)
    return model


def _step(model, idx, targets):
    logits, loss = model.forward(idx, targets)
    patterns = [to_numpy(a) for a in model.attention_patterns()]
    grads = {k: to_numpy(g) for k, g in model.backward().items()}
    return to_numpy(logits), loss, patterns, grads


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_split_batch_matches_one_thread(split_every_batch, threads):
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 23, (5, 8))
    targets = rng.integers(0, 23, (5, 8))
    targets[1, :] = -1  # a whole chunk (with 5 threads) has nothing to predict
    targets[3, 2] = -1
    state = {k: to_numpy(v) + rng.standard_normal(v.shape) * 0.1 for k, v in _model(1).state_dict().items()}
    one = _step(_model(1, state), idx, targets)
    split = _model(threads, state)
    many = _step(split, idx, targets)
    assert split.runner.started  # the chunks really ran on the pool
    np.testing.assert_allclose(many[0], one[0], rtol=1e-12, atol=1e-12)
    assert many[1] == pytest.approx(one[1], rel=1e-12)
    for a, b in zip(many[2], one[2]):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert set(many[3]) == set(one[3])
    for name in one[3]:
        np.testing.assert_allclose(many[3][name], one[3][name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_split_batch_without_any_target_gives_nan_like_one_thread(split_every_batch):
    idx = np.zeros((4, 8), dtype=np.int64)
    targets = np.full((4, 8), -1)
    for threads in (1, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # NumPy's 0/0 on one thread
            _, loss = _model(threads).forward(idx, targets)
        assert math.isnan(loss)


def test_split_batch_with_dropout_is_reproducible_and_resumable(split_every_batch):
    idx = np.random.default_rng(1).integers(0, 23, (4, 9))
    a, b = _model(2, dropout=0.3).train(), _model(2, dropout=0.3).train()
    losses = [a.forward(idx[:, :-1], idx[:, 1:])[1] for _ in range(2)]
    assert losses[0] != losses[1]  # new masks each step
    assert [b.forward(idx[:, :-1], idx[:, 1:])[1] for _ in range(2)] == losses
    state = a.rng_state()
    after = a.forward(idx[:, :-1], idx[:, 1:])[1]
    a.set_rng_state(state)
    assert a.forward(idx[:, :-1], idx[:, 1:])[1] == after


def test_chunks_cover_the_batch_in_order(split_every_batch):
    runner = BatchRunner(3, load_backend("numpy"))
    assert runner.chunks(7, 8) == [slice(0, 2), slice(2, 4), slice(4, 7)]
    assert runner.chunks(2, 8) == [slice(0, 1), slice(1, 2)]  # never more chunks than rows


def test_small_work_stays_on_one_thread():
    assert BatchRunner(4, load_backend("numpy")).chunks(64, 8 * 12) == [slice(0, 64)]  # < MIN_WORK_PER_THREAD


def test_the_runner_closes_its_pool(split_every_batch):
    idx = np.random.default_rng(4).integers(0, 23, (4, 9))
    with _model(2) as model:
        model.forward(idx[:, :-1], idx[:, 1:])
        pool = model.runner._pool
        assert pool is not None
    assert model.runner._pool is None
    with pytest.raises(RuntimeError, match="shutdown"):  # the old pool takes no more work
        pool.submit(print)
    _, loss = model.forward(idx[:, :-1], idx[:, 1:])  # still usable: a new pool starts
    assert math.isfinite(loss) and model.runner.started
    model.close()


def test_a_collected_runner_shuts_its_pool_down(split_every_batch):
    import gc

    model = _model(2)
    idx = np.random.default_rng(5).integers(0, 23, (4, 9))
    model.forward(idx[:, :-1], idx[:, 1:])
    pool = model.runner._pool
    del model
    gc.collect()
    with pytest.raises(RuntimeError, match="shutdown"):
        pool.submit(print)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_threads_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        GPT(CONFIG, threads=bad)


def test_default_threads_come_from_the_backend():
    assert GPT(CONFIG, backend="numpy").threads == load_backend("numpy").threads >= 1
    assert GPT(CONFIG, backend="array_api_strict").threads == 1


def _openblas_control():
    load_backend("numpy")
    control = sys.modules["arraygpt.backends.numpy"]._openblas
    if control is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS whose threads can be set; the backend keeps one thread")
    return control


def _numpy_backend_threads(env_value):
    env = {**os.environ, "ARRAYGPT_NUM_THREADS": env_value}
    code = "from arraygpt.xp import load_backend; print(load_backend('numpy').threads)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_arraygpt_num_threads_sets_the_numpy_backend_threads():
    _openblas_control()
    result = _numpy_backend_threads("3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"


def test_a_bad_arraygpt_num_threads_is_a_clear_error():
    result = _numpy_backend_threads("two")
    assert result.returncode != 0
    assert "ARRAYGPT_NUM_THREADS must be a positive integer, got 'two'" in result.stderr


@pytest.fixture
def openblas_at_two():
    """NumPy's OpenBLAS set to 2 threads for the test (so that holding it to 1 shows), then reset."""
    get, set_ = _openblas_control()
    before = get()
    set_(2)
    yield get
    set_(before)


def test_blas_threads_limits_and_restores_openblas(openblas_at_two):
    get = openblas_at_two
    with load_backend("numpy").blas_threads(1):
        assert get() == 1
        with load_backend("numpy").blas_threads(1):  # nested or overlapping blocks share the setting
            assert get() == 1
        assert get() == 1
    assert get() == 2


def test_models_stepping_in_two_threads_restore_blas(split_every_batch, openblas_at_two):
    idx = np.random.default_rng(2).integers(0, 23, (4, 9))
    errors = []

    def steps():
        try:
            model = _model(2, dtype="float32")
            for _ in range(20):
                model.forward(idx[:, :-1], idx[:, 1:])
                model.backward()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    runners = [threading.Thread(target=steps) for _ in range(2)]
    for t in runners:
        t.start()
    for t in runners:
        t.join()
    assert not errors
    assert openblas_at_two() == 2


def test_one_thread_means_one_blas_thread_too(openblas_at_two, monkeypatch):
    """threads=1 (or ARRAYGPT_NUM_THREADS=1) holds BLAS to one thread while the model computes,
    for the unsplit batch of a forward, its backward and a decoding step; BLAS is given back after."""
    seen = []
    forward, backward = core.gpt_forward, core.gpt_backward

    def watch(fn):
        def run(*args, **kwargs):
            seen.append((fn.__name__, openblas_at_two()))
            return fn(*args, **kwargs)

        return run

    monkeypatch.setattr(core, "gpt_forward", watch(forward))
    monkeypatch.setattr(core, "gpt_backward", watch(backward))
    idx = np.random.default_rng(0).integers(0, 23, (1, 9))
    for threads, blas in ((1, 1), (2, 2)):
        seen.clear()
        model = _model(threads)
        model.forward(idx[:, :-1], idx[:, 1:])
        model.backward()
        list(generate(model, [1, 2], 2, seed=0))
        assert seen and {b for _, b in seen} == {blas}, seen
        assert {name for name, _ in seen} == {"gpt_forward", "gpt_backward"}
        assert openblas_at_two() == 2


def test_an_error_in_a_chunk_reaches_the_caller_after_the_others_end(split_every_batch, openblas_at_two, monkeypatch):
    model = _model(3)
    original = core.gpt_forward
    finished = []

    def main_chunk_fails(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("chunk failed")
        time.sleep(0.2)  # still running when the main thread's chunk fails
        out = original(*args, **kwargs)
        finished.append(openblas_at_two())  # BLAS still held to one thread while it ran
        return out

    monkeypatch.setattr(core, "gpt_forward", main_chunk_fails)
    with pytest.raises(RuntimeError, match="chunk failed"):
        model.forward(np.zeros((3, 8), dtype=np.int64), np.zeros((3, 8), dtype=np.int64))
    assert finished == [1, 1]  # both other chunks ended before the error came back
    assert openblas_at_two() == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_can_still_split_its_batch(split_every_batch):
    model = _model(2)
    idx = np.random.default_rng(3).integers(0, 23, (4, 9))
    _, parent_loss = model.forward(idx[:, :-1], idx[:, 1:])  # the pool exists now
    child = multiprocessing.get_context("fork").Process(target=_child_step, args=(model, idx, parent_loss))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the parent's thread pool")
    assert child.exitcode == 0


def _child_step(model, idx, expected_loss):
    _, loss = model.forward(idx[:, :-1], idx[:, 1:])
    os._exit(0 if loss == expected_loss else 1)


def test_arraygpt_shortens_the_idle_spin_of_openblas_and_openmp_threads_unless_the_user_set_it():
    """OpenBLAS's idle threads spin for 2^28 cycles after a call and halved a 2-thread quantized
    prompt beside numba's threads (docs/kernels.md, "Threads"): importing arraygpt sets a shorter
    spin before NumPy loads, and numba's OpenMP spin before numba starts, each only where unset."""
    import os
    import subprocess
    import sys

    pytest.importorskip("numba")
    code = (
        "import os, arraygpt\n"
        "from arraygpt.backends.numpy.kernels._jit import numba\n"
        "numba()\n"
        "print(os.environ['OPENBLAS_THREAD_TIMEOUT'], os.environ['GOMP_SPINCOUNT'])\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT")}
    mine = {**base, "OPENBLAS_THREAD_TIMEOUT": "20", "GOMP_SPINCOUNT": "7"}
    for env, expected in ((base, "16 10000"), (mine, "20 7")):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == expected.split()
