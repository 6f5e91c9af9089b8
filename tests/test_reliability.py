"""Issue 10's contract outside the checkpoint files (those are tests/test_hostile.py): the command
layer's exit codes (expected errors are one line and exit 2, a bug keeps its traceback), run
folders (one lock per run, a broken last/, leftovers of a killed save, hostile training state),
training text (special, huge, binary, empty or too short files) and generation (NaN logits, absurd
counts, the held-back text flushed). A case that could hang or eat memory runs in a subprocess
with an address-space limit and a generous timeout, never a timing assertion.

Every file here is built by the tests themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import arraygpt
from arraygpt.cli import main
from capped import ENV, MEMORY_LIMIT, attempt

ROOT = Path(__file__).resolve().parents[1]


def command(*args: str, timeout: float = 60, limit: bool = True) -> subprocess.CompletedProcess[str]:
    """``arraygpt ARGS`` in a subprocess (with the memory limit), its output captured."""
    rlimit = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({MEMORY_LIMIT}, {MEMORY_LIMIT})); "
    prefix = rlimit if limit else ""
    code = prefix + "import sys; from arraygpt.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# the command layer: expected errors exit 2 on one line, a bug keeps its traceback


@pytest.fixture
def failing_params(monkeypatch):
    """``arraygpt params`` made to raise a given exception."""
    import arraygpt.cli.params as params

    def make(error: BaseException) -> None:
        def run(args):
            raise error

        monkeypatch.setattr(params, "run", run)

    return make


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        FileNotFoundError("no such file: x"),
        ImportError("pip install y"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_expected_error_is_one_line_and_exit_2(failing_params, capsys, error):
    failing_params(error)
    assert main(["params"]) == 2
    err = capsys.readouterr().err
    assert err == f"arraygpt params: error: {error}\n"


def test_arraygpts_own_errors_are_expected(failing_params, capsys):
    from arraygpt.errors import CheckpointError
    from arraygpt.manager import PluginError
    from arraygpt.training.data import DataError
    from arraygpt.training.runfolder import RunFolderError
    from arraygpt.xp import BackendUnavailable

    for error in (CheckpointError("c"), DataError("d"), PluginError("p"), BackendUnavailable("b"), RunFolderError("r")):
        failing_params(error)
        assert main(["params"]) == 2
        assert capsys.readouterr().err == f"arraygpt params: error: {error}\n"


def test_a_multi_line_message_is_printed_on_one_line(failing_params, capsys):
    failing_params(ValueError("first\nsecond"))
    assert main(["params"]) == 2
    assert capsys.readouterr().err == "arraygpt params: error: first second\n"


@pytest.mark.parametrize(
    "error",
    [TypeError("a bug"), KeyError("a bug"), IndexError("a bug"), AttributeError("x")],
    ids=lambda e: type(e).__name__,
)
def test_a_bug_keeps_its_traceback(failing_params, error):
    failing_params(error)
    with pytest.raises(type(error)):
        main(["params"])


def test_a_bug_shows_its_traceback_from_the_command(tmp_path):
    code = (
        "import sys, arraygpt.cli.params as p\n"
        "def run(args): raise TypeError('a genuine bug')\n"
        "p.run = run\n"
        "from arraygpt.cli import main\nsys.exit(main(['params']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "TypeError: a genuine bug" in proc.stderr


def test_output_cut_short_by_its_reader_ends_quietly():
    code = "import sys; from arraygpt.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "params", "--n-layer", "1024", "--json"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "{"
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read()
    assert proc.wait(60) == 0 and err == "", err


# ----------------------------------------------------------------------------------------------
# run folders: the lock


HOLD = """
import sys, time
from arraygpt.training.runfolder import lock_run_folder, RunFolderError
try:
    with lock_run_folder(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
except RunFolderError as e:
    print("busy:", e, flush=True)
"""


def _holder(folder: Path, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True
    )


def test_a_locked_run_folder_refuses_a_second_run_naming_the_folder_and_the_pid(tmp_path):
    from arraygpt.training.runfolder import RunFolderError, lock_run_folder

    folder = tmp_path / "run"
    holder = _holder(folder, 600)
    try:
        assert holder.stdout.readline().strip() == "locked"
        kind, message = attempt(
            f"from arraygpt.training.runfolder import lock_run_folder\nwith lock_run_folder({str(folder)!r}): pass"
        )
        assert kind == "arraygpt.errors.RunFolderError"
        assert str(folder) in message and f"PID {holder.pid}" in message and "--out-dir" in message
        with pytest.raises(RunFolderError, match=f"PID {holder.pid}"), lock_run_folder(folder):
            pass
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait(60)
    with lock_run_folder(folder) as locked:
        assert locked
        assert (folder / ".arraygpt.lock").read_text().strip() == str(os.getpid())
    with lock_run_folder(folder):  # released at the end of the block
        pass


def test_the_lock_is_per_open_file_so_the_same_process_cannot_take_it_twice(tmp_path):
    from arraygpt.training.runfolder import RunFolderError, lock_run_folder

    with lock_run_folder(tmp_path):
        with pytest.raises(RunFolderError, match=f"PID {os.getpid()}"), lock_run_folder(tmp_path):
            pass


def test_processes_racing_for_one_folder_get_exactly_one_lock(tmp_path):
    folder = tmp_path / "run"
    racers = [_holder(folder, 8) for _ in range(4)]
    try:
        answers = [r.communicate(timeout=120)[0].strip() for r in racers]
    finally:
        for r in racers:
            r.kill()
    assert sorted(a.split(":")[0] for a in answers) == ["busy", "busy", "busy", "locked"], answers
    winner = racers[[a == "locked" for a in answers].index(True)].pid
    assert all(f"PID {winner}" in a for a in answers if a != "locked"), answers


def test_a_file_in_place_of_the_run_folder_is_refused(tmp_path):
    from arraygpt.training.runfolder import RunFolderError, check_new_run_folder, lock_run_folder

    (tmp_path / "f").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"), lock_run_folder(tmp_path / "f"):
        pass
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        check_new_run_folder(tmp_path / "f")


# ----------------------------------------------------------------------------------------------
# run folders: what is in them


def _checkpoint(folder: Path, step: int, **extra) -> Path:
    """A checkpoint folder with the files resume_source looks at (config.json, state.json)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "state.json").write_text(json.dumps({"extra": {"step": step, **extra}}))
    return folder


