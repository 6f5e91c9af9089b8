"""The interactive page: one self-contained HTML file that shows inside one generation.

``explain(model, tok, prompt)`` generates and builds the page: the generated tokens, each one's
distribution with sliders for temperature, top-k, top-p and min-p recomputed in the page exactly
as ``make_sampler`` does, the attention pattern of a chosen layer and head, and the logit lens.

The page's HTML, style and script are package data beside this module (``page.html``,
``page.css``, ``page.js``, read with ``importlib.resources``). :func:`render_page` inlines them
and the data into one file: no CDN, no network, it opens from the file. The data goes in as JSON
inside ``<script type="application/json">`` with ``<``, ``>`` and ``&`` written as ``\\u003c``,
``\\u003e``, ``\\u0026`` (:func:`inline_json`), so no token text (``<!--``, ``<script>``,
``</script>``) can end or re-open a script element; the title is HTML-escaped. The placeholders
are filled in one pass, so text that looks like a placeholder stays text.

Not here: the pictures (``arraygpt.viz.figures``, whose records the page's data comes from), the
``arraygpt explain`` command (``arraygpt.cli.explain``).
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arraygpt.viz.figures import (
    AttentionPatterns,
    Distributions,
    LogitLens,
    _window,
    plot_attention,
    plot_distributions,
    plot_logit_lens,
)
from arraygpt.viz.output import write_output

__all__ = ["Explanation", "explain", "inline_json", "render_page"]

PAGE_SAMPLERS = ("top_k", "top_p", "min_p")  # the page applies these, in this order, after the temperature
_PLACEHOLDER = re.compile(r"__(TITLE|STYLE|SCRIPT|DATA)__")
# What may not appear in text inlined into a <style> or <script> element (HTML's script data states).
_UNSAFE_INLINE = ("</style", "</script", "<!--", "<script")


@dataclass(eq=False)
class Explanation:
    """What :func:`explain` built: the page's data and the page itself.

    Attributes:
        data: the JSON-able dict inlined in the page (prompt, generated tokens, per-token logits,
            attention patterns, logit lens).
        html: the page: one file, data, script and style inline, no network.
        distributions, attention, lens: the records the data came from (``draw=False``).
    """

    data: dict[str, Any]
    html: str
    distributions: Distributions
    attention: AttentionPatterns
    lens: LogitLens

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the page to ``path`` (UTF-8), atomically (``arraygpt.viz.output``); returns the path.

        Raises:
            OSError: the path is a folder, FIFO or device, or the write failed (the message names
                the path; a file that was there is unchanged).
        """
        return write_output(path, self.html.encode("utf-8"), "page")

    def _repr_html_(self) -> str:
        # an iframe keeps the page's script and style apart from the notebook's
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:760px;border:0" '
            'sandbox="allow-scripts"></iframe>'
        )


