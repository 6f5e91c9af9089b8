"""``arraygpt sample``: load a model (anything ``arraygpt.load`` opens: an arraygpt checkpoint or
run folder, a Hugging Face directory) and print samples as they are generated.

The sampler options follow llama.cpp's: ``--top-k``, ``--top-p``, ``--min-p`` and
``--repeat-penalty`` each turn their filter on, and several compose (repeat penalty on the logits,
then the temperature, then top-k, top-p, min-p); ``--option NAME=VALUE`` passes any option of a
plugin's sampler. Where the checkpoint's directory has a ``generation_config.json``, its
temperature, top_k, top_p, min_p, repetition_penalty, max_new_tokens, eos_token_id and do_sample
are the defaults; the command line overrides them. The text is streamed with
``arraygpt.generation.text.TextStream`` (never a split character, linear in the output). Exit
code 2 and one line on stderr, in command-line terms, for a bad option or a checkpoint that
cannot be read.

The sampler options and their parsing are shared with ``arraygpt chat``, ``plot`` and ``explain``.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from collections.abc import Sequence
from typing import Any

from arraygpt.cli.options import parse_finite

MAX_SAMPLES = 1_000_000  # --num-samples above this is refused as a typo rather than run for days
DEFAULT_MAX_NEW_TOKENS = 200
PROMPT_LIMIT = 64 * 1024 * 1024  # bytes of --prompt-file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``arraygpt sample``."""
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="any model arraygpt.load opens: an arraygpt checkpoint or run folder, or a Hugging Face directory",
    )
    add_quantized_argument(parser)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", "-p", default="", metavar="TEXT", help="text to continue (default: the BOS token)")
    prompt.add_argument(
        "--prompt-file",
        "-f",
        default=None,
        metavar="FILE",
        help=f"read the prompt from FILE (UTF-8, at most {PROMPT_LIMIT:,} bytes)",
    )
    parser.add_argument(
        "--num-samples", type=int, default=1, metavar="N", help=f"samples to generate, 1 to {MAX_SAMPLES:,} (default 1)"
    )
    parser.add_argument(
        "--max-new-tokens",
        "-n",
        type=int,
        default=None,
        metavar="M",
        help="most tokens per sample, >= 0; a sample also ends at an end token (default: the checkpoint's "
        f"generation_config.json, else {DEFAULT_MAX_NEW_TOKENS})",
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
        help="stop a sample at the token that completes TEXT (repeatable); the tokenizer's end tokens always stop",
    )
    parser.add_argument(
        "--no-cache",
        dest="use_cache",
        action="store_false",
        help="rerun the whole context for every token instead of using the KV cache",
    )


class _Given(argparse.Action):
    """Store the value and remember that the option was given (so that a checkpoint's
    generation_config.json supplies only the options that were not)."""

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        given = set(getattr(namespace, "given_sampler_options", None) or ())
        setattr(namespace, "given_sampler_options", given | {self.dest})


