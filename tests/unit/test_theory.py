"""Tests of coopsgd.theory: bounds ([CSGD] Theorems 1-4, Corollaries 1-3), cost model and heat map."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from coopsgd.errors import ConfigError, DivergenceWarning, TheoryWarning
from coopsgd.theory import (
    BoundReport,
    ComputeModel,
    NetworkModel,
    ProblemConstants,
    RoundCost,
    check_easgd_alpha,
    corollary1,
    corollary1_lr,
    corollary1_min_steps,
    corollary2,
    corollary3,
    easgd_alpha_limit,
    easgd_best_alpha,
    easgd_mixing,
    easgd_zeta,
    effective_lr,
    expected_runtime,
    generalized_elastic_best_alpha,
    generalized_elastic_mixing,
    generalized_elastic_zeta,
    network_error_grid,
    network_error_term,
    plot_network_error_heatmap,
    round_cost,
    theorem1,
    theorem2,
    theorem2_constant,
    theorem3,
    zeta,
    zeta_tau,
)

C0 = ProblemConstants(L=2.0, sigma2=3.0, f_gap=5.0, lr=0.01, steps=1200, kappa2=0.7)


def _with(c: ProblemConstants, **kw) -> ProblemConstants:
    d = dict(L=c.L, sigma2=c.sigma2, f_gap=c.f_gap, lr=c.lr, steps=c.steps, kappa2=c.kappa2)
    d.update(kw)
    return ProblemConstants(**d)


# --------------------------------------------------------------------------------------------------------
# random symmetric doubly-stochastic matrices
# --------------------------------------------------------------------------------------------------------


def _perm_mixture(m: int, rng: np.random.Generator, k: int = 4) -> np.ndarray:
    """Convex combination of symmetrised permutation matrices: symmetric, doubly stochastic."""
    p = rng.dirichlet(np.ones(k))
    W = np.zeros((m, m))
    for w in p:
        P = np.eye(m)[rng.permutation(m)]
        W += w * (P + P.T) / 2.0
    return W


def _metropolis_random(m: int, rng: np.random.Generator, prob: float = 0.4) -> np.ndarray:
    A = np.triu(rng.random((m, m)) < prob, 1)
    A = A | A.T
    deg = A.sum(axis=1)
    W = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            if A[i, j]:
                W[i, j] = 1.0 / (1.0 + max(deg[i], deg[j]))
    W[np.diag_indices(m)] = 1.0 - W.sum(axis=1)
    return W


def _random_W(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(2, 10))
    return _perm_mixture(m, rng) if seed % 2 else _metropolis_random(m, rng)


# --------------------------------------------------------------------------------------------------------
# EASGD (Lemma 1)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_easgd_zeta_matches_numerical_spectrum(m):
    for alpha in np.linspace(0.01, 1.5, 37):
        W = easgd_mixing(alpha, m)
        assert W.shape == (m + 1, m + 1)
        np.testing.assert_allclose(W.sum(axis=0), 1.0)
        np.testing.assert_allclose(W.sum(axis=1), 1.0)
        assert easgd_zeta(alpha, m) == pytest.approx(zeta(W), abs=1e-10)


def test_easgd_single_worker_is_exact():
    # W_alpha is 2x2 for m = 1: eigenvalues 1 and 1 - 2 alpha, no 1 - alpha
    for a in (0.1, 0.5, 0.7):
        assert easgd_zeta(a, 1) == pytest.approx(abs(1 - 2 * a))
    assert easgd_best_alpha(1) == 0.5 and easgd_zeta(0.5, 1) == 0.0
    assert easgd_zeta(2 / 3, 1) == pytest.approx(1 / 3)  # Theorem 3's zeta = m/(m+2) at alpha = 2/(m+2)


@pytest.mark.parametrize("m", [2, 3, 4, 8, 31])
def test_easgd_best_alpha_minimises_zeta(m):
    a_star = easgd_best_alpha(m)
    assert a_star == pytest.approx(2.0 / (m + 2))
    assert easgd_zeta(a_star, m) == pytest.approx(m / (m + 2.0))
    grid = np.linspace(1e-4, 1.5, 20001)
    zs = np.array([easgd_zeta(a, m) for a in grid])
    assert zs.min() >= easgd_zeta(a_star, m) - 1e-12
    assert abs(grid[np.argmin(zs)] - a_star) < 1e-3


@pytest.mark.parametrize("m", [1, 3, 8])
def test_easgd_zeta_below_one_exactly_inside_limit(m):
    limit = easgd_alpha_limit(m)
    assert limit == pytest.approx(2.0 / (m + 1))
    for a in np.linspace(-0.5, 1.5, 2001):
        inside = 0.0 < a < limit
        assert (easgd_zeta(a, m) < 1.0) == inside, a


def test_check_easgd_alpha():
    assert check_easgd_alpha(0.2, 8) == 0.2
    with pytest.warns(DivergenceWarning, match="diverges"):
        assert check_easgd_alpha(0.25, 8) == 0.25
    with pytest.raises(ConfigError, match="alpha"):
        check_easgd_alpha(0.25, 8, strict=True)
    with pytest.warns(DivergenceWarning, match="self-weights"):
        check_easgd_alpha(1.2, 8)
    for bad in (0, 0.0, -0.1, float("nan"), float("inf"), "x", None, True):
        with pytest.raises(ConfigError, match="alpha"):
            check_easgd_alpha(bad, 8)


def test_check_easgd_alpha_silent_inside_range(recwarn):
    check_easgd_alpha(0.9 / 8, 8)
    check_easgd_alpha(2 / 9 - 1e-9, 8)
    assert not [w for w in recwarn if issubclass(w.category, DivergenceWarning)]


# --------------------------------------------------------------------------------------------------------
# Theorem 4 (generalized elastic averaging)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_generalized_elastic_zeta_matches_spectrum(seed):
    W = _random_W(seed)
    m = W.shape[0]
    np.testing.assert_allclose(W, W.T)
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    z = zeta(W)
    for alpha in [0.01, 0.05, 0.1, 0.2, 1.0 / (m + 1), 0.3, 0.5, 0.9, 1.3]:
        Wp = generalized_elastic_mixing(W, alpha)
        assert Wp.shape == (m + 1, m + 1)
        np.testing.assert_allclose(Wp.sum(axis=1), 1.0)
        assert generalized_elastic_zeta(z, alpha, m) == pytest.approx(zeta(Wp), abs=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_generalized_elastic_best_alpha(seed):
    W = _random_W(seed)
    m = W.shape[0]
    z = zeta(W)
    a_star = generalized_elastic_best_alpha(z, m)
    assert a_star == pytest.approx((1 + z) / (m + 1 + z))
    best = generalized_elastic_zeta(z, a_star, m)
    assert best == pytest.approx(m * z / (m + 1 + z))
    assert best == pytest.approx(zeta(generalized_elastic_mixing(W, a_star)), abs=1e-9)
    grid = np.linspace(1e-4, 1.0, 5001)
    assert min(generalized_elastic_zeta(z, a, m) for a in grid) >= best - 1e-12
    if z > 0:
        assert best < z  # the auxiliary node always helps at alpha*


def test_generalized_elastic_with_identity_is_easgd():
    for m in (2, 5):
        for a in (0.1, 0.3):
            np.testing.assert_allclose(generalized_elastic_mixing(np.eye(m), a), easgd_mixing(a, m))
        assert generalized_elastic_best_alpha(1.0, m) == pytest.approx(easgd_best_alpha(m))


# --------------------------------------------------------------------------------------------------------
# Theorem 1 and its corollaries
# --------------------------------------------------------------------------------------------------------


def test_effective_lr():
    assert effective_lr(0.1, 8, 1) == pytest.approx(0.8 / 9)
    assert effective_lr(0.1, 8, 0) == 0.1


def test_theorem1_terms_formula():
    m, v, tau, z = 8, 1, 4, 0.5
    r = theorem1(C0, m=m, v=v, tau=tau, zeta=z)
    e = m * C0.lr / (m + v)
    assert r.lr_eff == pytest.approx(e)
    assert r.terms["optimization"] == pytest.approx(2 * C0.f_gap / (e * C0.steps))
    assert r.terms["sync_noise"] == pytest.approx(e * C0.L * C0.sigma2 / m)
    factor = ((1 + z**2) / (1 - z**2) * tau - 1) * (1 + v / m) ** 2
    assert r.terms["network_error"] == pytest.approx(e**2 * C0.L**2 * C0.sigma2 * factor)
    assert r.total == pytest.approx(sum(r.terms.values()))
    lhs = e * C0.L + 5 * e**2 * C0.L**2 * ((1 + v / m) * tau / (1 - z)) ** 2
    assert r.condition_lhs == pytest.approx(lhs)
    assert r.condition_holds
    assert isinstance(r.to_dict()["notes"], list)
    assert r.to_dict()["terms"] == r.terms


def test_theorem1_sync_sgd_has_no_network_error():
    r = theorem1(C0, m=4, v=0, tau=1, zeta=0.0)
    assert r.terms["network_error"] == 0.0
    assert r.total == pytest.approx(2 * C0.f_gap / (C0.lr * C0.steps) + C0.lr * C0.L * C0.sigma2 / 4)


@pytest.mark.parametrize("tau", [1, 2, 5, 16])
def test_theorem1_at_J_equals_corollary2(tau):
    t1 = theorem1(C0, m=8, v=0, tau=tau, zeta=0.0)
    c2 = corollary2(C0, m=8, tau=tau)
    for k in t1.terms:
        assert t1.terms[k] == pytest.approx(c2.terms[k], rel=1e-12)
    assert t1.total == pytest.approx(c2.total, rel=1e-12)
    a = C0.lr * C0.L
    assert c2.condition_lhs == pytest.approx(a + a * a * tau * (tau - 1))
    assert c2.terms["network_error"] == pytest.approx(C0.lr**2 * C0.L**2 * C0.sigma2 * (tau - 1))


@pytest.mark.parametrize("z", [0.0, 0.3, 0.75, 0.95])
def test_theorem1_at_tau1_equals_corollary3(z):
    t1 = theorem1(C0, m=6, v=0, tau=1, zeta=z)
    c3 = corollary3(C0, m=6, zeta=z)
    assert t1.total == pytest.approx(c3.total, rel=1e-12)
    assert c3.terms["network_error"] == pytest.approx(C0.lr**2 * C0.L**2 * C0.sigma2 * 2 * z**2 / (1 - z**2))
    a = C0.lr * C0.L
    lhs = a + a * a * (2 * z / (1 - z)) * (z / (1 + z) + 1 / (1 - z))
    assert c3.condition_lhs == pytest.approx(lhs)


def test_network_error_monotone_in_tau_and_zeta():
    taus = np.arange(1, 30)
    zetas = np.linspace(0, 0.99, 60)
    g = network_error_grid(taus, zetas)
    assert g.shape == (len(zetas), len(taus))
    assert g[0, 0] == 0.0
    assert np.all(np.diff(g, axis=1) > 0)
    assert np.all(np.diff(g[:, 1:], axis=0) > 0)  # strictly in zeta for every tau
    assert np.all(np.diff(g[:, :1], axis=0) > 0)
    # the bound's term follows the factor
    vals = [theorem1(C0, m=4, v=1, tau=t, zeta=0.6).terms["network_error"] for t in (1, 2, 4, 8)]
    assert vals == sorted(vals) and len(set(vals)) == 4
    vals = [theorem1(C0, m=4, v=1, tau=3, zeta=z).terms["network_error"] for z in (0.0, 0.2, 0.5, 0.9)]
    assert vals == sorted(vals) and len(set(vals)) == 4


def test_network_error_term_vectorised_and_scalar():
    assert network_error_term(3, 0.5, m=4, v=2) == pytest.approx((5 / 3 * 3 - 1) * 1.5**2)
    arr = network_error_term(np.array([1.0, 2.0]), np.array([0.0, 1.0]))
    assert arr[0] == 0.0 and math.isinf(arr[1])
    assert math.isinf(network_error_term(2, 1.0))


def test_condition_flagged_when_lr_too_large():
    big = _with(C0, lr=0.4)
    r = theorem1(big, m=8, v=0, tau=10, zeta=0.8)
    assert not r.condition_holds
    assert r.condition_lhs > 1
    assert any("fails" in n for n in r.notes)
    assert math.isfinite(r.total)  # reported, not raised
    with pytest.warns(TheoryWarning):
        r.warn_if_invalid()
    assert not corollary2(_with(C0, lr=1.0), m=8, tau=4).condition_holds
    assert not corollary3(_with(C0, lr=0.4), m=8, zeta=0.9).condition_holds


def test_zeta_at_least_one_is_infinite():
    for z in (1.0, 1.5):
        r = theorem1(C0, m=4, v=0, tau=2, zeta=z)
        assert math.isinf(r.total) and math.isinf(r.terms["network_error"])
        assert not r.condition_holds
        assert any("does not apply" in n for n in r.notes)
    assert math.isinf(corollary3(C0, m=4, zeta=1.0).total)
    assert math.isinf(corollary1(C0, m=4, v=0, tau=1, zeta=1.0).total)
    assert math.isinf(theorem2(C0, m=4, v=0, tau=1, zeta=1.0).total)
    assert math.isinf(corollary1_min_steps(m=4, v=0, tau=1, zeta=1.0))


def test_corollary1_lr_and_bound():
    m, v, tau, z, K = 8, 1, 2, 0.4, 100_000
    lr = corollary1_lr(m=m, v=v, L=C0.L, steps=K)
    assert lr == pytest.approx((m + v) / (C0.L * m) * math.sqrt(m / K))
    assert effective_lr(lr, m, v) == pytest.approx(math.sqrt(m / K) / C0.L)
    c = _with(C0, steps=K)
    r = corollary1(c, m=m, v=v, tau=tau, zeta=z)
    expected = (2 * C0.L * C0.f_gap + C0.sigma2) / math.sqrt(m * K) + (m / K) * (1 + v / m) ** 2 * (
        (1 + z**2) / (1 - z**2) * tau - 1
    ) * C0.sigma2
    assert r.total == pytest.approx(expected)
    # (18) is Theorem 1 at the corollary's learning rate; c.lr is ignored
    assert r.total == pytest.approx(theorem1(_with(c, lr=lr), m=m, v=v, tau=tau, zeta=z).total)
    assert any("ignored" in n for n in r.notes)
    kmin = corollary1_min_steps(m=m, v=v, tau=tau, zeta=z)
    assert kmin == pytest.approx(10 * m * ((1 + v / m) * tau / (1 - z)) ** 2)
    assert r.condition_holds == (K >= kmin)
    assert not corollary1(_with(C0, steps=int(kmin) - 1), m=m, v=v, tau=tau, zeta=z).condition_holds


@pytest.mark.parametrize("m,v,tau,z", [(4, 0, 1, 0.0), (8, 1, 4, 0.5), (16, 0, 10, 0.9), (2, 3, 2, 0.2)])
def test_corollary1_horizon_implies_theorem1_condition(m, v, tau, z):
    K = math.ceil(corollary1_min_steps(m=m, v=v, tau=tau, zeta=z))
    lr = corollary1_lr(m=m, v=v, L=C0.L, steps=K)
    assert theorem1(_with(C0, lr=lr, steps=K), m=m, v=v, tau=tau, zeta=z).condition_holds


def test_theorem2_doubles_theorem1_plus_C_kappa2():
    m, v, tau, z = 8, 0, 4, 0.5
    t1 = theorem1(C0, m=m, v=v, tau=tau, zeta=z)
    t2 = theorem2(C0, m=m, v=v, tau=tau, zeta=z)
    C = theorem2_constant(lr=C0.lr, L=C0.L, tau=tau, zeta=z)
    assert C == pytest.approx(
        6 * C0.lr**2 * C0.L**2 * tau**2 / (1 - z) * (2 * z**2 / (1 + z) + 2 * z / (1 - z) + (tau - 1) / tau)
    )
    assert t2.terms["non_iid"] == pytest.approx(C * C0.kappa2)
    assert t2.total == pytest.approx(2 * t1.total + C * C0.kappa2)
    assert t2.condition_holds == (t2.lr_eff * C0.L <= 1 and C <= 0.5)
    assert t2.condition_holds
    bad = theorem2(_with(C0, lr=0.2), m=m, v=v, tau=tau, zeta=z)
    assert not bad.condition_holds  # C > 1/2 although eta_eff L = 0.4 <= 1
    assert theorem2_constant(lr=0.1, L=1.0, tau=1, zeta=0.0) == 0.0


def test_theorem3_easgd():
    m = 8
    e = m * C0.lr / (m + 1)
    for tau in (1, 2, 5):
        r = theorem3(C0, m=m, tau=tau)
        Cc = 1 + 2 * (1 + 1 / m) ** 2
        assert r.lr_eff == pytest.approx(e)
        assert r.terms["network_error"] == pytest.approx(
            0.5 * e**2 * C0.L**2 * C0.sigma2 * (m + 1) * (1 + Cc * (tau - 1))
        )
    # at tau = 1 Theorem 3 is Theorem 1 with v = 1, zeta = m/(m+2) (Appendix G)
    t1 = theorem1(C0, m=m, v=1, tau=1, zeta=m / (m + 2))
    assert theorem3(C0, m=m, tau=1).total == pytest.approx(t1.total)


def test_zeta_tau_identity():
    for tau in range(1, 60):
        zt = zeta_tau(tau)
        assert zt == pytest.approx(math.sqrt(1 - 2 / (tau + 1)))
        # D-PSGD factor at zeta_tau equals PSASGD's tau - 1; below it, smaller; above it, larger
        assert network_error_term(1, zt) == pytest.approx(tau - 1, abs=1e-9)
        for z in np.linspace(0, 0.999, 50):
            dpsgd = network_error_term(1, z)
            if z < zt - 1e-9:
                assert dpsgd < tau - 1 + 1e-12
            elif z > zt + 1e-9:
                assert dpsgd > tau - 1
        # and the bounds agree with the factors
        c3 = corollary3(C0, m=8, zeta=zt)
        c2 = corollary2(C0, m=8, tau=tau)
        assert c3.total == pytest.approx(c2.total)


# --------------------------------------------------------------------------------------------------------
# bad arguments
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda: ProblemConstants(L=0, sigma2=1, f_gap=1, lr=0.1, steps=10), "L"),
        (lambda: ProblemConstants(L=1, sigma2=-1, f_gap=1, lr=0.1, steps=10), "sigma2"),
        (lambda: ProblemConstants(L=1, sigma2=1, f_gap=-1, lr=0.1, steps=10), "f_gap"),
        (lambda: ProblemConstants(L=1, sigma2=1, f_gap=1, lr=0.0, steps=10), "lr"),
        (lambda: ProblemConstants(L=1, sigma2=1, f_gap=1, lr=0.1, steps=0), "steps"),
        (lambda: ProblemConstants(L=1, sigma2=1, f_gap=1, lr=0.1, steps=10, kappa2=-1), "kappa2"),
        (lambda: ProblemConstants(L=float("nan"), sigma2=1, f_gap=1, lr=0.1, steps=10), "L"),
        (lambda: theorem1(C0, m=0, v=0, tau=1, zeta=0.1), "m"),
        (lambda: theorem1(C0, m=2, v=-1, tau=1, zeta=0.1), "v"),
        (lambda: theorem1(C0, m=2, v=0, tau=0, zeta=0.1), "tau"),
        (lambda: theorem1(C0, m=2, v=0, tau=1.5, zeta=0.1), "tau"),
        (lambda: theorem1(C0, m=2, v=0, tau=1, zeta=-0.1), "zeta"),
        (lambda: corollary3(C0, m=2, zeta=float("nan")), "zeta"),
        (lambda: network_error_term(0, 0.5), "tau"),
        (lambda: generalized_elastic_mixing(np.ones((2, 3)), 0.1), "W"),
        (lambda: round_cost("gossip", workers=4, params=10), "pattern"),
        (lambda: round_cost("neighbor", workers=4, params=10), "max_degree"),
        (lambda: round_cost("neighbor", workers=4, params=10, max_degree=4), "max_degree"),
        (lambda: round_cost("allreduce", workers=0, params=10), "workers"),
        (lambda: round_cost("allreduce", workers=2, params=-1), "params"),
        (lambda: round_cost("allreduce", workers=2, params=1, bytes_per_param=0), "bytes_per_param"),
        (lambda: NetworkModel(latency_s=-1), "latency_s"),
        (lambda: NetworkModel(bandwidth_Bps=0), "bandwidth_Bps"),
        (lambda: ComputeModel(distribution="weibull"), "distribution"),
        (lambda: ComputeModel(distribution="exponential", spread=1.5), "spread"),
        (lambda: ComputeModel(mean_s=-1), "mean_s"),
        (lambda: plot_network_error_heatmap("/tmp/x.txt"), "path"),
        (lambda: plot_network_error_heatmap("/tmp/x.png", zetas=[0.5, 1.0]), "zetas"),
    ],
)
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(ConfigError, match=rf"^{field}="):
        call()


# --------------------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------------------


def test_round_cost_table3():
    m, d = 8, 1000
    ar = round_cost("allreduce", workers=m, params=d)
    assert (ar.handshakes, ar.floats_sent, ar.bytes_sent) == (8, 2000.0, 8000.0)
    nb = round_cost("neighbor", workers=m, params=d, max_degree=2)
    assert (nb.handshakes, nb.floats_sent) == (2, 4000.0)
    assert round_cost("decentralized", workers=m, params=d, max_degree=2) == nb
    ps = round_cost("parameter_server", workers=m, params=d, bytes_per_param=2)
    assert (ps.handshakes, ps.floats_sent, ps.bytes_sent) == (8, 16000.0, 32000.0)
    bc = round_cost("broadcast", workers=m, params=d)
    assert (bc.handshakes, bc.floats_sent) == (3, 3000.0)
    assert round_cost("broadcast", workers=5, params=d).handshakes == 3
    none = round_cost("none", workers=m, params=d)
    assert (none.handshakes, none.bytes_sent) == (0, 0.0)
    assert round_cost("allreduce", workers=1, params=d).bytes_sent == 0.0
    assert isinstance(ar, RoundCost) and ar.pattern == "allreduce"


def test_network_model_round_time():
    net = NetworkModel(latency_s=0.002, bandwidth_Bps=1e6)
    cost = RoundCost("allreduce", handshakes=8, floats_sent=2000.0, bytes_sent=8000.0)
    assert net.round_time(cost) == pytest.approx(8 * 0.002 + 8000 / 1e6)
    n2 = NetworkModel.from_mbps(latency_ms=2.0, bandwidth_mbps=8.0)
    assert n2.latency_s == pytest.approx(0.002) and n2.bandwidth_Bps == pytest.approx(1e6)
    # sparse averaging wins when latency dominates (Table 3 discussion)
    lat = NetworkModel(latency_s=0.01, bandwidth_Bps=1e12)
    sparse = round_cost("neighbor", workers=16, params=10**6, max_degree=2)
    full = round_cost("allreduce", workers=16, params=10**6)
    assert lat.round_time(sparse) < lat.round_time(full)


@pytest.mark.parametrize(
    "dist,spread", [("exponential", 1.0), ("exponential", 0.3), ("lognormal", 0.8), ("pareto", 0.5)]
)
def test_compute_model_preserves_mean(dist, spread):
    cm = ComputeModel(mean_s=0.02, distribution=dist, spread=spread)
    x = cm.sample(np.random.default_rng(1), 400_000)
    assert x.shape == (400_000,) and np.all(x > 0)
    assert x.mean() == pytest.approx(0.02, rel=0.02)
    assert x.std() > 0


def test_compute_model_constant_and_alias():
    x = ComputeModel(mean_s=0.5).sample(np.random.default_rng(0), (3, 4))
    assert x.shape == (3, 4) and np.all(x == 0.5)
    assert ComputeModel(distribution="straggler", spread=0.5).distribution == "pareto"
    assert np.all(
        ComputeModel(distribution="lognormal", spread=0.0).sample(np.random.default_rng(0), 5) == 0.01
    )


def _runtime(**kw):
    base = dict(
        steps=100,
        tau=5,
        workers=4,
        cost=RoundCost("x", handshakes=2, floats_sent=0.0, bytes_sent=1000.0),
        network=NetworkModel(latency_s=0.01, bandwidth_Bps=1e5),  # comm = 0.03 s
        compute=ComputeModel(mean_s=0.002),
    )
    base.update(kw)
    return expected_runtime(**base)


def test_expected_runtime_constant_blocking_exact():
    r = _runtime()
    rounds, comm, tmu = 20, 0.03, 5 * 0.002
    assert r["total_s"] == pytest.approx(rounds * (tmu + comm), rel=1e-12)
    assert r["communication_s"] == pytest.approx(rounds * comm)
    assert r["compute_s"] == pytest.approx(100 * 0.002)
    assert r["idle_s"] == pytest.approx(0.0, abs=1e-12)
    assert r["per_step_s"] == pytest.approx(r["total_s"] / 100)
    assert r["rounds"] == 20


@pytest.mark.parametrize("mean_s", [0.002, 0.02])  # comm > tau*mu and comm < tau*mu
def test_expected_runtime_constant_overlap_exact(mean_s):
    r = _runtime(compute=ComputeModel(mean_s=mean_s), overlap=True)
    rounds, comm, tmu = 20, 0.03, 5 * mean_s
    # first round's compute and last round's communication are never hidden
    assert r["total_s"] == pytest.approx(tmu + (rounds - 1) * max(tmu, comm) + comm, rel=1e-12)
    blocking = _runtime(compute=ComputeModel(mean_s=mean_s))
    assert r["total_s"] < blocking["total_s"]


def test_expected_runtime_partial_round_has_no_communication():
    r = _runtime(steps=103)
    assert r["rounds"] == 20
    assert r["total_s"] == pytest.approx(20 * (0.01 + 0.03) + 3 * 0.002)


def test_expected_runtime_stragglers_increase_idle():
    const = _runtime()
    strag = _runtime(compute=ComputeModel(mean_s=0.002, distribution="pareto", spread=0.8), trials=100)
    assert const["idle_s"] == pytest.approx(0.0, abs=1e-12)
    assert strag["idle_s"] > 0.1 * strag["compute_s"]
    assert strag["total_s"] > const["total_s"]
    for r in (const, strag):
        assert r["total_s"] == pytest.approx(r["compute_s"] + r["idle_s"] + r["communication_s"])
    more = _runtime(
        compute=ComputeModel(mean_s=0.002, distribution="pareto", spread=0.8), trials=100, workers=16
    )
    assert more["idle_s"] > strag["idle_s"]  # the slowest of more workers is slower
    # reproducible with a seed
    again = _runtime(compute=ComputeModel(mean_s=0.002, distribution="pareto", spread=0.8), trials=100)
    assert again == strag


def test_expected_runtime_overlap_hides_communication_with_noise():
    cm = ComputeModel(mean_s=0.01, distribution="exponential", spread=1.0)
    b = _runtime(compute=cm, trials=50)
    o = _runtime(compute=cm, trials=50, overlap=True)
    assert o["total_s"] < b["total_s"]
    assert o["communication_s"] < b["communication_s"]
    assert o["total_s"] == pytest.approx(o["compute_s"] + o["idle_s"] + o["communication_s"])


def test_expected_runtime_bad_arguments():
    with pytest.raises(ConfigError, match="^cost="):
        _runtime(cost="allreduce")
    with pytest.raises(ConfigError, match="^steps="):
        _runtime(steps=0)
    with pytest.raises(ConfigError, match="^trials="):
        _runtime(trials=0)


# --------------------------------------------------------------------------------------------------------
# heat map
# --------------------------------------------------------------------------------------------------------


def test_heatmap_writes_png(tmp_path, saved_figures, check_png):
    out = tmp_path / "sub" / "fig3a.png"
    got = plot_network_error_heatmap(out, circled=[(1, 0.0), (10, 0.75, "B")])
    assert got == out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_png(out, size=(1024, 768))  # 6.4 x 4.8 in at 160 dpi
    ax = saved_figures[0].axes[0]
    np.testing.assert_array_equal(np.asarray(ax.collections[0].get_array()).reshape(20, 20),
                                  network_error_grid(range(1, 21), np.linspace(0, 0.95, 20)))
    assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines] == [(1, 0.0), (10, 0.75)]
    assert [(t.get_text(), tuple(t.xy)) for t in ax.texts] == [("\u03c4=1, \u03b6=0", (1, 0)), ("B", (10, 0.75))]
    svg = plot_network_error_heatmap(tmp_path / "fig.svg", taus=[1, 2, 4], zetas=[0, 0.5], log=False)
    assert svg.read_text().lstrip().startswith("<?xml")
    ax = saved_figures[1].axes[0]
    assert not ax.lines and ax.collections[0].norm.__class__.__name__ == "Normalize"
    np.testing.assert_allclose(np.asarray(ax.collections[0].get_array()).reshape(2, 3),
                               [[0, 1, 3], [5 / 3 - 1, 10 / 3 - 1, 20 / 3 - 1]], rtol=1e-12)  # (1+z^2)/(1-z^2) tau - 1


def test_heatmap_failed_write_keeps_the_earlier_figure(tmp_path, monkeypatch):
    import errno
    import os

    out = plot_network_error_heatmap(tmp_path / "fig3a.png", taus=[1, 2], zetas=[0, 0.5])
    before = out.read_bytes()

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError) as info:
        plot_network_error_heatmap(out, taus=[1, 2, 4], zetas=[0, 0.9])
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig3a.png"]  # no temporary file left


def test_grid_values():
    g = network_error_grid([1, 2], [0.0, 0.5])
    np.testing.assert_allclose(g, [[0.0, 1.0], [5 / 3 - 1, 10 / 3 - 1]])


@pytest.mark.slow
def test_no_torch_import():
    # torch may be loaded by other tests in the same session, so check the sources and a fresh interpreter
    import inspect
    import subprocess

    import coopsgd.theory.bounds as b
    import coopsgd.theory.cost as c
    import coopsgd.theory.heatmap as h

    for mod in (b, c, h):
        assert "import torch" not in inspect.getsource(mod)
    code = "import sys, coopsgd.theory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_bound_report_is_frozen():
    r = theorem1(C0, m=2, v=0, tau=1, zeta=0.0)
    assert isinstance(r, BoundReport)
    with pytest.raises(AttributeError):
        r.total = 0.0  # type: ignore[misc]