@pytest.mark.parametrize("name", ["last", "best", ".last.old", "metrics.jsonl"])
def test_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path, name):
    from arraygpt.training.runfolder import RunFolderError, check_new_run_folder

    check_new_run_folder(tmp_path)  # empty: fine
    check_new_run_folder(tmp_path / "missing")
    if name == "metrics.jsonl":
        (tmp_path / name).write_text("")
    else:
        (tmp_path / name).mkdir()
    # metrics alone: a run that never saved, which a resume cannot continue either (issue 21)
    held = (
        "stopped before its first checkpoint"
        if name == "metrics.jsonl"
        else rf"already holds a run \({name}\).*--resume"
    )
    with pytest.raises(RunFolderError, match=held):
        check_new_run_folder(tmp_path)


@pytest.mark.parametrize("name", ["last", "best", ".last.old"])
def test_a_symlinked_or_non_folder_checkpoint_is_refused(tmp_path, name):
    from arraygpt.training.runfolder import RunFolderError, check_run_folder

    target = _checkpoint(tmp_path / "elsewhere", 3)
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(target)
    with pytest.raises(RunFolderError, match=f"{name} is a symbolic link.*move the link away"):
        check_run_folder(run)
    (run / name).unlink()
    (run / name).write_text("not a folder")
    with pytest.raises(RunFolderError, match=f"{name} is not a folder"):
        check_run_folder(run)
    assert (target / "state.json").is_file()  # nothing outside the run folder is touched


def test_leftovers_of_a_killed_save_are_removed_and_never_followed(tmp_path):
    from arraygpt.training.runfolder import check_run_folder

    run = tmp_path / "run"
    _checkpoint(run / "last", 4)
    outside = _checkpoint(tmp_path / "outside", 1)
    (run / ".last.tmp-abc").mkdir()
    (run / ".last.tmp-abc" / "model.safetensors").write_bytes(b"partial")
    (run / ".best.tmp-def").symlink_to(outside)
    assert check_run_folder(run, clean=False) == [run / ".best.tmp-def", run / ".last.tmp-abc"]
    assert (run / ".last.tmp-abc").exists()
    check_run_folder(run)
    assert sorted(p.name for p in run.iterdir()) == ["last"]
    assert (outside / "state.json").is_file()


def test_resume_source_of_a_run_folder_and_of_its_checkpoints(tmp_path):
    from arraygpt.training.runfolder import resume_source

    run = tmp_path / "run"
    _checkpoint(run / "last", 8)
    _checkpoint(run / "best", 8)
    assert resume_source(run) == (run, run)
    assert resume_source(run / "last") == (run, run / "last")
    assert resume_source(run / "best") == (run, run / "best")  # best is the last step: nothing is lost


