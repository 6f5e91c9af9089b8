"""The ``tensorboard`` logger: a training run's metrics as event files that TensorBoard reads.

An optional plugin, turned on per run, never by being installed: ``pip install
'arraygpt[tensorboard]'``, then ``arraygpt train --log tensorboard`` and ``tensorboard --logdir
runs``. From Python, register a :class:`TensorBoardLogger` on the run's plugin manager::

    from arraygpt.manager import get_plugin_manager
    from arraygpt.plugins.tensorboard import TensorBoardLogger

    pm = get_plugin_manager()
    logger = TensorBoardLogger()  # or TensorBoardLogger("tb/run-a")
    pm.register(logger)
    arraygpt.train("names", out_dir="runs/a", plugin_manager=pm)
    logger.close()

What it writes: the numbers of the run's records (``run.history``, the lines of metrics.jsonl), each
at its record's step: a ``train`` record's as ``train/loss``, ``train/lr``, ``train/tokens_per_s``
(and ``train/grad_norm`` when clipping), an ``eval`` record's as ``eval/train_loss`` and
``eval/val_loss``. So its curves are metrics.jsonl's, at its cadence (``--log-interval``); writing
the per-step metrics of ``arraygpt_on_step`` instead would give curves that file does not hold, for
about 70 us a step (some 3% of a step of the default microgpt job). The training-event hooks say
when: each step's event writes the records made since the last one; an eval and a checkpoint also
flush the file, so a killed run keeps its events up to its last checkpoint, as its folder keeps the
checkpoint.

Where: ``log_dir``, else the run folder's ``tensorboard/``. Each session of a run (its start, each
resume) writes a new event file, which opens with TensorBoard's "session start" event at the
session's first step: TensorBoard then drops the older events of the steps the session does again
(a resume redoes the steps after its checkpoint), as the resume trims metrics.jsonl.

The event file is written by TensorBoard's own writer (``tensorboard.summary.writer``, as
``torch.utils.tensorboard`` does), record framing and checksums included. Rank 0 alone is called
(``Run.call_hook``), so it alone writes.

Not here: the hooks (``arraygpt.hookspecs``), the records themselves (``arraygpt.training.log``), the
``--log`` option (``arraygpt.cli.train``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from arraygpt.hookspecs import hookimpl

NAME = "tensorboard"
INSTALL = "the tensorboard logger needs the tensorboard package: pip install 'arraygpt[tensorboard]'"
EVENTS = ("train", "eval")  # the records whose numbers become scalars
NOT_SCALARS = ("step", "elapsed")  # the x axis, and TensorBoard's own wall time


def _tensorboard() -> tuple[Any, Any, Any]:
    """TensorBoard's event-file writer and its Event and Summary protocol buffers."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise ImportError(INSTALL) from None
    return EventFileWriter, event_pb2, summary_pb2


class TensorBoardLogger:
    """A plugin that writes a training run's records as TensorBoard scalars (see the module).

    Args:
        log_dir: the folder of the event files; None: ``<run folder>/tensorboard``.

    Raises:
        ImportError: the tensorboard package is missing (says what to install).
    """

    def __init__(self, log_dir: str | Path | None = None):
        self._writer_class, self._event_pb2, self._summary_pb2 = _tensorboard()
        self.log_dir = None if log_dir is None else Path(log_dir)
        self._writer: Any = None
        self._run: Any = None
        self._written = 0  # records of the run's history already written

    @hookimpl
    def arraygpt_on_step(self, run: Any) -> None:
        self._write(run)

    @hookimpl
    def arraygpt_on_eval(self, run: Any) -> None:
        self._write(run)
        self._writer.flush()

    @hookimpl
    def arraygpt_on_checkpoint(self, run: Any) -> None:
        self._write(run)
        self._writer.flush()

    def close(self) -> None:
        """Write the records left (those after the last event) and close the event file."""
        if self._writer is None:
            return
        try:
            self._write(self._run)
        finally:
            self._writer.close()
            self._writer, self._run = None, None

    def _write(self, run: Any) -> None:
        if not run.world.is_root:
            return
        if run is not self._run:  # a new run (or the first): a new event file
            self.close()
            self._open(run)
        history = run.history
        for record in history[self._written :]:
            if record.get("event") in EVENTS:
                self._add_scalars(record)
        self._written = len(history)

    def _open(self, run: Any) -> None:
        folder = self.log_dir
        if folder is None:
            if run.out_dir is None:
                raise ValueError(
                    "the tensorboard logger needs a folder: train with an out_dir, or give TensorBoardLogger(log_dir)"
                )
            folder = Path(run.out_dir) / NAME
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"{folder} is not a folder; the tensorboard logger writes its event files into one")
        start = next((r["step"] for r in run.history if r.get("event") == "start"), run.step)
        self._writer = self._writer_class(str(folder))
        self._run, self._written = run, 0
        # TensorBoard drops the events of steps >= this one from older files (a resume redoes them)
        session_log = self._event_pb2.SessionLog(status=self._event_pb2.SessionLog.START)
        self._writer.add_event(self._event_pb2.Event(wall_time=time.time(), step=start + 1, session_log=session_log))

    def _add_scalars(self, record: dict[str, Any]) -> None:
        Summary = self._summary_pb2.Summary
        values = [
            Summary.Value(tag=f"{record['event']}/{field}", simple_value=float(value))
            for field, value in record.items()
            if field not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        if values:
            event = self._event_pb2.Event(
                wall_time=time.time(), step=int(record["step"]), summary=Summary(value=values)
            )
            self._writer.add_event(event)


@hookimpl
def arraygpt_register_loggers() -> list[dict[str, Any]]:
    return [{NAME: TensorBoardLogger}]
