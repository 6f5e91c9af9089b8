"""Run folders: one training run per folder, its lock, its health checks, and its saved training state.

A run folder holds ``last/`` and ``best/`` (checkpoints written by ``arraygpt.io.checkpoint``),
``metrics.jsonl`` and the lock file ``.arraygpt.lock`` (locked while a run is live). This module gives the
training loop the checks that keep one folder to one run and keep hostile or damaged folders from
crashing it later:

- :func:`lock_run_folder`: an OS advisory lock (``fcntl.flock`` on the lock file), taken before
  anything is written and held for the whole run. The kernel releases it when the process exits,
  however it exits (kill -9 included), so a stale lock never blocks a folder. A second run into
  the folder, fresh or resumed, fails at once naming the folder and the PID that holds it.
- :func:`check_new_run_folder`: a fresh run refuses a folder that already holds a run's files.
- :func:`check_run_folder`: a ``last/`` or ``best/`` that is a symbolic link or not a folder is
  refused (a save would replace the link and then fail on every later save); ``best/`` without
  ``last/`` says how to resume from it; the temporary folders of a save that was killed
  (``.last.tmp-*``, ``.best.tmp-*``) and the temporary file of a killed :func:`trim_metrics`
  are removed, never loaded (only with the lock held, so a live save is never touched).
- :func:`resume_source`: what ``--resume PATH`` continues, and refusing ``--resume DIR/best`` when
  ``DIR/last`` holds a later step (it would overwrite that checkpoint and repeat steps in the
  metrics).
- :func:`trim_metrics`: a resume removes the ``metrics.jsonl`` records after the step it
  continues from (steps it does again), so the file holds each step once. It reads a regular file
  of at most ``MAX_METRICS_BYTES`` only (a FIFO would block, ``/dev/zero`` fill the memory).
- A folder whose run stopped before its first checkpoint (``metrics.jsonl`` and nothing else) is
  refused with the same message by a fresh run and by a resume: there is nothing to resume.
- :func:`check_training_state`: the training state in ``state.json``'s ``extra`` (step, best loss,
  batch sizes...) has the types and ranges a real run writes, so a hostile value is one clear
  ``CheckpointError`` at resume rather than a traceback later. The batcher's own state is checked
  by ``arraygpt.training.data.Batcher.load_state_dict``.

Not here: writing checkpoints (``arraygpt.io.checkpoint``, whose saves are atomic on their own), the
training loop (``arraygpt.training.loop``, which calls these functions). The lock needs ``fcntl``
(Linux, macOS); where it is missing (Windows) :func:`lock_run_folder` locks nothing and says so in
its return value. A lock on a network file system is as reliable as that system's ``flock``.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from arraygpt.errors import RunFolderError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_FILE",
    "RUN_FILES",
    "check_new_run_folder",
    "check_run_folder",
    "check_training_state",
    "lock_run_folder",
    "resume_source",
    "trim_metrics",
]

LOCK_FILE = ".arraygpt.lock"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = ("last", "best")
# names whose presence makes a folder a run: the checkpoints, the folder an interrupted save
# leaves, and the metrics
RUN_FILES = ("last", ".last.old", "best", ".best.old", METRICS_FILE)
MAX_STEPS = 10**15  # far above any real run; a larger saved step is refused as hostile
MAX_METRICS_BYTES = 2**30  # about 7 million records: far above a real run's metrics file


# ----------------------------------------------------------------------------------------------
# the lock


def _holder(lock_path: Path) -> str:
    """The PID written in the lock file, as text ("an unknown process" when unreadable)."""
    try:
        with open(lock_path, encoding="ascii", errors="replace") as f:
            text = f.read(64).strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "an unknown process"


@contextlib.contextmanager
def lock_run_folder(path: str | os.PathLike[str]) -> Iterator[bool]:
    """Hold the run folder's lock for the duration of the ``with`` block.

    The folder (and its parents) is created if needed. The lock is ``flock(LOCK_EX | LOCK_NB)`` on
    ``PATH/.arraygpt.lock``, which holds the owner's PID for the error message of a second run. It
    is released when the block ends and, if the process dies, by the kernel; the lock file itself
    stays (removing it would let two processes lock two different files).

    Args:
        path: the run folder.

    Returns:
        A context manager; its value is True when the folder is locked, False where the platform
        has no ``fcntl`` (nothing is locked there).

    Raises:
        RunFolderError: another process holds the lock (the message names the folder and its PID),
            or the path is not a folder.

    Example:
        >>> import tempfile
        >>> with lock_run_folder(tempfile.mkdtemp()) as locked:
        ...     pass
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run folder {folder} is a file, not a folder; choose another --out-dir")
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield False
        return
    lock_path = folder / LOCK_FILE
    try:
        fd = os.open(
            lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0), 0o644
        )
    except OSError as e:
        raise RunFolderError(f"cannot open the lock file {lock_path} of run folder {folder}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"run folder {folder} is in use by another arraygpt run ({_holder(lock_path)}); wait for it to "
                f"finish or stop it, or train into another --out-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# checks


def check_new_run_folder(path: str | os.PathLike[str]) -> None:
    """Refuse to start a fresh run in a folder that already holds a run (a checkpoint, the folder
    an interrupted save left, or metrics).

    Raises:
        RunFolderError: naming the folder and the run files found in it.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run folder {folder} is a file, not a folder; choose another --out-dir")
    found = [name for name in RUN_FILES if os.path.lexists(folder / name)]
    if found == [METRICS_FILE]:
        raise RunFolderError(_never_saved(folder, f"{folder} holds"))
    if found:
        raise RunFolderError(
            f"{folder} already holds a run ({', '.join(found)}); continue it with --resume {folder} "
            f"or choose another --out-dir"
        )


def check_run_folder(path: str | os.PathLike[str], *, clean: bool = True) -> list[Path]:
    """Check a run folder before a resume or the first save of a run, and remove the leftovers of
    a killed save.

    Call it with the folder's lock held (:func:`lock_run_folder`), so that ``clean`` never
    removes the temporary folder of a save in progress.

    Args:
        path: the run folder.
        clean: remove the temporary folders ``.last.tmp-*`` and ``.best.tmp-*`` a killed save left
            (a symbolic link among them is unlinked, never followed), and the file
            ``.metrics.jsonl.*.tmp`` a killed :func:`trim_metrics` left.

    Returns:
        The leftover paths removed (or found, with ``clean=False``).

    Raises:
        RunFolderError: ``last/``, ``best/`` or their ``.old`` folders are a symbolic link or not a
            folder; the message names the path and says what to do.
    """
    folder = Path(path)
    for name in CHECKPOINTS:
        for candidate in (folder / name, folder / f".{name}.old"):
            if candidate.is_symlink():
                raise RunFolderError(
                    f"{candidate} is a symbolic link; arraygpt replaces {name}/ at every save and keeps it a real "
                    f"folder: move the link away (the checkpoint it points to can be resumed with --resume TARGET)"
                )
            if candidate.exists() and not candidate.is_dir():
                raise RunFolderError(
                    f"{candidate} is not a folder; a run's {name}/ is a checkpoint folder: move it away"
                )
    leftovers = sorted(p for name in CHECKPOINTS for p in folder.glob(f".{name}.tmp-*"))
    leftovers += sorted(folder.glob(f".{METRICS_FILE}.*.tmp"))  # of a killed trim_metrics
    if clean:
        for p in leftovers:
            if p.is_symlink() or not p.is_dir():
                p.unlink(missing_ok=True)
            else:
                shutil.rmtree(p, ignore_errors=True)
    return leftovers


def _saved_step(checkpoint: Path) -> int | None:
    """The training step saved in ``checkpoint/state.json`` (None when there is none to read)."""
    from arraygpt.io.checkpoint import STATE_FILE
    from arraygpt.io.files import read_json

    state_path = checkpoint / STATE_FILE
    if not state_path.is_file():
        return None
    extra = read_json(state_path, what="checkpoint state.json").get("extra")
    step = extra.get("step") if isinstance(extra, Mapping) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _never_saved(folder: Path, start: str) -> str:
    """The one message for a folder whose run stopped before its first checkpoint (a fresh run
    into it and a resume of it both get it)."""
    return (
        f"{start} the {METRICS_FILE} of a run that stopped before its first checkpoint, so there is nothing to "
        f"resume; to start a new run there, remove {folder / METRICS_FILE} (or choose another --out-dir)"
    )


def resume_source(resume: str | os.PathLike[str]) -> tuple[Path, Path]:
    """What ``--resume PATH`` continues: (the run folder, the checkpoint folder to load).

    PATH is a run folder (its ``last/``, or ``.last.old`` after a save interrupted between its
    renames), or one of its checkpoints (``DIR/last``, ``DIR/best``), whose run folder is DIR.
    ``DIR/best`` is refused while ``DIR/last`` holds a later step: continuing from best would
    overwrite that later checkpoint and repeat its steps in the metrics.

    Raises:
        FileNotFoundError: PATH does not exist.
        RunFolderError: PATH is not a run folder or checkpoint, has ``best/`` but no ``last/`` (the
            message says to resume ``DIR/best``), or is ``DIR/best`` behind ``DIR/last``.
    """
    from arraygpt.io.checkpoint import CONFIG_FILE

    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"--resume {resume}: no such run folder")
    if (path / CONFIG_FILE).is_file() and path.name in ("last", "best", ".last.old", ".best.old"):
        run_dir, source = path.parent, path
    else:
        run_dir, source = path, path
    check_run_folder(run_dir, clean=False)
    if source is run_dir:
        if not ((path / "last").is_dir() or (path / ".last.old").is_dir()):
            if (path / "best").is_dir():
                raise RunFolderError(
                    f"--resume {resume}: the run folder has best/ but no last/; resume from the best checkpoint "
                    f"with --resume {path / 'best'}"
                )
            if os.path.lexists(path / METRICS_FILE):
                raise RunFolderError(_never_saved(path, f"--resume {resume}: the folder holds"))
            raise RunFolderError(f"--resume {resume}: not a run folder (it has no last/ checkpoint)")
        return run_dir, source
    if source.name.lstrip(".").startswith("best"):
        last = run_dir / "last" if (run_dir / "last").is_dir() else run_dir / ".last.old"
        best_step, last_step = _saved_step(source), _saved_step(last) if last.is_dir() else None
        if last_step is not None and best_step is not None and last_step > best_step:
            raise RunFolderError(
                f"--resume {resume}: {last} holds step {last_step}, later than best's step {best_step}; resuming "
                f"from best would overwrite it and repeat those steps. Continue the run with --resume {run_dir}, "
                f"or copy {source} into a new folder and resume that"
            )
    return run_dir, source


# ----------------------------------------------------------------------------------------------
# the metrics of a resumed run


def _record_step(line: bytes) -> int | None:
    """The integer ``step`` of one metrics.jsonl line (None when it is not a record with one)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if _integer(step) else None


def trim_metrics(path: str | os.PathLike[str], step: int) -> int:
    """Make a run folder's ``metrics.jsonl`` end at ``step``, the step a resumed run continues
    from: remove the records of later steps (the resumed run does those steps again and records
    them anew) and an unfinished last line (a write cut off by a kill). The file is replaced
    atomically, and only when something is removed; lines that are not records with a step are
    kept as they are.

    Call it with the folder's lock held (:func:`lock_run_folder`).

    Args:
        path: the run folder.
        step: the step of the checkpoint being resumed.

    Returns:
        The number of lines removed (0 when there is no metrics.jsonl).

    Raises:
        RunFolderError: metrics.jsonl is not a regular file (a FIFO, a device, a link to one) or
            is larger than ``MAX_METRICS_BYTES``.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "metrics.jsonl").write_text('{"step": 5}\\n{"step": 10}\\n{"step": 15}\\n')
        >>> trim_metrics(folder, 10), (folder / "metrics.jsonl").read_text()
        (1, '{"step": 5}\\n{"step": 10}\\n')
    """
    from arraygpt.io.files import write_atomic

    metrics = Path(path) / METRICS_FILE
    if not os.path.lexists(metrics):
        return 0
    data = _read_metrics(metrics)
    *lines, unfinished = data.split(b"\n")  # "" after a final newline
    kept = [line for line in lines if (s := _record_step(line)) is None or s <= step]
    removed = len(lines) - len(kept) + bool(unfinished)
    if removed:
        write_atomic(metrics, [line + b"\n" for line in kept])
    return removed


def _read_metrics(metrics: Path) -> bytes:
    """The bytes of a run's metrics file: a regular file of at most MAX_METRICS_BYTES, never a
    FIFO (which would block) or a device (``/dev/zero`` would fill the memory)."""
    from arraygpt.io.files import open_regular

    try:
        f, size = open_regular(metrics, "run's metrics file")
    except ValueError as e:
        raise RunFolderError(f"{e}; move it away to resume the run") from None
    with f:
        if size > MAX_METRICS_BYTES:
            raise RunFolderError(
                f"{metrics} is {size:,} bytes, more than the {MAX_METRICS_BYTES:,} a run's metrics file may hold; "
                "move it away to resume the run"
            )
        return f.read(MAX_METRICS_BYTES + 1)[:MAX_METRICS_BYTES]


# ----------------------------------------------------------------------------------------------
# the training state saved in state.json's "extra"


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_training_state(extra: Any, path: str | os.PathLike[str]) -> None:
    """Check the training state a checkpoint's ``state.json`` holds under ``extra``, as
    ``Run.state`` writes it, before a resume uses any of it.

    Checked: ``extra`` is an object with ``train_config`` (an object) and ``data`` (an object;
    ``Batcher.load_state_dict`` checks its contents); ``step`` an integer in [0, train_config's
    ``steps``] (when that is an integer); ``best_val_loss`` null or a finite number;
    ``world_size`` and ``global_batch`` positive integers when present; ``data_sha256`` a string
    when present; ``kind`` ``last`` or ``best`` when present.

    Args:
        extra: ``Checkpoint.extra``.
        path: the checkpoint folder, named in the message.

    Raises:
        CheckpointError: naming ``PATH/state.json``, the field, its value and what is allowed.
    """
    from arraygpt.errors import CheckpointError

    where = f"{Path(path) / 'state.json'}"

    def bad(field: str, value: Any, allowed: str) -> CheckpointError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return CheckpointError(f"{where}: the training state's {field} is {shown}; it must be {allowed}")

    if not isinstance(extra, Mapping):
        raise bad("extra", extra, "a JSON object")
    for key in ("train_config", "data"):
        if key not in extra:
            raise CheckpointError(f"{where}: not a training checkpoint (its training state has no {key!r})")
        if not isinstance(extra[key], Mapping):
            raise bad(key, extra[key], "a JSON object")
    steps = extra["train_config"].get("steps")
    step = extra.get("step")
    if not _integer(step) or step < 0 or step > MAX_STEPS:
        raise bad("step", step, f"an integer in [0, {MAX_STEPS}]")
    if _integer(steps) and step > steps:
        raise bad("step", step, f"at most the run's steps ({steps})")
    best = extra.get("best_val_loss")
    if best is not None and (isinstance(best, bool) or not isinstance(best, numbers.Real) or not math.isfinite(best)):
        raise bad("best_val_loss", best, "null or a finite number")
    for key in ("world_size", "global_batch"):
        if key in extra and extra[key] is not None and (not _integer(extra[key]) or not 1 <= extra[key] <= MAX_STEPS):
            raise bad(key, extra[key], f"a positive integer (at most {MAX_STEPS})")
    if "data_sha256" in extra and not isinstance(extra["data_sha256"], str):
        raise bad("data_sha256", extra["data_sha256"], "a string (the data's sha256)")
    if "kind" in extra and extra["kind"] not in CHECKPOINTS:
        raise bad("kind", extra["kind"], "'last' or 'best'")
