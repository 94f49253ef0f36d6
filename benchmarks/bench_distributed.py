"""Distributed-engine benchmarks for SPEC §10 (gloo on this machine; prints ratios side by side, no asserts).

1. One local-SGD averaging round (J: all_reduce of the model) -- the engine's round on its flat state and
   the wrapper's round on a user's model -- vs PyTorch's
   ``torch.distributed.algorithms.model_averaging.averagers.PeriodicModelAverager`` on the same model and
   world size.                                                                 target <= 1.0x its time
2. Non-blocking vs blocking EASGD under emulated slow links, tau = 1 and tau = 4 (same iterates; the
   saving is wall-clock).                                                      [CSGD] Fig. 4c: ~50%
3. Measured wall-clock with emulated links vs the simulator clock's prediction (a Simulator with a SimClock
   of the same network and the measured per-step local time).                 target within 10%
4. Time to a target training loss under emulated links: local SGD (tau=4) and decentralized periodic
   averaging (ring, tau=4) vs fully synchronous SGD.
5. Communication fraction per algorithm, like [LSGD] Table 6.
6. Hierarchical averaging (4 workers, 2 groups): a group round in process subgroups (each group's
   auxiliary held by its ranks only) vs the same round with every auxiliary replicated on every rank (one
   world all_reduce of both groups' sums), blocking, same model.

Usage: ``python benchmarks/bench_distributed.py [--workers 2] [--quick]``. Every process uses one
thread; on a 2-core machine keep ``--workers 2`` for timings that are not dominated by CPU contention.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.data import load_dataset, partition
from coopsgd.engines.distributed import communication_table
from coopsgd.engines.distributed.communicator import Mixer
from coopsgd.engines.distributed.launch import launch
from coopsgd.train.distributed import SpecJob, run_spec


def _mlp(hidden: tuple[int, ...] = (200, 200)) -> nn.Module:
    from coopsgd.models import make_model

    torch.manual_seed(0)
    return make_model("mlp", num_classes=10, input_shape=(1, 28, 28), hidden=hidden)


# ---------------------------------------------------------------------------------------------------------
# 1. one averaging round vs PeriodicModelAverager
# ---------------------------------------------------------------------------------------------------------


def _round_rank(rank: int, world: int, hidden: tuple[int, ...], rounds: int, reps: int) -> dict[str, float]:
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

    from coopsgd.wrapper import CooperativeSGD

    torch.set_num_threads(1)
    spec = presets.local_sgd(world, tau=1)
    # the engine's round: the flat state row, J -> one in-place all_reduce then one scaling
    model_e = _mlp(hidden)
    row = torch.cat([p.detach().reshape(-1) for p in model_e.parameters()]).reshape(1, -1).clone()
    mixer = Mixer(rank, world, 0)
    S = spec.schedule.mix(0, None).matrix  # type: ignore[arg-type]
    # the wrapper's round on a user's model
    model_w = _mlp(hidden)
    coop = CooperativeSGD(model_w, spec=spec)
    # PyTorch's averager (period 1 averages at every call; its period-1 warning is expected here)
    model_p = _mlp(hidden)
    for p in model_p.parameters():  # the averager only averages parameters that have gradients
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pma = PeriodicModelAverager(period=1, warmup_steps=0)

    def t_engine() -> None:
        mixer.mix(row, S)

    def t_wrapper() -> None:
        coop.step()

    def t_pma() -> None:
        pma.average_parameters(list(model_p.parameters()))

    fns = {"engine": t_engine, "wrapper": t_wrapper, "pma": t_pma}
    for fn in fns.values():  # warm-up
        for _ in range(5):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(rounds):
                fn()
            times[name].append((time.perf_counter() - t0) / rounds)
    return {k: statistics.median(v) for k, v in times.items()} | {
        "params": float(sum(p.numel() for p in model_e.parameters()))
    }


def bench_round(world: int, quick: bool) -> None:
    print("\n1. one averaging round (J) -- median seconds per round, rank 0")
    print(f"{'model (params)':<24} {'engine':>10} {'wrapper':>10} {'PMA':>10} {'engine/PMA':>11} {'wrapper/PMA':>12}")
    sizes = [(200, 200), (1024, 1024)] if quick else [(200, 200), (1024, 1024), (2048, 2048)]
    for hidden in sizes:
        r = launch(_round_rank, world, (hidden, 20 if quick else 50, 3 if quick else 5), timeout_s=120)[0]
        print(f"{'mlp ' + str(int(r['params'])):<24} {r['engine'] * 1e3:>8.3f}ms {r['wrapper'] * 1e3:>8.3f}ms "
              f"{r['pma'] * 1e3:>8.3f}ms {r['engine'] / r['pma']:>10.2f}x {r['wrapper'] / r['pma']:>11.2f}x")


# ---------------------------------------------------------------------------------------------------------
# shared data for the training benchmarks
# ---------------------------------------------------------------------------------------------------------


def _data(world: int) -> tuple[tuple[torch.Tensor, torch.Tensor], list[np.ndarray]]:
    train = load_dataset("mnist_bundled", split="train")
    parts = partition(train.y, world, "iid", seed=0)
    return (train.x.float(), train.y), parts


def _job(name: str, spec, world: int, steps: int, *, batch: int = 64, hidden=(200, 200), lat=None, bw=None,
         **kw) -> SpecJob:
    ds, parts = _data(world)
    return SpecJob(spec=spec, model=_mlp(hidden), dataset=ds, parts=parts, batch_size=batch, steps=steps, lr=0.05,
                   dtype=torch.float32, net_latency_ms=lat, net_bandwidth_mbps=bw, return_state=False, name=name,
                   **kw)


# ---------------------------------------------------------------------------------------------------------
# 2. non-blocking vs blocking EASGD; 3. measured vs predicted
# ---------------------------------------------------------------------------------------------------------


def _predict(spec, world: int, steps: int, local_s: float, lat: float, bw: float, d: int) -> float:
    """The simulator clock's wall-clock for this run: a SimClock with the emulated network, constant compute."""
    from coopsgd.engines.simulator.clock import SimClock
    from coopsgd.theory.cost import ComputeModel, NetworkModel

    clock = SimClock(NetworkModel.from_mbps(lat, bw), ComputeModel(mean_s=local_s)).bind(world, d, 4.0)
    sched = spec.schedule
    for k in range(steps):
        clock.add_compute(sched.active(k))
        mix = sched.mix(k, _ctx(k))
        if mix is not None and mix.communicates:
            clock.communicate(clock.round_costs(mix.pattern, mix.matrix), overlap=spec.overlap)
    return clock.elapsed


