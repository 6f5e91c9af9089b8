"""Built-in optimizers (filled in by the optimizers work)."""

from arraygpt.hookspecs import hookimpl


@hookimpl
def arraygpt_register_optimizers():
    return []
