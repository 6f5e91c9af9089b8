"""``arraygpt backends``: the array backends, which one is active, whether each can run here, and
which kernel each kind of layer runs on the active backend (and why the others run the reference)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    from arraygpt.errors import PluginError
    from arraygpt.xp import ENV_VAR, BackendUnavailable, backend_factories, get_backend, load_backend

    try:
        active = get_backend().name
    except (ValueError, BackendUnavailable, PluginError) as e:
        active = f"none ({e})"
    print(f"active backend: {active}   (choose with {ENV_VAR})")
    for name in backend_factories():
        try:
            backend = load_backend(name)
            status = f"available   device={backend.device}   threads={backend.threads}"
        except BackendUnavailable as e:
            status = f"unavailable: {e}"
        except PluginError as e:
            status = f"broken: {e}"
        print(f"  {name:<18} {status}")
    if not active.startswith("none"):
        from arraygpt.config import GPTConfig
        from arraygpt.nn.kernels import ENV_VAR as KERNELS_ENV
        from arraygpt.nn.kernels import describe_kernels

        print(f"kernels on {active}, float32 ({KERNELS_ENV}=reference runs the reference everywhere):")
        for kind, kernel, why in describe_kernels(GPTConfig(), get_backend(), "float32"):
            print(f"  {kind:<22} {kernel:<24} {why}")
    return 0
