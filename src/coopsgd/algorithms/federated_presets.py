"""Federated presets: FedAvg and the strategies built on its rounds ([CSGD] §6; SPEC's federated section).

FedAvg samples a fraction of the clients each round and averages their models on the server
(:class:`~coopsgd.algorithms.schedules.FedAvgSchedule`). On the same rounds: FedProx's proximal term,
the server optimizers of Reddi et al. (FedAvgM, FedAdam, FedYogi, FedAdagrad), SCAFFOLD's control variates,
and robust aggregation rules with simulated Byzantine clients. Each preset is declared in
:data:`FEDERATED_DECLS`, registered with the others by :mod:`coopsgd.algorithms.presets`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from coopsgd.algorithms.hooks import FED_NO_BOUND, FEDAVG_COROLLARY2, fed_no_bound
from coopsgd.algorithms.outer import OuterOptimizer
from coopsgd.algorithms.preset_base import _OUTER_LR, _OUTER_MOMENTUM, _SEED, _TAU, _workers, compressible
from coopsgd.algorithms.registry import DataInput, PresetArg, PresetDecl
from coopsgd.algorithms.robust import AGGREGATIONS, ATTACKS, RobustAggregation
from coopsgd.algorithms.schedules import LOCAL_WORK, FedAvgSchedule
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["fedavg", "fedprox", "scaffold", "fednova", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "FEDERATED_DECLS"]


def _robust(aggregation: str, trim: float, byzantine_fraction: float, attack: str, attack_std: float,
            attack_scale: float, krum_f: int | None, multi_krum_keep: int | None) -> dict[str, Any]:
    """The robust-aggregation settings of the FedAvg presets as :class:`RobustAggregation`'s arguments."""
    return dict(rule=aggregation, trim=trim, byzantine_fraction=byzantine_fraction, attack=attack,
                attack_std=attack_std, attack_scale=attack_scale, krum_f=krum_f, multi_krum_keep=multi_krum_keep)


def _work(local_work: str, min_local_steps: int, client_speeds: Sequence[float] | None) -> dict[str, Any]:
    """The local-work settings of the FedAvg presets as :class:`FedAvgSchedule`'s arguments (``"equal"``: every
    sampled client runs tau steps, FedAvg bit for bit)."""
    if local_work not in LOCAL_WORK:
        raise ConfigError.invalid("local_work", local_work, f"choose one of {', '.join(LOCAL_WORK)}")
    if min_local_steps != 1 and local_work != "uniform":
        raise ConfigError.invalid("min_local_steps", min_local_steps, "is used by local_work uniform only")
    return dict(local_work=local_work, min_local_steps=check_int("min_local_steps", min_local_steps, minimum=1),
                speeds=None if client_speeds is None else list(client_speeds))


