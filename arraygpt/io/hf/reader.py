"""One reader for Hugging Face model directories, whatever the architecture: the checks every
transformers directory gets before a tensor is mapped (``config.json`` a regular file of at most
1 MB holding a JSON object; ``model.safetensors``, or a ``model.safetensors.index.json`` whose
shards are plain file names, each tensor in exactly one shard and where the index says; pickle
weights refused with the command that converts them; FIFOs and devices refused without blocking),
and ``generation_config.json``'s sampling defaults.

Per architecture (``arraygpt.io.hf.gpt2``, ``arraygpt.io.hf.llama``) there is only the mapping of
config.json onto GPTConfig and the table of tensor names, as nanoGPT's ``from_pretrained`` keeps.

Deliberately not here: downloads, pickle files, tokenizers (``arraygpt.io.bpe``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.errors import CheckpointError
from arraygpt.io.files import CONFIG_FILE, CONFIG_LIMIT, WEIGHTS_FILE, read_json
from arraygpt.io.safetensors import load_file

__all__ = [
    "GENERATION_CONFIG_FILE",
    "WEIGHTS_INDEX_FILE",
    "read_config",
    "read_generation_config",
    "read_tensors",
]

WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_INDEX_LIMIT = 64 * 1024 * 1024  # bytes; the index of a 1000-layer model is a few MB

_CONVERT_HINT = (
    "arraygpt never unpickles a checkpoint. Convert it to safetensors once, with transformers and a "
    "file you trust:\n"
    '    python -c "from transformers import AutoModelForCausalLM; '
    "AutoModelForCausalLM.from_pretrained('{d}').save_pretrained('{d}')\"\n"
    "(transformers 5 writes safetensors by default; older versions need safe_serialization=True), then load "
    "{d}/model.safetensors."
)


def _check_directory(directory: Path, what: str) -> None:
    if not directory.exists():
        raise FileNotFoundError(
            f"{directory}: no such directory (expected a transformers {what} directory with {CONFIG_FILE} "
            f"and {WEIGHTS_FILE})"
        )
    if not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is a file; pass the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}"
        )


def read_config(directory: str | os.PathLike[str], what: str = "model") -> dict[str, Any]:
    """The parsed ``config.json`` of a transformers directory (a regular file, at most 1 MB, a JSON object).

    Raises:
        FileNotFoundError: the directory or its config.json is missing.
        CheckpointError: config.json is not a regular file, too large, or not a JSON object.
    """
    directory = Path(directory)
    _check_directory(directory, what)
    path = directory / CONFIG_FILE
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_FILE} (a transformers {what} directory has {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    return read_json(path, what=f"{what} config", limit=CONFIG_LIMIT)


def read_tensors(directory: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], str]:
    """Every tensor of a transformers directory's safetensors weights, and the file they were read
    from (``model.safetensors``, or ``model.safetensors.index.json`` for shards).

    Raises:
        FileNotFoundError: neither weights file exists (and no pickle weights either).
        CheckpointError: pickle weights only (the message says how to convert them); a weights
            file that is not a regular file; an index that is not a JSON object with a non-empty
            ``weight_map`` of tensor name -> plain file name; a shard missing; a tensor in two
            shards, in a shard the index does not map it to, or mapped to a shard that lacks it.
    """
    directory = Path(directory)
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX_FILE
    if os.path.lexists(single):  # a FIFO or device here is refused by load_file, never blocked on
        return load_file(single), str(single)
    if os.path.lexists(index):
        return _read_shards(directory, index), str(index)
    pickles = [name for name in PICKLE_FILES if (directory / name).is_file()]
    pickles += sorted(p.name for p in directory.glob("*") if p.suffix in _PICKLE_SUFFIXES and p.name not in pickles)
    if pickles:
        raise CheckpointError(
            f"{directory} holds pickle weights ({', '.join(pickles)}) and no {WEIGHTS_FILE}. "
            + _CONVERT_HINT.format(d=directory)
        )
    raise FileNotFoundError(
        f"{directory} has no {WEIGHTS_FILE} (nor a sharded {WEIGHTS_INDEX_FILE}); arraygpt reads safetensors only"
    )


def _read_shards(directory: Path, index: Path) -> dict[str, np.ndarray]:
    weight_map = _read_index(index)
    tensors: dict[str, np.ndarray] = {}
    where: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        path = directory / shard
        if not os.path.lexists(path):
            raise CheckpointError(f"{index} names shard {shard!r}, which is not a file in {directory}")
        for name, value in load_file(path).items():
            if name in where:
                raise CheckpointError(f"{directory}: tensor {name!r} is in two shards, {where[name]} and {shard}")
            if weight_map.get(name) != shard:
                mapped = f"maps it to {weight_map[name]!r}" if name in weight_map else "does not list it"
                raise CheckpointError(f"{path} holds tensor {name!r}, but {index.name} {mapped}")
            where[name] = shard
            tensors[name] = value
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise CheckpointError(
            f"{index} maps tensor {absent[0]!r} to {weight_map[absent[0]]!r}, which does not hold it"
            + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
        )
    return tensors


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index: tensor name -> a plain file name in the directory."""
    weight_map = read_json(index, what="safetensors index", limit=_INDEX_LIMIT).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index}: not a safetensors index: 'weight_map' must be a non-empty JSON object "
            f"(tensor name -> shard file name), not {weight_map!r:.80}"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not _plain_file_name(shard):
            raise CheckpointError(
                f"{index}: weight_map maps tensor {name!r:.100} to {shard!r:.100}; a shard must be a plain file "
                "name inside the directory (a string; no path separators, no '..', not absolute)"
            )
    return weight_map


