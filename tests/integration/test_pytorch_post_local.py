"""PyTorch's own post-local SGD and coopsgd's ``local_sgd(step_counting="pytorch")`` give the same iterates.

Two gloo processes run ``PostLocalSGDOptimizer`` + ``PeriodicModelAverager`` over a DDP model with the
``post_localSGD_hook`` (gradients all-reduced during the warm-up, local afterwards), in float64, with fixed
data per rank and step, and record the parameters after every step. The same processes also run coopsgd's
wrapper (:class:`coopsgd.CooperativeSGD`) as a drop-in replacement. In the parent, the simulator (a tiny
MLP) and the reference engine (a quadratic whose worker gradients are the PyTorch model's) replay them.
One spawn; the whole file takes a few seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.engines.distributed.launch import launch
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.engines.simulator import Simulator
from coopsgd.objectives.analytic import Quadratic

pytestmark = pytest.mark.slow  # starts two processes

TOL = 1e-12
M = 2
STEPS = 11
BATCH = 4
LR = 0.2
#: (name, warmup_steps, period tau, momentum): plain SGD with a DDP warm-up, and momentum without one
CASES = (("warmup", 2, 3, 0.0), ("momentum", 0, 3, 0.9))
DIM = 4


def _mlp() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batch of ``rank`` at ``step`` (the same in every process)."""
    g = torch.Generator().manual_seed(1000 * rank + step + 1)
    return torch.randn(BATCH, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (BATCH,), generator=g)


def _quadratic() -> Quadratic:
    return Quadratic(DIM, workers=M, heterogeneity=1.0, seed=3)


class _QuadModel(nn.Module):
    """``x`` with loss ``1/2 (x - b)^T A (x - b)``: the gradient is worker i's of :func:`_quadratic`."""

    def __init__(self, x0: np.ndarray) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=torch.float64))

    def forward(self, A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = self.x - b
        return 0.5 * d @ (A @ d)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _torch_post_local(rank: int, model: nn.Module, warmup: int, tau: int, momentum: float,
                      loss_of: Any) -> list[torch.Tensor]:
    """PyTorch's recipe: DDP + post_localSGD_hook, PostLocalSGDOptimizer + PeriodicModelAverager."""
    import warnings

    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import (
        PostLocalSGDState,
        post_localSGD_hook,
    )
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    ddp = nn.parallel.DistributedDataParallel(model)
    # after the warm-up: no gradient all-reduce at all (local SGD between the averaging rounds)
    state = PostLocalSGDState(process_group=None, subgroup=None, start_localSGD_iter=warmup,
                              post_local_gradient_allreduce=False)
    ddp.register_comm_hook(state, post_localSGD_hook)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = PostLocalSGDOptimizer(torch.optim.SGD(ddp.parameters(), lr=LR, momentum=momentum),
                                    PeriodicModelAverager(period=tau, warmup_steps=warmup))
    out = [_flat(model)]
    for k in range(STEPS):
        opt.zero_grad()
        loss_of(ddp, k).backward()
        opt.step()
        out.append(_flat(model))
    return out


def _coopsgd_wrapper(rank: int, model: nn.Module, warmup: int, tau: int, momentum: float,
                     loss_of: Any) -> list[torch.Tensor]:
    """The same loop with coopsgd's wrapper in place of DDP and PostLocalSGDOptimizer."""
    from coopsgd.wrapper import CooperativeSGD

    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    spec = presets.local_sgd(M, tau, warmup_steps=warmup, step_counting="pytorch")
    out = [_flat(model)]
    with CooperativeSGD(model, opt, spec=spec) as coop:
        for k in range(STEPS):
            opt.zero_grad()
            loss_of(model, k).backward()
            opt.step()
            coop.step()
            out.append(_flat(model))
    return out


def _rank(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    quad = _quadratic()
    A, b = torch.tensor(quad.A), torch.tensor(quad.b[rank])
    x0 = quad.initial_point(np.random.default_rng(0))

    def mlp_loss(model: nn.Module, k: int) -> torch.Tensor:
        x, y = _batch(rank, k)
        return F.cross_entropy(model(x), y)

    def quad_loss(model: nn.Module, k: int) -> torch.Tensor:
        return model(A, b)

    res: dict[str, list[torch.Tensor]] = {}
    for name, warmup, tau, mom in CASES:
        res[f"torch/{name}"] = _torch_post_local(rank, _mlp(), warmup, tau, mom, mlp_loss)
        res[f"wrapper/{name}"] = _coopsgd_wrapper(rank, _mlp(), warmup, tau, mom, mlp_loss)
    warmup, tau = CASES[0][1], CASES[0][2]
    res["torch/quadratic"] = _torch_post_local(rank, _QuadModel(x0), warmup, tau, 0.0, quad_loss)
    return res


def _simulate(warmup: int, tau: int, momentum: float, counting: str) -> list[torch.Tensor]:
    """Per-step parameters (m, d) of coopsgd's simulator on the ranks' batches."""
    spec = presets.local_sgd(M, tau, warmup_steps=warmup, step_counting=counting)
    sim = Simulator(spec, _mlp(), dtype=torch.float64, executor="loop", momentum=momentum)
    out = [sim.params[:M].detach().clone()]
    for k in range(STEPS):
        sim.step([_batch(i, k) for i in range(M)], LR)
        out.append(sim.params[:M].detach().clone())
    return out


def _reference(warmup: int, tau: int, counting: str) -> list[np.ndarray]:
    quad = _quadratic()
    spec = presets.local_sgd(M, tau, warmup_steps=warmup, step_counting=counting)
    eng = ReferenceEngine(spec, quad, quad.initial_point(np.random.default_rng(0)))
    out = [eng.workers_state.copy()]
    for _ in range(STEPS):
        eng.step(None, LR)
        out.append(eng.workers_state.copy())
    return out


def _max_diff(per_rank: list[list[torch.Tensor]], expected: list[Any]) -> float:
    """max over steps and workers of |PyTorch rank i's iterate - coopsgd worker i's iterate|."""
    worst = 0.0
    for k, exp in enumerate(expected):
        exp_t = torch.as_tensor(np.asarray(exp))
        for i in range(M):
            worst = max(worst, float((per_rank[i][k] - exp_t[i]).abs().max()))
    return worst


def test_pytorch_post_local_sgd_equals_coopsgd_pytorch_counting() -> None:
    results = launch(_rank, M, timeout_s=60)
    for name, warmup, tau, mom in CASES:
        torch_runs = [results[i][f"torch/{name}"] for i in range(M)]
        sim = _simulate(warmup, tau, mom, "pytorch")
        assert _max_diff(torch_runs, sim) <= TOL, (name, _max_diff(torch_runs, sim))
        # the wrapper, run in the same processes, is a drop-in replacement
        wrapper_runs = [results[i][f"wrapper/{name}"] for i in range(M)]
        assert _max_diff(wrapper_runs, sim) <= TOL, (name, _max_diff(wrapper_runs, sim))
        # the option matters: the paper's counting averages at other steps and gives other iterates
        assert _max_diff(torch_runs, _simulate(warmup, tau, mom, "paper")) > 1e-4, name
    warmup, tau = CASES[0][1], CASES[0][2]
    quad_runs = [results[i]["torch/quadratic"] for i in range(M)]
    assert _max_diff(quad_runs, _reference(warmup, tau, "pytorch")) <= TOL
    assert _max_diff(quad_runs, _reference(warmup, tau, "paper")) > 1e-4
