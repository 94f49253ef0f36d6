"""The distributed engine (gloo, 2-4 local processes) equals the simulator, and failures never hang.

Each equivalence test starts ONE set of processes and runs several presets in it (:func:`run_spec` with a
list of jobs), because process start-up dominates on a 2-core machine. Model: a tiny MLP in float64 on
synthetic data; both engines read the same :class:`WorkerLoader` batches (worker r's batch on rank r).
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.data import WorkerLoader
from coopsgd.engines.distributed import communication_table
from coopsgd.engines.distributed.launch import RankFailure, launch
from coopsgd.engines.simulator import Simulator
from coopsgd.train import RunConfig
from coopsgd.train.distributed import SpecJob, run_distributed, run_spec

pytestmark = pytest.mark.slow  # every test here starts processes

TOL = 1e-10
STEPS = 8
BATCH = 4
LR = 0.1


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(m: int) -> tuple[tuple[torch.Tensor, torch.Tensor], list[np.ndarray]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (96,), generator=g)
    return (x, y), [np.arange(i, 96, m) for i in range(m)]


def _job(name: str, spec, m: int, **kw) -> SpecJob:
    ds, parts = _data(m)
    kw.setdefault("lr", LR)
    return SpecJob(spec=spec, model=_mlp(), dataset=ds, parts=parts, batch_size=BATCH, steps=STEPS, name=name, **kw)


def _simulate(job: SpecJob) -> torch.Tensor:
    """The same run on the one-process simulator (a fresh copy of the spec: schedules hold state)."""
    job = copy.deepcopy(job)
    loader = WorkerLoader(job.dataset, job.parts, job.batch_size, seed=job.loader_seed)
    sim = Simulator(job.spec, job.model, dtype=torch.float64, executor="loop", seed=job.seed,
                    optimizer=job.optimizer, loss_estimate=job.loss_estimate)
    for k in range(job.steps):
        batches = loader.next_step()
        active = job.spec.schedule.active(k)
        if active is not None:
            batches = [b if active[i] else None for i, b in enumerate(batches)]
        sim.step(batches, job.lr)
    return sim.params.detach().clone()


def _check(jobs: list[SpecJob], results: list[dict]) -> None:
    for job, res in zip(jobs, results, strict=True):
        expected = _simulate(job)
        assert res["params"].shape == expected.shape, job.name
        diff = float((res["params"] - expected).abs().max())
        assert diff <= TOL, f"{job.name}: max |distributed - simulator| = {diff:.3e}"


def test_presets_match_simulator_two_ranks() -> None:
    m = 2
    jobs = [
        _job("sync", presets.sync(m), m),
        _job("local_sgd", presets.local_sgd(m, 3), m, optimizer=OptimizerSettings(momentum=0.9)),
        _job("easgd", presets.easgd(m, 2), m),
        _job("easgd_nonblocking", presets.easgd(m, 2, nonblocking=True), m),
        _job("lsgd", presets.lsgd(m, 2, lam=0.5), m),
        _job("fedavg", presets.fedavg(m, 2, fraction=0.5), m),
    ]
    results = run_spec(jobs, timeout_s=30)
    _check(jobs, results)
    by = {r["name"]: r for r in results}
    ops = {name: r["timing"]["ranks"][0]["ops"] for name, r in by.items()}
    assert ops["sync"] == {"all_reduce": STEPS}  # one all_reduce of the flat vector per round
    assert ops["easgd_nonblocking"] == {"all_reduce_async": STEPS // 2}
    assert ops["easgd"] == {"all_reduce": STEPS // 2}
    assert ops["lsgd"] == {"all_gather": STEPS // 2, "broadcast": STEPS // 2}
    assert by["local_sgd"]["rounds"] == STEPS // 3
    t = by["sync"]["timing"]
    assert len(t["ranks"]) == m and t["wall_s"] > 0 and t["bytes_sent"] > 0
    assert "comm %" in communication_table({"sync": t})


def test_presets_match_simulator_four_ranks() -> None:
    m = 4
    jobs = [
        _job("dpsgd_ring", presets.dpsgd(m, topology="ring"), m),
        _job("fedavg_half", presets.fedavg(m, 2, fraction=0.5), m),
        _job("lsgd", presets.lsgd(m, 1, lam=0.2), m),
        _job("downpour", presets.downpour(m, 2), m),
        _job("hierarchical", presets.hierarchical(m, 1, groups=2, q=2), m),
        _job("hierarchical_4", presets.hierarchical(m, 2, groups=4, q=3, aux_topology="ring"), m,
             optimizer=OptimizerSettings(momentum=0.9)),
        _job("generalized_elastic", presets.generalized_elastic(m, 2), m),
    ]
    results = run_spec(jobs, timeout_s=30)
    _check(jobs, results)
    ops = {r["name"]: r["timing"]["ranks"][1]["ops"] for r in results}
    assert ops["dpsgd_ring"] == {"neighbor": STEPS}  # point-to-point with the two ring neighbours
    assert ops["lsgd"] == {"all_gather": STEPS, "broadcast": STEPS}  # losses, then the leader's model
    assert ops["downpour"] == {"all_gather": STEPS // 2}
    assert ops["fedavg_half"] == {"all_reduce": STEPS // 2}
    # hierarchical: each group's auxiliary lives only on its ranks; the group rounds are subgroup all_reduces
    # (non-blocking), the q*tau rounds that mix the auxiliaries one reduction over the contributing ranks
    assert ops["hierarchical"] == {"group_all_reduce_async": STEPS // 2, "all_reduce_async": STEPS // 2}
    # groups of one worker: no exchange in the group rounds; the ring of auxiliaries (step 6) involves
    # three reductions per rank (its own auxiliary and its two neighbours'), each over three ranks
    assert ops["hierarchical_4"] == {"group_all_reduce_async": 3}


# -- the wrapper ---------------------------------------------------------------------------------------


def _wrapper_rank(rank: int, world: int, spec, before_step: bool) -> torch.Tensor:
    from coopsgd.wrapper import CooperativeSGD

    ds, parts = _data(world)
    loader = WorkerLoader(ds, parts, BATCH, seed=0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    coop = CooperativeSGD(model, opt, spec=spec)
    for k in range(STEPS):
        x, y = loader.batch(k // loader.steps_per_epoch, rank, k % loader.steps_per_epoch)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if before_step:  # exact pre-mix rule: X S - lr G
            coop.step(loss=loss.item())
            opt.step()
        else:  # post-mix rule: (X - lr G) S
            opt.step()
            coop.step(loss=loss.item())
    coop.finalize()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    rows = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(rows, flat)
    if spec.auxiliaries:
        held = [j for j in range(spec.auxiliaries) if coop.mixer.holds(j)]
        assert torch.equal(coop.aux_vector(held[0]), coop.gather_aux()[held[0]])
    return torch.cat([torch.stack(rows), coop.gather_aux()])


def test_wrapper_matches_simulator() -> None:
    m = 2
    cases = [("local_sgd", presets.local_sgd(m, 3), False), ("easgd", presets.easgd(m, 2), True)]
    for name, spec, before in cases:
        got = launch(_wrapper_rank, m, (spec, before), timeout_s=30)[0]
        expected = _simulate(_job(name, spec, m))
        diff = float((got - expected).abs().max())
        assert diff <= TOL, f"wrapper {name}: {diff:.3e}"
    # hierarchical: group auxiliaries held by their group only, rounds in process subgroups
    spec = presets.hierarchical(4, 1, groups=2, q=2)
    got = launch(_wrapper_rank, 4, (spec, True), timeout_s=30)[0]
    diff = float((got - _simulate(_job("hierarchical", spec, 4))).abs().max())
    assert diff <= TOL, f"wrapper hierarchical: {diff:.3e}"


# -- failures ------------------------------------------------------------------------------------------


def _config() -> RunConfig:
    return RunConfig(preset="local_sgd", workers=2, tau=2, model="mlp", dataset="mnist_bundled", lr=0.05,
                     batch_size=16, max_steps=6, eval_samples=200, seed=0)


def test_run_distributed_summary(tmp_path) -> None:
    summary = run_distributed(_config(), out=tmp_path / "run", timeout_s=30, net_latency_ms=1.0)
    for key in ("status", "preset", "workers", "steps", "final", "simulated_time_s", "wall_time_s",
                "communication_rounds", "bytes_sent", "timing"):
        assert key in summary, key
    assert summary["status"] == "ok" and summary["communication_rounds"] == 3
    assert set(summary["final"]) == {"train_loss", "test_loss", "test_accuracy"}
    assert len(summary["timing"]["ranks"]) == 2
    r0 = summary["timing"]["ranks"][0]
    assert r0["communication_s"] + r0["idle_s"] >= 3 * 2 * 1e-3  # emulated: 3 rounds x 2 handshakes x 1 ms
    assert r0["ops"] == {"all_reduce": 3}
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("mode", ["raise", "exit", "kill", "term", "hang"])
def test_failure_names_the_rank(mode: str) -> None:
    timeout = 5.0
    t0 = time.time()
    with pytest.raises(RankFailure) as info:
        run_distributed(_config(), timeout_s=timeout, env={"COOPSGD_INJECT_FAILURE": f"1:3:{mode}"})
    err = info.value
    assert err.rank == 1 and "rank 1" in str(err), str(err)
    assert err.details["detected_after_s"] <= timeout + 5.0, err.details
    assert time.time() - t0 < 60


def test_cli_engine_distributed(capsys, tmp_path) -> None:
    import json

    from coopsgd.cli import main

    code = main(["run", "--engine", "distributed", "--preset", "local_sgd", "--workers", "2", "--tau", "2",
                 "--max-steps", "4", "--timeout-s", "30", "--out", str(tmp_path / "d"), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)
    assert data["engine"] == "distributed" and data["communication_rounds"] == 2
    assert len(data["timing"]["ranks"]) == 2
    assert (tmp_path / "d" / "summary.json").is_file()


def test_local_launch_listens_on_loopback_only() -> None:
    """The ranks return their listening sockets at once: the launcher keeps every rank until all have returned,
    so none tears its group down under a peer still connecting (issue 24, class 9: this test once failed with
    gloo's "Connection closed by peer"; tests/integration/test_launch_teardown.py checks the rule itself)."""
    import ipaddress

    from coopsgd.engines.distributed.launch import listening_addresses

    per_rank = launch(listening_addresses, 2, timeout_s=30)
    addrs = [a for ranks in per_rank for a in ranks]
    assert addrs, "gloo opens at least one listening socket per rank"
    for a in addrs:
        host = a.rsplit(":", 1)[0]
        assert ipaddress.ip_address(host).is_loopback, f"listening on {a}: not loopback"


# -- NaN / Inf: nan_policy="skip" drops the round everywhere and restores the last good state -------------


def _lr_frozen_2_3(k: int) -> float:
    return 0.0 if k in (2, 3) else LR


def test_nan_skip_drops_the_round_on_every_rank() -> None:
    m = 2
    # worker 1's step 3 gives a NaN: at the round of step 3 every rank learns it and returns to the state
    # after the round of step 1, i.e. exactly what learning rate 0 at steps 2 and 3 gives
    skip = _job("skip", presets.local_sgd(m, 2), m, nan_policy="skip", inject_failure="1:3:nan")
    frozen = _job("frozen", presets.local_sgd(m, 2), m, lr=_lr_frozen_2_3)
    nb = _job("easgd_nb_skip", presets.easgd(m, 2, nonblocking=True), m, nan_policy="skip", inject_failure="0:5:nan")
    skip_res, frozen_res, nb_res = run_spec([skip, frozen, nb], timeout_s=30)
    assert torch.equal(skip_res["params"], frozen_res["params"])
    assert skip_res["dropped_rounds"] == [{"step": 3, "workers": [1], "first_steps": {"1": 3}, "restored_to_step": 2}]
    assert frozen_res["dropped_rounds"] == []
    assert all(math.isfinite(x) for x in skip_res["losses"])  # rank 0 never saw a NaN itself
    # non-blocking EASGD: the pending auxiliary update is completed, then rolled back with the rest
    assert nb_res["dropped_rounds"][0]["workers"] == [0] and nb_res["dropped_rounds"][0]["restored_to_step"] == 4
    assert nb_res["dropped_rounds"][0]["step"] == 5
    assert bool(torch.isfinite(nb_res["params"]).all())


def test_nan_stop_and_too_many_skips_name_the_worker() -> None:
    m = 2
    stop = _job("stop", presets.local_sgd(m, 2), m, inject_failure="1:3:nan")
    with pytest.raises(RankFailure, match=r"non-finite loss on worker 1 at step 3"):
        run_spec(stop, timeout_s=30)
    # a learning rate that diverges at every attempt: after max_skips dropped rounds every rank stops
    diverge = _job("diverge", presets.local_sgd(m, 1), m, lr=1e38, dtype=torch.float32, nan_policy="skip", max_skips=2)
    with pytest.raises(RankFailure, match=r"non-finite values \(worker 0 at step \d+, worker 1 at step \d+\): 2 rounds .*max_skips=2"):
        run_spec(diverge, timeout_s=30)


# -- DOWNPOUR with a real asynchronous parameter server ----------------------------------------------------


def test_downpour_async_parameter_server(tmp_path) -> None:
    m = 3
    job = _job("async", presets.downpour(m, 2), m, downpour_order="async",
               optimizer=OptimizerSettings(momentum=0.9))
    res = run_spec(job, timeout_s=30)[0]
    P = res["params"]
    assert P.shape[0] == m + m + 1 and bool(torch.isfinite(P).all())
    assert [t["ops"] for t in res["timing"]["ranks"]] == [{"push_pull": STEPS // 2}] * m  # no collective per round
    # the run ends with a push/pull on every worker: each model is the z it pulled last (its b_i row), and
    # the worker whose push arrived last holds the final server model z exactly
    assert torch.equal(P[:m], P[m + 1 :])
    assert any(torch.equal(P[i], P[m]) for i in range(m))
    # through a RunConfig: downpour_order "clock" (the default) is the order of arrival at the server
    cfg = RunConfig(preset="downpour", workers=2, tau=2, model="mlp", dataset="mnist_bundled", lr=0.05,
                    batch_size=16, max_steps=6, eval_samples=100, seed=0, engine="distributed")
    summary = run_distributed(cfg, out=tmp_path / "run", timeout_s=30)
    assert summary["status"] == "ok" and summary["communication_rounds"] == 3
    assert summary["timing"]["ranks"][1]["ops"] == {"push_pull": 3}
    assert summary["aux_hosts"] == [0, 0, 1]  # z on rank 0, worker i's last pull on rank i
    # resume: the checkpoint holds z and every worker's last pull; the server continues from them
    more = RunConfig(**{**cfg.to_dict(), "max_steps": 8})
    resumed = run_distributed(more, out=tmp_path / "run", timeout_s=30, resume=tmp_path / "run")
    assert resumed["resumed_from_step"] == 6 and resumed["communication_rounds"] == 4
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert [r["payload"]["parameter_server"]["pushes"] for r in ck["ranks"]] == [4, 4]
    assert ck["ranks"][0]["payload"]["parameter_server"]["z"] is not None
    assert ck["ranks"][1]["payload"]["parameter_server"]["z"] is None
    with pytest.raises(Exception, match="downpour_order"):
        RunConfig(preset="downpour", workers=2, downpour_order="async")  # the simulator has no real server
