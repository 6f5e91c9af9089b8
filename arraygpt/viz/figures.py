"""Pictures of a model: the data behind each one, and a matplotlib Figure drawn from it.

Each ``plot_*`` function computes what it shows from the model's own arrays, draws it, and returns
both: a small record with the arrays and labels (so tests and notebooks can check the numbers) and
``.figure``. With ``draw=False`` it returns the record alone (``figure`` is None) and needs no
matplotlib.

    plot_distributions(model, tok, prompt)   the next-token distribution at every generated position:
                                             the top candidates before and after the sampler, the
                                             chosen token marked
    plot_attention(model, tok, prompt)       each layer x head: queries against keys, the masked
                                             future left empty (exactly ``model.attention_patterns()``)
    plot_logit_lens(model, tok, prompt)      the top next-token guess from the residual stream after
                                             the embedding and after each block, position by position
    plot_embeddings(model, tok, token=...)   a 2-D PCA of the token embedding ``wte``, with the
                                             nearest neighbours of a token by cosine similarity
    plot_training_curves(run_dir)            train/val loss and learning rate against the step
    plot_param_tally("gpt3-175b")            count_params's categories as bars

matplotlib is an optional extra (``pip install 'arraygpt[viz]'``), imported only inside the drawing
functions. Figures are ``matplotlib.figure.Figure`` objects on the Agg canvas: no pyplot, no display,
no global state. Every record has ``save(path)`` (``.png``, ``.svg``, ``.pdf``: rendered in memory,
then written atomically by ``arraygpt.viz.output``) and ``_repr_html_`` (Jupyter shows the picture).
Token labels and names are drawn as plain text (``parse_math=False``): a ``$`` in a token is a
dollar sign, never mathtext.

Not here: the interactive page (``arraygpt.viz.page``), the model's math (``arraygpt.nn``), sampling
(``arraygpt.generation.sampling``), the ``arraygpt plot`` and ``arraygpt explain`` commands
(``arraygpt.cli.plot``, ``arraygpt.cli.explain``: they only parse options and save).

Shape legend: L layers, NH heads, T positions, V vocabulary, C embedding width, K candidates,
N generated tokens.
"""

from __future__ import annotations

import array
import base64
import contextlib
import html
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "AttentionPatterns",
    "Distributions",
    "EmbeddingMap",
    "LogitLens",
    "ParamTally",
    "Picture",
    "TrainingCurves",
    "nearest_neighbours",
    "pca",
    "plot_attention",
    "plot_distributions",
    "plot_embeddings",
    "plot_logit_lens",
    "plot_param_tally",
    "plot_training_curves",
    "prompt_ids",
    "read_metrics",
    "token_label",
]

INSTALL_HINT = "pip install 'arraygpt[viz]'"
MAX_METRICS_BYTES = 256 * 1024 * 1024  # a metrics.jsonl of 1.7M logged steps; read as a regular file only
MAX_METRICS_LINE = 1024 * 1024  # bytes in one record; a real one is a few hundred


# ----------------------------------------------------------------------------------------------
# shared helpers: matplotlib on demand, token labels, prompts, eval mode


def _figure(width: float, height: float) -> Any:
    """A Figure on the Agg canvas (no pyplot, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(
            f"arraygpt.viz.figures needs matplotlib to draw ({INSTALL_HINT}); pass draw=False for the data alone"
        ) from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@dataclass(eq=False)
class Picture:
    """Base of every record: the Figure it drew (None with ``draw=False``), ``save`` and ``_repr_html_``."""

    figure: Any = field(default=None, repr=False, kw_only=True)

    def save(self, path: str | os.PathLike[str], dpi: int = 100) -> Path:
        """Write the figure to ``path`` (format from the suffix: .png, .svg, .pdf); returns the path."""
        if self.figure is None:
            raise ValueError(f"this {type(self).__name__} was made with draw=False: there is no figure to save")
        from arraygpt.viz.output import check_output, write_output

        path = check_output(path, "picture")
        suffix = path.suffix.lower()
        if suffix not in (".png", ".svg", ".pdf"):
            raise ValueError(f"cannot tell the image format of {path}: use a .png, .svg or .pdf name")
        buf = io.BytesIO()  # rendered whole before the file is touched
        self.figure.savefig(buf, format=suffix[1:], dpi=dpi)
        return write_output(path, buf.getvalue(), "picture")

    def png(self, dpi: int = 100) -> bytes:
        """The figure as PNG bytes."""
        if self.figure is None:
            raise ValueError(f"this {type(self).__name__} was made with draw=False: there is no figure")
        buf = io.BytesIO()
        self.figure.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    def _repr_html_(self) -> str:
        if self.figure is None:
            return f"<pre>{html.escape(repr(self))}</pre>"
        data = base64.b64encode(self.png(dpi=80)).decode("ascii")
        return f'<img alt="{type(self).__name__}" src="data:image/png;base64,{data}">'


def token_label(tokenizer: Any, token: int) -> str:
    """How a token is written in pictures: its text with whitespace made visible (``␣``, ``↵``),
    ``<bos>``/``<eos>`` for the special tokens, ``#id`` without a tokenizer or for empty text."""
    token = int(token)
    if tokenizer is None:
        return f"#{token}"
    if token == getattr(tokenizer, "bos_id", None):
        return "<bos>"
    if token == getattr(tokenizer, "eos_id", None):
        return "<eos>"
    try:
        text = tokenizer.decode([token])
    except (ValueError, KeyError, IndexError):
        return f"#{token}"
    text = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")
    return text if text else f"#{token}"


