"""Recipes: ``arraygpt train --config FILE.toml``.

Each shipped recipe (examples/recipes/) runs in a shortened form, and the run it starts is checked
against the file as Python's own TOML parser reads it: every option the command line did not
override is the run's saved option. A recipe gives the same options as the same flags (argparse is
the reference), flags override it, and every bad recipe is one line on stderr naming the file and
the key, exit 2.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arraygpt import cli
from arraygpt.cli.options import apply_recipe, parse_bool, parse_finite, read_recipe, recipe_options
from arraygpt.cli.train import _parser
from arraygpt.config import PRESETS, GPTConfig
from arraygpt.training.config import TrainConfig
from tiny_hf import byte_level_bpe

try:  # the independent reader of the recipes: the standard library's (tomli is the same on Python 3.10)
    import tomllib
except ModuleNotFoundError:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.toml"))
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
MODEL_FIELDS = {f.name for f in dataclasses.fields(GPTConfig)}
FINE_TUNING = ("init_from", "lora_rank", "lora_alpha", "lora_targets")
TEXT = "".join(f"{w} the quick brown fox jumps over the lazy dog, {w}!\n" for w in ("First", "Second", "Third")) * 40
# a run of 2 steps with one tiny evaluation, whatever the recipe's sizes
SHORT = {
    "steps": 2,
    "eval_interval": 2,
    "eval_batches": 1,
    "batch_size": 2,
    "grad_accum": 1,
    "warmup_steps": 0,
    "samples": 0,
}


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def flags(options):
    return [a for name, value in options.items() for a in (f"--{name.replace('_', '-')}", str(value))]


def saved(run_dir):
    """The run's saved training options and model config, as its checkpoint's files hold them."""
    state = json.loads((run_dir / "last" / "state.json").read_text())
    model = json.loads((run_dir / "last" / "config.json").read_text())
    return state["extra"]["train_config"], model


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def write(tmp_path, text, name="r.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# the shipped recipes


def test_the_recipes_the_docs_name_are_shipped():
    assert {p.name for p in RECIPES} >= {
        "names.toml",
        "shakespeare-char.toml",
        "nanogpt-cpu.toml",
        "finetune-smollm.toml",
        "lora-smollm.toml",
    }
    docs = (ROOT / "docs" / "training.md").read_text()
    for path in RECIPES:
        assert f"examples/recipes/{path.name}" in docs, path.name


@pytest.mark.parametrize("recipe", [p for p in RECIPES if "smollm" not in p.name], ids=lambda p: p.stem)
def test_each_recipe_runs_shortened_with_its_options(recipe, tmp_path, text_file):
    expected = {k.replace("-", "_"): v for k, v in tomllib.loads(recipe.read_text()).items()}
    overrides = dict(SHORT)
    if expected.get("data") != "names":
        overrides["data"] = text_file
    out = tmp_path / "run"
    rc, _, err = run(["train", "--config", str(recipe), *flags(overrides), "--out-dir", str(out), "--quiet"])
    assert rc == 0, err
    train_config, model = saved(out)
    for key, value in expected.items():
        if key in overrides:
            continue
        if key in TRAIN_FIELDS:
            assert train_config[key] == (list(value) if isinstance(value, list) else value), key
        elif key in MODEL_FIELDS:
            assert model[key] == value, key
    for key, value in overrides.items():
        want = str(Path(value).resolve()) if key == "data" else value
        assert train_config[key] == want, key
    preset = {k: v for k, v in PRESETS[expected["preset"]].items() if k != "vocab_size"}
    for key, value in preset.items():
        assert model[key] == expected.get(key, value), key  # the preset's, unless the recipe sets it
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [2]


def _tiny_llama(folder, text):
    """A random 1-layer Llama saved by transformers, with a byte-level BPE tokenizer trained on ``text``."""
    pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    tok = byte_level_bpe([text])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("recipe", [p for p in RECIPES if "smollm" in p.name], ids=lambda p: p.stem)
def test_each_fine_tuning_recipe_runs_shortened(recipe, tmp_path, text_file):
    expected = {k.replace("-", "_"): v for k, v in tomllib.loads(recipe.read_text()).items()}
    missing = [k for k in expected if k in FINE_TUNING and k not in TRAIN_FIELDS]
    if missing:
        pytest.skip(f"TrainConfig has no {', '.join(missing)} yet (fine-tuning is being added)")
    model_dir = _tiny_llama(tmp_path / "tiny-llama", TEXT)
    overrides = {**SHORT, "data": text_file, "init_from": model_dir, "block_size": 16}
    out = tmp_path / "run"
    rc, _, err = run(["train", "--config", str(recipe), *flags(overrides), "--out-dir", str(out), "--quiet"])
    assert rc == 0, err
    train_config, _ = saved(out)
    for key, value in expected.items():
        if key in TRAIN_FIELDS and key not in overrides:
            assert train_config[key] == (list(value) if isinstance(value, list) else value), key
    assert Path(train_config["init_from"]).resolve() == model_dir.resolve()
    if "window" in TRAIN_FIELDS:
        assert train_config["window"] == 16  # block_size, with init_from: the training window


# ---------------------------------------------------------------------------------------------
# a recipe is the same as its flags


def _sample(action):
    """A value of the type ``action`` takes: (the TOML text, the command-line text)."""
    if isinstance(action.const, bool) and action.nargs == 0:  # --quiet
        return "true", None
    if action.choices is not None:
        choice = list(action.choices)[-1]
        return (json.dumps(choice), str(choice)) if isinstance(choice, str) else (str(choice), str(choice))
    if action.type is parse_bool:
        return "false", "false"
    if action.type is int:
        return "7", "7"
    if action.type is parse_finite:
        return "0.25", "0.25"
    elements = getattr(action.type, "elements", None)
    if elements is not None:
        kinds = [elements[0]] * 2 if elements[-1] is Ellipsis else list(elements)
        values = {int: "3", float: "2.5", str: '"attn_wq"'}
        toml = "[" + ", ".join(values[k] for k in kinds) + "]"
        return toml, ",".join(values[k].strip('"') for k in kinds)
    if action.type in (None, str):
        return '"some/path"', "some/path"
    raise AssertionError(f"no sample for {action.dest}")


def test_a_recipe_of_every_option_equals_the_same_flags(tmp_path):
    options = recipe_options(_parser(), skip=("config",))
    actions = {a.dest: a for a in options.values()}
    assert TRAIN_FIELDS | MODEL_FIELDS | {
        "preset",
        "out_dir",
        "resume",
        "stop_after",
        "quiet",
        "log",
        "log_dir",
    } <= set(actions)
    lines, argv = [], ["train"]
    for dest, action in sorted(actions.items()):
        if dest == "log":
            lines.append('log = ["tensorboard", "x"]')
            argv += ["--log", "tensorboard", "--log", "x"]
            continue
        toml, text = _sample(action)
        lines.append(f"{dest} = {toml}")
        argv += [action.option_strings[-1]] + ([] if text is None else [text])
    from_flags = cli.build_parser().parse_args(argv)
    recipe = write(tmp_path, "\n".join(lines))
    from_file = cli.build_parser().parse_args(["train", "--config", str(recipe)])

    apply_recipe(from_file, read_recipe(recipe, options), options)
    got, want = vars(from_file), vars(from_flags)
    assert got.pop("config") == str(recipe) and want.pop("config") is None
    assert got == want


@settings(max_examples=25, deadline=None)
@given(
    lr=st.floats(min_value=0, max_value=1e300, allow_nan=False, allow_infinity=False),
    steps=st.integers(1, 2**62),
    key_style=st.sampled_from(["_", "-"]),
)
def test_numbers_read_as_the_flags_read_them(tmp_path_factory, lr, steps, key_style):
    options = recipe_options(_parser(), skip=("config",))

    path = tmp_path_factory.mktemp("r") / "r.toml"
    path.write_text(f"lr = {lr!r}\nwarmup{key_style}steps = {steps}\n")
    args = cli.build_parser().parse_args(["train", "--lr", repr(lr), "--warmup-steps", str(steps)])
    recipe = read_recipe(path, options)
    assert recipe == {"lr": args.lr, "warmup_steps": args.warmup_steps}
    assert type(recipe["lr"]) is float and type(recipe["warmup_steps"]) is int


# ---------------------------------------------------------------------------------------------
# flags override the file; --resume follows the flags' rules


def test_flags_override_the_recipe(tmp_path, text_file):
    recipe = write(
        tmp_path,
        f'data = "{text_file}"\npreset = "microgpt"\nsteps = 3\nlr = 0.02\nn_embd = 8\nn_head = 2\n'
        "samples = 0\nquiet = true\neval_batches = 1\n",
    )
    out = tmp_path / "run"
    rc, stdout, err = run(["train", "--config", str(recipe), "--lr", "0.005", "--n-head", "4", "--out-dir", str(out)])
    assert rc == 0, err
    assert stdout == ""  # quiet = true
    train_config, model = saved(out)
    assert (train_config["lr"], train_config["steps"]) == (0.005, 3)
    assert (model["n_head"], model["n_embd"]) == (4, 8)


def test_resume_with_a_recipe_follows_the_flags_rules(tmp_path, text_file):
    out = tmp_path / "run"
    first = write(
        tmp_path,
        f'data = "{text_file}"\npreset = "microgpt"\nsteps = 2\nsamples = 0\neval_batches = 1\nquiet = true\n'
        f'out_dir = "{out}"\n',
        "first.toml",
    )
    assert run(["train", "--config", str(first)])[0] == 0
    more = write(tmp_path, "steps = 4\nlog_interval = 1\nquiet = true\n", "more.toml")
    rc, _, err = run(["train", "--resume", str(out), "--config", str(more), "--steps", "3"])  # the flag wins
    assert rc == 0, err
    assert saved(out)[0]["steps"] == 3
    rc, _, err = run(["train", "--resume", str(out), "--config", str(more)])
    assert rc == 0, err
    assert saved(out)[0]["steps"] == 4 and json.loads((out / "last" / "state.json").read_text())["extra"]["step"] == 4
    changed = write(tmp_path, "steps = 5\nlr = 0.5\n", "changed.toml")
    rc, _, err = run(["train", "--resume", str(out), "--config", str(changed)])
    assert rc == 2 and err.count("\n") == 1 and "cannot change ['lr'] when resuming" in err
    rc, _, err = run(["train", "--resume", str(out), "--config", str(first)])  # data and preset: as --data
    assert rc == 2 and err.count("\n") == 1 and "--data and --preset cannot be changed when resuming" in err


# ---------------------------------------------------------------------------------------------
# bad recipes: one line naming the file and the key, exit 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("stepz = 5", ["unknown key 'stepz'", "did you mean 'steps'?", "allowed:", "batch_size"]),
        ("config = 'other.toml'", ["unknown key 'config'"]),
        ("[model]\nn_layer = 2", ["unknown key 'model'"]),
        ('steps = "5"', ["key 'steps' (--steps) must be an integer, got a string '5'"]),
        ("steps = 5.0", ["key 'steps' (--steps) must be an integer, got a float 5.0"]),
        ("steps = true", ["key 'steps' (--steps) must be an integer, got a boolean True"]),
        ('lr = "1e-3"', ["key 'lr' (--lr) must be a finite number, got a string '1e-3'"]),
        ("lr = nan", ["key 'lr' (--lr) must be a finite number, got a float nan"]),
        ("lr = -inf", ["key 'lr' (--lr) must be a finite number"]),
        ('bias = "false"', ["key 'bias' (--bias) must be a boolean (true or false), got a string 'false'"]),
        ("quiet = 1", ["key 'quiet' (--quiet) must be a boolean"]),
        ('mode = "bogus"', ["key 'mode' (--mode) must be one of documents, stream, got a string 'bogus'"]),
        ('preset = "gpt5"', ["key 'preset' (--preset) must be one of microgpt, gpt2"]),
        ("rope_scaling = [8, 1, 4]", ["key 'rope_scaling'", "an array [number, number, number, integer]"]),
        ("rope_scaling = [8, 1, 4, 8192.5]", ["key 'rope_scaling'", "an array [number, number, number, integer]"]),
        ('log = "tensorboard"', ["key 'log' (--log) must be an array of strings", 'log = ["NAME"]']),
        ("n_layer = { a = 1 }", ["key 'n_layer' (--n-layer) must be an integer, got a table"]),
        ("data = 5", ["key 'data' (--data) must be a string, got an integer 5"]),
        ("batch_size = 4\nbatch-size = 4", ["key 'batch-size' repeats 'batch_size'; give each option once"]),
        ("steps = ", ["not valid TOML"]),
        ("a = " + "[" * 3000 + "]" * 3000, ["nested too deeply"]),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else None,
)
def test_a_bad_recipe_is_one_line_and_exit_2(tmp_path, text, expected):
    recipe = write(tmp_path, text)
    rc, out, err = run(["train", "--config", str(recipe)])
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("arraygpt train: error: recipe ")
    assert str(recipe) in err
    for part in expected:
        assert part in err, err


def test_a_recipe_file_must_be_a_small_regular_utf8_file(tmp_path):
    cases = {"missing": (tmp_path / "nope.toml", "the recipe is missing")}
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    cases["folder"] = (folder, "directory")
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * (1024 * 1024) + "\nsteps = 3\n")
    cases["big"] = (big, "a recipe is at most 1,048,576 bytes")
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'data = "caf\xe9.txt"\n')
    cases["latin"] = (latin, "not UTF-8")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.toml"
        os.mkfifo(fifo)  # no writer: a blocking read would hang
        cases["fifo"] = (fifo, "FIFO")
    for name, (path, message) in cases.items():
        rc, out, err = run(["train", "--config", str(path)])
        assert rc == 2 and out == "" and err.count("\n") == 1, (name, err)
        assert str(path) in err and message in err, (name, err)


def test_log_dir_needs_a_logger_and_a_logger_must_exist(tmp_path):
    rc, _, err = run(["train", "--log-dir", str(tmp_path / "tb")])
    assert rc == 2 and err.count("\n") == 1 and "--log-dir needs a logger" in err
    rc, _, err = run(["train", "--log", "wandb", "--out-dir", str(tmp_path / "run")])
    assert rc == 2 and err.count("\n") == 1 and "unknown logger 'wandb'; registered loggers: tensorboard" in err


def test_the_nanogpt_cpu_recipe_is_the_benchmarks(tmp_path):
    """examples/recipes/nanogpt-cpu.toml holds the options benchmarks/nanogpt_recipe.py passes
    (but the run folder, the samples and the backend, which the benchmark fixes for its timing)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nanogpt_recipe", ROOT / "benchmarks" / "nanogpt_recipe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from_flags = vars(cli.build_parser().parse_args(bench.arraygpt_args(bench.MAX_ITERS, tmp_path, "gelu_tanh")))
    recipe = ROOT / "examples" / "recipes" / "nanogpt-cpu.toml"
    args = cli.build_parser().parse_args(["train", "--config", str(recipe)])
    options = recipe_options(_parser(), skip=("config",))

    apply_recipe(args, read_recipe(recipe, options), options)
    from_file = vars(args)
    assert from_file["data"] == "input.txt" and from_flags["data"].endswith("tinyshakespeare.txt")
    differ = {k for k in from_flags if from_flags[k] != from_file[k]}
    assert differ == {"config", "data", "out_dir", "samples", "backend"}
