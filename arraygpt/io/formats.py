"""One way to load, one way to save: :func:`load` opens any model directory arraygpt understands,
:func:`save` writes either of its two formats.

Formats:

    "arraygpt"  a checkpoint folder of ``arraygpt.io.checkpoint`` (model.safetensors, config.json with
                an ``arraygpt_format`` marker, state.json, arraygpt-tokenizer.json, optimizer...);
                also a training run's folder (its ``last/``, or ``.last.old`` after a save was
                interrupted) and its ``best/``.
    "gpt2"      a Hugging Face transformers GPT-2 directory (config.json with ``model_type``
                ``gpt2``; model.safetensors or a sharded model.safetensors.index.json; the
                tokenizer files tokenizer.json or vocab.json + merges.txt when present), see
                ``arraygpt.io.hf``.
    "llama"     a transformers Llama, Qwen2 or Mistral directory (``model_type`` ``llama``,
                ``qwen2``, ``mistral``; same files), see ``arraygpt.io.hf.llama``.
    "gguf"      one llama.cpp ``.gguf`` file (a path ending in .gguf): model, tokenizer and chat
                template, see ``arraygpt.io.gguf``.

The format of a directory is decided by its config.json: the arraygpt marker means "arraygpt",
a Llama-family ``model_type`` "llama", any other "gpt2" (whose reader names a model type it does
not know); a folder without config.json is tried as a training run.

Not here: the file layouts themselves (``arraygpt.io.checkpoint``, ``arraygpt.io.hf``), downloads,
pickle files (refused by interop with the command that converts them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arraygpt.errors import CheckpointError
from arraygpt.io import bpe, checkpoint
from arraygpt.io.checkpoint import Checkpoint
from arraygpt.io.files import WEIGHTS_FILE, read_json
from arraygpt.io.hf import gpt2
from arraygpt.io.hf.reader import WEIGHTS_INDEX_FILE

__all__ = ["FORMATS", "detect", "load", "save"]

FORMATS = ("arraygpt", "gpt2", "llama", "gguf")

_ALLOWED = (
    "an arraygpt checkpoint folder (config.json with 'arraygpt_format'), a training run folder (with last/), "
    "or a transformers GPT-2, Llama, Qwen2 or Mistral directory (config.json with model_type and "
    "model.safetensors or model.safetensors.index.json)"
)


def detect(path: str | os.PathLike[str]) -> tuple[str, Path]:
    """(format, folder to read) for ``path``; reads config.json only.

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: ``path`` is not a directory, or not one of the formats (the message lists them).
    """
    path = Path(path)
    if path.suffix.lower() == ".gguf" and os.path.lexists(path):  # a file; anything else is refused when read
        return "gguf", path
    if not path.exists():
        raise FileNotFoundError(f"no model at {path} (expected {_ALLOWED})")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory; arraygpt.load opens {_ALLOWED}")
    config_file = path / checkpoint.CONFIG_FILE
    if os.path.lexists(config_file):
        config = read_json(config_file, what="model config")
        if checkpoint.MARKER in config:
            return "arraygpt", path
        if isinstance(config.get("model_type"), str) and config["model_type"] in _llama().MODEL_TYPES:
            return "llama", path
        if "model_type" in config or any(os.path.lexists(path / f) for f in (WEIGHTS_FILE, WEIGHTS_INDEX_FILE)):
            return "gpt2", path
        raise CheckpointError(
            f"{config_file} has neither 'arraygpt_format' nor 'model_type'; arraygpt.load opens {_ALLOWED}"
        )
    try:
        return "arraygpt", checkpoint.resolve_checkpoint(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} holds no model arraygpt knows; arraygpt.load opens {_ALLOWED}") from None


def _llama() -> Any:
    from arraygpt.io.hf import llama as interop_llama

    return interop_llama


def load(
    path: str | os.PathLike[str], *, backend: Any = None, dtype: str | None = None, quantized: bool = False
) -> Checkpoint:
    """Open a model directory: an arraygpt checkpoint or run folder, or a transformers GPT-2, Llama,
    Qwen2 or Mistral directory.

    Args:
        path: the directory (see the module docstring for what each format holds).
        backend: a backend name or object for the parameters; default the active backend.
        dtype: "float32" or "float64"; default the checkpoint's own dtype (arraygpt) or float32
            (GPT-2; float16/bfloat16 files are widened).
        quantized: a .gguf file only: keep its quantized matrices as blocks (``load_gguf``).

    Returns:
        A :class:`arraygpt.io.checkpoint.Checkpoint`: ``model``, ``tokenizer`` (None when the
        directory has none), ``optimizer_state`` and ``extra`` (arraygpt only), ``path`` (the
        folder actually read), ``format`` ("arraygpt", "gpt2" or "llama") and ``prompt_prefix`` (the ids
        every training document started with; a prompt goes after them).

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: a file is missing, truncated, corrupted, hostile, or of an unknown format.
        ImportError: a GPT-2 directory holds tokenizer files but the ``tokenizers`` library is missing.

    Example:
        >>> ckpt = load("runs/names")                       # doctest: +SKIP
        >>> ckpt.format, ckpt.tokenizer.decode([0, 1])      # doctest: +SKIP
    """
    fmt, folder = detect(path)
    if fmt == "gguf":  # a .gguf file, arraygpt.io.gguf
        from arraygpt.io.gguf import load_gguf

        return load_gguf(folder, dtype=dtype or "float32", backend=backend, quantized=quantized)
    if quantized:
        raise ValueError(f"quantized=True keeps a GGUF file's blocks; {path} is a {fmt} checkpoint")
    if fmt == "arraygpt":
        return checkpoint.load_checkpoint(folder, backend=backend, dtype=dtype, open_base=load)
    reader = gpt2.load_gpt2 if fmt == "gpt2" else _llama().load_llama
    model = reader(folder, dtype=dtype or "float32", backend=backend)
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "merges.txt"))
    tokenizer = bpe.load_hf_tokenizer(folder) if has_tokenizer else None
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}"
        )
    return Checkpoint(model=model, tokenizer=tokenizer, optimizer_state=None, extra={}, path=folder, format=fmt)


def save(
    model: Any,
    path: str | os.PathLike[str],
    *,
    format: str = "arraygpt",
    tokenizer: Any = None,
    optimizer: Any = None,
    extra: Mapping[str, Any] | None = None,
    dtype: str | None = None,
) -> Path:
    """Write ``model`` (and what goes with it) as a directory :func:`load` reads back.

    Args:
        model: the GPT; one with LoRA adapters is saved merged (W + (alpha / r) B A).
        path: the directory; created if needed.
        format: "arraygpt" (an atomic checkpoint folder that keeps the tokenizer, the optimizer's
            state, the dropout generator and ``extra``), "gpt2" (a transformers GPT-2 directory
            that ``GPT2LMHeadModel.from_pretrained`` loads; the config must be expressible as
            GPT-2) or "llama" (a transformers Llama/Qwen2 directory, ``interop_llama.save_llama``).
        tokenizer: saved with the model. The "gpt2" format takes only a GPT-2 BPE tokenizer
            (``bpe.BPETokenizer``), written as tokenizer.json.
        optimizer: anything with ``state_dict()`` ("arraygpt" only).
        extra: JSON-serializable data returned as ``Checkpoint.extra`` ("arraygpt" only).
        dtype: "gguf" only: "f32" (default), "f16", "q8_0", "q4_0", "q4_1", "q5_0" or "q5_1"
            (``arraygpt.io.gguf.save_gguf``: one .gguf file at ``path``, its tokenizer and chat
            template in the metadata).

    Returns:
        The directory written.

    Raises:
        ValueError: an unknown format, or something the format cannot hold (the message says which).

    Example:
        >>> save(model, "my-gpt", format="gpt2")            # doctest: +SKIP
    """
    if format not in FORMATS:
        raise ValueError(f"unknown model format {format!r}; arraygpt.save writes {', '.join(map(repr, FORMATS))}")
    if getattr(model, "lora", None) is not None:  # LoRA adapters: W + (alpha / r) B A, a plain model
        model = model.merged()
    if dtype is not None and format != "gguf":
        raise ValueError(f"dtype= is for format='gguf'; the {format} format keeps the model's dtype")
    if format == "gguf":
        if optimizer is not None or extra:
            raise ValueError("the gguf format holds no optimizer state or extra data; save with format='arraygpt'")
        from arraygpt.io.gguf import save_gguf

        return save_gguf(model, path, dtype=dtype or "f32", tokenizer=tokenizer)
    if format == "arraygpt":
        return checkpoint.save_checkpoint(path, model, tokenizer=tokenizer, optimizer=optimizer, extra=extra)
    if optimizer is not None or extra:
        raise ValueError(f"the {format} format holds no optimizer state or extra data; save with format='arraygpt'")
    if tokenizer is not None and not isinstance(tokenizer, bpe.HFTokenizer):
        raise ValueError(
            f"the {format} format holds only a Hugging Face tokenizer (arraygpt.io.bpe.HFTokenizer), "
            f"not {type(tokenizer).__name__}; save with format='arraygpt'"
        )
    if format == "gpt2":
        gpt2.save_gpt2(model, path)
    else:
        _llama().save_llama(model, path)
    if tokenizer is not None:
        tokenizer.save(path)
    return Path(path)