def _labels(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [token_label(tokenizer, i) for i in ids]


def prompt_ids(tokenizer: Any, prompt: str | Sequence[int], prefix: Sequence[int] = ()) -> list[int]:
    """Token ids of ``prompt`` (text, encoded with ``tokenizer``, or ids), after ``prefix`` (e.g. a
    checkpoint's ``prompt_prefix``, the BOS token its training documents started with). An empty
    prompt and prefix start from the tokenizer's BOS token.

    Raises:
        ValueError: nothing to start from (empty prompt and no BOS token), or text without a tokenizer.
    """
    if isinstance(prompt, str):
        if prompt and tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids instead")
        ids = [int(i) for i in prefix] + (list(tokenizer.encode(prompt)) if prompt else [])
    else:
        ids = [int(i) for i in prefix] + [int(i) for i in prompt]
    if not ids:
        bos = getattr(tokenizer, "bos_id", None)
        if bos is None:
            raise ValueError("the prompt is empty and the tokenizer has no BOS token to start from; give a prompt")
        ids = [int(bos)]
    return ids


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """No dropout while looking; the model's mode is restored afterwards."""
    training = model.training
    model.training = False
    try:
        yield
    finally:
        model.training = training


def _host(x: Any) -> np.ndarray:
    from arraygpt.xp import to_numpy

    return np.asarray(to_numpy(x))


def _window(model: Any, ids: Sequence[int]) -> list[int]:
    """The last block_size tokens: what the model can see at once."""
    return list(ids)[-model.config.block_size :]


def _short(n: float) -> str:
    """1234567 -> '1.23M' (parameter counts in the tally)."""
    for size, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:g}"


# ----------------------------------------------------------------------------------------------
# the next-token distribution at every generated position


@dataclass(eq=False)
class Distributions(Picture):
    """What :func:`plot_distributions` drew.

    Attributes:
        prompt: the prompt's token ids.
        tokens: the N generated token ids (the chosen ones).
        labels: their labels (:func:`token_label`).
        candidates: one ``arraygpt.generation.generation.Candidates`` per generated token, as ``generate``
            yields them with ``show_probs=k``: the top-k under the model's softmax and after the sampler.
        logits: (N, V) float64, the model's logits before each generated token.
        sampler_probs: (N, V) float64, the distribution each token was drawn from.
        vocab: the label of every token id (V,).
        sampler: the sampler's description (``repr`` of the ``Sampler``).
        sampler_names: the names of its filters in the order they ran (``Sampler.names``).
        panels: per drawn panel, the rows it shows: (token id, label, p_model, p_sampler, chosen),
            most likely under the model first.
    """

    prompt: list[int]
    tokens: list[int]
    labels: list[str]
    candidates: list[Any]
    logits: np.ndarray
    sampler_probs: np.ndarray
    vocab: list[str]
    sampler: str
    sampler_names: tuple[str, ...] = ()
    panels: list[list[tuple[int, str, float, float, bool]]] = field(default_factory=list)


