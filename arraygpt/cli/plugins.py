"""``arraygpt plugins``: every registered backend, optimizer and sampler, and the plugin that
registered it (built-ins included)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    from arraygpt.manager import REGISTRY_HOOKS, registry_with_owners

    for kind in REGISTRY_HOOKS:
        print(f"{kind}:")
        for name, (_, plugin) in registry_with_owners(kind).items():
            print(f"  {name:<18} from {plugin}")
    return 0
