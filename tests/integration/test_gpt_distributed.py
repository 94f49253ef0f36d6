"""The small GPT on the distributed engine (gloo, 2 local processes) equals the simulator to 1e-10 in float64.

One set of processes runs every job (process start-up dominates on a 2-core machine). Model: a tiny GPT (2
layers, 2 heads, width 8, context 6, vocabulary 30) on windows of a synthetic token stream; both engines read
the same :class:`WorkerLoader` batches (worker r's batch on rank r) and use the language-model loss.
"""

from __future__ import annotations

import copy

import pytest
import torch

from coopsgd.algorithms import presets
from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.data import WorkerLoader, lm_windows
from coopsgd.engines.simulator import Simulator
from coopsgd.models import make_model
from coopsgd.train.distributed import SpecJob, run_spec
from coopsgd.train.problem import lm_loss

pytestmark = pytest.mark.slow  # starts processes

TOL = 1e-10
STEPS = 6
VOCAB, SEQ = 30, 5


def _gpt() -> torch.nn.Module:
    torch.manual_seed(5)
    return make_model("gpt", num_classes=VOCAB, input_shape=(SEQ,), layers=2, heads=2, width=8, context=6).double()


def _job(name: str, spec, m: int, **kw) -> SpecJob:
    stream = torch.randint(0, VOCAB, (SEQ * 48 + 1,), generator=torch.Generator().manual_seed(0))
    ds = lm_windows(stream, SEQ)
    parts = [list(range(i, len(ds), m)) for i in range(m)]
    kw.setdefault("lr", 0.2)
    return SpecJob(spec=spec, model=_gpt(), dataset=(ds.x, ds.y), parts=parts, batch_size=4, steps=STEPS,
                   loss_fn=lm_loss, name=name, **kw)


def _simulate(job: SpecJob) -> torch.Tensor:
    job = copy.deepcopy(job)
    loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
    sim = Simulator(job.spec, job.model, loss_fn=job.loss_fn, dtype=torch.float64, executor="vmap", seed=job.seed,
                    optimizer=job.optimizer)
    for _ in range(job.steps):
        sim.step(loader.next_step(), job.lr)
    return sim.params.detach().clone()


def test_gpt_distributed_equals_simulator_two_ranks() -> None:
    m = 2
    jobs = [
        _job("sync", presets.sync(m), m),
        _job("local_sgd_momentum", presets.local_sgd(m, 3), m, optimizer=OptimizerSettings(momentum=0.9)),
        _job("diloco_adamw", presets.diloco(m, 2, outer_lr=0.7, outer_momentum=0.9), m, lr=0.01,
             optimizer=OptimizerSettings(name="adamw", weight_decay=0.01)),
        _job("easgd", presets.easgd(m, 2), m),
    ]
    results = run_spec(jobs, timeout_s=60)
    for job, res in zip(jobs, results, strict=True):
        expected = _simulate(job)
        assert res["params"].shape == expected.shape, job.name
        diff = float((res["params"] - expected).abs().max())
        assert diff <= TOL, f"{job.name}: max |distributed - simulator| = {diff:.3e}"
        start = torch.cat([p.detach().reshape(-1) for p in _gpt().parameters()])
        assert float((expected[0] - start).abs().max()) > 1e-4, f"{job.name}: did not train"