def test_resume_from_best_behind_last_is_refused(tmp_path):
    from arraygpt.training.runfolder import RunFolderError, resume_source

    run = tmp_path / "run"
    _checkpoint(run / "last", 8)
    _checkpoint(run / "best", 4)
    with pytest.raises(RunFolderError, match=r"holds step 8, later than best's step 4.*--resume"):
        resume_source(run / "best")
    assert resume_source(run) == (run, run)


def test_resume_of_a_folder_with_best_but_no_last_says_how(tmp_path):
    from arraygpt.training.runfolder import RunFolderError, resume_source

    run = tmp_path / "run"
    _checkpoint(run / "best", 4)
    with pytest.raises(RunFolderError, match=f"has best/ but no last/.*--resume {run / 'best'}"):
        resume_source(run)
    assert resume_source(run / "best") == (run, run / "best")
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        resume_source(tmp_path / "missing")
    with pytest.raises(RunFolderError, match="not a run folder"):
        resume_source(tmp_path)


# ----------------------------------------------------------------------------------------------
# hostile training state in state.json


GOOD_STATE = {
    "step": 4,
    "train_config": {"steps": 12},
    "data": {},
    "best_val_loss": 2.5,
    "world_size": 1,
    "global_batch": 8,
    "data_sha256": "ab",
    "kind": "last",
}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"step": -1}, "step is -1"),
        ({"step": "4"}, "step is '4'"),
        ({"step": True}, "step is True"),
        ({"step": 13}, "at most the run's steps (12)"),
        ({"step": 10**30}, "an integer in [0,"),
        ({"best_val_loss": "low"}, "best_val_loss is 'low'"),
        ({"best_val_loss": float("nan")}, "finite"),
        ({"world_size": 0}, "world_size is 0"),
        ({"global_batch": 2.5}, "global_batch is 2.5"),
        ({"data_sha256": 7}, "data_sha256 is 7"),
        ({"kind": "first"}, "'last' or 'best'"),
        ({"train_config": []}, "train_config is []"),
        ({"data": 3}, "data is 3"),
    ],
)
def test_hostile_training_state_is_one_checkpoint_error(tmp_path, change, fragment):
    from arraygpt.errors import CheckpointError
    from arraygpt.training.runfolder import check_training_state

    check_training_state(GOOD_STATE, tmp_path)
    with pytest.raises(CheckpointError) as info:
        check_training_state({**GOOD_STATE, **change}, tmp_path)
    assert str(tmp_path / "state.json") in str(info.value) and fragment in str(info.value)


def test_training_state_without_the_training_parts_is_refused(tmp_path):
    from arraygpt.errors import CheckpointError
    from arraygpt.training.runfolder import check_training_state

    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        check_training_state({"step": 1}, tmp_path)
    with pytest.raises(CheckpointError, match="must be a JSON object"):
        check_training_state([1], tmp_path)


# ----------------------------------------------------------------------------------------------
# training text


def assert_data_error(path: Path | str, *fragments: str) -> str:
    kind, message = attempt(f"from arraygpt.training.data import read_source\nread_source({str(path)!r})")
    assert kind == "arraygpt.errors.DataError", (kind, message)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)
    assert_data_error(fifo, "FIFO (named pipe), not a regular file", "UTF-8 text file")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_device_or_a_symlink_to_one_is_refused_at_once(tmp_path, device):
    assert_data_error(device, "character device, not a regular file")
    (tmp_path / "text.txt").symlink_to(device)
    assert_data_error(tmp_path / "text.txt", "character device")


def test_a_folder_is_refused(tmp_path):
    assert_data_error(tmp_path, "is a folder", "UTF-8 text file")


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    from arraygpt.training.data import MAX_TEXT_BYTES

    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(MAX_TEXT_BYTES + 1)  # sparse: nothing on the disk
    assert_data_error(huge, f"{MAX_TEXT_BYTES + 1:,} bytes", f"at most {MAX_TEXT_BYTES:,}", "ARRAYGPT_MAX_DATA_BYTES")


def test_the_size_limit_can_be_set(tmp_path, monkeypatch):
    from arraygpt.training.data import DataError, read_source

    path = tmp_path / "t.txt"
    path.write_text("hello world\n")
    monkeypatch.setenv("ARRAYGPT_MAX_DATA_BYTES", "5")
    with pytest.raises(DataError, match="at most 5 bytes"):
        read_source(path)
    monkeypatch.setenv("ARRAYGPT_MAX_DATA_BYTES", "lots")
    with pytest.raises(DataError, match="must be a positive number of bytes"):
        read_source(path)
    monkeypatch.setenv("ARRAYGPT_MAX_DATA_BYTES", "100")
    assert read_source(path) == "hello world\n"
    for huge in (2**40, 10**30):  # memory follows the file, not the limit (read(limit + 1) reserved it)
        monkeypatch.setenv("ARRAYGPT_MAX_DATA_BYTES", str(huge))
        assert read_source(path) == "hello world\n"


