"""Built-in plugins: the optimizers, samplers and the tensorboard logger arraygpt ships, registered
through the same hooks a third-party plugin uses (see ``arraygpt.hookspecs``)."""
