"""Every preset run by the reference engine equals the same algorithm written out by hand.

The hand-written loops use the objective's gradient with the same per-worker generators
(``default_rng([seed, i])``) so that noisy gradients coincide draw for draw.
"""

from __future__ import annotations

import numpy as np
import pytest

from coopsgd.algorithms import presets
from coopsgd.algorithms.schedules import CallableSchedule
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.reference import ReferenceEngine, run_reference
from coopsgd.objectives import Quadratic
from coopsgd.topology import mixing_matrix

SEED = 3
LR = 0.05
TOL = 1e-12


def _problem(m: int, sigma: float = 0.5, het: float = 1.0) -> Quadratic:
    return Quadratic(dim=6, workers=m, L=2.0, mu=0.2, sigma=sigma, heterogeneity=het, seed=11)


def _rngs(m: int) -> list[np.random.Generator]:
    return [np.random.default_rng([SEED, i]) for i in range(m)]


def _engine_run(spec: AlgorithmSpec, obj: Quadratic, x0: np.ndarray, steps: int) -> ReferenceEngine:
    eng = ReferenceEngine(spec, obj, x0, seed=SEED)
    for _ in eng.steps(steps, LR):
        pass
    return eng


def _x0(m: int, d: int = 6) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((m, d))


def test_sync_equals_sgd_on_averaged_gradient() -> None:
    m, K = 4, 15
    obj = _problem(m)
    x = _x0(m).mean(axis=0)
    eng = _engine_run(presets.sync(m), obj, x, K)
    rngs = _rngs(m)
    for _ in range(K):
        g = np.mean([obj.gradient(x, i, rngs[i]) for i in range(m)], axis=0)
        x = x - LR * g
    np.testing.assert_allclose(eng.state, np.tile(x, (m, 1)), rtol=0, atol=TOL)


@pytest.mark.parametrize("tau", [1, 3])
@pytest.mark.parametrize("nonblocking", [False, True])
def test_easgd_equals_handwritten_elastic_update(tau: int, nonblocking: bool) -> None:
    m, K, alpha = 4, 13, 0.15
    obj = _problem(m)
    x0 = _x0(m)
    eng = _engine_run(presets.easgd(m, tau, alpha=alpha, nonblocking=nonblocking), obj, x0, K)
    x = x0.copy()
    z = x0.mean(axis=0)
    rngs = _rngs(m)
    for k in range(K):
        g = np.stack([obj.gradient(x[i], i, rngs[i]) for i in range(m)])
        if (k + 1) % tau == 0:
            z_new = (1 - m * alpha) * z + m * alpha * x.mean(axis=0)
            x = x - LR * g - alpha * (x - z)
            z = z_new
        else:
            x = x - LR * g
    np.testing.assert_allclose(eng.state[:m], x, rtol=0, atol=TOL)
    np.testing.assert_allclose(eng.state[m], z, rtol=0, atol=TOL)


def test_nonblocking_easgd_iterates_equal_blocking() -> None:
    m, K = 6, 40
    obj = _problem(m)
    x0 = _x0(m)
    a = _engine_run(presets.easgd(m, 4), obj, x0, K).state
    b = _engine_run(presets.easgd(m, 4, nonblocking=True), obj, x0, K).state
    assert np.array_equal(a, b)


def test_local_sgd_with_warmup_equals_handwritten() -> None:
    m, K, tau, warm = 3, 17, 4, 3
    obj = _problem(m)
    x0 = _x0(m)
    eng = _engine_run(presets.local_sgd(m, tau, warmup_steps=warm), obj, x0, K)
    x = x0.copy()
    rngs = _rngs(m)
    for k in range(K):
        x = x - LR * np.stack([obj.gradient(x[i], i, rngs[i]) for i in range(m)])
        if k < warm or (k - warm + 1) % tau == 0:
            x = np.tile(x.mean(axis=0), (m, 1))
    np.testing.assert_allclose(eng.state, x, rtol=0, atol=TOL)
    assert eng.rounds == warm + (K - warm) // tau


@pytest.mark.parametrize("tau", [1, 3])
def test_dpsgd_and_periodic_equal_handwritten_neighbour_average(tau: int) -> None:
    m, K = 6, 12
    obj = _problem(m)
    x0 = _x0(m)
    W = mixing_matrix("ring", m, "metropolis").matrix
    spec = presets.dpsgd(m) if tau == 1 else presets.decentralized_periodic(m, tau)
    eng = _engine_run(spec, obj, x0, K)
    x = x0.copy()
    rngs = _rngs(m)
    for k in range(K):
        y = x - LR * np.stack([obj.gradient(x[i], i, rngs[i]) for i in range(m)])
        if (k + 1) % tau == 0:
            # node i averages its neighbours: x_i = sum_j W_ij y_j (W symmetric)
            y = np.stack([sum(W[i, j] * y[j] for j in range(m)) for i in range(m)])
        x = y
    np.testing.assert_allclose(eng.state, x, rtol=0, atol=TOL)