def plot_distributions(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    max_new_tokens: int = 8,
    sampler: str | Sequence[str] = "temperature",
    *,
    temperature: float = 1.0,
    k: int = 8,
    seed: int = 1337,
    prefix: Sequence[int] = (),
    eos_id: Any = "tokenizer",
    max_panels: int = 12,
    draw: bool = True,
    **sampler_options: Any,
) -> Distributions:
    """Generate after ``prompt`` and show the distribution behind every new token.

    Args:
        model, tokenizer: the model and its tokenizer (labels, text prompts).
        prompt: text or token ids (see :func:`prompt_ids`, with ``prefix``).
        max_new_tokens, sampler, temperature, seed, **sampler_options: as ``arraygpt.generate``.
        k: candidates per position (``show_probs``).
        eos_id: end token(s); default the tokenizer's BOS/EOS; None generates all max_new_tokens.
        max_panels: the figure shows the first this many positions (the data holds all).
        draw: False returns the data alone (no matplotlib needed).

    Returns:
        :class:`Distributions`. Each panel shows the model's top-k (grey bars) and the sampler's
        probability of the same tokens (blue bars); the chosen token's label is red, with a ◀.
    """
    from arraygpt.generation.generation import generate
    from arraygpt.generation.sampling import make_sampler

    ids = prompt_ids(tokenizer, prompt, prefix)
    if eos_id == "tokenizer":
        specials = {getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)} - {None}
        eos_id = sorted(int(i) for i in specials) or None
    chain = make_sampler(sampler, temperature=temperature, **sampler_options)
    with _eval_mode(model):
        steps = list(
            generate(
                model,
                ids,
                max_new_tokens,
                sampler,
                temperature=temperature,
                seed=seed,
                use_cache=False,
                eos_id=eos_id,
                show_probs=k,
                **sampler_options,
            )
        )
        context = list(ids)
        logits_rows, probs_rows = [], []
        for c in steps:  # the same forward generate(use_cache=False) ran, so the same logits bit for bit
            logits, _ = model.forward([_window(model, context)], last_only=True)  # (1, 1, V)
            logits_rows.append(_host(logits[:, -1, :])[0].astype(np.float64))
            seen = model.backend.asarray(np.asarray([context], dtype=np.int64))  # what a context-reading filter sees
            probs_rows.append(_host(chain(logits[:, -1, :], seen))[0].astype(np.float64))
            context.append(c.token)
    V = model.config.vocab_size
    tokens = [c.token for c in steps]
    out = Distributions(
        prompt=ids,
        tokens=tokens,
        labels=_labels(tokenizer, tokens),
        candidates=steps,
        logits=np.array(logits_rows).reshape(-1, V),
        sampler_probs=np.array(probs_rows).reshape(-1, V),
        vocab=_labels(tokenizer, range(V)),
        sampler=repr(chain),
        sampler_names=tuple(chain.names),
    )
    for c, probs in zip(steps[:max_panels], out.sampler_probs):
        rows = [(i, out.vocab[i], p, float(probs[i]), i == c.token) for i, p in c.model]
        if c.token not in {i for i, _ in c.model}:  # drawn from outside the model's top-k: show it too
            rows.append((c.token, out.vocab[c.token], c.p_model, c.p_sampler, True))
        out.panels.append(rows)
    if draw:
        out.figure = _draw_distributions(out)
    return out


def _draw_distributions(d: Distributions) -> Any:
    n = max(len(d.panels), 1)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    height = max((len(p) for p in d.panels), default=4) * 0.22 + 0.9
    fig = _figure(3.1 * cols, height * rows + 0.5)
    fig.suptitle(
        f"next-token distributions  ·  grey: the model's softmax  ·  blue: after the sampler ({d.sampler})",
        fontsize=9,
        parse_math=False,
    )
    if not d.panels:
        fig.text(0.5, 0.5, "no token was generated", ha="center")
        return fig
    for n_panel, rows_ in enumerate(d.panels):
        ax = fig.add_subplot(rows, cols, n_panel + 1)
        y = np.arange(len(rows_))[::-1]
        ax.barh(y, [r[2] for r in rows_], height=0.8, color="#c8c8c8", label="model")
        ax.barh(y, [r[3] for r in rows_], height=0.45, color="#2f6fb5", label="sampler")
        ax.set_yticks(y, [r[1] + (" ◀" if r[4] else "") for r in rows_], fontsize=8, parse_math=False)
        for tick, r in zip(ax.get_yticklabels(), rows_):
            if r[4]:
                tick.set_color("#c0392b")
                tick.set_fontweight("bold")
        ax.set_xlim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        chosen = d.candidates[n_panel]
        ax.set_title(
            f"token {n_panel + 1}: {d.labels[n_panel]}  (p={chosen.p_sampler:.2f}, model {chosen.p_model:.2f})",
            fontsize=8,
            parse_math=False,
        )
    return fig


