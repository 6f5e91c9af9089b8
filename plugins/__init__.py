"""Built-in plugins: the optimizers and samplers arraygpt ships, registered through the same hooks
a third-party plugin uses (see ``arraygpt.hookspecs``)."""
