"""Read and write the safetensors format with NumPy alone: never pickle, never execute anything.

Layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the raw little-endian tensor bytes. Writes are atomic: a temporary file in the same folder is
written, flushed to disk and renamed over the target, so a crash leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
    "U64": np.uint64, "BOOL": np.bool_,
}  # fmt: skip
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file (truncated, corrupted, or an unsupported dtype)."""


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
