"""The command layer: `arraygpt params` against hand-derived counts, `backends`, `plugins`, the
sample options (--no-cache, --stop, --option), and train's exit codes, --tokenizer FILE and
resuming from best/ and from a folder holding only the previous checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal

import numpy as np
import pytest

import arraygpt
from arraygpt import GPT, GPTConfig, hookimpl
from arraygpt import xp as shim
from arraygpt.cli import SUBCOMMANDS, build_parser, main
from arraygpt.io.checkpoint import load_checkpoint, save_checkpoint
from arraygpt.io.tokenizers import CharTokenizer, save_tokenizer
from arraygpt.manager import get_plugin_manager, set_plugin_manager
from arraygpt.xp import load_backend, to_numpy
from conftest import has_gpu

CATEGORIES = [
    "embedding",
    "key",
    "query",
    "value",
    "output",
    "up_projection",
    "down_projection",
    "unembedding",
    "other",
]

# Hand-derived from the shapes. GPT-2 small: V=50257, T=1024, L=12, C=768, H=4C=3072, biases,
# LayerNorm with gain and bias, tied unembedding (reported in its category, counted once in the total).
_V, _T, _L, _C, _H = 50257, 1024, 12, 768, 3072
_GPT2_LAYER_OTHER = 2 * (2 * _C) + 3 * _C + _C + _H + _C  # ln1, ln2 (gain + bias); q,k,v, o, fc1, fc2 biases
GPT2 = {
    "embedding": _V * _C,
    "key": _L * _C * _C,
    "query": _L * _C * _C,
    "value": _L * _C * _C,
    "output": _L * _C * _C,
    "up_projection": _L * _H * _C,
    "down_projection": _L * _C * _H,
    "unembedding": _V * _C,
    "other": _T * _C + _L * _GPT2_LAYER_OTHER + 2 * _C,  # positions, the layers' norms and biases, ln_f
}
# microgpt: V=27, T=8, L=1, C=16, H=64, no biases, RMSNorm without gain, separate lm_head.
MICROGPT = {
    "embedding": 27 * 16,
    "key": 16 * 16,
    "query": 16 * 16,
    "value": 16 * 16,
    "output": 16 * 16,
    "up_projection": 64 * 16,
    "down_projection": 16 * 64,
    "unembedding": 27 * 16,
    "other": 8 * 16,
}


def test_params_json_gpt2_matches_the_hand_derived_counts(capsys):
    assert main(["params", "--preset", "gpt2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data["by_category"]) == CATEGORIES
    assert data["by_category"] == GPT2
    assert data["total"] == 124_439_808 == sum(GPT2.values()) - GPT2["unembedding"]  # the tied matrix once
    assert data["by_name"]["wte"] == 50257 * 768 and data["by_name"]["layer11.mlp_fc1"] == 3072 * 768
    assert data["by_name"]["layer0.mlp_fc1_b"] == 3072 and "lm_head" not in data["by_name"]


def test_params_json_microgpt_matches_the_hand_derived_counts(capsys):
    assert main(["params", "--preset", "microgpt", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["by_category"] == MICROGPT
    assert data["total"] == 4_064 == sum(MICROGPT.values())


def test_params_json_applies_overrides(capsys):
    assert main(["params", "--preset", "gpt2", "--n-layer", "2", "--tie-embeddings", "false", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    L = 2
    expected = {
        **GPT2,
        "key": L * _C * _C,
        "query": L * _C * _C,
        "value": L * _C * _C,
        "output": L * _C * _C,
        "up_projection": L * _H * _C,
        "down_projection": L * _C * _H,
        "other": _T * _C + L * _GPT2_LAYER_OTHER + 2 * _C,
    }
    assert data["preset"] == "gpt2" and data["by_category"] == expected
    assert data["total"] == sum(expected.values()) == 92_158_464  # the untied lm_head counts now
    assert data["by_name"]["lm_head"] == 50257 * 768


def test_params_table_gpt3_175b(capsys):
    assert main(["params", "--preset", "gpt3-175b"]) == 0
    out = capsys.readouterr().out
    # GPT-3 paper, Table 2.1: L=96, d_model=12288, 96 heads of 128, context 2048, vocabulary 50257
    V, T, L, C, H = 50257, 2048, 96, 12288, 4 * 12288
    expected = {
        "embedding": V * C,
        "key": L * C * C,
        "query": L * C * C,
        "value": L * C * C,
        "output": L * C * C,
        "up_projection": L * H * C,
        "down_projection": L * C * H,
        "unembedding": V * C,
        "other": T * C + L * (2 * 2 * C + 3 * C + C + H + C) + 2 * C,
    }
    total = sum(expected.values()) - V * C
    assert total == 174_604_259_328 and round(total / 1e9) == 175  # "175B"
    lines = out.splitlines()
    for category in CATEGORIES:
        (row,) = [line for line in lines if line.split() and line.split()[0] == category]
        assert row.rstrip().endswith(f"{expected[category]:,}"), row
    (total_row,) = [line for line in lines if line.startswith("total")]
    assert total_row.rstrip().endswith(f"{total:,}")
    assert "12,288" in out and "tied" in out


def test_params_rejects_an_unknown_preset(capsys):
    with pytest.raises(SystemExit) as e:
        main(["params", "--preset", "gpt5"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "gpt5" in err and "gpt2" in err and "microgpt" in err


def test_params_reports_an_invalid_field(capsys):
    assert main(["params", "--preset", "gpt2", "--n-head", "7", "--json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("arraygpt params: error: ") and "n_head" in err and len(err.strip().splitlines()) == 1


def test_backends_lists_each_backend_with_availability(capsys, monkeypatch):
    monkeypatch.setattr(shim, "_active", None)
    monkeypatch.delenv("ARRAYGPT_BACKEND", raising=False)
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "active backend: numpy" in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert {"numpy", "array_api_strict", "cupy", "torch"} <= set(rows)
    assert "available" in rows["numpy"] and "unavailable" not in rows["numpy"]
    assert f"threads={load_backend('numpy').threads}" in rows["numpy"]  # ARRAYGPT_NUM_THREADS or the cores
    gpu, why = has_gpu()
    if gpu:
        assert "unavailable" not in rows["cupy"]
    else:
        assert "unavailable" in rows["cupy"] and why in rows["cupy"]
        assert "CuPy" in rows["cupy"] or "CUDA" in rows["cupy"]


# -- the command layer itself --------------------------------------------------------------------


def test_every_subcommand_module_has_add_arguments_and_run():
    parser = build_parser()
    assert set(SUBCOMMANDS) == {"params", "backends", "plugins", "train", "sample", "chat", "eval", "plot", "explain"}
    required = {
        "sample": ["--checkpoint", "x"],
        "chat": ["--checkpoint", "x"],
        "eval": ["--checkpoint", "x", "--data", "y"],
    }
    for command in SUBCOMMANDS:
        assert isinstance(parser.parse_args([command, *required.get(command, [])]), argparse.Namespace)


def test_train_options_and_their_defaults_come_from_the_dataclass_fields():
    from arraygpt.training.config import TrainConfig

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in sub._actions}
    for field in dataclasses.fields(TrainConfig):
        action = actions[field.name]
        assert action.option_strings == ["--" + field.name.replace("_", "-")]
        assert action.default is None  # unset: the library's default applies
        assert action.help.startswith(field.metadata["help"])
        if field.default is not None:
            assert action.help.endswith(")") and "default" in action.help
    for field in dataclasses.fields(GPTConfig):
        assert actions[field.name].option_strings == ["--" + field.name.replace("_", "-")]
    assert actions["mode"].choices == ("documents", "stream")


# -- arraygpt plugins ----------------------------------------------------------------------------


def test_plugins_lists_the_built_ins_with_their_plugin(capsys, monkeypatch):
    monkeypatch.setenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    set_plugin_manager(get_plugin_manager(autoload=False))
    try:
        assert main(["plugins"]) == 0
    finally:
        set_plugin_manager(None)
    out = capsys.readouterr().out
    sections: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        if not line.startswith(" "):
            current = sections.setdefault(line.rstrip(":"), {})
        else:
            name, _, plugin = line.split()
            current[name] = plugin
    assert set(sections) == {"backends", "kernels", "optimizers", "samplers", "loggers"}
    assert sections["loggers"] == {"tensorboard": "arraygpt.plugins.tensorboard"}
    assert sections["samplers"] == dict.fromkeys(
        ["greedy", "temperature", "top_k", "top_p", "min_p", "repeat_penalty"], "arraygpt.plugins.samplers"
    )
    assert sections["optimizers"] == dict.fromkeys(["sgd", "adam", "adamw"], "arraygpt.plugins.optimizers")
    assert {"numpy", "array_api_strict", "cupy", "torch"} <= set(sections["backends"])
    assert sections["backends"]["numpy"] == "arraygpt.backends"


# -- arraygpt sample -----------------------------------------------------------------------------


TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


@pytest.fixture
def char_checkpoint(tmp_path):
    tokenizer = CharTokenizer("abcdefghij")  # ids 0..9, BOS 10
    model = GPT(dataclasses.replace(TINY, vocab_size=tokenizer.vocab_size, init_std=1.0), seed=0)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    return str(tmp_path / "ckpt")


def _sample(capsys, directory, *args):
    assert main(["sample", "--checkpoint", directory, *args]) == 0
    return capsys.readouterr().out


def test_sample_no_cache_prints_the_same_text_as_the_cache(char_checkpoint, capsys):
    args = ["--prompt", "abc", "--max-new-tokens", "20", "--num-samples", "3", "--seed", "5", "--temperature", "1.5"]
    cached = _sample(capsys, char_checkpoint, *args)
    recomputed = _sample(capsys, char_checkpoint, *args, "--no-cache")
    assert recomputed == cached
    assert len(cached.split("\n---------------\n")) == 3  # 20 new tokens > block_size 8: the window slid


def test_sample_stop_ends_a_sample_at_the_text(char_checkpoint, capsys):
    free = _sample(capsys, char_checkpoint, "--prompt", "a", "--max-new-tokens", "12", "--sampler", "greedy")
    generated = free.rstrip("\n")[1:]
    assert len(generated) >= 3
    stop = generated[1:3]
    cut = generated.index(stop) + len(stop)
    assert cut < len(generated)  # the stop really shortens the sample
    stopped = _sample(
        capsys, char_checkpoint, "--prompt", "a", "--max-new-tokens", "12", "--sampler", "greedy", "--stop", stop
    )
    assert stopped == "a" + generated[:cut] + "\n"


class _OnlyToken:
    """A sampler plugin with one option: keep only token ``token``."""

    @hookimpl
    def arraygpt_register_samplers(self):
        def only_token(*, token: int):
            if not isinstance(token, int) or token < 0:
                raise ValueError(f"token must be an integer >= 0, got {token!r}")

            def keep(probs):
                xp = shim.namespace(probs)
                ids = xp.arange(probs.shape[-1], device=probs.device)[None, :]
                return xp.where(ids == token, probs, xp.zeros_like(probs))

            return keep

        return [{"only_token": only_token}]


def test_sample_option_reaches_a_plugin_sampler(char_checkpoint, capsys):
    pm = get_plugin_manager(autoload=False)
    pm.register(_OnlyToken(), name="only-token")
    set_plugin_manager(pm)
    try:
        out = _sample(
            capsys,
            char_checkpoint,
            "--prompt",
            "ab",
            "--max-new-tokens",
            "7",
            "--sampler",
            "only_token",
            "--option",
            "token=3",
        )
        assert out == "ab" + "d" * 7 + "\n"
        assert main(["sample", "--checkpoint", char_checkpoint, "--sampler", "only_token", "--option", "token=-1"]) == 2
        assert "token must be an integer >= 0, got -1" in capsys.readouterr().err
        assert main(["sample", "--checkpoint", char_checkpoint, "--sampler", "only_token", "--option", "tokn=1"]) == 2
        assert "sampler 'only_token' needs --option token=VALUE" in capsys.readouterr().err
        assert main(["sample", "--checkpoint", char_checkpoint, "--option", "token"]) == 2
        assert "--option expects NAME=VALUE" in capsys.readouterr().err
    finally:
        set_plugin_manager(None)


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("--top-p", "1.5", "--top-p must be a number in (0, 1], got 1.5"),
        ("--top-k", "-1", "--top-k must be an integer >= 0 (0: off), got -1"),
        ("--min-p", "2", "--min-p must be a number in [0, 1], got 2.0"),
        ("--repeat-penalty", "0", "--repeat-penalty must be a number in (0, inf), got 0.0"),
        ("--repeat-last-n", "-3", "--repeat-last-n must be an integer >= -1, got -3"),
        ("--temperature", "1e-320", "--temperature 1e-320 is too small: use 0 for greedy decoding or at least"),
        ("--seed", "-1", "--seed must be an integer >= 0, got -1"),
    ],
)
def test_sample_reports_a_bad_sampler_option_in_command_line_terms(char_checkpoint, capsys, flag, value, allowed):
    assert main(["sample", "--checkpoint", char_checkpoint, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"arraygpt sample: error: {allowed}") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("options", "chain"),
    [
        (["--top-k", "3"], "top_k"),
        (["--top-p", "0.6", "--top-k", "3"], "top_k,top_p"),
        (["--min-p", "0.2", "--top-k", "4"], "top_k,min_p"),
        (["--repeat-penalty", "1.3"], "repeat_penalty"),
    ],
)
def test_a_sampler_option_alone_turns_its_filter_on(char_checkpoint, capsys, options, chain):
    common = ["--prompt", "ab", "--max-new-tokens", "12", "--num-samples", "3", "--seed", "2", "--temperature", "1.5"]
    alone = _sample(capsys, char_checkpoint, *common, *options)
    assert alone == _sample(capsys, char_checkpoint, *common, *options, "--sampler", f"temperature,{chain}")
    assert alone != _sample(capsys, char_checkpoint, *common)  # the filter changed what was drawn


def test_llama_cpp_spellings_of_the_options(char_checkpoint, capsys, tmp_path):
    (tmp_path / "prompt.txt").write_text("ab", encoding="utf-8")
    short = _sample(
        capsys, char_checkpoint, "-f", str(tmp_path / "prompt.txt"), "-n", "6", "--temp", "1.5", "--seed", "2"
    )
    assert short == _sample(
        capsys, char_checkpoint, "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "1.5", "--seed", "2"
    )
    assert short == _sample(capsys, char_checkpoint, "-p", "ab", "-n", "6", "--temp", "1.5", "--seed", "2")


def test_sample_takes_the_prompt_from_a_file_and_its_defaults_from_generation_config(char_checkpoint, capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("abc", encoding="utf-8")
    common = ["--max-new-tokens", "6", "--seed", "3"]
    assert _sample(capsys, char_checkpoint, "--prompt-file", str(prompt), *common) == _sample(
        capsys, char_checkpoint, "--prompt", "abc", *common
    )
    assert main(["sample", "--checkpoint", char_checkpoint, "--prompt-file", str(tmp_path / "none.txt")]) == 2
    assert "the prompt file is missing" in capsys.readouterr().err
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 4}))
    shutil.copytree(char_checkpoint, tmp_path / "with-config")
    shutil.copy(tmp_path / "generation_config.json", tmp_path / "with-config")
    directory = str(tmp_path / "with-config")
    greedy = _sample(capsys, directory, "--prompt", "ab")  # do_sample false: greedy; max_new_tokens 4
    assert greedy == _sample(capsys, char_checkpoint, "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "0")
    assert _sample(capsys, directory, "--prompt", "ab", "--temperature", "1.5", "--seed", "4") == _sample(
        capsys, char_checkpoint, "--prompt", "ab", "--max-new-tokens", "4", "--temperature", "1.5", "--seed", "4"
    )  # a flag overrides the file


class _Negative:
    """A sampler plugin whose filter breaks the contract: negative weights."""

    @hookimpl
    def arraygpt_register_samplers(self):
        return [{"negative": lambda: lambda probs: probs - 1.0}]


def test_a_plugin_filter_with_negative_weights_is_exit_2_naming_the_plugin(char_checkpoint, capsys):
    pm = get_plugin_manager(autoload=False)
    pm.register(_Negative(), name="negative-plugin")
    set_plugin_manager(pm)
    try:
        assert main(["sample", "--checkpoint", char_checkpoint, "--sampler", "negative"]) == 2
    finally:
        set_plugin_manager(None)
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "sampler 'negative' (plugin 'negative-plugin') returned negative" in (
        captured.err
    )


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"arraygpt {arraygpt.__version__}\n"


# -- arraygpt train ------------------------------------------------------------------------------


SYLLABLES = ["an", "el", "ma", "ri", "jo", "sa", "li", "na", "ka", "th", "er", "on"]


@pytest.fixture
def names_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "names.txt"
    path.write_text("\n".join("".join(rng.choice(SYLLABLES, rng.integers(1, 4))) for _ in range(200)) + "\n")
    return path


@pytest.fixture
def fresh_pm(monkeypatch):
    monkeypatch.setenv("ARRAYGPT_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager(autoload=False)
    set_plugin_manager(pm)
    yield pm
    set_plugin_manager(None)


def _train_args(names_file, out_dir, *extra):
    return [
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
        "--block-size",
        "8",
        "--eval-interval",
        "4",
        "--checkpoint-interval",
        "4",
        "--eval-batches",
        "1",
        "--samples",
        "0",
        "--quiet",
        "--out-dir",
        str(out_dir),
        *extra,
    ]


def _params(directory):
    return {k: to_numpy(v) for k, v in load_checkpoint(directory).model.params.items()}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_train_exits_1_when_the_run_diverges(tmp_path, names_file, fresh_pm, capsys):
    assert main(_train_args(names_file, tmp_path / "r", "--lr", "1e30")) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "--lr" in err


class _CtrlCTwice:
    @hookimpl
    def arraygpt_on_step(self, step):
        if step == 6:
            signal.raise_signal(signal.SIGINT)  # the first: finish the step, save, stop
            signal.raise_signal(signal.SIGINT)  # the second: abort at once


def test_a_second_ctrl_c_exits_130_and_the_last_checkpoint_is_intact(tmp_path, names_file, fresh_pm, capsys):
    fresh_pm.register(_CtrlCTwice(), name="ctrl-c")
    assert main(_train_args(names_file, tmp_path / "r")) == 130
    assert "aborted; the last checkpoint is intact" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    assert load_checkpoint(tmp_path / "r").extra["step"] == 4  # the one before the abort
    fresh_pm.unregister(name="ctrl-c")
    assert main(["train", "--resume", str(tmp_path / "r"), "--quiet"]) == 0
    assert load_checkpoint(tmp_path / "r").extra["step"] == 12


def test_train_with_a_tokenizer_file(tmp_path, names_file, fresh_pm):
    letters = sorted(set(names_file.read_text()) - {"\n"})
    tokenizer = CharTokenizer(letters + ["0", "1", "2"])  # three characters the data does not hold
    save_tokenizer(tokenizer, tmp_path / "tok.json")
    assert main(_train_args(names_file, tmp_path / "r", "--steps", "4", "--tokenizer", str(tmp_path / "tok.json"))) == 0
    saved = load_checkpoint(tmp_path / "r")
    assert saved.tokenizer.chars == tokenizer.chars and saved.tokenizer.bos_id == tokenizer.bos_id
    assert saved.model.config.vocab_size == tokenizer.vocab_size == len(letters) + 4
    assert main(_train_args(names_file, tmp_path / "s", "--tokenizer", str(tmp_path / "missing.json"))) == 2


@pytest.fixture
def straight_and_stopped(tmp_path, names_file, fresh_pm):
    """A 12-step run, and the same run stopped after 8 steps (checkpoints at 4 and 8)."""
    assert main(_train_args(names_file, tmp_path / "a")) == 0
    assert main(_train_args(names_file, tmp_path / "b", "--stop-after", "8")) == 0
    assert load_checkpoint(tmp_path / "b").extra["step"] == 8
    return tmp_path / "a", tmp_path / "b"


def test_resume_from_best(straight_and_stopped):
    straight, stopped = straight_and_stopped
    best_step = load_checkpoint(stopped / "best").extra["step"]
    assert best_step in (4, 8)
    shutil.rmtree(stopped / "last")  # only best/ is left to resume from
    assert main(["train", "--resume", str(stopped / "best"), "--quiet"]) == 0
    assert load_checkpoint(stopped).extra["step"] == 12
    _assert_same(_params(stopped / "last"), _params(straight / "last"))  # exact, from best's step on


def test_resume_from_a_folder_with_only_the_previous_checkpoint(straight_and_stopped):
    straight, stopped = straight_and_stopped
    (stopped / "last").rename(stopped / ".last.old")  # as a save interrupted between its two renames
    assert main(["train", "--resume", str(stopped), "--quiet"]) == 0
    assert load_checkpoint(stopped).extra["step"] == 12
    _assert_same(_params(stopped / "last"), _params(straight / "last"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--grad-accum", "0"], "grad_accum (--grad-accum) must be a positive integer, got 0"),
        (["--batch-size", "0"], "batch_size (--batch-size) must be a positive integer, got 0"),
        (["--grad-accum", "-1"], "grad_accum (--grad-accum) must be a positive integer, got -1"),
        (["--out-dir", "{tmp}/elsewhere"], "a resumed run writes into its own folder"),
    ],
)
def test_resume_refuses_bad_options_in_one_line(tmp_path, names_file, fresh_pm, capsys, extra, message):
    assert main(_train_args(names_file, tmp_path / "r", "--stop-after", "4")) == 0
    capsys.readouterr()
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    assert main(["train", "--resume", str(tmp_path / "r"), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize(
    "extra", [["--data", "{tmp}/missing.txt"], ["--steps", "3", "--warmup-steps", "10"]], ids=["no data", "bad option"]
)
def test_a_run_that_fails_before_it_starts_leaves_no_empty_folder(tmp_path, names_file, fresh_pm, capsys, extra):
    extra = [arg.format(tmp=tmp_path) for arg in extra]
    data = [] if "--data" in extra else ["--data", str(names_file)]
    assert main(["train", *data, "--out-dir", str(tmp_path / "runs" / "r"), "--quiet", *extra]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "r").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, as it was
    assert main(["train", *data, "--out-dir", str(tmp_path / "kept"), "--quiet", *extra]) == 2
    assert (tmp_path / "kept").is_dir()
