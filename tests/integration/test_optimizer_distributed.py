"""The distributed engine with Adam / AdamW inner optimizers and an outer optimizer (DiLoCo, SlowMo) equals
the simulator, and resumes bit-identically (issue 16, items 1 and 2).

One set of 2 gloo processes runs every equivalence case (:func:`run_spec` with several jobs); the resume
test starts three more (full run, a run stopped at step 4, its resumption).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.algorithms.spec import Policies
from coopsgd.data import WorkerLoader
from coopsgd.engines.simulator import Simulator
from coopsgd.train import RunConfig, load_checkpoint
from coopsgd.train.distributed import SpecJob, run_distributed, run_spec

pytestmark = pytest.mark.slow  # starts processes

TOL = 1e-10
STEPS = 8


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
        sim.step(batches, job.lr)
    return sim.params.detach().clone(), sim


def test_optimizers_and_outer_optimizers_match_simulator() -> None:
    m = 2
    jobs = [
        _job("local_adamw_mix", presets.local_sgd(m, 3, policies=Policies(optimizer_state="mix")), optimizer="adamw"),
        _job("diloco", presets.diloco(m, 3)),  # inner AdamW (the preset's), outer Nesterov SGD
        _job("diloco_adam_outer", presets.diloco(m, 2, outer_optimizer="adam", outer_lr=0.1),
             optimizer=OptimizerSettings("adam", amsgrad=True)),
        _job("slowmo_dpsgd", presets.slowmo(m, 3, base_algorithm="dpsgd", outer_momentum=0.6),
             optimizer=OptimizerSettings(momentum=0.9)),
        _job("easgd_adam_reset", presets.easgd(m, 2, policies=Policies(optimizer_state="reset")),
             optimizer=OptimizerSettings("adam", weight_decay=0.01)),
        _job("fedavg_adamw", presets.fedavg(m, 2, fraction=0.5), optimizer="adamw"),
    ]
    results = run_spec(jobs, timeout_s=60)
    for job, res in zip(jobs, results, strict=True):
        expected, sim = _simulate(job)
        assert res["params"].shape == expected.shape, job.name
        diff = float((res["params"] - expected).abs().max())
        assert diff <= TOL, f"{job.name}: max |distributed - simulator| = {diff:.3e}"
        assert res["rounds"] == sim.rounds, job.name
    assert {r["name"]: r["rounds"] for r in results}["diloco"] == STEPS // 3


def test_diloco_adamw_resume_is_bit_identical(tmp_path) -> None:
    common = {"workers": 2, "model": "mlp", "dataset": "mnist_bundled", "lr": 0.01, "batch_size": 16,
              "eval_samples": 100, "seed": 1, "eval_every": 4, "preset": "diloco", "tau": 3, "dtype": "float64"}
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
        assert torch.equal(ra["optimizer_steps"], rb["optimizer_steps"])
        assert ra["optimizer_steps"].tolist() == [8]
        assert ra["outer_state"]["step"] == rb["outer_state"]["step"] == 2
        assert torch.equal(ra["outer_state"]["momentum_buffer"], rb["outer_state"]["momentum_buffer"])
    # every rank holds the same z and the same outer state
    r0, r1 = a["ranks"][0]["payload"], a["ranks"][1]["payload"]
    assert torch.equal(r0["state"][1], r1["state"][1])
    assert torch.equal(r0["outer_state"]["momentum_buffer"], r1["outer_state"]["momentum_buffer"])


def test_cli_runs_diloco_with_adamw(tmp_path, capsys) -> None:
    import json

    from coopsgd.cli import main

    # diloco runs AdamW unless told otherwise; the run directory records both optimizers
    out = tmp_path / "run"
    assert main(["run", "--preset", "diloco", "--workers", "2", "--tau", "2", "--max-steps", "4", "--batch-size", "8",
                 "--eval-samples", "50", "--executor", "loop", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["communication_rounds"] == 2
    env = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    text = "".join(p.read_text() for p in out.glob("*.json"))
    assert '"adamw"' in text and '"nesterov": true' in text, env
    # the reference engine's workers run plain SGD: an adaptive inner optimizer is refused, naming it
    assert main(["run", "--engine", "reference", "--preset", "diloco", "--workers", "2", "--max-steps", "4"]) == 2
    assert "optimizer" in capsys.readouterr().err
    assert main(["run", "--engine", "reference", "--preset", "diloco", "--workers", "2", "--tau", "2",
                 "--max-steps", "4", "--optimizer", "sgd", "--json", "--out", str(tmp_path / "ref")]) == 0
    assert json.loads(capsys.readouterr().out)["communication_rounds"] == 2
    assert main(["run", "--optimizer", "adam", "--momentum", "0.9", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "momentum" in err and "Traceback" not in err