def _ctx(k: int):
    from coopsgd.algorithms.schedules import MixContext

    return MixContext(step=k, lr=0.05)


def bench_easgd(world: int, quick: bool) -> list[tuple[str, float, float]]:
    """Blocking vs non-blocking EASGD where one round's communication takes about as long as tau local steps.

    The per-step local time mu is measured first (no emulation); the emulated link then gets 0.5 ms of
    latency and the bandwidth that makes the all-reduce of the model cost c = tau * mu -- the regime of
    [CSGD] Fig. 4c, where overlapping can save up to half of the time. A second, slower link (2 ms,
    200 Mbit/s: c >> tau * mu) shows the saving shrinking to tau * mu per round.
    """
    steps = 48 if quick else 96
    batch = 256
    calib = run_spec(_job("calibration", presets.local_sgd(world, 1000), world, 20, batch=batch), timeout_s=120)[0]
    mu = statistics.mean((x["wall_s"] - x["communication_s"] - x["idle_s"]) / 20 for x in calib["timing"]["ranks"])
    d = int(sum(p.numel() for p in _mlp().parameters()))
    lat = 0.5
    print(f"\n2. EASGD blocking vs non-blocking, {world} workers, {steps} steps, batch {batch} per worker; "
          f"measured local step mu = {mu * 1e3:.1f} ms")
    print(f"{'tau':>4} {'link':>22} {'c (model)':>10} {'blocking s':>11} {'non-blocking s':>15} {'saving':>8}")
    preds: list[tuple[str, float, float]] = []
    for tau in (1, 4):
        c_target = tau * mu
        bytes_ = 2.0 * d * 4.0
        bw = bytes_ * 8 / 1e6 / max(c_target - world * lat / 1e3, 1e-3)  # Mbit/s
        for link_lat, link_bw in ((lat, bw), (2.0, 200.0)):
            c = world * link_lat / 1e3 + bytes_ * 8 / (link_bw * 1e6)
            jobs = [_job(f"easgd tau={tau} {'nb' if nb else 'b'} {link_bw:.0f}Mb", presets.easgd(world, tau, nonblocking=nb),
                         world, steps, batch=batch, lat=link_lat, bw=link_bw) for nb in (False, True, False, True)]
            res = run_spec(jobs, timeout_s=180)
            wb = min(res[0]["wall_s"], res[2]["wall_s"])
            wn = min(res[1]["wall_s"], res[3]["wall_s"])
            link = f"{link_lat:g} ms / {link_bw:.0f} Mbit/s"
            print(f"{tau:>4} {link:>22} {c * 1e3:>8.1f}ms {wb:>11.3f} {wn:>15.3f} {100 * (1 - wn / wb):>7.1f}%")
            for r, job in ((res[2], jobs[2]), (res[3], jobs[3])):
                preds.append(_measured_vs_predicted(r, job, world, steps, link_lat, link_bw))
    return preds


