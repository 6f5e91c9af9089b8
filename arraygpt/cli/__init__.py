"""The ``arraygpt`` command: the command layer, a thin layer over the library.

    arraygpt params --preset gpt3-175b [--json]
    arraygpt backends
    arraygpt plugins
    arraygpt train ...
    arraygpt sample ...
    arraygpt chat --checkpoint PATH [--system TEXT]
    arraygpt eval ...
    arraygpt plot KIND ...
    arraygpt explain ...

This package is the only place that parses arguments. Each subcommand is a module here that
exposes ``add_arguments(parser)`` and ``run(args) -> int``; :data:`SUBCOMMANDS` names them, so a
subcommand is added with one line. Options that mirror a dataclass (``TrainConfig``,
``GPTConfig``) are derived from its fields (``arraygpt.cli.options``).

Exit codes: 0 done; 1 a diverged training run; 2 bad input or a failing plugin, printed as one
line ``arraygpt <command>: error: ...`` on stderr; 130 an interrupt. Bad input is one of
:data:`EXPECTED_ERRORS`: a ``ValueError`` (arraygpt's ``CheckpointError``, ``DataError`` and
``RunFolderError`` are ValueErrors, and so are its argument checks), an ``OSError`` about a path, a
missing optional dependency (``ImportError``), a failing plugin (``PluginError``) or a backend that
cannot run here (``BackendUnavailable``). Output cut short by its reader (``| head``) ends the
command quietly with 0. Any other exception (a ``TypeError``, ``KeyError``,
``IndexError``...) is a bug and keeps its traceback (docs/reliability.md).

Not here: any training, sampling or loading logic (``arraygpt.training.loop``, ``arraygpt.generation.generation``,
``arraygpt.io.checkpoint``): a subcommand only turns options into a library call and its outcome
into output and an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from arraygpt.cli.options import add_config_arguments, config_from_args

__all__ = ["SUBCOMMANDS", "add_config_arguments", "build_parser", "config_from_args", "expected_errors", "main"]

# subcommand -> (module with add_arguments(parser) and run(args), one-line help)
SUBCOMMANDS = {
    "params": ("arraygpt.cli.params", "count the parameters of a preset, by matrix category"),
    "backends": ("arraygpt.cli.backends", "list the array backends and whether each can run here"),
    "plugins": ("arraygpt.cli.plugins", "list every registered backend, optimizer and sampler and its plugin"),
    "train": ("arraygpt.cli.train", "train a GPT (default: the microgpt preset on names)"),
    "sample": ("arraygpt.cli.sample", "generate text from a checkpoint"),
    "chat": ("arraygpt.cli.chat", "chat with a model, using its chat template"),
    "eval": ("arraygpt.cli.eval", "perplexity and bits per byte of a model on a text file"),
    "plot": ("arraygpt.cli.plot", "draw one picture of a model: probs, attention, lens, embeddings, loss or params"),
    "explain": ("arraygpt.cli.explain", "write one self-contained HTML page that shows inside one generation"),
}


def expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (exit 2, one line), not a bug (a traceback)."""
    from arraygpt.manager import PluginError
    from arraygpt.xp import BackendUnavailable

    return (ValueError, OSError, ImportError, PluginError, BackendUnavailable)


def _module(command: str) -> Any:
    return importlib.import_module(SUBCOMMANDS[command][0])


class Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line on stderr and exit 2, like every other
    expected error (argparse's own prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``arraygpt`` parser with one subparser per entry of :data:`SUBCOMMANDS`."""
    from arraygpt import __version__

    parser = Parser(prog="arraygpt", description="A GPT on the Python array API.")
    parser.add_argument("--version", action="version", version=f"arraygpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command, (_, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(command, help=help_text, description=help_text)
        _module(command).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``arraygpt`` command and return its exit code (no arguments: ``arraygpt train``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["train"]  # the main job: train the microgpt preset on names
    pressed: list[int] = []
    prog = "arraygpt"
    try:  # a Ctrl-C anywhere in here, even while the handler is handed back, is a quiet 130
        with _noting_ctrl_c(pressed):
            parser = build_parser()  # imports every subcommand (~0.1 s)
            args = parser.parse_args(argv)
            if args.command is None:
                parser.print_usage(sys.stderr)
                return 2
            prog = f"arraygpt {args.command}"
            expected = expected_errors()
            try:
                return _module(args.command).run(args)
            except BrokenPipeError:  # the reader of the output stopped (| head): not an error of the command
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # so that the final flush at exit does not fail again
                return 0
            except expected as e:
                if isinstance(e, ImportError) and pressed:
                    raise
                print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
                return 2
    except (KeyboardInterrupt, ImportError) as e:
        if isinstance(e, ImportError) and not pressed:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


@contextlib.contextmanager
def _noting_ctrl_c(pressed: list[int]) -> Iterator[None]:
    """While the command runs on the main thread with Python's own SIGINT handler: each Ctrl-C is
    appended to ``pressed``, then raises KeyboardInterrupt as that handler does. A C extension
    whose import a Ctrl-C cuts short raises an ImportError instead, with the KeyboardInterrupt
    gone (NumPy's: "PyCapsule_Import could not import module 'datetime'"); the note tells main
    that it was the interrupt."""

    def note(signum: int, frame: Any) -> None:
        pressed.append(signum)
        signal.default_int_handler(signum, frame)

    ours = threading.current_thread() is threading.main_thread()
    ours = ours and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        if ours:
            _hand_back_sigint()


def _hand_back_sigint() -> None:
    """Put Python's own SIGINT handler back. ``signal.signal`` runs a pending handler before it
    changes anything, so a Ctrl-C that lands just then raises there: the handler is put back all
    the same, then that KeyboardInterrupt goes on."""
    interrupt = None
    while signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        except KeyboardInterrupt as e:
            interrupt = e
    if interrupt is not None:
        raise interrupt


def _one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError without a message says what it is)."""
    text = str(error) or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
