"""``arraygpt sample``: load a model (an arraygpt checkpoint or run folder, or a Hugging Face GPT-2
directory) and print samples as they are generated.

The sampler options ``--top-k``, ``--top-p`` and ``--min-p`` go to the samplers that take them
(they have no default: each sampler's factory requires its own); ``--option NAME=VALUE`` passes
any option of a plugin's sampler. The temperature, prompt and counts default to those of
``arraygpt.generation.generation.generate``. Exit code 2 and one line on stderr for a bad option or a
checkpoint that cannot be read.
"""

from __future__ import annotations

import argparse
import inspect
import io
import sys
from collections.abc import Sequence
from typing import Any

from arraygpt.cli.options import parse_finite

MAX_SAMPLES = 1_000_000  # --num-samples above this is refused as a typo rather than run for days


def _generate_default(name: str) -> Any:
    """The default of ``generate``'s keyword argument ``name`` (written once, there)."""
    from arraygpt.generation.generation import generate

    return inspect.signature(generate).parameters[name].default


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``arraygpt sample``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="any model directory arraygpt.load opens: an arraygpt checkpoint or run folder, or a Hugging Face directory",
    )
    parser.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: the BOS token)")
    parser.add_argument(
        "--num-samples", type=int, default=1, metavar="N", help=f"samples to generate, 1 to {MAX_SAMPLES:,} (default 1)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=200,
        metavar="M",
        help="most tokens per sample, >= 0; a sample also ends at an end token (default 200)",
    )
    add_sampler_arguments(parser)
    parser.add_argument(
        "--show-probs",
        type=int,
        default=0,
        metavar="K",
        help="for each token, print the K most likely candidates before and after the sampler",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop a sample when it ends with TEXT (repeatable); BOS/EOS always stop",
    )
    parser.add_argument(
        "--no-cache",
        dest="use_cache",
        action="store_false",
        help="rerun the whole context for every token instead of using the KV cache",
    )


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and configure the sampler, shared by ``sample``, ``plot`` and
    ``explain``: ``--sampler``, ``--temperature``, ``--top-k``, ``--top-p``, ``--min-p``,
    ``--option`` and ``--seed``."""
    from arraygpt.generation.sampling import DEFAULT_SAMPLER

    temperature = _generate_default("temperature")
    group = parser.add_argument_group("sampler")
    group.add_argument(
        "--sampler",
        default=DEFAULT_SAMPLER,
        metavar="NAME[,NAME...]",
        help="registered sampler(s), applied in order after the temperature (built-in: greedy, "
        f"temperature, top_k, top_p, min_p; `arraygpt plugins` lists all; default {DEFAULT_SAMPLER})",
    )
    group.add_argument(
        "--temperature",
        type=parse_finite,
        default=temperature,
        metavar="T",
        help=f"softmax temperature T >= 0 (0 = greedy; no upper cap; default {temperature:g})",
    )
    group.add_argument("--top-k", type=int, default=None, metavar="K", help="top_k: keep the K most likely tokens")
    group.add_argument(
        "--top-p",
        type=parse_finite,
        default=None,
        metavar="P",
        help="top_p: keep the smallest set of most likely tokens whose mass reaches P",
    )
    group.add_argument(
        "--min-p",
        type=parse_finite,
        default=None,
        metavar="P",
        help="min_p: keep tokens with probability >= P times the most likely one's",
    )
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of a plugin's sampler (repeatable), e.g. --option epsilon=0.02",
    )
    group.add_argument("--seed", type=int, default=1337, help="seed of the sampling coins (default 1337)")


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--top-k/--top-p/--min-p`` and every ``--option NAME=VALUE`` (ints and floats parsed).

    Each of ``--top-k/--top-p/--min-p`` is checked first by the registered sampler of its name, so
    that an out-of-range value is reported as such (``top_p must be a number in (0, 1], got 1.5``)
    even when the chosen ``--sampler`` does not take the option (reported next, by
    ``make_sampler``)."""
    from arraygpt.generation.sampling import available_samplers

    options = {name: getattr(args, name) for name in ("top_k", "top_p", "min_p") if getattr(args, name) is not None}
    factories = available_samplers()
    for name, value in options.items():
        if name in factories:
            factories[name](**{name: value})  # raises ValueError naming the allowed range
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--option expects NAME=VALUE, got {item!r}")
        options[name.strip().replace("-", "_")] = _parse_value(value)
    return options


