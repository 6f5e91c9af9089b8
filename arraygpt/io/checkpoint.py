"""Checkpoints: a folder of plain files, written atomically, read without unpickling anything.

Layout of a checkpoint folder DIR:

    DIR/model.safetensors      the parameters (name -> array, weights stored (out, in))
    DIR/config.json            GPTConfig.to_dict() plus {"arraygpt_format": 1}
    DIR/arraygpt-tokenizer.json  the tokenizer's to_dict(), when it is one of arraygpt's (checkpoints
                               written before it had this name call it tokenizer.json, which still
                               loads)
    DIR/tokenizer.json         a Hugging Face tokenizer (arraygpt.io.bpe.HFTokenizer), in its own
    DIR/tokenizer_config.json  files: BOS, EOS and the chat template beside it
    DIR/optimizer.safetensors  the optimizer's arrays (moments, momentum), when there is one
    DIR/state.json             {"arraygpt_format", "model_rng" (the dropout generator's state),
                                "optimizer" (the optimizer's numbers: step count...), "extra"
                                (the caller's JSON: for a training run its step, data position,
                                generator states, schedule and options)}

A LoRA checkpoint (a model with adapters, saved with a ``base`` reference) holds only the
adapters in model.safetensors (``layer{i}.<weight>.lora_a`` / ``.lora_b``), and config.json
gains ``"lora": {"rank", "alpha", "targets", "base": {"path", "files"}}``: the base model's
path and the size and modification time of each of its files, which must be unchanged when the
checkpoint is read (:func:`base_reference`). Without a reference the merged weights are saved.

Atomicity: the files are written into a fresh sibling folder ``.DIR.tmp-*`` and flushed to disk,
then DIR is renamed to ``.DIR.old``, the new folder is renamed to DIR, and ``.DIR.old`` is
deleted. A kill at any moment leaves either DIR complete, or (between the two renames) DIR absent
and ``.DIR.old`` complete, which :func:`load_checkpoint` and the next save fall back to. The
previous checkpoint stays loadable throughout.

Not here: what a training run keeps in ``extra`` (``arraygpt.training.loop``), GPT-2 interop.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.config import GPTConfig
from arraygpt.errors import CheckpointError
from arraygpt.io import files, safetensors
from arraygpt.io.bpe import TOKENIZER_CONFIG_FILE, HFTokenizer, load_hf_tokenizer
from arraygpt.io.files import CONFIG_FILE, CONFIG_LIMIT, WEIGHTS_FILE
from arraygpt.io.hf.reader import read_generation_config
from arraygpt.io.tokenizers import Tokenizer, tokenizer_from_dict
from arraygpt.nn.model import GPT
from arraygpt.nn.params import param_shapes
from arraygpt.xp import Backend, to_numpy

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DeferredTokenizer",
    "base_reference",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]

FORMAT = 1
MARKER = "arraygpt_format"
TOKENIZER_FILE = "arraygpt-tokenizer.json"
LEGACY_TOKENIZER_FILE = "tokenizer.json"  # the name before TOKENIZER_FILE; read, never written
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


class DeferredTokenizer:
    """A tokenizer that a loader has checked but builds only when :attr:`Checkpoint.tokenizer` is
    first read (``build()`` returns it, or raises what building it raises). A GGUF's is one: a
    generation from token ids then never imports the tokenizers library nor builds a vocabulary."""

    def __init__(self, build: Callable[[], Any]):
        self.build = build

    def __repr__(self) -> str:
        return "DeferredTokenizer(built on first read)"


class _TokenizerField:
    """``Checkpoint.tokenizer``: a :class:`DeferredTokenizer` stored in it is built on the first read,
    and the tokenizer kept in its place."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:  # dataclasses asks the class for a default: there is none
            raise AttributeError("tokenizer")
        value = obj.__dict__[self.slot]
        if isinstance(value, DeferredTokenizer):
            value = value.build()
            obj.__dict__[self.slot] = value
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the GPT, parameters loaded, its dropout generator restored.
        tokenizer: the tokenizer saved with it, or None. A loader may store a
            :class:`DeferredTokenizer`: the tokenizer is then built on the first read.
        optimizer_state: the optimizer's ``state_dict()`` (host arrays and numbers), or None.
        extra: the caller's JSON saved with it (empty dict if none).
        path: the folder actually read (``.DIR.old`` after an interrupted save).
        format: "arraygpt" for this module's folders, "gpt2" for a transformers GPT-2 directory
            (read by ``arraygpt.io.formats.load``).
        base: a LoRA checkpoint's reference to its base model (:func:`base_reference`), else None.
    """

    model: GPT
    tokenizer: Any = _TokenizerField()  # type: ignore[assignment]  (a descriptor; no default)
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    format: str = "arraygpt"
    base: dict[str, Any] | None = None

    def __repr__(self) -> str:  # the dataclass's, without building a deferred tokenizer
        raw = {**self.__dict__, "tokenizer": self.__dict__["_tokenizer"]}
        shown = [f"{f.name}={raw[f.name]!r}" for f in fields(self)]
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def config(self) -> GPTConfig:
        return self.model.config

    @cached_property
    def generation_config(self) -> dict[str, Any]:
        """The sampling defaults of a ``generation_config.json`` in :attr:`path` (a Hugging Face
        directory's), as ``arraygpt.io.hf.reader.read_generation_config`` reads them; ``{}``
        without one. ``arraygpt.generate`` and ``Chat`` sample with them where their caller
        chose nothing else.

        Raises:
            CheckpointError: the file is there but not a valid generation config."""
        if self.path is None or not Path(self.path).is_dir():
            return {}
        return read_generation_config(self.path)

    @property
    def prompt_prefix(self) -> list[int]:
        """What every training document started with: ``[tokenizer.bos_id]`` for a run trained on
        BOS-wrapped documents (``train_config.mode == "documents"``, microgpt's names) or a model
        whose own tokenizer puts BOS first (``tokenizer.add_bos``, Llama 3), else ``[]``. A
        prompt goes after it."""
        train_config = self.extra.get("train_config")
        documents = isinstance(train_config, Mapping) and train_config.get("mode") == "documents"
        bos = getattr(self.tokenizer, "bos_id", None)
        starts_with_bos = documents or bool(getattr(self.tokenizer, "add_bos", False))
        return [int(bos)] if starts_with_bos and bos is not None else []


def _old(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def _dump_json(obj: Any, path: Path) -> None:
    files.write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


_BASE_FILES_LIMIT = 1000  # files of a base model's folder that its reference looks at
_BASE_SUFFIXES = (".json", ".safetensors", ".gguf", ".txt", ".jinja")


def base_reference(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a LoRA checkpoint's base model: its absolute path and, for each of its
    model files (the file itself; or the .json, .safetensors, .gguf, .txt and .jinja files directly
    in its folder and in a run folder's ``last/``), the size and modification time in nanoseconds."""
    root = Path(path).resolve()
    if root.is_file():
        candidates = [root]
    else:
        candidates = sorted(root.iterdir())
        if (root / "last").is_dir():
            candidates += sorted((root / "last").iterdir())
    listed = {}
    for f in candidates[:_BASE_FILES_LIMIT]:
        if f.is_file() and (f == root or f.suffix in _BASE_SUFFIXES):
            st = f.stat()
            listed[f.name if f == root else str(f.relative_to(root))] = [st.st_size, st.st_mtime_ns]
    return {"path": str(root), "files": listed}


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: GPT,
    tokenizer: Tokenizer | HFTokenizer | None = None,
    optimizer: Any = None,
    extra: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically (see the module docstring) and return its path.

    Args:
        directory: the checkpoint folder; its parent is created if needed.
        model: the GPT to save.
        tokenizer: saved with the model: one of arraygpt's as arraygpt-tokenizer.json, a Hugging
            Face one (``HFTokenizer``) as tokenizer.json + tokenizer_config.json.
        optimizer: anything with ``state_dict()``; arrays go to optimizer.safetensors, numbers to
            state.json.
        extra: JSON-serializable data saved in state.json and returned as ``Checkpoint.extra``.
        base: for a model with LoRA adapters, the reference to its base (:func:`base_reference`):
            only the adapters are written. A model with adapters and no base is saved merged.
    """
    config = model.config.to_dict()
    weights = model.params
    if getattr(model, "lora", None) is not None:
        if base is None:
            model = model.merged()
            weights = model.params
        else:
            weights = model.adapters
            config["lora"] = {**model.lora.to_dict(), "base": dict(base)}
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        safetensors.save_file(
            {name: to_numpy(p) for name, p in weights.items()},
            tmp / WEIGHTS_FILE,
            metadata={"format": "arraygpt", MARKER: str(FORMAT)},
        )
        _dump_json({**config, MARKER: FORMAT}, tmp / CONFIG_FILE)
        if isinstance(tokenizer, HFTokenizer):  # Hugging Face's own files, which transformers reads too
            tokenizer.save(tmp)
        elif tokenizer is not None:
            if not callable(getattr(tokenizer, "to_dict", None)):
                raise TypeError(
                    f"cannot save a {type(tokenizer).__name__} with a checkpoint: arraygpt saves its own tokenizers "
                    "(CharTokenizer, ByteTokenizer) and Hugging Face ones (arraygpt.io.bpe.HFTokenizer)"
                )
            _dump_json(tokenizer.to_dict(), tmp / TOKENIZER_FILE)
        numbers = None
        if optimizer is not None:
            arrays, numbers = {}, {}
            for key, value in optimizer.state_dict().items():
                if isinstance(value, (bool, int, float, np.integer, np.floating)) and np.ndim(value) == 0:
                    numbers[key] = value.item() if isinstance(value, np.generic) else value
                else:
                    arrays[key] = to_numpy(value)
            safetensors.save_file(arrays, tmp / OPTIMIZER_FILE, metadata={"format": "arraygpt-optimizer"})
        state = {MARKER: FORMAT, "model_rng": model.rng_state(), "optimizer": numbers, "extra": dict(extra or {})}
        _dump_json(state, tmp / STATE_FILE)  # the last file written
        _make_readable(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _make_readable(folder: Path) -> None:
    """Give the folder and its files the usual permissions (mkdtemp/mkstemp create them private)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _swap_in(new: Path, target: Path) -> None:
    """Replace the folder ``target`` by ``new`` so that a complete checkpoint exists at every instant."""
    old = _old(target)
    if old.exists():
        if target.exists():  # a crash after the last swap's second rename: old is stale
            shutil.rmtree(old)
        else:  # a crash between the renames: old is the last complete checkpoint; put it back first
            os.replace(old, target)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    files._fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(directory: str | os.PathLike[str]) -> Path:
    """The checkpoint folder to read for ``directory``: itself; its ``last/`` when it is a run
    folder; or ``.DIR.old`` when a save was interrupted between its two renames.

    Raises:
        FileNotFoundError: there is no checkpoint there.
    """
    path = Path(directory)
    for candidate in (path, _old(path), path / "last", _old(path / "last")):
        if os.path.lexists(candidate / CONFIG_FILE):  # a special file there is refused when read, not skipped
            return candidate
    if path.exists():
        raise FileNotFoundError(f"{path} is not an arraygpt checkpoint folder (no {CONFIG_FILE}, no last/)")
    raise FileNotFoundError(f"no checkpoint at {path}")


def _read_json(path: Path, what: str, limit: int = files.JSON_LIMIT) -> dict[str, Any]:
    return files.read_json(path, what=f"checkpoint {what}", limit=limit)


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return safetensors.load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: the checkpoint file is missing") from None


def load_checkpoint(
    directory: str | os.PathLike[str],
    backend: str | Backend | None = None,
    dtype: str | None = None,
    *,
    open_base: Callable[..., Any] | None = None,
) -> Checkpoint:
    """Read a checkpoint folder (or a run folder's ``last/``); never unpickles anything.

    Args:
        directory: the folder given to :func:`save_checkpoint`, or a training run's folder.
        backend: where to put the parameters; default the active backend.
        dtype: "float32" or "float64"; default the dtype the parameters were saved in.
        open_base: for a LoRA checkpoint, ``open_base(path, backend=, dtype=)`` opens its base
            model (``arraygpt.load``); the adapters are then attached to it.

    Raises:
        FileNotFoundError: no checkpoint there.
        CheckpointError: a file is missing, truncated, corrupted or of an unknown format.

    Example:
        >>> ckpt = load_checkpoint("runs/names/best")          # doctest: +SKIP
        >>> ckpt.model, ckpt.tokenizer.decode([0, 1])          # doctest: +SKIP
    """
    path = resolve_checkpoint(directory)
    config_dict = _read_json(path / CONFIG_FILE, "config", limit=CONFIG_LIMIT)
    if config_dict.get(MARKER) != FORMAT:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: not an arraygpt checkpoint config of format {FORMAT} "
            f"({MARKER} is {config_dict.get(MARKER)!r}, expected {FORMAT})"
        )
    lora = config_dict.get("lora")
    config_dict = {k: v for k, v in config_dict.items() if k not in (MARKER, "lora")}
    try:
        config = GPTConfig.from_dict(config_dict)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: invalid model config: {e}") from None
    state = _read_json(path / STATE_FILE, "state")
    if state.get(MARKER) != FORMAT:
        raise CheckpointError(
            f"{path / STATE_FILE}: not an arraygpt checkpoint state of format {FORMAT} "
            f"({MARKER} is {state.get(MARKER)!r}, expected {FORMAT})"
        )
    for key, kind in (("extra", dict), ("optimizer", dict), ("model_rng", dict)):
        if state.get(key) is not None and not isinstance(state[key], kind):
            raise CheckpointError(
                f"{path / STATE_FILE}: {key!r} must be a JSON object or null, not {type(state[key]).__name__}"
            )
    numbers = state.get("optimizer") or {}
    bad = [k for k, v in numbers.items() if not isinstance(v, (int, float))]  # bool is an int
    if bad:
        raise CheckpointError(
            f"{path / STATE_FILE}: optimizer value {bad[0]!r} must be a number, not {numbers[bad[0]]!r:.60}"
        )
    tokenizer = _read_tokenizer(path, config)
    tensors = _read_tensors(path / WEIGHTS_FILE)
    if lora is not None:
        model, base = _lora_model(path, lora, config, tensors, backend, dtype, open_base)
        return _finish_loading(path, state, model, tokenizer, base)
    _check_shapes(tensors, config, path)
    dtypes = {str(a.dtype) for a in tensors.values()}
    if len(dtypes) != 1 or not dtypes <= {"float32", "float64"}:
        raise CheckpointError(
            f"{path / WEIGHTS_FILE}: expected parameters all float32 or all float64, got {sorted(dtypes)}"
        )
    if dtype is not None and dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64' (or None for the saved dtype), not {dtype!r}")
    model = GPT(config, dtype=dtype or dtypes.pop(), backend=backend, init=False)  # every weight comes from the file
    try:
        model.load_state_dict(tensors)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: {e}") from None
    del tensors
    return _finish_loading(path, state, model, tokenizer, None)


def _finish_loading(
    path: Path, state: dict[str, Any], model: GPT, tokenizer: Any, base: dict[str, Any] | None
) -> Checkpoint:
    if state.get("model_rng"):
        try:
            model.set_rng_state(state["model_rng"])
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path / STATE_FILE}: invalid model_rng: {e}") from None
    optimizer_state = None
    if (path / OPTIMIZER_FILE).exists() or state.get("optimizer") is not None:
        optimizer_state = {**(state.get("optimizer") or {}), **_read_tensors(path / OPTIMIZER_FILE)}
    return Checkpoint(
        model=model,
        tokenizer=tokenizer,
        optimizer_state=optimizer_state,
        extra=dict(state.get("extra") or {}),
        path=path,
        base=base,
    )


