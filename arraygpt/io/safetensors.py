"""Read and write the safetensors format, and read small JSON files safely: never pickle, never
execute anything, never hang on a special file, never allocate more than a file really holds.

Layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the raw little-endian tensor bytes. Writes are atomic: a temporary file in the same folder is
written, flushed to disk and renamed over the target, so a crash leaves the old file intact.

Reading checks the header as the reference ``safetensors`` library does (header size limit, JSON
object, no duplicate names, known dtypes, integer non-negative shapes that NumPy can make, an
empty one too, byte sizes that match, offsets that are sorted, contiguous and cover the data
exactly, ``__metadata__`` str -> str), with
messages that name the file and the rule, then reads the tensors with that library's NumPy API;
bfloat16, which NumPy lacks, is widened to float32 here. :func:`open_regular` and
:func:`read_json` are the checked openers every arraygpt reader uses for its files.

Not here: what the tensors mean (``arraygpt.io.checkpoint``, ``arraygpt.io.hf``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.errors import CheckpointError
from arraygpt.io.files import open_regular, write_atomic

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "U16": np.uint16,
    "U32": np.uint32,
    "U64": np.uint64,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_MAX_HEADER = 100_000_000  # bytes: the reference library's limit


class SafetensorsError(CheckpointError):
    """The file is not a valid safetensors file (truncated, corrupted, hostile, or an unsupported dtype)."""


def save_file(
    tensors: Mapping[str, Any], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> None:
    """Write name -> host array (anything ``np.asarray`` takes) to ``path`` atomically."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    chunks, offset = [], 0
    for name, value in tensors.items():
        array = np.asarray(value)  # (np.ascontiguousarray would make a 0-d array 1-d)
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)  # big-endian arrays too
        if array.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {array.dtype} cannot be stored; allowed: {sorted(_DTYPES)}")
        raw = array.tobytes()  # C order, whatever the array's
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # align the data to 8 bytes
    write_atomic(path, [struct.pack("<Q", len(encoded)), encoded, *chunks])


# ----------------------------------------------------------------------------------------------
# reading: arraygpt's checks (the reference library's rules, with messages that name the file and
# the rule), then the reference library's NumPy API for the tensors it can give NumPy


_ITEMSIZE = {**{name: np.dtype(t).itemsize for name, t in _DTYPES.items()}, "BF16": 2}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


