"""Analytic objectives: gradients against finite differences, known minima, learning on digits."""

from __future__ import annotations

import numpy as np
import pytest

from coopsgd.algorithms import presets
from coopsgd.analysis import analyze, spec_round_cost
from coopsgd.engines import NonFiniteError, run_reference
from coopsgd.errors import ConfigError
from coopsgd.objectives import LogisticRegression, MatrixCompletion, Quadratic, SincToy, make_objective
from coopsgd.theory.cost import ComputeModel, NetworkModel, expected_runtime


def _fd_check(obj, x: np.ndarray, worker: int = 0, eps: float = 1e-6, n: int = 6) -> None:
    """Worker gradients average to the gradient of F (exact objectives: finite differences of value)."""
    rng = np.random.default_rng(0)
    workers = getattr(obj, "workers", 1)
    g = np.mean([obj.gradient(x, i, rng) for i in range(workers)], axis=0)
    for j in rng.choice(x.size, size=min(n, x.size), replace=False):
        e = np.zeros_like(x)
        e[j] = eps
        fd = (obj.value(x + e) - obj.value(x - e)) / (2 * eps)
        assert g[j] == pytest.approx(fd, rel=1e-5, abs=1e-7)


def test_quadratic_gradient_and_minimum() -> None:
    q = Quadratic(dim=5, workers=3, heterogeneity=2.0, seed=1)
    _fd_check(q, np.random.default_rng(1).standard_normal(5))
    assert q.value(q.b_mean) == pytest.approx(q.minimum)
    assert q.value(q.b_mean + 0.1) > q.minimum
    assert np.allclose(np.linalg.eigvalsh(q.A)[[0, -1]], [q.mu, q.L])


def test_sinc_toy_gradient_and_global_minimum() -> None:
    s = SincToy()
    for x in ([1.0, 0.5], [-6.0, -4.0], [17.0, 8.0]):
        _fd_check(s, np.array(x))
    r = np.linspace(1.2, 1.7, 20001)
    k = np.argmin(np.sinc(r))
    assert s.value(np.array([r[k], 0.0])) == pytest.approx(-0.2172, abs=1e-4)
    assert np.allclose(s.gradient(np.zeros(2), 0, None), 0.0)


def test_matrix_completion_value_and_gradient() -> None:
    mc = MatrixCompletion(30, 3, seed=2)
    X = np.random.default_rng(3).standard_normal(mc.dim)
    M = mc.U @ mc.U.T
    Xm = X.reshape(30, 3)
    assert mc.value(X) == pytest.approx(0.25 * np.sum((M - Xm @ Xm.T) ** 2))
    _fd_check(mc, X)
    # exactly zero at the factor (and at any rotation of it)
    Q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((3, 3)))
    assert mc.value((mc.U @ Q).reshape(-1)) == pytest.approx(0.0, abs=1e-20)


def test_logistic_gradient_and_learning() -> None:
    # one worker: its full-shard gradient is the gradient of F (4 unequal shards would weight samples unequally)
    lr = LogisticRegression(workers=1, batch_size=None, seed=0)
    _fd_check(lr, 0.1 * np.random.default_rng(5).standard_normal(lr.dim))
    stoch = LogisticRegression(workers=4, batch_size=16, seed=0)
    res = run_reference(presets.local_sgd(4, 4), stoch, steps=300, lr=0.3, seed=0)
    spec = res.spec
    acc = stoch.accuracy(res.final_state[: spec.workers].mean(axis=0))
    assert acc > 0.9
    assert res.center_objective[-1] < 0.5 * res.center_objective[0]


def test_divergence_is_reported_with_worker_and_step() -> None:
    q = Quadratic(dim=3, workers=2, L=1.0, mu=0.5)
    with pytest.raises(NonFiniteError, match=r"worker \d+ at step \d+"):
        run_reference(presets.local_sgd(2, 1), q, steps=5000, lr=5.0)


def test_nonblocking_easgd_saves_time_in_the_cost_model() -> None:
    m, d, steps = 8, 1_000_000, 400
    blocking, nonblocking = presets.easgd(m, 4), presets.easgd(m, 4, nonblocking=True)
    net = NetworkModel.from_mbps(1.0, 100.0)
    comp = ComputeModel(mean_s=0.02)
    times = []
    for spec in (blocking, nonblocking):
        rc = spec_round_cost(spec, d)
        times.append(expected_runtime(steps=steps, tau=spec.tau, workers=m, cost=rc, network=net, compute=comp,
                                      overlap=spec.overlap, trials=1)["total_s"])
    assert times[1] < times[0]
    # with communication (0.17 s) longer than tau local steps (0.08 s) the saving is tau*mu per round
    rounds = steps // 4
    assert times[0] - times[1] == pytest.approx((rounds - 1) * 4 * 0.02, rel=1e-9)


def test_analyze_reports_theory_for_each_preset() -> None:
    for name in presets.PRESETS:
        out = analyze(presets.make_preset(name, 8))
        assert out["communication_per_round"]["bytes"] >= 0
        if out["zeta"] is None:
            assert out["notes"], name  # the user is told why the theorems do not apply


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"name": "rosenbrock"}, "objective"),
        ({"name": "quadratic", "dim": 0}, "dim"),
        ({"name": "quadratic", "mu": 2.0, "L": 1.0}, "mu"),
        ({"name": "quadratic", "colour": 1}, "colour"),
        ({"name": "logistic", "workers": 100000}, "workers"),
        ({"name": "logistic", "workers": 8, "batch_size": 1000}, "batch_size"),
        ({"name": "matrix_completion", "rank": 0}, "rank"),
        ({"name": "sinc", "sigma": -1.0}, "sigma"),
    ],
)
def test_bad_objective_arguments(kwargs, field) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ConfigError, match=field):
        make_objective(name, **kwargs)
