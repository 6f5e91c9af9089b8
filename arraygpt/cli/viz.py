"""``arraygpt viz``: pictures of a model and one interactive page, written into a folder.

    arraygpt viz --checkpoint runs/names --prompt em -o pictures         every picture the inputs allow
    arraygpt viz attention lens --checkpoint runs/names --prompt emma -o pictures
    arraygpt viz loss --run runs/names -o pictures
    arraygpt viz params --preset gpt3-175b -o pictures
    arraygpt viz page --checkpoint runs/names --temperature 0.8 --top-k 5 -o pictures   (pictures/page.html)

KIND is any of probs, attention, lens, embeddings, loss, params, page; without one, every kind the
inputs allow is made (a checkpoint: probs, attention, lens, embeddings, page, and loss when it is a
run folder; --run: loss; --preset: params). Each file's path is printed. The sampler options are
those of ``arraygpt sample``. This module only parses options and saves: the pictures are made by
``arraygpt.viz`` (matplotlib, ``pip install 'arraygpt[viz]'``; the page needs no matplotlib).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

KINDS = ("probs", "attention", "lens", "embeddings", "loss", "params", "page")
FILES = {"probs": "probs", "attention": "attention", "lens": "lens", "embeddings": "embeddings", "loss": "loss",
         "params": "params"}  # fmt: skip
HELP = "draw pictures of a model (distributions, attention, logit lens, embeddings, loss, parameters) and an HTML page"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``arraygpt viz``."""
    from arraygpt.sampling import DEFAULT_SAMPLER

    parser.add_argument("kinds", nargs="*", metavar="KIND",
                        help=f"what to make: {', '.join(KINDS)} (default: every kind the inputs allow)")  # fmt: skip
    parser.add_argument("--checkpoint", metavar="DIR", help="a model directory arraygpt.load opens (checkpoint or run folder)")
    parser.add_argument("--run", metavar="DIR", help="a training run folder with metrics.jsonl (for loss)")
    parser.add_argument("--preset", metavar="NAME", help="a GPTConfig preset (for params), e.g. gpt3-175b")
    parser.add_argument("--prompt", default="", metavar="TEXT", help="text to look at / continue (default: the BOS token)")
    parser.add_argument("--max-new-tokens", type=int, default=12, metavar="N", help="tokens to generate (default 12)")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER, metavar="NAME[,NAME...]",
                        help=f"sampler(s) as in arraygpt sample (default {DEFAULT_SAMPLER})")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (default 1)")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="top_k: keep the K most likely tokens")
    parser.add_argument("--top-p", type=float, default=None, metavar="P", help="top_p: keep the nucleus of mass P")
    parser.add_argument("--min-p", type=float, default=None, metavar="P",
                        help="min_p: keep tokens with probability >= P times the most likely one's")  # fmt: skip
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of a plugin's sampler (repeatable)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampling coins (default 1337)")
    parser.add_argument("--candidates", type=int, default=8, metavar="K", help="candidates shown per token (default 8)")
    parser.add_argument("--token", default=None, metavar="TEXT",
                        help="embeddings: mark this token's nearest neighbours (default: the prompt's last token)")  # fmt: skip
    parser.add_argument("--format", choices=("png", "svg"), default="png", help="image format (default png)")
    parser.add_argument("--dpi", type=int, default=100, help="PNG resolution (default 100)")
    parser.add_argument("-o", "--out-dir", default="pictures", metavar="DIR", help="output folder (default pictures)")


def _kinds(args: argparse.Namespace, has_metrics: bool) -> list[str]:
    if args.kinds:
        unknown = [k for k in args.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"unknown KIND {unknown[0]!r}; choose from {', '.join(KINDS)}")
        return list(dict.fromkeys(args.kinds))
    kinds: list[str] = []
    if args.checkpoint:
        kinds += ["probs", "attention", "lens", "embeddings", "page"]
    if args.run or has_metrics:
        kinds.append("loss")
    if args.preset:
        kinds.append("params")
    if not kinds:
        raise ValueError("nothing to draw: give --checkpoint DIR, --run DIR or --preset NAME (and optionally KINDs)")
    return kinds


def run(args: argparse.Namespace) -> int:
    """Make each requested picture and print the path of each file written."""
    from arraygpt import viz
    from arraygpt.cli.sample import sampler_options
    from arraygpt.sampling import check_number, make_sampler
    from arraygpt.training import METRICS_FILE

    run_dir = args.run or (args.checkpoint if args.checkpoint and (Path(args.checkpoint) / METRICS_FILE).is_file()
                           else None)  # fmt: skip
    kinds = _kinds(args, run_dir is not None)
    needs_model = [k for k in kinds if k in ("probs", "attention", "lens", "embeddings", "page")]
    if needs_model and not args.checkpoint:
        raise ValueError(f"{', '.join(needs_model)} need(s) --checkpoint DIR (a checkpoint or run folder)")
    if "loss" in kinds and run_dir is None:
        raise ValueError("loss needs --run DIR (a training run folder with metrics.jsonl)")
    options = sampler_options(args)
    sampler: Any = [s.strip() for s in args.sampler.split(",")] if "," in args.sampler else args.sampler.strip()
    check_number("--max-new-tokens", args.max_new_tokens, 0, integer=True)
    check_number("--candidates", args.candidates, 1, integer=True)
    make_sampler(sampler, temperature=args.temperature, **options)  # report bad options before loading
    out = Path(args.out_dir)
    model = tokenizer = None
    prefix: list[int] = []
    if needs_model or ("params" in kinds and not args.preset and args.checkpoint):
        from arraygpt.formats import load

        ckpt = load(args.checkpoint)
        model, tokenizer, prefix = ckpt.model, ckpt.tokenizer, list(ckpt.prompt_prefix)
    ext = "." + args.format
    generation = dict(temperature=args.temperature, seed=args.seed, prefix=prefix, **options)
    for kind in kinds:
        if kind == "probs":
            picture: Any = viz.plot_distributions(model, tokenizer, args.prompt, args.max_new_tokens, sampler,
                                                  k=args.candidates, **generation)  # fmt: skip
        elif kind == "attention":
            picture = viz.plot_attention(model, tokenizer, args.prompt, prefix=prefix)
        elif kind == "lens":
            picture = viz.plot_logit_lens(model, tokenizer, args.prompt, prefix=prefix)
        elif kind == "embeddings":
            token = args.token
            if token is None:
                ids = viz.prompt_ids(tokenizer, args.prompt, prefix)
                token = ids[-1]
            picture = viz.plot_embeddings(model, tokenizer, token)
        elif kind == "loss":
            picture = viz.plot_training_curves(run_dir)
        elif kind == "params":
            if args.preset or model is None:
                picture = viz.plot_param_tally(args.preset or "gpt3-175b")
            else:
                picture = viz.plot_param_tally(model.config, name=Path(args.checkpoint).name)
        else:  # page
            page = viz.explain(model, tokenizer, args.prompt, args.max_new_tokens, sampler, k=args.candidates,
                               **generation)  # fmt: skip
            print(page.save(out / "page.html"))
            continue
        print(picture.save(out / (FILES[kind] + ext), dpi=args.dpi))
    return 0
