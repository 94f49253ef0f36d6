"""Named algorithms as thin constructors of :class:`AlgorithmSpec` ([CSGD] Table 2, §6; [LSGD]).

Every preset validates its arguments and raises :class:`coopsgd.errors.ConfigError` naming the argument.
Use :func:`make_preset` to build one by name (as the CLI and config files do).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from coopsgd.algorithms.schedules import (
    DownpourSchedule,
    FedAvgSchedule,
    LeaderSchedule,
    PeriodicSchedule,
)
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.errors import ConfigError, check_float, check_int
from coopsgd.theory.bounds import (
    check_easgd_alpha,
    easgd_best_alpha,
    easgd_mixing,
    generalized_elastic_best_alpha,
    generalized_elastic_mixing,
)
from coopsgd.theory.spectral import zeta as spectral_zeta
from coopsgd.topology import MixingMatrix, mixing_schedule

__all__ = [
    "sync",
    "local_sgd",
    "easgd",
    "dpsgd",
    "decentralized_periodic",
    "generalized_elastic",
    "hierarchical",
    "fedavg",
    "lsgd",
    "downpour",
    "PRESETS",
    "make_preset",
]

MixingArg = MixingMatrix | np.ndarray | Sequence[MixingMatrix] | None


def _workers(workers: int) -> int:
    return check_int("workers", workers, minimum=1)


def _average(n: int) -> np.ndarray:
    return np.full((n, n), 1.0 / n)


def _mixing_list(
    workers: int, mixing: MixingArg, topology: str, weights: str, seed: int
) -> list[np.ndarray]:
    """The matrices of a (possibly time-varying) worker topology, validated as m x m."""
    if mixing is None:
        mats = [W.matrix for W in mixing_schedule(topology, workers, weights, seed=seed)]
    elif isinstance(mixing, (MixingMatrix, np.ndarray)):
        mats = [np.asarray(getattr(mixing, "matrix", mixing), dtype=np.float64)]
    else:
        mats = [np.asarray(getattr(W, "matrix", W), dtype=np.float64) for W in mixing]
    for M in mats:
        if M.shape != (workers, workers):
            raise ConfigError.invalid("mixing", f"matrix of shape {M.shape}", f"must be {workers}x{workers} (workers)")
    return mats


def _theory_for(mats: list[np.ndarray]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    if len(mats) > 1:
        return None, ("time-varying mixing: Theorems 1-4 assume one fixed W",)
    W = mats[0]
    M = MixingMatrix(W, check="none", allow_negative=True)
    if M.theory_applies:
        return W, ()
    return W, tuple(f"theorems do not apply: {issue}" for issue in M.theory_issues())


def sync(workers: int, *, policies: Policies | None = None) -> AlgorithmSpec:
    """Fully synchronous SGD: A(1, J, 0), equal to SGD with an m-times larger batch."""
    m = _workers(workers)
    J = _average(m)
    return AlgorithmSpec(
        name="sync", workers=m, auxiliaries=0, tau=1, schedule=PeriodicSchedule(1, [J]),
        theory_matrix=J, pattern="allreduce", policies=policies or Policies(),
    )


def local_sgd(workers: int, tau: int = 4, *, warmup_steps: int = 0, policies: Policies | None = None) -> AlgorithmSpec:
    """Local SGD / periodic simple averaging (PSASGD): A(tau, J, 0) ([CSGD] Corollary 2).

    ``warmup_steps`` fully synchronous steps first (post-local SGD).
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    J = _average(m)
    sched = PeriodicSchedule(tau, [J], warmup_steps=warmup_steps, warmup_matrix=J)
    return AlgorithmSpec(
        name="local_sgd", workers=m, auxiliaries=0, tau=tau, schedule=sched, theory_matrix=J,
        pattern="allreduce", policies=policies or Policies(),
        params={"warmup_steps": int(warmup_steps)},
    )