def _plain_file_name(name: str) -> bool:
    return (
        bool(name)
        and name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and Path(name).name == name
        and not os.path.isabs(name)
    )


def _number(lo: float, hi: float, lo_open: bool = False) -> Any:
    def ok(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and (lo < v if lo_open else lo <= v) and v <= hi

    return ok


def _integer(lo: int) -> Any:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _ids(v: Any) -> bool:
    values = v if isinstance(v, list) else [v]
    return bool(values) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values)


# generation_config.json's sampling defaults: key -> (check, what is allowed)
_SAMPLING: dict[str, tuple[Any, str]] = {
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _number(0.0, float("inf"))(v), "a number >= 0"),
    "top_k": (_integer(0), "an integer >= 0"),
    "top_p": (lambda v: _number(0.0, 1.0, lo_open=True)(v), "a number in (0, 1]"),
    "min_p": (lambda v: _number(0.0, 1.0)(v), "a number in [0, 1]"),
    "repetition_penalty": (lambda v: _number(0.0, float("inf"), lo_open=True)(v), "a number > 0"),
    "max_new_tokens": (_integer(1), "an integer >= 1"),
    "eos_token_id": (_ids, "a token id or a non-empty list of token ids"),
}


def read_generation_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The sampling defaults of a directory's ``generation_config.json``: ``do_sample`` (false
    where the file does not set it: transformers samples only when it is true, and decodes greedily
    otherwise), and those of ``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``repetition_penalty``, ``max_new_tokens`` and ``eos_token_id`` (always a list) that it sets
    (null counts as not set); ``{}`` when the directory has no such file.

    Raises:
        CheckpointError: the file is not a regular file, too large, not a JSON object, or holds a
            value outside what is allowed; the message names the file and the field.

    Example:
        >>> read_generation_config("SmolLM2-135M-Instruct")  # doctest: +SKIP
        {'do_sample': False, 'eos_token_id': [2]}
    """
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not os.path.lexists(path):
        return {}
    config = read_json(path, what="generation config", limit=CONFIG_LIMIT)
    out: dict[str, Any] = {"do_sample": False}
    for key, (ok, allowed) in _SAMPLING.items():
        value = config.get(key)
        if value is None:
            continue
        if not ok(value):
            raise CheckpointError(f"{path}: {key} must be {allowed}, not {value!r:.80}")
        out[key] = list(value) if key == "eos_token_id" and isinstance(value, list) else value
    if "eos_token_id" in out and not isinstance(out["eos_token_id"], list):
        out["eos_token_id"] = [out["eos_token_id"]]
    return out
