"""The round kernel: one step's update of the rows a process holds, shared by the simulator and the
distributed engine.

Rows are nodes. A process holds ``workers_local`` worker rows first (all m in the simulator, its own one
on a distributed rank), then auxiliary rows. Columns are ``[float buffers (b) | parameters (d) | optimizer
state fields (d each: SGD's momentum with momentum > 0; Adam's exp_avg, exp_avg_sq[, max_exp_avg_sq])]``.
One step with learning rate ``lr`` ([CSGD] eq. (10), Remark 1):

1. the update of the active worker rows: SGD's direction D (the gradient, or torch.optim.SGD's momentum /
   Nesterov / weight-decay direction, :func:`coopsgd.engines.optim.sgd_direction_`), or the increment of
   another inner optimizer's step (Adam, AdamW, a torch optimizer class); the rows' float buffers become
   the ones after this step's forward pass;
2. ``post_mix``: ``x <- x - lr D`` (``x <- x + increment``) then the round; ``pre_mix``: the round, then
   the update computed before it;
3. the round ``X <- X S`` over the contiguous column range the policies mix (buffers+params, params,
   params+state fields or all three) -- through a :class:`~coopsgd.engines.base.Communicator`: in-process
   (:class:`InProcess`, one matrix product over every node) or the distributed engine's collectives;
4. policies after a round: optimizer state ``"reset"`` zeroes every state field (and restarts the step
   counts) after a communicating round; ``"mix"`` zeroes the auxiliaries' fields again (auxiliaries hold
   none);
5. an outer round (``spec.outer``, a round tagged ``info["outer"]``): the auxiliary z takes its outer
   optimizer's step on ``z - average`` and every worker restarts from z (:meth:`RoundKernel.outer_round`).
   A round that leaves z alone (DiLoCo's, SlowMo's ``blockdiag(J_m, 1)``) leaves the average in the worker
   rows; a round that writes z (FedAvg's, for the federated server optimizers: the sampled clients' average
   sent to every node) leaves it in z's row, and z's value from before the round is kept for the step.

SCAFFOLD (``spec.control``): the columns after the optimizer state hold each node's control variate (never
mixed); a local step adds ``c - c_i`` to the gradient, and before a round each sampled client's
``c_i <- c_i - c + (z - y_i) / (tau lr)`` is computed and the server's ``c <- c + (1/m) sum_S (c_i^+ - c_i)``
(:meth:`RoundKernel.control_round`: in process a sum over the sampled rows; elsewhere one more transport of
the round's plan, so the control variates cost what the models cost).

FedProx (``spec.prox`` = mu > 0): the active workers' gradients get ``mu (x_i - z)`` before the inner
optimizer reads them, z being the first auxiliary row (the server model, held by every process of the
FedAvg family). z is the model every client received at its last round, so the proximal anchor needs no
state of its own: it is checkpointed, rolled back and sampled with the rows.

One path serves every inner optimizer (:meth:`RoundKernel.apply`); SGD's update is the one the engines had
before other optimizers existed, operation for operation (its direction is added with ``alpha = -lr``).

Robust aggregation (``spec.robust``, :mod:`coopsgd.algorithms.robust`): a FedAvg round's aggregate is the rule's
(median, trimmed mean, Krum, multi-Krum) of what the sampled clients send (Byzantine ones an attacked model);
:class:`~coopsgd.engines.aggregation.RobustRounds` writes it into one sampled row and the communicator sends that
row to every node, as FedAvg's round sends the mean. A server optimizer then steps on it. A robust rule needs
every sampled model in one place: a process that holds one client (a distributed rank) all-gathers every rank's
row and computes the same aggregate (:meth:`RoundKernel._robust_gathered`).

The engines differ only in the communicator and in which rows they hold: the kernel hands each round
(a :class:`~coopsgd.engines.mixing.Round` from :func:`~coopsgd.engines.mixing.plan_round`) to its
:class:`~coopsgd.engines.base.Communicator` and never asks which one it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from coopsgd.algorithms.schedules import round_lr_sums
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.algorithms.streaming import fragment_bounds
from coopsgd.engines.aggregation import RobustRounds
from coopsgd.engines.base import Communicator
from coopsgd.engines.compressed import CompressedRounds
from coopsgd.engines.mixing import Round, RoundKind, RoundPlan, apply_mixing, plan_round
from coopsgd.engines.optim import (
    AdamOptions,
    InnerOptimizer,
    OuterRuntime,
    SGDOptions,
    TorchOptimizer,
    sgd_direction_,
)
from coopsgd.errors import ConfigError

__all__ = ["RoundKernel", "InProcess", "mix_columns"]


class InProcess:
    """The simulator's communicator: every node is in this process.

    A round is applied by the cheapest exact kernel for its plan's structure (:class:`RoundPlan`: average,
    neighbour gather, chain, only the changed rows); a matrix with no usable structure is one dense product
    over every node (:func:`apply_mixing`). Sending and combining are fused into these in-place kernels;
    a compressed round (:class:`~coopsgd.engines.compressed.CompressedRounds`, the kernel's ``compressed``
    stage) takes its payloads from the plan's source rows and combines the decoded payloads with the plan's
    weights, and hands this communicator only what it does not compress.

    Deferred broadcasts (``lazy_rows``, the simulator passes m unless an outer optimizer reads the
    workers): an averaging round whose sources are a strict subset of rows ``[0, lazy_rows)`` (FedAvg's
    sampled clients) does not write its value into the changed rows below ``lazy_rows``; it keeps the
    value (one row) and the set of rows that hold it, and the engine :meth:`materialize` s those rows
    before anything reads them (the next step's active workers, or every row before the state is read from
    outside). The next averaging round that overwrites every deferred row without reading any of them
    just replaces the value, so sampling c m of m clients costs O(c m) rows per round, not O(m).
    """

    pending = False

    def __init__(self, lazy_rows: int = 0) -> None:
        self.lazy_rows = int(lazy_rows)
        self._value: Tensor | None = None  # (1, width): what every deferred row holds
        self._deferred: np.ndarray | None = None  # bool (n,): rows whose mixed columns are deferred

    @property
    def deferred(self) -> np.ndarray | None:
        """Bool mask of the rows whose mixed columns are deferred (``None``: none)."""
        return self._deferred

    def deferred_value(self) -> Tensor | None:
        """The (1, width) row every deferred row holds (``None``: none deferred)."""
        return self._value

    def materialize(self, rows: Tensor, which: list[int] | None = None) -> None:
        """Write the deferred value into the deferred rows among ``which`` (``None``: all of them)."""
        pend = self._deferred
        if pend is None:
            return
        if which is None:
            idx = np.flatnonzero(pend)
        else:
            w = np.asarray(which, dtype=np.int64)
            idx = w[pend[w]]
        if idx.size:
            assert self._value is not None
            t = torch.as_tensor(idx, device=rows.device)
            rows.index_copy_(0, t, self._value.expand(idx.size, rows.shape[1]))
            pend[idx] = False
        if which is None or not pend.any():
            self.clear()

    def set_deferred(self, offset: int, value: Tensor) -> None:
        """Replace columns ``offset .. offset + len(value)`` (of the mixed range) of the value every deferred row
        holds (an outer step that moved the broadcast model after the round)."""
        assert self._value is not None
        self._value[0, offset : offset + value.shape[-1]].copy_(value)

    def clear(self) -> None:
        """Forget the deferred rows (after the state was replaced)."""
        self._value, self._deferred = None, None

    def snapshot(self) -> tuple[Tensor, np.ndarray] | None:
        if self._deferred is None:
            return None
        assert self._value is not None
        return self._value.clone(), self._deferred.copy()

    def restore(self, snap: tuple[Tensor, np.ndarray] | None) -> None:
        if snap is None:
            self.clear()
        else:
            self._value, self._deferred = snap[0].clone(), snap[1].copy()

    def _overwrites(self, plan: RoundPlan) -> bool:
        """Whether ``plan`` writes every deferred row and reads none (their old value is never needed)."""
        pend = self._deferred
        assert pend is not None
        if plan.kind is not RoundKind.AVERAGE or plan.sources is None:
            return False
        if pend[plan.sources].any():
            return False
        return plan.targets is None or bool(np.isin(np.flatnonzero(pend), plan.targets).all())

    def _lazy(self, plan: RoundPlan) -> bool:
        """Whether an averaging round may leave its rows below ``lazy_rows`` deferred: its sources among those
        rows are a strict subset of them (sampled clients; FedNova's server row may be a source too, it is never
        deferred), so most of them are not read before the next round."""
        src = plan.sources
        if self.lazy_rows <= 0 or plan.kind is not RoundKind.AVERAGE or src is None:
            return False
        below = int(np.count_nonzero(src < self.lazy_rows))
        return 0 < below < self.lazy_rows

    def communicate(self, rows: Tensor, rnd: Round, *, overlap: bool = False) -> None:
        """Apply the round ``rnd`` to ``rows`` (every node) in place."""
        plan = rnd.plan
        if plan.kind is RoundKind.IDENTITY:
            return
        if self._deferred is not None:
            if self._overwrites(plan):
                self.clear()
            else:
                self.materialize(rows)
        if self._lazy(plan):
            self._average_lazily(rows, plan)
        elif plan.kind is RoundKind.DENSE and plan.targets is None:
            rows.copy_(apply_mixing(rows, rnd.matrix))
        else:
            plan.apply_(rows)

    def _average_lazily(self, rows: Tensor, plan: RoundPlan) -> None:
        """An averaging round that writes only the rows at or above ``lazy_rows`` and defers the others."""
        tg = np.arange(plan.n) if plan.targets is None else plan.targets
        lazy = tg < self.lazy_rows
        y = plan.average(rows)
        eager = tg[~lazy]
        if eager.size:
            rows.index_copy_(0, torch.as_tensor(eager, device=rows.device), y.expand(eager.size, rows.shape[1]))
        self._value = y
        self._deferred = np.zeros(plan.n, dtype=bool)
        self._deferred[tg[lazy]] = True

    def mix(self, rows: Tensor, S: np.ndarray, *, overlap: bool = False) -> None:
        """:meth:`communicate` of a bare matrix S (planned by :func:`plan_round`)."""
        self.communicate(rows, plan_round(S), overlap=overlap)

    def finalize(self) -> None:
        return None

    def gather_floats(self, values: np.ndarray | float) -> np.ndarray:
        return np.atleast_2d(np.asarray(values, dtype=np.float64))


def mix_columns(spec: AlgorithmSpec, b: int, d: int, opts: InnerOptimizer) -> tuple[int, int]:
    """The contiguous column range a round mixes, from the buffer and optimizer-state policies."""
    lo = 0 if spec.policies.buffers == "mix" else b
    hi = b + d + (len(opts.fields) * d if spec.policies.optimizer_state == "mix" else 0)
    return lo, hi


@dataclass
class RoundKernel:
    """Applies one step to a process's rows (see the module docstring).

    Attributes:
        spec: the algorithm (rule, policies, overlap, outer optimizer).
        opts: the workers' inner optimizer (:mod:`coopsgd.engines.optim`).
        b, d: float-buffer and parameter widths.
        workers_local: how many of the rows are workers (the rest are auxiliaries).
        comm: how a round is communicated (any :class:`~coopsgd.engines.base.Communicator`; the kernel
            never asks which).
        outer: the auxiliary node's outer optimizer (its state), when ``spec.outer`` is set; z is the first
            auxiliary row (row ``workers_local``).
        compressed: the compression stage of a spec with compression (``spec.compressed``; SPEC §11): it
            selects, encodes, decodes and combines what each node sends and hands what is not compressed
            to ``comm`` (:class:`~coopsgd.engines.compressed.CompressedRounds`). ``None``: every round goes
            to ``comm`` as it is.
        worker_ids: the workers the first ``workers_local`` rows are (``None``: 0, 1, ...; a distributed rank
            passes its own), for SCAFFOLD's sampled clients.
        param_sizes: the sizes of the parameter tensors in order (``None``: one vector of d), from which a
            Streaming DiLoCo round's fragment columns follow (:func:`~coopsgd.algorithms.streaming.fragment_bounds`).
        fragment_stages: per fragment, the compression stage of its columns (Streaming DiLoCo with compression;
            built by the engine from :meth:`fragment_columns`), or ``None``.
    """

    spec: AlgorithmSpec
    opts: InnerOptimizer
    b: int
    d: int
    workers_local: int
    comm: Communicator
    outer: OuterRuntime | None = None
    compressed: CompressedRounds | None = None
    worker_ids: tuple[int, ...] | None = None
    param_sizes: tuple[int, ...] | None = None
    fragment_stages: list[CompressedRounds] | None = None

    def __post_init__(self) -> None:
        self.cols = mix_columns(self.spec, self.b, self.d, self.opts)
        # Streaming DiLoCo: delayed fragment rounds whose outer step waits for the reduction (fragment -> z's
        # columns before the round, lr, the columns, the round); empty whenever the communicator is not pending
        self._inflight: dict[int, tuple[Tensor, float, int, int, Round]] = {}
        self.nfields = len(self.opts.fields)
        self.sgd = isinstance(self.opts, SGDOptions)
        self.fields_end = self.b + self.d + self.nfields * self.d  # SCAFFOLD's control columns follow
        ids = tuple(range(self.workers_local)) if self.worker_ids is None else tuple(self.worker_ids)
        self.worker_ids = ids
        plain_sgd = isinstance(self.opts, SGDOptions) and self.opts.momentum == 0.0 and not self.opts.nesterov
        if self.spec.control and not plain_sgd:
            # option II's (z - y_i) / (tau lr) is the round's mean gradient only for plain SGD steps: with
            # momentum it is the mean momentum buffer, with Adam its normalised direction
            raise ConfigError.invalid(
                "optimizer", getattr(self.opts, "momentum", type(self.opts).__name__),
                "SCAFFOLD's control variates (option II) need plain SGD steps: momentum 0, no Nesterov, not Adam")
        if getattr(self.spec.schedule, "normalized", False) and not plain_sgd:  # FedNova's a_i = K_i: plain SGD's
            raise ConfigError.invalid(
                "optimizer", getattr(self.opts, "momentum", type(self.opts).__name__),
                "FedNova's normalized averaging needs plain SGD steps: momentum 0, no Nesterov, not Adam")
        self.robust: RobustRounds | None = None
        if self.spec.robust is not None:
            in_process = isinstance(self.comm, InProcess) and self.workers_local == self.spec.workers
            one_client = (self.workers_local == 1 and callable(getattr(self.comm, "all_gather", None))
                          and self.worker_ids is not None)
            if not (in_process or one_client):
                raise ConfigError.invalid("aggregation", self.spec.robust.rule, "robust aggregation and simulated "
                                          "attackers need every sampled model: all clients in one process, or one "
                                          "client per process with an all-gather")
            lo = self.cols[0]
            self.robust = RobustRounds(self.spec.robust, self.workers_local,
                                       slice(self.b - lo, self.b - lo + self.d))

    def zero_aux_momentum(self, state: Tensor) -> None:
        """Auxiliaries hold no optimizer state: their state-field columns are zero."""
        if self.nfields and state.shape[0] > self.workers_local:
            state[self.workers_local :, self.b + self.d : self.fields_end].zero_()

    def apply(
        self,
        state: Tensor,
        grads: Tensor | None,
        rows: Tensor | None,
        new_buffers: Tensor | None,
        counters: Tensor,
        rnd: Round | None,
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
            counters: the worker rows' optimizer counters (``workers_local``,): SGD's bool "has a momentum
                buffer" (read only; the engine sets it after the step), or the other optimizers' int64 step
                counts on the CPU (advanced here for the active rows, zeroed by the ``"reset"`` policy).
            rnd: the round after this step (:func:`~coopsgd.engines.mixing.plan_round`), or ``None`` (S = I).
            lr: the learning rate.
            on_round: called right before the round is communicated (timing and liveness hooks).
        """
        if rnd is not None and rnd.mix is not None and "fragment" in rnd.mix.info:
            self._local_then_fragment(state, grads, rows, new_buffers, counters, rnd, lr, on_round)
            return
        pre = self.spec.rule == "pre_mix" and rnd is not None
        pending = None
        if grads is not None:
            pending = self._local_update(state, grads, rows, counters, lr, pre)
            if new_buffers is not None and self.b:
                if rows is None:
                    state[: self.workers_local, : self.b].copy_(new_buffers)
                else:
                    state[:, : self.b].index_copy_(0, rows, new_buffers)
        if pending is not None and not pre:
            self._add(state, rows, *pending)
        if rnd is None:
            return
        lo, hi = self.cols
        z_old = None
        if self.outer is not None and rnd.outer and self._writes_z(rnd):
            z_old = state[self.workers_local, self.b : self.b + self.d].clone()
        if on_round is not None:
            on_round()
        if self.spec.control and rnd.communicates:  # before the models move: it reads y_i and z
            self.control_round(state, rnd, lr)
        gathered = False
        if self.robust is not None and self.robust.applies(rnd):
            if isinstance(self.comm, InProcess):
                sources = rnd.plan.sources
                self.comm.materialize(state[:, lo:hi], None if sources is None else sources.tolist())
                rnd = self.robust.prepare(state[:, lo:hi], rnd)
            else:
                self._robust_gathered(state[:, lo:hi], rnd)
                gathered = True
        if gathered:
            pass
        elif self.compressed is not None:
            self.compressed.communicate(state[:, lo:hi], rnd, self.comm, overlap=self.spec.overlap)
        else:
            self.comm.communicate(state[:, lo:hi], rnd, overlap=self.spec.overlap)
        if pending is not None and pre:
            self._add(state, rows, *pending)
        if self.nfields:
            if self.spec.policies.optimizer_state == "reset" and rnd.communicates:
                state[:, self.b + self.d : self.fields_end].zero_()
                if not self.sgd:
                    counters.zero_()
            elif self.spec.policies.optimizer_state == "mix":
                self.zero_aux_momentum(state)
        if self.outer is not None and rnd.outer:
            self.outer_round(state, lr, z_old)
            if self.compressed is not None:  # the workers restarted from z: z is their new x_ref
                self.compressed.settle(state[:, lo:hi], rnd)

    # -- Streaming DiLoCo (coopsgd.algorithms.streaming) -------------------------------------------------------
    def fragment_columns(self, info: Mapping[str, Any]) -> tuple[int, int]:
        """The state columns ``[lo, hi)`` a fragment round (its ``Mix.info``) sends: its parameter columns, and for
        fragment 0 the float buffers too when the policy mixes them."""
        fragment = int(info["fragment"])
        bounds = fragment_bounds(self.param_sizes or (self.d,), int(info["fragments"]), str(info.get("split", "tensors")))
        lo, hi = bounds[fragment]
        start = self.cols[0] if fragment == 0 else self.b + lo
        return start, self.b + hi

    def _local_then_fragment(self, state: Tensor, grads: Tensor | None, rows: Tensor | None,
                             new_buffers: Tensor | None, counters: Tensor, rnd: Round, lr: float,
                             on_round: Callable[[], None] | None) -> None:
        """A step ending in a Streaming DiLoCo event (``post_mix``): the local update, then the fragment's round
        (send: average, z's outer step on the fragment; the workers keep their values unless the update is
        applied at once) or the application of its delayed update (merge by alpha)."""
        assert rnd.mix is not None and self.spec.rule == "post_mix" and self.outer is not None
        if grads is not None:
            pending = self._local_update(state, grads, rows, counters, lr, False)
            if new_buffers is not None and self.b:
                if rows is None:
                    state[: self.workers_local, : self.b].copy_(new_buffers)
                else:
                    state[:, : self.b].index_copy_(0, rows, new_buffers)
            if pending is not None:
                self._add(state, rows, *pending)
        info = rnd.mix.info
        p = int(info["fragment"])
        c_lo, c_hi = self.fragment_columns(info)
        alpha = float(info.get("merge_alpha", 0.0))
        if info.get("outer") and int(info.get("delay", 0)) > 0:
            self._fragment_send_delayed(state, rnd, lr, p, c_lo, c_hi, on_round)
            return
        if info.get("outer"):
            self._fragment_send(state, rnd, lr, p, c_lo, c_hi, keep=alpha > 0.0, on_round=on_round)
        elif p in self._inflight:  # the delayed update is needed now: wait for its reduction
            self.comm.finalize()
            self.complete_fragments(state)
        self._fragment_merge(state, c_lo, c_hi, alpha)

    def _fragment_send(self, state: Tensor, rnd: Round, lr: float, p: int, c_lo: int, c_hi: int, *,
                       keep: bool, on_round: Callable[[], None] | None) -> None:
        """Without delay (DiLoCo's round on the fragment): average the workers on the fragment's columns and step
        z's fragment (its float buffers, fragment 0 with mixed buffers, become the workers' mean); with ``keep``
        the workers' own values are kept for the merge."""
        assert self.outer is not None
        w, b = self.workers_local, self.b
        kept = state[:w, c_lo:c_hi].clone() if keep else None
        if on_round is not None:
            on_round()
        cols = state[:, c_lo:c_hi]
        stage = None if self.fragment_stages is None else self.fragment_stages[p]
        if stage is not None:
            stage.communicate(cols, rnd, self.comm, overlap=self.spec.overlap)
        else:
            self.comm.communicate(cols, rnd, overlap=self.spec.overlap)
        f_lo, f_hi = max(c_lo, b) - b, c_hi - b
        whole = (f_lo, f_hi) == (0, self.d)
        P_ = state[:, b : b + self.d]
        z_new = self.outer.step(P_[w, f_lo:f_hi], P_[0, f_lo:f_hi], lr, None if whole else (f_lo, f_hi))
        P_[w, f_lo:f_hi].copy_(z_new)
        if c_lo < b:
            state[w, c_lo:b].copy_(state[0, c_lo:b])
        if stage is not None:  # every worker will take z's fragment: z is the stage's x_ref (rows from z's on)
            stage.settle(state[w:, c_lo:c_hi], rnd)
        if kept is not None:
            state[:w, c_lo:c_hi].copy_(kept)

    def _fragment_send_delayed(self, state: Tensor, rnd: Round, lr: float, p: int, c_lo: int, c_hi: int,
                               on_round: Callable[[], None] | None) -> None:
        """With a delay: z's row receives the workers' average of the fragment (the workers keep training) and z's
        fragment then takes its outer step from its value before the round. A communicator that leaves the
        reduction in flight (``pending``: the distributed engine's asynchronous all-reduce) completes it when
        the update is applied, or earlier at its ``finalize`` (:meth:`complete_fragments`)."""
        w = self.workers_local
        z_old = state[w, c_lo:c_hi].clone()
        if on_round is not None:
            on_round()
        cols = state[:, c_lo:c_hi]
        stage = None if self.fragment_stages is None else self.fragment_stages[p]
        if stage is not None:  # a compressed average writes every participant: the workers keep their values
            kept = state[:w, c_lo:c_hi].clone()
            stage.communicate(cols, rnd, self.comm, overlap=True)
            state[:w, c_lo:c_hi].copy_(kept)
        else:
            self.comm.communicate(cols, rnd, overlap=True)
        self._inflight[p] = (z_old, lr, c_lo, c_hi, rnd)
        if not self.comm.pending:
            self.complete_fragments(state)

    def complete_fragments(self, state: Tensor) -> None:
        """The outer steps of the delayed fragment rounds whose reductions are complete (z's row holds the
        workers' average): z's fragment steps from its value before the round (its float buffers, fragment 0's
        with mixed buffers, keep the average). Called when the communicator finalizes (the engines' hook)."""
        if not self._inflight or self.comm.pending:
            return
        assert self.outer is not None
        w, b = self.workers_local, self.b
        for p, (z_old, lr, c_lo, c_hi, rnd) in sorted(self._inflight.items()):
            f_lo, f_hi = max(c_lo, b) - b, c_hi - b
            whole = (f_lo, f_hi) == (0, self.d)
            P_ = state[:, b : b + self.d]
            z_params = z_old[max(b - c_lo, 0) :]  # z_old covers [c_lo, c_hi): its parameter part
            z_new = self.outer.step(z_params, P_[w, f_lo:f_hi], lr, None if whole else (f_lo, f_hi))
            P_[w, f_lo:f_hi].copy_(z_new)
            stage = None if self.fragment_stages is None else self.fragment_stages[p]
            if stage is not None:  # z's fragment is what every node agrees on (rows from z's on)
                stage.settle(state[w:, c_lo:c_hi], rnd)
        self._inflight.clear()

    def _fragment_merge(self, state: Tensor, c_lo: int, c_hi: int, alpha: float) -> None:
        """Every worker's fragment columns become ``alpha x_i + (1 - alpha) z`` (alpha = 0: z's, copied)."""
        w = self.workers_local
        X, z = state[:w, c_lo:c_hi], state[w, c_lo:c_hi]
        if alpha == 0.0:
            X.copy_(z.expand_as(X))
        else:
            X.mul_(alpha).add_(z, alpha=1.0 - alpha)

    def _robust_gathered(self, rows: Tensor, rnd: Round) -> None:
        """A robust FedAvg round on a process that holds one client (a distributed rank): every rank's row is
        all-gathered (rank i is client i; the communicator counts the bytes: N (m - 1) per rank), each rank
        computes the same aggregate from the sampled ones, and every row held here (the client, z) takes it
        -- FedAvg's round sends the aggregate to every node."""
        assert self.robust is not None
        w = self.workers_local
        everyone = self.comm.all_gather(rows[0])  # type: ignore[attr-defined]
        y = self.robust.aggregate_round(everyone, rows[w], rnd)
        rows.copy_(y.expand_as(rows))

    def _writes_z(self, rnd: Round) -> bool:
        """Whether the round changes z (node m, the first auxiliary): FedAvg's does, DiLoCo's does not."""
        plan = rnd.plan
        if plan.kind is RoundKind.IDENTITY:
            return False
        return plan.targets is None or bool(np.isin(self.spec.workers, plan.targets))

    def control_round(self, state: Tensor, rnd: Round, lr: float) -> None:
        """SCAFFOLD's control variates at a round (option II), before the models are sent: each sampled client
        held here sets ``c_i += (z - y_i) / L_i - c`` (y_i its model now, z the server model it started the
        round from, L_i the sum of the learning rates of its K_i local steps: ``K_i lr`` at one lr per round,
        :func:`~coopsgd.algorithms.schedules.round_lr_sums`), and the server's c (the control columns of z's row)
        moves by ``(1/m) sum_S (c_i^+ - c_i)``.
        In process the sum runs over the sampled rows; elsewhere each client sends ``(c_i^+ - c_i) / (m w_i)``
        through the round's own plan (weights w_i), whose weighted sum is that mean."""
        plan = rnd.plan
        assert plan.kind is RoundKind.AVERAGE and plan.weights is not None, "SCAFFOLD's rounds are FedAvg's"
        b, d, w, m = self.b, self.d, self.workers_local, self.spec.workers
        sources = np.arange(m) if plan.sources is None else plan.sources
        sums = (round_lr_sums(rnd.mix, self.spec.tau, lr) if rnd.mix is not None
                else np.full(sources.size, self.spec.tau * lr))
        if not np.all(sums > 0.0):
            raise ConfigError.invalid("lr", lr, "SCAFFOLD divides by the sum of a round's learning rates: lr > 0")
        P = state[:, b : b + d]
        C = state[:, self.fields_end : self.fields_end + d]
        assert self.worker_ids is not None
        pos = {int(i): j for j, i in enumerate(sources.tolist())}
        mine = [(j, pos[i]) for j, i in enumerate(self.worker_ids) if i in pos]
        idx = torch.as_tensor([j for j, _ in mine], dtype=torch.long, device=state.device)
        dc = P[w] - P.index_select(0, idx)
        if np.all(sums == sums[0]):  # one divisor (tau lr at equal work): a scalar division, as always
            dc.div_(float(sums[0]))
        else:
            dc.div_(torch.as_tensor(sums[[k for _, k in mine]], dtype=state.dtype, device=state.device).unsqueeze(1))
        dc.sub_(C[w])  # c_i^+ - c_i
        C.index_add_(0, idx, dc)
        if isinstance(self.comm, InProcess):
            C[w].add_(dc.sum(dim=0), alpha=1.0 / m)
            return
        share = torch.zeros((state.shape[0], d), dtype=state.dtype, device=state.device)
        for r, (j, k) in enumerate(mine):
            share[j] = dc[r] / (m * float(plan.weights[k]))
        self.comm.communicate(share, rnd)
        C[w].add_(share[w])

    def _control(self, state: Tensor, grads: Tensor, rows: Tensor | None) -> None:
        """SCAFFOLD: ``grads += c - c_i`` for the active worker rows (c: the server row's control columns)."""
        w, e = self.workers_local, self.fields_end
        C = state[:, e : e + self.d]
        Ci = C[:w] if rows is None else C.index_select(0, rows)
        grads.sub_(Ci).add_(C[w])

    def _prox(self, state: Tensor, grads: Tensor, rows: Tensor | None) -> None:
        """FedProx: ``grads += mu (x - z)`` for the active worker rows (z: the first auxiliary row)."""
        b, d, w = self.b, self.d, self.workers_local
        P = state[:, b : b + d]
        X = P[:w] if rows is None else P.index_select(0, rows)
        grads.add_(X - P[w], alpha=self.spec.prox)

    def _add(self, state: Tensor, rows: Tensor | None, U: Tensor, alpha: float) -> None:
        """The worker rows' parameters ``+= alpha U`` (the active rows only when ``rows`` is given)."""
        P = state[:, self.b : self.b + self.d]
        if rows is None:
            P[: self.workers_local].add_(U, alpha=alpha)
        else:
            P.index_add_(0, rows, U, alpha=alpha)

    def _local_update(self, state: Tensor, grads: Tensor, rows: Tensor | None, counters: Tensor, lr: float,
                      pre: bool) -> tuple[Tensor, float] | None:
        """The inner optimizer's step of the active worker rows: their state fields advance in place; returns
        the increment still to add to their parameters as ``(U, alpha)``, or ``None`` once it is applied.

        SGD returns its direction D with ``alpha = -lr`` (added before or after the round by the rule); the
        other optimizers apply their own step in place under ``post_mix`` and return it under ``pre_mix``.
        """
        b, d, w = self.b, self.d, self.workers_local
        if self.spec.prox > 0.0:
            self._prox(state, grads, rows)
        if self.spec.control:
            self._control(state, grads, rows)
        P = state[:, b : b + d]
        Fs = [state[:, b + d + f * d : b + d + (f + 1) * d] for f in range(self.nfields)]
        if self.sgd:
            assert isinstance(self.opts, SGDOptions)
            Mo = Fs[0] if Fs else None
            X: Tensor | None
            if rows is None:
                X, buf, init = P[:w], None if Mo is None else Mo[:w], counters
            else:  # the active rows' parameters are gathered only when weight decay reads them
                X = P.index_select(0, rows) if self.opts.weight_decay != 0.0 else None
                buf = None if Mo is None else Mo.index_select(0, rows)
                init = counters.index_select(0, rows)
            D = sgd_direction_(grads, X, buf, init if Mo is not None else None, self.opts)
            if rows is not None and Mo is not None:
                assert buf is not None
                Mo.index_copy_(0, rows, buf)
            return D, -lr
        if rows is None:
            idx, Xa, fl, before = list(range(w)), P[:w], [F[:w] for F in Fs], counters
        else:
            idx = rows.tolist()
            Xa, fl, before = P.index_select(0, rows), [F.index_select(0, rows) for F in Fs], counters[idx]
        if isinstance(self.opts, AdamOptions):
            U = self.opts.step_(Xa, grads, fl, before.numpy() + 1, lr, apply=not pre)
        else:
            assert isinstance(self.opts, TorchOptimizer)
            U = self.opts.step_(Xa, grads, fl, idx, before, lr, apply=not pre)
        if rows is None:
            counters.add_(1)
        else:
            counters[idx] += 1
            for F, f in zip(Fs, fl, strict=True):
                F.index_copy_(0, rows, f)
            if not pre:
                P.index_copy_(0, rows, Xa)
        return None if U is None else (U, 1.0)

    def outer_round(self, state: Tensor, lr: float, z_old: Tensor | None = None) -> None:
        """The outer step after an outer round: z steps on z - average, and every worker row (and z) becomes the
        new z.

        ``z_old`` ``None``: the round averaged the workers and left z alone (DiLoCo, SlowMo); z's buffers then
        become the workers' (when buffers are mixed). Else the round sent the average to every node, z
        included (FedAvg's round under a server optimizer), and ``z_old`` is z before it. Worker rows whose
        broadcast the in-process communicator deferred (sampled clients: :class:`InProcess`) take the new z
        through the deferred value, so the step costs O(sampled clients), not O(m).
        """
        assert self.outer is not None
        b, d, w = self.b, self.d, self.workers_local
        P = state[:, b : b + d]
        comm = self.comm if isinstance(self.comm, InProcess) else None
        deferred = None if comm is None else comm.deferred
        if z_old is None:
            if comm is not None and deferred is not None and bool(deferred[0]):
                comm.materialize(state[:, self.cols[0] : self.cols[1]])
                deferred = comm.deferred
            z_new = self.outer.step(P[w], P[0], lr)
        else:
            z_new = self.outer.step(z_old, P[w], lr)
        if deferred is None:
            P[: w + 1].copy_(z_new.expand(w + 1, d))
        else:  # the deferred rows hold the round's value: move it to z_new; write the others now
            assert comm is not None
            comm.set_deferred(b - self.cols[0], z_new)
            eager = np.flatnonzero(~deferred[: w + 1])
            if eager.size:
                P.index_copy_(0, torch.as_tensor(eager, device=P.device), z_new.expand(eager.size, d))
        if z_old is None and b and self.spec.policies.buffers == "mix":
            state[w, :b].copy_(state[0, :b])

    @staticmethod
    def as_rows(rows: list[int] | None, device: torch.device) -> Tensor | None:
        return None if rows is None else torch.as_tensor(rows, dtype=torch.long, device=device)
