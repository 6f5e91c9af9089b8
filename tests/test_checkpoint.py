"""Checkpoints: layout, round trip, atomicity under a crash, clear errors, no unpickling."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from arraygpt.config import GPTConfig
from arraygpt.io import checkpoint as ckpt_mod
from arraygpt.io import safetensors
from arraygpt.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from arraygpt.io.tokenizers import CharTokenizer
from arraygpt.nn.model import GPT
from arraygpt.plugins.optimizers import AdamW
from arraygpt.xp import to_numpy

CONFIG = GPTConfig.preset("microgpt", vocab_size=6, block_size=4, dropout=0.1)


def _trained(seed=0, steps=2):
    model = GPT(CONFIG, seed=seed)
    opt = AdamW(model.params, weight_decay=0.1)
    model.train()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, 6, (2, 4))
        model.forward(idx, np.roll(idx, -1, axis=1))
        opt.step(model.backward(), 1e-2)
    return model, opt


def _host(model):
    return {k: to_numpy(v).copy() for k, v in model.params.items()}


def test_layout_and_round_trip(tmp_path):
    model, opt = _trained()
    tok = CharTokenizer("abcde")
    out = save_checkpoint(tmp_path / "ck", model, tok, opt, extra={"step": 2, "note": "hi"})
    assert sorted(os.listdir(out)) == [
        "arraygpt-tokenizer.json",
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config.pop("arraygpt_format") == 1 and config == CONFIG.to_dict()
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary folders left behind

    ck = load_checkpoint(tmp_path / "ck")
    assert ck.config == CONFIG and ck.tokenizer == tok and ck.extra == {"step": 2, "note": "hi"}
    for name, value in _host(model).items():
        np.testing.assert_array_equal(to_numpy(ck.model.params[name]), value)
    state = opt.state_dict()
    assert set(ck.optimizer_state) == set(state) and ck.optimizer_state["step"] == 2
    for k, v in state.items():
        np.testing.assert_array_equal(ck.optimizer_state[k], v)
    # the dropout generator continues where the saved model's left off
    assert ck.model._dropout_rng.random() == model._dropout_rng.random()


def test_load_on_another_backend(tmp_path):
    model, _ = _trained()
    save_checkpoint(tmp_path / "ck", model)
    ck = load_checkpoint(tmp_path / "ck", backend="array_api_strict")
    assert ck.model.backend.name == "array_api_strict" and ck.tokenizer is None and ck.optimizer_state is None
    np.testing.assert_array_equal(to_numpy(ck.model.params["wte"]), to_numpy(model.params["wte"]))


def test_a_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    old_model, old_opt = _trained(seed=1)
    save_checkpoint(tmp_path / "ck", old_model, optimizer=old_opt, extra={"step": 1})
    new_model, new_opt = _trained(seed=2, steps=3)
    real_save = safetensors.save_file

    def crash_after_partial_output(tensors, path, metadata=None):
        if "optimizer" in str(path):  # the model file is written; the optimizer file half-way
            with open(path, "wb") as f:
                f.write(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a":')
            raise OSError("disk full (simulated)")
        real_save(tensors, path, metadata)

    monkeypatch.setattr(safetensors, "save_file", crash_after_partial_output)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path / "ck", new_model, optimizer=new_opt, extra={"step": 3})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.extra == {"step": 1} and ck.optimizer_state["step"] == 2
    for name, value in _host(old_model).items():
        np.testing.assert_array_equal(to_numpy(ck.model.params[name]), value)


def test_a_kill_between_the_renames_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    first, _ = _trained(seed=1)
    save_checkpoint(tmp_path / "ck", first, extra={"step": 1})
    calls = []
    real_replace = os.replace

    def die_on_second_rename(src, dst):
        if os.path.isdir(src):  # the folder renames (files are renamed into place too)
            calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies after moving the old folder aside
        real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", die_on_second_rename)
    second, _ = _trained(seed=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ck", second, extra={"step": 2})
    monkeypatch.undo()
    assert not (tmp_path / "ck").exists() and (tmp_path / ".ck.old").is_dir()
    assert load_checkpoint(tmp_path / "ck").extra == {"step": 1}  # found in .ck.old
    # the next save recovers and replaces it
    save_checkpoint(tmp_path / "ck", second, extra={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert load_checkpoint(tmp_path / "ck").extra == {"step": 2}


def test_truncated_model_file_is_a_clear_error(tmp_path):
    model, _ = _trained()
    out = save_checkpoint(tmp_path / "ck", model)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(out)
    (out / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(out)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("config.json", '{"vocab_size": 6, ', r"config\.json: the checkpoint config is truncated or corrupted"),
        ("config.json", '{"vocab_size": 6}', "not an arraygpt checkpoint config"),
        ("state.json", "[]", r"state\.json: the checkpoint state must hold a JSON object, not list"),
        ("arraygpt-tokenizer.json", '{"type": "bpe"}', "unknown tokenizer type"),
    ],
)
def test_corrupted_json_files_are_clear_errors(tmp_path, name, content, match):
    model, _ = _trained()
    out = save_checkpoint(tmp_path / "ck", model, CharTokenizer("abcde"))
    (out / name).write_text(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(out)


def test_missing_files_and_folders(tmp_path):
    model, _ = _trained()
    out = save_checkpoint(tmp_path / "ck", model)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(out)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="not an arraygpt checkpoint"):
        load_checkpoint(tmp_path)


def test_a_run_folder_loads_its_last_checkpoint(tmp_path):
    model, _ = _trained()
    save_checkpoint(tmp_path / "run" / "last", model, extra={"kind": "last"})
    assert load_checkpoint(tmp_path / "run").extra == {"kind": "last"}


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, opt = _trained()
    out = save_checkpoint(tmp_path / "ck", model, CharTokenizer("abcde"), opt, extra={"x": 1})

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint load must never unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    assert load_checkpoint(out).extra == {"x": 1}
    monkeypatch.undo()
    # a pickle disguised as a checkpoint file is refused, not executed
    (out / "model.safetensors").write_bytes(pickle.dumps({"wte": np.zeros(3)}))
    with pytest.raises(CheckpointError):
        load_checkpoint(out)
