"""``arraygpt chat``: talk to a model with its own chat template.

    arraygpt chat --checkpoint SmolLM2-135M-Instruct --system "Be brief." --temperature 0.7

PATH is anything ``arraygpt.load`` opens. On a terminal the command prompts for each message
(``> ``); Ctrl-D or Ctrl-C at the prompt ends the chat, Ctrl-C during a reply stops that reply.
Otherwise every line of standard input is one user message (blank lines are skipped), each reply
is printed on its own line, and the command exits 0 at the end of the input, so a chat can be
scripted. The model and its KV cache stay loaded between turns, and each turn feeds only what is
new (``arraygpt.generation.chat.Chat``). The sampler options are ``arraygpt sample``'s, with the
defaults of the checkpoint's generation_config.json; ``--show-probs K`` prints the distribution
behind each reply token as ``sample`` does.

Not here: the conversation and its cache (``arraygpt.generation.chat``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from arraygpt.cli.sample import (
    add_quantized_argument,
    add_sampler_arguments,
    load_checkpoint_with_tokenizer,
    sampling,
)

PROMPT = "> "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``arraygpt chat``."""
    from arraygpt.generation.chat import DEFAULT_MAX_NEW_TOKENS, TEMPLATES

    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="any model arraygpt.load opens (a Hugging Face directory with a chat template, an arraygpt checkpoint...)",
    )
    add_quantized_argument(parser)
    parser.add_argument("--system", "--system-prompt", default=None, metavar="TEXT", help="the system prompt")
    parser.add_argument(
        "--template",
        default=None,
        choices=sorted(TEMPLATES),
        help="use this chat template instead of the model's own (for a model that ships none)",
    )
    parser.add_argument(
        "--max-new-tokens",
        "-n",
        type=int,
        default=None,
        metavar="M",
        help="most tokens of one reply, >= 1 (default: the checkpoint's generation_config.json, else "
        f"{DEFAULT_MAX_NEW_TOKENS}); a reply also ends at a stop token",
    )
    parser.add_argument(
        "--show-probs",
        type=int,
        default=0,
        metavar="K",
        help="for each reply token, print the K most likely candidates before and after the sampler",
    )
    add_sampler_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Load the model once, then answer each message as it comes."""
    from arraygpt.generation.chat import DEFAULT_MAX_NEW_TOKENS, Chat
    from arraygpt.generation.sampling import check_number

    if args.max_new_tokens is not None:
        check_number("--max-new-tokens", args.max_new_tokens, 1, integer=True)
    check_number("--show-probs", args.show_probs, 0, integer=True)
    sampling(args, {})  # report bad options before loading
    ckpt = load_checkpoint_with_tokenizer(args.checkpoint, args.quantized)
    defaults = ckpt.generation_config
    sampler, temperature, options = sampling(args, defaults)
    max_new_tokens = args.max_new_tokens or defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    try:
        chat = Chat(
            ckpt.model,  # not the checkpoint: its generation_config.json is read once, by sampling() above
            ckpt.tokenizer,
            system=args.system,
            template=args.template,
            max_new_tokens=max_new_tokens,
            seed=args.seed,
            show_probs=args.show_probs,
            sampler=sampler,
            temperature=temperature,
            eos_id=defaults.get("eos_token_id"),
            **options,
        )
    except ValueError as e:
        if "no chat template" in str(e):
            raise ValueError(
                f"{args.checkpoint}: the model has no chat template (a base model?): use arraygpt sample, or "
                "choose one with --template chatml"
            ) from None
        raise
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = _read(interactive)
        except (EOFError, KeyboardInterrupt):
            if interactive:
                print()
            return 0
        if line is None:
            return 0
        if not line.strip():
            continue
        try:
            _answer(chat, line, args.show_probs)
        except KeyboardInterrupt:
            if not interactive:
                raise
            print()  # the reply stops; the chat goes on


def _read(interactive: bool) -> str | None:
    """The next user message; None at the end of a non-interactive input."""
    if interactive:
        return input(PROMPT)
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\r\n")


def _answer(chat: Any, line: str, show_probs: int) -> None:
    from arraygpt.cli.sample import show_step

    out = sys.stdout
    for item in chat.send(line):
        out.write(show_step(chat.tokenizer, item, sorted(chat.ends)) if show_probs else item)
        out.flush()
    if show_probs:
        out.write(f"=> {chat.messages[-1]['content']}")
    out.write("\n")
    out.flush()