def _measured_vs_predicted(r: dict, job: SpecJob, world: int, steps: int, lat: float, bw: float) -> tuple[str, float, float]:
    t = r["timing"]
    d = int(sum(p.numel() for p in job.model.parameters()))
    # local time per step (everything except communication and waiting), averaged over ranks
    local = statistics.mean((x["wall_s"] - x["communication_s"] - x["idle_s"]) / steps for x in t["ranks"])
    pred = _predict(job.spec, world, steps, local, lat, bw, d)
    return job.name, t["wall_s"], pred


def bench_prediction(world: int, quick: bool, extra: list[tuple[str, float, float]]) -> None:
    lat, bw = 2.0, 200.0
    steps = 48 if quick else 96
    jobs = [_job("local_sgd tau=4", presets.local_sgd(world, 4), world, steps, batch=256, lat=lat, bw=bw),
            _job("sync", presets.sync(world), world, steps, batch=256, lat=lat, bw=bw)]
    res = run_spec(jobs, timeout_s=120)
    rows = [_measured_vs_predicted(r, j, world, steps, lat, bw) for r, j in zip(res, jobs, strict=True)] + extra
    print(f"\n3. measured wall-clock vs the simulator clock's prediction ({lat:g} ms / {bw:g} Mbit/s)")
    print(f"{'run':<24} {'measured s':>11} {'predicted s':>12} {'measured/predicted':>19}")
    for name, meas, pred in rows:
        print(f"{name:<24} {meas:>11.3f} {pred:>12.3f} {meas / pred:>18.3f}x")


# ---------------------------------------------------------------------------------------------------------
# 4. time to a target loss; 5. communication fraction
# ---------------------------------------------------------------------------------------------------------


def bench_time_to_loss(world: int, quick: bool) -> None:
    lat, bw = 5.0, 100.0
    steps = 200 if quick else 400
    target = 0.6
    m = max(world, 4)
    jobs = [
        _job("sync", presets.sync(m), m, steps, lat=lat, bw=bw, target_loss=target, loss_every=10),
        _job("local_sgd tau=4", presets.local_sgd(m, 4), m, steps, lat=lat, bw=bw, target_loss=target, loss_every=10),
        _job("decentralized ring tau=4", presets.decentralized_periodic(m, 4, topology="ring"), m, steps, lat=lat,
             bw=bw, target_loss=target, loss_every=10),
    ]
    res = run_spec(jobs, timeout_s=300)
    print(f"\n4. time to mean training mini-batch loss <= {target} ({m} workers, {lat:g} ms / {bw:g} Mbit/s, "
          f"batch 64, lr 0.05)")
    print(f"{'run':<26} {'step':>6} {'seconds':>9} {'speed-up vs sync':>17} {'final loss':>11}")
    base = res[0]["reached"]
    for r in res:
        reached = r["reached"]
        final = r["curve"][-1][2] if r["curve"] else math.nan
        if reached is None:
            print(f"{r['name']:<26} {'-':>6} {'not reached':>9} {'':>17} {final:>11.3f}")
            continue
        sp = f"{base[1] / reached[1]:.2f}x" if base else "-"
        print(f"{r['name']:<26} {reached[0]:>6} {reached[1]:>9.2f} {sp:>17} {final:>11.3f}")