def _lora_model(
    path: Path,
    lora: Any,
    config: GPTConfig,
    tensors: dict[str, np.ndarray],
    backend: Any,
    dtype: str | None,
    open_base: Callable[..., Any] | None,
) -> tuple[GPT, dict[str, Any]]:
    """The base model named by a LoRA checkpoint's config, checked unchanged, with the adapters."""
    from arraygpt.nn.lora import LoRA

    where = path / CONFIG_FILE
    base = lora.get("base") if isinstance(lora, dict) else None
    if not (isinstance(base, dict) and isinstance(base.get("path"), str) and isinstance(base.get("files"), dict)):
        raise CheckpointError(f"{where}: 'lora' must hold rank, alpha, targets and base {{path, files}}")
    try:
        settings = LoRA(lora.get("rank"), lora.get("alpha"), tuple(lora.get("targets") or ()))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: invalid lora settings: {e}") from None
    if open_base is None:
        raise CheckpointError(f"{path} holds LoRA adapters; open it with arraygpt.load, which opens its base too")
    if not os.path.lexists(base["path"]):
        raise CheckpointError(f"{path} holds LoRA adapters of the base model {base['path']}, which is gone")
    try:
        found = base_reference(base["path"])
    except (OSError, RuntimeError) as e:  # a device, a FIFO, a symlink loop (RuntimeError before Python 3.13)
        raise CheckpointError(
            f"{path} holds LoRA adapters of the base model {base['path']}, which is not a model file or folder: {e}"
        ) from None
    if found != base:
        raise CheckpointError(
            f"{path} holds LoRA adapters of {base['path']}, which changed since (its files' sizes or times differ); "
            "the adapters fit only the model they were trained on"
        )
    dtypes = {str(a.dtype) for a in tensors.values()}
    if len(dtypes) != 1 or not dtypes <= {"float32", "float64"}:
        raise CheckpointError(
            f"{path / WEIGHTS_FILE}: expected adapters all float32 or all float64, got {sorted(dtypes)}"
        )
    model = open_base(base["path"], backend=backend, dtype=dtype or dtypes.pop()).model
    if model.lora is not None:  # the base is itself a LoRA run: trained on merged, as fine-tuning merges it
        model = model.merged()
    if {**model.config.to_dict(), "dropout": 0} != {**config.to_dict(), "dropout": 0}:
        raise CheckpointError(f"{where}: the model config differs from its base's at {base['path']}")
    model.config = config  # a fine-tuning run may set its own dropout
    try:
        model.add_lora(settings)
        model.load_adapters(tensors)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS_FILE} does not fit the LoRA settings of {where}: {e}") from None
    return model, base