def test_a_byte_order_mark_is_not_text(tmp_path):
    from arraygpt.training.data import read_source

    path = tmp_path / "notepad.txt"
    path.write_bytes("\ufeffemma\nolivia\n".encode())  # as Windows Notepad saves UTF-8
    assert read_source(path) == "emma\nolivia\n"


def test_json_and_safetensors_headers_with_an_integer_past_pythons_limit_are_one_clean_error(tmp_path):
    """Python refuses to parse an integer of over 4300 digits with a bare ValueError."""
    import struct

    from arraygpt.errors import CheckpointError
    from arraygpt.io.files import read_json
    from arraygpt.io.safetensors import SafetensorsError, load_file

    config = tmp_path / "config.json"
    config.write_text('{"vocab_size": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match="config.json: the JSON file is truncated or corrupted"):
        read_json(config)
    header = ('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}').encode()
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(SafetensorsError, match="w.safetensors: corrupted safetensors header"):
        load_file(weights)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (b"caf\xe9\nok\n", ("not UTF-8", "byte 0xe9 at offset 3 (line 1)", "iconv")),
        (b"ok\n\xff\xfe\x00\x01", ("not UTF-8", "byte 0xff at offset 3 (line 2)")),
        (b"\x7fELF\x02\x01\x01\x00\x00", ("NUL bytes", "binary file")),
        (b"", ("is empty", "at least one line")),
        (b" \n\t\n", ("only whitespace",)),
    ],
    ids=["latin1", "invalid-utf8", "binary", "empty", "whitespace"],
)
def test_text_that_is_not_usable_is_one_data_error(tmp_path, content, fragments):
    path = tmp_path / "text.txt"
    path.write_bytes(content)
    assert_data_error(path, *fragments)


def test_a_stream_shorter_than_a_window_is_a_data_error():
    from arraygpt.training.data import DataError, default_tokenizer, make_dataset

    tok = default_tokenizer("char", "abcdef", "stream")
    with pytest.raises(DataError, match=r"it has \d+ tokens, and a window needs block_size \+ 1 = 65"):
        make_dataset("abcdefabcdef", tok, "stream", 64)


def test_a_recorded_source_is_absolute(tmp_path, monkeypatch):
    from arraygpt.training.data import read_source, resolve_source

    (tmp_path / "t.txt").write_text("hello\n")
    monkeypatch.chdir(tmp_path)
    recorded = resolve_source("t.txt")
    assert recorded == str(tmp_path / "t.txt") and resolve_source("names") == "names"
    monkeypatch.chdir("/")
    assert read_source(recorded) == "hello\n"


def test_a_data_set_error_names_the_source_when_given():
    from arraygpt.training.data import DataError, default_tokenizer, make_dataset

    tok = default_tokenizer("char", "abcdef", "stream")
    with pytest.raises(DataError, match=r"^training text data/short.txt: block_size 64 is larger"):
        make_dataset("abcdef" * 3, tok, "stream", 64, source="data/short.txt")
    with pytest.raises(DataError, match=r"^training text one.txt: 1 document\(s\) are too few"):
        make_dataset("abc\n", default_tokenizer("char", "abc", "documents"), "documents", 8, source="one.txt")


def test_documents_memory_follows_the_tokens_not_the_longest_document():
    # 20,000 short documents and one of 2,000,000 characters: a documents x longest table would
    # be 320 GB; ids plus offsets are 17 MB
    kind, message = attempt(
        "from arraygpt.training.data import make_dataset, default_tokenizer, Batcher\n"
        "text = 'ab\\n' * 20000 + 'ab' * 1000000 + '\\n'\n"
        "ds = make_dataset(text, default_tokenizer('char', text, 'documents'), 'documents', 16)\n"
        "x, y = Batcher(ds, 64, seed=0).next()\n"
        "assert x.shape[0] == 64 and x.shape[1] <= 16, x.shape\n"
        "assert sum(len(b[0]) for b in ds.eval_batches('val', 256)) > 0\n",
        timeout=120,
    )
    assert (kind, message) == ("ok", "")


# ----------------------------------------------------------------------------------------------
# hostile batcher state