# ----------------------------------------------------------------------------------------------
# attention patterns


@dataclass(eq=False)
class AttentionPatterns(Picture):
    """What :func:`plot_attention` drew.

    Attributes:
        tokens: the token ids of the positions (the last block_size of the prompt).
        labels: their labels.
        patterns: (L, NH, T, T) float64, exactly ``model.attention_patterns()`` of the forward over
            ``tokens`` (row 0): entry [l, h, t, s] is how much query t attends to key s.
        mask: (T, T) bool, True in the masked future (s > t), where every pattern is exactly 0.
    """

    tokens: list[int]
    labels: list[str]
    patterns: np.ndarray
    mask: np.ndarray


def plot_attention(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    prefix: Sequence[int] = (),
    layers: Sequence[int] | None = None,
    draw: bool = True,
) -> AttentionPatterns:
    """Each layer x head as a heatmap of queries (rows) against keys (columns), with token labels;
    the masked future is left empty (not drawn), so the causal triangle shows.

    Args:
        prompt: text or ids (its last block_size tokens are used).
        layers: which layers to draw (default all); the data holds all.
    """
    ids = _window(model, prompt_ids(tokenizer, prompt, prefix))
    with _eval_mode(model):
        model.forward([ids])
        patterns = np.stack([_host(p)[0] for p in model.attention_patterns()]).astype(np.float64)  # (L, NH, T, T)
    T = len(ids)
    mask = np.triu(np.ones((T, T), dtype=bool), k=1)
    out = AttentionPatterns(tokens=ids, labels=_labels(tokenizer, ids), patterns=patterns, mask=mask)
    if draw:
        out.figure = _draw_attention(out, range(patterns.shape[0]) if layers is None else layers)
    return out