def explain(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int],
    max_new_tokens: int = 20,
    sampler: str | Sequence[str] = "temperature",
    *,
    temperature: float = 1.0,
    seed: int = 1337,
    prefix: Sequence[int] = (),
    k: int = 10,
    max_vocab: int = 4096,
    max_positions: int = 48,
    title: str = "arraygpt: inside one generation",
    **sampler_options: Any,
) -> Explanation:
    """Generate after ``prompt`` and build the interactive page.

    Args:
        max_new_tokens, sampler, temperature, seed, **sampler_options: as ``generate``; the
            sliders start at these settings.
        k: candidates listed per token.
        max_vocab: a larger vocabulary keeps only each step's ``max_vocab`` largest logits in the
            page (its distributions are then over those tokens; the page says so).
        max_positions: attention and lens show at most the last this many positions (a forward
            over those positions alone).

    The sliders start at the generation's settings. The page applies temperature, then top-k,
    top-p and min-p in that order (``make_sampler(["top_k", "top_p", "min_p"], ...)``); for a
    plugin's sampler or another order it says that its recomputation differs.
    """
    dist = plot_distributions(
        model,
        tokenizer,
        prompt,
        max_new_tokens,
        sampler,
        temperature=temperature,
        k=k,
        seed=seed,
        prefix=prefix,
        draw=False,
        **sampler_options,
    )
    context = _window(model, dist.prompt + dist.tokens)[-max_positions:]
    att = plot_attention(model, tokenizer, context, draw=False)
    lens = plot_logit_lens(model, tokenizer, context, k=5, draw=False)
    V = model.config.vocab_size
    steps = []
    for c, logits in zip(dist.candidates, dist.logits):
        if max_vocab < V:
            top = np.argsort(-logits, kind="stable")[:max_vocab]  # most likely first
            if c.token not in top:  # the drawn token takes the least likely one's place
                top = np.append(top[:-1], c.token)
            keep = np.sort(top)
        else:
            keep = np.arange(V)
        steps.append(
            {
                "token": c.token,
                "p_model": c.p_model,
                "p_sampler": c.p_sampler,
                "ids": keep.tolist(),
                "logits": logits[keep].tolist(),
            }
        )
    shown_ids = sorted(
        {i for s in steps for i in s["ids"]} | set(dist.prompt) | set(context) | {int(i) for i in lens.top_ids.ravel()}
    )
    n_generated = len(dist.tokens)
    names = dist.sampler_names  # the chain the generation ran: options turn samplers on too (repeat_penalty=)
    settings = {
        "temperature": 0.0 if "greedy" in names else float(temperature),
        "top_k": int(sampler_options.get("top_k", 0) or 0),
        "top_p": float(sampler_options.get("top_p", 1.0)),
        "min_p": float(sampler_options.get("min_p", 0.0)),
    }
    known = {"temperature", "greedy", *PAGE_SAMPLERS}
    in_order = [n for n in names if n in PAGE_SAMPLERS] == [n for n in PAGE_SAMPLERS if n in names]
    data = {
        "title": title,
        "sampler": dist.sampler,
        "settings": settings,
        "page_settings_exact": set(names) <= known and in_order,
        "vocab_size": V,
        "truncated": max_vocab < V,
        "labels": {str(i): dist.vocab[i] for i in shown_ids},
        "prompt": dist.prompt,
        "generated": dist.tokens,
        "steps": steps,
        "k": k,
        "window": {"tokens": context, "start": len(dist.prompt) + n_generated - len(context)},
        "attention": np.round(att.patterns, 6).tolist(),
        "lens": {
            "layers": lens.layer_names,
            "ids": lens.top_ids.tolist(),
            "probs": np.round(lens.top_probs, 6).tolist(),
        },
    }
    return Explanation(data=data, html=render_page(data), distributions=dist, attention=att, lens=lens)


def inline_json(value: Any) -> str:
    """``value`` as JSON that is safe inside ``<script type="application/json">``: ``<``, ``>``
    and ``&`` are written as JSON escapes (``\\u003c`` ...), which ``JSON.parse`` reads back as
    the same characters. They occur only inside JSON strings, so the escape is exact.

    Raises:
        ValueError: NaN or infinity in ``value`` (JSON has neither).

    Example:
        >>> inline_json({"t": "</script><!--"})
        '{"t":"\\\\u003c/script\\\\u003e\\\\u003c!--"}'
    """
    text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@functools.cache
def _asset(name: str) -> str:
    """One of the page's package files; refused if it holds text that would end its element early."""
    text = importlib.resources.files("arraygpt.viz").joinpath(name).read_text(encoding="utf-8")
    if name != "page.html" and any(s in text.lower() for s in _UNSAFE_INLINE):
        raise RuntimeError(f"arraygpt/viz/{name} holds one of {_UNSAFE_INLINE}, which would break the inlined page")
    return text


def render_page(data: dict[str, Any]) -> str:
    """The page for ``data`` (a JSON-able dict with a ``title``): page.html with page.css,
    page.js, the escaped title and :func:`inline_json` of the data filled in, in one pass."""
    parts = {
        "TITLE": html.escape(str(data["title"])),
        "STYLE": _asset("page.css"),
        "SCRIPT": _asset("page.js"),
        "DATA": inline_json(data),
    }
    return _PLACEHOLDER.sub(lambda m: parts[m.group(1)], _asset("page.html"))
