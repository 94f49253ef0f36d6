"""SGD with momentum / Nesterov / weight decay on stacked worker rows (torch.optim.SGD semantics).

For one worker with gradient g, parameters x and momentum buffer buf (``dampening = 0``)::

    g' = g + wd * x
    buf = g'                       at the worker's first step
    buf = mu * buf + g'            afterwards
    D = g' + mu * buf  (nesterov)  or  buf  (momentum)  or  g'  (mu = 0)

and the update direction D replaces the gradient in the framework's update rule ([CSGD] eq. (10)). The
same operations as ``torch.optim.SGD`` in the same order, applied to all rows at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from coopsgd.errors import ConfigError, check_float

__all__ = ["SGDOptions", "sgd_direction_"]


@dataclass(frozen=True)
class SGDOptions:
    """Optimizer settings shared by all workers (``momentum`` mu, ``nesterov``, ``weight_decay`` wd)."""

    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "momentum", check_float("momentum", self.momentum, low=0.0))
        object.__setattr__(self, "weight_decay", check_float("weight_decay", self.weight_decay, low=0.0))
        if not isinstance(self.nesterov, bool):
            raise ConfigError.invalid("nesterov", self.nesterov, "must be True or False")
        if self.nesterov and self.momentum == 0.0:
            raise ConfigError.invalid("nesterov", True, "Nesterov momentum needs momentum > 0")

    @property
    def stateful(self) -> bool:
        """True when each worker keeps a momentum buffer."""
        return self.momentum > 0.0


def sgd_direction_(
    grads: Tensor, params: Tensor, buf: Tensor | None, initialized: Tensor | None, opts: SGDOptions
) -> Tensor:
    """Return the update direction D for stacked rows; modifies ``grads`` (scratch) and ``buf`` in place.

    Args:
        grads: (k, d) stochastic gradients; overwritten (it becomes g' and, with Nesterov, D).
        params: (k, d) current parameters (read for weight decay).
        buf: (k, d) momentum rows (updated in place), or ``None`` when ``opts.momentum == 0``.
        initialized: (k,) bool, whether each row already has a momentum buffer (torch creates it at the
            first step as a copy of g').
        opts: the optimizer settings.
    """
    g = grads
    if opts.weight_decay != 0.0:
        g.add_(params, alpha=opts.weight_decay)
    if not opts.stateful:
        return g
    assert buf is not None and initialized is not None
    mu = opts.momentum
    if bool(initialized.all()):
        buf.mul_(mu).add_(g)
    else:
        new = torch.where(initialized[:, None], buf * mu + g, g)
        buf.copy_(new)
    if opts.nesterov:
        return g.add_(buf, alpha=mu)
    return buf
