"""The simulator equals the reference engine (float64) for the asynchronous presets: FedBuff with a client
population larger than its concurrency and staleness weights, asynchronous local SGD with delayed Nesterov and
dynamic local updates, both over speed classes (the arrival order from the clock's speeds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms.asynchronous import async_local_sgd, fedbuff
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.clock import SimClock
from coopsgd.theory.cost import ComputeModel

D, N, B, LR, STEPS = 5, 40, 6, 0.05, 30


class LeastSquares:
    """``mean_n (a_n^T x - y_n)^2``; worker i's k-th gradient uses its k-th deterministic batch (a call counter)."""

    def __init__(self, workers: int) -> None:
        rng = np.random.default_rng(7)
        self.dim = D
        self.A = rng.standard_normal((N, D))
        self.y = self.A @ rng.standard_normal(D) + 0.3 * rng.standard_normal(N)
        self.calls = [0] * workers

    def idx(self, worker: int, k: int) -> np.ndarray:
        return np.random.default_rng([7, worker, k]).choice(N, size=B, replace=False)

    def value(self, x: np.ndarray) -> np.ndarray | float:
        r = np.atleast_2d(x) @ self.A.T - self.y
        v = np.mean(r * r, axis=1)
        return float(v[0]) if np.ndim(x) == 1 else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        i = self.idx(worker, self.calls[worker])
        self.calls[worker] += 1
        Ab = self.A[i]
        return 2.0 / B * Ab.T @ (Ab @ x - self.y[i])

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(D)


SPEEDS = (1.0, 0.5, 0.25)
CASES = {
    "fedbuff": lambda: fedbuff(6, 3, buffer_size=2, concurrency=4, outer_lr=0.8, staleness="poly",
                               staleness_exponent=0.6, seed=3, speeds=SPEEDS, arrival_time=0.75),
    "async_local_sgd": lambda: async_local_sgd(6, 4, outer_lr=0.6, outer_momentum=0.9, delayed_nesterov=3,
                                               dynamic_local_updates=True, speeds=SPEEDS, arrival_time=0.5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_simulator_equals_reference(name: str) -> None:
    spec: AlgorithmSpec = CASES[name]()
    m = spec.workers
    obj = LeastSquares(m)
    x0 = np.random.default_rng(1).standard_normal(D)
    ref = ReferenceEngine(spec, obj, x0)
    sim = Simulator(CASES[name](), lambda: nn.Linear(D, 1, bias=False), loss_fn=F.mse_loss, dtype=torch.float64,
                    executor="loop", optimizer="sgd", init_params=torch.from_numpy(x0),
                    clock=SimClock(compute=ComputeModel(mean_s=0.01), speeds=SPEEDS))
    counts = [0] * m
    arrivals = 0
    for k in range(STEPS):
        mask = sim.spec.schedule.active(k)
        batches = []
        for i in range(m):
            if mask is None or mask[i]:
                j = obj.idx(i, counts[i])
                counts[i] += 1
                batches.append((torch.from_numpy(obj.A[j]), torch.from_numpy(obj.y[j, None])))
            else:
                batches.append(None)
        s1 = sim.step(batches, LR)
        s2 = ref.step(None, LR)
        assert s1.info == s2.info and s1.communicated == s2.communicated
        arrivals += len(s1.info["arrivals"])
        np.testing.assert_allclose(sim.params.numpy(), ref.state, rtol=0, atol=1e-11)
    assert arrivals >= 10
    assert sim.async_record() == ref._async.stats()  # type: ignore[union-attr]