@pytest.fixture(params=["documents", "stream"])
def batcher(request):
    from arraygpt.training.data import Batcher, default_tokenizer, make_dataset

    text = "".join(f"name{i}\n" for i in range(40))
    ds = make_dataset(text, default_tokenizer("char", text, request.param), request.param, 8)
    b = Batcher(ds, 4, seed=1)
    b.next()
    return b


def _hostile_states(b):
    good = b.state_dict()
    rng = good["rng"]
    documents = b.dataset.mode == "documents"
    n = b.dataset.split_size("train")
    cases = [
        ({**good, "position": -3}, "position is -3"),
        ({**good, "position": n if documents else 1}, "position is"),
        ({**good, "position": "2"}, "position is '2'"),
        ({**good, "position": 2.5}, "position is 2.5"),
        ({**good, "epoch": -1}, "epoch is -1"),
        ({**good, "epoch": 10**30}, "epoch is"),
        ({**good, "epoch": True}, "epoch is True"),
        ({**good, "rng": "seed"}, "rng is 'seed'"),
        ({**good, "rng": {**rng, "bit_generator": "MT19937"}}, "PCG64"),
        ({**good, "rng": {**rng, "state": {"state": -1, "inc": 1}}}, "non-negative integers"),
        ({**good, "rng": {**rng, "state": {"state": "x", "inc": 1}}}, "non-negative integers"),
        ({**good, "rng": {**rng, "state": {"inc": 1}}}, "rng is"),
        ({"epoch": 0, "position": 0}, "has no 'rng'"),
        ([1, 2], "the state is [1, 2]"),
    ]
    return good, cases


def test_hostile_batcher_state_is_one_data_error_and_changes_nothing(batcher):
    from arraygpt.training.data import DataError

    good, cases = _hostile_states(batcher)
    for state, fragment in cases:
        with pytest.raises(DataError) as info:
            batcher.load_state_dict(state)
        assert "batcher state" in str(info.value) and fragment in str(info.value), (state, str(info.value))
        assert batcher.state_dict() == good
    batcher.load_state_dict(good)
    assert batcher.state_dict() == good


# ----------------------------------------------------------------------------------------------
# generation


TINY_GEN = dict(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=8)


def _nan_after(model, calls: int):
    """Make the model's logits NaN from its ``calls``-th forward on (0: at once)."""
    forward = model.forward
    count = {"n": 0}

    def broken(*args, **kwargs):
        logits, loss = forward(*args, **kwargs)
        count["n"] += 1
        if count["n"] > calls:
            logits = logits * float("nan")
        return logits, loss

    model.forward = broken
    return model


@pytest.mark.parametrize(
    ("sampler", "options"),
    [
        ("greedy", {}),
        ("temperature", {"temperature": 0.0}),
        ("temperature", {}),
        ("top_k", {"top_k": 3}),
        ("top_p", {"top_p": 0.9}),
        ("min_p", {"min_p": 0.1}),
    ],
    ids=["greedy", "temperature-0", "temperature", "top_k", "top_p", "min_p"],
)
@pytest.mark.parametrize("at", [0, 3])
@pytest.mark.parametrize("use_cache", [True, False])
def test_nan_logits_are_a_clear_error_naming_the_step_under_every_sampler(sampler, options, at, use_cache):
    from arraygpt import GPT, GPTConfig
    from arraygpt.generation.generation import generate

    model = _nan_after(GPT(GPTConfig(**TINY_GEN), seed=0), at)
    steps = generate(model, [[1, 2], [3, 4]], 10, sampler, seed=0, use_cache=use_cache, **options)
    with pytest.raises(ValueError, match=rf"logits hold NaN or inf at step {at} \(row 0\)"):
        list(steps)


def test_inf_logits_are_refused_too():
    from arraygpt import GPT, GPTConfig
    from arraygpt.generation.generation import generate

    model = GPT(GPTConfig(**TINY_GEN), seed=0)
    forward = model.forward

    def broken(*args, **kwargs):
        logits, loss = forward(*args, **kwargs)
        return logits + model.xp.asarray([float("inf")] + [0.0] * 11, dtype=logits.dtype), loss

    model.forward = broken
    with pytest.raises(ValueError, match="NaN or inf at step 0"):
        list(generate(model, [1], 4, "greedy"))


