"""Pictures of a model (matplotlib, imported only inside the functions that draw) and the one
self-contained interactive page."""

from arraygpt.viz.figures import (
    explain,
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
