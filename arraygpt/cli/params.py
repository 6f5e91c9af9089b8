"""``arraygpt params``: the parameter count of a preset (with any GPTConfig override), by matrix
category, as a table with each category's shape, or as JSON."""

from __future__ import annotations

import argparse
import json

from arraygpt.cli.options import add_config_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, default_preset="gpt3-175b")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from arraygpt.model import count_params

    config = config_from_args(args)
    counts = count_params(config)
    if args.json:
        print(json.dumps({"preset": args.preset, "total": counts.total, "by_category": counts.by_category,
                          "by_name": counts.by_name}, indent=2))  # fmt: skip
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
    print(f"{args.preset}: n_layer={L} n_embd={C} n_head={config.n_head} head_dim={config.head_dim} "
          f"block_size={config.block_size} vocab_size={V}")  # fmt: skip
    print(f"{'category':<16} {'shape':<36} {'parameters':>18}")
    for category, n in counts.by_category.items():
        print(f"{category:<16} {formulas[category]:<36} {n:>18,}")
    print(f"{'total':<16} {'(distinct parameters)':<36} {counts.total:>18,}")
    return 0