def test_a_huge_max_new_tokens_allocates_nothing_large_when_the_model_stops():
    kind, message = attempt(
        "from arraygpt import GPT, GPTConfig\n"
        "from arraygpt.generation.generation import generate\n"
        "model = GPT(GPTConfig(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)\n"
        "def stop_soon(probs):\n"
        "    xp = model.xp\n"
        "    return xp.where(xp.arange(12) == 0, 1.0, 0.0) * xp.ones_like(probs)\n"
        "out = list(generate(model, [[1, 2]] * 4, 10**12, stop_soon, eos_id=0, seed=0))\n"
        "assert out == [(0, 0, 0, 0)], out\n"
    )
    assert (kind, message) == ("ok", "")


def test_the_host_context_grows_past_its_first_capacity():
    from arraygpt import GPT, GPTConfig
    from arraygpt.generation.generation import _FIRST_GROWTH, generate

    model = GPT(GPTConfig(**TINY_GEN), seed=0)
    n = 2 * _FIRST_GROWTH + 37
    tokens = list(generate(model, [1, 2, 3], n, "temperature", seed=5))
    assert len(tokens) == n
    again = list(generate(model, [1, 2, 3], n, "temperature", seed=5, use_cache=False))
    assert tokens == again


@pytest.mark.parametrize("count", [-1, 1.5, True, "3"])
def test_bad_max_new_tokens_is_a_clear_error(count):
    from arraygpt import GPT, GPTConfig
    from arraygpt.generation.generation import generate

    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        generate(GPT(GPTConfig(**TINY_GEN), seed=0), [1], count)


def test_the_held_back_text_is_flushed_at_the_end_of_a_sample():
    import io

    from arraygpt.cli.sample import TextStream
    from arraygpt.io.tokenizers import ByteTokenizer

    out = io.StringIO()
    stream = TextStream(ByteTokenizer(bos=True), out)
    for token in "hé".encode():
        stream.push(token)
    stream.push("é".encode()[0])  # an incomplete character at the end
    assert out.getvalue() == "hé"
    stream.finish()
    assert out.getvalue() == "hé\ufffd"
    stream.finish()
    assert out.getvalue() == "hé\ufffd"


@pytest.fixture
def byte_checkpoint(tmp_path):
    from arraygpt import GPT, GPTConfig
    from arraygpt.io.checkpoint import save_checkpoint
    from arraygpt.io.tokenizers import ByteTokenizer

    tokenizer = ByteTokenizer(bos=True)
    model = GPT(GPTConfig(**{**TINY_GEN, "vocab_size": tokenizer.vocab_size}), seed=0)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    return str(tmp_path / "ckpt")


def test_sample_prints_the_incomplete_character_at_the_end(byte_checkpoint, capsys, monkeypatch):
    import arraygpt.generation.generation

    def generate(model, prompt, max_new_tokens, sampler="temperature", *, temperature=1.0, **options):
        return iter([104, 0xC3])  # "h" and the first byte of a two-byte character

    monkeypatch.setattr(arraygpt.generation.generation, "generate", generate)
    assert main(["sample", "--checkpoint", byte_checkpoint, "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == "h\ufffd\n---------------\nh\ufffd\n"


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens must be an integer >= 0, got -1"),
        (["--num-samples", "0"], "--num-samples must be an integer in [1,"),
        (["--num-samples", "1000000000000"], "--num-samples must be an integer in [1,"),
        (["--show-probs", "-2"], "--show-probs must be an integer >= 0"),
        (["--temperature", "nan"], "argument --temperature/--temp: expected a finite number, got 'nan'"),
        (["--top-p", "inf"], "argument --top-p: expected a finite number, got 'inf'"),
        (["--max-new-tokens", "1e12"], "argument --max-new-tokens/-n: invalid int value: '1e12'"),
        (["--stop", ""], "--stop takes a non-empty text"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else None,
)
def test_bad_sample_counts_are_one_line_and_exit_2(byte_checkpoint, args, fragment):
    assert_one_line_error(
        command("sample", "--checkpoint", byte_checkpoint, *args), "arraygpt sample: error:", fragment
    )


# ----------------------------------------------------------------------------------------------
# command options


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "--lr", "nan"], "argument --lr: expected a finite number, got 'nan'"),
        (["train", "--dropout", "inf"], "argument --dropout: expected a finite number, got 'inf'"),
        (["train", "--rope-scaling", "8,nan,4,8192"], "is not a number"),
        (["train", "--batch-size", "x"], "invalid int value: 'x'"),
        (["params", "--n-layer", "-1"], "n_layer must be a positive integer, got -1"),
        (["params", "--n-embd", "0"], "n_embd must be a positive integer, got 0"),
        (["bogus"], "invalid choice: 'bogus'"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else None,
)
def test_bad_options_are_one_line_and_exit_2(args, fragment):
    assert_one_line_error(command(*args), "error:", fragment)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["plot", "probs", "--dpi", "100000"], "--dpi must be an integer in [1, 1200], got 100000"),
        (["plot", "probs", "--max-new-tokens", "10000000000"], "--max-new-tokens must be an integer in [0, 1000]"),
        (["explain", "--max-new-tokens", "-1"], "--max-new-tokens must be an integer in [0, 1000]"),
        (["explain", "--candidates", "0"], "--candidates must be an integer >= 1"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else None,
)
def test_absurd_picture_sizes_are_one_line_and_exit_2(byte_checkpoint, args, fragment):
    assert_one_line_error(command(*args, "--checkpoint", byte_checkpoint), "error:", fragment)


