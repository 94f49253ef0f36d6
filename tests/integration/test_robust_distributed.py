"""Robust aggregation and simulated attackers (issue 26, item 6) on the distributed engine: each rank all-gathers
every rank's row and computes the rule's aggregate; the final models equal the simulator's to 1e-10 in float64, and
the all-gather's bytes are counted (N (m - 1) per rank and round, against FedAvg's reduce-and-broadcast).

One set of 3 gloo processes runs every case (:func:`run_spec` with several jobs).
"""

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
STEPS = 9


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _job(name: str, spec, **kw) -> SpecJob:
    m = spec.workers
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (96,), generator=g)
    kw.setdefault("lr", 0.05)
    return SpecJob(spec=spec, model=_mlp(), dataset=(x, y), parts=[np.arange(i, 96, m) for i in range(m)],
                   batch_size=4, steps=STEPS, name=name, **kw)


def _simulate(job: SpecJob) -> torch.Tensor:
    job = copy.deepcopy(job)
    loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
    sim = Simulator(job.spec, job.model, dtype=torch.float64, executor="loop", seed=job.seed,
                    optimizer=job.optimizer)
    for k in range(job.steps):
        batches = loader.next_step()
        active = job.spec.schedule.active(k)
        if active is not None:
            batches = [b if active[i] else None for i, b in enumerate(batches)]
        sim.step(batches, job.lr)
    return sim.params.detach().clone()


def test_robust_rounds_match_the_simulator() -> None:
    m = 3
    jobs = [
        _job("median_sign_flip", presets.fedavg(m, 2, seed=4, aggregation="median", byzantine_fraction=0.34)),
        _job("trimmed_gaussian_sampled", presets.fedavg(m, 2, fraction=0.67, seed=2, aggregation="trimmed_mean",
                                                        trim=0.34, byzantine_fraction=0.34, attack="gaussian",
                                                        attack_std=0.2)),
        _job("krum_scale_fedadam", presets.fedadam(m, 2, outer_lr=0.05, seed=1, aggregation="krum", krum_f=0,
                                                   byzantine_fraction=0.34, attack="scale", attack_scale=-3.0)),
        _job("fedavg", presets.fedavg(m, 2, seed=4)),
    ]
    results = run_spec(jobs, timeout_s=120)
    for job, res in zip(jobs, results, strict=True):
        expected = _simulate(job)
        assert res["params"].shape == expected.shape, job.name
        diff = float((res["params"] - expected).abs().max())
        assert diff <= TOL, f"{job.name}: max |distributed - simulator| = {diff:.3e}"
    by_name = dict(zip([j.name for j in jobs], results, strict=True))
    # the robust rounds all-gather every rank's row: N (m - 1) bytes per rank and round, N the row's bytes (the
    # MLP's 75 float64 parameters), against FedAvg's ring all-reduce 2 N (m - 1) / m
    n_bytes, rounds = 75 * 8, STEPS // 2
    for rank in by_name["median_sign_flip"]["timing"]["ranks"]:
        assert rank["ops"] == {"all_gather": rounds}, rank
        assert rank["bytes_sent"] == rounds * n_bytes * (m - 1), rank
    for rank in by_name["fedavg"]["timing"]["ranks"]:
        assert rank["bytes_sent"] == rounds * 2 * n_bytes * (m - 1) / m, rank
