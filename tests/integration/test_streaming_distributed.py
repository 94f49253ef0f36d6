"""Streaming DiLoCo on the distributed engine equals the simulator (float64, 2 gloo processes): fragments at
staggered steps, with and without a delayed (overlapped) application and the merge factor alpha."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.data import WorkerLoader
from coopsgd.engines.simulator import Simulator
from coopsgd.train.distributed import SpecJob, run_spec

pytestmark = pytest.mark.slow  # starts processes

TOL = 1e-10
STEPS = 11  # fragment 1's last round (after step 9) is applied after step 10; fragment 0's after step 7 at once


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _job(name: str, spec) -> SpecJob:
    m = spec.workers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (96,), generator=g)
    return SpecJob(spec=spec, model=_mlp(), dataset=(x, y), parts=[np.arange(i, 96, m) for i in range(m)],
                   batch_size=4, steps=STEPS, name=name, lr=0.05)


def _simulate(job: SpecJob) -> tuple[torch.Tensor, Simulator]:
    job = copy.deepcopy(job)
    loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
    sim = Simulator(job.spec, job.model, dtype=torch.float64, executor="loop", seed=job.seed)
    for _ in range(job.steps):
        sim.step(loader.next_step(), job.lr)
    return sim.params.detach().clone(), sim


def test_streaming_diloco_matches_simulator() -> None:
    m = 2
    jobs = [
        _job("p2", presets.streaming_diloco(m, 4, fragments=2)),
        _job("p2_delay1_alpha", presets.streaming_diloco(m, 4, fragments=2, fragment_delay=1, merge_alpha=0.5)),
        _job("p3_delay1", presets.streaming_diloco(m, 6, fragments=3, fragment_delay=1)),
    ]
    results = run_spec(jobs, timeout_s=60)
    for job, res in zip(jobs, results, strict=True):
        expected, sim = _simulate(job)
        diff = float((res["params"] - expected).abs().max())
        assert diff <= TOL, f"{job.name}: max |distributed - simulator| = {diff:.3e}"
        assert res["rounds"] == sim.rounds, job.name
        # a delayed fragment's all-reduce is started at its round and waited for at its application
        ops = res["timing"]["ranks"][0]["ops"]
        delayed = int(job.spec.params["fragment_delay"]) > 0
        assert (ops.get("all_reduce_async", 0) == sim.rounds) if delayed else ("all_reduce_async" not in ops), ops