@pytest.mark.parametrize("args", [["sample"], ["plot", "probs"], ["explain"]], ids=lambda a: a[0])
def test_a_checkpoint_without_a_tokenizer_is_one_line_for_the_commands_that_show_text(tmp_path, args):
    from arraygpt import GPT, GPTConfig
    from arraygpt.io.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "ckpt", GPT(GPTConfig(**TINY_GEN), seed=0))
    out = ["-o", str(tmp_path / ("x.html" if args[0] == "explain" else "x.png"))] if args[0] != "sample" else []
    assert_one_line_error(command(*args, "--checkpoint", str(tmp_path / "ckpt"), *out), "has no tokenizer")


def test_params_of_an_absurd_depth_answers_at_once():
    proc = command(
        "params",
        "--n-layer",
        "1000000000",
        "--block-size",
        "1000000000",
        "--vocab-size",
        "1000000000",
        "--json",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    L, C, H = 10**9, 12288, 4 * 12288
    assert counts["by_category"]["key"] == L * C * C and counts["by_category"]["up_projection"] == L * H * C
    assert counts["by_name"]["layer*.attn_wq"] == C * C and "layer0.attn_wq" not in counts["by_name"]


def test_params_closed_form_equals_the_count_of_every_layer():
    import dataclasses

    from arraygpt.cli.params import MAX_NAMED_LAYERS, counts_of
    from arraygpt.config import PRESETS, GPTConfig
    from arraygpt.nn.params import count_params

    for preset in PRESETS:
        config = dataclasses.replace(GPTConfig.preset(preset), n_layer=MAX_NAMED_LAYERS + 3)
        total, by_category, by_name = counts_of(config)
        reference = count_params(config)
        assert (total, by_category) == (reference.total, reference.by_category), preset
        assert sum(n for name, n in by_name.items() if name.startswith("layer*.")) * config.n_layer == sum(
            n for name, n in reference.by_name.items() if name.startswith("layer")
        )


# ----------------------------------------------------------------------------------------------
# two `arraygpt train` into one folder (needs arraygpt.training.loop to hold the run folder's lock)


def _wait_for(condition, timeout: float = 120) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_second_train_into_a_live_run_folder_is_refused_and_the_first_finishes_and_resumes(tmp_path):
    import signal

    data = tmp_path / "names.txt"
    data.write_text("".join(f"{a}{b}\n" for a in ("an", "bo", "ca", "di", "el") for b in ("na", "ro", "ly", "x")))
    run = tmp_path / "run"
    common = [
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--n-embd",
        "8",
        "--n-head",
        "2",
        "--block-size",
        "8",
        "--eval-batches",
        "1",
        "--samples",
        "0",
        "--quiet",
    ]
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "arraygpt.cli",
            "train",
            *common,
            "--steps",
            "1000000",
            "--eval-interval",
            "20",
            "--out-dir",
            str(run),
        ],
        cwd=ROOT,
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_for(lambda: (run / "last").is_dir() or first.poll() is not None), first.stderr
        assert first.poll() is None
        second = command("train", *common, "--steps", "5", "--out-dir", str(run), limit=False, timeout=120)
        assert_one_line_error(second, str(run), f"PID {first.pid}")
        resumed = command("train", "--resume", str(run), "--stop-after", "1", "--quiet", limit=False, timeout=120)
        assert_one_line_error(resumed, str(run), f"PID {first.pid}")
    finally:
        first.send_signal(signal.SIGINT)  # one Ctrl-C: stop cleanly with a checkpoint
        first.wait(120)
    assert first.returncode == 0
    step = json.loads((run / "last" / "state.json").read_text())["extra"]["step"]
    again = command("train", "--resume", str(run), "--stop-after", str(step + 3), "--quiet", limit=False, timeout=120)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "last" / "state.json").read_text())["extra"]["step"] == step + 3


