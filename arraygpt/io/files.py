"""Regular files in, atomic files out: the checks every reader makes before it reads, and the
write that never leaves a half-written file where a good one was."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from arraygpt.errors import CheckpointError

# The file names and size limits every reader shares.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_LIMIT = 1024 * 1024  # bytes; a config.json is a few KB
JSON_LIMIT = 16 * 1024 * 1024  # bytes: far above any config.json, state.json or index file
_KINDS = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
}


def open_regular(path: str | os.PathLike[str], what: str = "file") -> tuple[Any, int]:
    """Open ``path`` for reading if it is a regular file (a symlink to one counts); return the open
    binary file and its size. Never blocks: a FIFO is opened non-blocking and refused.

    Raises:
        CheckpointError: missing, unreadable, or not a regular file (a FIFO, a device, a directory).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the {what} is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: the {what} is a directory; only regular files are read") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open the {what}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
            raise CheckpointError(f"{path}: the {what} is a {kind}, not a regular file; only regular files are read")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


def read_json(path: str | os.PathLike[str], what: str = "JSON file", limit: int = JSON_LIMIT, kind: type = dict) -> Any:
    """Parse a small JSON file safely: a regular file of at most ``limit`` bytes, UTF-8, nesting
    within Python's recursion limit, whose top level is a ``kind`` (a JSON object by default).

    Raises:
        CheckpointError: naming the file, what is wrong and what is allowed.
    """
    f, size = open_regular(path, what)
    with f:
        if size > limit:
            raise CheckpointError(f"{path}: the {what} is {size} bytes; at most {limit} bytes are read")
        data = read_at_most(f, size, limit)
    if len(data) > limit:
        raise CheckpointError(f"{path}: the {what} is over {limit} bytes; at most {limit} bytes are read")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except ValueError as e:  # not JSON, or an integer of over 4300 digits (Python's int limit)
        raise CheckpointError(f"{path}: the {what} is truncated or corrupted (not valid JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the {what} is nested too deeply to be a real {what}") from None
    if not isinstance(value, kind):
        expected = "a JSON object" if kind is dict else f"JSON {kind.__name__}"
        raise CheckpointError(f"{path}: the {what} must hold {expected}, not {type(value).__name__}")
    return value


def read_at_most(f: Any, size: int, limit: int) -> bytes:
    """The bytes of the open file ``f`` of ``size`` bytes (its fstat), up to ``limit + 1`` (one
    more says it grew past the limit). Memory follows the file: ``read(limit + 1)`` would reserve
    the whole limit first, whatever the file holds."""
    data = f.read(min(size, limit) + 1)
    while len(data) <= limit and (more := f.read(min(1 << 20, limit + 1 - len(data)))):
        data += more  # the file grew while it was read
    return data


def write_atomic(path: str | os.PathLike[str], data: bytes | list[bytes]) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
