"""``arraygpt plot KIND``: one picture of a model, written to one file.

    arraygpt plot probs --checkpoint runs/names --prompt em --sampler top_k --top-k 5 -o probs.png
    arraygpt plot attention --checkpoint runs/names --prompt isabel -o attention.svg
    arraygpt plot lens --checkpoint runs/names --prompt isabel -o lens.png
    arraygpt plot embeddings --checkpoint runs/names --token a -o embeddings.png
    arraygpt plot loss --run runs/names -o loss.png
    arraygpt plot params --preset gpt3-175b -o params.png

KIND is one of probs, attention, lens, embeddings (these need ``--checkpoint DIR``, any directory
``arraygpt.load`` opens), loss (``--run DIR``, a training run folder; a ``--checkpoint`` that is one
works too) and params (``--preset NAME``, or the ``--checkpoint``'s configuration). ``-o FILE`` ends
in ``.png`` or ``.svg`` (default ``KIND.png``); the path written is printed. The sampler options are
those of ``arraygpt sample``, taken from its parser.

This module only parses options and calls ``arraygpt.viz.figures`` (which draws with matplotlib,
``pip install 'arraygpt[viz]'``, and writes the file atomically: a failed write leaves the file
that was there unchanged, and the message names the path). Its option helpers are shared with
``arraygpt explain``. Bad input exits 2 with one line on stderr (``arraygpt.cli.main``); every
check is made here, in ``run``, rather than by argparse, so that the message is that one line.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

MAX_DPI = 1200  # a PNG's resolution; --dpi 100000 would ask matplotlib for terabytes
MAX_PICTURE_TOKENS = 1000  # tokens a picture or page shows; more is unreadable and only costs memory
KINDS = ("probs", "attention", "lens", "embeddings", "loss", "params")
MODEL_KINDS = ("probs", "attention", "lens", "embeddings")
SUFFIXES = (".png", ".svg")


# -- options shared with `arraygpt explain` ------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, *, max_new_tokens: int) -> None:
    """``--checkpoint``, ``--prompt``, ``--max-new-tokens``, ``--candidates`` and the sampler options."""
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="a model directory arraygpt.load opens (an arraygpt checkpoint or run folder, "
        "or a Hugging Face directory)",
    )
    parser.add_argument(
        "--prompt", default="", metavar="TEXT", help="text to look at / continue (default: the BOS token)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        metavar="N",
        help=f"tokens to generate, 0 to {MAX_PICTURE_TOKENS} (default {max_new_tokens})",
    )
    parser.add_argument(
        "--candidates", type=int, default=8, metavar="K", help="candidates shown for each generated token (default 8)"
    )
    from arraygpt.cli.sample import add_sampler_arguments

    add_sampler_arguments(parser)


def generation_options(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(sampler, keyword options for ``viz.plot_distributions`` / ``viz.explain``) from the
    options, checked before any model is loaded (a bad option raises ValueError)."""
    from arraygpt.cli.sample import sampler_options
    from arraygpt.generation.sampling import check_number, make_sampler

    options = sampler_options(args)
    sampler: Any = [s.strip() for s in args.sampler.split(",")] if "," in args.sampler else args.sampler.strip()
    check_number("--max-new-tokens", args.max_new_tokens, 0, MAX_PICTURE_TOKENS, integer=True)
    check_number("--candidates", args.candidates, 1, integer=True)
    make_sampler(sampler, temperature=args.temperature, **options)
    return sampler, dict(temperature=args.temperature, seed=args.seed, k=args.candidates, **options)


