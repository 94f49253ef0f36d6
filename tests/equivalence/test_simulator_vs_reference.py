"""The simulator equals the reference engine (the ground truth) for every preset, in float64.

Model: ``nn.Linear(d, 1, bias=False)`` with the MSE loss, i.e. least squares. The reference engine sees
the same problem through :class:`BatchLeastSquares`, an Objective whose ``gradient(x, worker, rng)`` uses
worker i's k-th mini-batch (a per-worker call counter) -- exactly the batch the simulator gets in the
step where worker i computes its k-th gradient. LSGD elects its leader from the full-data loss in both
engines (``loss_estimate="probe"`` with the full data as the probe batch).

Also: momentum / Nesterov / weight decay and every optimizer-state policy against ``torch.optim.SGD`` run
by hand on m separate modules.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.spec import AlgorithmSpec, Policies
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.topology import mixing_schedule

D = 5
N = 40
B = 6
K = 12
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

    def value(self, x: np.ndarray) -> np.ndarray | float:
        r = np.atleast_2d(x) @ self.A.T - self.y
        v = np.mean(r * r, axis=1)
        return float(v[0]) if np.ndim(x) == 1 else v

    def gradient(self, x: np.ndarray, worker: int, rng: np.random.Generator) -> np.ndarray:
        idx = self.batch_indices(worker, self.calls[worker])
        self.calls[worker] += 1
        Ab = self.A[idx]
        return 2.0 / B * Ab.T @ (Ab @ x - self.y[idx])

    def initial_point(self, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(D)


def _linear() -> nn.Module:
    return nn.Linear(D, 1, bias=False)


def _simulator(spec: AlgorithmSpec, obj: BatchLeastSquares, executor: str, **kw) -> Simulator:
    probe = (torch.from_numpy(obj.A), torch.from_numpy(obj.y[:, None]))
    return Simulator(
        spec, _linear, loss_fn=F.mse_loss, dtype=torch.float64, executor=executor, seed=4,
        loss_estimate="probe", probe_batch=probe, **kw,
    )


def _feed(sim: Simulator, obj: BatchLeastSquares, counters: list[int], lr: float = LR):
    """One simulator step with each active worker's next batch (inactive workers get None)."""
    m = sim.m
    mask = sim.spec.schedule.active(sim.step_count)
    batches = []
    for i in range(m):
        if mask is None or mask[i]:
            batches.append(obj.torch_batch(i, counters[i]))
            counters[i] += 1
        else:
            batches.append(None)
    return sim.step(batches, lr)


PRESETS: dict[str, Callable[[], AlgorithmSpec]] = {
    "sync": lambda: presets.sync(4),
    "local_sgd": lambda: presets.local_sgd(4, 3),
    "local_sgd_warmup": lambda: presets.local_sgd(3, 4, warmup_steps=3),
    "easgd": lambda: presets.easgd(4, 2, alpha=0.15),
    "easgd_nonblocking": lambda: presets.easgd(4, 3, nonblocking=True),
    "dpsgd": lambda: presets.dpsgd(6),
    "decentralized_periodic": lambda: presets.decentralized_periodic(6, 3),
    "one_peer_exponential": lambda: presets.dpsgd(4, mixing=mixing_schedule("one_peer_exponential", 4)),
    "generalized_elastic": lambda: presets.generalized_elastic(6),
    "hierarchical": lambda: presets.hierarchical(4, 2, groups=2, q=2, alpha=0.3),
    "fedavg": lambda: presets.fedavg(6, 3, fraction=0.5, sample_counts=[10, 20, 30, 40, 50, 60], seed=5),
    "lsgd": lambda: presets.lsgd(4, 1, lam=0.3),
    "lsgd_tau3": lambda: presets.lsgd(4, 3, lam=0.3),
    "lsgd_groups": lambda: presets.lsgd(6, 2, lam=0.3, groups=2, lam_global=0.1),
    "downpour": lambda: presets.downpour(3, 2, seed=2),
}


@pytest.mark.parametrize("executor", ["loop", "vmap"])
@pytest.mark.parametrize("name", list(PRESETS))
def test_simulator_equals_reference(name: str, executor: str) -> None:
    make = PRESETS[name]
    spec_ref, spec_sim = make(), make()  # schedules may hold state (LSGD leaders): one per engine
    m = spec_ref.workers
    obj_ref, obj_sim = BatchLeastSquares(m), BatchLeastSquares(m)
    sim = _simulator(spec_sim, obj_sim, executor)
    x0 = sim.params[0].numpy().copy()
    eng = ReferenceEngine(spec_ref, obj_ref, x0)
    counters = [0] * m
    for k in range(K):
        ref_stats = eng.step(None, LR)
        stats = _feed(sim, obj_sim, counters)
        assert stats.step == ref_stats.step == k
        assert stats.communicated == ref_stats.communicated
        assert stats.round == ref_stats.round
        assert stats.pattern == ref_stats.pattern
        assert stats.info.get("leader") == ref_stats.info.get("leader")
    # the simulator fed each worker exactly the batches the reference engine's objective used
    assert counters == obj_ref.calls
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)
    np.testing.assert_allclose(sim.center_params().numpy(), eng.center(), rtol=0, atol=TOL)
    np.testing.assert_allclose(sim.average_params().numpy(), eng.average(), rtol=0, atol=TOL)
    assert sim.consensus_distance() == pytest.approx(
        float(np.sum((eng.state - eng.state.mean(0)) ** 2) / m), rel=1e-9, abs=1e-14
    )
    assert sim.rounds == eng.rounds
    assert sim.leader == eng.leader
    # the iterates moved and (for presets that communicate) the workers interacted
    assert not np.allclose(eng.state[0], x0)


