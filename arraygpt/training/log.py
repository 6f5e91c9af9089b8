"""What a training run tells: the records of ``metrics.jsonl``, the printed lines and the progress
line (elapsed time and ETA), and the meter that averages the loss and the throughput between two
progress lines.

Rank 0 alone prints and writes (the other ranks keep their records in memory only). The metrics
file is opened for appending only when it is a regular file (or absent): a FIFO, a device or a
link to one is refused with :class:`arraygpt.errors.RunFolderError`, never waited on.

Not here: what the records say about the run's state (``arraygpt.training.loop``), reading and
trimming the file on resume (``arraygpt.training.runfolder.trim_metrics``).
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from arraygpt.errors import RunFolderError

__all__ = ["METRICS_FILE", "Log", "Meter", "format_duration"]

METRICS_FILE = "metrics.jsonl"


def format_duration(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``; ``?`` when not finite.

    Example:
        >>> format_duration(75.4), format_duration(3725), format_duration(float("inf"))
        ('1:15', '1:02:05', '?')
    """
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Log:
    """The run's records and output.

    Args:
        out_dir: the run folder whose ``metrics.jsonl`` gets the records (None: none is written).
        is_root: rank 0 (the only rank that prints and writes).
        progress: print lines at all.
        stream: where to print (default stdout); a terminal gets a progress bar redrawn in place.

    Attributes:
        history: every record of this process, as written to metrics.jsonl.
    """

    def __init__(
        self, out_dir: Path | None, *, is_root: bool = True, progress: bool = True, stream: TextIO | None = None
    ):
        self.out_dir = out_dir
        self.is_root = is_root
        self.progress = progress and is_root
        self.stream = stream or sys.stdout
        self.history: list[dict[str, Any]] = []
        self._bar_open = False

    def record(self, record: dict[str, Any]) -> None:
        """Keep ``record`` and append it to metrics.jsonl (rank 0, with a run folder)."""
        self.history.append(record)
        if self.out_dir is not None and self.is_root:
            _append_line(self.out_dir / METRICS_FILE, json.dumps(record) + "\n")

    def print(self, text: str) -> None:
        if self.progress:
            self.end_bar()
            print(text, file=self.stream, flush=True)

    def progress_line(
        self, step: int, total: int, loss: float, lr: float, tokens_per_s: float, elapsed: float, eta: float
    ) -> None:
        """``[####......] step 50/100  loss 2.3104  lr 1.00e-02  12,345 tok/s  0:12 elapsed, ETA 0:12``"""
        if not self.progress:
            return
        width = 20
        filled = int(width * min(step, total) / total)
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {step:>{len(str(total))}}/{total}  "
            f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
            f"{format_duration(elapsed)} elapsed, ETA {format_duration(eta)}"
        )
        if self.stream.isatty():
            print("\r" + line, end="", file=self.stream, flush=True)
            self._bar_open = True
        else:
            print(line, file=self.stream, flush=True)

    def end_bar(self) -> None:
        """End the progress bar's line (on a terminal), so the next text starts a new one."""
        if self._bar_open:
            print(file=self.stream, flush=True)
            self._bar_open = False


def _append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` if it is a regular file or absent (created); never blocks on a
    FIFO, never writes into a device."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:  # a FIFO without a reader (ENXIO), a folder...
        raise RunFolderError(
            f"{path}: cannot append the run's metrics: {e.strerror}; it must be a regular file"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RunFolderError(f"{path} is not a regular file; move it away (a run's metrics file is a regular file)")
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


class Meter:
    """Loss and throughput between two progress lines, and the time of the whole session.

    Args:
        first_step: the step the session starts at (a resumed run's), for the ETA.
    """

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.start = time.perf_counter()
        self._since, self._tokens, self._losses = self.start, 0, []

    def add(self, loss: float, tokens: int) -> None:
        self._losses.append(loss)
        self._tokens += tokens

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, step: int, total: int) -> float:
        """Seconds to step ``total`` at this session's mean time per step (inf before a step)."""
        done = step - self.first_step
        return self.elapsed() / done * (total - step) if done > 0 else math.inf

    def take(self) -> tuple[float, float]:
        """The mean loss and tokens per second since the last call; starts the next interval."""
        now = time.perf_counter()
        loss = float(np.mean(self._losses)) if self._losses else math.nan
        tokens_per_s = self._tokens / (now - self._since) if now > self._since else 0.0
        self._since, self._tokens, self._losses = now, 0, []
        return loss, tokens_per_s
