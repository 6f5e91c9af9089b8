"""arraygpt's error for files it cannot read: one class, shared by every reader.

A :class:`CheckpointError` says which file (or folder) is wrong, what is wrong with it and what
would have been accepted. It is a ``ValueError``, so code that catches ``ValueError`` keeps
working. The checkpoint, interop, safetensors and tokenizer readers all raise it (the safetensors
reader's ``SafetensorsError`` is a subclass).

Not here: errors of arguments (plain ``ValueError``/``TypeError``), of data (``training.DataError``)
or of plugins (``manager.PluginError``).
"""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint or model file/folder is missing, truncated, corrupted, hostile or of an unknown
    format; the message names the file, what is wrong and what is allowed.

    Example:
        >>> issubclass(CheckpointError, ValueError)
        True
    """