def _draw_attention(a: AttentionPatterns, layers: Sequence[int]) -> Any:
    import matplotlib as mpl

    layers = list(layers)
    L, NH, T = len(layers), a.patterns.shape[1], a.patterns.shape[2]
    size = min(3.0, max(2.4, 0.2 * T + 0.8))
    cell_points = 72 * 0.8 * size / max(T, 1)  # a column's width, to fit the key labels
    rotation = 90 if 3.9 * max((len(s) for s in a.labels), default=0) > cell_points else 0
    fig = _figure(size * NH + 1.0, size * L + 0.8)
    fig.suptitle(
        "attention: each query (row) attends to earlier keys (columns); the masked future is empty", fontsize=9
    )
    cmap = mpl.colormaps["viridis"].with_extremes(bad="white")  # masked cells are not painted
    grid = fig.subplots(L, NH, squeeze=False)
    show_labels = T <= 24
    image = None
    for r, layer in enumerate(layers):
        for h in range(NH):
            ax = grid[r][h]
            data = np.ma.masked_array(a.patterns[layer, h], mask=a.mask)
            image = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer + 1} · head {h + 1}", fontsize=8)
            if show_labels:
                ax.set_xticks(range(T), a.labels, fontsize=7, rotation=rotation, parse_math=False)
                ax.set_yticks(range(T), a.labels if h == 0 else [""] * T, fontsize=7, parse_math=False)
            else:
                ax.tick_params(labelsize=6)
            if h == 0:
                ax.set_ylabel("query", fontsize=7)
            if r == L - 1:
                ax.set_xlabel("key", fontsize=7)
    if image is not None:
        bar = fig.colorbar(image, ax=grid, shrink=0.6)
        bar.set_label("attention probability", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    return fig


# ----------------------------------------------------------------------------------------------
# the logit lens


@dataclass(eq=False)
class LogitLens(Picture):
    """What :func:`plot_logit_lens` drew.

    Attributes:
        tokens, labels: the input positions.
        layer_names: ``embedding``, ``block 1`` ... ``block L``: where the residual stream was read.
        logits: (L + 1, T, V) float64, ``model.unembed`` of each residual stream; the last entry is
            the model's own logits.
        top_ids, top_probs: (L + 1, T, k), the k most likely next tokens of each and their probabilities.
        top_labels: their labels, nested the same way.
    """

    tokens: list[int]
    labels: list[str]
    layer_names: list[str]
    logits: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    top_labels: list[list[list[str]]]


def _softmax64(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _top(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest of the last axis, largest first (ties: lower id first)."""
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return order, np.take_along_axis(probs, order, axis=-1)


def plot_logit_lens(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    k: int = 5,
    prefix: Sequence[int] = (),
    draw: bool = True,
) -> LogitLens:
    """The top next-token guesses read from the residual stream after the embedding and after each
    block (through the final norm and the unembedding), position by position.

    The figure is a grid, layers down and positions across: each cell holds the top guess, coloured
    by its probability; the bottom row is the model's actual prediction.
    """
    ids = _window(model, prompt_ids(tokenizer, prompt, prefix))
    with _eval_mode(model):
        stream = model.residual_stream([ids])  # L + 1 arrays (1, T, C)
        logits = np.stack([_host(model.unembed(x))[0] for x in stream]).astype(np.float64)  # (L + 1, T, V)
    top_ids, top_probs = _top(_softmax64(logits), min(k, logits.shape[-1]))
    names = ["embedding"] + [f"block {i + 1}" for i in range(len(stream) - 1)]
    top_labels = [[_labels(tokenizer, row) for row in layer] for layer in top_ids]
    out = LogitLens(
        tokens=ids,
        labels=_labels(tokenizer, ids),
        layer_names=names,
        logits=logits,
        top_ids=top_ids,
        top_probs=top_probs,
        top_labels=top_labels,
    )
    if draw:
        out.figure = _draw_logit_lens(out)
    return out


def _draw_logit_lens(lens: LogitLens) -> Any:
    n_layers, T = lens.top_probs.shape[:2]
    fig = _figure(max(6.4, 0.55 * T + 2.4), 0.45 * n_layers + 1.8)
    ax = fig.add_subplot()
    image = ax.imshow(lens.top_probs[:, :, 0], cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    for layer in range(n_layers):
        for t in range(T):
            p = lens.top_probs[layer, t, 0]
            ax.text(
                t,
                layer,
                lens.top_labels[layer][t][0],
                ha="center",
                va="center",
                fontsize=8,
                color="white" if p > 0.6 else "black",
                parse_math=False,
            )
    ax.set_xticks(range(T), lens.labels, fontsize=8, parse_math=False)
    ax.set_yticks(range(n_layers), lens.layer_names, fontsize=8)
    ax.set_xlabel("input token at each position (the cell is the guess for the token after it)", fontsize=8)
    ax.set_title("logit lens: the top next-token guess read after each block", fontsize=9)
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("top-guess probability", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


# ----------------------------------------------------------------------------------------------
# embeddings: PCA and nearest neighbours


def pca(matrix: Any, n: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Principal components of the rows of ``matrix`` (V, C), with NumPy's SVD in float64.

    Returns:
        (components (n, C) orthonormal rows, largest variance first; projection (V, n) of the
        centred rows onto them; variance (n,) of each projected column; mean (C,)).
    """
    x = _host(matrix).astype(np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca needs a (rows, columns) matrix with at least 2 rows, got shape {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    n = min(n, vt.shape[0])
    components = vt[:n]
    projection = centred @ components.T
    variance = s[:n] ** 2 / (x.shape[0] - 1)
    return components, projection, variance, mean


def nearest_neighbours(matrix: Any, token: int, k: int = 5) -> list[tuple[int, float]]:
    """The k rows of ``matrix`` (V, C) most similar to row ``token`` by cosine similarity (itself
    left out), as (id, cosine), most similar first."""
    x = _host(matrix).astype(np.float64)
    V = x.shape[0]
    if not 0 <= int(token) < V:
        raise ValueError(f"token {token} is outside the vocabulary (0..{V - 1})")
    norms = np.linalg.norm(x, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    cos = (x @ x[int(token)]) / (norms * norms[int(token)])
    cos[int(token)] = -np.inf
    order = np.argsort(-cos, kind="stable")[: min(k, V - 1)]
    return [(int(i), float(cos[i])) for i in order]


@dataclass(eq=False)
class EmbeddingMap(Picture):
    """What :func:`plot_embeddings` drew.

    Attributes:
        labels: the label of every token (V,).
        points: (V, 2) the PCA projection of the centred rows of ``wte``.
        components: (2, C) the principal directions (orthonormal rows), largest variance first.
        variance: (2,) the variance along each; variance_ratio: its share of the total variance.
        token: the token whose neighbours are shown (or None); neighbours: (id, label, cosine).
    """

    labels: list[str]
    points: np.ndarray
    components: np.ndarray
    variance: np.ndarray
    variance_ratio: np.ndarray
    token: int | None = None
    neighbours: list[tuple[int, str, float]] = field(default_factory=list)


def plot_embeddings(
    model: Any, tokenizer: Any, token: int | str | None = None, *, k: int = 5, max_labels: int = 300, draw: bool = True
) -> EmbeddingMap:
    """The token embedding matrix ``wte`` (V, C) projected on its two principal components, each
    point labelled; with ``token`` (an id, or text that is one token) its k nearest neighbours by
    cosine similarity in the full C dimensions are marked and listed."""
    wte = _host(model.params["wte"]).astype(np.float64)
    components, points, variance, _ = pca(wte, 2)
    total = float(np.var(wte, axis=0, ddof=1).sum())
    labels = _labels(tokenizer, range(wte.shape[0]))
    if isinstance(token, str):
        ids = tokenizer.encode(token) if tokenizer is not None else []
        if len(ids) != 1:
            raise ValueError(f"token {token!r} is {len(ids)} tokens, not one; give a single token or its id")
        token = int(ids[0])
    out = EmbeddingMap(
        labels=labels,
        points=points,
        components=components,
        variance=variance,
        variance_ratio=variance / total if total > 0 else np.zeros_like(variance),
    )
    if token is not None:
        out.token = int(token)
        out.neighbours = [(i, labels[i], c) for i, c in nearest_neighbours(wte, int(token), k)]
    if draw:
        out.figure = _draw_embeddings(out, max_labels)
    return out


def _draw_embeddings(e: EmbeddingMap, max_labels: int) -> Any:
    fig = _figure(6.4 if e.token is None else 8.4, 5.4)
    if e.token is None:
        ax = fig.add_subplot()
    else:
        ax, side = fig.subplots(1, 2, width_ratios=[3, 1])
    x = e.points[:, 0]
    y = e.points[:, 1] if e.points.shape[1] > 1 else np.zeros_like(x)
    ax.scatter(x, y, s=14, color="#7f8c8d", alpha=0.6)
    near = {i for i, _, _ in e.neighbours}
    for i in range(min(len(e.labels), max_labels)):
        special = i == e.token or i in near
        ax.annotate(
            e.labels[i],
            (x[i], y[i]),
            fontsize=9 if special else 7,
            color="#c0392b" if i == e.token else "#d35400" if i in near else "#2c3e50",
            fontweight="bold" if special else "normal",
            xytext=(2, 2),
            textcoords="offset points",
            parse_math=False,
        )
    if e.token is not None:
        t = e.token
        for i, _, _ in e.neighbours:
            ax.plot([x[t], x[i]], [y[t], y[i]], color="#d35400", lw=0.8, alpha=0.7)
        ax.scatter([x[t]], [y[t]], s=40, color="#c0392b", zorder=3)
        side.axis("off")
        lines = [f"nearest to {e.labels[t]!s}", "(cosine, all dims)", ""]
        lines += [f"{label:>6}  {c:+.3f}" for _, label, c in e.neighbours]
        side.text(0.0, 1.0, "\n".join(lines), va="top", family="monospace", fontsize=9, parse_math=False)
    r = e.variance_ratio
    ax.set_xlabel(f"PC1 ({r[0]:.0%} of the variance)", fontsize=8)
    ax.set_ylabel(f"PC2 ({r[1]:.0%} of the variance)" if len(r) > 1 else "", fontsize=8)
    ax.set_title("token embeddings (wte), projected on their two principal components", fontsize=9)
    ax.tick_params(labelsize=7)
    return fig


# ----------------------------------------------------------------------------------------------
# training curves


@dataclass(eq=False)
class TrainingCurves(Picture):
    """What :func:`plot_training_curves` drew, straight from metrics.jsonl's records.

    Attributes:
        path: the metrics file read.
        steps, loss, lr: the ``train`` records' step, loss and lr, in file order.
        eval_steps, train_loss, val_loss: the ``eval`` records' step, train_loss and val_loss
            (NaN where a record lacks one).
    """

    path: Path
    steps: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    eval_steps: np.ndarray
    train_loss: np.ndarray
    val_loss: np.ndarray


CURVES = {"train": ("step", "loss", "lr"), "eval": ("step", "train_loss", "val_loss")}  # event -> keys drawn


def read_metrics(run_dir: str | os.PathLike[str]) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """The metrics file of a run folder (or a metrics.jsonl given directly) and its curves: for
    each event of :data:`CURVES`, each of its keys as a float64 column in file order (NaN where a
    record holds null or lacks the key). Other records are checked to be JSON objects and skipped.

    The file is read as a regular file of at most :data:`MAX_METRICS_BYTES`, line by line (each at
    most :data:`MAX_METRICS_LINE`), keeping only the columns: memory follows the steps logged. A
    last line without its newline that does not parse is skipped: a run killed mid-write, or one
    still writing.

    Raises:
        FileNotFoundError: no metrics file there.
        ValueError: (``CheckpointError`` for the file itself) a FIFO, device or folder where the
            file should be, a file over the limit, or a line that is not UTF-8, not a JSON object,
            nested too deeply, or whose step, loss or lr is not a number: the message names the
            file and the line.
    """
    from arraygpt.errors import CheckpointError
    from arraygpt.io.files import open_regular
    from arraygpt.training.log import METRICS_FILE

    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not os.path.lexists(path):
        raise FileNotFoundError(f"no {METRICS_FILE} at {run_dir} (give a training run folder, e.g. runs/names)")
    columns = {event: {key: array.array("d") for key in keys} for event, keys in CURVES.items()}
    f, size = open_regular(path, "metrics file")
    with f:
        if size > MAX_METRICS_BYTES:
            raise CheckpointError(f"{path}: the metrics file is {size} bytes; at most {MAX_METRICS_BYTES} are read")
        read, n = 0, 0
        while line := f.readline(MAX_METRICS_LINE + 1):
            n += 1
            read += len(line)
            if read > MAX_METRICS_BYTES:
                raise CheckpointError(f"{path}: the metrics file grew past {MAX_METRICS_BYTES} bytes while read")
            if len(line) > MAX_METRICS_LINE:
                raise ValueError(f"{path} line {n} is over {MAX_METRICS_LINE} bytes; a metrics record is a few hundred")
            record = _metrics_record(path, n, line)
            if record is None:
                continue
            event = record.get("event")
            if isinstance(event, str) and event in columns:
                for key, column in columns[event].items():
                    column.append(_metrics_number(path, n, event, key, record.get(key)))
    return path, {event: {k: np.array(c, dtype=np.float64) for k, c in cs.items()} for event, cs in columns.items()}


def _metrics_record(path: Path, n: int, line: bytes) -> dict[str, Any] | None:
    """Line ``n`` of a metrics file as a JSON object; None for a blank line or a cut-off last line."""
    if not line.strip():
        return None
    cut_off = not line.endswith(b"\n")  # only the last line can lack its newline
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        if cut_off:
            return None
        raise ValueError(f"{path} line {n} is not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
    except RecursionError:
        raise ValueError(f"{path} line {n} is nested too deeply to be a metrics record") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        if cut_off:
            return None
        raise ValueError(f"{path} line {n} is not JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} line {n} is not a JSON object")
    return record


def _metrics_number(path: Path, n: int, event: str, key: str, value: Any) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            pass
    raise ValueError(f"{path} line {n}: the {event} record's {key!r} is {value!r:.60}, not a number")


def plot_training_curves(run_dir: str | os.PathLike[str], *, draw: bool = True) -> TrainingCurves:
    """Train loss (each ``train`` record), train/val loss of each evaluation, and the learning
    rate, against the step, from a run folder's metrics.jsonl (read by :func:`read_metrics`).

    Raises:
        FileNotFoundError: no metrics.jsonl; ValueError: a bad file or line (see
            :func:`read_metrics`), or no ``train`` or ``eval`` record.
    """
    path, curves = read_metrics(run_dir)
    train, evals = curves["train"], curves["eval"]
    if not len(train["step"]) and not len(evals["step"]):
        raise ValueError(f"{path} holds no train or eval records (did the run log any step?)")
    out = TrainingCurves(
        path=path,
        steps=train["step"],
        loss=train["loss"],
        lr=train["lr"],
        eval_steps=evals["step"],
        train_loss=evals["train_loss"],
        val_loss=evals["val_loss"],
    )
    if draw:
        out.figure = _draw_training_curves(out)
    return out


def _draw_training_curves(c: TrainingCurves) -> Any:
    fig = _figure(6.4, 4.8)
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    if len(c.steps):
        loss_ax.plot(c.steps, c.loss, color="#2f6fb5", lw=1.2, label="train loss (each logged step)")
    if len(c.eval_steps):
        loss_ax.plot(c.eval_steps, c.train_loss, "o", color="#2f6fb5", ms=4, label="train loss (eval)")
        loss_ax.plot(c.eval_steps, c.val_loss, "o-", color="#d35400", ms=4, lw=1.2, label="val loss (eval)")
    loss_ax.set_ylabel("cross-entropy (nats/token)", fontsize=8)
    loss_ax.legend(fontsize=8)
    loss_ax.grid(alpha=0.3)
    loss_ax.set_title(f"training curves: {c.path.parent.name}", fontsize=9, parse_math=False)
    lr_ax.plot(c.steps, c.lr, color="#27ae60", lw=1.2)
    lr_ax.set_ylabel("learning rate", fontsize=8)
    lr_ax.set_xlabel("step", fontsize=8)
    lr_ax.grid(alpha=0.3)
    from matplotlib.ticker import FuncFormatter

    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}" if v else "0"))
    for ax in (loss_ax, lr_ax):
        ax.tick_params(labelsize=7)
    return fig


# ----------------------------------------------------------------------------------------------
# the parameter tally


@dataclass(eq=False)
class ParamTally(Picture):
    """What :func:`plot_param_tally` drew.

    Attributes:
        name: the preset (or ``custom``).
        categories, counts: the bars: ``count_params(config).by_category``, in its order.
        total: ``count_params(config).total``: every distinct parameter once.
        tied: the unembedding's size when it is tied to the embedding (then its bar repeats the
            embedding's matrix, so ``sum(counts) == total + tied``), else 0.
        matrices: the sum of the eight matrix categories (``other`` left out): the documents'
            running tally, 175,181,291,520 for GPT-3 175B.
    """

    name: str
    categories: list[str]
    counts: list[int]
    total: int
    tied: int
    matrices: int


def plot_param_tally(
    preset: Any = "gpt3-175b", *, name: str | None = None, draw: bool = True, **overrides: Any
) -> ParamTally:
    """The parameter count of a preset (or a ``GPTConfig``, with any field overridden) by kind of
    matrix, as a bar chart; ``name`` titles it (default the preset's name, or ``custom``)."""
    from arraygpt.config import GPTConfig
    from arraygpt.nn.params import count_params

    if isinstance(preset, GPTConfig):
        config = GPTConfig.from_dict({**preset.to_dict(), **overrides}) if overrides else preset
        name = name or "custom"
    else:
        config, name = GPTConfig.preset(str(preset), **overrides), name or str(preset)
    counts = count_params(config)
    tied = config.vocab_size * config.n_embd if config.tie_embeddings else 0
    cats = list(counts.by_category)
    out = ParamTally(
        name=name,
        categories=cats,
        counts=[int(counts.by_category[c]) for c in cats],
        total=int(counts.total),
        tied=int(tied),
        matrices=int(sum(n for c, n in counts.by_category.items() if c != "other")),
    )
    if draw:
        out.figure = _draw_param_tally(out)
    return out


def _draw_param_tally(t: ParamTally) -> Any:
    fig = _figure(7.2, 4.2)
    ax = fig.add_subplot()
    y = np.arange(len(t.categories))[::-1]
    colours = [
        "#7f8c8d"
        if c in ("embedding", "unembedding", "other")
        else "#2f6fb5"
        if c in ("key", "query", "value", "output")
        else "#d35400"
        for c in t.categories
    ]
    bars = ax.barh(y, t.counts, color=colours)
    shown = sum(t.counts)
    for bar, cat, n in zip(bars, t.categories, t.counts):
        if cat == "unembedding" and t.tied:
            bar.set_hatch("//")
            bar.set_facecolor("white")
            bar.set_edgecolor("#7f8c8d")
        share = f"{n / shown:.1%}" if n >= shown / 1000 or n == 0 else "<0.1%"
        note = f"  {_short(n)}  ({share})" + (
            "  tied to the embedding: counted once" if cat == "unembedding" and t.tied else ""
        )
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    ax.set_yticks(y, [c.replace("_", " ") for c in t.categories], fontsize=8)
    ax.set_xlim(0, max(t.counts) * 1.55 if t.counts else 1)
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short(v) if v else "0"))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("parameters (each bar: one kind of matrix, all layers together)", fontsize=8)
    ax.set_title(
        f"{t.name}: {t.total:,} parameters  ·  the eight matrix kinds sum to {t.matrices:,}",
        fontsize=9,
        parse_math=False,
    )
    return fig
