"""Perplexity and bits per byte of a model on a text: the sliding-window evaluation of
transformers' perplexity guide (https://huggingface.co/docs/transformers/perplexity).

The rule. The text becomes ids (the model's prefix, BOS where its tokenizer puts one, then the
tokenizer's ids). Every id after the first is scored exactly once, by the model's prediction from
up to ``context`` ids before it. Windows of ``context`` input positions start every ``stride`` ids;
a window scores only the targets that no earlier window scored, so the ids before them serve as
context only (docs/evaluation.md has a picture)::

    window k:  inputs ids[b : e], targets ids[b+1 : e+1], b = k*stride, e = min(b + context, n - 1);
               the first (previous e) - b targets are context, the rest are scored.

``loss`` is the mean negative log-likelihood in nats per scored token, ``perplexity`` its exp, and
``bits_per_byte`` the total nats / ln 2 / the text's UTF-8 byte count, which compares models with
different tokenizers.

Windows go through ``model.forward`` a few rows at a time (rows of equal length batched, about
:data:`BATCH_BYTES` of logits and activations per batch), so a long text never holds all its
logits at once; the forward runs in eval mode (no dropout) in the model's dtype.

Not here: reading files or checkpoints (``arraygpt.cli.eval``), document-wise evaluation, the
training run's own train/val losses (``arraygpt.training.loop``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from arraygpt.nn import layers
from arraygpt.xp import namespace

__all__ = ["BATCH_BYTES", "Evaluation", "evaluate", "score_ids", "windows"]

BATCH_BYTES = 256 * 1024 * 1024  # about this much logits and activations per batch of windows


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What :func:`evaluate` measured.

    Attributes:
        loss: mean negative log-likelihood, nats per scored token.
        perplexity: exp(loss).
        bits_per_byte: total nats / ln 2 / the text's UTF-8 byte count.
        tokens: scored tokens (every id after the first: ``len(ids) - 1``).
        bytes: the text's UTF-8 byte count.
        context: input positions per window.
        stride: ids between the starts of two windows.
    """

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    context: int
    stride: int

    def to_dict(self) -> dict[str, float | int]:
        """The four figures ``arraygpt eval --json`` prints: loss, perplexity, bits_per_byte, tokens."""
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens,
        }