def test_per_worker_starts_equal_reference() -> None:
    m = 4
    spec_ref, spec_sim = presets.easgd(m, 2), presets.easgd(m, 2)
    obj_ref, obj_sim = BatchLeastSquares(m), BatchLeastSquares(m)
    x0 = np.random.default_rng(1).standard_normal((m, D))
    sim = _simulator(spec_sim, obj_sim, "loop", init_params=torch.from_numpy(x0))
    eng = ReferenceEngine(spec_ref, obj_ref, x0)
    counters = [0] * m
    for _ in range(K):
        eng.step(None, LR)
        _feed(sim, obj_sim, counters)
    np.testing.assert_allclose(sim.params.numpy(), eng.state, rtol=0, atol=TOL)


# -------------------------------------------------------------------------------------------------
# momentum / nesterov / weight decay and the optimizer-state policies vs torch.optim.SGD by hand
# -------------------------------------------------------------------------------------------------


def _by_hand(obj: BatchLeastSquares, x0: np.ndarray, m: int, tau: int, steps: int, policy: str, **opt) -> np.ndarray:
    """Local SGD with torch.optim.SGD on m separate modules; averaging every tau steps."""
    models = []
    for _ in range(m):
        lin = nn.Linear(D, 1, bias=False).double()
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(x0).view(1, D))
        models.append(lin)
    opts = [torch.optim.SGD(mod.parameters(), lr=LR, **opt) for mod in models]
    for k in range(steps):
        for i in range(m):
            x, y = obj.torch_batch(i, k)
            opts[i].zero_grad()
            F.mse_loss(models[i](x), y).backward()
            opts[i].step()
        if (k + 1) % tau == 0:
            with torch.no_grad():
                mean = torch.stack([mod.weight for mod in models]).mean(0)
                for mod in models:
                    mod.weight.copy_(mean)
                bufs = [o.state[mod.weight]["momentum_buffer"] for o, mod in zip(opts, models, strict=True)]
                if policy == "reset":
                    for buf in bufs:
                        buf.zero_()
                elif policy == "mix":
                    avg = torch.stack(bufs).mean(0)
                    for buf in bufs:
                        buf.copy_(avg)
    return torch.stack([mod.weight.detach().view(-1) for mod in models]).numpy()


@pytest.mark.parametrize("policy", ["local", "reset", "mix"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_policies_equal_torch_sgd_by_hand(policy: str, nesterov: bool) -> None:
    m, tau = 3, 3
    opt = {"momentum": 0.9, "nesterov": nesterov, "weight_decay": 0.01}
    spec = presets.local_sgd(m, tau, policies=Policies(optimizer_state=policy))  # type: ignore[arg-type]
    obj = BatchLeastSquares(m)
    sim = _simulator(spec, obj, "loop", **opt)
    x0 = sim.params[0].numpy().copy()
    counters = [0] * m
    for _ in range(K):
        _feed(sim, obj, counters)
    expected = _by_hand(obj, x0, m, tau, K, policy, **opt)
    np.testing.assert_allclose(sim.params.numpy(), expected, rtol=0, atol=TOL)


def test_momentum_mix_policy_with_auxiliary_treats_it_as_zero() -> None:
    """EASGD with momentum mixed: worker momentum <- (1 - alpha) * momentum (the auxiliary has none)."""
    m, alpha = 3, 0.2
    spec = presets.easgd(m, 1, alpha=alpha, policies=Policies(optimizer_state="mix"))
    obj = BatchLeastSquares(m)
    sim = _simulator(spec, obj, "loop", momentum=0.5)
    counters = [0] * m
    _feed(sim, obj, counters)
    mom = sim.momentum
    assert mom is not None
    # first step: buf = g, then mixed: (1 - alpha) * g
    sim2 = _simulator(presets.easgd(m, 1, alpha=alpha), BatchLeastSquares(m), "loop", momentum=0.5)
    _feed(sim2, BatchLeastSquares(m), [0] * m)
    assert sim2.momentum is not None
    np.testing.assert_allclose(mom[:m].numpy(), (1 - alpha) * sim2.momentum[:m].numpy(), rtol=0, atol=1e-14)
    assert torch.all(mom[m:] == 0)