def add_quantized_argument(parser: argparse.ArgumentParser) -> None:
    """--quantized, for sample and chat."""
    parser.add_argument(
        "--quantized",
        action="store_true",
        help="a .gguf file: keep its quantized matrices as blocks (less memory, faster decoding; docs/gguf.md)",
    )


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose and configure the sampler, shared by ``sample``, ``chat``, ``plot``
    and ``explain``: ``--sampler``, ``--temperature``, ``--top-k``, ``--top-p``, ``--min-p``,
    ``--repeat-penalty``, ``--repeat-last-n``, ``--option`` and ``--seed``. Each of the filter
    options turns its filter on; several compose (temperature, then top-k, top-p, min-p)."""
    from arraygpt.generation.sampling import DEFAULT_SAMPLER, DEFAULT_TEMPERATURE

    temperature = DEFAULT_TEMPERATURE
    group = parser.add_argument_group("sampler", "each filter option turns its filter on; several compose")
    group.add_argument(
        "--sampler",
        default=DEFAULT_SAMPLER,
        action=_Given,
        metavar="NAME[,NAME...]",
        help="registered sampler(s), applied in order after the temperature, before the filters the options "
        "below turn on (built-in: greedy, temperature, top_k, top_p, min_p, repeat_penalty; `arraygpt plugins` "
        f"lists all; default {DEFAULT_SAMPLER})",
    )
    group.add_argument(
        "--temperature",
        "--temp",
        type=parse_finite,
        default=temperature,
        action=_Given,
        metavar="T",
        help=f"softmax temperature T >= 0 (0 = greedy; no upper cap; default {temperature:g})",
    )
    group.add_argument(
        "--top-k", type=int, default=None, action=_Given, metavar="K", help="keep the K most likely tokens (0: off)"
    )
    group.add_argument(
        "--top-p",
        type=parse_finite,
        default=None,
        action=_Given,
        metavar="P",
        help="keep the smallest set of most likely tokens whose mass reaches P (1: off)",
    )
    group.add_argument(
        "--min-p",
        type=parse_finite,
        default=None,
        action=_Given,
        metavar="P",
        help="keep tokens with probability >= P times the most likely one's (0: off)",
    )
    group.add_argument(
        "--repeat-penalty",
        type=parse_finite,
        default=None,
        action=_Given,
        metavar="X",
        help="divide the positive logits of tokens in the last --repeat-last-n tokens by X, multiply the "
        "negative ones (1: off)",
    )
    group.add_argument(
        "--repeat-last-n",
        type=int,
        default=None,
        action=_Given,
        metavar="N",
        help="how many of the last tokens the repeat penalty looks at (-1: all; default 64)",
    )
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an option of a plugin's sampler (repeatable), e.g. --option epsilon=0.02",
    )
    group.add_argument("--seed", type=int, default=1337, help="seed of the sampling coins (default 1337)")


FLAGS = ("top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n")  # sampler options that have their own flag


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cli_terms(message: str) -> str:
    """A sampler error in command-line terms: ``top_p must ...`` -> ``--top-p must ...``, ``option
    'eps'`` -> ``--option eps``, ``needs the option top_k (e.g. top_k=...)`` -> ``needs --top-k``."""
    for name in (*FLAGS, "temperature"):
        if message.startswith(f"{name} "):
            return _flag(name) + message[len(name) :]
        message = message.replace(f"needs the option {name} (e.g. {name}=...)", f"needs {_flag(name)}")
    message = re.sub(r"needs the option (\w+) \(e\.g\. \w+=\.\.\.\)", r"needs --option \1=VALUE", message)
    message = re.sub(r"^option '(\w+)'", r"--option \1", message)
    message = message.replace("to combine samplers pass a list, e.g. sampler=", "to combine samplers: --sampler ")
    return message


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler options given on the command line: ``--top-k/--top-p/--min-p/--repeat-penalty/
    --repeat-last-n`` (``--top-k 0`` is left out: off) and every ``--option NAME=VALUE`` (ints and
    floats parsed).

    Each flag's value is checked first by the registered sampler of its name, so that an
    out-of-range value is reported as such (``--top-p must be a number in (0, 1], got 1.5``)."""
    from arraygpt.generation.sampling import available_samplers

    options = {name: getattr(args, name, None) for name in FLAGS if getattr(args, name, None) is not None}
    if options.get("top_k") is not None and options["top_k"] < 0:
        raise ValueError(f"--top-k must be an integer >= 0 (0: off), got {options['top_k']}")
    if options.get("top_k") == 0:
        del options["top_k"]
    if "repeat_last_n" in options and "repeat_penalty" not in options:
        options["repeat_penalty"] = 1.0
    factories = available_samplers()
    for name in ("top_k", "top_p", "min_p", "repeat_penalty"):
        if name in options and name in factories:
            extra = (
                {"repeat_last_n": options["repeat_last_n"]}
                if name == "repeat_penalty" and "repeat_last_n" in options
                else {}
            )
            try:
                factories[name](**{name: options[name]}, **extra)  # raises ValueError naming the allowed range
            except ValueError as e:
                raise ValueError(cli_terms(str(e))) from None
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--option expects NAME=VALUE, got {item!r}")
        options[name.strip().replace("-", "_")] = _parse_value(value)
    return options


def sampler_names(args: argparse.Namespace) -> Any:
    """``--sampler``: a name, or a list of names for a comma-separated chain."""
    return [s.strip() for s in args.sampler.split(",")] if "," in args.sampler else args.sampler.strip()


def sampling(args: argparse.Namespace, defaults: dict[str, Any]) -> tuple[Any, float, dict[str, Any]]:
    """(sampler, temperature, options) from the command line over a checkpoint's
    ``generation_config.json`` (``defaults``, as ``read_generation_config`` returns them), as
    ``arraygpt.generation.sampling.with_generation_config`` reads it: a value given on the command
    line wins (``--top-k 0`` too: off).

    Raises:
        ValueError: an invalid option, in command-line terms.
    """
    from arraygpt.generation.sampling import make_sampler, with_generation_config

    given = set(getattr(args, "given_sampler_options", None) or ())
    sampler, temperature, options = with_generation_config(
        defaults,
        sampler_names(args) if "sampler" in given else None,
        args.temperature if "temperature" in given else None,
        sampler_options(args),
        default_temperature=args.temperature,
    )
    if "top_k" in given and not args.top_k:
        options.pop("top_k", None)
    try:
        make_sampler(sampler, temperature=temperature, **options)
    except ValueError as e:
        raise ValueError(cli_terms(str(e))) from None
    return sampler, temperature, options


