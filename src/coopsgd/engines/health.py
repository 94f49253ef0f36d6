"""Non-finite values, shared by the simulator and the distributed engine.

* :func:`diverged` -- the one :class:`~coopsgd.engines.base.NonFiniteError` message for a NaN/Inf loss,
  gradient, buffer or model (it names the node and the step, and what to try);
* :func:`absmax` and :func:`step_bound` -- the simulator's running bound on |state|, which lets a step be
  applied in place (no full copy of the state per step) when no value can overflow.

The rows' snapshot for a rollback under ``nan_policy="skip"`` is :meth:`coopsgd.engines.rows.ModelRows._snapshot_rows`
/ :meth:`~coopsgd.engines.rows.ModelRows._restore_rows`; each engine decides *when* a round is dropped (the
simulator sees every worker, a distributed rank gathers the others' health flags).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from coopsgd.engines.base import NonFiniteError
from coopsgd.engines.optim import AdamOptions, InnerOptimizer, SGDOptions

__all__ = ["diverged", "absmax", "step_bound"]


def diverged(what: str, node: int, step: int, *, auxiliary: bool = False,
             workers: Sequence[int] = ()) -> NonFiniteError:
    """The error for a non-finite ``what`` (``"loss"``, ``"gradient"``, ...) first seen on ``node`` at ``step``
    (``auxiliary``: an auxiliary node's row); ``workers``: every worker found non-finite."""
    kind = "auxiliary node" if auxiliary else "worker"
    return NonFiniteError(
        f"non-finite {what} on {kind} {node} at step {step}: the run diverged "
        f"(try a smaller learning rate, or for EASGD alpha < 2/(m+1))",
        workers=list(workers),
    )


def absmax(t: Tensor) -> float:
    """max |t| (NaN if t holds a NaN; inf if an inf) in one fast pass (aminmax is ~20x faster than inf-norm)."""
    if t.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(t)
    a, b = abs(float(lo)), abs(float(hi))
    return a if (math.isnan(a) or a > b) else b


def step_bound(opts: InnerOptimizer, X: float, gmax: float, lr: float) -> float:
    """A bound on |state| after one step from |state| <= X and |gradient| <= gmax, before the round
    (``inf``: none known, the step is checked on a copy). SGD: |x| + lr |D| with D's own bound. Adam: the
    moments stay below max(X, g, g^2) and |exp_avg_hat| / (sqrt(exp_avg_sq_hat) + eps) <= max(X, g) /
    ((1 - beta1) eps)."""
    if isinstance(opts, SGDOptions):
        g1 = gmax + opts.weight_decay * X
        buf = opts.momentum * X + g1
        D = g1 + opts.momentum * buf if opts.nesterov else (buf if opts.stateful else g1)
        return X + lr * D
    if not isinstance(opts, AdamOptions):
        return math.inf
    wd = opts.weight_decay
    g = gmax + (0.0 if opts.decoupled else wd * X)
    step = max(X, g) / ((1.0 - opts.betas[0]) * opts.eps) + wd * X
    return max(X + lr * step, g, g * g)
