"""Reference engine: the exact matrix update of [CSGD] eq. (10) in float64 on analytic objectives.

State: an (m+v) x d numpy array, one row per node (workers first, then auxiliaries). One step:

* workers compute gradients ``G_k`` at ``X_k`` (auxiliaries and inactive FedAvg clients: zero);
* the schedule gives ``S_k`` (or nothing: identity);
* ``post_mix``: ``X_{k+1} = (X_k - lr G_k) S_k``; ``pre_mix``: ``X_{k+1} = X_k S_k - lr G_k``;
* a spec with an outer optimizer (DiLoCo, SlowMo: ``spec.outer``): after a round tagged
  ``info["outer"]`` (the workers averaged to ``a``), z = node m takes its outer step on ``z - a``
  (:func:`outer_step`, written here in numpy on its own) and every worker restarts from it;
* a spec with robust aggregation (``spec.robust``, :mod:`coopsgd.algorithms.robust`): FedAvg's round sends the
  rule's aggregate of what the sampled clients send (Byzantine ones their attack), from the rules' numpy
  definitions;
* a spec with compression (``spec.compressed``, SPEC §11): the round sends compressed payloads
  (:class:`~coopsgd.engines.compressed.ReferenceCompressedRounds`: averaging rounds with x_ref and error
  feedback, CHOCO gossip, elastic rounds through the centres' copies, DOWNPOUR's pushes and replies), each
  node's payload from the numpy definition of its compressor.

This is the ground truth the simulator and the distributed engine are tested against. Each worker has
its own generator seeded from ``(seed, worker)``; the engine records per step each node's objective,
the averaged model's objective (u_k = X_k 1/(m+v)), the centre model's objective and the consensus
distance ``||X (I - J)||_F^2 / m``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from coopsgd.algorithms.outer import ADAPTIVE_KINDS, OuterOptimizer
from coopsgd.algorithms.robust import aggregate_np, attack_np
from coopsgd.algorithms.schedules import Mix, MixContext, round_lr_sums
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.algorithms.streaming import fragment_bounds
from coopsgd.engines.asynchronous import AsyncServer, start_rows
from coopsgd.engines.base import (
    NAN_POLICIES,
    Batch,
    DroppedRound,
    NonFiniteError,
    StepStats,
    unwrap_state,
    wrap_state,
)
from coopsgd.engines.compressed import ReferenceCompressedRounds
from coopsgd.engines.fragments import reference_fragment_stages
from coopsgd.engines.mixing import RoundKind, apply_mixing, plan_round
from coopsgd.errors import ConfigError, check_float, check_int
from coopsgd.objectives import Objective

__all__ = ["ReferenceEngine", "ReferenceResult", "StepStats", "NonFiniteError", "run_reference", "consensus_distance",
           "outer_step", "outer_init"]


def outer_init(outer: OuterOptimizer, d: int) -> dict[str, Any]:
    """A fresh outer-optimizer state (numpy)."""
    if outer.kind in ADAPTIVE_KINDS:
        return {"step": 0, "exp_avg": np.zeros(d), "exp_avg_sq": np.zeros(d)}
    out: dict[str, Any] = {"step": 0, "last_lr": 0.0}
    if outer.momentum > 0:
        out["momentum_buffer"] = np.zeros(d)
    return out


def _put(full: np.ndarray, lo: int, hi: int, part: np.ndarray) -> np.ndarray:
    """A copy of ``full`` with ``[lo, hi)`` replaced by ``part``."""
    out = full.copy()
    out[lo:hi] = part
    return out


def outer_step(outer: OuterOptimizer, state: dict[str, Any], z: np.ndarray, a: np.ndarray,
               lr: float) -> tuple[np.ndarray, dict[str, Any]]:
    """The outer optimizer's step of z on the pseudo-gradient ``z - a``: (new z, new state); pure.

    SGD (torch.optim.SGD, dampening 0, the buffer starting at 0): ``buf = mu r buf + Delta`` with
    ``r = lr / last lr`` for SlowMo's lr scaling (else 1), ``D = Delta + mu buf`` (Nesterov) or ``buf``;
    Adam: torch.optim.Adam's direction; Adam without bias correction, Yogi and Adagrad: Reddi et al.'s server
    rules (ICLR 2021, Algorithm 2), ``m = beta1 m + (1 - beta1) Delta``, v by the rule, ``D = m / (sqrt(v) + eps)``.
    The new z is ``a + (Delta - outer_lr D)``.
    """
    st = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    delta = z - a
    st["step"] = int(st["step"]) + 1
    if outer.kind in ADAPTIVE_KINDS and not (outer.kind == "adam" and outer.bias_correction):
        b1, b2 = outer.betas
        st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * delta
        sq = delta * delta
        v = st["exp_avg_sq"]
        if outer.kind == "adam":
            v = b2 * v + (1 - b2) * sq
        elif outer.kind == "yogi":
            v = v - (1 - b2) * sq * np.sign(v - sq)
        else:
            v = v + sq
        st["exp_avg_sq"] = v
        D = st["exp_avg"] / (np.sqrt(v) + outer.eps)
    elif outer.kind == "adam":
        b1, b2 = outer.betas
        t = float(st["step"])
        st["exp_avg"] = st["exp_avg"] + (1 - b1) * (delta - st["exp_avg"])
        st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * delta * delta
        denom = np.sqrt(st["exp_avg_sq"]) / math.sqrt(1 - b2**t) + outer.eps
        D = st["exp_avg"] / denom / (1 - b1**t)
    elif outer.momentum > 0:
        last = float(st["last_lr"])
        r = lr / last if (outer.lr_scaled and last > 0.0) else 1.0
        st["momentum_buffer"] = outer.momentum * r * st["momentum_buffer"] + delta
        D = delta + outer.momentum * st["momentum_buffer"] if outer.nesterov else st["momentum_buffer"]
    else:
        D = delta
    if outer.lr_scaled:
        outer.check_round_lr(lr)
        st["last_lr"] = float(lr)
    return a + (delta - outer.lr * D), st


def consensus_distance(state: np.ndarray, workers: int) -> float:
    """``||X (I - J)||_F^2 / m`` over all m+v nodes ([CSGD] Lemma 2's network error quantity)."""
    dev = state - state.mean(axis=0, keepdims=True)
    return float(np.sum(dev * dev) / workers)


@dataclass
class ReferenceResult:
    """Per-record arrays of a reference run (record ``j`` is the state after ``steps[j]`` steps)."""

    spec: AlgorithmSpec
    steps: np.ndarray
    node_objectives: np.ndarray  # (records, m+v)
    average_objective: np.ndarray  # objective at u_k = mean of all nodes
    center_objective: np.ndarray
    consensus: np.ndarray
    rounds: np.ndarray
    leaders: list[int | None]
    final_state: np.ndarray
    trajectory: np.ndarray | None = None  # (records, m+v, d) when requested

    @property
    def final_center_objective(self) -> float:
        return float(self.center_objective[-1])

    def to_dict(self) -> dict[str, Any]:
        m = self.spec.workers
        return {
            "preset": self.spec.name,
            "steps": int(self.steps[-1]),
            "final_objective": float(self.center_objective[-1]),
            "final_average_objective": float(self.average_objective[-1]),
            "workers": [float(v) for v in self.node_objectives[-1, :m]],
            "auxiliaries": [float(v) for v in self.node_objectives[-1, m:]],
            "consensus_distance": float(self.consensus[-1]),
            "communication_rounds": int(self.rounds[-1]),
        }


class ReferenceEngine:
    """Runs an :class:`AlgorithmSpec` exactly on an :class:`Objective`.

    Args:
        spec: the algorithm.
        objective: the problem (see :mod:`coopsgd.objectives`).
        x0: common start (d,) or per-worker starts (m, d); default ``objective.initial_point``.
        seed: base seed; worker i's gradient noise/batches use ``default_rng([seed, i])``.
        nan_policy: ``"stop"`` or ``"skip"`` (:class:`coopsgd.engines.base.Engine`).
        layout: the shapes of the tensors x is made of, in order (PowerSGD compresses each matrix-shaped one;
            ``None``: x is one vector).
    """

    def __init__(self, spec: AlgorithmSpec, objective: Objective, x0: np.ndarray | None = None, *, seed: int = 0,
                 nan_policy: str = "stop", layout: Sequence[Sequence[int]] | None = None) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ConfigError.invalid("nan_policy", nan_policy, f"choose one of {', '.join(NAN_POLICIES)}")
        self.nan_policy = nan_policy
        self.spec = spec
        self.objective = objective
        self.seed = int(seed)
        self.layout = None if layout is None else [tuple(int(n) for n in shape) for shape in layout]
        m = spec.workers
        if x0 is None:
            x0 = objective.initial_point(np.random.default_rng(seed))
        x0 = np.asarray(x0, dtype=np.float64)
        if x0.shape[-1] != objective.dim:
            raise ConfigError.invalid("x0", f"array of shape {x0.shape}", f"last axis must be the objective's dimension {objective.dim}")
        self.state = spec.initial_state(x0).astype(np.float64)
        self.rngs = [np.random.default_rng([self.seed, i]) for i in range(m)]
        self.step_count = 0
        self.rounds = 0
        #: the rounds weighted by the share of x each sends (a Streaming DiLoCo fragment: its share; any other
        #: round: 1), and the largest share of one step (the trainer's bytes and peak bytes per step)
        self.units_sent = 0.0
        self.peak_units = 0.0
        self.leader: int | None = None
        self.schedule_state = spec.schedule.init_state()
        self.outer_state = None if spec.outer is None else outer_init(spec.outer, objective.dim)
        #: SCAFFOLD's control variates (``spec.control``): row i worker i's c_i, row m the server's c
        self.control = np.zeros_like(self.state) if spec.control else None
        self._compressed = None if spec.compressed is None else ReferenceCompressedRounds(
            spec.compressed, nodes=spec.nodes, workers=m, width=objective.dim, seed=self.seed, layout=layout,
            start=x0 if x0.ndim == 1 else x0.mean(axis=0))
        sizes = [objective.dim] if self.layout is None else [int(np.prod(s)) for s in self.layout]
        self._fragments = reference_fragment_stages(spec, sizes, self.layout, nodes=spec.nodes, workers=m,
                                                    seed=self.seed, start=x0 if x0.ndim == 1 else x0.mean(axis=0))
        if self._fragments is not None:  # Streaming DiLoCo: a stage per fragment (coopsgd.engines.fragments)
            self._compressed = None
        #: an asynchronous server (``spec.asynchronous``): the slots' pulled copies, buffer, momentum and ledger
        self._async = None if spec.asynchronous is None else AsyncServer(
            spec.asynchronous, self.state[start_rows(spec.schedule)], lambda: np.zeros(objective.dim))
        self._async_good = None if self._async is None else self._async.snapshot()
        self._bad: dict[str, int] | None = None  # nan_policy="skip": worker -> first non-finite step
        self._good: tuple[np.ndarray, int, Any, Any, Any] = (self.state.copy(), 0, self.outer_state,
                                                             self._compression_state(), self._control_copy())

    # -- views -----------------------------------------------------------------------------------
    @property
    def workers_state(self) -> np.ndarray:
        return self.state[: self.spec.workers]

    def average(self) -> np.ndarray:
        """u_k = X_k 1/(m+v) ([CSGD] eq. (13))."""
        return self.state.mean(axis=0)

    def center(self) -> np.ndarray:
        """The model to evaluate (:meth:`AlgorithmSpec.center_node`): workers' average, auxiliary node 0,
        or the current (global) leader; before the first election the worker of lowest objective."""
        node = self.center_node()
        return self.workers_state.mean(axis=0) if node is None else self.state[node]

    # -- stepping --------------------------------------------------------------------------------
    def _gradients(self, active: np.ndarray | None) -> np.ndarray:
        """The workers' stochastic gradients (zero for inactive ones and auxiliaries); with FedProx's
        ``spec.prox`` = mu the active workers' gradients get ``mu (x_i - z)``, z = node m (the server model)."""
        m = self.spec.workers
        mu = self.spec.prox
        C = self.control
        G = np.zeros_like(self.state)
        for i in range(m):
            if active is None or active[i]:
                G[i] = self.objective.gradient(self.state[i], i, self.rngs[i])
                if mu > 0.0:
                    G[i] = G[i] + mu * (self.state[i] - self.state[m])
                if C is not None:  # SCAFFOLD: g - c_i + c
                    G[i] = G[i] - C[i] + C[m]
        return G

    def _control_copy(self) -> np.ndarray | None:
        return None if self.control is None else self.control.copy()

    def _control_round(self, X: np.ndarray, mix: Mix, lr: float) -> np.ndarray:
        """SCAFFOLD (option II) before the round: the sampled clients' ``c_i += (z - y_i) / L_i - c`` (L_i the sum
        of the learning rates of client i's local steps in the round: :func:`round_lr_sums`) and the server's
        ``c += (1/m) sum_S (c_i^+ - c_i)``, from the models ``X`` before the round; returns the new array."""
        assert self.control is not None
        m, tau = self.spec.workers, self.spec.tau
        plan = plan_round(mix).plan
        sources = np.arange(m) if plan.sources is None else plan.sources
        sums = round_lr_sums(mix, tau, lr)
        if not np.all(sums > 0.0):
            raise ConfigError.invalid("lr", lr, "SCAFFOLD divides by the sum of a round's learning rates: lr > 0")
        C = self.control.copy()
        div = sums[0] if np.all(sums == sums[0]) else sums[:, None]
        dc = (X[m] - X[sources]) / div - C[m]
        C[sources] += dc
        C[m] += dc.sum(axis=0) / m
        return C

    name = "reference"
    #: The reference engine draws its own gradient noise; it is fed no batches.
    local_workers: tuple[int, ...] = ()
    is_writer = True

    def step(self, batches: Sequence[Batch | None] | None, lr: float) -> StepStats:
        """Take one step of the algorithm with learning rate ``lr``.

        ``batches`` must be ``None``: each worker draws its own stochastic gradient from the objective
        (the engines' common signature is ``step(batches, lr)``).
        """
        if batches is not None:
            raise ConfigError.invalid("batches", type(batches).__name__,
                                      "the reference engine draws its own gradients; pass None")
        lr = check_float("lr", lr, low=0.0)
        spec = self.spec
        k = self.step_count
        sched = spec.schedule
        losses = None
        if spec.needs_losses and sched.wants_losses(k, self.schedule_state):
            losses = np.asarray(self.objective.value(self.workers_state), dtype=np.float64)
            if self._bad is None:
                self._check_finite(losses, k, "loss")
        skipped = self._bad is not None
        info: dict[str, Any] | None = None
        G = None
        if not skipped:
            G = self._gradients(sched.active(k))
            skipped = not self._finite_or_skip(G[: spec.workers], k, "gradient")
        mix, sched_state = sched.advance(k, MixContext(step=k, lr=lr, losses=losses), self.schedule_state)
        if not skipped:
            assert G is not None
            with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported just below
                z_old = None
                control = self.control
                fragment = mix is not None and "fragment" in mix.info
                if fragment:  # Streaming DiLoCo (post_mix): the fragment's round or its delayed update
                    assert mix is not None
                    X, outer_state = self._fragment_event(self.state - lr * G, mix, lr)
                elif spec.rule == "post_mix":
                    X = self.state - lr * G
                    if control is not None and mix is not None and mix.communicates:
                        control = self._control_round(X, mix, lr)
                    if mix is not None:
                        if spec.outer is not None:
                            z_old = X[spec.workers].copy()
                        X = self._round(X, mix)
                else:
                    X = self.state if mix is None else self._round(self.state, mix)
                    X = X - lr * G
                if not fragment:
                    outer_state = self._outer_round(X, mix, z_old, lr)
                async_snap = None
                if self._async is not None:  # the arrivals of this step, in order, on the new rows
                    async_snap = self._async.snapshot()
                    report = self._async.arrive(X, spec.workers, sched.step_events(k))  # type: ignore[attr-defined]
                    info = report.info()
            if self._finite_or_skip(X, k, "model") and (control is None or self._finite_or_skip(control, k, "model")):
                self.state = X
                self.outer_state = outer_state
                self.control = control
            elif async_snap is not None:
                assert self._async is not None
                self._async.restore(async_snap)
                info = None
                skipped = True
        if skipped and self._async is not None:  # a dropped step's slots still pass on: the pulls alone
            self._async.pull_only(self.state, spec.workers, sched.step_events(k))  # type: ignore[attr-defined]
        self.schedule_state = sched_state
        self.step_count += 1
        communicated = mix is not None and mix.communicates
        if self._async is not None:  # an asynchronous step communicates when someone arrived (skipped: nothing applied)
            communicated = bool(sched.step_events(k).arrivals)  # type: ignore[attr-defined]
            info = info if info is not None and not skipped else {"arrivals": [], "staleness": [], "server_steps": 0}
        if communicated:
            self._count_round(mix)
        if mix is not None and "leader" in mix.info:
            self.leader = mix.info["leader"]
        with np.errstate(all="ignore"):
            values = np.asarray(self.objective.value(self.workers_state), dtype=np.float64)
        return StepStats(
            step=k, lr=lr, losses=values, communicated=communicated, round=self.rounds,
            pattern=("parameter_server" if communicated else None) if info is not None else
            (None if mix is None else mix.pattern),
            info=info if info is not None else ({} if mix is None else mix.info), skipped=skipped,
        )

    def _outer_round(self, X: np.ndarray, mix: Mix | None, z_old: np.ndarray | None, lr: float) -> Any:
        """The outer optimizer's step after an outer round (DiLoCo, SlowMo, the federated server optimizers), in
        place on ``X``; returns the outer state (unchanged when ``mix`` is no outer round)."""
        spec = self.spec
        if spec.outer is None or mix is None or not mix.info.get("outer"):
            return self.outer_state
        m = spec.workers
        col = np.asarray(mix.matrix[:, m])
        if col[m] == 1.0 and np.count_nonzero(col) == 1:  # z kept: the workers hold their average
            z, a = X[m], X[0]
        else:  # FedAvg's round sent the clients' average to every node, z included
            assert z_old is not None
            z, a = z_old, X[m]
        z, outer_state = outer_step(spec.outer, self.outer_state, z, a, lr)  # type: ignore[arg-type]
        X[: m + 1] = z
        if self._compressed is not None:  # the workers restarted from z: z is their new x_ref
            self._compressed.settle(X, plan_round(mix))
        return outer_state

    def _count_round(self, mix: Mix | None) -> None:
        """Count a communicating step: one round, and the share of the model it sent (a fragment's columns)."""
        self.rounds += 1
        units = 1.0
        if mix is not None and "fragment" in mix.info:
            lo, hi = self.fragment_columns(mix.info)
            units = (hi - lo) / self.objective.dim
        self.units_sent += units
        self.peak_units = max(self.peak_units, units)

    def fragment_columns(self, info: Mapping[str, Any]) -> tuple[int, int]:
        """The coordinates ``[lo, hi)`` of a Streaming DiLoCo fragment (its round's ``Mix.info``): of the layout's
        tensors, else of x cut into equal chunks (:func:`~coopsgd.algorithms.streaming.fragment_bounds`)."""
        sizes = [self.objective.dim] if self.layout is None else [int(np.prod(s)) for s in self.layout]
        return fragment_bounds(sizes, int(info["fragments"]), str(info.get("split", "tensors")))[int(info["fragment"])]

    def _fragment_event(self, X: np.ndarray, mix: Mix, lr: float) -> tuple[np.ndarray, Any]:
        """Streaming DiLoCo after the local step (``X``): at a send, the workers' fragment averaged by the round,
        z's fragment stepped by the outer optimizer on its own coordinates (the workers keep their values when
        the update is delayed); at the application (or a send without delay) every worker's fragment becomes
        ``alpha x_i + (1 - alpha) z``. Returns the new array and the outer optimizer's state."""
        assert self.spec.outer is not None and self.outer_state is not None
        m = self.spec.workers
        info = mix.info
        lo, hi = self.fragment_columns(info)
        st: Any = self.outer_state
        X = X.copy()
        stage = None if self._fragments is None else self._fragments.stages[int(info["fragment"])]
        delayed = int(info.get("delay", 0)) > 0
        if info.get("outer"):
            Y = self._round(X[:, lo:hi], mix) if stage is None else stage.communicate(X[:, lo:hi], plan_round(mix))
            whole = (lo, hi) == (0, X.shape[1])
            sub = st if whole else {k: (v[lo:hi] if isinstance(v, np.ndarray) else v) for k, v in st.items()}
            # delayed: z received the average (the workers kept their values); else the workers hold it
            z_in, a = (X[m, lo:hi], Y[m]) if delayed else (Y[m], Y[0])
            z, new = outer_step(self.spec.outer, sub, z_in, a, lr)
            if not whole:
                new = {k: (_put(st[k], lo, hi, v) if isinstance(v, np.ndarray) else v) for k, v in new.items()}
            st = new
            X[m, lo:hi] = z
            if stage is not None:  # z's fragment is what every node agrees on (rows from z's on)
                stage.settle(X[m:, lo:hi], plan_round(mix))
            if delayed:
                return X, st
        alpha = float(info.get("merge_alpha", 0.0))
        X[:m, lo:hi] = X[m, lo:hi] if alpha == 0.0 else alpha * X[:m, lo:hi] + (1.0 - alpha) * X[m, lo:hi]
        return X, st

    def _round(self, X: np.ndarray, mix: Mix) -> np.ndarray:
        """``X`` after the round ``mix``: ``X S``, the compressed round of ``spec.compressed``, or (``spec.robust``)
        FedAvg's round with the robust rule's aggregate of what the sampled clients send in place of their mean."""
        if self.spec.robust is not None:
            plan = plan_round(mix).plan
            if plan.kind is RoundKind.AVERAGE and plan.weights is not None:
                m = self.spec.workers
                sources = np.arange(plan.n) if plan.sources is None else plan.sources
                full = slice(0, X.shape[1])
                sent = attack_np(self.spec.robust, X[sources], X[m], sources, mix.round, full)
                y = aggregate_np(self.spec.robust, sent, plan.weights, full)
                out = X.copy()
                out[:] = y  # FedAvg's round sends the aggregate to every node, z included
                return out
        if self._compressed is None:
            return apply_mixing(X, mix.matrix)
        return self._compressed.communicate(X, plan_round(mix))

    def _compression_state(self) -> dict[str, Any] | None:
        if self._fragments is not None:
            return self._fragments.state()
        return None if self._compressed is None else self._compressed.state()

    def _finite_or_skip(self, arr: np.ndarray, step: int, what: str) -> bool:
        """True when ``arr`` is finite; else raise (``"stop"``) or remember the workers (``"skip"``)."""
        if np.all(np.isfinite(arr)):
            return True
        if self.nan_policy == "stop":
            self._check_finite(arr, step, what)
        bad = np.flatnonzero(~np.all(np.isfinite(arr.reshape(arr.shape[0], -1)), axis=1))
        self._bad = self._bad or {}
        for i in bad[bad < self.spec.workers]:
            self._bad.setdefault(str(int(i)), step)
        return False

    # -- the loop's side of the engine contract ------------------------------------------------------
    def check_health(self) -> DroppedRound | None:
        """Under ``nan_policy="skip"``: drop the steps since the last good round after a non-finite value."""
        if self.nan_policy != "skip":
            return None
        if self._bad is None:
            self._good = (self.state.copy(), self.step_count, self.outer_state, self._compression_state(),
                          self._control_copy())
            if self._async is not None:
                self._async_good = self._async.snapshot()
            return None
        bad, self._bad = self._bad, None
        self.state = self._good[0].copy()
        self.outer_state = self._good[2]
        self.control = None if self._good[4] is None else self._good[4].copy()
        if self._compressed is not None:
            self._compressed.load(self._good[3])
        if self._fragments is not None:
            self._fragments.load(self._good[3])
        if self._async is not None and self._async_good is not None:  # rolled back: the slots pass on all the same
            self._async.restore(self._async_good)
            for j in range(self._good[1], self.step_count):
                self._async.pull_only(self.state, self.spec.workers, self.spec.schedule.step_events(j))  # type: ignore[attr-defined]
        first = dict(sorted(bad.items(), key=lambda kv: int(kv[0])))
        return DroppedRound(step=self.step_count - 1, workers=[int(w) for w in first], first_steps=first,
                            restored_to_step=self._good[1])

    def finish(self) -> None:
        return None

    def reduce_losses(self, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)

    def consensus_distance(self) -> float:
        return consensus_distance(self.state, self.spec.workers)

    def async_record(self) -> dict[str, Any]:
        """An asynchronous server's staleness statistics (:data:`~coopsgd.algorithms.asynchronous.ASYNC_STATS`);
        empty for every other algorithm."""
        return {} if self._async is None else self._async.stats()

    def center_node(self) -> int | None:
        """The centre model's node (:meth:`AlgorithmSpec.center_node`), ``None`` for the workers' average."""
        estimates = None
        if self.spec.center == "leader" and self.leader is None:
            estimates = np.asarray(self.objective.value(self.workers_state), dtype=np.float64)
        return self.spec.center_node(self.leader, estimates)

    def state_dict(self) -> dict[str, Any]:
        """The exact state (nodes, generators, counters, schedule run state) in the engines' envelope."""
        return wrap_state("reference", {
            "state": self.state.copy(), "rngs": [g.bit_generator.state for g in self.rngs],
            "step": self.step_count, "rounds": self.rounds, "leader": self.leader,
            "units_sent": self.units_sent, "peak_units": self.peak_units,
            "schedule_state": dict(self.schedule_state),
            "outer_state": None if self.outer_state is None else dict(self.outer_state),
            **({} if self.control is None else {"control": self.control.copy()}),
            **({} if self._compression_state() is None else {"compression": self._compression_state()}),
            **({} if self._async is None else {"asynchronous": self._async.state_dict()}),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = unwrap_state(state, "reference")
        if np.shape(p["state"]) != self.state.shape:
            raise ConfigError.invalid("state_dict.state", np.shape(p["state"]), f"expected {self.state.shape}")
        saved = p.get("compression")  # optional: absent from uncompressed runs
        stages = self._compressed if self._fragments is None else self._fragments
        if (saved is None) != (stages is None):
            raise ConfigError.invalid("state_dict.compression", None if saved is None else saved.get("compress"),
                                      "the checkpoint and this run differ in whether their rounds are compressed "
                                      "(resume with the checkpoint's compress setting)")
        if stages is not None and saved is not None:
            stages.load(saved)
        if self.control is not None:
            saved_c = p.get("control")
            if saved_c is None or np.shape(saved_c) != self.control.shape:
                raise ConfigError.invalid("state_dict.control", None if saved_c is None else np.shape(saved_c),
                                          f"this run keeps SCAFFOLD's control variates of shape {self.control.shape}")
            self.control = np.array(saved_c, dtype=np.float64)
        if self._async is not None:
            self._async.load_state_dict(p.get("asynchronous"), "state_dict.asynchronous")
        self.state = np.array(p["state"], dtype=np.float64)
        for g, st in zip(self.rngs, p["rngs"], strict=True):
            g.bit_generator.state = st
        self.step_count, self.rounds = int(p["step"]), int(p["rounds"])
        self.units_sent = float(p.get("units_sent", self.rounds))
        self.peak_units = float(p.get("peak_units", 1.0 if self.rounds else 0.0))
        self.leader = None if p["leader"] is None else int(p["leader"])
        self.schedule_state = dict(p["schedule_state"])
        if self.outer_state is not None:
            saved = p.get("outer_state")
            if not isinstance(saved, dict) or set(saved) != set(self.outer_state):
                raise ConfigError.invalid("state_dict.outer_state", None if saved is None else sorted(saved),
                                          f"this outer optimizer keeps {sorted(self.outer_state)}")
            self.outer_state = {k: (np.array(v, dtype=np.float64) if isinstance(v, np.ndarray) else v)
                                for k, v in saved.items()}

    def _check_finite(self, arr: np.ndarray, step: int, what: str) -> None:
        if np.all(np.isfinite(arr)):
            return
        bad = np.flatnonzero(~np.all(np.isfinite(arr.reshape(arr.shape[0], -1)), axis=1))
        node = int(bad[0])
        kind = "worker" if node < self.spec.workers else "auxiliary node"
        raise NonFiniteError(
            f"non-finite {what} on {kind} {node} at step {step}: the run diverged "
            f"(try a smaller learning rate, or for EASGD alpha < 2/(m+1))"
        )

    def steps(self, n: int, lr: float | Callable[[int], float]) -> Iterator[StepStats]:
        """Yield the stats of ``n`` further steps; ``lr`` may be a function of the global step."""
        for _ in range(check_int("steps", n, minimum=0)):
            eta = lr(self.step_count) if callable(lr) else lr
            yield self.step(None, float(eta))


def run_reference(
    spec: AlgorithmSpec,
    objective: Objective,
    *,
    steps: int,
    lr: float | Callable[[int], float],
    x0: np.ndarray | None = None,
    seed: int = 0,
    record_every: int = 1,
    keep_trajectory: bool = False,
    progress: bool = False,
) -> ReferenceResult:
    """Run ``spec`` for ``steps`` steps and return recorded objectives (record 0 is the start)."""
    steps = check_int("steps", steps, minimum=1)
    record_every = check_int("record_every", record_every, minimum=1)
    if not callable(lr):
        check_float("lr", lr, low=0.0, low_open=True)
    eng = ReferenceEngine(spec, objective, x0, seed=seed)
    rec_steps, nodes, avg, cen, cons, rnds, leaders, traj = [], [], [], [], [], [], [], []

    def record() -> None:
        rec_steps.append(eng.step_count)
        nodes.append(np.asarray(objective.value(eng.state), dtype=np.float64))
        avg.append(float(objective.value(eng.average())))
        cen.append(float(objective.value(eng.center())))
        cons.append(consensus_distance(eng.state, spec.workers))
        rnds.append(eng.rounds)
        leaders.append(eng.leader)
        if keep_trajectory:
            traj.append(eng.state.copy())

    record()
    iterator: Any = eng.steps(steps, lr)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=steps, desc=spec.name, unit="step", leave=False)
    for stats in iterator:
        if (stats.step + 1) % record_every == 0 or stats.step + 1 == steps:
            record()
    return ReferenceResult(
        spec=spec,
        steps=np.asarray(rec_steps),
        node_objectives=np.vstack(nodes),
        average_objective=np.asarray(avg),
        center_objective=np.asarray(cen),
        consensus=np.asarray(cons),
        rounds=np.asarray(rnds),
        leaders=leaders,
        final_state=eng.state.copy(),
        trajectory=np.stack(traj) if keep_trajectory else None,
    )
