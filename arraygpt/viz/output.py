"""Where pictures and pages go: one atomic write per file, and errors that name the file.

A picture or page is rendered in memory first, then written with ``arraygpt.io.files.write_atomic``
(a temporary file in the same folder, fsync, rename), so a full disk, a kill or a bad path leaves
the file that was there untouched and no temporary file behind. Only a regular file (or a new
name) is written: a folder, a FIFO or a device at the path is refused before anything is rendered
or written. A symbolic link to a file is replaced by the new file, not written through.

Not here: rendering (``arraygpt.viz.figures``, ``arraygpt.viz.page``).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from arraygpt.io.files import write_atomic

_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _error(message: str, cause: OSError) -> OSError:
    """An OSError whose text is ``message`` alone (no ``[Errno N]`` prefix) but keeps the errno."""
    error = OSError(message)
    error.errno = cause.errno
    return error


def check_output(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` as a Path, refused unless it is a regular file or does not exist yet.

    Raises:
        OSError: ``path`` is a folder, FIFO, device or socket (or cannot be looked at); the
            message names it and says what is written.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise _error(f"cannot write the {what} {path}: {e.strerror}", e) from e
    if not stat.S_ISREG(st.st_mode):
        kind = _KINDS.get(stat.S_IFMT(st.st_mode), "not a regular file")
        error = OSError(f"{path} is {kind}; the {what} is written only to a regular file: give a file name")
        error.errno = errno.EISDIR if stat.S_ISDIR(st.st_mode) else None
        raise error
    return path


def write_output(path: str | os.PathLike[str], data: bytes, what: str) -> Path:
    """Write ``data`` to ``path`` atomically, creating its folder; returns the path.

    Raises:
        OSError: the path is not a regular file, its folder cannot be made, or the write failed
            (a full disk: the message names the path and says the file there is unchanged).
    """
    path = check_output(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _error(f"cannot make the folder {path.parent} for the {what} {path}: {e.strerror or e}", e) from e
    existed = path.exists()
    try:
        write_atomic(path, data)
    except OSError as e:
        kept = f"; the {path.name} that was there is unchanged" if existed else "; nothing was written"
        raise _error(f"cannot write the {what} {path}: {e.strerror or e}{kept}", e) from e
    return path
