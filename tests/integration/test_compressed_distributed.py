"""Compressed rounds on the distributed engine (gloo, 2-4 local processes) equal the simulator's.

Every compressor on an averaging pattern (local SGD) and every gossip-applicable one on a CHOCO ring: the
parameters after K steps equal the simulator's to 1e-10 in float64, and so do the bytes the cost model
charges (``bytes_model``, the simulator's ``bytes_sent``); a run resumed mid-way from a rank checkpoint
(non-zero residuals, public copies and PowerSGD factors) ends bit-identical; the NaN-skip rollback restores
the compressed state; elastic rounds are refused. Each test that starts processes (marked slow) starts ONE
set and runs many jobs in it (process start-up dominates on a 2-core machine); the quick checks of the same
code, in threads, are in ``tests/unit/test_wrapper_compressed.py``.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.communication import Compression
from coopsgd.data import WorkerLoader
from coopsgd.engines.distributed import DistributedEngine
from coopsgd.engines.distributed.compressed import check_distributed_compression
from coopsgd.engines.distributed.launch import launch
from coopsgd.engines.simulator import Simulator
from coopsgd.errors import ConfigError
from coopsgd.train.distributed import SpecJob, make_job_engine, parse_fault, run_spec

TOL = 1e-10
BATCH = 4
LR = 0.1
#: every compressor (none with gamma != 1 is exercised on the gossip side)
COMPRESSORS = ["none", "fp16", "bf16", "int8", "qsgd:4", "sign", "topk:0.25", "randk:0.3", "randk:0.3:unbiased",
               "powersgd:1"]
#: the compressors a gossip round takes (powersgd compresses averaging rounds only)
GOSSIP = [c for c in COMPRESSORS if not c.startswith("powersgd")]


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(m: int) -> tuple[tuple[torch.Tensor, torch.Tensor], list[np.ndarray]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (96,), generator=g)
    return (x, y), [np.arange(i, 96, m) for i in range(m)]


def _job(name: str, spec, m: int, steps: int, **kw) -> SpecJob:
    ds, parts = _data(m)
    return SpecJob(spec=spec, model=_mlp(), dataset=ds, parts=parts, batch_size=BATCH, steps=steps, name=name,
                   lr=LR, **kw)


def _simulate(job: SpecJob) -> tuple[torch.Tensor, float]:
    """The same run on the simulator: every node's parameters and the bytes its clock charged."""
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
    return sim.params.detach().clone(), float(sim.bytes_sent)


def _check(jobs: list[SpecJob], results: list[dict]) -> None:
    for job, res in zip(jobs, results, strict=True):
        expected, sent = _simulate(job)
        diff = float((res["params"] - expected).abs().max())
        assert diff <= TOL, f"{job.name}: max |distributed - simulator| = {diff:.3e}"
        assert res["timing"]["bytes_model"] == pytest.approx(sent, rel=1e-12), job.name
        assert res["rounds"] > 0


#: a gossip matrix on two workers (a 2- or 3-ring with Metropolis weights is J: an averaging round)
PAIR = np.array([[0.75, 0.25], [0.25, 0.75]])


