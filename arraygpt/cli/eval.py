"""``arraygpt eval``: the perplexity and bits per byte of a model on a text file.

    arraygpt eval --checkpoint PATH --data FILE [--context N] [--stride S] [--json]

PATH is anything ``arraygpt.load`` opens; FILE is UTF-8 text, tokenized as the model's tokenizer
does by default (with the model's prompt prefix, BOS where it has one). The window rule and the
figures are those of ``arraygpt.training.evaluate`` (docs/evaluation.md). Progress goes to stderr
on a terminal, or with ``--progress``. Exit code 2 and one line on stderr for a missing, empty or
unreadable file, a text shorter than 2 tokens, or a context or stride out of range.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from arraygpt.io.files import open_regular

MAX_TEXT_BYTES = 256 * 1024 * 1024  # the text and its ids (~16 bytes each) are held in memory: larger files are refused


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``arraygpt eval``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="any model directory arraygpt.load opens: an arraygpt checkpoint or run folder, or a transformers "
        "GPT-2, Llama or Qwen2 directory",
    )
    parser.add_argument("--data", required=True, metavar="FILE", help="the UTF-8 text file to score")
    parser.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="input positions per window, 2 to the model's block_size (default block_size)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        metavar="S",
        help="tokens between window starts, 1 to the context; a window scores only the tokens the previous "
        "one did not (default: the context, windows side by side)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="windows per forward pass (default: about 256 MiB of logits and activations per pass)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        default=None,
        help="precision to load the model in (default: the checkpoint's own; float32 for transformers directories)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object: loss, perplexity, bits_per_byte, tokens"
    )
    parser.add_argument(
        "--progress", action="store_true", help="show progress on stderr even when it is not a terminal"
    )


def read_text(path: str) -> str:
    """The UTF-8 text of the regular file ``path``.

    Raises:
        ValueError: missing, not a regular file, empty, over :data:`MAX_TEXT_BYTES` or not UTF-8.
    """
    f, size = open_regular(path, "text file")
    with f:
        if size > MAX_TEXT_BYTES:
            raise ValueError(f"{path}: the text file is {size:,} bytes; at most {MAX_TEXT_BYTES:,} are read")
        data = f.read(MAX_TEXT_BYTES + 1)
    if not data:
        raise ValueError(f"{path}: the text file is empty; give a file with at least 2 tokens of text")
    if len(data) > MAX_TEXT_BYTES:
        raise ValueError(f"{path}: the text file is over {MAX_TEXT_BYTES:,} bytes; at most that many are read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the text file is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check_ranges(args: argparse.Namespace) -> None:
    """The range checks that need no model, made before loading one."""
    if args.context is not None and args.context < 2:
        raise ValueError(f"--context must be from 2 to the model's block_size, got {args.context}")
    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be from 1 to the context, got {args.stride}")
    if args.stride is not None and args.context is not None and args.stride > args.context:
        raise ValueError(f"--stride must be from 1 to the context ({args.context}), got {args.stride}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")


class _Progress:
    """``eval: 1,024/11,153 tokens (9%)`` on one line of stderr, rewritten in place."""

    def __init__(self, stream: Any):
        self.stream, self.shown = stream, False

    def __call__(self, done: int, total: int) -> None:
        self.stream.write(f"\reval: {done:,}/{total:,} tokens ({100 * done // total}%)")
        self.stream.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def run(args: argparse.Namespace) -> int:
    """Score the file and print the figures."""
    from arraygpt.io.formats import load
    from arraygpt.training.evaluate import evaluate

    _check_ranges(args)
    text = read_text(args.data)
    ckpt = load(args.checkpoint, dtype=args.dtype)
    if ckpt.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer, so its text cannot be turned into tokens")
    progress = _Progress(sys.stderr) if args.progress or sys.stderr.isatty() else None
    try:
        result = evaluate(
            ckpt.model,
            ckpt.tokenizer,
            text,
            args.context,
            args.stride,
            prefix=ckpt.prompt_prefix,
            batch_size=args.batch_size,
            progress=progress,
        )
    finally:
        if progress is not None:
            progress.finish()
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"loss           {result.loss:.4f} nats per token")
    print(f"perplexity     {result.perplexity:.4f}")
    print(f"bits per byte  {result.bits_per_byte:.4f}")
    print(
        f"tokens         {result.tokens:,} scored of {result.bytes:,} bytes "
        f"(context {result.context}, stride {result.stride})"
    )
    return 0