def windows(n: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """The windows over ``n`` ids: ``(begin, end, skip)`` with inputs ``ids[begin:end]``, targets
    ``ids[begin+1:end+1]``, of which the first ``skip`` are context (scored by an earlier window).

    Example:
        >>> list(windows(10, context=4, stride=2))
        [(0, 4, 0), (2, 6, 2), (4, 8, 2), (6, 9, 2)]
    """
    last = n - 1  # inputs are ids[0 : n-1], each predicting the next id
    begin, scored = 0, 0  # the targets of inputs before `scored` have been scored
    while True:
        end = min(begin + context, last)
        yield begin, end, scored - begin
        if end == last:
            return
        begin, scored = begin + stride, end


def _check_int(name: str, value: Any, low: int, high: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer from {low} to {high} ({why}), got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high} ({why}), got {value}")
    return int(value)


def _rows_per_batch(model: Any, context: int) -> int:
    """Windows per forward so that its logits and caches take about :data:`BATCH_BYTES`."""
    cfg = model.config
    itemsize = 8 if model.dtype == "float64" else 4  # 16-bit models: their float32 pieces dominate
    # per row: the logits and probabilities (2 V per position), and per layer the activations kept
    # for a backward (~16 C per position) and the attention scores and probabilities (2 NH T)
    per_row = context * (2 * cfg.vocab_size + cfg.n_layer * (16 * cfg.n_embd + 2 * cfg.n_head * context)) * itemsize
    return max(1, BATCH_BYTES // per_row)


def _window_sizes(model: Any, context: int | None, stride: int | None) -> tuple[int, int]:
    """(context, stride), defaults filled in and checked against the model."""
    block = model.config.block_size
    context = block if context is None else _check_int("context", context, 2, block, "the model's block_size")
    stride = context if stride is None else _check_int("stride", stride, 1, context, "at most the context")
    return context, stride


def score_ids(
    model: Any,
    ids: Sequence[int] | np.ndarray,
    context: int | None = None,
    stride: int | None = None,
    *,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """The summed negative log-likelihood (nats) of ``ids[1:]`` under the window rule, and the
    count of scored ids (``len(ids) - 1``).

    Args:
        model: a GPT (``forward(idx) -> (logits (B, T, V), loss)``, ``config``, ``eval()``).
        ids: token ids, at least 2.
        context: input positions per window, 2 to ``block_size`` (default ``block_size``).
        stride: ids between window starts, 1 to ``context`` (default ``context``).
        batch_size: windows per forward (default: about :data:`BATCH_BYTES` of work per forward).
        progress: called as ``progress(scored, total)`` after each forward.

    Raises:
        ValueError: fewer than 2 ids, or ``context``, ``stride`` or ``batch_size`` out of range.
    """
    context, stride = _window_sizes(model, context, stride)
    host = np.asarray(ids, dtype=np.int64)
    if host.ndim != 1:
        raise ValueError(f"ids must be a 1-D sequence of token ids, got shape {host.shape}")
    n = int(host.shape[0])
    if n < 2:
        raise ValueError(f"the text is {n} token(s); at least 2 are needed (every token after the first is scored)")
    rows = _rows_per_batch(model, context) if batch_size is None else batch_size
    rows = _check_int("batch_size", rows, 1, 2**31 - 1, "windows per forward")
    was_training = model.training
    model.eval()
    total, done = 0.0, 0
    try:
        batch: list[tuple[int, int, int]] = []
        for window in windows(n, context, stride):
            if batch and (len(batch) == rows or window[1] - window[0] != batch[0][1] - batch[0][0]):
                total, done = total + _batch_nll(model, host, batch), done + _scored(batch)
                if progress is not None:
                    progress(done, n - 1)
                batch = []
            batch.append(window)
        total, done = total + _batch_nll(model, host, batch), done + _scored(batch)
        if progress is not None:
            progress(done, n - 1)
    finally:
        model.train(was_training)
    return total, done


def _scored(batch: list[tuple[int, int, int]]) -> int:
    return sum(end - begin - skip for begin, end, skip in batch)


def _batch_nll(model: Any, ids: np.ndarray, batch: list[tuple[int, int, int]]) -> float:
    """Summed nats of the scored targets of equal-length windows."""
    idx = np.stack([ids[begin:end] for begin, end, _ in batch])  # (B, T)
    targets = np.stack([ids[begin + 1 : end + 1] for begin, end, _ in batch])  # (B, T)
    for row, (_, _, skip) in enumerate(batch):
        targets[row, :skip] = -1  # context: scored by an earlier window
    logits, _ = model.forward(idx)  # (B, T, V)
    # positions that are context in every row need no softmax: with stride < context, most are
    first = min(skip for _, _, skip in batch)
    logits, targets = logits[:, first:, :], targets[:, first:]  # (B, S, V), (B, S) with S = T - first
    xp = namespace(logits)
    B, S, V = logits.shape
    flat_targets = model.backend.asarray(np.ascontiguousarray(targets).reshape(B * S))  # (B*S,)
    loss, _ = layers.crossentropy_forward(xp.reshape(logits, (B * S, V)), flat_targets, -1, "sum")
    return float(loss)


def evaluate(
    model: Any,
    tokenizer: Any,
    text: str,
    context: int | None = None,
    stride: int | None = None,
    *,
    prefix: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Evaluation:
    """Loss, perplexity and bits per byte of ``model`` on ``text`` (sliding windows, module docstring).

    Args:
        model: a GPT (``arraygpt.load(path).model``).
        tokenizer: its tokenizer (``encode(text) -> ids``).
        text: the text to score.
        context: input positions per window, 2 to the model's ``block_size`` (default ``block_size``).
        stride: ids between window starts, 1 to ``context`` (default ``context``: windows do not overlap).
        prefix: ids put before the text's (default ``[tokenizer.bos_id]`` when the tokenizer puts
            BOS first, as Llama 3's does and transformers' ``tokenizer(text)`` would, else none);
            ``arraygpt.load(path).prompt_prefix`` is the model's own.
        batch_size: windows per forward (default: about :data:`BATCH_BYTES` of work per forward).
        progress: called as ``progress(scored, total)`` after each forward.

    Returns:
        An :class:`Evaluation`.

    Raises:
        ValueError: the text is not a str, is empty or is shorter than 2 tokens; ``context`` or
            ``stride`` out of range; the tokenizer's own errors (characters it does not know).

    Example:
        >>> ckpt = arraygpt.load("out-shakespeare-char")              # doctest: +SKIP
        >>> arraygpt.evaluate(ckpt.model, ckpt.tokenizer, text).perplexity  # doctest: +SKIP
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError("the text is empty; give at least 2 tokens of text")
    if prefix is None:
        bos = getattr(tokenizer, "bos_id", None)
        prefix = [bos] if getattr(tokenizer, "add_bos", False) and bos is not None else []
    context, stride = _window_sizes(model, context, stride)  # before tokenizing a long text
    ids = [*prefix, *tokenizer.encode(text)]
    n_bytes = len(text.encode("utf-8"))
    nll, tokens = score_ids(model, ids, context, stride, batch_size=batch_size, progress=progress)
    loss = nll / tokens
    try:
        perplexity = math.exp(loss)
    except OverflowError:  # loss > ~709.78 nats: a broken model, not an error of the evaluation
        perplexity = math.inf
    return Evaluation(loss, perplexity, nll / math.log(2) / n_bytes, tokens, n_bytes, context, stride)
