"""AlgorithmSpec: an algorithm of the Cooperative SGD family as data ([CSGD] §3, A(tau, W, v)).

An algorithm is ``m`` workers, ``v`` auxiliary nodes, a mixing schedule (which ``S_k`` follows step ``k``)
and an update rule:

* ``post_mix`` ("average after the step", [CSGD] eq. (10)): ``X_{k+1} = (X_k - lr G_k) S_k``;
* ``pre_mix`` ("step after mixing", [CSGD] Remark 1): ``X_{k+1} = X_k S_k - lr G_k``; EASGD's original
  form and LSGD's pull need it.

Engines execute any spec; presets (:mod:`coopsgd.algorithms.presets`) are thin constructors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from coopsgd.algorithms.asynchronous import AsyncAggregation
from coopsgd.algorithms.communication import Compression, check_compressible
from coopsgd.algorithms.outer import OuterOptimizer
from coopsgd.algorithms.robust import RobustAggregation
from coopsgd.algorithms.schedules import Schedule
from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["AlgorithmSpec", "Policies", "UPDATE_RULES", "CENTERS"]

UPDATE_RULES = ("post_mix", "pre_mix")
#: Which model is evaluated/exported: the workers' average, auxiliary node 0 (z / server), or the leader.
CENTERS = ("average", "auxiliary", "leader")
_BUFFER_POLICIES = ("mix", "local")
_OPTIMIZER_POLICIES = ("local", "reset", "mix")


@dataclass(frozen=True)
class Policies:
    """What happens to non-parameter state at a communication round (simulator/distributed engines).

    Attributes:
        buffers: ``"mix"`` (default) -- buffers such as BatchNorm running statistics are mixed with the same
            S_k as parameters; ``"local"`` -- each worker keeps its own.
        optimizer_state: what happens to every field of the workers' inner optimizer state (SGD's momentum
            buffer, Adam's ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``): ``"local"`` (default) -- left
            alone; ``"reset"`` -- after each communicating round every field is zeroed and the step counts
            restart at 0 (a fresh optimizer, as if it were created anew); ``"mix"`` -- the fields are mixed like
            parameters (auxiliaries count as zero state) while each worker's step count stays its own (a
            count of the updates that went into the bias correction, not a row quantity).
    """

    buffers: Literal["mix", "local"] = "mix"
    optimizer_state: Literal["local", "reset", "mix"] = "local"

    def __post_init__(self) -> None:
        if self.buffers not in _BUFFER_POLICIES:
            raise ConfigError.invalid("buffers", self.buffers, f"choose one of {', '.join(_BUFFER_POLICIES)}")
        if self.optimizer_state not in _OPTIMIZER_POLICIES:
            raise ConfigError.invalid(
                "optimizer_state", self.optimizer_state, f"choose one of {', '.join(_OPTIMIZER_POLICIES)}"
            )


@dataclass(frozen=True, eq=False)
class AlgorithmSpec:
    """A member of the Cooperative SGD family A(tau, W, v).

    Attributes:
        name: preset name (``"custom"`` for hand-made specs).
        workers: number of workers m (they compute gradients).
        auxiliaries: number of auxiliary nodes v (hold z, a server model, leader copies; no gradients).
        tau: communication period (local steps between rounds).
        schedule: the mixing schedule (:class:`coopsgd.algorithms.schedules.Schedule`).
        rule: ``"post_mix"`` or ``"pre_mix"`` (see module docstring).
        center: which model to evaluate: ``"average"`` of the workers, ``"auxiliary"`` node 0, or ``"leader"``.
        theory_matrix: the constant W the theorems use (``None`` when they do not apply), with ``theory_v``
            the v to use in the bounds.
        pattern: communication pattern of a round for the cost model.
        overlap: non-blocking execution -- the round's communication overlaps the next tau local steps
            (changes time only, never the iterates).
        policies: buffer / optimizer-state policies.
        params: the preset's own arguments, for records and reports.
        notes: remarks shown to users (e.g. why the theorems do not apply).
        outer: the auxiliary node's own optimizer (:class:`coopsgd.algorithms.outer.OuterOptimizer`;
            DiLoCo, SlowMo): at the rounds the schedule tags ``info["outer"]`` the workers are averaged, z
            (node m) steps on the pseudo-gradient z - average, and the workers restart from z. ``None``: none.
        inner_optimizer: the workers' optimizer the algorithm prescribes (``"adamw"`` for DiLoCo), used when a
            run does not name one; ``None``: SGD.
        compression: what a round sends (:class:`~coopsgd.algorithms.communication.Compression`: the
            compressor, error feedback, CHOCO's consensus step; SPEC §11), read by every engine; ``None``: rows
            are sent as they are. Checked against the schedule's rounds
            (:func:`~coopsgd.algorithms.communication.check_compressible`).
        prox: FedProx's proximal coefficient mu (Li et al., MLSys 2020, eq. (2)): every worker's local step
            uses ``g + mu (x_i - z)`` in place of its gradient g, z being auxiliary node m (the server model).
            Only specs whose node m holds the model every worker received at its last round take it
            (FedAvg's family: every round sends the server model to every client, and z does not move
            between rounds); the presets that accept ``mu`` guarantee that. 0: no proximal term.
        control: SCAFFOLD's control variates (Karimireddy et al., ICML 2020, Algorithm 1, option II): every node
            keeps one more d-vector (worker i its c_i, z the server's c); a local step uses ``g - c_i + c``; at
            a round each sampled client sets ``c_i <- c_i - c + (z - y_i) / (tau lr)`` (y_i its model before the
            round, lr the learning rate of the step ending it) and the server ``c <- c + (1/m) sum_S (c_i^+ -
            c_i)``, sent with the models (twice FedAvg's bytes). FedAvg's family only, like ``prox``.
        robust: the aggregation rule of FedAvg's rounds and the simulated Byzantine clients
            (:class:`~coopsgd.algorithms.robust.RobustAggregation`: coordinate-wise median, trimmed mean, Krum,
            multi-Krum; sign-flip, Gaussian or scaled models sent by a seeded set of clients). ``None``: the
            weighted mean, every client honest. FedAvg's family only; not with compression or control variates.
        asynchronous: an asynchronous server (:class:`~coopsgd.algorithms.asynchronous.AsyncAggregation`: FedBuff,
            asynchronous local SGD): the schedule (``asynchronous = True``) gives the workers of each step and the
            arrivals, which the engines apply to z (node m) one by one. ``None``: rounds are the schedule's mixes.
    """

    name: str
    workers: int
    auxiliaries: int
    tau: int
    schedule: Schedule
    rule: Literal["post_mix", "pre_mix"] = "post_mix"
    center: Literal["average", "auxiliary", "leader"] = "average"
    theory_matrix: np.ndarray | None = None
    theory_v: int = 0
    pattern: str = "allreduce"
    overlap: bool = False
    policies: Policies = field(default_factory=Policies)
    params: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    outer: OuterOptimizer | None = None
    inner_optimizer: str | None = None
    compression: Compression | None = None
    prox: float = 0.0
    control: bool = False
    robust: RobustAggregation | None = None
    asynchronous: AsyncAggregation | None = None

    def __post_init__(self) -> None:
        check_int("workers", self.workers, minimum=1)
        check_int("auxiliaries", self.auxiliaries, minimum=0)
        check_int("tau", self.tau, minimum=1)
        if self.rule not in UPDATE_RULES:
            raise ConfigError.invalid("rule", self.rule, f"choose one of {', '.join(UPDATE_RULES)}")
        if self.center not in CENTERS:
            raise ConfigError.invalid("center", self.center, f"choose one of {', '.join(CENTERS)}")
        if self.center == "auxiliary" and self.auxiliaries < 1:
            raise ConfigError.invalid("center", self.center, "needs at least one auxiliary node")
        n = getattr(self.schedule, "n", None)
        if n != self.nodes:
            raise ConfigError.invalid(
                "schedule", f"{n} nodes", f"must act on workers + auxiliaries = {self.nodes} nodes"
            )
        if self.outer is not None:
            if not isinstance(self.outer, OuterOptimizer):
                raise ConfigError.invalid("outer", self.outer, "must be an OuterOptimizer or None")
            if self.auxiliaries < 1 or self.rule != "post_mix":
                raise ConfigError.invalid("outer", self.outer.kind, "an outer optimizer needs an auxiliary node "
                                          "(node m holds z) and the post_mix rule")
        object.__setattr__(self, "prox", check_float("mu", self.prox, low=0.0))
        if self.prox > 0.0 and (self.auxiliaries < 1 or self.center != "auxiliary" or self.rule != "post_mix"):
            raise ConfigError.invalid("mu", self.prox, "a proximal term needs the server model as auxiliary node m "
                                      "(center 'auxiliary', post_mix rule): the FedAvg family")
        if not isinstance(self.control, bool):
            raise ConfigError.invalid("control", self.control, "must be True or False")
        if self.control and (self.auxiliaries < 1 or self.center != "auxiliary" or self.rule != "post_mix"):
            raise ConfigError.invalid("control", self.control, "control variates need the server model as auxiliary "
                                      "node m (center 'auxiliary', post_mix rule): the FedAvg family")
        if self.control and self.compression is not None and self.compression.active:
            raise ConfigError.invalid("compression", self.compression.compress, "SCAFFOLD's rounds are not "
                                      "compressed (its control variates are sent as they are); use compress 'none'")
        if self.robust is not None:
            if not isinstance(self.robust, RobustAggregation):
                raise ConfigError.invalid("robust", self.robust, "must be a RobustAggregation or None")
            if self.auxiliaries < 1 or self.center != "auxiliary" or self.rule != "post_mix":
                raise ConfigError.invalid("aggregation", self.robust.rule, "a robust rule aggregates FedAvg's "
                                          "rounds (the server model as auxiliary node m): the FedAvg family")
            if self.control:
                raise ConfigError.invalid("aggregation", self.robust.rule, "SCAFFOLD's control variates are "
                                          "averaged with the models: use aggregation 'mean' without attackers")
            if self.compression is not None and self.compression.active:
                raise ConfigError.invalid("compression", self.compression.compress, "a robust rule or simulated "
                                          "attackers need the clients' models as they are; use compress 'none'")
        if self.asynchronous is not None:
            self._check_asynchronous()
        if self.inner_optimizer is not None and self.inner_optimizer not in ("sgd", "adam", "adamw"):
            raise ConfigError.invalid("inner_optimizer", self.inner_optimizer, "choose one of sgd, adam, adamw")
        if self.compression is not None:
            if not isinstance(self.compression, Compression):
                raise ConfigError.invalid("compression", self.compression, "must be a Compression or None")
            check_compressible(self.name, self.schedule, self.workers, self.rule, self.compression)

    def _check_asynchronous(self) -> None:
        a = self.asynchronous
        if not isinstance(a, AsyncAggregation):
            raise ConfigError.invalid("asynchronous", a, "must be an AsyncAggregation or None")
        if not getattr(self.schedule, "asynchronous", False):
            raise ConfigError.invalid("schedule", type(self.schedule).__name__, "an asynchronous server needs a "
                                      "schedule that declares asynchronous arrivals (AsyncSchedule)")
        if self.auxiliaries != 1 or self.center != "auxiliary" or self.rule != "post_mix":
            raise ConfigError.invalid("asynchronous", a.describe(), "needs the server model as the one auxiliary "
                                      "node m (center 'auxiliary', post_mix rule)")
        if self.outer is not None or self.prox > 0.0 or self.control or self.robust is not None or (
                self.compression is not None and self.compression.active):
            raise ConfigError.invalid("asynchronous", a.describe(), "takes no outer optimizer, proximal term, "
                                      "control variates, robust rule or compression")
        if self.policies.optimizer_state == "mix":
            raise ConfigError.invalid("optimizer_state", "mix", "an asynchronous server mixes nothing: use 'local' "
                                      "(each worker keeps its optimizer state) or 'reset' (restarted at each pull)")

    @property
    def compressed(self) -> Compression | None:
        """The spec's compression when it changes any round (:attr:`Compression.active`), else ``None``: engines
        take their uncompressed path exactly when this is ``None``."""
        c = self.compression
        return c if c is not None and c.active else None

    @property
    def needs_losses(self) -> bool:
        """True when the schedule reads per-worker loss estimates (LSGD's election); engines provide them."""
        return bool(getattr(self.schedule, "needs_losses", False))

    def center_node(self, leader: int | None = None, estimates: np.ndarray | None = None) -> int | None:
        """The one rule, for every engine, of which model is "the" model: a node index, or ``None`` for the
        workers' average.

        ``"auxiliary"``: node m (EASGD's z, FedAvg's server, DOWNPOUR's server). ``"leader"``: the current
        global leader; before the first election, the worker with the lowest finite loss estimate in
        ``estimates`` (ties and no estimates: worker 0). ``"average"``: ``None``.
        """
        if self.center == "auxiliary":
            return self.workers
        if self.center == "leader":
            if leader is not None:
                return int(leader)
            if estimates is not None:
                e = np.asarray(estimates, dtype=np.float64).reshape(-1)[: self.workers]
                ok = np.isfinite(e)
                if ok.any():
                    return int(np.flatnonzero(ok)[np.argmin(e[ok])])
            return 0
        return None

    @property
    def nodes(self) -> int:
        """Total number of nodes m + v (columns of X)."""
        return self.workers + self.auxiliaries

    def initial_state(self, x0: np.ndarray) -> np.ndarray:
        """Stack ``x0`` (shape (d,), or (m, d) per-worker starts) into the (m+v) x d state.

        Auxiliaries start at the workers' mean ([CSGD] Theorem 1 assumes one common start u_1).
        """
        x0 = np.asarray(x0)
        if x0.ndim == 1:
            return np.tile(x0, (self.nodes, 1))
        if x0.ndim == 2 and x0.shape[0] == self.workers:
            aux = np.tile(x0.mean(axis=0), (self.auxiliaries, 1))
            return np.concatenate([x0, aux], axis=0)
        raise ConfigError.invalid("x0", f"array of shape {x0.shape}", f"must be (d,) or ({self.workers}, d)")

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (name, m, v, tau, rule, pattern, parameters, zeta when the theory applies)."""
        from coopsgd.theory.spectral import zeta

        out: dict[str, Any] = {
            "name": self.name,
            "workers": self.workers,
            "auxiliaries": self.auxiliaries,
            "tau": self.tau,
            "rule": self.rule,
            "center": self.center,
            "pattern": self.pattern,
            "overlap": self.overlap,
            "params": dict(self.params),
            "policies": {"buffers": self.policies.buffers, "optimizer_state": self.policies.optimizer_state},
        }
        out["zeta"] = None if self.theory_matrix is None else zeta(self.theory_matrix)
        if self.outer is not None:
            out["outer"] = self.outer.describe()
        if self.inner_optimizer is not None:
            out["inner_optimizer"] = self.inner_optimizer
        if self.prox > 0.0:
            out["mu"] = self.prox
        if self.control:
            out["control_variates"] = True
        if self.robust is not None:
            out["robust"] = self.robust.describe()
        if self.asynchronous is not None:
            out["asynchronous"] = self.asynchronous.describe()
        if self.compressed is not None:
            out["compression"] = self.compressed.describe()
        if self.notes:
            out["notes"] = list(self.notes)
        return out