def easgd(
    workers: int,
    tau: int = 1,
    *,
    alpha: float | None = None,
    beta: float | None = None,
    nonblocking: bool = False,
    strict: bool = False,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Elastic averaging SGD: A(tau, W_alpha, 1) with the pre-mix rule ([CSGD] eq. (11), Lemma 1).

    ``alpha`` defaults to the best value 2/(m+2); the original paper's ``beta = m * alpha`` may be given
    instead. alpha >= 2/(m+1) diverges: a :class:`DivergenceWarning`, or an error when ``strict``.
    ``nonblocking=True`` overlaps the auxiliary's update with the next tau local steps: the iterates are
    identical to blocking EASGD, only the (simulated or real) time changes ([CSGD] §3.3).
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    if alpha is not None and beta is not None:
        raise ConfigError.invalid("beta", beta, "give alpha or beta (= workers * alpha), not both")
    if beta is not None:
        alpha = check_float("beta", beta, low=0.0, low_open=True) / m
    a = easgd_best_alpha(m) if alpha is None else check_easgd_alpha(alpha, m, strict=strict)
    W = easgd_mixing(a, m)
    return AlgorithmSpec(
        name="easgd", workers=m, auxiliaries=1, tau=tau, schedule=PeriodicSchedule(tau, [W], pattern="allreduce"),
        rule="pre_mix", center="auxiliary", theory_matrix=W, theory_v=1, pattern="allreduce",
        overlap=bool(nonblocking), policies=policies or Policies(),
        params={"alpha": a, "beta": a * m, "nonblocking": bool(nonblocking)},
    )


def dpsgd(
    workers: int,
    *,
    topology: str = "ring",
    weights: str = "metropolis",
    mixing: MixingArg = None,
    seed: int = 0,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Decentralized (gossip) SGD: A(1, W, 0) over a sparse topology ([CSGD] Corollary 3)."""
    spec = decentralized_periodic(workers, 1, topology=topology, weights=weights, mixing=mixing, seed=seed, policies=policies)
    return _renamed(spec, "dpsgd")


def decentralized_periodic(
    workers: int,
    tau: int = 4,
    *,
    topology: str = "ring",
    weights: str = "metropolis",
    mixing: MixingArg = None,
    seed: int = 0,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Decentralized periodic averaging: A(tau, W, 0) with a sparse W ([CSGD] §6.1)."""
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    mats = _mixing_list(m, mixing, topology, weights, seed)
    theory, notes = _theory_for(mats)
    # exact averaging is one all-reduce, whatever graph produced it (e.g. the complete graph)
    pattern = "allreduce" if all(np.allclose(M, 1.0 / m, rtol=0, atol=1e-15) for M in mats) else "neighbor"
    return AlgorithmSpec(
        name="decentralized_periodic", workers=m, auxiliaries=0, tau=tau,
        schedule=PeriodicSchedule(tau, mats, pattern=pattern),
        theory_matrix=theory if not notes else None, pattern=pattern, policies=policies or Policies(),
        params={"topology": topology if mixing is None else "custom", "weights": weights},
        notes=notes,
    )


def _renamed(spec: AlgorithmSpec, name: str) -> AlgorithmSpec:
    import dataclasses

    return dataclasses.replace(spec, name=name)


def generalized_elastic(
    workers: int,
    tau: int = 1,
    *,
    alpha: float | str = "best",
    topology: str = "ring",
    weights: str = "metropolis",
    mixing: MixingMatrix | np.ndarray | None = None,
    seed: int = 0,
    strict: bool = False,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Generalized elastic averaging: A(tau, W', 1), W' = [[(1-a)W, a1],[a1^T, 1-ma]] ([CSGD] Theorem 4).

    ``alpha="best"`` uses a* = (1+zeta)/(m+1+zeta), giving zeta' = m zeta/(m+1+zeta) < zeta.
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    mats = _mixing_list(m, mixing, topology, weights, seed)
    if len(mats) != 1:
        raise ConfigError.invalid("topology", topology, "generalized_elastic needs one fixed W (not time-varying)")
    W = mats[0]
    z = spectral_zeta(W)
    if isinstance(alpha, str):
        if alpha != "best":
            raise ConfigError.invalid("alpha", alpha, "a number in (0, 2/(workers+1)) or 'best'")
        a = generalized_elastic_best_alpha(z, m)
    else:
        a = check_easgd_alpha(alpha, m, strict=strict)
    Wp = generalized_elastic_mixing(W, a)
    return AlgorithmSpec(
        name="generalized_elastic", workers=m, auxiliaries=1, tau=tau,
        schedule=PeriodicSchedule(tau, [Wp], pattern="neighbor"), rule="pre_mix", center="average",
        theory_matrix=Wp, theory_v=1, pattern="neighbor", overlap=True, policies=policies or Policies(),
        params={"alpha": a, "zeta_W": z, "topology": topology if mixing is None else "custom", "weights": weights},
    )


def hierarchical(
    workers: int,
    tau: int = 2,
    *,
    groups: int = 2,
    q: int = 2,
    alpha: float | None = None,
    aux_topology: str = "complete",
    aux_weights: str = "metropolis",
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Elastic hierarchical averaging ([CSGD] §6.3).

    Workers are split into ``groups`` equal groups, each with an auxiliary z_g. Every ``tau`` steps the
    workers of group g mix elastically with z_g (W_alpha of the group, alpha defaults to 2/(s+2) for group
    size s); every ``q * tau`` steps the auxiliaries also mix with each other by the ``aux_topology``
    matrix. Node layout: m workers, then the group auxiliaries. The inter-auxiliary exchange overlaps the
    workers' local steps (``overlap=True``).
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    g = check_int("groups", groups, minimum=1)
    q = check_int("q", q, minimum=1)
    if m % g:
        raise ConfigError.invalid("groups", groups, f"must divide workers={m} (equal group sizes)")
    s = m // g
    a = easgd_best_alpha(s) if alpha is None else check_easgd_alpha(alpha, s)
    n = m + g
    intra = np.zeros((n, n))
    Wg = easgd_mixing(a, s)
    for gi in range(g):
        idx = list(range(gi * s, (gi + 1) * s)) + [m + gi]
        intra[np.ix_(idx, idx)] = Wg
    if g == 1:
        aux_W = np.ones((1, 1))
    else:
        aux_W = mixing_schedule(aux_topology, g, aux_weights)[0].matrix
    inter = np.eye(n)
    inter[m:, m:] = aux_W
    sched = PeriodicSchedule(tau, [intra], pattern="allreduce", levels=[(q * tau, [inter], "neighbor")])
    return AlgorithmSpec(
        name="hierarchical", workers=m, auxiliaries=g, tau=tau, schedule=sched, rule="pre_mix",
        center="average", theory_matrix=None, theory_v=g, pattern="allreduce", overlap=True,
        policies=policies or Policies(),
        params={"groups": g, "q": q, "alpha": a, "aux_topology": aux_topology},
        notes=("two-level schedule: Theorem 1 needs one W per round; the bounds are not computed",),
    )


def fedavg(
    workers: int,
    tau: int = 5,
    *,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Federated averaging: rounds of tau local steps on a sampled fraction c of clients ([CSGD] §5).

    The server model is auxiliary node 0 and the model to evaluate. With IID data it behaves like
    local SGD with c*m workers ([CSGD] Corollary 2 with m -> cm).
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    c = check_float("fraction", fraction, low=0.0, high=1.0, low_open=True)
    sched = FedAvgSchedule(m, tau, fraction=c, sample_counts=sample_counts, seed=seed)
    return AlgorithmSpec(
        name="fedavg", workers=m, auxiliaries=1, tau=tau, schedule=sched, rule="post_mix", center="auxiliary",
        theory_matrix=None, theory_v=0, pattern="parameter_server", policies=policies or Policies(),
        params={"fraction": c, "clients_per_round": sched.clients_per_round, "seed": int(seed)},
        notes=(f"theory: with IID data use Corollary 2 (local SGD) with {sched.clients_per_round} workers",),
    )


def lsgd(
    workers: int,
    tau: int = 1,
    *,
    lam: float = 0.1,
    groups: int = 1,
    lam_global: float | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Leader SGD ([LSGD]): workers are pulled toward the best worker, re-elected every tau steps.

    ``groups > 1`` gives the multi-level form with a local leader per group (pull ``lam``) and a global
    leader (pull ``lam_global``, default ``lam``). The leader is elected from per-worker loss estimates.
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    lam = check_float("lam", lam, low=0.0)
    if lam_global is not None:
        lam_global = check_float("lam_global", lam_global, low=0.0)
    g = check_int("groups", groups, minimum=1)
    if m % g:
        raise ConfigError.invalid("groups", groups, f"must divide workers={m} (equal group sizes)")
    sched = LeaderSchedule(m, tau, lam, groups=g, lam_global=lam_global)
    return AlgorithmSpec(
        name="lsgd", workers=m, auxiliaries=sched.v, tau=tau, schedule=sched, rule="pre_mix", center="leader",
        theory_matrix=None, pattern="broadcast", leader=True, policies=policies or Policies(),
        params={"lam": lam, "lam_global": sched.lam_global, "groups": g},
        notes=("LSGD's pull matrix depends on the losses and is not symmetric: Theorems 1-4 do not apply",),
    )


def downpour(workers: int, tau: int = 1, *, seed: int = 0, policies: Policies | None = None) -> AlgorithmSpec:
    """DOWNPOUR: asynchronous parameter server with stale pushes (the [LSGD] baseline).

    See :class:`coopsgd.algorithms.schedules.DownpourSchedule` for how asynchrony is written as linear maps.
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    sched = DownpourSchedule(m, tau, seed=seed)
    return AlgorithmSpec(
        name="downpour", workers=m, auxiliaries=m + 1, tau=tau, schedule=sched, rule="post_mix",
        center="auxiliary", theory_matrix=None, pattern="parameter_server", policies=policies or Policies(),
        params={"seed": int(seed)},
        notes=("asynchronous updates: Theorems 1-4 do not apply",),
    )


PRESETS: dict[str, Callable[..., AlgorithmSpec]] = {
    "sync": sync,
    "local_sgd": local_sgd,
    "easgd": easgd,
    "dpsgd": dpsgd,
    "decentralized_periodic": decentralized_periodic,
    "generalized_elastic": generalized_elastic,
    "hierarchical": hierarchical,
    "fedavg": fedavg,
    "lsgd": lsgd,
    "downpour": downpour,
}


def make_preset(name: str, workers: int, **kwargs: Any) -> AlgorithmSpec:
    """Build a preset by name. Unknown names or arguments raise a ConfigError listing what is allowed.

    Arguments set to ``None`` are dropped so callers (the CLI) can pass every flag through.
    """
    if name not in PRESETS:
        raise ConfigError.invalid("preset", name, f"choose one of {', '.join(PRESETS)}")
    fn = PRESETS[name]
    accepted = [p for p in inspect.signature(fn).parameters if p != "workers"]
    given = {k: v for k, v in kwargs.items() if v is not None}
    for key in given:
        if key not in accepted:
            raise ConfigError.invalid(key, given[key], f"not an argument of preset {name!r}; it takes {', '.join(accepted)}")
    return fn(workers, **given)
