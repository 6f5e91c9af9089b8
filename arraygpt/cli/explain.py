"""``arraygpt explain``: one self-contained HTML page of one generation.

    arraygpt explain --checkpoint runs/names --prompt em --max-new-tokens 8 -o page.html
    arraygpt explain --checkpoint runs/names --sampler top_k --top-k 5 --temperature 0.8 -o page.html

The page (``arraygpt.viz.page.explain``) shows the prompt and the generated tokens; clicking a token
shows its distribution, with sliders for temperature, top-k, top-p and min-p that recompute it in
the page as arraygpt's samplers do; the attention pattern of a chosen layer and head; and the logit
lens. Everything is inline (no network), so the file opens anywhere and can be mailed. The page
needs no matplotlib. ``--checkpoint`` is any directory ``arraygpt.load`` opens; the sampler options
are those of ``arraygpt sample``; ``-o`` ends in ``.html`` (default ``page.html``). The page is
written atomically (a failed write leaves the file that was there unchanged, and the message names
the path), and the path written is printed.

This module only parses options (with the helpers of ``arraygpt.cli.plot``) and calls
``arraygpt.viz.page.explain``. Bad input exits 2 with one line on stderr.
"""

from __future__ import annotations

import argparse

from arraygpt.cli.plot import add_model_arguments, generation_options, load_model, output_path, shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``arraygpt explain``."""
    add_model_arguments(parser, max_new_tokens=20)
    parser.add_argument(
        "-o", "--output", default=None, metavar="FILE", help="the page to write, .html (default page.html)"
    )


def run(args: argparse.Namespace) -> int:
    """Generate, build the page and print the path written."""
    from arraygpt import viz

    out = output_path(args.output, "page.html", (".html", ".htm"), "page")
    sampler, options = generation_options(args)
    model, tokenizer, prefix = load_model(args.checkpoint, "explain")
    page = viz.explain(model, tokenizer, args.prompt, args.max_new_tokens, sampler, prefix=prefix, **options)
    print(shown(page.save(out)))
    return 0
