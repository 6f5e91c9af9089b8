"""``arraygpt params``: the parameter count of a preset (with any GPTConfig override), by matrix
category, as a table with each category's shape, or as JSON.

The count is constant time in ``n_layer``: every layer has the same tensors, so the counts of one
and two layers give the per-layer counts, and any depth (``--n-layer 1000000000``) is
``counts(1) + (n_layer - 1) * (counts(2) - counts(1))``, exactly. Above :data:`MAX_NAMED_LAYERS`
layers the JSON's ``by_name`` gives each layer's tensors once, as ``layer*.NAME`` (the count of one
layer), instead of listing every layer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from arraygpt.cli.options import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default_preset="gpt3-175b")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


MAX_NAMED_LAYERS = 1024  # above this, by_name lists one layer's tensors as layer*.NAME


def counts_of(config: Any) -> tuple[int, dict[str, int], dict[str, int]]:
    """(total, by_category, by_name) of ``config``, in time independent of ``n_layer``.

    Returns ``arraygpt.count_params``'s counts; above :data:`MAX_NAMED_LAYERS` layers they are
    extended linearly from one and two layers, and ``by_name`` names one layer's tensors
    ``layer*.NAME``."""
    from arraygpt.nn.params import count_params

    if config.n_layer <= MAX_NAMED_LAYERS:
        c = count_params(config)
        return c.total, c.by_category, c.by_name
    one = count_params(dataclasses.replace(config, n_layer=1))
    two = count_params(dataclasses.replace(config, n_layer=2))
    extra = config.n_layer - 1
    total = one.total + extra * (two.total - one.total)
    by_category = {k: one.by_category[k] + extra * (two.by_category[k] - one.by_category[k]) for k in one.by_category}
    by_name = {
        (f"layer*.{name.split('.', 1)[1]}" if name.startswith("layer0.") else name): n
        for name, n in one.by_name.items()
    }
    return total, by_category, by_name


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    total, by_category, by_name = counts_of(config)
    if args.json:
        print(
            json.dumps(
                {"preset": args.preset, "total": total, "by_category": by_category, "by_name": by_name}, indent=2
            )
        )
        return 0
    L, C, D, H, V = config.n_layer, config.n_embd, config.attn_dim, config.mlp_hidden, config.vocab_size
    formulas = {
        "embedding": f"{V:,} x {C:,}",
        "key": f"{L} x {D:,} x {C:,}",
        "query": f"{L} x {D:,} x {C:,}",
        "value": f"{L} x {D:,} x {C:,}",
        "output": f"{L} x {C:,} x {D:,}",
        "up_projection": f"{L} x {H:,} x {C:,}",
        "down_projection": f"{L} x {C:,} x {H:,}",
        "unembedding": f"{V:,} x {C:,}" + (" (tied to embedding)" if config.tie_embeddings else ""),
        "other": "positions, norms, biases",
    }
    print(
        f"{args.preset}: n_layer={L} n_embd={C} n_head={config.n_head} head_dim={config.head_dim} "
        f"block_size={config.block_size} vocab_size={V}"
    )
    print(f"{'category':<16} {'shape':<36} {'parameters':>18}")
    for category, n in by_category.items():
        print(f"{category:<16} {formulas[category]:<36} {n:>18,}")
    print(f"{'total':<16} {'(distinct parameters)':<36} {total:>18,}")
    return 0
