"""Pictures of a model (``figures``: matplotlib, imported only inside the functions that draw) and
the one self-contained interactive page (``page``: its HTML, style and script are package data).
Every file is written atomically (``output``)."""

from arraygpt.viz.figures import (
    nearest_neighbours,
    pca,
    plot_attention,
    plot_distributions,
    plot_embeddings,
    plot_logit_lens,
    plot_param_tally,
    plot_training_curves,
    prompt_ids,
    token_label,
)
from arraygpt.viz.page import explain

__all__ = [
    "explain",
    "nearest_neighbours",
    "pca",
    "plot_attention",
    "plot_distributions",
    "plot_embeddings",
    "plot_logit_lens",
    "plot_param_tally",
    "plot_training_curves",
    "prompt_ids",
    "token_label",
]
