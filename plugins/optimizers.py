"""Built-in optimizers, registered through the same hook a third-party plugin uses:
``sgd`` (with momentum), ``adam`` and ``adamw``.

Each follows the update rule of its PyTorch namesake (torch.optim docs; Kingma & Ba 2015 for Adam,
Loshchilov & Hutter 2019 for AdamW's decoupled weight decay) step for step, and updates the
parameters in place on their own backend. See ``arraygpt.training.optim`` for the contract.

Not here: schedules and clipping (``arraygpt.training.optim``), the training loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from arraygpt.hookspecs import hookimpl
from arraygpt.nn.kernels import AdamUpdate, select_update
from arraygpt.training.optim import Optimizer
from arraygpt.xp import backend_of, namespace

Array = Any


def _check_betas(betas: tuple[float, float], eps: float, weight_decay: float) -> tuple[float, float]:
    b1, b2 = (float(b) for b in betas)
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must each be in [0, 1), got {tuple(betas)!r}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    return b1, b2


def decay_2d(name: str, p: Array) -> bool:
    """The default weight-decay mask: matrices and embeddings (2-D) decay; gains and biases do not
    (GPT-2, nanoGPT's configure_optimizers)."""
    return p.ndim >= 2


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (torch.optim.SGD).

        g = grad + weight_decay * p
        buf = g (first step), else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf (nesterov), else buf
        p = p - lr * g

    Args:
        params: name -> backend array.
        momentum: 0 for plain SGD.
        dampening, nesterov, weight_decay: as in torch.optim.SGD (L2 added to the gradient).
    """

    elementwise = True  # zero may split a parameter's rows between ranks

    def __init__(
        self,
        params: Mapping[str, Array],
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ):
        if not momentum >= 0.0:
            raise ValueError(f"momentum must be >= 0, got {momentum!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening 0")
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.nesterov, self.weight_decay = bool(nesterov), float(weight_decay)
        self.buffer_names = ("momentum",) if momentum > 0 else ()
        super().__init__(params)

    def update(self, name: str, p: Array, g: Array, lr: float) -> None:
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            buf = self.buffers["momentum"][name]
            if self.t == 1:
                buf[...] = g
            else:
                buf *= self.momentum
                buf += (1.0 - self.dampening) * g
            g = g + self.momentum * buf if self.nesterov else buf
        p -= lr * g


class Adam(Optimizer):
    """Adam (torch.optim.Adam; Kingma & Ba 2015), with bias correction.

        g = grad + weight_decay * p                (L2, coupled; 0 by default)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    Args:
        params: name -> backend array.
        betas: (beta1, beta2); microgpt and GPT-3 use (0.9, 0.95), PyTorch defaults to (0.9, 0.999).
        eps: added to the denominator.
        weight_decay: L2 penalty added to the gradient (use AdamW for decoupled decay).
        decay_filter: ``(name, array) -> bool``, which parameters decay (default: all for Adam).
        kernels: None or ``"auto"``: a backend's one-pass update where one is registered (an
            ``arraygpt.nn.kernels.UpdateSpec`` for ``"adam"``, chosen by ``select_update``; the same
            numbers), ``"reference"``: the code below.
    """

    buffer_names = ("m", "v")
    decoupled = False
    elementwise = True  # zero may split a parameter's rows between ranks (the decay mask sees the rows' ndim)

    def __init__(
        self,
        params: Mapping[str, Array],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_filter: Callable[[str, Array], bool] | None = None,
        kernels: str | None = None,
    ):
        self.beta1, self.beta2 = _check_betas(betas, eps, weight_decay)
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        super().__init__(params)
        decay_filter = decay_filter or (decay_2d if self.decoupled else (lambda name, p: True))
        self.decays = {name: bool(decay_filter(name, p)) for name, p in params.items()}
        by_dtype: dict[str, AdamUpdate | None] = {}  # the backend's one-pass update per dtype, or None
        for p in params.values():
            if str(p.dtype) not in by_dtype:
                by_dtype[str(p.dtype)] = select_update("adam", backend_of(p), str(p.dtype), kernels)
        self.fused: dict[str, AdamUpdate | None] = {name: by_dtype[str(p.dtype)] for name, p in params.items()}

    def update(self, name: str, p: Array, g: Array, lr: float) -> None:
        wd = self.weight_decay if self.decays[name] else 0.0
        m, v = self.buffers["m"][name], self.buffers["v"][name]
        fused = self.fused[name]
        if fused is not None and fused(
            p,
            g,
            m,
            v,
            lr=lr,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            weight_decay=wd,
            decoupled=self.decoupled,
            step=self.t,
        ):
            return
        if wd:
            if self.decoupled:
                p *= 1.0 - lr * wd  # AdamW: decay the weights themselves, before the Adam step
            else:
                g = g + wd * p
        m *= self.beta1
        m += (1.0 - self.beta1) * g
        v *= self.beta2
        g2 = g * g
        g2 *= 1.0 - self.beta2  # in place: NumPy is slow on python_float * temporary
        v += g2
        bias_correction1 = 1.0 - self.beta1**self.t
        bias_correction2_sqrt = math.sqrt(1.0 - self.beta2**self.t)
        denom = namespace(v).sqrt(v)
        denom /= bias_correction2_sqrt
        denom += self.eps
        update = m / denom
        update *= lr / bias_correction1
        p -= update


class AdamW(Adam):
    """AdamW (torch.optim.AdamW; Loshchilov & Hutter 2019): Adam with decoupled weight decay,
    ``p = p * (1 - lr * weight_decay)`` before the Adam step, by default only on 2-D parameters
    (weights and embeddings, not gains and biases), as GPT-2 and nanoGPT do.

    Args:
        params, betas, eps, kernels: as Adam.
        weight_decay: decoupled decay (PyTorch's default 0.01; nanoGPT uses 0.1).
        decay_filter: ``(name, array) -> bool``, which parameters decay; default 2-D ones.
    """

    decoupled = True

    def __init__(
        self,
        params: Mapping[str, Array],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        decay_filter: Callable[[str, Array], bool] | None = None,
        kernels: str | None = None,
    ):
        super().__init__(
            params, betas=betas, eps=eps, weight_decay=weight_decay, decay_filter=decay_filter, kernels=kernels
        )


@hookimpl
def arraygpt_register_optimizers():
    return [{"sgd": SGD, "adam": Adam, "adamw": AdamW}]
