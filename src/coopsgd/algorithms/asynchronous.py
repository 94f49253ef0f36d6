"""Asynchronous server aggregation: FedBuff and asynchronous local SGD as one machinery.

Node layout: the m workers (FedBuff's population of N = m clients), then the server model z (node m, the
model to evaluate). C slots train at any time (``concurrency``; every worker for asynchronous local SGD).
The client holding slot j pulled z at server version ``v_j`` and keeps that copy ``y_j``; it runs its H local
steps at its own speed and then *arrives*: it sends the pseudo-gradient ``Delta_j = y_j - x_j`` (the model it
pulled minus its model now). The server keeps a buffer::

    b <- b + w(s_j) Delta_j,   s_j = version - v_j   (staleness: server steps since the client pulled)

and once K (``buffer_size``) arrivals are buffered it takes one server step with the pseudo-gradient
``g_t = b / K`` (then ``b <- 0``, ``version <- version + 1``)::

    a_t <- a_t-1 + g_t                                       (delayed Nesterov's accumulator, eq. DN)
    if t mod N == 0:  u <- beta u + a_t / N;  z <- z - eta (g_t / N + beta u);  a_t <- 0
    else:             z <- z - eta g_t / N

``t`` counts server steps from 1, eta is ``outer_lr``, beta ``outer_momentum`` and N ``delayed_nesterov``.
With N = 1 this is Nesterov momentum as ``torch.optim.SGD(nesterov=True)`` (``u <- beta u + g;
z <- z - eta (g + beta u)``), with beta = 0 plain server SGD ``z <- z - eta g``. The arriving slot is then
taken by the next client (FedBuff: drawn uniformly from the clients not training, the arriving one included,
by one generator seeded with ``seed``; asynchronous local SGD: the same worker), which pulls z:
``x <- z, y_j <- z, v_j <- version``.

* FedBuff (Nguyen et al., AISTATS 2022, Algorithm 1): K > 1, beta = 0, eta the server learning rate, and the
  staleness weight ``w(s)`` = 1 (``constant``), ``1 / sqrt(1 + s)`` (``sqrt``) or ``(1 + s)^-a`` (``poly``).
* Asynchronous local SGD (Liu et al., 2024, "Asynchronous Local-SGD Training for Language Modeling"): K = 1,
  w = 1, inner AdamW, outer Nesterov (eta 0.7, beta 0.9 as DiLoCo's); ``delayed_nesterov`` N > 1 is the
  paper's delayed Nesterov momentum (the rule above: every pseudo-gradient moves z by eta g / N, and every N-th
  server step also by eta beta u, u updated once with the mean of the N pseudo-gradients since the last one; over N
  steps z moves by Nesterov's step applied once to their mean, as the DN description of Liu et al., Section 3,
  recalls it; the paper's own algorithm text could not be read here, the g / N scaling follows a public
  third-party ``DelayedNesterovOptimizer`` that cites the paper); ``dynamic_local_updates``
  gives worker i ``H_i = max(1, round(H s_i / max_j s_j))`` local steps (s its speed), so that every worker
  takes about the same time per round.

**When things happen** (:class:`AsyncSchedule`, pure given the step): time is counted in units of one local
step of a speed-1 worker (with a constant or counted-FLOPs compute model every such step costs the same); a
worker of speed s takes 1/s units per local step (the clock's speed classes,
:func:`coopsgd.theory.cost.worker_speeds`), and an arrival's push and pull take ``arrival_time`` units, after
which the slot's next worker starts. One engine step advances every slot whose next local step completes at the
earliest time (a speed class ties, so its rows stay batched); the arrivals of that instant are applied in
worker-index order. Times are exact rationals, so ties are exact and the order never depends on rounding. The
simulator binds both from its clock (the speed classes; ``arrival_time`` = one parameter-server round of one
worker over the mean compute time of a speed-1 step), and charges the same times to the workers' clocks
(:meth:`coopsgd.engines.simulator.clock.SimClock.arrive`: only the arriving worker pays its push and pull), so the
order is the simulated clock's. A random compute model (a distribution with a spread) or measured compute time
moves the simulated times around their means but not the order, which follows the means.

On the distributed engine (one rank per worker, every one training) the schedule is *free-running*
(:meth:`AsyncSchedule.free`): each rank takes a local step at every step and pushes after its own H local steps to a
real parameter server on rank 0, which applies the same rule in the order the pushes arrive.

The server step is not linear in the stacked state and the staleness is data of the run, so no fixed W
describes the algorithm: the [CSGD] theorems do not apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from coopsgd.algorithms.communication import Compression, as_compression
from coopsgd.algorithms.schedules import Mix, MixContext, _Base
from coopsgd.errors import ConfigError, check_choice, check_float, check_int
from coopsgd.theory.cost import worker_speeds

if TYPE_CHECKING:
    from coopsgd.algorithms.spec import AlgorithmSpec, Policies  # noqa: F811 (spec imports this module)

__all__ = ["AsyncAggregation", "AsyncSchedule", "AsyncStep", "STALENESS_RULES", "staleness_weight",
           "fedbuff", "async_local_sgd", "ASYNC_STATS", "bind_speeds", "bind_arrival_time"]

#: FedBuff's staleness weights w(s).
STALENESS_RULES = ("constant", "sqrt", "poly")

#: How many recent steps' events an :class:`AsyncSchedule` keeps (at most twice as many).
_KEPT = 256

#: The staleness statistics an asynchronous run adds to its metric records and summary.
ASYNC_STATS = ("arrivals", "server_updates", "staleness_mean", "staleness_max")


def staleness_weight(rule: str, s: int, exponent: float = 0.5) -> float:
    """w(s): 1 (``constant``), 1 / sqrt(1 + s) (``sqrt``) or (1 + s)^-a (``poly``, a = ``exponent``)."""
    if rule == "constant":
        return 1.0
    if rule == "sqrt":
        return float((1.0 + s) ** -0.5)
    if rule == "poly":
        return float((1.0 + s) ** -float(exponent))
    raise ConfigError.invalid("staleness", rule, f"choose one of {', '.join(STALENESS_RULES)}")


@dataclass(frozen=True)
class AsyncAggregation:
    """The server's rule (see the module docstring): buffer K arrivals weighted by w(s), then one server step.

    Attributes:
        buffer_size: K, arrivals per server step.
        lr: eta, the server learning rate.
        momentum: beta, the server's Nesterov momentum (0: plain server SGD).
        delayed_nesterov: N, the momentum is applied once every N server steps (1: every step).
        staleness: the weight rule, one of :data:`STALENESS_RULES`.
        staleness_exponent: a of the ``poly`` rule.
    """

    buffer_size: int = 1
    lr: float = 1.0
    momentum: float = 0.0
    delayed_nesterov: int = 1
    staleness: str = "constant"
    staleness_exponent: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "buffer_size", check_int("buffer_size", self.buffer_size, minimum=1))
        object.__setattr__(self, "lr", check_float("outer_lr", self.lr, low=0.0, low_open=True))
        object.__setattr__(self, "momentum", check_float("outer_momentum", self.momentum, low=0.0, high=1.0,
                                                         high_open=True))
        object.__setattr__(self, "delayed_nesterov", check_int("delayed_nesterov", self.delayed_nesterov, minimum=1))
        object.__setattr__(self, "staleness", check_choice("staleness", self.staleness, STALENESS_RULES))
        object.__setattr__(self, "staleness_exponent", check_float("staleness_exponent", self.staleness_exponent,
                                                                   low=0.0))

    def weight(self, s: int) -> float:
        """w(s) of this rule."""
        return staleness_weight(self.staleness, s, self.staleness_exponent)

    def describe(self) -> dict[str, Any]:
        return {"buffer_size": self.buffer_size, "lr": self.lr, "momentum": self.momentum,
                "delayed_nesterov": self.delayed_nesterov, "staleness": self.staleness,
                "staleness_exponent": self.staleness_exponent}


@dataclass(frozen=True)
class AsyncStep:
    """What happens at one engine step: the simulated time it ends at, the workers that take a local step
    (sorted) and the arrivals, in the order the server applies them: ``(slot, worker, next_worker)``."""

    time: Fraction
    workers: tuple[int, ...]
    arrivals: tuple[tuple[int, int, int], ...] = field(default=())


class AsyncSchedule(_Base):
    """The event timeline of an asynchronous server (see the module docstring); pure given the step.

    Args:
        workers: m (FedBuff's N clients).
        tau: H, local steps per arrival.
        concurrency: C, the slots training at any time (default m).
        speeds: the speed classes (:func:`~coopsgd.theory.cost.worker_speeds`); ``None``: all speed 1. An engine
            with a clock of its own binds the clock's (:meth:`with_speeds`).
        dynamic_local_updates: worker i runs ``max(1, round(H s_i / max_j s_j))`` local steps per arrival.
        seed: the generator of FedBuff's client draws.
        arrival_time: an arrival's push and pull, in units of a speed-1 local step (>= 0); ``None``: 0 until an
            engine binds its clock's (:meth:`with_timing`).
        free_running: every worker takes a local step at every step and pushes after its own H local steps, in
            the order a real server receives them (the distributed engine, :meth:`free`); there is no timeline.

    ``asynchronous = True`` declares that a round is not a matrix: engines apply :meth:`step_events`'s arrivals
    with :class:`AsyncAggregation` instead; :meth:`advance` never returns a mix.
    """

    asynchronous = True

    def __init__(self, workers: int, tau: int, *, concurrency: int | None = None,
                 speeds: Sequence[float] | None = None, dynamic_local_updates: bool = False, seed: int = 0,
                 arrival_time: float | None = None, free_running: bool = False) -> None:
        self.m = check_int("workers", workers, minimum=1)
        self.tau = check_int("tau", tau, minimum=1)
        self.n = self.m + 1
        self.concurrency = self.m if concurrency is None else check_int("concurrency", concurrency, minimum=1,
                                                                          maximum=self.m)
        self.speeds = None if speeds is None else tuple(float(s) for s in speeds)
        self.speed = worker_speeds(self.speeds, self.m)
        self.dynamic = bool(dynamic_local_updates)
        self.seed = check_int("seed", seed, minimum=0)
        top = float(self.speed.max())
        self.local_steps = np.array([max(1, int(round(self.tau * s / top))) if self.dynamic else self.tau
                                     for s in self.speed], dtype=np.int64)
        self._rate = [Fraction(float(s)) for s in self.speed]
        self.arrival_time = None if arrival_time is None else check_float("arrival_time", arrival_time, low=0.0)
        self._arrival = Fraction(self.arrival_time or 0.0)
        self.free_running = bool(free_running)
        if self.free_running and self.concurrency != self.m:
            raise ConfigError.invalid("concurrency", self.concurrency, f"a free-running server (the distributed engine: "
                                      f"one rank per worker) trains every worker: concurrency = workers = {self.m}")
        self._reset()

    def with_timing(self, speeds: Sequence[float] | None, arrival_time: float | None) -> AsyncSchedule:
        """The same schedule with the given speed classes and arrival time (a new object; this one is unchanged)."""
        return AsyncSchedule(self.m, self.tau, concurrency=self.concurrency, speeds=speeds,
                             dynamic_local_updates=self.dynamic, seed=self.seed, arrival_time=arrival_time,
                             free_running=self.free_running)

    def free(self) -> AsyncSchedule:
        """The same schedule free-running (see the class docstring; a new object)."""
        return AsyncSchedule(self.m, self.tau, concurrency=self.concurrency, speeds=self.speeds,
                             dynamic_local_updates=self.dynamic, seed=self.seed, arrival_time=self.arrival_time,
                             free_running=True)

    # -- the timeline (a cache: every entry is a function of the step alone) -----------------------------------
    def _reset(self) -> None:
        self._rng, first = self._initial()
        self._slot_worker = list(first)
        held = set(first)
        self._free = [w for w in range(self.m) if w not in held]
        self._start = [Fraction(0)] * self.concurrency
        self._done = [0] * self.concurrency
        self._events: list[AsyncStep] = []  # the most recent events, from step self._first on
        self._first = 0

    def _initial(self) -> tuple[np.random.Generator, list[int]]:
        """The generator of the client draws and the first C clients (every worker when C = m; else C drawn
        without replacement, sorted: slot j holds entry j)."""
        rng = np.random.default_rng([self.seed, 0xA5])
        if self.concurrency == self.m:
            return rng, list(range(self.m))
        return rng, sorted(int(w) for w in rng.choice(self.m, size=self.concurrency, replace=False))

    def initial_workers(self) -> list[int]:
        """The worker holding each slot at the start (slot j: entry j)."""
        return self._initial()[1]

    def _next_time(self, j: int) -> Fraction:
        return self._start[j] + Fraction(self._done[j] + 1) / self._rate[self._slot_worker[j]]

    def _extend(self) -> None:
        times = [self._next_time(j) for j in range(self.concurrency)]
        t = min(times)
        slots = sorted((j for j in range(self.concurrency) if times[j] == t), key=lambda j: self._slot_worker[j])
        workers = tuple(sorted(self._slot_worker[j] for j in slots))
        arrivals = []
        for j in slots:  # in worker-index order
            self._done[j] += 1
            w = self._slot_worker[j]
            if self._done[j] < int(self.local_steps[w]):
                continue
            if self.concurrency == self.m:
                nxt = w
            else:  # the next client: drawn from those not training (the arriving one included)
                self._free.append(w)
                i = int(self._rng.integers(len(self._free)))
                nxt = self._free[i]
                self._free[i] = self._free[-1]
                self._free.pop()
            arrivals.append((j, w, nxt))
            self._slot_worker[j] = nxt
            self._start[j] = t + self._arrival  # the next worker starts once the push and the pull are done
            self._done[j] = 0
        self._events.append(AsyncStep(t, workers, tuple(arrivals)))
        if len(self._events) > 2 * _KEPT:  # a bounded cache: a run asks for its steps in order
            del self._events[:_KEPT]
            self._first += _KEPT

    def step_events(self, step: int) -> AsyncStep:
        """What happens at engine step ``step`` (0-based). Steps are computed in order from the start and the
        recent ones kept; asking for an older one computes the timeline again from the start (same result)."""
        step = check_int("step", step, minimum=0)
        if step < self._first:
            self._reset()
        while self._first + len(self._events) <= step:
            self._extend()
        return self._events[step - self._first]

    # -- the schedule protocol ---------------------------------------------------------------------------------
    def active(self, step: int) -> np.ndarray | None:
        if self.free_running:
            return None
        workers = self.step_events(step).workers
        if len(workers) == self.m:
            return None
        mask = np.zeros(self.m, dtype=bool)
        mask[list(workers)] = True
        return mask

    def _mix(self, step: int, ctx: MixContext) -> Mix | None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "local_steps": sorted(set(self.local_steps.tolist())),
                "speeds": None if self.speeds is None else list(self.speeds), "arrival_time": self.arrival_time}


def _no_compression(compression: Compression | str | None) -> None:
    comp = as_compression(compression) if compression is not None else None
    if comp is not None and comp.active:
        raise ConfigError.invalid("compress", comp.compress, "an asynchronous server receives the updates as they "
                                  "are; use compress 'none'")


def _concurrency(m: int, concurrency: int | None, fraction: float) -> int:
    c = check_float("fraction", fraction, low=0.0, high=1.0, low_open=True)
    if concurrency is not None:
        if c != 1.0:
            raise ConfigError.invalid("concurrency", concurrency, "give concurrency or fraction, not both")
        return check_int("concurrency", concurrency, minimum=1, maximum=m)
    return max(1, int(round(c * m)))


_NOTE = ("asynchronous server: each arrival's pseudo-gradient is applied with its own staleness; no fixed W "
         "describes the algorithm, so [CSGD] Theorems 1-4 do not apply and no convergence bound is computed")


def fedbuff(
    workers: int,
    tau: int = 5,
    *,
    buffer_size: int = 4,
    concurrency: int | None = None,
    fraction: float = 1.0,
    outer_lr: float = 1.0,
    staleness: str = "constant",
    staleness_exponent: float = 0.5,
    seed: int = 0,
    speeds: Sequence[float] | None = None,
    arrival_time: float | None = None,
    compression: Compression | str | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """FedBuff (Nguyen et al., AISTATS 2022): buffered asynchronous aggregation (see the module docstring).

    C = ``concurrency`` clients of the m train at any time (or C = max(1, round(c m)) from the client
    ``fraction`` c; default every client); each runs ``tau`` local steps from the server model it pulled and
    sends ``Delta = y - x``; every ``buffer_size`` = K arrivals the server takes
    ``z <- z - eta (1/K) sum_j w(s_j) Delta_j`` (eta = ``outer_lr``, w from ``staleness``: ``constant`` 1,
    ``sqrt`` 1/sqrt(1+s), ``poly`` (1+s)^-a with a = ``staleness_exponent``). Python only: ``speeds`` and
    ``arrival_time`` fix the timeline (:class:`AsyncSchedule`; by default an engine binds its clock's).
    """
    from coopsgd.algorithms.spec import AlgorithmSpec, Policies  # noqa: F811 (spec imports this module)

    m = check_int("workers", workers, minimum=1)
    tau = check_int("tau", tau, minimum=1)
    _no_compression(compression)
    c = _concurrency(m, concurrency, fraction)
    agg = AsyncAggregation(buffer_size=buffer_size, lr=outer_lr, staleness=staleness,
                           staleness_exponent=staleness_exponent)
    sched = AsyncSchedule(m, tau, concurrency=c, speeds=speeds, seed=seed, arrival_time=arrival_time)
    return AlgorithmSpec(
        name="fedbuff", workers=m, auxiliaries=1, tau=tau, schedule=sched, rule="post_mix", center="auxiliary",
        theory_matrix=None, pattern="parameter_server", policies=policies or Policies(),
        params={"concurrency": c, "buffer_size": agg.buffer_size, "outer_lr": agg.lr, "staleness": agg.staleness,
                **({"staleness_exponent": agg.staleness_exponent} if agg.staleness == "poly" else {})},
        notes=(_NOTE,), asynchronous=agg,
    )


def async_local_sgd(
    workers: int,
    tau: int = 500,
    *,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    delayed_nesterov: int = 1,
    dynamic_local_updates: bool = False,
    speeds: Sequence[float] | None = None,
    arrival_time: float | None = None,
    compression: Compression | str | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Asynchronous local SGD (Liu et al., 2024; see the module docstring): every worker trains at its own
    speed and sends its pseudo-gradient after ``tau`` local steps (inner AdamW, as DiLoCo's); the server applies
    each on arrival with Nesterov momentum (``outer_lr`` 0.7, ``outer_momentum`` 0.9), the momentum once every
    ``delayed_nesterov`` arrivals (plain steps in between); ``dynamic_local_updates``: worker i runs
    ``max(1, round(tau s_i / max_j s_j))`` local steps."""
    from coopsgd.algorithms.spec import AlgorithmSpec, Policies  # noqa: F811 (spec imports this module)

    m = check_int("workers", workers, minimum=1)
    tau = check_int("tau", tau, minimum=1)
    _no_compression(compression)
    agg = AsyncAggregation(buffer_size=1, lr=outer_lr, momentum=outer_momentum, delayed_nesterov=delayed_nesterov)
    sched = AsyncSchedule(m, tau, speeds=speeds, dynamic_local_updates=dynamic_local_updates, arrival_time=arrival_time)
    return AlgorithmSpec(
        name="async_local_sgd", workers=m, auxiliaries=1, tau=tau, schedule=sched, rule="post_mix",
        center="auxiliary", theory_matrix=None, pattern="parameter_server", policies=policies or Policies(),
        params={"outer_lr": agg.lr, "outer_momentum": agg.momentum, "delayed_nesterov": agg.delayed_nesterov,
                "dynamic_local_updates": sched.dynamic},
        notes=(_NOTE,), asynchronous=agg, inner_optimizer="adamw",
    )


def bind_speeds(spec: AlgorithmSpec, speeds: Sequence[float] | None) -> AlgorithmSpec:
    """``spec`` with its asynchronous schedule bound to a clock's speed classes (the spec itself when it has no
    asynchronous schedule or no speeds are given). Speeds given to both the spec and the clock must agree."""
    sched = spec.schedule
    if not isinstance(sched, AsyncSchedule) or not speeds:
        return spec
    speeds = tuple(float(s) for s in speeds)
    if sched.speeds is not None and tuple(sched.speeds) != speeds:
        raise ConfigError.invalid("worker_speeds", list(speeds), f"the spec was built with speeds {list(sched.speeds)}")
    return replace(spec, schedule=sched.with_timing(speeds, sched.arrival_time))


def bind_arrival_time(spec: AlgorithmSpec, arrival_time: float) -> AlgorithmSpec:
    """``spec`` with its asynchronous schedule's arrival time set (the spec itself when it has none, or when the
    schedule was built with one: an explicit value is kept)."""
    sched = spec.schedule
    if not isinstance(sched, AsyncSchedule) or sched.arrival_time is not None:
        return spec
    return replace(spec, schedule=sched.with_timing(sched.speeds, arrival_time))
