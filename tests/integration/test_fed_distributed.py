"""The federated strategies (issue 26, items 1-3) on the distributed engine equal the simulator to 1e-10 in
float64, and a server optimizer's run resumes bit-identically.

One set of 3 gloo processes runs every equivalence case (:func:`run_spec` with several jobs: FedProx and the
server optimizers, SCAFFOLD and FedNova -- also with uneven local work and an lr that changes inside a round --, with sampled, weighted clients); the resume test starts three runs of 2 processes.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from numpy.polynomial import Polynomial
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.data import WorkerLoader
from coopsgd.engines.simulator import Simulator
from coopsgd.train import RunConfig, load_checkpoint
from coopsgd.train.distributed import SpecJob, run_distributed, run_spec

pytestmark = pytest.mark.slow  # starts processes

TOL = 1e-10
STEPS = 9
COUNTS = [30.0, 20.0, 10.0]


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


def _simulate(job: SpecJob) -> tuple[torch.Tensor, Simulator]:
    job = copy.deepcopy(job)
    loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
    sim = Simulator(job.spec, job.model, dtype=torch.float64, executor="loop", seed=job.seed,
                    optimizer=job.optimizer)
    for k in range(job.steps):
        batches = loader.next_step()
        active = job.spec.schedule.active(k)
        if active is not None:
            batches = [b if active[i] else None for i, b in enumerate(batches)]
        sim.step(batches, float(job.lr(k)) if callable(job.lr) else job.lr)
    return sim.params.detach().clone(), sim


def test_federated_strategies_match_the_simulator() -> None:
    m = 3
    kw = {"fraction": 0.67, "sample_counts": COUNTS, "seed": 4}
    jobs = [
        _job("fedprox", presets.fedprox(m, 2, mu=0.5, **kw)),
        _job("fedadam_prox", presets.fedadam(m, 2, outer_lr=0.05, mu=0.1, **kw)),
        _job("fedyogi_momentum", presets.fedyogi(m, 3, outer_lr=0.05, fraction=0.34, seed=1), optimizer="adamw"),
        _job("fedadagrad", presets.fedadagrad(m, 2, outer_lr=0.05, outer_beta1=0.5)),
        _job("fedavgm", presets.fedavgm(m, 2, outer_lr=0.7, outer_momentum=0.8, **kw)),
        _job("scaffold", presets.scaffold(m, 2, **kw)),
        # (SCAFFOLD takes plain SGD steps only: its option II control variates are mean gradients)
        _job("scaffold_server_lr", presets.scaffold(m, 3, outer_lr=0.7, mu=0.2, fraction=0.34, seed=2)),
        _job("fedavg", presets.fedavg(m, 2, **kw)),
        # FedNova with uneven local work: K_i uniform on {1, 2, 3}, the server row among the round's sources
        _job("fednova_uneven", presets.fednova(m, 3, local_work="uniform", **kw)),
        # SCAFFOLD with uneven work and an lr falling inside the rounds: c_i divides by each client's own lr sum
        _job("scaffold_uneven_lr", presets.scaffold(m, 3, local_work="uniform", **kw), lr=Polynomial([0.05, -0.002])),
    ]
    results = run_spec(jobs, timeout_s=90)
    for job, res in zip(jobs, results, strict=True):
        expected, sim = _simulate(job)
        assert res["params"].shape == expected.shape, job.name
        diff = float((res["params"] - expected).abs().max())
        assert diff <= TOL, f"{job.name}: max |distributed - simulator| = {diff:.3e}"
        assert res["rounds"] == sim.rounds, job.name
    by_name = dict(zip([j.name for j in jobs], results, strict=True))
    # SCAFFOLD sends its control variates with the models: twice FedAvg's bytes on the wire, same rounds
    sent = {k: by_name[k]["timing"]["bytes_sent"] for k in ("scaffold", "fedavg")}
    assert sent["fedavg"] > 0 and sent["scaffold"] == 2 * sent["fedavg"], sent


def test_fedadam_resume_is_bit_identical(tmp_path) -> None:
    common = {"workers": 2, "model": "mlp", "dataset": "mnist_bundled", "lr": 0.01, "batch_size": 16,
              "eval_samples": 100, "seed": 1, "eval_every": 4, "preset": "fedadam", "tau": 2, "dtype": "float64",
              "fraction": 0.5}
    run_distributed(RunConfig(**common, max_steps=8), out=tmp_path / "a", timeout_s=60)
    part = tmp_path / "b"
    run_distributed(RunConfig(**common, max_steps=4), out=part, timeout_s=60)
    resumed = run_distributed(RunConfig(**common, max_steps=8), out=part, timeout_s=60, resume=part)
    assert resumed["resumed_from_step"] == 4
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(part / "checkpoint.pt")
    for ea, eb in zip(a["ranks"], b["ranks"], strict=True):
        ra, rb = ea["payload"], eb["payload"]
        assert torch.equal(ra["state"], rb["state"])
        assert ra["outer_state"]["step"] == rb["outer_state"]["step"] == 4
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ra["outer_state"][key], rb["outer_state"][key])
    # every rank holds the same server model and the same server optimizer state
    r0, r1 = a["ranks"][0]["payload"], a["ranks"][1]["payload"]
    assert torch.equal(r0["state"][1], r1["state"][1])
    assert torch.equal(r0["outer_state"]["exp_avg_sq"], r1["outer_state"]["exp_avg_sq"])
