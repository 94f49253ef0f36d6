"""Theory hooks of the presets: the preset-specific entries of ``coopsgd theory`` (:func:`coopsgd.analysis.analyze`).

Each preset declaration (:mod:`coopsgd.algorithms.presets`) lists its hooks: *facts* (closed-form properties of
the spec, e.g. EASGD's zeta(alpha), the threshold zeta_tau, MATCHA's expected zeta) and *bounds* (the error
bound that applies to it: [CSGD] Corollaries 2 and 3, Theorem 3, SlowMo's rate). A hook reads the spec and
writes into the analysis' dictionaries; nothing here trains or communicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from coopsgd.algorithms.registry import TheoryHook
from coopsgd.algorithms.schedules import MatchaSchedule
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.theory import bounds


def _outer_facts(spec: AlgorithmSpec, out: dict[str, Any], notes: list[str]) -> None:
    """The outer optimizer of z and what the theory says about it (SlowMo's factor alpha / (1 - beta))."""
    o = spec.outer
    assert o is not None
    out["outer_optimizer"] = o.describe()
    out["inner_optimizer"] = spec.inner_optimizer or "sgd (or the run's --optimizer)"
    if o.kind == "sgd" and not o.nesterov:
        out["effective_lr_factor"] = bounds.slowmo_effective_lr_factor(o.lr, o.momentum)
    no_bound = o.kind == "adam" or o.nesterov or spec.inner_optimizer in ("adam", "adamw")
    if not no_bound and o.lr_scaled:
        out["convergence_rate"] = bounds.SLOWMO_RATE_STATEMENT
    if no_bound:
        notes.append("no convergence bound applies: SlowMo's analysis covers heavy-ball slow momentum over "
                     "SGD-type inner steps; an Adam or Nesterov outer step, or an adaptive inner optimizer "
                     "(AdamW), is outside it")


def _slowmo_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    """SlowMo's rate (an order, for SGD-type inner steps)."""
    o = spec.outer
    assert o is not None
    rate = bounds.slowmo_rate(c, m=spec.workers, tau=spec.tau, alpha=o.lr, beta=o.momentum)
    res["slowmo_rate"] = rate
    res["slowmo"] = (f"{rate['name']}: 1/sqrt(m K) = {rate['order_1_over_sqrt_mK']:.4g} at m={spec.workers}, "
                     f"K={c.steps} (an order, constants not evaluated; SGD-type inner steps)")


def _diloco_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    res["diloco"] = ("no convergence bound applies: inner AdamW and an outer Nesterov (or Adam) step are outside "
                     "the analyses of [CSGD] and SlowMo")


OUTER_FACTS = TheoryHook("outer_optimizer", facts=_outer_facts)


# ---------------------------------------------------------------------------------------------------------
# theory hooks: the preset-specific entries of `coopsgd theory` (coopsgd.analysis.analyze)
# ---------------------------------------------------------------------------------------------------------


def _elastic_facts(group_size: Callable[[AlgorithmSpec], int]) -> Callable[[AlgorithmSpec, dict[str, Any], list[str]], None]:
    """EASGD's alpha facts ([CSGD] Lemma 1, Theorem 3) for groups of ``group_size(spec)`` workers."""

    def facts(spec: AlgorithmSpec, out: dict[str, Any], notes: list[str]) -> None:
        size = group_size(spec)
        a = spec.params["alpha"]
        out["alpha"] = a
        out["best_alpha"] = bounds.easgd_best_alpha(size)
        out["alpha_limit"] = bounds.easgd_alpha_limit(size)
        out["zeta_at_alpha"] = bounds.easgd_zeta(a, size)
        out["zeta_at_best_alpha"] = bounds.easgd_zeta(out["best_alpha"], size)
        if a >= out["alpha_limit"]:
            notes.append(f"alpha={a:g} >= 2/(m+1)={out['alpha_limit']:g}: zeta >= 1, EASGD diverges")

    return facts


def _generalized_elastic_facts(spec: AlgorithmSpec, out: dict[str, Any], notes: list[str]) -> None:
    """[CSGD] Theorem 4: zeta of the base W, and the best alpha with the zeta it gives."""
    zw = spec.params["zeta_W"]
    out["zeta_W"] = zw
    out["alpha"] = spec.params["alpha"]
    out["best_alpha"] = bounds.generalized_elastic_best_alpha(zw, spec.workers)
    out["zeta_at_best_alpha"] = bounds.generalized_elastic_zeta(zw, out["best_alpha"], spec.workers)


def _zeta_tau_facts(spec: AlgorithmSpec, out: dict[str, Any], notes: list[str]) -> None:
    """zeta_tau ([CSGD] §5.4): the zeta of D-PSGD whose network error equals PSASGD's with this tau."""
    out["zeta_tau"] = bounds.zeta_tau(spec.tau) if spec.tau > 1 else 0.0


def smallest_tau_beaten(z: float) -> int | None:
    """Smallest tau with zeta <= zeta_tau: D-PSGD on this W has a lower error floor than PSASGD(tau)."""
    if z >= 1:
        return None
    # zeta^2 <= 1 - 2/(tau+1)  <=>  tau >= 2/(1 - zeta^2) - 1
    return max(1, math.ceil(2.0 / (1.0 - z * z) - 1.0 - 1e-12))


def _dpsgd_vs_psasgd_facts(spec: AlgorithmSpec, out: dict[str, Any], notes: list[str]) -> None:
    if out.get("zeta") is not None:
        out["dpsgd_beats_psasgd_with_tau"] = smallest_tau_beaten(out["zeta"])


def _corollary2_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    """[CSGD] Corollary 2: periodic simple averaging A(tau, J, 0)."""
    if z is not None:
        res["corollary2"] = bounds.corollary2(c, m=spec.workers, tau=spec.tau).to_dict()


def _corollary3_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    """[CSGD] Corollary 3: decentralized parallel SGD A(1, W, 0)."""
    if z is not None:
        res["corollary3"] = bounds.corollary3(c, m=spec.workers, zeta=z).to_dict()


def _theorem3_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    """[CSGD] Theorem 3: EASGD at its best alpha 2/(m+2)."""
    if z is not None and abs(spec.params["alpha"] - bounds.easgd_best_alpha(spec.workers)) < 1e-12:
        res["theorem3"] = bounds.theorem3(c, m=spec.workers, tau=spec.tau).to_dict()


def _fedavg_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    """FedAvg with IID data: [CSGD] Corollary 2 with the sampled clients as the workers (plain FedAvg only)."""
    if z is None and fed_no_bound(spec) is None:
        k = spec.params["clients_per_round"]
        res["corollary2_with_sampled_clients"] = bounds.corollary2(c, m=k, tau=spec.tau).to_dict()


def _matcha_facts(spec: AlgorithmSpec, out: dict[str, Any], notes: list[str]) -> None:
    """MATCHA's design: matchings, activation probabilities, alpha and the expected zeta."""
    from coopsgd.theory.matcha import algebraic_connectivity, expected_laplacian, expected_rho

    sched = spec.schedule
    assert isinstance(sched, MatchaSchedule)
    laps = list(sched.laplacians)
    p = sched.probabilities
    rho = expected_rho(laps, p, sched.alpha, sched.n)
    out["matchings"] = sched.matchings
    out["activation_probabilities"] = p.tolist()
    out["expected_active_fraction"] = float(p.mean()) if len(p) else 0.0
    out["alpha"] = sched.alpha
    out["rho"] = rho
    out["expected_zeta"] = math.sqrt(max(rho, 0.0))
    out["expected_zeta_note"] = ("expected_zeta = sqrt(rho), rho = ||E[W^T W] - J||_2 over one round's random "
                                 "W = I - alpha sum_j B_j L_j (B_j ~ Bernoulli(p_j)); MATCHA's analysis uses rho "
                                 "where a fixed W has zeta^2")
    if laps:
        out["algebraic_connectivity"] = algebraic_connectivity(expected_laplacian(laps, p))
        out["base_algebraic_connectivity"] = algebraic_connectivity(np.sum(laps, axis=0))
    if rho >= 1.0 - 1e-12:
        notes.append("expected_zeta >= 1: the base graph is disconnected (or has no edges); MATCHA does not mix")


def _matcha_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    """An indicator, not a theorem: [CSGD] Theorem 1 evaluated at zeta = expected_zeta."""
    import dataclasses

    from coopsgd.theory.matcha import expected_rho

    sched = spec.schedule
    assert isinstance(sched, MatchaSchedule)
    ez = math.sqrt(max(expected_rho(list(sched.laplacians), sched.probabilities, sched.alpha, sched.n), 0.0))
    rep = bounds.theorem1(c, m=spec.workers, v=0, tau=spec.tau, zeta=ez)
    note = ("indicator only: [CSGD] Theorem 1 assumes one fixed W; evaluated here at zeta = expected_zeta "
            "(MATCHA's own analysis puts rho = expected_zeta^2 where a fixed W has zeta^2)")
    res["theorem1_at_expected_zeta"] = dataclasses.replace(rep, notes=(note, *rep.notes)).to_dict()


def fed_no_bound(spec: AlgorithmSpec) -> str | None:
    """Why no bound applies to a FedAvg-family spec (FedProx's term, a server optimizer), or ``None``."""
    why = []
    if spec.prox > 0.0:
        why.append(f"the proximal term (mu={spec.prox:g}) changes the local steps; FedProx's own analysis (Li et "
                   "al. 2020, Theorem 4) needs its B-local dissimilarity and gamma-inexactness, not estimated here")
    if spec.control:
        why.append("SCAFFOLD's control variates change the local steps; its own rates (Karimireddy et al. 2020, "
                   "Theorem III) need the clients' gradient dissimilarity, not estimated here")
    if spec.outer is not None:
        why.append(f"the server optimizer ({spec.name}: {spec.outer.kind}) is not plain averaging; Reddi et al.'s "
                   "bounds (2021, Theorems 1-2) need a gradient bound G and the clients' heterogeneity sigma_g, "
                   "not estimated here")
    work = spec.params.get("local_work")
    if spec.name == "fednova":
        why.append("FedNova's normalised averaging (Wang et al. 2020, its convergence analysis) needs the clients' gradient "
                   "dissimilarity, not estimated here")
    elif work is not None:
        why.append(f"uneven local work ({work}: K_i <= tau steps per client) optimises a weighted objective "
                   "other than F (Wang et al. 2020, Theorem 1; fednova normalises it); its rates are not computed here")
    rob = spec.robust
    if rob is not None:
        why.append(f"aggregation {rob.rule!r}"
                   + (f" with {rob.byzantine_count} Byzantine clients ({rob.attack})" if rob.byzantine_count else "")
                   + " is not FedAvg's mean of honest clients (Byzantine-robust rates, e.g. Blanchard et al. 2017 "
                     "for Krum, are not computed here)")
    if not why:
        return None
    return "no bound applies: [CSGD] Corollary 2 covers plain averaging of plain local SGD steps; " + "; ".join(why)


def _fed_facts(spec: AlgorithmSpec, out: dict[str, Any], notes: list[str]) -> None:
    """FedProx's mu and the server optimizer of a FedAvg-family preset; why no bound applies."""
    out["mu"] = spec.prox
    if "local_work" in spec.params:
        out["local_work"] = spec.params["local_work"]
    if spec.control:
        out["control_variates"] = "SCAFFOLD option II: c_i <- c_i - c + (x - y_i) / (tau lr)"
    if spec.outer is not None:
        out["server_optimizer"] = spec.outer.describe()
    why = fed_no_bound(spec)
    if why is not None and why not in notes:
        notes.append(why)


def _fed_bounds(spec: AlgorithmSpec, c: bounds.ProblemConstants, z: float | None, res: dict[str, Any]) -> None:
    why = fed_no_bound(spec)
    if why is not None:
        res["federated"] = why


ZETA_TAU = TheoryHook("zeta_tau", facts=_zeta_tau_facts)
DPSGD_VS_PSASGD = TheoryHook("dpsgd_vs_psasgd", facts=_dpsgd_vs_psasgd_facts)
COROLLARY2 = TheoryHook("corollary2", bounds=_corollary2_bounds)
COROLLARY3 = TheoryHook("corollary3", bounds=_corollary3_bounds)


EASGD_ALPHA = TheoryHook("easgd_alpha", facts=_elastic_facts(lambda spec: spec.workers))
THEOREM3 = TheoryHook("theorem3", bounds=_theorem3_bounds)
GENERALIZED_ELASTIC_ALPHA = TheoryHook("generalized_elastic_alpha", facts=_generalized_elastic_facts)
EASGD_ALPHA_PER_GROUP = TheoryHook("easgd_alpha_per_group",
                                   facts=_elastic_facts(lambda spec: spec.workers // spec.params["groups"]))
FEDAVG_COROLLARY2 = TheoryHook("corollary2_sampled_clients", bounds=_fedavg_bounds)
FED_NO_BOUND = TheoryHook("federated_no_bound", facts=_fed_facts, bounds=_fed_bounds)
MATCHA_EXPECTED_ZETA = TheoryHook("matcha_expected_zeta", facts=_matcha_facts, bounds=_matcha_bounds)
DILOCO_NO_BOUND = TheoryHook("diloco_no_bound", bounds=_diloco_bounds)
SLOWMO_RATE = TheoryHook("slowmo_rate", bounds=_slowmo_bounds)
