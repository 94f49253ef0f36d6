"""The round kernel: one step's update of the rows a process holds, shared by the simulator and the
distributed engine.

Rows are nodes. A process holds ``workers_local`` worker rows first (all m in the simulator, its own one
on a distributed rank), then auxiliary rows. Columns are ``[float buffers (b) | parameters (d) |
momentum (d, only with momentum > 0)]``. One step with learning rate ``lr`` ([CSGD] eq. (10), Remark 1):

1. the direction D of the active worker rows: the gradient, or torch.optim.SGD's momentum / Nesterov /
   weight-decay direction (:func:`coopsgd.engines.optim.sgd_direction_`); the rows' float buffers become
   the ones after this step's forward pass;
2. ``post_mix``: ``x <- x - lr D`` then the round; ``pre_mix``: the round then ``x <- x - lr D``;
3. the round ``X <- X S`` over the contiguous column range the policies mix (buffers+params, params,
   params+momentum or all three) -- through a :class:`~coopsgd.engines.base.Communicator`: in-process
   (:class:`InProcess`, one matrix product over every node) or the distributed engine's collectives;
4. policies after a round: optimizer state ``"reset"`` zeroes every momentum row after a communicating
   round; ``"mix"`` zeroes the auxiliaries' momentum again (auxiliaries hold none).

The engines differ only in the communicator and in which rows they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from coopsgd.algorithms.schedules import Mix
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.base import Communicator
from coopsgd.engines.mixing import apply_mixing, round_plan
from coopsgd.engines.optim import SGDOptions, sgd_direction_

__all__ = ["RoundKernel", "InProcess", "mix_columns"]


class InProcess:
    """The simulator's communicator: every node is in this process.

    A round is applied by the cheapest exact kernel for the structure of S
    (:func:`coopsgd.engines.mixing.mix_rows_`: averaging, neighbour gather, only the changed rows); a
    matrix with no usable structure is one dense product over every node (:func:`apply_mixing`).
    """

    pending = False

    def mix(self, rows: Tensor, S: np.ndarray, *, overlap: bool = False) -> None:
        plan = round_plan(S)
        if plan.kind == "dense" and plan.targets is None:
            rows.copy_(apply_mixing(rows, S))
        else:
            plan.apply_(rows)

    def finalize(self) -> None:
        return None

    def gather_floats(self, values: np.ndarray | float) -> np.ndarray:
        return np.atleast_2d(np.asarray(values, dtype=np.float64))


def mix_columns(spec: AlgorithmSpec, b: int, d: int, opts: SGDOptions) -> tuple[int, int]:
    """The contiguous column range a round mixes, from the buffer and optimizer-state policies."""
    lo = 0 if spec.policies.buffers == "mix" else b
    hi = b + d + (d if opts.stateful and spec.policies.optimizer_state == "mix" else 0)
    return lo, hi


@dataclass
class RoundKernel:
    """Applies one step to a process's rows (see the module docstring).

    Attributes:
        spec: the algorithm (rule, policies, overlap).
        opts: the workers' SGD options.
        b, d: float-buffer and parameter widths.
        workers_local: how many of the rows are workers (the rest are auxiliaries).
        comm: how a round is communicated.
    """

    spec: AlgorithmSpec
    opts: SGDOptions
    b: int
    d: int
    workers_local: int
    comm: Communicator

    def __post_init__(self) -> None:
        self.cols = mix_columns(self.spec, self.b, self.d, self.opts)

    def zero_aux_momentum(self, state: Tensor) -> None:
        """Auxiliaries hold no momentum: their momentum columns are zero."""
        if self.opts.stateful and state.shape[0] > self.workers_local:
            state[self.workers_local :, self.b + self.d :].zero_()

    def apply(
        self,
        state: Tensor,
        grads: Tensor | None,
        rows: Tensor | None,
        new_buffers: Tensor | None,
        mom_init: Tensor,
        mix: Mix | None,
        lr: float,
        on_round: Callable[[], None] | None = None,
    ) -> None:
        """One step on ``state`` (modified in place; ``grads`` is scratch).

        Args:
            state: the process's rows (workers first).
            grads: (k, d) gradients of the active worker rows, or ``None`` when no worker of this process
                updates in this step (inactive, or dropped under ``nan_policy="skip"``).
            rows: indices of the active worker rows (a tensor on the state's device), ``None`` for all.
            new_buffers: (k, b) float buffers after this step's forward pass, or ``None``.
            mom_init: (workers_local,) bool, whether each worker row already has a momentum buffer.
            mix: the round after this step, or ``None`` (S = I).
            lr: the learning rate.
            on_round: called right before the round is communicated (timing and liveness hooks).
        """
        b, d, w = self.b, self.d, self.workers_local
        stateful = self.opts.stateful
        P = state[:, b : b + d]
        Mo = state[:, b + d :] if stateful else None
        D = None
        if grads is not None:
            if rows is None:
                X = P[:w]
                buf = None if Mo is None else Mo[:w]
                init = mom_init
            else:
                X = P.index_select(0, rows)
                buf = None if Mo is None else Mo.index_select(0, rows)
                init = mom_init.index_select(0, rows)
            D = sgd_direction_(grads, X, buf, init if Mo is not None else None, self.opts)
            if rows is not None and Mo is not None:
                assert buf is not None
                Mo.index_copy_(0, rows, buf)
            if new_buffers is not None and b:
                if rows is None:
                    state[:w, :b].copy_(new_buffers)
                else:
                    state[:, :b].index_copy_(0, rows, new_buffers)
        pre = self.spec.rule == "pre_mix" and mix is not None
        if D is not None and not pre:
            if rows is None:
                X.sub_(D, alpha=lr)
            else:
                P.index_copy_(0, rows, X - lr * D)
        if mix is None:
            return
        lo, hi = self.cols
        if on_round is not None:
            on_round()
        self.comm.mix(state[:, lo:hi], np.asarray(mix.matrix, dtype=np.float64), overlap=self.spec.overlap)
        if D is not None and pre:
            if rows is None:
                P[:w].sub_(D, alpha=lr)
            else:
                P.index_add_(0, rows, D, alpha=-lr)
        if Mo is not None:
            if self.spec.policies.optimizer_state == "reset" and mix.communicates:
                Mo.zero_()
            elif self.spec.policies.optimizer_state == "mix":
                self.zero_aux_momentum(state)

    @staticmethod
    def as_rows(rows: list[int] | None, device: torch.device) -> Tensor | None:
        return None if rows is None else torch.as_tensor(rows, device=device)