def load_model(directory: str | None, needed_by: str, *, tokenizer: bool = True) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, prompt prefix) of ``arraygpt.load(directory)``; ``tokenizer``: refuse a
    checkpoint without one (its tokens cannot be shown as text)."""
    if not directory:
        raise ValueError(f"{needed_by} needs --checkpoint DIR (a checkpoint or run folder)")
    from arraygpt.io.formats import load

    ckpt = load(directory)
    if tokenizer and ckpt.tokenizer is None:
        raise ValueError(f"checkpoint {directory} has no tokenizer, so {needed_by} cannot show its tokens as text")
    return ckpt.model, ckpt.tokenizer, list(ckpt.prompt_prefix)


def shown(path: str | os.PathLike[str]) -> str:
    """A path as text any terminal takes: bytes a file name holds that are not UTF-8 as U+FFFD."""
    return os.fsencode(path).decode("utf-8", "replace")


def output_path(path: str | None, default: str, suffixes: tuple[str, ...], what: str) -> Path:
    """``-o``'s path (``default`` when not given), refused unless it ends in one of ``suffixes``
    and is a regular file or a new name (not a folder, FIFO or device), before any work is done."""
    from arraygpt.viz.output import check_output

    out = Path(path if path else default)
    if out.suffix.lower() not in suffixes:
        raise ValueError(f"-o {out}: the file name must end in {' or '.join(suffixes)}")
    return check_output(out, what)


# -- arraygpt plot ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``arraygpt plot``."""
    parser.add_argument("kind", nargs="?", metavar="KIND", help=f"what to draw: {', '.join(KINDS)}")
    add_model_arguments(parser, max_new_tokens=12)
    parser.add_argument("--run", metavar="DIR", help="loss: a training run folder with metrics.jsonl")
    parser.add_argument("--preset", metavar="NAME", help="params: a GPTConfig preset, e.g. gpt3-175b")
    parser.add_argument(
        "--token",
        default=None,
        metavar="TEXT",
        help="embeddings: mark this token's nearest neighbours (default: the prompt's last token)",
    )
    parser.add_argument("--dpi", type=int, default=100, help=f"PNG resolution, 1 to {MAX_DPI} (default 100)")
    parser.add_argument(
        "-o", "--output", default=None, metavar="FILE", help="the file to write, .png or .svg (default KIND.png)"
    )


def _check_kind(kind: str | None) -> str:
    if kind is None:
        raise ValueError(f"say what to draw: arraygpt plot KIND, with KIND one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown KIND {kind!r}; choose from {', '.join(KINDS)}")
    return kind


def run(args: argparse.Namespace) -> int:
    """Draw the picture and print the path of the file written."""
    from arraygpt import viz
    from arraygpt.generation.sampling import check_number
    from arraygpt.training.log import METRICS_FILE

    kind = _check_kind(args.kind)
    out = output_path(args.output, f"{kind}.png", SUFFIXES, "picture")
    check_number("--dpi", args.dpi, 1, MAX_DPI, integer=True)
    sampler, options = generation_options(args)
    if kind == "loss":
        run_dir = args.run
        if run_dir is None and args.checkpoint and os.path.lexists(Path(args.checkpoint) / METRICS_FILE):
            run_dir = args.checkpoint
        if run_dir is None:
            raise ValueError("loss needs --run DIR (a training run folder with metrics.jsonl)")
        picture: Any = viz.plot_training_curves(run_dir)
    elif kind == "params":
        if args.preset:
            picture = viz.plot_param_tally(args.preset)
        elif args.checkpoint:
            model, _, _ = load_model(args.checkpoint, kind, tokenizer=False)
            picture = viz.plot_param_tally(model.config, name=Path(args.checkpoint).name)
        else:
            raise ValueError("params needs --preset NAME (e.g. gpt3-175b) or --checkpoint DIR")
    else:
        model, tokenizer, prefix = load_model(args.checkpoint, kind)
        if kind == "probs":
            picture = viz.plot_distributions(
                model, tokenizer, args.prompt, args.max_new_tokens, sampler, prefix=prefix, **options
            )
        elif kind == "attention":
            picture = viz.plot_attention(model, tokenizer, args.prompt, prefix=prefix)
        elif kind == "lens":
            picture = viz.plot_logit_lens(model, tokenizer, args.prompt, prefix=prefix)
        else:  # embeddings
            token = args.token if args.token is not None else viz.prompt_ids(tokenizer, args.prompt, prefix)[-1]
            picture = viz.plot_embeddings(model, tokenizer, token)
    print(shown(picture.save(out, dpi=args.dpi)))
    return 0
