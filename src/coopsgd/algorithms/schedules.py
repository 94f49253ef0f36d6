"""Mixing schedules: which synchronization matrix S_k applies after step k.

[CSGD] eq. (7): ``S_k = W`` when ``k mod tau = 0`` and the identity otherwise. Steps here are 0-based, so
communication happens after step ``k`` when ``(k + 1) % tau == 0`` (after every ``tau`` local steps).
:class:`PeriodicSchedule` can also count steps the way PyTorch's ``PeriodicModelAverager`` does
(``step_counting="pytorch"``: after step ``k`` when ``k % tau == 0``, i.e. after the 1st local step and then
every ``tau`` steps); see :data:`STEP_COUNTINGS`.

A schedule is pure: it never changes itself. What a run accumulates (LSGD's current leaders, the
round counter of a user callable) is its *run state*, a small JSON-ready dict created by
:meth:`Schedule.init_state` at the start of a run, advanced by the engine through
:meth:`Schedule.advance` and saved in checkpoints. Running the same spec twice therefore starts from the
same place. A schedule answers, for every step ``k``:

* :meth:`Schedule.advance` -- the :class:`Mix` to apply after step ``k`` (``None`` means ``S_k = I``: no
  communication, nothing to do) and the next run state, possibly depending on run-time data passed in a
  :class:`MixContext` (LSGD picks its leader from loss estimates); :meth:`Schedule.mix` is the same
  without a run (a fresh state), for inspection;
* :meth:`Schedule.active` -- which workers compute gradients in step ``k`` (FedAvg samples clients;
  ``None`` means all).

and declares what it needs from an engine, so that engines never look at its type or internals:

* ``needs_losses`` and :meth:`Schedule.wants_losses` -- per-worker loss estimates at run time (LSGD);
* :meth:`Schedule.matrices` -- the finite set of matrices it can produce (``None``: data-dependent or
  random), from which the distributed engine places auxiliaries on ranks;
* ``sequential`` -- a round is a sequence of pushes whose order may be given by the engine
  (``MixContext.order``: DOWNPOUR in arrival order, or a real asynchronous parameter server).

Matrices use the paper's column convention (see :func:`coopsgd.engines.mixing.apply_mixing`): column
``i`` of ``S`` holds node ``i``'s in-weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from coopsgd.errors import ConfigError, check_int
from coopsgd.topology import MixingMatrix

__all__ = [
    "Mix",
    "Averaging",
    "MixContext",
    "ScheduleState",
    "Schedule",
    "PeriodicSchedule",
    "LeaderSchedule",
    "FedAvgSchedule",
    "DownpourSchedule",
    "CallableSchedule",
    "PATTERNS",
    "STEP_COUNTINGS",
    "LOCAL_WORK",
    "round_lr_sums",
]

#: Communication patterns understood by the cost model ([CSGD] Table 3 plus leader broadcast).
PATTERNS = ("allreduce", "neighbor", "parameter_server", "broadcast", "local")

#: How a :class:`PeriodicSchedule` counts the local steps of a round (``j = k - warmup_steps`` is the 0-based
#: local step after the warm-up; a level of period ``p`` communicates after local step ``j`` when):
#:
#: * ``"paper"`` -- ``(j + 1) % p == 0``: after local steps ``p-1, 2p-1, ...`` (every ``p`` local steps,
#:   [CSGD] eq. (7));
#: * ``"pytorch"`` -- ``j % p == 0``: after local steps ``0, p, 2p, ...``, as
#:   ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager(period=p,
#:   warmup_steps=W)`` does (it averages when ``step >= W and (step - W) % p == 0``, counting from 0).
STEP_COUNTINGS = ("paper", "pytorch")

#: How much local work a sampled FedAvg client does in a round (:class:`FedAvgSchedule`): ``"equal"`` tau
#: steps each; ``"uniform"`` K_i uniform on {min_local_steps, ..., tau}, drawn per (seed, round, client);
#: ``"budget"`` as many steps as fit in the time the fastest client takes for tau,
#: ``K_i = max(1, floor(tau s_i / max_j s_j))`` for client speeds s.
LOCAL_WORK = ("equal", "uniform", "budget")


@dataclass(frozen=True)
class MixContext:
    """Run-time information a schedule may use.

    Attributes:
        step: the 0-based step just taken (or about to be taken, for :meth:`Schedule.active`).
        lr: learning rate of this step (LSGD's pull strength is ``lr * lambda``).
        losses: the latest loss estimate of each worker (length m), or ``None`` when not available.
        order: for ``sequential`` schedules, the order in which the workers' pushes arrive (a permutation
            of the m workers); ``None`` uses the schedule's own seeded order.
    """

    step: int
    lr: float = 0.0
    losses: np.ndarray | None = None
    order: np.ndarray | None = None


#: A schedule's run state: a JSON-ready dict (see the module docstring).
ScheduleState = dict[str, Any]


@dataclass(frozen=True, eq=False)
class Averaging:
    """The structure of an averaging matrix: every column of S is the same vector w (``S = w 1^T``), whose
    non-zero entries are ``weights`` at the rows ``sources`` (FedAvg's weighted average of the sampled
    clients, sent to every node; FedNova's adds the server row, with a weight that may be negative).

    Attributes:
        n: the number of nodes.
        sources: the rows with a non-zero weight, sorted, int64.
        weights: their weights, float64, finite and non-zero.
    """

    n: int
    sources: np.ndarray
    weights: np.ndarray

    def __post_init__(self) -> None:  # own read-only copies: the matrix built later is the one described now
        for name, dtype in (("sources", np.int64), ("weights", np.float64)):
            a = np.array(getattr(self, name), dtype=dtype)
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    def matrix(self) -> np.ndarray:
        """S as a dense (n, n) float64 array."""
        w = np.zeros(self.n)
        w[self.sources] = self.weights
        return np.tile(w[:, None], (1, self.n))


class Mix:
    """One synchronization: the matrix ``S_k`` and how it is communicated (its fields cannot be reassigned).

    Attributes:
        matrix: ``S_k`` as an (m+v)x(m+v) float64 array, column convention. A mix made from its
            ``structure`` alone builds the array the first time it is read (the same array every time after).
        pattern: communication pattern for the cost model (one of :data:`PATTERNS`; ``"local"`` means the
            mixing needs no network traffic, e.g. LSGD's pull toward a locally held leader copy).
        round: the index of the communication round (counts only mixes with network traffic).
        info: extra facts for logging (e.g. the LSGD leader, FedAvg's sampled clients).
        structure: what the schedule knows about S (:class:`Averaging`), or ``None``. Engines apply a round
            from it without reading or analysing the dense matrix (:func:`coopsgd.engines.mixing.mix_plan`).
    """

    __slots__ = ("_matrix", "pattern", "round", "info", "structure")

    _matrix: np.ndarray | None
    pattern: str
    round: int
    info: dict[str, Any]
    structure: Averaging | None

    def __init__(
        self,
        matrix: np.ndarray | None,
        pattern: str,
        round: int = -1,
        info: dict[str, Any] | None = None,
        *,
        structure: Averaging | None = None,
    ) -> None:
        if matrix is None and structure is None:
            raise ValueError("a Mix needs its matrix or its structure")
        for name, value in (("_matrix", matrix), ("pattern", pattern), ("round", round),
                            ("info", {} if info is None else info), ("structure", structure)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"a Mix is immutable (cannot set {name!r})")

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:  # pickle / copy: rebuilt through __init__
        return _rebuild_mix, (self._matrix, self.pattern, self.round, self.info, self.structure)

    @property
    def matrix(self) -> np.ndarray:
        S = self._matrix
        if S is None:
            assert self.structure is not None
            S = self.structure.matrix()
            object.__setattr__(self, "_matrix", S)
        return S

    @property
    def communicates(self) -> bool:
        return self.pattern != "local"

    def __repr__(self) -> str:
        shape = (self.structure.n,) * 2 if self._matrix is None and self.structure is not None else \
            getattr(self._matrix, "shape", None)
        return f"Mix(matrix of shape {shape}, pattern={self.pattern!r}, round={self.round}, info={self.info!r})"


def _rebuild_mix(matrix: np.ndarray | None, pattern: str, round: int, info: dict[str, Any],
                 structure: Averaging | None) -> Mix:
    return Mix(matrix, pattern, round, info, structure=structure)


@runtime_checkable
class Schedule(Protocol):
    """Protocol every mixing schedule implements (see the module docstring)."""

    n: int
    #: mix() reads ``ctx.losses`` at the steps where :meth:`wants_losses` is true
    needs_losses: bool
    #: a round is a sequence of pushes; ``ctx.order`` may give their order
    sequential: bool

    def init_state(self) -> ScheduleState: ...

    def advance(self, step: int, ctx: MixContext, state: ScheduleState) -> tuple[Mix | None, ScheduleState]: ...

    def mix(self, step: int, ctx: MixContext) -> Mix | None: ...

    def active(self, step: int) -> np.ndarray | None: ...

    def wants_losses(self, step: int, state: ScheduleState) -> bool: ...

    def matrices(self, limit: int = 4096) -> list[np.ndarray] | None: ...


class _Base:
    """Defaults shared by the built-in schedules: stateless, no losses, not sequential, not enumerable."""

    n: int
    needs_losses = False
    sequential = False

    def init_state(self) -> ScheduleState:
        return {}

    def advance(self, step: int, ctx: MixContext, state: ScheduleState) -> tuple[Mix | None, ScheduleState]:
        return self._mix(step, ctx), state

    def _mix(self, step: int, ctx: MixContext) -> Mix | None:
        raise NotImplementedError

    def mix(self, step: int, ctx: MixContext | None = None) -> Mix | None:
        """The mix after ``step`` from a fresh run state (for inspection; engines call :meth:`advance`)."""
        return self.advance(step, ctx if ctx is not None else MixContext(step=step), self.init_state())[0]

    def active(self, step: int) -> np.ndarray | None:
        return None

    def wants_losses(self, step: int, state: ScheduleState) -> bool:
        return False

    def matrices(self, limit: int = 4096) -> list[np.ndarray] | None:
        return None


def _as_matrix(W: MixingMatrix | np.ndarray) -> np.ndarray:
    return np.asarray(getattr(W, "matrix", W), dtype=np.float64)


def _frozen(W: MixingMatrix | np.ndarray) -> np.ndarray:
    """``W`` as a read-only float64 array that owns its memory (a copy unless it already is one). Engines
    may then recognise a matrix they have seen by its identity alone (it cannot change)."""
    M = _as_matrix(W)
    if M.flags.writeable or not M.flags.owndata or not M.flags.c_contiguous:
        M = np.array(M, dtype=np.float64, order="C", copy=True)
        M.setflags(write=False)
    return M


class PeriodicSchedule(_Base):
    """``S_k = W`` every ``tau`` steps, identity otherwise ([CSGD] eq. (7)), generalised in three ways.

    * ``matrices`` may hold several matrices, cycled over rounds (time-varying topologies such as the
      one-peer exponential graph).
    * ``levels`` adds slower levels: ``[(period, matrices), ...]``. After step ``k`` every level whose
      period divides ``k + 1`` applies, fastest first; the product is one ``S_k``. Hierarchical averaging
      uses this for its intra-group (tau) and inter-auxiliary (q*tau) mixing.
    * ``warmup_steps`` steps of ``warmup_matrix`` every step (post-local SGD: fully synchronous warm-up).

    ``step_counting`` (:data:`STEP_COUNTINGS`) says at which local step of a period a level communicates:
    ``"paper"`` (default) at its last, ``(j + 1) % period == 0``; ``"pytorch"`` at its first,
    ``j % period == 0`` (PyTorch's ``PeriodicModelAverager``), where ``j = k - warmup_steps``. Either way the
    matrices of a time-varying level are cycled by the round index ``j // period``.
    """

    def __init__(
        self,
        tau: int,
        matrices: Sequence[MixingMatrix | np.ndarray],
        *,
        pattern: str = "allreduce",
        levels: Sequence[tuple[int, Sequence[MixingMatrix | np.ndarray], str]] = (),
        warmup_steps: int = 0,
        warmup_matrix: MixingMatrix | np.ndarray | None = None,
        step_counting: str = "paper",
    ) -> None:
        self.tau = check_int("tau", tau, minimum=1)
        if step_counting not in STEP_COUNTINGS:
            raise ConfigError.invalid("step_counting", step_counting, f"choose one of {', '.join(STEP_COUNTINGS)}")
        self.step_counting = step_counting
        if len(matrices) == 0:
            raise ConfigError.invalid("matrices", list(matrices), "need at least one mixing matrix")
        self._levels: list[tuple[int, list[np.ndarray], str]] = [
            (self.tau, [_frozen(W) for W in matrices], pattern)
        ]
        for period, mats, pat in levels:
            period = check_int("period", period, minimum=1)
            if len(mats) == 0:
                raise ConfigError.invalid("levels", period, "each level needs at least one matrix")
            self._levels.append((period, [_frozen(W) for W in mats], pat))
        self.n = self._levels[0][1][0].shape[0]
        for _, mats, _ in self._levels:
            for M in mats:
                if M.shape != (self.n, self.n):
                    raise ConfigError.invalid(
                        "matrices", M.shape, f"all matrices of one schedule must be {self.n}x{self.n}"
                    )
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        if self.warmup_steps and warmup_matrix is None:
            raise ConfigError.invalid("warmup_matrix", None, "needed when warmup_steps > 0")
        self._warmup = None if warmup_matrix is None else _frozen(warmup_matrix)
        #: products of several levels' matrices, by which matrices (computed once, read-only)
        self._products: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def _phase(self, period: int) -> int:
        """The local step ``j`` (mod ``period``) after which a level of this period communicates."""
        return 0 if self.step_counting == "pytorch" else period - 1

    def rounds_before(self, step: int) -> int:
        """Communication rounds that happened in steps ``0 .. step-1``."""
        warm = min(step, self.warmup_steps)
        rounds = warm
        local = max(step - self.warmup_steps, 0)
        # a step where several levels fire counts once
        fired: set[int] = set()
        for period, _, _ in self._levels:
            fired.update(range(self._phase(period), local, period))
        return rounds + len(fired)

    def _mix(self, step: int, ctx: MixContext) -> Mix | None:
        if step < self.warmup_steps:
            return Mix(self._warmup, "allreduce", round=step, info={"warmup": True})
        local = step - self.warmup_steps
        fired: list[tuple[int, int]] = []
        patterns = []
        for level, (period, mats, pat) in enumerate(self._levels):
            if local % period == self._phase(period):
                fired.append((level, (local // period) % len(mats)))
                patterns.append(pat)
        if not fired:
            return None
        key = tuple(fired)
        product = self._products.get(key) if len(fired) > 1 else self._levels[fired[0][0]][1][fired[0][1]]
        if product is None:
            for level, j in fired:
                M = self._levels[level][1][j]
                # X S1 S2: the faster level's matrix acts first.
                product = M if product is None else product @ M
            assert product is not None
            product.setflags(write=False)
            if len(self._products) < 64:
                self._products[key] = product
        pattern = patterns[-1] if len(patterns) == 1 else max(patterns, key=_PATTERN_RANK.__getitem__)
        return Mix(product, pattern, round=self.rounds_before(step))

    def matrices(self, limit: int = 4096) -> list[np.ndarray] | None:
        """Every distinct matrix this schedule produces (one cycle of all levels), or ``None`` when a
        cycle is longer than ``limit`` steps."""
        cycle = 1
        for period, mats, _ in self._levels:
            cycle = math.lcm(cycle, period * len(mats))
        steps = self.warmup_steps + cycle
        if steps > limit:
            return None
        out: dict[bytes, np.ndarray] = {}
        for k in range(steps):
            mix = self._mix(k, MixContext(step=k))
            if mix is not None:
                M = np.ascontiguousarray(mix.matrix, dtype=np.float64)
                out.setdefault(M.tobytes(), M)
        return list(out.values())

    @property
    def base_matrices(self) -> list[np.ndarray]:
        """The matrices of the fastest level (one per round of a time-varying topology)."""
        return list(self._levels[0][1])


_PATTERN_RANK = {"local": 0, "neighbor": 1, "broadcast": 2, "allreduce": 3, "parameter_server": 4}


class LeaderSchedule(_Base):
    """Leader SGD ([LSGD] Algorithm 1, multi-level form) as a data-dependent mixing schedule.

    Node layout: ``m`` workers, then one local-leader copy per group, then (when there are several
    groups) one global-leader copy. Every ``tau`` steps (at steps ``k`` with ``k % tau == 0``, i.e. at the
    start of each period) the leaders are re-elected as the workers with the lowest loss estimate and
    their models are copied into the leader slots -- this is the communication (a small all-gather of
    losses plus a broadcast). Every step, each worker is pulled toward its leaders:

        x_i <- x_i - lr * (g_i + lam * (x_i - z_local) + lam_global * (x_i - z_global)),

    which under the pre-mix rule ``X_{k+1} = X_k S_k - lr G_k`` is a column-stochastic matrix: column ``i``
    is ``(1 - lr*lam - lr*lam_global) e_i + lr*lam e_{z_local} + lr*lam_global e_{z_global}``. A leader
    is not pulled toward itself (the leader does plain SGD). The refresh ``R_k`` (leader slot <- leader
    model) is applied before the pull, so ``S_k = R_k P_k``.

    Where it leaves the paper's framework: ``S_k`` is not symmetric and depends on the data (the losses),
    so Theorems 1-4 do not apply.
    """

    def __init__(
        self, workers: int, tau: int, lam: float, *, groups: int = 1, lam_global: float | None = None
    ) -> None:
        self.m = check_int("workers", workers, minimum=1)
        self.tau = check_int("tau", tau, minimum=1)
        self.groups = check_int("groups", groups, minimum=1)
        if self.m % self.groups:
            raise ConfigError.invalid("groups", groups, f"must divide workers={workers}")
        self.lam = float(lam)
        self.lam_global = self.lam if lam_global is None else float(lam_global)
        self.multi = self.groups > 1
        self.v = self.groups + (1 if self.multi else 0)
        self.n = self.m + self.v
        size = self.m // self.groups
        self.group_of = np.arange(self.m) // size

    needs_losses = True

    def rounds_before(self, step: int) -> int:
        return (step + self.tau - 1) // self.tau

    def init_state(self) -> ScheduleState:
        """``leaders`` (local leader per group) and ``global_leader``: ``None`` until the first election."""
        return {"leaders": None, "global_leader": None}

    def wants_losses(self, step: int, state: ScheduleState) -> bool:
        return step % self.tau == 0 or state.get("leaders") is None

    def elect(self, losses: np.ndarray) -> ScheduleState:
        """The run state after electing the leaders from per-worker loss estimates (ties: lowest index)."""
        losses = np.asarray(losses, dtype=np.float64)
        if losses.shape != (self.m,):
            raise ValueError(f"LSGD needs one loss estimate per worker ({self.m}), got shape {losses.shape}")
        leaders = [int(np.flatnonzero(self.group_of == g)[np.argmin(losses[self.group_of == g])])
                   for g in range(self.groups)]
        return {"leaders": leaders, "global_leader": int(np.argmin(losses))}

    def advance(self, step: int, ctx: MixContext, state: ScheduleState) -> tuple[Mix, ScheduleState]:
        n, m = self.n, self.m
        refresh = step % self.tau == 0
        if refresh or state.get("leaders") is None:
            if ctx.losses is None:
                raise ValueError("LSGD needs loss estimates to elect a leader")
            state = self.elect(ctx.losses)
        leaders = state["leaders"]
        global_leader = state["global_leader"]
        R = np.eye(n)
        if refresh:
            for g, leader in enumerate(leaders):
                slot = m + g
                R[:, slot] = 0.0
                R[leader, slot] = 1.0
            if self.multi:
                slot = m + self.groups
                R[:, slot] = 0.0
                R[global_leader, slot] = 1.0
        P = np.eye(n)
        a_loc = ctx.lr * self.lam
        a_glob = ctx.lr * self.lam_global
        for i in range(m):
            g = self.group_of[i]
            col = np.zeros(n)
            keep = 1.0
            if i != leaders[g]:
                col[m + g] += a_loc
                keep -= a_loc
            if self.multi and i != global_leader:
                col[m + self.groups] += a_glob
                keep -= a_glob
            col[i] += keep
            P[:, i] = col
        info = {"leader": global_leader, "local_leaders": list(leaders), "refresh": refresh}
        pattern = "broadcast" if refresh else "local"
        return Mix(R @ P, pattern, round=self.rounds_before(step) if refresh else -1, info=info), state


class FedAvgSchedule(_Base):
    """Federated averaging ([CSGD] §5, McMahan et al.): rounds of ``tau`` local steps on sampled clients.

    Node layout: ``m`` clients then the server model (v = 1). At the start of round ``r`` a fraction
    ``fraction`` of the clients (at least one) is drawn without replacement from a generator seeded by
    ``(seed, r)``; only they compute gradients. After the round the server takes the average of the
    sampled clients' models weighted by their sample counts, and every client receives it
    (post-mix rule, every column of ``S`` equals the weight vector).

    ``outer=True`` tags every round ``info["outer"]``: a server optimizer (FedAvgM, FedAdam, FedYogi,
    FedAdagrad: ``AlgorithmSpec.outer``) then moves the server model from its value before the round along
    the round's average, and every client receives the result (:class:`coopsgd.algorithms.outer.OuterOptimizer`).

    Uneven local work (``local_work``, :data:`LOCAL_WORK`): sampled client i runs ``K_i <= tau`` local steps,
    the first ``K_i`` of the round (:meth:`active` masks it afterwards, so it computes nothing and its model
    waits for the round's end); :meth:`local_steps` gives the K_i of a round, the same on every engine.

    ``normalized=True`` is FedNova's round (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020: normalized averaging,
    plain local SGD): client i's normalized update is ``d_i = (x - y_i) / a_i`` with ``a_i = K_i`` and the server takes
    ``x <- x - tau_eff sum_i p_i d_i``, ``tau_eff = sum_i p_i a_i``. That is one averaging matrix over the
    sampled rows and the server row: client weights ``tau_eff p_i / a_i``, the server's ``1 - tau_eff sum_i p_i
    / a_i`` (the weights sum to 1; the server's is <= 0 by Cauchy-Schwarz). When the learning rate varies within
    a round, ``a_i`` is the sum of the client's K_i learning rates (a common factor cancels in the weights).

    ``track_lrs=True`` keeps the round's learning rates in the run state (``"lrs"``; FedNova, SCAFFOLD): a
    round then carries ``info["lr_sums"]``, each sampled client's sum of the learning rates of its K_i steps,
    when they were not all equal (:func:`round_lr_sums`).
    """

    def __init__(
        self,
        workers: int,
        tau: int,
        *,
        fraction: float = 1.0,
        sample_counts: Sequence[float] | None = None,
        seed: int = 0,
        outer: bool = False,
        local_work: str = "equal",
        min_local_steps: int = 1,
        speeds: Sequence[float] | None = None,
        normalized: bool = False,
        track_lrs: bool = False,
    ) -> None:
        self.m = check_int("workers", workers, minimum=1)
        self.tau = check_int("tau", tau, minimum=1)
        self.fraction = float(fraction)
        self.outer = bool(outer)
        self.n = self.m + 1
        self.seed = int(seed)
        if sample_counts is None:
            counts = np.ones(self.m)
        else:
            counts = np.asarray(sample_counts, dtype=np.float64)
            if counts.shape != (self.m,) or np.any(~np.isfinite(counts)) or np.any(counts <= 0):
                raise ConfigError.invalid(
                    "sample_counts", list(np.atleast_1d(counts)), f"need {self.m} positive numbers, one per client"
                )
        self.sample_counts = counts
        self.clients_per_round = max(1, int(round(self.fraction * self.m)))
        self._drawn: dict[tuple[int, int, int, int], np.ndarray] = {}  # recent rounds' draws (a cache: the draw is a function of r)
        if local_work not in LOCAL_WORK:
            raise ConfigError.invalid("local_work", local_work, f"choose one of {', '.join(LOCAL_WORK)}")
        self.local_work = local_work
        self.min_local_steps = check_int("min_local_steps", min_local_steps, minimum=1)
        if local_work == "uniform" and self.min_local_steps > self.tau:
            raise ConfigError.invalid("min_local_steps", min_local_steps, f"at most tau = {self.tau}")
        self.speeds = None if speeds is None else np.asarray(speeds, dtype=np.float64)
        if self.speeds is not None and (self.speeds.shape != (self.m,) or np.any(~np.isfinite(self.speeds))
                                        or np.any(self.speeds <= 0)):
            raise ConfigError.invalid("worker_speeds", list(np.atleast_1d(self.speeds)),
                                      f"need {self.m} positive speeds, one per client")
        self._budget = None
        if local_work == "budget":  # fixed per client: the deadline is tau steps of the fastest client
            s = np.ones(self.m) if self.speeds is None else self.speeds
            self._budget = np.maximum(1, np.floor(self.tau * s / s.max() + 1e-9)).astype(np.int64)
            self._budget.setflags(write=False)
        self.normalized = bool(normalized)
        self.track_lrs = bool(track_lrs)
        self._steps: dict[int, np.ndarray] = {}  # recent rounds' K_i (a cache, as _drawn)

    @property
    def uneven(self) -> bool:
        """Whether sampled clients may run fewer than tau local steps."""
        return self.local_work != "equal"

    def rounds_before(self, step: int) -> int:
        return step // self.tau

    def clients(self, round_index: int) -> np.ndarray:
        """Sorted indices of the clients sampled for round ``round_index`` (reproducible; a new array)."""
        if self.clients_per_round == self.m:
            return np.arange(self.m)
        r = int(round_index)
        key = (self.seed, self.m, self.clients_per_round, r)
        got = self._drawn.get(key)
        if got is None:  # a few recent rounds are kept: a step asks for its round's clients several times
            rng = np.random.default_rng([self.seed, r])
            got = np.sort(rng.choice(self.m, size=self.clients_per_round, replace=False))
            if len(self._drawn) >= 4:
                self._drawn.pop(next(iter(self._drawn)))
            self._drawn[key] = got
        return got.copy()

    def local_steps(self, round_index: int) -> np.ndarray:
        """K_i of the clients sampled for round ``round_index``, in the order of :meth:`clients` (a new array):
        tau each (``"equal"``), a draw from ``default_rng([seed, round, client])`` uniform on
        {min_local_steps, ..., tau} (``"uniform"``), or the client's fixed budget (``"budget"``)."""
        r = int(round_index)
        chosen = self.clients(r)
        if self.local_work == "equal":
            return np.full(chosen.size, self.tau, dtype=np.int64)
        if self._budget is not None:
            return self._budget[chosen].copy()
        got = self._steps.get(r)
        if got is None:
            got = np.array([np.random.default_rng([self.seed, r, int(i)]).integers(self.min_local_steps, self.tau + 1)
                            for i in chosen], dtype=np.int64)
            if len(self._steps) >= 4:
                self._steps.pop(next(iter(self._steps)))
            self._steps[r] = got
        return got.copy()

    def active(self, step: int) -> np.ndarray | None:
        if self.clients_per_round == self.m and not self.uneven:
            return None
        r, j = divmod(int(step), self.tau)
        chosen = self.clients(r)
        if self.uneven:  # a client works in the first K_i steps of the round only
            chosen = chosen[self.local_steps(r) > j]
        mask = np.zeros(self.m, dtype=bool)
        mask[chosen] = True
        return mask

    def init_state(self) -> ScheduleState:
        """``lrs`` (with ``track_lrs``): the learning rates of the current round's steps so far."""
        return {"lrs": []} if self.track_lrs else {}

    def advance(self, step: int, ctx: MixContext, state: ScheduleState) -> tuple[Mix | None, ScheduleState]:
        if not self.track_lrs:
            return self._mix(step, ctx), state
        lrs = [*state.get("lrs", []), float(ctx.lr)] if step % self.tau else [float(ctx.lr)]
        mix = self._mix(step, ctx, lrs)
        return mix, {"lrs": [] if mix is not None else lrs}

    def _lr_sums(self, steps: np.ndarray, lrs: Sequence[float] | None) -> np.ndarray | None:
        """Each sampled client's sum of the learning rates of its K_i steps, or ``None`` when the round's
        learning rates were all equal (or are not known: a fresh run state)."""
        if lrs is None or len(lrs) < int(steps.max(initial=1)) or len(set(lrs)) <= 1:
            return None
        cum = np.cumsum(np.asarray(lrs, dtype=np.float64))
        return cum[steps - 1]

    def _weights(self, chosen: np.ndarray, steps: np.ndarray, sums: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The round's sources and weights: FedAvg's ``p_i``, or FedNova's (see the class docstring)."""
        p = self.sample_counts[chosen] / self.sample_counts[chosen].sum()
        if not self.normalized:
            return chosen, p
        a = steps.astype(np.float64) if sums is None or np.any(sums <= 0) else sums
        if np.all(a == a[0]):  # tau_eff / a_i = 1: FedAvg's weights, exactly
            return chosen, p
        tau_eff = float(np.dot(p, a))
        w = tau_eff * p / a
        server = 1.0 - float(w.sum())
        if server == 0.0:
            return chosen, w
        return np.append(chosen, self.m), np.append(w, server)

    def _mix(self, step: int, ctx: MixContext, lrs: Sequence[float] | None = None) -> Mix | None:
        if (step + 1) % self.tau:
            return None
        r = step // self.tau
        chosen = self.clients(r)
        info: dict[str, Any] = {"clients": chosen.tolist()}
        steps = self.local_steps(r)
        sums = self._lr_sums(steps, lrs) if self.track_lrs else None
        if self.uneven:
            info["local_steps"] = steps.tolist()
        if sums is not None:
            info["lr_sums"] = sums.tolist()
        sources, weights = self._weights(chosen, steps, sums)
        if self.outer:
            info["outer"] = True
        if np.all(np.isfinite(weights)) and np.all(weights != 0):
            # S = w 1^T: the round is known from the sampled clients' weights (O(c m), no n x n matrix);
            # the dense S is built only when something reads it
            return Mix(None, "parameter_server", round=r, info=info,
                       structure=Averaging(self.n, sources, weights))
        w = np.zeros(self.n)
        w[sources] = weights
        return Mix(np.tile(w[:, None], (1, self.n)), "parameter_server", round=r, info=info)


def round_lr_sums(mix: Mix, tau: int, lr: float) -> np.ndarray:
    """Each sampled client's sum of the learning rates of its local steps in the round ``mix`` ends (in the
    order of ``mix.info["clients"]``): ``info["lr_sums"]`` when the round's learning rates varied, else
    ``K_i * lr`` (``K_i`` = ``info["local_steps"]``, tau without uneven work). SCAFFOLD divides by it."""
    got = mix.info.get("lr_sums")
    if got is not None:
        return np.asarray(got, dtype=np.float64)
    k = len(mix.info.get("clients", ()))
    steps = mix.info.get("local_steps")
    if steps is None:
        return np.full(k, tau * lr)
    return np.asarray(steps, dtype=np.float64) * lr


class DownpourSchedule(_Base):
    """DOWNPOUR (Dean et al. 2012), the asynchronous parameter-server baseline of [LSGD], as linear maps.

    Node layout: ``m`` workers, the server model ``z`` (slot m), and one "last pulled" copy ``b_i`` per
    worker (slots m+1 .. 2m), so v = m + 1. Every ``tau`` steps each worker, in an order that models
    asynchrony, pushes its accumulated update and pulls the server model:

        z <- z + (x_i - b_i);   x_i <- z;   b_i <- z.

    Each push/pull is linear in the stacked state, so a round is a product of m matrices. Workers later
    in the order see the earlier pushes: the staleness of asynchronous training. The order is a
    permutation drawn from a generator seeded by ``(seed, round)``; the simulator replaces it with the
    order of arrival on its simulated clock (``MixContext.order``: the schedule declares ``sequential``).
    """

    sequential = True

    def __init__(self, workers: int, tau: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.m = check_int("workers", workers, minimum=1)
        self.tau = check_int("tau", tau, minimum=1)
        self.n = 2 * self.m + 1
        self.seed = int(seed)
        self.shuffle = bool(shuffle)

    def rounds_before(self, step: int) -> int:
        return step // self.tau

    def order(self, round_index: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.m)
        return np.random.default_rng([self.seed, round_index]).permutation(self.m)

    def round_matrix(self, order: Sequence[int]) -> np.ndarray:
        m, n, z = self.m, self.n, self.m
        S = np.eye(n)
        for i in order:
            b = m + 1 + int(i)
            T = np.eye(n)
            # column convention: new_j = sum_l old_l T[l, j]
            T[:, z] = 0.0
            T[z, z] = 1.0
            T[i, z] += 1.0
            T[b, z] -= 1.0  # z + x_i - b_i
            T[:, i] = T[:, z]  # x_i <- new z
            T[:, b] = T[:, z]  # b_i <- new z
            S = S @ T
        return S

    def _mix(self, step: int, ctx: MixContext) -> Mix | None:
        if (step + 1) % self.tau:
            return None
        r = step // self.tau
        if ctx.order is not None:
            order = np.asarray(ctx.order, dtype=np.int64)
            if sorted(order.tolist()) != list(range(self.m)):
                raise ValueError(f"push order must be a permutation of the {self.m} workers, got {order.tolist()}")
            info: dict[str, Any] = {"order": order.tolist(), "order_source": "engine"}
        else:
            order = self.order(r)
            info = {"order": order.tolist()}
        return Mix(self.round_matrix(order.tolist()), "parameter_server", round=r, info=info)


class CallableSchedule(_Base):
    """A user-supplied schedule: ``fn(step, ctx) -> matrix | None`` (None means identity / no communication).

    Matrices are checked for shape and finiteness only; the theorems are not assumed to apply.
    """

    def __init__(
        self, n: int, fn: Callable[[int, MixContext], MixingMatrix | np.ndarray | None], *, pattern: str = "neighbor"
    ) -> None:
        self.n = check_int("n", n, minimum=1)
        if not callable(fn):
            raise ConfigError.invalid("schedule", fn, "must be callable as fn(step, ctx)")
        self.fn = fn
        self.pattern = pattern

    def init_state(self) -> ScheduleState:
        """``rounds``: the communication rounds so far."""
        return {"rounds": 0}

    def advance(self, step: int, ctx: MixContext, state: ScheduleState) -> tuple[Mix | None, ScheduleState]:
        out = self.fn(step, ctx)
        if out is None:
            return None, state
        M = _as_matrix(out)
        if M.shape != (self.n, self.n) or not np.all(np.isfinite(M)):
            raise ConfigError.invalid(
                "schedule", f"matrix of shape {M.shape} at step {step}", f"must return a finite {self.n}x{self.n} matrix"
            )
        r = int(state.get("rounds", 0))
        return Mix(M, self.pattern, round=r), {**state, "rounds": r + 1}


class MatchaSchedule(_Base):
    """MATCHA (Wang, Sahu, Yang, Joshi 2019): gossip over randomly activated matchings of a base graph.

    The base graph's edges are split into M matchings with Laplacians ``L_1 .. L_M`` (see
    :mod:`coopsgd.theory.matcha`). Every ``tau`` steps (after step ``k`` with ``(k + 1) % tau == 0``)
    round ``r = k // tau`` draws ``B_j ~ Bernoulli(p_j)`` independently for every matching from
    ``np.random.default_rng([seed, r])`` and mixes with

        W_r = I - alpha * sum_j B_j L_j,

    symmetric and doubly stochastic (every row of a Laplacian sums to zero). A round in which no matching
    is active is the identity: no communication (``None``). The schedule is stateless given the step,
    so a resumed run draws the same matchings; the matrices are random, so :meth:`matrices` is ``None``.
    ``Mix.round`` is the MATCHA round index r (rounds without an active matching included) and
    ``Mix.info["matchings"]`` lists the active matchings.
    """

    def __init__(
        self,
        n: int,
        laplacians: Sequence[np.ndarray],
        probabilities: Sequence[float] | np.ndarray,
        alpha: float,
        *,
        tau: int = 1,
        seed: int = 0,
    ) -> None:
        self.n = check_int("n", n, minimum=1)
        self.tau = check_int("tau", tau, minimum=1)
        self.seed = int(seed)
        self.laplacians = np.stack([np.asarray(L, dtype=np.float64) for L in laplacians]) if len(laplacians) \
            else np.zeros((0, self.n, self.n))
        if self.laplacians.shape[1:] != (self.n, self.n):
            raise ConfigError.invalid("laplacians", self.laplacians.shape, f"need {self.n}x{self.n} Laplacians")
        p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
        if p.shape != (len(self.laplacians),) or np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
            raise ConfigError.invalid("probabilities", p.tolist(), "need one probability in [0, 1] per matching")
        self.probabilities = p
        self.alpha = float(alpha)

    @property
    def matchings(self) -> int:
        """M, the number of matchings."""
        return len(self.laplacians)

    def activations(self, round_index: int) -> np.ndarray:
        """Which matchings are active in round ``round_index`` (booleans, reproducible from the seed)."""
        rng = np.random.default_rng([self.seed, int(round_index)])
        return rng.random(self.matchings) < self.probabilities

    def round_matrix(self, active: np.ndarray) -> np.ndarray:
        """``I - alpha * sum_{j active} L_j``."""
        W = np.eye(self.n)
        for j in np.flatnonzero(active):
            W -= self.alpha * self.laplacians[j]
        return W

    def expected_gram(self) -> np.ndarray:
        """The closed form of ``E[W^T W]`` over one round's draw (see :func:`coopsgd.theory.matcha.expected_gram`)."""
        from coopsgd.theory.matcha import expected_gram

        return expected_gram(list(self.laplacians), self.probabilities, self.alpha, self.n)

    def _mix(self, step: int, ctx: MixContext) -> Mix | None:
        if (step + 1) % self.tau:
            return None
        r = step // self.tau
        active = self.activations(r)
        if not active.any():
            return None
        return Mix(self.round_matrix(active), "neighbor", round=r,
                   info={"matchings": np.flatnonzero(active).tolist()})


__all__.append("MatchaSchedule")