def test_generalized_elastic_equals_handwritten() -> None:
    m, K = 6, 9
    obj = _problem(m)
    x0 = _x0(m)
    spec = presets.generalized_elastic(m, topology="ring")
    alpha = spec.params["alpha"]
    W = mixing_matrix("ring", m, "metropolis").matrix
    eng = _engine_run(spec, obj, x0, K)
    x, z = x0.copy(), x0.mean(axis=0)
    rngs = _rngs(m)
    for _ in range(K):
        g = np.stack([obj.gradient(x[i], i, rngs[i]) for i in range(m)])
        z_new = alpha * x.sum(axis=0) + (1 - m * alpha) * z
        x = (1 - alpha) * (W.T @ x) + alpha * z - LR * g
        z = z_new
    np.testing.assert_allclose(eng.state[:m], x, rtol=0, atol=TOL)
    np.testing.assert_allclose(eng.state[m], z, rtol=0, atol=TOL)
    assert alpha == pytest.approx((1 + spec.params["zeta_W"]) / (m + 1 + spec.params["zeta_W"]))


def _lsgd_by_hand(obj, x0, K, tau, lam, groups=1, lam_g=None):
    m = x0.shape[0]
    lam_g = lam if lam_g is None else lam_g
    size = m // groups
    x = x0.copy()
    rngs = _rngs(m)
    z_loc = np.zeros((groups, x.shape[1]))
    z_glob = np.zeros(x.shape[1])
    loc_leader = [0] * groups
    glob_leader = 0
    for k in range(K):
        if k % tau == 0:
            f = np.array([obj.value(xi) for xi in x])
            for g in range(groups):
                idx = np.arange(g * size, (g + 1) * size)
                loc_leader[g] = int(idx[np.argmin(f[idx])])
                z_loc[g] = x[loc_leader[g]]
            glob_leader = int(np.argmin(f))
            z_glob = x[glob_leader].copy()
        g_all = np.stack([obj.gradient(x[i], i, rngs[i]) for i in range(m)])
        new = np.empty_like(x)
        for i in range(m):
            grp = i // size
            d = g_all[i].copy()
            if i != loc_leader[grp]:
                d += lam * (x[i] - z_loc[grp])
            if groups > 1 and i != glob_leader:
                d += lam_g * (x[i] - z_glob)
            new[i] = x[i] - LR * d
        x = new
    return x


@pytest.mark.parametrize("tau", [1, 4])
def test_lsgd_equals_pull_toward_leader(tau: int) -> None:
    m, K, lam = 4, 14, 0.3
    obj = _problem(m)
    x0 = 2 * _x0(m)
    eng = _engine_run(presets.lsgd(m, tau, lam=lam), obj, x0, K)
    x = _lsgd_by_hand(obj, x0, K, tau, lam)
    np.testing.assert_allclose(eng.state[:m], x, rtol=0, atol=TOL)


def test_multilevel_lsgd_equals_handwritten() -> None:
    m, K, lam, lam_g = 6, 10, 0.3, 0.1
    obj = _problem(m)
    x0 = 2 * _x0(m)
    eng = _engine_run(presets.lsgd(m, 2, lam=lam, groups=2, lam_global=lam_g), obj, x0, K)
    x = _lsgd_by_hand(obj, x0, K, 2, lam, groups=2, lam_g=lam_g)
    np.testing.assert_allclose(eng.state[:m], x, rtol=0, atol=TOL)


def test_fedavg_full_participation_equals_local_sgd() -> None:
    m, K, tau = 4, 12, 3
    obj = _problem(m)
    x0 = _x0(m).mean(axis=0)
    a = _engine_run(presets.fedavg(m, tau), obj, x0, K)
    b = _engine_run(presets.local_sgd(m, tau), obj, x0, K)
    np.testing.assert_allclose(a.state[:m], b.state, rtol=0, atol=TOL)
    np.testing.assert_allclose(a.state[m], b.state.mean(axis=0), rtol=0, atol=TOL)


