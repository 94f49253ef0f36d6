"""Simulated wall-clock for the one-process simulator ([CSGD] Fig. 2 and §3.3; alpha-beta cost model).

Every worker has its own clock. A local step adds that worker's compute time (drawn from a
:class:`~coopsgd.theory.cost.ComputeModel`, or the time the simulator measured for it). A communication
round synchronises the workers -- each waits for the slowest (*idle* time) -- and then costs the
alpha-beta time of the round (:func:`~coopsgd.theory.cost.round_cost` priced by a
:class:`~coopsgd.theory.cost.NetworkModel`):

* blocking rounds: every worker resumes ``c`` seconds after the slowest one arrived;
* overlapped rounds (``spec.overlap``: non-blocking EASGD, hierarchical and generalized elastic averaging):
  the round's communication runs while the next local steps are computed; the next round can start only
  when both are done, and at the end of the run the last round's communication is waited for. Only the
  part of ``c`` that the computation does not hide is charged.

This is exactly the model of :func:`coopsgd.theory.cost.expected_runtime` (a test checks it), stepped one
step at a time. Totals follow its conventions: ``compute_s`` and ``idle_s`` are averages over workers
(idle includes waiting, at the end, for the slowest worker), ``communication_s`` is the exposed
communication, and ``elapsed = compute_s + idle_s + communication_s``.

Patterns (the schedule's :attr:`Mix.pattern`): ``"allreduce"`` and ``"parameter_server"`` as in [CSGD]
Table 3; ``"neighbor"`` with the largest in-degree of the round's matrix; ``"broadcast"`` is LSGD's leader
refresh, priced as an all-gather of the m loss estimates (m handshakes, m floats) plus a binomial-tree
broadcast of the d parameters; ``"local"`` (LSGD's pull toward a locally held leader copy) costs nothing
and does not synchronise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from coopsgd.errors import ConfigError
from coopsgd.theory.cost import ComputeModel, NetworkModel, RoundCost, round_cost

__all__ = ["SimClock"]


class SimClock:
    """Per-worker simulated clocks plus an alpha-beta network.

    Args:
        network: the alpha-beta network (default: 1 ms latency, 10 Gbit/s).
        compute: per-step compute-time distribution; ``None`` uses the compute time the simulator measured
            for each worker.
        seed: seed of the compute-time draws.
    """

    def __init__(self, network: NetworkModel | None = None, compute: ComputeModel | None = None, seed: int = 0) -> None:
        if network is not None and not isinstance(network, NetworkModel):
            raise ConfigError.invalid("network", network, "must be a coopsgd.theory.cost.NetworkModel")
        if compute is not None and not isinstance(compute, ComputeModel):
            raise ConfigError.invalid("compute", compute, "must be a coopsgd.theory.cost.ComputeModel or None (measured)")
        self.network = network or NetworkModel()
        self.compute = compute
        self.seed = int(seed)
        self.rng = np.random.default_rng(self.seed)
        self.workers = 0
        self.params = 0
        self.bytes_per_param = 4.0
        self.reset_counters(1)

    # -- set-up ------------------------------------------------------------------------------------
    def bind(self, workers: int, params: int, bytes_per_param: float) -> SimClock:
        """Size the clock for ``workers`` workers exchanging ``params`` parameters (done by the simulator)."""
        self.workers = int(workers)
        self.params = int(params)
        self.bytes_per_param = float(bytes_per_param)
        self.reset_counters(self.workers)
        return self

    def reset_counters(self, workers: int) -> None:
        self.t = np.zeros(workers)  # each worker's clock
        self.busy = np.zeros(workers)  # compute time per worker
        self.waited = np.zeros(workers)  # idle time at synchronisations per worker
        self.exposed = 0.0  # communication not hidden by computation (excluding the pending tail)
        self.pending_until = 0.0  # when the last overlapped round's communication ends
        self.bytes_total = 0.0
        self.rounds = 0

    # -- totals ------------------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        """Simulated wall-clock: the latest of all workers' clocks and any communication still running."""
        return float(max(self.t.max(initial=0.0), self.pending_until))

    @property
    def compute_s(self) -> float:
        return float(self.busy.mean()) if self.busy.size else 0.0

    @property
    def idle_s(self) -> float:
        if not self.t.size:
            return 0.0
        return float((self.waited + (self.t.max() - self.t)).mean())

    @property
    def communication_s(self) -> float:
        return float(self.exposed + max(0.0, self.pending_until - self.t.max(initial=0.0)))

    def totals(self) -> dict[str, float]:
        return {
            "elapsed_s": self.elapsed,
            "compute_s": self.compute_s,
            "communication_s": self.communication_s,
            "idle_s": self.idle_s,
            "bytes_sent": self.bytes_total,
            "rounds": float(self.rounds),
        }

    # -- stepping ----------------------------------------------------------------------------------
    def add_compute(self, active: np.ndarray | None, measured: np.ndarray | None = None) -> np.ndarray:
        """Advance each active worker by one step of compute; returns the per-worker times (0 if inactive).

        ``measured`` (length m) is used when the clock has no compute model.
        """
        m = self.workers
        mask = np.ones(m, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        if self.compute is None:
            dt = np.zeros(m) if measured is None else np.asarray(measured, dtype=np.float64).copy()
        else:
            dt = self.compute.sample(self.rng, m)
        dt = np.where(mask, dt, 0.0)
        self.t += dt
        self.busy += dt
        return dt

    def round_costs(self, pattern: str, matrix: np.ndarray | None = None) -> list[RoundCost]:
        """The alpha-beta cost items of one round of ``pattern`` (see the module docstring)."""
        m, d, bpp = self.workers, self.params, self.bytes_per_param
        if pattern == "local":
            return []
        if pattern == "broadcast":
            gather = RoundCost("allgather", m if m > 1 else 0, float(m), float(m) * bpp)
            return [gather, round_cost("broadcast", workers=m, params=d, bytes_per_param=bpp)]
        if pattern == "neighbor":
            deg = 0
            if matrix is not None:
                S = np.asarray(matrix)
                nz = (S != 0) & ~np.eye(S.shape[0], dtype=bool)
                deg = int(nz[:, :m].sum(axis=0).max(initial=0))
            deg = min(max(deg, 1 if m > 1 else 0), m - 1)
            return [round_cost("neighbor", workers=m, params=d, max_degree=deg, bytes_per_param=bpp)]
        return [round_cost(pattern, workers=m, params=d, bytes_per_param=bpp)]

    def communicate(self, costs: list[RoundCost], *, overlap: bool = False) -> float:
        """Synchronise all workers and charge one round; returns the round's alpha-beta seconds."""
        if not costs:
            return 0.0
        c = float(sum(self.network.round_time(cost) for cost in costs))
        arrive = float(self.t.max())
        self.waited += arrive - self.t
        if overlap:
            start = max(arrive, self.pending_until)
            self.exposed += start - arrive
            self.pending_until = start + c
            self.t[:] = start
        else:
            start = max(arrive, self.pending_until)  # a blocking round after overlapped ones
            self.exposed += start - arrive + c
            self.t[:] = start + c
        self.bytes_total += float(sum(cost.bytes_sent for cost in costs))
        self.rounds += 1
        return c

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t.tolist(),
            "busy": self.busy.tolist(),
            "waited": self.waited.tolist(),
            "exposed": self.exposed,
            "pending_until": self.pending_until,
            "bytes_total": self.bytes_total,
            "rounds": self.rounds,
            "rng": _rng_state_to_lists(dict(self.rng.bit_generator.state)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = np.asarray(state["t"], dtype=np.float64)
        self.busy = np.asarray(state["busy"], dtype=np.float64)
        self.waited = np.asarray(state["waited"], dtype=np.float64)
        self.exposed = float(state["exposed"])
        self.pending_until = float(state["pending_until"])
        self.bytes_total = float(state["bytes_total"])
        self.rounds = int(state["rounds"])
        self.rng.bit_generator.state = _rng_state_from_lists(state["rng"])


def _rng_state_to_lists(state: dict[str, Any]) -> dict[str, Any]:
    """numpy bit-generator state with 128-bit ints written as decimal strings (safe for ``weights_only``)."""

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, int) and not isinstance(v, bool):
            return str(v)
        return v

    return conv(state)


def _rng_state_from_lists(state: dict[str, Any]) -> dict[str, Any]:
    def conv(k: str, v: Any) -> Any:
        if isinstance(v, dict):
            return {kk: conv(kk, x) for kk, x in v.items()}
        if isinstance(v, str) and k != "bit_generator":
            return int(v)
        return v

    return conv("", state)