def bench_fraction(world: int, quick: bool) -> None:
    lat, bw = 2.0, 200.0
    steps = 40 if quick else 80
    jobs = [
        _job("local_sgd tau=4", presets.local_sgd(world, 4), world, steps, batch=256, lat=lat, bw=bw),
        _job("easgd tau=4 (b=0.43)", presets.easgd(world, 4, beta=0.43), world, steps, batch=256, lat=lat, bw=bw),
        _job("lsgd tau=4", presets.lsgd(world, 4, lam=0.1), world, steps, batch=256, lat=lat, bw=bw),
        _job("downpour tau=1", presets.downpour(world, 1), world, steps, batch=256, lat=lat, bw=bw),
        _job("sync", presets.sync(world), world, steps, batch=256, lat=lat, bw=bw),
    ]
    res = run_spec(jobs, timeout_s=120)
    print(f"\n5. share of wall-clock per activity (like [LSGD] Table 6), {world} workers, {lat:g} ms / {bw:g} Mbit/s")
    print(communication_table({r["name"]: r["timing"] for r in res}))


# ---------------------------------------------------------------------------------------------------------
# 6. hierarchical: process subgroups vs replicated auxiliaries
# ---------------------------------------------------------------------------------------------------------


def _hier_rank(rank: int, world: int, hidden: tuple[int, ...], rounds: int, reps: int) -> dict[str, float]:
    from coopsgd.engines.distributed.collectives import aux_placement

    torch.set_num_threads(1)
    spec = presets.hierarchical(world, 1, groups=2, q=2)  # step 0: the group level only
    d = sum(p.numel() for p in _mlp(hidden).parameters())
    S = spec.schedule.mix(0, _ctx(0)).matrix
    holders = aux_placement(spec)
    placed = Mixer(rank, world, spec.auxiliaries, holders=holders, matrices=spec.schedule.matrices(4096))
    assert holders is not None
    replicated = Mixer(rank, world, spec.auxiliaries)
    rows = {"placed": torch.randn(1 + spec.auxiliaries, d), "replicated": torch.randn(1 + spec.auxiliaries, d)}
    mixers = {"placed": placed, "replicated": replicated}
    times: dict[str, list[float]] = {k: [] for k in mixers}
    for name, mx in mixers.items():  # warm-up
        for _ in range(3):
            mx.mix(rows[name], S)
    for _ in range(reps):
        for name, mx in mixers.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(rounds):
                mx.mix(rows[name], S)
            times[name].append((time.perf_counter() - t0) / rounds)
    sent = {name: mx.stats.bytes_sent / mx.stats.ops.get(next(iter(mx.stats.ops)), 1) for name, mx in mixers.items()}
    return {k: statistics.median(v) for k, v in times.items()} | {f"bytes_{k}": v for k, v in sent.items()} | {"params": float(d)}


def bench_hierarchical(quick: bool) -> None:
    print("\n6. hierarchical group round, 4 workers in 2 groups -- median seconds per round, rank 0")
    print(f"{'model (params)':<24} {'subgroups':>10} {'replicated':>11} {'ratio':>7} {'MB sent/rank':>14}")
    for hidden in ([(200, 200)] if quick else [(200, 200), (1024, 1024)]):
        r = launch(_hier_rank, 4, (hidden, 10 if quick else 30, 3), timeout_s=120)[0]
        print(f"{'mlp ' + str(int(r['params'])):<24} {r['placed'] * 1e3:>8.2f}ms {r['replicated'] * 1e3:>9.2f}ms "
              f"{r['placed'] / r['replicated']:>6.2f}x {r['bytes_placed'] / 1e6:>6.2f} vs {r['bytes_replicated'] / 1e6:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="1,2,3,4,5,6")
    ns = parser.parse_args()
    only = set(ns.only.split(","))
    print(json.dumps({"torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
                      "workers": ns.workers, "backend": "gloo", "threads_per_process": 1}))
    t0 = time.time()
    if "1" in only:
        bench_round(ns.workers, ns.quick)
    preds: list[tuple[str, float, float]] = []
    if "2" in only:
        preds = bench_easgd(ns.workers, ns.quick)
    if "3" in only:
        bench_prediction(ns.workers, ns.quick, preds)
    if "4" in only:
        bench_time_to_loss(ns.workers, ns.quick)
    if "5" in only:
        bench_fraction(ns.workers, ns.quick)
    if "6" in only:
        bench_hierarchical(ns.quick)
    print(f"\n(total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    # run as the importable module ``bench_distributed`` so the rank functions pickle by name
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_distributed

    bench_distributed.main()