class TextStream:
    """Decode a growing list of ids and print only the new text, holding back an incomplete
    multi-byte character (a byte-level BPE token can end mid-character)."""

    def __init__(self, tokenizer: Any, out: Any):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        """Print what is still held back at the end of a sample (an incomplete character is
        printed as the decoder renders it, U+FFFD), so no generated text is lost."""
        text = self.tokenizer.decode(self.ids)
        if len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)


def label(tokenizer: Any, token: int, ends: Sequence[int]) -> str:
    """How --show-probs prints a token: its text quoted, or <end> for an end token (whose text is empty)."""
    return "<end>" if token in ends else repr(tokenizer.decode([token]))


def show(tokenizer: Any, pairs: Sequence[tuple[int, float]], ends: Sequence[int]) -> str:
    """--show-probs's candidate list: ``'a' 0.500  'b' 0.250``."""
    return "  ".join(f"{label(tokenizer, i, ends)} {p:.3f}" for i, p in pairs)


def _load(directory: str) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer, prompt prefix) of the model in ``directory`` (``arraygpt.io.formats.load``)."""
    from arraygpt.io.formats import load

    ckpt = load(directory)
    if ckpt.tokenizer is None:
        raise ValueError(f"checkpoint {directory} has no tokenizer, so its tokens cannot be turned into text")
    return ckpt.model, ckpt.tokenizer, list(ckpt.prompt_prefix)


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint and print the samples as they are generated."""
    from arraygpt.generation.generation import generate
    from arraygpt.generation.sampling import check_number, make_sampler
    from arraygpt.xp import host_rng

    options = sampler_options(args)
    sampler = [s.strip() for s in args.sampler.split(",")] if "," in args.sampler else args.sampler.strip()
    check_number("--num-samples", args.num_samples, 1, MAX_SAMPLES, integer=True)
    check_number("--max-new-tokens", args.max_new_tokens, 0, integer=True)
    check_number("--show-probs", args.show_probs, 0, integer=True)
    make_sampler(sampler, temperature=args.temperature, **options)  # report bad options before loading
    model, tokenizer, prefix = _load(args.checkpoint)
    specials = [
        getattr(tokenizer, "bos_id", None),
        getattr(tokenizer, "eos_id", None),
        *getattr(tokenizer, "eos_ids", ()),
    ]
    ends = sorted({int(i) for i in specials if i is not None})
    prompt = prefix + (list(tokenizer.encode(args.prompt)) if args.prompt else [])
    if not prompt:
        if not ends:
            raise ValueError("--prompt is empty and the tokenizer has no BOS token to start from; give --prompt")
        prompt = [getattr(tokenizer, "bos_id", None) if getattr(tokenizer, "bos_id", None) is not None else ends[0]]
    stop = [list(tokenizer.encode(s)) for s in args.stop]
    if any(not ids for ids in stop):
        raise ValueError("--stop takes a non-empty text (one that encodes to at least one token)")
    rng = host_rng(args.seed)
    out = sys.stdout
    for i in range(args.num_samples):
        if i:
            out.write("\n---------------\n")
        if not args.show_probs:
            out.write(args.prompt)
        stream = TextStream(tokenizer, io.StringIO() if args.show_probs else out)
        steps = generate(
            model,
            prompt,
            args.max_new_tokens,
            sampler,
            temperature=args.temperature,
            seed=rng,
            use_cache=args.use_cache,
            eos_id=ends,
            stop=stop or None,
            show_probs=args.show_probs,
            **options,
        )
        for item in steps:
            token = item.token if args.show_probs else item
            if args.show_probs:
                out.write(
                    f"[{label(tokenizer, token, ends)} p={item.p_sampler:.3f} (model {item.p_model:.3f})]"
                    f"  model: {show(tokenizer, item.model, ends)}  |  sampler: {show(tokenizer, item.sampler, ends)}\n"
                )
                out.flush()
            if token in ends:
                break
            stream.push(token)
        stream.finish()
        if args.show_probs:
            out.write(f"=> {args.prompt}{stream.text()}")
    out.write("\n")
    out.flush()
    return 0
