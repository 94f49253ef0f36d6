"""The simulator's side of an asynchronous server (FedBuff, asynchronous local SGD; :mod:`coopsgd.algorithms.asynchronous`).

:class:`AsyncArrivals` is mixed into :class:`~coopsgd.engines.simulator.engine.Simulator`: after a step's local
updates (the active workers' rows only, by the round kernel) it applies the step's arrivals with the
:class:`~coopsgd.engines.asynchronous.AsyncServer` (only the arriving slots' rows, z and the next workers' rows are
touched), charges each arrival to the arriving worker's clock alone (:meth:`SimClock.arrive`), and binds the
schedule's arrival time to the clock once, so that the timeline and the clock agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from coopsgd.algorithms.asynchronous import bind_arrival_time
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.asynchronous import ArrivalReport, AsyncServer
from coopsgd.engines.base import NonFiniteError, StepStats
from coopsgd.engines.health import absmax
from coopsgd.engines.kernel import RoundKernel
from coopsgd.engines.simulator.clock import FlopCompute, SimClock

__all__ = ["AsyncArrivals"]


class AsyncArrivals:
    """Arrivals, their clock charges and the arrival-time binding (see the module docstring)."""

    spec: AlgorithmSpec
    m: int
    clock: SimClock
    step_count: int
    rounds: int
    bytes_sent: float
    peak_bytes: float
    _async: AsyncServer | None
    _arrival_bound: bool
    device: torch.device
    _kernel: RoundKernel
    _state: Tensor
    _bound: float

    if TYPE_CHECKING:  # the Simulator's own (ModelRows' rows, its non-finite handling)
        @property
        def rows_params(self) -> Tensor: ...

        @property
        def _opt_counters(self) -> Tensor: ...

        def _found(self, k: int, exc: NonFiniteError) -> None: ...

        def _nonfinite(self, bad: Tensor | np.ndarray, idx: list[int], step: int, what: str) -> NonFiniteError: ...

    def _bind_arrival(self, flops: np.ndarray | None) -> None:
        """Bind an asynchronous schedule's arrival time to this clock, once: one parameter-server round of one
        worker (:meth:`~coopsgd.engines.simulator.clock.SimClock.arrival_costs`) over the mean compute time of a
        speed-1 step (counted FLOPs, or the compute model's mean; measured time has none: 0). Done before the
        first step's arrivals (the first step's events never depend on it); a checkpoint restores the bound value."""
        if self._async is None or self._arrival_bound:
            return
        self._arrival_bound = True
        cm = self.clock.compute
        base = 0.0
        if isinstance(cm, FlopCompute) and flops is not None and float(np.max(flops, initial=0.0)) > 0.0:
            base = float(cm.seconds(float(np.max(flops))))
        else:
            fallback = cm.fallback if isinstance(cm, FlopCompute) else cm
            base = 0.0 if fallback is None else float(fallback.mean_s)
        cost = float(sum(self.clock.network.round_time(c) for c in self.clock.arrival_costs()))
        self.spec = bind_arrival_time(self.spec, cost / base if base > 0.0 else 0.0)

    def _arrivals(self, k: int) -> ArrivalReport | None:
        """An asynchronous server's arrivals at step ``k`` (:class:`~coopsgd.engines.asynchronous.AsyncServer`): the
        rows they write, the server's vectors and ledger are kept first and restored when z goes non-finite
        (``None`` is then returned after :meth:`_found`). Only the arriving slots' rows are touched."""
        assert self._async is not None
        event = self.spec.schedule.step_events(k)  # type: ignore[attr-defined]
        if not event.arrivals:
            return ArrivalReport()
        written = torch.as_tensor(AsyncServer.rows_written(self.m, event), device=self.device)
        kept = self._state.index_select(0, written)
        snap = self._async.snapshot()
        report = self._async.arrive(self.rows_params, self.m, event)
        z = self.rows_params[self.m]
        if not bool(torch.isfinite(z).all()):
            self._state.index_copy_(0, written, kept)
            self._async.restore(snap)
            self._found(k, self._nonfinite(np.ones(1, dtype=bool), [self.m], k, "model"))
            return None
        self._reset_pulled(event)
        self._bound = max(self._bound, absmax(z))
        return report

    def _reset_pulled(self, event: Any) -> None:
        """Under ``optimizer_state="reset"``, a pull restarts the pulling workers' optimizers."""
        k_ = self._kernel
        if k_.nfields and self.spec.policies.optimizer_state == "reset":
            nxt = torch.as_tensor(sorted({n for _, _, n in event.arrivals}), device=self.device)
            self._state[nxt, k_.b + k_.d : k_.fields_end] = 0.0
            if not k_.sgd:
                self._opt_counters[nxt.cpu()] = 0

    def _pull_only(self, steps: range) -> None:
        """The pulls of dropped steps' arrivals, in order (:meth:`AsyncServer.pull_only`): a step skipped under
        ``nan_policy="skip"``, or every step :meth:`check_health` rolled back, still hands its slots on."""
        assert self._async is not None
        for k in steps:
            event = self.spec.schedule.step_events(k)  # type: ignore[attr-defined]
            if event.arrivals:
                self._async.pull_only(self.rows_params, self.m, event)
                self._reset_pulled(event)

    def _record_arrivals(self, k: int, lr: float, losses: np.ndarray, report: ArrivalReport,
                         before: tuple[float, float, float], *, skipped: bool) -> StepStats:
        """Count an asynchronous step: each arrival is charged to the arriving worker's clock alone (a parameter
        server's push and pull for one worker, :meth:`~coopsgd.engines.simulator.clock.SimClock.arrive`), and the
        slot's next worker starts when it ends."""
        self.step_count += 1
        event = self.spec.schedule.step_events(k)  # type: ignore[attr-defined]
        bytes_sent = 0.0
        for _, w, nxt in event.arrivals:
            one = self.clock.arrival_costs()
            self.clock.arrive(w, nxt, one)
            bytes_sent += float(sum(c.bytes_sent for c in one))
        communicated = bool(event.arrivals)
        if communicated:
            self.rounds += 1
            self.bytes_sent += bytes_sent
            self.peak_bytes = max(self.peak_bytes, bytes_sent)
        c = self.clock
        return StepStats(
            step=k, lr=lr, losses=losses, communicated=communicated, round=self.rounds,
            pattern="parameter_server" if communicated else None, bytes_sent=bytes_sent, info=report.info(),
            sim_time=c.elapsed, compute_s=c.compute_s - before[0], communication_s=c.communication_s - before[1],
            idle_s=c.idle_s - before[2], estimates=None, skipped=skipped,
        )

    def async_record(self) -> dict[str, Any]:
        """An asynchronous server's staleness statistics (:data:`~coopsgd.algorithms.asynchronous.ASYNC_STATS`)
        for the metric records; empty for every other algorithm."""
        return {} if self._async is None else self._async.stats()
