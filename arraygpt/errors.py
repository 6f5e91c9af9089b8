"""Every exception class of arraygpt, in one place, so that any layer can raise one and a caller
can catch one without importing the layer that raises it.

A :class:`CheckpointError` says which file (or folder) is wrong, what is wrong with it and what
would have been accepted; it is a ``ValueError``, so code that catches ``ValueError`` keeps
working. Errors of arguments stay plain ``ValueError``/``TypeError``.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "CheckpointError",
    "CollectiveTimeout",
    "DataError",
    "KernelUnavailable",
    "PluginError",
    "RunFolderError",
    "TrainingDiverged",
]


class CheckpointError(ValueError):
    """A checkpoint or model file/folder is missing, truncated, corrupted, hostile or of an unknown
    format; the message names the file, what is wrong and what is allowed.

    Example:
        >>> issubclass(CheckpointError, ValueError)
        True
    """


class BackendUnavailable(RuntimeError):
    """A backend that is registered but cannot run here (library or device missing)."""


class PluginError(RuntimeError):
    """A plugin misbehaved: it raised, offered a name another plugin already offers, or has a hook
    that no spec declares."""


class DataError(ValueError):
    """The data cannot be used for training as asked (not a regular file, too large, not UTF-8 text,
    empty, too short, unknown characters...); the message names the file or value, what is wrong
    and what is allowed."""


class RunFolderError(ValueError):
    """A run folder cannot be used as asked: another run holds it, it already holds a run, or its
    ``last/`` or ``best/`` is damaged; the message names the folder, what is wrong and what to do.

    Example:
        >>> issubclass(RunFolderError, ValueError)
        True
    """


class CollectiveTimeout(RuntimeError):
    """A collective of a multi-process run waited longer than the timeout for the other ranks."""


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; the run stopped without saving.

    Attributes:
        run: the training run (``arraygpt.training.run.Run``), as it was before the failed step.
    """

    def __init__(self, message: str, run: object):
        super().__init__(message)
        self.run = run


class KernelUnavailable(RuntimeError):
    """A registered kernel cannot run here: its ``load`` raises this with what is missing (e.g.
    numba), and the reference layer runs instead (``arraygpt.nn.kernels``)."""