def test_fedavg_client_sampling_equals_handwritten() -> None:
    m, K, tau = 6, 12, 3
    counts = np.array([10.0, 20, 30, 40, 50, 60])
    obj = _problem(m)
    x0 = _x0(m).mean(axis=0)
    spec = presets.fedavg(m, tau, fraction=0.5, sample_counts=counts, seed=5)
    eng = _engine_run(spec, obj, x0, K)
    server = x0.copy()
    rngs = _rngs(m)
    for r in range(K // tau):
        chosen = spec.schedule.clients(r)
        assert len(chosen) == 3
        models = []
        for i in chosen:
            x = server.copy()
            for _ in range(tau):
                x = x - LR * obj.gradient(x, i, rngs[i])
            models.append(x)
        w = counts[chosen] / counts[chosen].sum()
        server = sum(wi * xi for wi, xi in zip(w, models, strict=False))
    np.testing.assert_allclose(eng.state[m], server, rtol=0, atol=TOL)
    np.testing.assert_allclose(eng.state[:m], np.tile(server, (m, 1)), rtol=0, atol=TOL)
    # different rounds sample different clients
    assert len({tuple(spec.schedule.clients(r)) for r in range(10)}) > 1


def test_downpour_equals_sequential_push_pull() -> None:
    m, K, tau = 3, 9, 3
    obj = _problem(m)
    x0 = _x0(m).mean(axis=0)
    spec = presets.downpour(m, tau, seed=2)
    eng = _engine_run(spec, obj, x0, K)
    z = x0.copy()
    x = np.tile(x0, (m, 1))
    base = x.copy()
    rngs = _rngs(m)
    for k in range(K):
        x = x - LR * np.stack([obj.gradient(x[i], i, rngs[i]) for i in range(m)])
        if (k + 1) % tau == 0:
            for i in spec.schedule.order(k // tau):
                z = z + (x[i] - base[i])
                x[i] = z
                base[i] = z
    np.testing.assert_allclose(eng.state[m], z, rtol=0, atol=TOL)
    np.testing.assert_allclose(eng.state[:m], x, rtol=0, atol=TOL)


def test_hierarchical_equals_handwritten_two_levels() -> None:
    m, K, tau, q, groups, alpha = 4, 12, 2, 2, 2, 0.3
    obj = _problem(m)
    x0 = _x0(m)
    spec = presets.hierarchical(m, tau, groups=groups, q=q, alpha=alpha)
    eng = _engine_run(spec, obj, x0, K)
    x = x0.copy()
    z = np.tile(x0.mean(axis=0), (groups, 1))
    rngs = _rngs(m)
    s = m // groups
    for k in range(K):
        g = np.stack([obj.gradient(x[i], i, rngs[i]) for i in range(m)])
        if (k + 1) % tau == 0:
            z_new = z.copy()
            for gi in range(groups):
                idx = slice(gi * s, (gi + 1) * s)
                z_new[gi] = (1 - s * alpha) * z[gi] + alpha * x[idx].sum(axis=0)
                x[idx] = (1 - alpha) * x[idx] + alpha * z[gi]
            z = z_new
            if (k + 1) % (q * tau) == 0:
                z = np.tile(z.mean(axis=0), (groups, 1))
        x = x - LR * g
    np.testing.assert_allclose(eng.state[:m], x, rtol=0, atol=TOL)
    np.testing.assert_allclose(eng.state[m:], z, rtol=0, atol=TOL)


def test_column_convention_with_non_symmetric_matrix() -> None:
    """Column i of S holds node i's in-weights: x_i <- sum_j S[j, i] x_j."""
    m = 3
    S = np.array([[0.5, 0.0, 0.2], [0.5, 1.0, 0.3], [0.0, 0.0, 0.5]])  # columns sum to 1, rows do not
    sched = CallableSchedule(m, lambda k, ctx: S)
    spec = AlgorithmSpec(name="custom", workers=m, auxiliaries=0, tau=1, schedule=sched, rule="pre_mix")
    obj = Quadratic(dim=2, workers=m, sigma=0.0)
    x0 = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    eng = ReferenceEngine(spec, obj, x0)
    G = np.stack([obj.gradient(x0[i], i, eng.rngs[i]) for i in range(m)])
    eng.step(None, 0.1)
    expected = np.stack([sum(S[j, i] * x0[j] for j in range(m)) for i in range(m)]) - 0.1 * G
    np.testing.assert_allclose(eng.state, expected, rtol=0, atol=1e-15)
    # the transpose would give a different answer, so the test pins the convention
    wrong = S @ x0 - 0.1 * G
    assert not np.allclose(eng.state, wrong)


def test_run_reference_records_and_consensus() -> None:
    m = 4
    obj = _problem(m, sigma=0.0, het=0.0)
    res = run_reference(presets.local_sgd(m, 5), obj, steps=20, lr=0.1, x0=_x0(m), record_every=5)
    assert list(res.steps) == [0, 5, 10, 15, 20]
    # right after each averaging round all workers agree
    assert np.all(res.consensus[1:] < 1e-20)
    assert res.consensus[0] > 0
    assert list(res.rounds) == [0, 1, 2, 3, 4]
    # gradient descent on a convex quadratic decreases the objective
    assert np.all(np.diff(res.average_objective) < 0)