@pytest.mark.slow  # starts processes (~6-11 s here); the same CompressedMixer runs in threads, quickly, in
# tests/unit/test_wrapper_compressed.py
def test_compressors_match_the_simulator_on_two_ranks() -> None:
    """Local SGD with three compressors and CHOCO on a pair, one launch of 2 processes."""
    m, steps = 2, 4
    jobs = [_job(f"local_sgd {c}", presets.local_sgd(m, 2, compression=c), m, steps)
            for c in ("topk:0.25", "powersgd:1", "none")]
    jobs.append(_job("choco randk", presets.choco(m, mixing=PAIR, compression="randk:0.3"), m, steps))
    results = run_spec(jobs, timeout_s=60)
    _check(jobs, results)
    ops = {r["name"]: r["timing"]["ranks"][0]["ops"] for r in results}
    assert ops["local_sgd topk:0.25"] == {"compressed_all_gather": steps // 2}  # one all-gather per round
    assert ops["local_sgd none"] == {"all_reduce": steps // 2}  # none: the uncompressed round itself
    assert ops["choco randk"] == {"compressed_neighbor": steps}  # point-to-point to the neighbour
    # randk sends its values only: k = ceil(0.3 * 75) = 23 float64 values per round, to one neighbour
    assert results[3]["timing"]["ranks"][0]["bytes_sent"] == steps * 23 * 8


@pytest.mark.slow
def test_every_compressor_matches_the_simulator_on_four_ranks() -> None:
    m, steps = 4, 6
    jobs = [_job(f"local_sgd {c}", presets.local_sgd(m, 3, compression=c), m, steps) for c in COMPRESSORS]
    jobs += [_job(f"choco ring {c}", presets.choco(m, topology="ring", compression=c), m, steps) for c in GOSSIP]
    jobs += [
        _job("choco none gamma 0.5", presets.choco(m, gamma=0.5), m, steps),
        _job("fedavg sampled int8", presets.fedavg(m, 2, fraction=0.5, seed=1, compression="int8"), m, steps),
        _job("fedavg one client topk", presets.fedavg(m, 2, fraction=0.25, seed=2, compression="topk:0.25"), m, steps),
        _job("diloco topk", presets.diloco(m, 3, compression="topk:0.25"), m, steps),
        _job("slowmo dpsgd sign", presets.slowmo(m, 3, base_algorithm="dpsgd", compression="sign"), m, steps),
        _job("matcha qsgd", presets.matcha(m, compression="qsgd:4"), m, steps),
        _job("dpsgd topk", presets.dpsgd(m, topology="ring", compression="topk:0.25"), m, steps),
        _job("decentralized_periodic int8", presets.decentralized_periodic(m, 2, compression="int8"), m, steps),
        _job("sync error feedback off", presets.sync(m, compression=Compression("topk:0.25", error_feedback="off")),
             m, steps),
    ]
    results = run_spec(jobs, timeout_s=120)
    _check(jobs, results)
    by = {r["name"]: r for r in results}
    rank1 = by["choco ring topk:0.25"]["timing"]["ranks"][1]
    assert rank1["ops"] == {"compressed_neighbor": steps}
    # k = ceil(0.25 * 75) = 19 float64 values and int8 indices, to each of the two ring neighbours
    assert rank1["bytes_sent"] == steps * 2 * 19 * (8 + 1)
    # local SGD: one all-gather of (m - 1) payloads per round
    assert by["local_sgd topk:0.25"]["timing"]["ranks"][0]["bytes_sent"] == (steps // 3) * 3 * 19 * 9
    assert by["fedavg sampled int8"]["timing"]["ranks"][0]["ops"] == {"compressed_broadcast": steps // 2}
    # fp16 / bf16 averaging: the all-gather that is performed, (m - 1) payloads of 2 d bytes, is what is charged
    for c in ("fp16", "bf16"):
        timing = by[f"local_sgd {c}"]["timing"]
        assert timing["ranks"][0]["bytes_sent"] == timing["bytes_model"] == (steps // 3) * 3 * 2 * 75


#: elastic presets with at least topk and int8 each (hierarchical averaging: the engine places its group centres
#: on their groups' ranks), DOWNPOUR's pushes in the schedule's order and LSGD's leader refresh
ELASTIC_JOBS = [(name, make, c) for name, make in (
    ("easgd", lambda c: presets.easgd(4, 2, compression=c)),
    ("generalized_elastic", lambda c: presets.generalized_elastic(4, 2, compression=c)),
    ("hierarchical", lambda c: presets.hierarchical(4, 1, compression=c)),
    ("downpour", lambda c: presets.downpour(4, 1, compression=c)),
) for c in ("topk:0.25", "int8")] + [("easgd", lambda c: presets.easgd(4, 2, compression=c), "powersgd:1"),
                                     ("downpour", lambda c: presets.downpour(4, 1, compression=c), "qsgd:4"),
                                     ("lsgd", lambda c: presets.lsgd(4, 2, compression=c), "topk:0.25"),
                                     ("lsgd", lambda c: presets.lsgd(4, 2, compression=c), "int8"),
                                     ("lsgd groups", lambda c: presets.lsgd(4, 2, groups=2, compression=c), "qsgd:4")]


@pytest.mark.slow  # one launch of 4 processes for every elastic configuration
def test_elastic_rounds_and_pushes_match_the_simulator_on_four_ranks() -> None:
    m, steps = 4, 6
    jobs = [_job(f"{name} {c}", make(c), m, steps) for name, make, c in ELASTIC_JOBS]
    results = run_spec(jobs, timeout_s=120)
    lsgd = [k for k, job in enumerate(jobs) if job.spec.name == "lsgd"]
    _check([j for k, j in enumerate(jobs) if k not in lsgd], [r for k, r in enumerate(results) if k not in lsgd])
    for k in lsgd:  # the election's all-gather of m loss floats: the engine charges (m - 1) floats, the clock m
        expected, sent = _simulate(jobs[k])
        assert float((results[k]["params"] - expected).abs().max()) <= TOL, jobs[k].name
        refreshes = steps // 2
        assert results[k]["timing"]["bytes_model"] == pytest.approx(sent - refreshes * 8, rel=1e-12), jobs[k].name
    by = {r["name"]: r for r in results}
    assert by["lsgd int8"]["timing"]["ranks"][1]["ops"]["compressed_broadcast"] == steps // 2
    p = 19 * (8 + 1)  # topk:0.25 on d = 75 float64: 19 values and int8 indices
    assert by["easgd topk:0.25"]["timing"]["ranks"][0]["ops"] == {"compressed_all_gather": steps // 2}
    assert by["easgd topk:0.25"]["timing"]["ranks"][0]["bytes_sent"] == (steps // 2) * (m - 1) * p
    assert by["downpour topk:0.25"]["timing"]["ranks"][2]["ops"] == {"compressed_pushes": steps}
    assert by["downpour topk:0.25"]["timing"]["ranks"][2]["bytes_sent"] == steps * (m - 1) * p


# -- resume and rollback ------------------------------------------------------------------------------------


def _resume_rank(rank: int, world: int, jobs: list[SpecJob]) -> list[dict]:
    """Per job: run to the end (A); run half, checkpoint, continue in a NEW engine from it (B); both final."""
    out = []
    for job in jobs:
        half = job.steps // 2
        states = []
        for split in (False, True):
            loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
            eng = make_job_engine(copy.deepcopy(job))
            mid = None
            for k in range(job.steps):
                if split and k == half:
                    mid = copy.deepcopy(eng.state_dict())
                    eng = make_job_engine(copy.deepcopy(job))
                    eng.load_state_dict(mid)
                eng.step(loader.next_step(), job.lr)
            states.append(eng.state_dict())
            dist.barrier()
        payload = mid["payload"]["compression"] if mid is not None else None
        out.append({"name": job.name, "full": states[0], "resumed": states[1], "mid": payload})
    # the NaN-skip rollback restores the compressed state of the last good round
    job = jobs[0]
    loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
    eng = DistributedEngine(job.spec, job.model, dtype=torch.float64, seed=job.seed, nan_policy="skip",
                            fault=parse_fault("1:3:nan"))
    for _ in range(2):
        eng.step(loader.next_step(), job.lr)
        assert eng.check_health() is None
    good = eng._compressed.state_dict()
    eng.step(loader.next_step(), job.lr)
    eng.step(loader.next_step(), job.lr)
    dropped = eng.check_health()
    out.append({"name": "rollback", "good": good, "after": eng._compressed.state_dict(),
                "dropped": None if dropped is None else dropped.to_dict()})
    return out


def _equal(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            assert torch.equal(a.isnan(), b.isnan()), where
            a, b = a.nan_to_num(), b.nan_to_num()
        assert torch.equal(a, b), f"{where}: max diff {(a - b).abs().max()}"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, where


@pytest.mark.slow
def test_resume_mid_run_is_bit_identical_and_rollback_restores() -> None:
    m, steps = 2, 8
    jobs = [
        _job("local_sgd topk", presets.local_sgd(m, 2, compression="topk:0.25"), m, steps),
        _job("choco sign", presets.choco(m, mixing=PAIR, compression="sign"), m, steps),
        _job("sync powersgd", presets.sync(m, compression="powersgd:1"), m, steps),
        _job("diloco int8", presets.diloco(m, 2, compression="int8"), m, steps),
        _job("easgd topk", presets.easgd(m, 2, compression="topk:0.25"), m, steps),
        _job("downpour int8", presets.downpour(m, 1, compression="int8"), m, steps),
        _job("lsgd topk", presets.lsgd(m, 2, compression="topk:0.25"), m, steps),
        _job("hierarchical int8", presets.hierarchical(m, 1, groups=2, compression="int8"), m, steps),  # placed
    ]
    results = launch(_resume_rank, m, (jobs,), timeout_s=90)
    for per_rank in results:
        *runs, rb = per_rank
        for res in runs:
            full, resumed = res["full"]["payload"], res["resumed"]["payload"]
            for key in ("state", "compression", "step", "rounds", "schedule_state", "loss_history", "loss_count",
                        "torch_rng_state"):
                _equal(full[key], resumed[key], f"{res['name']}.{key}")
            for key in ("bytes_sent", "bytes_model", "ops"):  # (not the measured seconds)
                _equal(full["comm"][key], resumed["comm"][key], f"{res['name']}.comm.{key}")
            mid = res["mid"]
            assert mid is not None and mid["calls"] > 0, res["name"]
        state = {r["name"]: r["mid"] for r in runs}
        assert state["local_sgd topk"]["residual"].abs().max() > 0  # resumed with e != 0
        assert state["choco sign"]["copies"].abs().max() > 0  # ... with x_hat != 0
        assert state["sync powersgd"]["factors"] and state["sync powersgd"]["residual"].abs().max() > 0
        assert state["easgd topk"]["centres"].abs().max() > 0  # ... with z_hat != 0
        assert state["hierarchical int8"]["centres"].abs().max() > 0
        assert state["downpour int8"]["residual"].abs().max() > 0
        assert rb["dropped"] is not None and rb["dropped"]["workers"] == [1]
        _equal(rb["good"], rb["after"], "rollback")


def test_what_the_engine_cannot_compress_is_refused_with_one_line() -> None:
    check_distributed_compression(presets.local_sgd(2, 2, compression="topk:0.5"))  # averaging rounds
    check_distributed_compression(presets.choco(4, compression="sign"))  # gossip
    check_distributed_compression(presets.easgd(2, 2, compression="topk:0.5"))  # elastic rounds
    check_distributed_compression(presets.hierarchical(4, 1, compression="int8"))  # placed centres
    downpour = presets.downpour(2, 2, compression="int8")
    check_distributed_compression(downpour)  # pushes in the schedule's order
    # the real asynchronous parameter server sends dense rows
    with pytest.raises(ConfigError) as err:
        check_distributed_compression(downpour, asynchronous=True)
    text = str(err.value)
    assert "compress" in text and "int8" in text and "async" in text and "\n" not in text
    with pytest.raises(ConfigError, match="compress"):  # the engine refuses it before any collective
        DistributedEngine(downpour, _mlp, downpour_order="async")
    check_distributed_compression(presets.lsgd(2, 2, compression="int8"))  # LSGD
    check_distributed_compression(presets.lsgd(4, 2, groups=2, compression="int8"))  # multi-level