_TOKENIZER_LIMIT = 64 * 1024 * 1024  # bytes; a character tokenizer of every Unicode character is ~4 MB


def _read_tokenizer(path: Path, config: GPTConfig) -> Tokenizer | HFTokenizer | None:
    """The folder's arraygpt-tokenizer.json; or its Hugging Face tokenizer.json (with
    tokenizer_config.json), saved from an HFTokenizer; or an old checkpoint's tokenizer.json in
    arraygpt's format; or None."""
    for name in (TOKENIZER_FILE, LEGACY_TOKENIZER_FILE):
        if os.path.lexists(path / name):
            file = path / name
            break
    else:
        return None
    if file.name == LEGACY_TOKENIZER_FILE and os.path.lexists(path / TOKENIZER_CONFIG_FILE):
        tokenizer = load_hf_tokenizer(path)
    else:
        try:
            tokenizer = tokenizer_from_dict(_read_json(file, "tokenizer", limit=_TOKENIZER_LIMIT))
        except CheckpointError:
            raise
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}"
        )
    return tokenizer


def _check_shapes(tensors: Mapping[str, np.ndarray], config: GPTConfig, path: Path) -> None:
    """Compare the sizes config.json claims with the tensors present, before anything is allocated."""
    layers = {name.split(".", 1)[0] for name in tensors if name.startswith("layer")}
    if config.n_layer != len(layers):
        raise CheckpointError(
            f"{path / CONFIG_FILE} claims n_layer={config.n_layer}, but {path / WEIGHTS_FILE} holds "
            f"{len(layers)} layer(s)"
        )
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{path / WEIGHTS_FILE} does not match {path / CONFIG_FILE}: tensor {name!r} has shape "
                f"{tuple(tensors[name].shape)}, the config implies {tuple(shape)}"
            )
