"""Named algorithms as thin constructors of :class:`AlgorithmSpec` ([CSGD] Table 2, §6; [LSGD]; [MATCHA]).

Every preset validates its arguments and raises :class:`coopsgd.errors.ConfigError` naming the argument.
Use :func:`make_preset` to build one by name (as the CLI and config files do).

Each preset is declared once (:class:`coopsgd.algorithms.registry.PresetDecl`, at the end of this module):
its settings with types, defaults, help and ranges, the inputs it takes from the data, and its theory
hooks. Config keys, CLI flags, :func:`coopsgd.algorithms.registry.spec_from_settings` and
``coopsgd theory`` derive from these declarations; see ``docs/presets.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from coopsgd.algorithms.async_presets import ASYNC_DECLS
from coopsgd.algorithms.communication import Compression, CompressionArg, as_compression
from coopsgd.algorithms.federated_presets import (
    FEDERATED_DECLS,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fednova,
    fedprox,
    fedyogi,
    scaffold,
)
from coopsgd.algorithms.hooks import (
    COROLLARY2,
    COROLLARY3,
    DILOCO_NO_BOUND,
    DPSGD_VS_PSASGD,
    EASGD_ALPHA,
    EASGD_ALPHA_PER_GROUP,
    GENERALIZED_ELASTIC_ALPHA,
    MATCHA_EXPECTED_ZETA,
    OUTER_FACTS,
    SLOWMO_RATE,
    THEOREM3,
    ZETA_TAU,
)
from coopsgd.algorithms.outer import OuterOptimizer, OuterSchedule
from coopsgd.algorithms.preset_base import (
    _ALPHA,
    _GROUPS,
    _OUTER_LR,
    _OUTER_MOMENTUM,
    _SEED,
    _STRICT,
    _TAU,
    _TOPOLOGY,
    _WEIGHTS,
    MixingArg,
    _average,
    _mixing_list,
    _renamed,
    _theory_for,
    _workers,
    compressible,
    with_compression,
)
from coopsgd.algorithms.registry import PresetArg, PresetDecl, register
from coopsgd.algorithms.schedules import (
    STEP_COUNTINGS,
    DownpourSchedule,
    LeaderSchedule,
    MatchaSchedule,
    PeriodicSchedule,
)
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.algorithms.streaming_presets import STREAMING_DECLS, streaming_diloco
from coopsgd.errors import ConfigError, check_float, check_int
from coopsgd.theory.bounds import (
    check_easgd_alpha,
    easgd_best_alpha,
    easgd_mixing,
    generalized_elastic_best_alpha,
    generalized_elastic_mixing,
)
from coopsgd.theory.spectral import zeta as spectral_zeta
from coopsgd.topology import TOPOLOGIES, WEIGHT_RULES, MixingMatrix, mixing_schedule

__all__ = [
    "sync",
    "local_sgd",
    "easgd",
    "dpsgd",
    "decentralized_periodic",
    "generalized_elastic",
    "hierarchical",
    "fedavg",
    "fedprox",
    "scaffold",
    "fednova",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "lsgd",
    "downpour",
    "matcha",
    "diloco",
    "slowmo",
    "streaming_diloco",
    "choco",
    "PRESETS",
    "make_preset",
    "compressible",
    "with_compression",
]


@compressible
def sync(workers: int, *, policies: Policies | None = None) -> AlgorithmSpec:
    """Fully synchronous SGD: A(1, J, 0), equal to SGD with an m-times larger batch."""
    m = _workers(workers)
    J = _average(m)
    return AlgorithmSpec(
        name="sync", workers=m, auxiliaries=0, tau=1, schedule=PeriodicSchedule(1, [J]),
        theory_matrix=J, pattern="allreduce", policies=policies or Policies(),
    )


@compressible
def local_sgd(
    workers: int,
    tau: int = 4,
    *,
    warmup_steps: int = 0,
    step_counting: str = "paper",
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Local SGD / periodic simple averaging (PSASGD): A(tau, J, 0) ([CSGD] Corollary 2).

    ``warmup_steps`` fully synchronous steps first (post-local SGD). ``step_counting`` says when the
    averaging rounds fall after the warm-up (``j = k - warmup_steps``, 0-based): ``"paper"`` after local
    steps ``tau-1, 2tau-1, ...`` (every tau local steps, [CSGD] eq. (7)); ``"pytorch"`` after local steps
    ``0, tau, 2tau, ...``, the iterates of PyTorch's ``PostLocalSGDOptimizer`` with
    ``PeriodicModelAverager(period=tau, warmup_steps=warmup_steps)`` (see ``docs/migrating.md``).
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    if step_counting not in STEP_COUNTINGS:
        raise ConfigError.invalid("step_counting", step_counting, f"choose one of {', '.join(STEP_COUNTINGS)}")
    J = _average(m)
    sched = PeriodicSchedule(tau, [J], warmup_steps=warmup_steps, warmup_matrix=J, step_counting=step_counting)
    return AlgorithmSpec(
        name="local_sgd", workers=m, auxiliaries=0, tau=tau, schedule=sched, theory_matrix=J,
        pattern="allreduce", policies=policies or Policies(),
        params={"warmup_steps": int(warmup_steps), "step_counting": step_counting},
    )


@compressible
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

    ``compression``: the centre replies Q(z − ẑ) to its public copy ẑ, each worker sends Q(x_i − ẑ + e_i)
    (docs/compression.md, "Elastic rounds").
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


@compressible
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


@compressible
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



def choco(
    workers: int,
    *,
    topology: str = "ring",
    weights: str = "metropolis",
    mixing: MixingArg = None,
    seed: int = 0,
    compression: CompressionArg = None,
    gamma: float | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """CHOCO-SGD (Koloskova, Stich, Jaggi, ICML 2019, Algorithm 2): D-PSGD's schedule (a gossip round after
    every local step, A(1, W, 0)) with CHOCO gossip: public copies x̂ (zero at the start), q_i = Q(x_i − x̂_i)
    after the local step, x̂_j ← x̂_j + q_j, then x_i ← x_i + γ Σ_j w_ij (x̂_j − x̂_i).

    ``compression``: the compressor Q (a spec string such as ``"topk:0.01"`` or a :class:`Compression`;
    ``None``: ``none``). ``gamma``: the consensus step γ in (0, 1] (default: see
    :meth:`Compression.gamma`). With Q = ``none`` the public copies equal the models after every round, and
    γ = 1 is D-PSGD itself (bit for bit: the engines run D-PSGD's own round).
    """
    spec = decentralized_periodic(workers, 1, topology=topology, weights=weights, mixing=mixing, seed=seed,
                                  policies=policies)
    c = as_compression(compression) or Compression()
    if gamma is not None:
        gamma = check_float("gamma", gamma, low=0.0, high=1.0, low_open=True)
        if c.consensus_step is not None and c.consensus_step != gamma:
            raise ConfigError.invalid("gamma", gamma, f"the compression's consensus_step is {c.consensus_step}: "
                                      "give one of them")
        c = dataclasses.replace(c, consensus_step=gamma)
    return dataclasses.replace(spec, name="choco", compression=c,
                               params={**spec.params, "gamma": "auto" if c.consensus_step is None else c.consensus_step})


@compressible
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

    ``compression``: an elastic round (docs/compression.md, "Elastic rounds"): a worker's payload
    Q(x_i − ẑ + e_i) goes to its neighbours and the centre, the centre replies Q(z − ẑ).
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


@compressible
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

    ``compression``: the group rounds and the global rounds (the schedule fuses the group and auxiliary
    matrices into one) are elastic rounds against each group centre's public copy (docs/compression.md).
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


@compressible
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

    ``compression``: a refresh has each slot's leader send Q(x_L − s) against the slot s its workers hold,
    s ← s + Q(·), and the pull reads s (docs/compression.md, "LSGD (leader refresh)").
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
        theory_matrix=None, pattern="broadcast", policies=policies or Policies(),
        params={"lam": lam, "lam_global": sched.lam_global, "groups": g},
        notes=("LSGD's pull matrix depends on the losses and is not symmetric: Theorems 1-4 do not apply",),
    )


@compressible
def downpour(workers: int, tau: int = 1, *, seed: int = 0, policies: Policies | None = None) -> AlgorithmSpec:
    """DOWNPOUR: asynchronous parameter server with stale pushes (the [LSGD] baseline).

    See :class:`coopsgd.algorithms.schedules.DownpourSchedule` for how asynchrony is written as linear maps.
    ``compression``: each push sends Q(x_i − b_i + e_i), the server replies Q(z − b_i) (docs/compression.md,
    "DOWNPOUR (pushes)").
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


@compressible
def matcha(
    workers: int,
    tau: int = 1,
    *,
    topology: str = "ring",
    budget: float = 0.5,
    mixing: MixingArg = None,
    seed: int = 0,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """MATCHA: decentralized SGD over randomly activated matchings of a base graph ([MATCHA]).

    The base graph (``topology``, or the support of ``mixing``; the union of the edges when the topology is
    time-varying) is split into matchings by edge colouring; each round activates matching j with
    probability p_j, the p_j maximising the expected graph's algebraic connectivity under the
    communication budget ``mean(p) = budget`` (C_b in (0, 1]); the round mixes with
    ``W = I - alpha sum_{active j} L_j``, alpha minimising ``rho = ||E[W^T W] - J||_2``. See
    :mod:`coopsgd.theory.matcha` for the design and :class:`MatchaSchedule` for the sampling (seeded by
    ``(seed, round)``). ``budget=1`` activates every matching every round: D-PSGD with ``W = I - alpha L``.

    The matrices are random, so Theorems 1-4 (one fixed W) do not apply; ``coopsgd theory`` reports the
    expected zeta ``sqrt(rho)`` instead. No weight rule is taken: the Laplacian form fixes the weights.
    """
    from coopsgd.theory.matcha import design
    from coopsgd.topology.mixing import undirected_adjacency

    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    b = check_float("budget", budget, low=0.0, high=1.0, low_open=True)
    mats = _mixing_list(m, mixing, topology, "metropolis", seed)
    adj = np.zeros((m, m), dtype=bool)
    for M in mats:
        adj |= undirected_adjacency(M)
    d = design(adj, b)
    sched = MatchaSchedule(m, d.laplacians, d.probabilities, d.alpha, tau=tau, seed=seed)
    return AlgorithmSpec(
        name="matcha", workers=m, auxiliaries=0, tau=tau, schedule=sched, theory_matrix=None,
        pattern="neighbor", policies=policies or Policies(),
        params={"topology": topology if mixing is None else "custom", "budget": b, "seed": int(seed),
                "matchings": sched.matchings, "alpha": d.alpha},
        notes=("random mixing matrices: Theorems 1-4 assume one fixed W; expected_zeta = sqrt(||E[W^T W] - J||_2) "
               "takes the place of zeta",),
    )


# ---------------------------------------------------------------------------------------------------------
# an outer optimizer on the auxiliary node (coopsgd.algorithms.outer): DiLoCo and SlowMo
# ---------------------------------------------------------------------------------------------------------

#: SlowMo's base algorithms: local SGD (no communication between outer rounds), fully synchronous SGD
#: (an all-reduce every step) or gossip (D-PSGD over ``topology``, every step).
SLOWMO_BASES = ("local_sgd", "sync", "dpsgd")
#: DiLoCo's outer optimizers: SGD with Nesterov momentum (the paper's), heavy-ball SGD, or Adam.
DILOCO_OUTER = ("nesterov", "sgd", "adam")


@compressible
def diloco(
    workers: int,
    tau: int = 500,
    *,
    outer_lr: float = 0.7,
    outer_momentum: float = 0.9,
    outer_optimizer: str = "nesterov",
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """DiLoCo (Douillard et al., 2023): inner AdamW, and every H = ``tau`` steps an outer step of z.

    The workers run AdamW (the spec's ``inner_optimizer``; a run may name another) for tau steps; then z
    (auxiliary node m, the model to evaluate) takes the averaged pseudo-gradient z - mean(workers) through
    SGD with Nesterov momentum (the paper's outer lr 0.7, momentum 0.9, H = 500), and every worker restarts
    from z. The inner optimizer state stays with each worker across rounds (``optimizer_state="local"``).
    ``outer_optimizer="adam"`` uses torch's Adam defaults (betas (0.9, 0.999), eps 1e-8) and no momentum.
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    if outer_optimizer not in DILOCO_OUTER:
        raise ConfigError.invalid("outer_optimizer", outer_optimizer, f"choose one of {', '.join(DILOCO_OUTER)}")
    lr = check_float("outer_lr", outer_lr, low=0.0, low_open=True)
    mu = check_float("outer_momentum", outer_momentum, low=0.0, high=1.0, high_open=True)
    if outer_optimizer == "adam":
        outer = OuterOptimizer("adam", lr=lr)
    else:
        outer = OuterOptimizer("sgd", lr=lr, momentum=mu, nesterov=outer_optimizer == "nesterov" and mu > 0)
    return AlgorithmSpec(
        name="diloco", workers=m, auxiliaries=1, tau=tau, schedule=OuterSchedule(m, tau), rule="post_mix",
        center="auxiliary", theory_matrix=None, pattern="allreduce", policies=policies or Policies(),
        params={"outer_optimizer": outer_optimizer, "outer_lr": lr,
                "outer_momentum": 0.0 if outer_optimizer == "adam" else mu},
        notes=("an outer optimizer on z: no fixed W describes the round, so [CSGD] Theorems 1-4 do not apply; "
               "with an adaptive inner (AdamW) or outer optimizer no convergence bound is computed",),
        outer=outer, inner_optimizer="adamw",
    )


@compressible
def slowmo(
    workers: int,
    tau: int = 12,
    *,
    base_algorithm: str = "local_sgd",
    outer_lr: float = 1.0,
    outer_momentum: float = 0.5,
    topology: str = "ring",
    weights: str = "metropolis",
    seed: int = 0,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """SlowMo (Wang, Tantia, Ballas, Rabbat, ICLR 2020): a base algorithm plus slow momentum every tau steps.

    The workers run ``base_algorithm`` (:data:`SLOWMO_BASES`) with their inner optimizer; every tau steps
    they are averaged exactly, and z (auxiliary node m) takes SlowMo's step with slow learning rate
    alpha = ``outer_lr`` and slow momentum beta = ``outer_momentum``::

        u <- beta u + (z - mean(workers)) / lr,    z <- z - alpha lr u      (lr: the inner learning rate)

    and every worker restarts from z. beta = 0 and alpha = 1 give the base algorithm with an exact
    average every tau steps (local SGD itself for ``base_algorithm="local_sgd"``).
    """
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    if base_algorithm not in SLOWMO_BASES:
        raise ConfigError.invalid("base_algorithm", base_algorithm, f"choose one of {', '.join(SLOWMO_BASES)}")
    alpha = check_float("outer_lr", outer_lr, low=0.0, low_open=True)
    beta = check_float("outer_momentum", outer_momentum, low=0.0, high=1.0, high_open=True)
    base = None
    params: dict[str, Any] = {"base_algorithm": base_algorithm, "outer_lr": alpha, "outer_momentum": beta}
    notes = ["an outer optimizer on z: no fixed W describes the round, so [CSGD] Theorems 1-4 do not apply"]
    if base_algorithm == "sync":
        base = PeriodicSchedule(1, [_average(m)])
    elif base_algorithm == "dpsgd":
        mats = _mixing_list(m, None, topology, weights, seed)
        pattern = "allreduce" if all(np.allclose(M, 1.0 / m, rtol=0, atol=1e-15) for M in mats) else "neighbor"
        base = PeriodicSchedule(1, mats, pattern=pattern)
        params.update(topology=topology, weights=weights)
        notes.append("the cost model counts one round per tau steps; the gossip rounds in between are not "
                     "in its time estimate")
    return AlgorithmSpec(
        name="slowmo", workers=m, auxiliaries=1, tau=tau, schedule=OuterSchedule(m, tau, base), rule="post_mix",
        center="auxiliary", theory_matrix=None, pattern="allreduce", policies=policies or Policies(),
        params=params, notes=tuple(notes),
        outer=OuterOptimizer("sgd", lr=alpha, momentum=beta, lr_scaled=True),
    )


_DECLS: tuple[PresetDecl, ...] = (
    PresetDecl(
        "sync", sync, "fully synchronous SGD, A(1, J, 0)",
        theory=(ZETA_TAU, COROLLARY2),
    ),
    PresetDecl(
        "local_sgd", local_sgd, "local SGD / periodic simple averaging, A(tau, J, 0)",
        args=(_TAU.replace(default=4),
              PresetArg("warmup_steps", int, 0, help="local_sgd: fully synchronous steps first (post-local SGD)",
                        low=0),
              PresetArg("step_counting", str, "paper", choices=STEP_COUNTINGS,
                        help="local_sgd: when rounds fall after the warm-up: paper = after every tau local steps; "
                             "pytorch = after the 1st local step, then every tau (PyTorch's PeriodicModelAverager)")),
        theory=(ZETA_TAU, COROLLARY2),
    ),
    PresetDecl(
        "easgd", easgd, "elastic averaging SGD, A(tau, W_alpha, 1)",
        args=(_TAU.replace(default=1), _ALPHA.replace(default_text="2/(m+2)"),
              PresetArg("beta", float, None, help="EASGD's beta = m*alpha (alternative to alpha)", low=0.0,
                        low_open=True, default_text="m*alpha"),
              PresetArg("nonblocking", bool, False, help="easgd: non-blocking (overlapped) rounds"),
              _STRICT),
        theory=(EASGD_ALPHA, THEOREM3),
    ),
    PresetDecl(
        "dpsgd", dpsgd, "decentralized (gossip) SGD, A(1, W, 0)",
        args=(_TOPOLOGY, _WEIGHTS, _SEED),
        theory=(ZETA_TAU, DPSGD_VS_PSASGD, COROLLARY3),
    ),
    PresetDecl(
        "decentralized_periodic", decentralized_periodic, "decentralized periodic averaging, A(tau, W, 0)",
        args=(_TAU.replace(default=4), _TOPOLOGY, _WEIGHTS, _SEED),
        theory=(ZETA_TAU, DPSGD_VS_PSASGD),
    ),
    PresetDecl(
        "generalized_elastic", generalized_elastic, "generalized elastic averaging, A(tau, W', 1)",
        args=(_TAU.replace(default=1),
              _ALPHA.replace(default="best", default_text="best = (1+zeta)/(m+1+zeta)"),
              _TOPOLOGY, _WEIGHTS, _SEED, _STRICT),
        theory=(GENERALIZED_ELASTIC_ALPHA,),
    ),
    PresetDecl(
        "hierarchical", hierarchical, "elastic hierarchical averaging (groups with auxiliaries)",
        args=(_TAU.replace(default=2), _GROUPS.replace(default=2),
              PresetArg("q", int, 2, help="hierarchical: auxiliaries mix every q*tau steps", low=1),
              _ALPHA.replace(default_text="2/(s+2), s = group size"),
              PresetArg("aux_topology", str, "complete", help="hierarchical: graph of the group auxiliaries",
                        choices=TOPOLOGIES),
              PresetArg("aux_weights", str, "metropolis", help="hierarchical: weight rule of the auxiliaries' graph",
                        choices=tuple(WEIGHT_RULES))),
        theory=(EASGD_ALPHA_PER_GROUP,),
    ),
    *FEDERATED_DECLS,
    *ASYNC_DECLS,
    PresetDecl(
        "lsgd", lsgd, "Leader SGD: pull toward the best worker",
        args=(_TAU.replace(default=1),
              PresetArg("lam", float, 0.1, help="LSGD pull strength lambda", low=0.0),
              _GROUPS.replace(default=1, help="groups of workers, each with a local leader (multi-level lsgd)"),
              PresetArg("lam_global", float, None, help="LSGD global-leader pull", low=0.0, default_text="lam")),
    ),
    PresetDecl(
        "downpour", downpour, "DOWNPOUR: asynchronous parameter server",
        args=(_TAU.replace(default=1), _SEED),
    ),
    PresetDecl(
        "matcha", matcha, "MATCHA: D-PSGD over randomly activated matchings under a communication budget",
        args=(_TAU.replace(default=1), _TOPOLOGY,
              PresetArg("budget", float, 0.5, help="MATCHA communication budget C_b: expected fraction of "
                        "matchings active per round", low=0.0, high=1.0, low_open=True),
              _SEED),
        theory=(MATCHA_EXPECTED_ZETA,),
    ),
    PresetDecl(
        "diloco", diloco, "DiLoCo: inner AdamW, every tau steps an outer Nesterov-SGD step of z on the "
        "pseudo-gradient",
        args=(_TAU.replace(default=500, help="communication period tau: local steps between rounds (DiLoCo's H)"),
              _OUTER_LR.replace(default=0.7), _OUTER_MOMENTUM.replace(default=0.9),
              PresetArg("outer_optimizer", str, "nesterov", choices=DILOCO_OUTER,
                        help="diloco: z's optimizer on the pseudo-gradient (nesterov = SGD with Nesterov momentum)")),
        theory=(OUTER_FACTS, DILOCO_NO_BOUND),
    ),
    PresetDecl(
        "slowmo", slowmo, "SlowMo: a base algorithm plus slow momentum of z every tau steps",
        args=(_TAU.replace(default=12), PresetArg("base_algorithm", str, "local_sgd", choices=SLOWMO_BASES,
                                                  help="slowmo: the workers' algorithm between outer rounds"),
              _OUTER_LR.replace(default=1.0), _OUTER_MOMENTUM.replace(default=0.5),
              _TOPOLOGY.replace(help="worker graph (slowmo: of the dpsgd base)"), _WEIGHTS, _SEED),
        theory=(OUTER_FACTS, SLOWMO_RATE),
    ),
    *STREAMING_DECLS,
    PresetDecl(
        "choco", choco, "CHOCO-SGD: D-PSGD with compressed gossip through public copies (--compress, "
        "--consensus-step)",
        args=(_TOPOLOGY, _WEIGHTS, _SEED),
    ),
)
for _decl in _DECLS:
    register(_decl)

#: Preset constructors by name (derived from the declarations).
PRESETS: dict[str, Callable[..., AlgorithmSpec]] = {d.name: d.build for d in _DECLS}


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
