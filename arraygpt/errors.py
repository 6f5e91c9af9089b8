"""Every exception class of arraygpt, in one place, so that any layer can raise one and a caller
can catch one without importing the layer that raises it.

A :class:`CheckpointError` says which file (or folder) is wrong, what is wrong with it and what
would have been accepted; it is a ``ValueError``, so code that catches ``ValueError`` keeps
working. Errors of arguments stay plain ``ValueError``/``TypeError``.
"""

from __future__ import annotations

__all__ = ["BackendUnavailable", "CheckpointError", "PluginError"]


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
