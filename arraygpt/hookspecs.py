"""The plugin hooks of arraygpt (pluggy). Built-in backends, optimizers and samplers use these
same hooks, as ordinary plugins.

Registry hooks return a list of ``{name: object}`` dicts; the host flattens them and raises on a
name offered twice (see ``arraygpt.manager.registry``). Hooks are called with keyword arguments,
so an implementation may accept a subset of a spec's arguments, and a spec can gain arguments
without breaking plugins. Pluggy calls implementations last-registered first: third-party plugins
(registered after the built-ins) run before them.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT_NAME = "arraygpt"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def arraygpt_register_backends() -> list[dict[str, Any]]:
    """Offer array backends.

    Returns:
        A list of ``{name: factory}``; ``factory()`` returns an ``arraygpt.xp.Backend`` or raises
        ``arraygpt.xp.BackendUnavailable`` saying what is missing. It is called on first use
        only, so registering a backend imports nothing heavy.
    """


@hookspec
def arraygpt_register_optimizers() -> list[dict[str, Any]]:
    """Offer optimizers.

    Returns:
        A list of ``{name: factory}``; ``factory(params, **options)`` returns an optimizer (see
        ``arraygpt.training.optim``).
    """


@hookspec
def arraygpt_register_samplers() -> list[dict[str, Any]]:
    """Offer samplers for generation (the contract in full: ``arraygpt.generation.sampling``).

    Returns:
        A list of ``{name: factory}``. ``factory(**options)`` checks its options (a ``ValueError``
        naming the option and its allowed range) and returns a filter. A filter maps (B, V)
        probabilities (after the temperature) to (B, V) non-negative weights, zero for a removed
        token; or, with the attribute ``stage = "logits"``, (B, V) logits to (B, V) logits, before
        the temperature. A filter that takes a keyword parameter ``context`` is given the (B, T)
        token ids so far (the prompt and what was generated), read-only. Filters are pure (array
        API standard only, no random numbers, no state); what a filter returns is checked (shape,
        sign, NaN) and a violation is a ``PluginError`` naming the plugin. An option named like a
        registered sampler turns that sampler on.
    """


@hookspec
def arraygpt_register_kernels() -> list[dict[str, Any]]:
    """Offer fused kernels: forward/backward pairs that replace a layer's reference pair of
    ``arraygpt.nn.layers`` on some backends and dtypes, and optimizer updates that replace an
    optimizer's reference update (see ``arraygpt.nn.kernels``).

    Returns:
        A list of ``{name: arraygpt.nn.kernels.KernelSpec or UpdateSpec}``. A spec loads its kernel
        (imports and compiles) only when it is first selected, so registering imports nothing heavy.
        For each layer kind the model runs the highest-priority spec that takes its config,
        backend and dtype (among equals, the last registered plugin's), else the reference.
    """


@hookspec
def arraygpt_register_loggers() -> list[dict[str, Any]]:
    """Offer loggers: writers of a training run's metrics (TensorBoard's event files, a service),
    each turned on for one run by name (``arraygpt train --log NAME``), never by being installed.

    Returns:
        A list of ``{name: factory}``. ``factory(log_dir=None)`` imports what the logger needs
        (else raises an ``ImportError`` saying what to install) and returns a plugin object that
        implements the training-event hooks below; the command registers it for the run and then
        calls its ``close()``, if it has one. ``log_dir``: where to write (None: the run folder's
        ``<name>/``). Rank 0 alone sees the events.
    """


@hookspec
def arraygpt_on_step(run: Any, step: int, metrics: dict[str, float]) -> bool | None:
    """Called after every optimizer step of a training run, every implementation in turn
    (last registered first); a plugin that raises stops the run with an error naming it.

    Args:
        run: the running ``arraygpt.training.run.Run`` (config, model, optimizer, tokenizer, out_dir;
            ``run.request_stop()`` also stops it).
        step: the number of steps done so far (1 after the first step).
        metrics: ``loss`` (of this step's batch), ``lr`` (the rate this step used),
            ``tokens_per_s``, and ``grad_norm`` when gradients are clipped.

    Returns:
        ``True`` to stop the run after this step (a checkpoint is saved first, when the run has
        a folder); else ``None``.
    """


@hookspec
def arraygpt_on_eval(run: Any, step: int, metrics: dict[str, float]) -> bool | None:
    """Called after each periodic evaluation of a training run (and after ``best/`` is saved
    when the val loss improved).

    Args:
        run: the running ``arraygpt.training.run.Run``.
        step: the number of steps done so far.
        metrics: ``train_loss`` and ``val_loss`` (mean loss per predicted token; ``val_loss`` is
            absent when the run has no validation split).

    Returns:
        ``True`` to stop the run (a checkpoint is saved first); else ``None``.
    """


@hookspec
def arraygpt_on_checkpoint(run: Any, step: int, path: str) -> None:
    """Called after a checkpoint has been written completely (atomically).

    Args:
        run: the running ``arraygpt.training.run.Run``.
        step: the step the checkpoint holds.
        path: the checkpoint folder (the run's ``last`` or ``best``); ``load_checkpoint(path)``
            reads it.
    """