class TextStream:
    """Print the text of a stream of token ids as it comes, never splitting a character
    (``arraygpt.generation.text.TextStream``, linear in the output), to ``out``."""

    def __init__(self, tokenizer: Any, out: Any, context: Sequence[int] = ()):
        from arraygpt.generation.text import TextStream as Decoder

        self.out = out
        self._decoder = Decoder(tokenizer, context)
        self._pieces: list[str] = []

    def _write(self, text: str) -> None:
        if text:
            self._pieces.append(text)
            self.out.write(text)
            self.out.flush()

    def push(self, token: int) -> None:
        self._write(self._decoder.push(token))

    def finish(self) -> None:
        """Print what is still held back at the end of a sample (an incomplete character is
        printed as the decoder renders it, U+FFFD), so no generated text is lost."""
        self._write(self._decoder.finish())

    def text(self) -> str:
        return "".join(self._pieces)


def read_prompt_file(path: str) -> str:
    """The text of ``--prompt-file``: a regular file of UTF-8 text, at most PROMPT_LIMIT bytes."""
    from arraygpt.io.files import open_regular

    f, size = open_regular(path, "prompt file")
    with f:
        if size > PROMPT_LIMIT:
            raise ValueError(f"--prompt-file {path}: {size:,} bytes; at most {PROMPT_LIMIT:,} are read")
        data = f.read(PROMPT_LIMIT + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def label(tokenizer: Any, token: int, ends: Sequence[int]) -> str:
    """How --show-probs prints a token: its text quoted, or <end> for an end token (whose text is empty)."""
    return "<end>" if token in ends else repr(tokenizer.decode([token]))


def show(tokenizer: Any, pairs: Sequence[tuple[int, float]], ends: Sequence[int]) -> str:
    """--show-probs's candidate list: ``'a' 0.500  'b' 0.250``."""
    return "  ".join(f"{label(tokenizer, i, ends)} {p:.3f}" for i, p in pairs)


def _load(path: str, quantized: bool) -> tuple[Any, Any, list[int], dict[str, Any]]:
    """(model, tokenizer, prompt prefix, generation_config.json's defaults) of the model at ``path``
    (``arraygpt.io.formats.load``)."""
    ckpt = load_checkpoint_with_tokenizer(path, quantized)
    return ckpt.model, ckpt.tokenizer, list(ckpt.prompt_prefix), ckpt.generation_config


def load_checkpoint_with_tokenizer(path: str, quantized: bool = False) -> Any:
    """``arraygpt.load(path, quantized=...)``, refused when it has no tokenizer (its tokens could
    not be shown)."""
    from arraygpt.io.formats import load

    ckpt = load(path, quantized=quantized)
    if ckpt.tokenizer is None:
        raise ValueError(f"checkpoint {path} has no tokenizer, so its tokens cannot be turned into text")
    return ckpt


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint and print the samples as they are generated."""
    from arraygpt.generation.generation import generate
    from arraygpt.generation.sampling import check_number
    from arraygpt.generation.text import encode_prompt, end_ids
    from arraygpt.xp import host_rng

    check_number("--num-samples", args.num_samples, 1, MAX_SAMPLES, integer=True)
    if args.max_new_tokens is not None:
        check_number("--max-new-tokens", args.max_new_tokens, 0, integer=True)
    check_number("--show-probs", args.show_probs, 0, integer=True)
    check_number("--seed", args.seed, 0, integer=True)
    sampling(args, {})  # report bad options before loading
    text = read_prompt_file(args.prompt_file) if args.prompt_file is not None else args.prompt
    model, tokenizer, prefix, defaults = _load(args.checkpoint, args.quantized)
    sampler, temperature, options = sampling(args, defaults)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    ends = sorted(end_ids(tokenizer) | set(defaults.get("eos_token_id", ())))
    prompt = encode_prompt(tokenizer, text, prefix)
    stop = list(args.stop)
    if not all(stop):
        raise ValueError("--stop takes a non-empty text")
    rng = host_rng(args.seed)
    out = sys.stdout
    for i in range(args.num_samples):
        if i:
            out.write("\n---------------\n")
        if not args.show_probs:
            out.write(text)
        stream = TextStream(tokenizer, io.StringIO() if args.show_probs else out, prompt)
        steps = generate(
            model,
            prompt,
            max_new_tokens,
            sampler,
            tokenizer=tokenizer,
            temperature=temperature,
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
                out.write(show_step(tokenizer, item, ends))
                out.flush()
            if token in ends:
                break
            stream.push(token)
        stream.finish()
        if args.show_probs:
            out.write(f"=> {text}{stream.text()}")
    out.write("\n")
    out.flush()
    return 0


def show_step(tokenizer: Any, item: Any, ends: Sequence[int]) -> str:
    """--show-probs's line for one token: the token, its probabilities, and both candidate lists."""
    return (
        f"[{label(tokenizer, item.token, ends)} p={item.p_sampler:.3f} (model {item.p_model:.3f})]"
        f"  model: {show(tokenizer, item.model, ends)}  |  sampler: {show(tokenizer, item.sampler, ends)}\n"
    )