def _federated(
    name: str,
    workers: int,
    tau: int,
    *,
    fraction: float,
    sample_counts: Sequence[float] | None,
    seed: int,
    mu: float,
    policies: Policies | None,
    outer: OuterOptimizer | None = None,
    params: dict[str, Any] | None = None,
    control: bool = False,
    robust: dict[str, Any] | None = None,
    work: dict[str, Any] | None = None,
    normalized: bool = False,
) -> AlgorithmSpec:
    """FedAvg's rounds (:class:`FedAvgSchedule`) with FedProx's ``mu``, with ``outer`` a server optimizer, with
    ``control`` SCAFFOLD's control variates, with ``robust`` the settings of a robust aggregation rule and
    simulated Byzantine clients (:class:`~coopsgd.algorithms.robust.RobustAggregation`; FedAvg's weighted mean
    with honest clients is kept as no rule at all, so that it stays FedAvg bit for bit); ``work`` the clients'
    local work (:func:`_work`), ``normalized`` FedNova's round."""
    m = _workers(workers)
    tau = check_int("tau", tau, minimum=1)
    c = check_float("fraction", fraction, low=0.0, high=1.0, low_open=True)
    mu = check_float("mu", mu, low=0.0)
    work = work or {}
    sched = FedAvgSchedule(m, tau, fraction=c, sample_counts=sample_counts, seed=seed, outer=outer is not None,
                           normalized=normalized, track_lrs=normalized or control, **work)
    notes = (f"theory: with IID data use Corollary 2 (local SGD) with {sched.clients_per_round} workers",)
    rob = None
    if robust is not None:
        rob = RobustAggregation(workers=m, clients=sched.clients_per_round, seed=int(seed), **robust)
        if not rob.active:
            rob = None
        elif control:
            raise ConfigError.invalid("aggregation" if rob.rule != "mean" else "byzantine_fraction",
                                      rob.rule if rob.rule != "mean" else rob.byzantine_fraction,
                                      "SCAFFOLD's control variates are averaged with the models: mean, no attackers")
    spec = AlgorithmSpec(
        name=name, workers=m, auxiliaries=1, tau=tau, schedule=sched, rule="post_mix", center="auxiliary",
        theory_matrix=None, theory_v=0, pattern="parameter_server", policies=policies or Policies(),
        params={"fraction": c, "clients_per_round": sched.clients_per_round, "seed": int(seed),
                **({"mu": mu} if mu > 0.0 or name == "fedprox" else {}), **(params or {}),
                **({} if not sched.uneven else {"local_work": sched.local_work, "min_local_steps": sched.min_local_steps}),
                **({} if rob is None else {k: v for k, v in rob.describe().items() if k != "byzantine"})},
        notes=notes, outer=outer, prox=mu, control=control, robust=rob,
    )
    why = fed_no_bound(spec)  # FedProx's term, a server optimizer, a robust rule: say why, once, for the hint
    return spec if why is None else dataclasses.replace(spec, notes=(why,))


