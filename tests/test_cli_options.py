"""Options derived from dataclass fields (arraygpt.cli.options): tuple-typed fields such as
GPTConfig.rope_scaling take comma-separated values, converted per element, with a clear error."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest

from arraygpt import cli
from arraygpt.cli.options import add_field_arguments, config_from_args, parse_tuple


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8,1,4,8192", (8.0, 1.0, 4.0, 8192)),
        ("32, 1.0, 4 ,8192.0", (32.0, 1.0, 4.0, 8192)),
        ("1e1,0.5,2,1", (10.0, 0.5, 2.0, 1)),
    ],
)
def test_rope_scaling_parses_to_gptconfigs_tuple(text, expected):
    args = cli.build_parser().parse_args(["params", "--preset", "llama-3.2-1b", "--rope-scaling", text])
    assert args.rope_scaling == expected
    config = config_from_args(args)
    assert config.rope_scaling == expected
    assert [type(x) for x in config.rope_scaling] == [float, float, float, int]


def test_params_command_takes_rope_scaling():
    rc, out, err = run(["params", "--preset", "llama-3.2-1b", "--rope-scaling", "8,1,4,8192", "--json"])
    assert rc == 0 and err == ""
    assert json.loads(out)["total"] == 1_235_814_400  # scaling changes no parameter


def test_train_parses_rope_scaling():
    args = cli.build_parser().parse_args(["train", "--preset", "llama-tiny", "--rope-scaling", "2,1,4,16"])
    assert config_from_args(args).rope_scaling == (2.0, 1.0, 4.0, 16)


@pytest.mark.parametrize(
    "text, message",
    [
        ("8,1,4", r"expected 4 comma-separated values \(FLOAT,FLOAT,FLOAT,INT\), got '8,1,4'"),
        ("8,1,4,8192,5", r"expected 4 comma-separated values"),
        ("", r"expected 4 comma-separated values"),
        ("8,x,4,8192", r"value 2 of '8,x,4,8192' \('x'\) is not a number"),
        ("8,1,4,8192.5", r"value 4 of '8,1,4,8192.5' \('8192.5'\) is not an integer"),
    ],
)
def test_malformed_rope_scaling_is_one_line_and_exit_2(text, message):
    rc, out, err = run(["params", "--preset", "llama-3.2-1b", "--rope-scaling", text])
    assert rc == 2 and out == ""
    assert "argument --rope-scaling" in err
    assert pytest.importorskip("re").search(message, err), err


def test_gptconfigs_own_checks_still_name_the_field():
    rc, out, err = run(["params", "--preset", "llama-3.2-1b", "--rope-scaling", "8,4,1,8192"])  # low > high
    assert rc == 2 and err.count("\n") == 1 and "GPTConfig.rope_scaling needs" in err
    rc, out, err = run(["params", "--preset", "gpt2", "--rope-scaling", "8,1,4,8192"])  # learned positions
    assert rc == 2 and "rope_scaling needs position='rope'" in err


def test_help_shows_the_element_types():
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices["params"]
    assert "--rope-scaling FACTOR,LOW_FREQ,HIGH_FREQ,ORIGINAL_MAX" in sub.format_help()


def test_any_tuple_field_of_a_dataclass_gets_a_parser():
    @dataclasses.dataclass
    class Options:
        sizes: tuple[int, ...] = (1,)
        pair: tuple[str, float] | None = None

    parser = argparse.ArgumentParser()
    add_field_arguments(parser, Options)
    args = parser.parse_args(["--sizes", "1,2,3", "--pair", "a,0.5"])
    assert args.sizes == (1, 2, 3) and args.pair == ("a", 0.5)
    with pytest.raises(argparse.ArgumentTypeError, match="expected one or more comma-separated values"):
        parse_tuple((int, ...), "sizes")("")
