"""Built-in samplers (filled in by the samplers work)."""

from arraygpt.hookspecs import hookimpl


@hookimpl
def arraygpt_register_samplers():
    return []