@compressible
def fedavg(
    workers: int,
    tau: int = 5,
    *,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    mu: float = 0.0,
    local_work: str = "equal",
    min_local_steps: int = 1,
    client_speeds: Sequence[float] | None = None,
    aggregation: str = "mean",
    trim: float = 0.2,
    byzantine_fraction: float = 0.0,
    attack: str = "sign_flip",
    attack_std: float = 1.0,
    attack_scale: float = 10.0,
    krum_f: int | None = None,
    multi_krum_keep: int | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """Federated averaging: rounds of tau local steps on a sampled fraction c of clients ([CSGD] §5).

    The server model is auxiliary node 0 and the model to evaluate. With IID data it behaves like
    local SGD with c*m workers ([CSGD] Corollary 2 with m -> cm). ``mu > 0`` adds FedProx's proximal term
    (:func:`fedprox`); ``mu = 0`` is FedAvg bit for bit.
    """
    return _federated("fedavg", workers, tau, fraction=fraction, sample_counts=sample_counts, seed=seed, mu=mu,
                      policies=policies, work=_work(local_work, min_local_steps, client_speeds),
                      robust=_robust(aggregation, trim, byzantine_fraction, attack, attack_std, attack_scale, krum_f,
                                     multi_krum_keep))


@compressible
def fedprox(
    workers: int,
    tau: int = 5,
    *,
    mu: float = 0.01,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    local_work: str = "equal",
    min_local_steps: int = 1,
    client_speeds: Sequence[float] | None = None,
    aggregation: str = "mean",
    trim: float = 0.2,
    byzantine_fraction: float = 0.0,
    attack: str = "sign_flip",
    attack_std: float = 1.0,
    attack_scale: float = 10.0,
    krum_f: int | None = None,
    multi_krum_keep: int | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, MLSys 2020): FedAvg whose clients minimise
    ``h_k(x; x_t) = F_k(x) + (mu/2) ||x - x_t||^2`` (their eq. (2)) with tau local steps.

    Every local step of client i uses ``g_i + mu (x_i - x_t)`` in place of its stochastic gradient, x_t being
    the server model the client received at its last round -- the server node z, which every round sends to
    every client and which does not move between rounds. The rounds, the sampling and the weighting are
    FedAvg's (:func:`fedavg`); ``mu = 0`` is FedAvg bit for bit. The paper tries mu in {0.001, 0.01, 0.1, 1};
    the default 0.01 is one of them.
    """
    return _federated("fedprox", workers, tau, fraction=fraction, sample_counts=sample_counts, seed=seed, mu=mu,
                      policies=policies, work=_work(local_work, min_local_steps, client_speeds),
                      robust=_robust(aggregation, trim, byzantine_fraction, attack, attack_std, attack_scale, krum_f,
                                     multi_krum_keep))


@compressible
def scaffold(
    workers: int,
    tau: int = 5,
    *,
    outer_lr: float = 1.0,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    mu: float = 0.0,
    local_work: str = "equal",
    min_local_steps: int = 1,
    client_speeds: Sequence[float] | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, ICML 2020, Algorithm 1 with option II):
    FedAvg's rounds with control variates. Client i keeps c_i, the server c (all 0 at the start); a local step
    of a sampled client is ``y_i <- y_i - lr (g_i(y_i) - c_i + c)``, and after its tau steps::

        c_i^+ = c_i - c + (x - y_i) / (tau lr)                (option II; plain SGD at one lr per round)
        x <- x + eta_g (sum_S w_i y_i - x)                     (eta_g = outer_lr; w_i FedAvg's weights)
        c <- c + (1/m) sum_S (c_i^+ - c_i)                     (m clients, |S| sampled)

    The paper averages the models with equal weights (its w_i = 1/|S|: equal sample counts); the control
    update is the paper's, so that c stays the mean of the c_i. The control variates travel with the models
    (``bytes_sent`` is twice FedAvg's) and are one more d-vector per node, only the sampled clients' touched.
    ``outer_lr`` = 1 (the paper's eta_g = 1 experiments) is FedAvg's averaging; another value is a server SGD
    step (:class:`OuterOptimizer`). Compression is refused: the control variates are sent as they are.
    """
    lr = check_float("outer_lr", outer_lr, low=0.0, low_open=True)
    outer = None if lr == 1.0 else OuterOptimizer("sgd", lr=lr)
    return _federated("scaffold", workers, tau, fraction=fraction, sample_counts=sample_counts, seed=seed, mu=mu,
                      policies=policies, work=_work(local_work, min_local_steps, client_speeds), outer=outer,
                      params={"outer_lr": lr}, control=True)


@compressible
def fednova(
    workers: int,
    tau: int = 5,
    *,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    local_work: str = "equal",
    min_local_steps: int = 1,
    client_speeds: Sequence[float] | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """FedNova (Wang, Liu, Liang, Joshi, Poor, NeurIPS 2020, "Tackling the Objective Inconsistency Problem in
    Heterogeneous Federated Optimization", normalized averaging with plain local SGD): FedAvg's rounds whose server
    averages the clients' *normalized* updates. Client i runs K_i local steps from the server model x to y_i; with
    a_i = K_i (the sum of its steps' learning rates over lr when the lr varies within a round)::

        d_i = (x - y_i) / a_i,        x <- x - tau_eff sum_i p_i d_i,        tau_eff = sum_i p_i a_i

    p_i being FedAvg's weights of the sampled clients (their sample counts, normalized). The round is one
    averaging matrix: client weights ``tau_eff p_i / a_i`` and the server's ``1 - tau_eff sum_i p_i / a_i``.
    FedAvg with uneven work (``local_work``) converges to the minimizer of ``sum_i (p_i a_i / tau_eff) F_i``, not
    of ``F = sum_i p_i F_i`` (their Theorem 1: the objective inconsistency); FedNova's is F's. With equal work
    (every a_i equal) its weights are FedAvg's exactly: the same run bit for bit. Momentum and other inner
    optimizers are refused (a_i here is plain SGD's), as are FedProx's mu and robust aggregation.
    """
    return _federated("fednova", workers, tau, fraction=fraction, sample_counts=sample_counts, seed=seed, mu=0.0,
                      policies=policies, work=_work(local_work, min_local_steps, client_speeds), normalized=True)


# Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021:
# FedAvg's rounds with a server optimizer on Delta_t = mean_S(y_i) - x_t (the sampled clients' weighted
# average minus the server model); the optimizer is coopsgd.algorithms.outer.OuterOptimizer (docs/federated.md).


@compressible
def fedavgm(
    workers: int,
    tau: int = 5,
    *,
    outer_lr: float = 1.0,
    outer_momentum: float = 0.9,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    mu: float = 0.0,
    local_work: str = "equal",
    min_local_steps: int = 1,
    client_speeds: Sequence[float] | None = None,
    aggregation: str = "mean",
    trim: float = 0.2,
    byzantine_fraction: float = 0.0,
    attack: str = "sign_flip",
    attack_std: float = 1.0,
    attack_scale: float = 10.0,
    krum_f: int | None = None,
    multi_krum_keep: int | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """FedAvgM (Hsu, Qi, Brown 2019; Reddi et al. 2021, Algorithm 1 with server SGD and momentum): FedAvg's
    rounds, then the server takes a heavy-ball step on the pseudo-gradient ``Delta = x - mean_S(y_i)``::

        v <- beta v + Delta,    x <- x - eta v        (v starts at 0; eta = outer_lr, beta = outer_momentum)

    and every client receives the new x. ``outer_lr=1, outer_momentum=0`` is FedAvg bit for bit.
    """
    lr = check_float("outer_lr", outer_lr, low=0.0, low_open=True)
    beta = check_float("outer_momentum", outer_momentum, low=0.0, high=1.0, high_open=True)
    outer = OuterOptimizer("sgd", lr=lr, momentum=beta)
    return _federated("fedavgm", workers, tau, fraction=fraction, sample_counts=sample_counts, seed=seed, mu=mu,
                      policies=policies, work=_work(local_work, min_local_steps, client_speeds), outer=outer,
                      params={"outer_lr": lr, "outer_momentum": beta},
                      robust=_robust(aggregation, trim, byzantine_fraction, attack, attack_std, attack_scale, krum_f,
                                     multi_krum_keep))


def _adaptive(name: str, kind: str, workers: int, tau: int, *, outer_lr: float, outer_beta1: float,
              outer_beta2: float, outer_eps: float, fraction: float, sample_counts: Sequence[float] | None,
              seed: int, mu: float, policies: Policies | None, work: dict[str, Any],
              robust: dict[str, Any] | None = None) -> AlgorithmSpec:
    lr = check_float("outer_lr", outer_lr, low=0.0, low_open=True)
    b1 = check_float("outer_beta1", outer_beta1, low=0.0, high=1.0, high_open=True)
    b2 = check_float("outer_beta2", outer_beta2, low=0.0, high=1.0, high_open=True)
    eps = check_float("outer_eps", outer_eps, low=0.0, low_open=True)
    outer = OuterOptimizer(kind, lr=lr, betas=(b1, b2), eps=eps, bias_correction=False)
    params: dict[str, Any] = {"outer_lr": lr, "outer_beta1": b1, "outer_eps": eps}
    if kind != "adagrad":
        params["outer_beta2"] = b2
    return _federated(name, workers, tau, fraction=fraction, sample_counts=sample_counts, seed=seed, mu=mu,
                      policies=policies, work=work, outer=outer, params=params, robust=robust)


@compressible
def fedadam(
    workers: int,
    tau: int = 5,
    *,
    outer_lr: float = 0.01,
    outer_beta1: float = 0.9,
    outer_beta2: float = 0.99,
    outer_eps: float = 1e-3,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    mu: float = 0.0,
    local_work: str = "equal",
    min_local_steps: int = 1,
    client_speeds: Sequence[float] | None = None,
    aggregation: str = "mean",
    trim: float = 0.2,
    byzantine_fraction: float = 0.0,
    attack: str = "sign_flip",
    attack_std: float = 1.0,
    attack_scale: float = 10.0,
    krum_f: int | None = None,
    multi_krum_keep: int | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """FedAdam (Reddi et al., ICLR 2021, Algorithm 2): FedAvg's rounds, then with the round's pseudo-gradient
    ``Delta_t = mean_S(y_i) - x_t``::

        m_t = beta1 m_{t-1} + (1 - beta1) Delta_t,   v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2,
        x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau_a)

    (no bias correction; m and v start at 0). eta = ``outer_lr``, beta1/beta2 = ``outer_beta1`` /
    ``outer_beta2``, the adaptivity tau_a = ``outer_eps``. Defaults: eta 0.01, betas (0.9, 0.99), tau_a 1e-3
    (FedYogi's; Flower's legacy FedAdam strategy has eta 0.1 and tau_a 1e-9, with which the default run -- 8 workers,
    the MLP, 155 steps -- stays at chance accuracy, 0.11; with these, 0.94).
    """
    return _adaptive("fedadam", "adam", workers, tau, outer_lr=outer_lr, outer_beta1=outer_beta1,
                     outer_beta2=outer_beta2, outer_eps=outer_eps, fraction=fraction, sample_counts=sample_counts,
                     seed=seed, mu=mu, policies=policies, work=_work(local_work, min_local_steps, client_speeds),
                     robust=_robust(aggregation, trim, byzantine_fraction, attack, attack_std, attack_scale, krum_f,
                                     multi_krum_keep))


@compressible
def fedyogi(
    workers: int,
    tau: int = 5,
    *,
    outer_lr: float = 0.01,
    outer_beta1: float = 0.9,
    outer_beta2: float = 0.99,
    outer_eps: float = 1e-3,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    mu: float = 0.0,
    local_work: str = "equal",
    min_local_steps: int = 1,
    client_speeds: Sequence[float] | None = None,
    aggregation: str = "mean",
    trim: float = 0.2,
    byzantine_fraction: float = 0.0,
    attack: str = "sign_flip",
    attack_std: float = 1.0,
    attack_scale: float = 10.0,
    krum_f: int | None = None,
    multi_krum_keep: int | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """FedYogi (Reddi et al., ICLR 2021, Algorithm 2): as :func:`fedadam` with Yogi's second moment
    ``v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)``. Defaults: Flower's FedYogi strategy's
    (eta 0.01, betas (0.9, 0.99), tau_a 1e-3)."""
    return _adaptive("fedyogi", "yogi", workers, tau, outer_lr=outer_lr, outer_beta1=outer_beta1,
                     outer_beta2=outer_beta2, outer_eps=outer_eps, fraction=fraction, sample_counts=sample_counts,
                     seed=seed, mu=mu, policies=policies, work=_work(local_work, min_local_steps, client_speeds),
                     robust=_robust(aggregation, trim, byzantine_fraction, attack, attack_std, attack_scale, krum_f,
                                     multi_krum_keep))


@compressible
def fedadagrad(
    workers: int,
    tau: int = 5,
    *,
    outer_lr: float = 0.1,
    outer_beta1: float = 0.0,
    outer_eps: float = 1e-2,
    fraction: float = 1.0,
    sample_counts: Sequence[float] | None = None,
    seed: int = 0,
    mu: float = 0.0,
    local_work: str = "equal",
    min_local_steps: int = 1,
    client_speeds: Sequence[float] | None = None,
    aggregation: str = "mean",
    trim: float = 0.2,
    byzantine_fraction: float = 0.0,
    attack: str = "sign_flip",
    attack_std: float = 1.0,
    attack_scale: float = 10.0,
    krum_f: int | None = None,
    multi_krum_keep: int | None = None,
    policies: Policies | None = None,
) -> AlgorithmSpec:
    """FedAdagrad (Reddi et al., ICLR 2021, Algorithm 2): as :func:`fedadam` with Adagrad's second moment
    ``v_t = v_{t-1} + Delta_t^2``. Defaults: eta 0.1 and beta1 0 -- no momentum, ``m_t = Delta_t`` -- as Flower's
    FedAdagrad strategy, tau_a 1e-2 (the legacy strategy's 1e-9 reaches 0.81 test accuracy in the default run, 1e-2 0.92); the
    paper's algorithm allows beta1 > 0 (``outer_beta1``)."""
    return _adaptive("fedadagrad", "adagrad", workers, tau, outer_lr=outer_lr, outer_beta1=outer_beta1,
                     outer_beta2=0.0, outer_eps=outer_eps, fraction=fraction, sample_counts=sample_counts,
                     seed=seed, mu=mu, policies=policies, work=_work(local_work, min_local_steps, client_speeds),
                     robust=_robust(aggregation, trim, byzantine_fraction, attack, attack_std, attack_scale, krum_f,
                                     multi_krum_keep))




# ---------------------------------------------------------------------------------------------------------
# data inputs
# ---------------------------------------------------------------------------------------------------------


def _client_weights(settings: Any, facts: Any) -> list[float]:
    return [float(s) for s in facts["shard_sizes"]]


def _tau_from_local_epochs(settings: Any, facts: Any) -> int:
    # E local epochs = E passes over a client's shard between rounds
    return max(1, round(settings["local_epochs"] * facts["steps_per_epoch"]))


def _client_speeds(settings: Any, facts: Any) -> list[float]:
    return [float(s) for s in facts["worker_speeds"]]



_MU = PresetArg("mu", float, 0.0, help="FedProx's proximal coefficient mu: each local step adds mu (x - x_server) "
               "to the gradient (0: none)", low=0.0)
_FED_ARGS = (
    PresetArg("fraction", float, 1.0, help="FedAvg client fraction c", low=0.0, high=1.0, low_open=True),
    _SEED,
    PresetArg("local_epochs", float, None, help="FedAvg: local epochs per round (instead of tau)",
              low=0.0, low_open=True, kind="derived", excludes=("tau",), default_text="use tau"),
)
_WORK_ARGS = (
    PresetArg("local_work", str, "equal", choices=LOCAL_WORK,
              help="local steps of a sampled client per round: tau each (equal), K_i uniform on {min_local_steps, "
                   "..., tau} drawn per (seed, round, client) (uniform), or as many as fit in the time the fastest "
                   "client takes for tau, K_i = max(1, floor(tau s_i / max s)) with the clock's worker_speeds (budget)"),
    PresetArg("min_local_steps", int, 1, help="local_work uniform: the fewest local steps a client draws", low=1),
)
_ROBUST_ARGS = (
    PresetArg("aggregation", str, "mean", choices=AGGREGATIONS,
              help="how the server combines the sampled clients' models: weighted mean (FedAvg), coordinate-wise "
                   "median, trimmed mean, Krum or multi-Krum"),
    PresetArg("trim", float, 0.2, help="trimmed_mean: fraction of the sampled clients dropped at each end, per "
              "coordinate", low=0.0, high=0.5, high_open=True),
    PresetArg("byzantine_fraction", float, 0.0, help="fraction of the clients that are Byzantine (a seeded set "
              "drawn once per run) and send an attacked model", low=0.0, high=1.0, high_open=True),
    PresetArg("attack", str, "sign_flip", choices=ATTACKS,
              help="what a Byzantine client sends: its update negated, the server model plus Gaussian noise, or "
                   "its update scaled"),
    PresetArg("attack_std", float, 1.0, help="gaussian attack: the noise's standard deviation sigma", low=0.0,
              low_open=True),
    PresetArg("attack_scale", float, 10.0, help="scale attack: the factor s of the update"),
    PresetArg("krum_f", int, None, help="krum / multi_krum: the number f of Byzantine clients assumed among the k sampled per round",
              low=0, default_text="round(byzantine_fraction k)"),
    PresetArg("multi_krum_keep", int, None, help="multi_krum: how many of the lowest-score models are averaged",
              low=1, default_text="k - f"),
)
_FED_INPUTS = (DataInput("sample_counts", ("shard_sizes",), _client_weights,
                         help="clients are weighted by their number of training samples"),
               DataInput("client_speeds", ("worker_speeds",), _client_speeds,
                         help="local_work budget: the clients' simulated speeds (the clock's worker_speeds)"),
               DataInput("tau", ("steps_per_epoch",), _tau_from_local_epochs, when="local_epochs",
                         help="tau = max(1, round(local_epochs * steps_per_epoch))"))
_OUTER_BETA1 = PresetArg("outer_beta1", float, help="server optimizer's beta1 (first-moment decay; Reddi et al.)",
                         low=0.0, high=1.0, high_open=True)
_OUTER_BETA2 = PresetArg("outer_beta2", float, help="server optimizer's beta2 (second-moment decay; Reddi et al.)",
                         low=0.0, high=1.0, high_open=True)
_OUTER_EPS = PresetArg("outer_eps", float, help="server optimizer's adaptivity tau (added to sqrt(v); Reddi et al.)",
                       low=0.0, low_open=True)


#: The federated presets' declarations (registered, in this order, by :mod:`coopsgd.algorithms.presets`).
FEDERATED_DECLS: tuple[PresetDecl, ...] = (
    PresetDecl(
        "fedavg", fedavg, "federated averaging on a sampled fraction of clients",
        args=(_TAU.replace(default=5), *_FED_ARGS, *_WORK_ARGS, _MU, *_ROBUST_ARGS),
        inputs=_FED_INPUTS,
        theory=(FEDAVG_COROLLARY2, FED_NO_BOUND),
    ),
    PresetDecl(
        "fedprox", fedprox, "FedProx: FedAvg whose local steps add mu (x - x_server) to the gradient",
        args=(_TAU.replace(default=5), _MU.replace(default=0.01), *_FED_ARGS, *_WORK_ARGS, *_ROBUST_ARGS),
        inputs=_FED_INPUTS,
        theory=(FED_NO_BOUND,),
    ),
    PresetDecl(
        "scaffold", scaffold, "SCAFFOLD: FedAvg with client and server control variates (option II)",
        args=(_TAU.replace(default=5), _OUTER_LR.replace(default=1.0), *_FED_ARGS, *_WORK_ARGS, _MU),
        inputs=_FED_INPUTS,
        theory=(FED_NO_BOUND,),
    ),
    PresetDecl(
        "fednova", fednova, "FedNova: FedAvg whose server averages the clients' updates normalized by their local work",
        args=(_TAU.replace(default=5), *_FED_ARGS, *_WORK_ARGS),
        inputs=_FED_INPUTS,
        theory=(FED_NO_BOUND,),
    ),
    PresetDecl(
        "fedavgm", fedavgm, "FedAvgM: FedAvg with server momentum on the pseudo-gradient",
        args=(_TAU.replace(default=5), _OUTER_LR.replace(default=1.0),
              _OUTER_MOMENTUM.replace(default=0.9), *_FED_ARGS, *_WORK_ARGS, _MU, *_ROBUST_ARGS),
        inputs=_FED_INPUTS,
        theory=(FED_NO_BOUND,),
    ),
    PresetDecl(
        "fedadam", fedadam, "FedAdam: FedAvg with an Adam server step (Reddi et al., no bias correction)",
        args=(_TAU.replace(default=5), _OUTER_LR.replace(default=0.01), _OUTER_BETA1.replace(default=0.9),
              _OUTER_BETA2.replace(default=0.99), _OUTER_EPS.replace(default=1e-3), *_FED_ARGS, *_WORK_ARGS, _MU, *_ROBUST_ARGS),
        inputs=_FED_INPUTS,
        theory=(FED_NO_BOUND,),
    ),
    PresetDecl(
        "fedyogi", fedyogi, "FedYogi: FedAvg with a Yogi server step (Reddi et al.)",
        args=(_TAU.replace(default=5), _OUTER_LR.replace(default=0.01),
              _OUTER_BETA1.replace(default=0.9), _OUTER_BETA2.replace(default=0.99), _OUTER_EPS.replace(default=1e-3),
              *_FED_ARGS, *_WORK_ARGS, _MU, *_ROBUST_ARGS),
        inputs=_FED_INPUTS,
        theory=(FED_NO_BOUND,),
    ),
    PresetDecl(
        "fedadagrad", fedadagrad, "FedAdagrad: FedAvg with an Adagrad server step (Reddi et al.)",
        args=(_TAU.replace(default=5), _OUTER_LR.replace(default=0.1),
              _OUTER_BETA1.replace(default=0.0), _OUTER_EPS.replace(default=1e-2), *_FED_ARGS, *_WORK_ARGS, _MU, *_ROBUST_ARGS),
        inputs=_FED_INPUTS,
        theory=(FED_NO_BOUND,),
    ),
)
