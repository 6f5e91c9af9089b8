"""Read and write the safetensors format with NumPy alone: never pickle, never execute anything.

Layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the raw little-endian tensor bytes. Writes are atomic: a temporary file in the same folder is
written, flushed to disk and renamed over the target, so a crash leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
    "U64": np.uint64, "BOOL": np.bool_,
}  # fmt: skip
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(CheckpointError):
    """The file is not a valid safetensors file (truncated, corrupted, hostile, or an unsupported dtype)."""


JSON_LIMIT = 16 * 1024 * 1024  # bytes: far above any config.json, state.json or index file
_KINDS = {stat.S_IFDIR: "directory", stat.S_IFIFO: "FIFO (named pipe)", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}  # fmt: skip


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


def read_json(path: str | os.PathLike[str], what: str = "JSON file", limit: int = JSON_LIMIT,
              kind: type = dict) -> Any:  # fmt: skip
    """Parse a small JSON file safely: a regular file of at most ``limit`` bytes, UTF-8, nesting
    within Python's recursion limit, whose top level is a ``kind`` (a JSON object by default).

    Raises:
        CheckpointError: naming the file, what is wrong and what is allowed.
    """
    f, size = open_regular(path, what)
    with f:
        if size > limit:
            raise CheckpointError(f"{path}: the {what} is {size} bytes; at most {limit} bytes are read")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: the {what} is over {limit} bytes; at most {limit} bytes are read")
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the {what} is truncated or corrupted (not valid JSON: {e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: the {what} is nested too deeply to be a real {what}") from None
    if not isinstance(value, kind):
        expected = "a JSON object" if kind is dict else f"JSON {kind.__name__}"
        raise CheckpointError(f"{path}: the {what} must hold {expected}, not {type(value).__name__}")
    return value


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


def save_file(tensors: Mapping[str, Any], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> None:
    """Write name -> host array (anything ``np.asarray`` takes) to ``path`` atomically."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        if array.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} cannot be stored; allowed: {sorted(_DTYPES)}")
        raw = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data to 8 bytes
    write_atomic(path, [struct.pack("<Q", len(encoded)), encoded, *chunks])


def _read_header(f: Any, path: Path, size: int) -> tuple[dict[str, Any], int]:
    prefix = f.read(8)
    if len(prefix) < 8:
        raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", prefix)
    if n > min(size - 8, _MAX_HEADER):
        raise SafetensorsError(f"{path}: corrupted or truncated safetensors file (header of {n} bytes in a {size}-byte file)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupted safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: corrupted safetensors header (not a JSON object)")
    return header, 8 + n


def load_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file into host NumPy arrays.

    Raises:
        FileNotFoundError: there is no such file.
        SafetensorsError: the file is truncated, corrupted, or holds an unsupported dtype.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path, size)
        data = bytearray(size - data_start)  # one buffer; the tensors are views of it, not copies
        n_read = f.readinto(data)
    del data[n_read:]
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SafetensorsError(f"{path}: corrupted entry for tensor {name!r}: {info!r}") from None
        if dtype_name == "BF16":  # NumPy has no bfloat16: widen to float32 (bf16 is float32's top half)
            dtype, itemsize = None, 2
        elif dtype_name in _DTYPES:
            dtype = np.dtype(_DTYPES[dtype_name]).newbyteorder("<")
            itemsize = dtype.itemsize
        else:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= begin <= end <= len(data)) or end - begin != count * itemsize:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({dtype_name} {list(shape)}) has data offsets [{begin}, {end}] that do not fit "
                f"the file ({size - data_start} data bytes): the file is truncated or corrupted"
            )
        if dtype is None:
            raw = np.frombuffer(data, dtype="<u2", count=count, offset=begin)
            array = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(data, dtype=dtype, count=count, offset=begin)
            if not dtype.isnative:
                array = array.astype(dtype.newbyteorder("="))
        tensors[name] = array.reshape(shape)
    return tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty if it has none)."""
    path = Path(path)
    with open(path, "rb") as f:
        header, _ = _read_header(f, path, path.stat().st_size)
    return dict(header.get("__metadata__") or {})
