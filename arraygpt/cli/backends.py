"""``arraygpt backends``: the array backends, which one is active, and whether each can run here."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    from arraygpt.shim import ENV_VAR, BackendUnavailable, backend_factories, get_backend, load_backend

    try:
        active = get_backend().name
    except (ValueError, BackendUnavailable) as e:
        active = f"none ({e})"
    print(f"active backend: {active}   (choose with {ENV_VAR})")
    for name in backend_factories():
        try:
            backend = load_backend(name)
            status = f"available   device={backend.device}   threads={backend.threads}"
        except BackendUnavailable as e:
            status = f"unavailable: {e}"
        print(f"  {name:<18} {status}")
    return 0
