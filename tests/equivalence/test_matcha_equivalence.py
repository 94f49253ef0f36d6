"""MATCHA: the simulator equals the reference engine, and both equal MATCHA's update written by hand.

Same set-up as ``test_simulator_vs_reference.py``: least squares through ``nn.Linear(d, 1, bias=False)``
and the MSE loss in float64; worker i's k-th gradient uses its k-th deterministic mini-batch in every
engine. The hand-written update draws each round's active matchings from ``default_rng([seed, round])``
with the design's probabilities and averages along every active edge with weight alpha:
``x_a <- x_a - alpha sum_{b: (a, b) active} (x_a - x_b)``, after the local step (post-mix rule).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.theory.matcha import matching_decomposition
from coopsgd.topology import graphs

D = 5
N = 40
B = 6
K = 14
LR = 0.05
TOL = 1e-10


class BatchLeastSquares:
    """``F(x) = mean_n (a_n^T x - y_n)^2``; worker i's k-th gradient uses its k-th deterministic batch."""

    def __init__(self, workers: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = D
        self.A = rng.standard_normal((N, D))
        self.y = self.A @ rng.standard_normal(D) + 0.3 * rng.standard_normal(N)
        self.calls = [0] * workers
        self.seed = seed

    def batch_indices(self, worker: int, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, worker, k]).choice(N, size=B, replace=False)

    def torch_batch(self, worker: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.batch_indices(worker, k)
        return torch.from_numpy(self.A[idx]), torch.from_numpy(self.y[idx, None])

    def batch_gradient(self, x: np.ndarray, worker: int, k: int) -> np.ndarray:
        idx = self.batch_indices(worker, k)
        Ab = self.A[idx]
        return 2.0 / B * Ab.T @ (Ab @ x - self.y[idx])

    def value(self, x: np.ndarray) -> np.ndarray | float:
        r = np.atleast_2d(x) @ self.A.T - self.y
        v = np.mean(r * r, axis=1)
        return float(v[0]) if np.ndim(x) == 1 else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        g = self.batch_gradient(x, worker, self.calls[worker])
        self.calls[worker] += 1
        return g

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(D)


def _linear() -> nn.Module:
    return nn.Linear(D, 1, bias=False)


CASES: dict[str, tuple[Callable[[], AlgorithmSpec], Callable[[int], np.ndarray]]] = {
    # name: (spec, base graph of m nodes for the hand-written update)
    "ring6": (lambda: presets.matcha(6, budget=0.5, seed=1), graphs.ring),
    "ring7_low_budget": (lambda: presets.matcha(7, budget=0.2, seed=3), graphs.ring),
    "torus9_tau2": (lambda: presets.matcha(9, 2, topology="torus", budget=0.4, seed=2), graphs.torus),
    "complete5_full": (lambda: presets.matcha(5, topology="complete", budget=1.0), graphs.complete),
    "random8": (lambda: presets.matcha(8, topology="random", budget=0.6, seed=4),
                lambda m: graphs.erdos_renyi(m, 0.5, 4)),
}


def _run_simulator(spec: AlgorithmSpec, executor: str, steps: int = K) -> tuple[Simulator, np.ndarray, list]:
    """The simulator after ``steps`` steps, its initial parameters and its step stats."""
    obj = BatchLeastSquares(spec.workers)
    sim = Simulator(spec, _linear, loss_fn=F.mse_loss, dtype=torch.float64, executor=executor, seed=4)
    x0 = sim.params[0].numpy().copy()
    stats = []
    for k in range(steps):
        stats.append(sim.step([obj.torch_batch(i, k) for i in range(spec.workers)], LR))
    return sim, x0, stats


def _hand_written(spec: AlgorithmSpec, adjacency: np.ndarray, x0: np.ndarray, steps: int = K) -> tuple[np.ndarray, int]:
    """MATCHA by hand: local SGD steps, then pairwise averaging along the active matchings' edges."""
    m = spec.workers
    sched = spec.schedule
    p, alpha, seed, tau = sched.probabilities, sched.alpha, spec.params["seed"], spec.tau
    matchings = matching_decomposition(adjacency)
    obj = BatchLeastSquares(m)
    X = np.tile(x0, (m, 1))
    rounds = 0
    for k in range(steps):
        X = X - LR * np.stack([obj.batch_gradient(X[i], i, k) for i in range(m)])
        if (k + 1) % tau:
            continue
        active = np.random.default_rng([seed, k // tau]).random(len(matchings)) < p
        if not active.any():
            continue
        rounds += 1
        new = X.copy()
        for j in np.flatnonzero(active):
            for a, b in matchings[j]:
                new[a] -= alpha * (X[a] - X[b])
                new[b] -= alpha * (X[b] - X[a])
        X = new
    return X, rounds


@pytest.mark.parametrize("executor", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(CASES))
def test_simulator_equals_reference(name: str, executor: str) -> None:
    make, _ = CASES[name]
    spec_ref, spec_sim = make(), make()
    m = spec_ref.workers
    obj_ref = BatchLeastSquares(m)
    sim, x0, sim_stats = _run_simulator(spec_sim, executor)
    eng = ReferenceEngine(spec_ref, obj_ref, x0)
    for k in range(K):
        ref = eng.step(None, LR)
        st = sim_stats[k]
        assert st.step == ref.step == k
        assert st.communicated == ref.communicated
        assert st.round == ref.round
        assert st.pattern == ref.pattern
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    np.testing.assert_allclose(sim.average_params().numpy(), eng.average(), rtol=0, atol=TOL)
    assert sim.rounds == eng.rounds
    assert eng.rounds > 0
    # budget 1 on the complete graph: alpha = 1/m and W = I - L/m = J, exact averaging every round
    assert np.allclose(eng.state[0], eng.state[1]) == (name == "complete5_full")


@pytest.mark.parametrize("name", list(CASES))
def test_matcha_equals_hand_written_update(name: str) -> None:
    make, graph = CASES[name]
    spec = make()
    sim, x0, _ = _run_simulator(make(), "loop")
    expected, rounds = _hand_written(spec, graph(spec.workers), x0)
    np.testing.assert_allclose(sim.params.numpy(), expected, rtol=0, atol=TOL)
    assert sim.rounds == rounds > 0
    eng = ReferenceEngine(make(), BatchLeastSquares(spec.workers), x0)
    for _ in range(K):
        eng.step(None, LR)
    np.testing.assert_allclose(eng.state, expected, rtol=0, atol=TOL)


def test_budget_one_equals_dpsgd_with_the_laplacian_matrix() -> None:
    m = 6
    matcha = presets.matcha(m, budget=1.0)
    A = graphs.ring(m).astype(float)
    W = np.eye(m) - matcha.schedule.alpha * (np.diag(A.sum(axis=1)) - A)
    dpsgd = presets.dpsgd(m, mixing=W)
    x0 = np.random.default_rng(0).standard_normal(D)
    a = ReferenceEngine(matcha, BatchLeastSquares(m), x0)
    b = ReferenceEngine(dpsgd, BatchLeastSquares(m), x0)
    for _ in range(K):
        sa, sb = a.step(None, LR), b.step(None, LR)
        assert sa.communicated and sb.communicated and sa.pattern == sb.pattern == "neighbor"
    np.testing.assert_allclose(a.state, b.state, rtol=0, atol=1e-13)