def test_a_tampered_optimizer_state_is_one_checkpoint_error_at_resume(tmp_path):
    from arraygpt.io.safetensors import load_file, save_file

    data = tmp_path / "names.txt"
    data.write_text("".join(f"{a}{b}\n" for a in ("an", "bo", "ca", "di", "el") for b in ("na", "ro", "ly", "x")))
    arraygpt.train(
        str(data),
        mode="documents",
        steps=4,
        batch_size=4,
        eval_interval=2,
        samples=0,
        out_dir=tmp_path / "run",
        stop_after=2,
        progress=False,
    )
    path = tmp_path / "run" / "last" / "optimizer.safetensors"
    tensors = load_file(path)
    tensors.pop(sorted(tensors)[0])  # one moment missing
    save_file(tensors, path)
    with pytest.raises(arraygpt.CheckpointError, match="optimizer state does not fit the adam optimizer"):
        arraygpt.train(resume=tmp_path / "run", progress=False)


# ----------------------------------------------------------------------------------------------
# the metrics of a resumed run


class _CrashAtStep:
    """A plugin that raises at one step, as a crash between two checkpoints (nothing is saved)."""

    def __init__(self, step):
        self.step = step

    @arraygpt.hookimpl
    def arraygpt_on_step(self, step):
        if step == self.step:
            raise RuntimeError("crash")


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("source", ["last", "best"])
def test_a_resumed_run_replaces_the_metrics_after_its_checkpoint_so_no_step_repeats(tmp_path, source):
    import shutil

    from arraygpt.manager import PluginError, get_plugin_manager

    data = tmp_path / "names.txt"
    data.write_text("".join(f"{a}{b}\n" for a in ("an", "bo", "ca", "di", "el") for b in ("na", "ro", "ly", "x")))
    options = dict(
        mode="documents",
        steps=12,
        batch_size=4,
        n_embd=8,
        n_head=2,
        block_size=8,
        log_interval=2,
        eval_interval=4,
        checkpoint_interval=4,
        eval_batches=1,
        samples=0,
        progress=False,
    )
    arraygpt.train(
        str(data), out_dir=tmp_path / "straight", plugin_manager=get_plugin_manager(autoload=False), **options
    )
    run, pm = tmp_path / "run", get_plugin_manager(autoload=False)
    pm.register(_CrashAtStep(7))
    with pytest.raises(PluginError, match="crash"):
        arraygpt.train(str(data), out_dir=run, plugin_manager=pm, **options)
    assert max(r["step"] for r in _records(run)) == 6  # recorded after the checkpoint of step 4
    if source == "best":
        shutil.rmtree(run / "last")  # only best/ (step 4) is left to resume from
    resumed = arraygpt.train(resume=run / source, plugin_manager=get_plugin_manager(autoload=False), progress=False)
    assert resumed.dropped_records == 1  # the train record of step 6
    records, straight = _records(run), _records(tmp_path / "straight")
    starts = [r for r in records if r["event"] == "start"]
    assert [(r["step"], r.get("dropped")) for r in starts] == [(0, None), (4, 1)]
    for event, key in (("train", "loss"), ("eval", "val_loss")):  # one consistent run, as the straight one
        ours, theirs = [r for r in records if r["event"] == event], [r for r in straight if r["event"] == event]
        assert [r["step"] for r in ours] == [r["step"] for r in theirs]
        assert [r[key] for r in ours] == [r[key] for r in theirs]


def test_trimming_the_metrics_removes_later_steps_and_a_cut_off_line_and_keeps_the_rest(tmp_path):
    from arraygpt.training.runfolder import check_run_folder, trim_metrics

    metrics = tmp_path / "metrics.jsonl"
    assert trim_metrics(tmp_path, 4) == 0  # no metrics yet: nothing written
    assert not metrics.exists()
    lines = [
        '{"event": "start", "step": 0}',
        "not json",
        '{"event": "train", "step": 4}',
        "[1, 2]",
        '{"event": "end", "step": 4}',
        '{"event": "train", "step": 6}',
        '{"event": "train", "step": true}',
    ]
    metrics.write_text("\n".join(lines) + '\n{"event": "tr')  # the last line cut off by a kill
    assert trim_metrics(tmp_path, 4) == 2
    assert metrics.read_text().splitlines() == [*lines[:5], lines[6]]
    inode = metrics.stat().st_ino
    assert trim_metrics(tmp_path, 4) == 0 and metrics.stat().st_ino == inode  # nothing to remove: untouched
    (tmp_path / ".metrics.jsonl.abc123.tmp").write_text("{")  # a trim killed before its rename
    check_run_folder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