class _Duplicate(Exception):
    pass


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_header(f: Any, path: Path, size: int) -> tuple[dict[str, Any], int]:
    """The parsed header (duplicates refused) and where the data starts; reads at most the header."""
    if size < 8:
        raise SafetensorsError(
            f"{path}: truncated safetensors file ({size} bytes; at least the 8-byte header size is needed)"
        )
    (n,) = struct.unpack("<Q", f.read(8))
    if n > _MAX_HEADER:
        raise SafetensorsError(
            f"{path}: safetensors header of {n} bytes; "
            f"at most {_MAX_HEADER} bytes are allowed (corrupted or hostile file)"
        )
    if 8 + n > size:
        raise SafetensorsError(
            f"{path}: truncated or corrupted safetensors file (header of {n} bytes in a {size}-byte file)"
        )
    raw = f.read(n)
    if len(raw) < n:
        raise SafetensorsError(f"{path}: truncated safetensors file (the file shrank while it was read)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _Duplicate as e:
        raise SafetensorsError(
            f"{path}: corrupted safetensors header: the name {e.args[0]!r} appears twice; names must be unique"
        ) from None
    except UnicodeDecodeError as e:
        raise SafetensorsError(
            f"{path}: corrupted safetensors header: not UTF-8 ({e.reason} at byte {8 + e.start})"
        ) from None
    except ValueError as e:  # not JSON, or an integer of over 4300 digits (Python's int limit)
        raise SafetensorsError(f"{path}: corrupted safetensors header (not valid JSON: {e})") from None
    except RecursionError:
        raise SafetensorsError(f"{path}: corrupted safetensors header: JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise SafetensorsError(
            f"{path}: corrupted safetensors header (a JSON object is required, not {type(header).__name__})"
        )
    return header, 8 + n


def _check_metadata(header: Mapping[str, Any], path: Path) -> dict[str, str]:
    metadata = header.get("__metadata__")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: corrupted safetensors header: __metadata__ must map strings to strings")
    return dict(metadata)


def _check_entries(
    header: Mapping[str, Any], path: Path, data_size: int
) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype, shape, begin, end) of every tensor, in data order, after the reference
    library's rules: known dtype, non-negative integer shape, byte size = product of the shape x
    item size, offsets sorted, contiguous from 0, non-overlapping, covering the data exactly."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise SafetensorsError(f"{what}: corrupted entry (needs dtype, shape and data_offsets): {info!r:.200}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise SafetensorsError(
                f"{what} has unsupported dtype {dtype!r:.40}; allowed: {', '.join(sorted(_ITEMSIZE))}"
            )
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SafetensorsError(f"{what}: shape must be a list of non-negative integers, not {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
            raise SafetensorsError(f"{what}: data_offsets must be two non-negative integers, not {offsets!r:.200}")
        begin, end = offsets
        count = 1
        for d in shape:  # as the reference does: the element count must fit 64 bits at every step
            count *= d
            if count >= 2**64:
                raise SafetensorsError(f"{what}: shape {shape!r:.100} overflows a 64-bit element count")
        nbytes = count * _ITEMSIZE[dtype]
        if nbytes >= 2**64:
            raise SafetensorsError(f"{what}: shape {shape!r:.100} overflows a 64-bit byte size")
        extent = _ITEMSIZE[dtype]
        for d in shape if count == 0 else ():  # NumPy sizes even an empty array by its other dimensions
            extent *= max(d, 1)
            if extent >= 2**63:
                raise SafetensorsError(
                    f"{what}: shape {shape!r:.100} holds no elements, but NumPy makes no array whose nonzero "
                    "dimensions times the item size reach 2^63 bytes"
                )
        if begin > end or end - begin != nbytes:
            raise SafetensorsError(
                f"{what} ({dtype} {shape!r:.100}) has data offsets [{begin}, {end}] but needs {nbytes} bytes: "
                "the file is truncated or corrupted"
            )
        entries.append((name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    position = 0
    for name, _, _, begin, end in entries:
        if begin != position:
            problem = (
                "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            )
            raise SafetensorsError(
                f"{path}: tensor {name!r} at data offset {begin} {problem}; tensors must be contiguous and "
                "must not share bytes (corrupted or hostile file)"
            )
        position = end
    if position != data_size:
        problem = (
            f"{data_size - position} bytes after the last tensor"
            if position < data_size
            else f"only {data_size} data bytes"
        )
        raise SafetensorsError(
            f"{path}: the tensors cover {position} bytes but the file has {problem}; they must cover the data exactly "
            "(truncated or corrupted file)"
        )
    return entries


def _reference() -> Any:
    try:
        import safetensors as reference
    except ImportError as e:  # a runtime dependency: this is a broken installation
        raise ImportError(
            "arraygpt reads safetensors files with the 'safetensors' library: pip install safetensors"
        ) from e
    return reference


def load_file(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file into host NumPy arrays, each in its own memory.

    The header is checked first, with the reference library's rules and a message naming the
    file and the rule; the tensors are then read with the reference ``safetensors`` library's
    NumPy API, except bfloat16, which NumPy lacks and which is widened to float32 here (exactly:
    bfloat16 is the top half of a float32).

    Raises:
        FileNotFoundError: there is no such file.
        SafetensorsError: (a CheckpointError) not a regular file, truncated, corrupted, hostile,
            or an unsupported dtype.
    """
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: no such safetensors file")
    f, size = open_regular(path, "safetensors file")
    with f:
        header, data_start = _read_header(f, path, size)
        _check_metadata(header, path)
        entries = _check_entries(header, path, size - data_start)
        reference = _reference()
        tensors: dict[str, np.ndarray] = {}
        try:
            with reference.safe_open(str(path), framework="np") as st:
                if set(st.keys()) != {e[0] for e in entries}:
                    raise SafetensorsError(
                        f"{path}: the safetensors library reads other tensor names than the header lists"
                    )
                for name, dtype, shape, begin, end in entries:
                    if dtype == "BF16":
                        f.seek(data_start + begin)
                        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
                        array = (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
                    else:
                        array = np.asarray(st.get_tensor(name))
                        if not array.flags.writeable or not array.flags.c_contiguous:
                            array = array.copy()
                        if array.dtype != np.dtype(_DTYPES[dtype]) or array.shape != shape:
                            raise SafetensorsError(f"{path}: tensor {name!r} read as {array.dtype} {array.shape}")
                    tensors[name] = array
        except reference.SafetensorError as e:
            raise SafetensorsError(f"{path}: the safetensors library rejects the file: {e}") from None
    return tensors


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty if it has none)."""
    path = Path(path)
    f, size = open_regular(path, "safetensors file")
    with f:
        header, _ = _read_header(f, path, size)
    return _check_metadata(header, path)
