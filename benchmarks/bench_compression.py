"""Compressed-communication benchmarks (issue 23, SPEC §11): ratios measured side by side, no asserts.

(a) encode + decode (``Compressor.roundtrip``) of each compressor over m = 8 stacked rows of d float32
    coordinates, next to one memory pass over the same rows (a copy into a buffer): time ratio and GB/s.
(b) one distributed averaging round (local SGD, world size 2, gloo, one thread per rank) under an emulated
    100 Mbit/s link (:class:`~coopsgd.engines.distributed.communicator.NetEmulation`): ``topk:0.01`` and
    ``int8`` against the dense all-reduce (targets: >= 20x and >= 3x faster), each round's measured time
    against the clock's prediction (target: within 10%): the α–β time of the bytes it charges plus its codec
    time (:mod:`coopsgd.theory.codec`) at the throughputs calibrated on this machine in each rank, on its row,
    right before each round (:func:`~coopsgd.engines.simulator.codec.calibrate_all`, median of 3; the medians
    over the rounds are compared, so a drift of the machine's speed moves both); the stated throughputs'
    prediction is printed too. The round is the engine's communicator call on a (1, d) row: encode, transport, decode and
    combine for a compressed round; the all-reduce for the dense one.
(c) CHOCO-SGD on a ring in the simulator (``topk:0.01``, a small MLP, vmap executor): one step's cost per
    worker at m = 1024 against m = 8 (target <= 1.5x).

Usage: ``python benchmarks/bench_compression.py [--quick] [--threads 1] [--width 1048576]``. The thread count
is set for (a) and (c) (torch intra-op threads) and is one per rank in (b); it is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.schedules import MixContext
from coopsgd.compression import parse_compressor
from coopsgd.engines.distributed.launch import launch
from coopsgd.engines.simulator.codec import median_seconds

COMPRESSORS = ["none", "fp16", "bf16", "int8", "qsgd:4", "sign", "topk:0.01", "randk:0.01", "randk:0.01:unbiased",
               "powersgd:4"]


# ---------------------------------------------------------------------------------------------------------
# (a) encode + decode throughput
# ---------------------------------------------------------------------------------------------------------


def bench_codecs(width: int, reps: int) -> None:
    m = 8
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(m, width, generator=g)
    side = int(round((width // 4) ** 0.5))
    layout = [(side, side)] * 4 if 4 * side * side == width else None  # PowerSGD: four square matrices
    out = torch.empty_like(rows)
    copy_s = median_seconds(lambda: out.copy_(rows), reps)  # one read and one write of the rows, no allocation
    gb = rows.numel() * rows.element_size() / 1e9
    print(f"\n(a) encode + decode of m = {m} rows x d = {width} float32 ({gb * 1e3:.0f} MB), median of {reps}")
    print(f"{'compressor':<22} {'ms':>9} {'GB/s':>8} {'x one copy':>11} {'payload B/row':>14}")
    print(f"{'copy (one memory pass)':<22} {copy_s * 1e3:>9.2f} {gb / copy_s:>8.2f} {1.0:>11.1f} {'':>14}")
    for spec in COMPRESSORS:
        comp = parse_compressor(spec, layout=layout if spec.startswith("powersgd") else None)
        counter = iter(range(10**9))

        def run(comp=comp, counter=counter) -> None:
            comp.roundtrip(rows, round=next(counter), nodes=range(m), seed=0)

        s = median_seconds(run, reps)
        print(f"{spec:<22} {s * 1e3:>9.2f} {gb / s:>8.2f} {s / copy_s:>11.1f} {comp.payload_bytes(width):>14}")


# ---------------------------------------------------------------------------------------------------------
# (b) a distributed round under an emulated 100 Mbit/s link
# ---------------------------------------------------------------------------------------------------------


def _round_rank(rank: int, world: int, width: int, specs: list[str], mbps: float, reps: int) -> dict[str, dict]:
    import torch.distributed as dist

    from coopsgd.engines.distributed.communicator import Mixer, NetEmulation
    from coopsgd.engines.distributed.compressed import CompressedMixer
    from coopsgd.engines.mixing import plan_round
    from coopsgd.engines.simulator.codec import calibrate_all
    from coopsgd.theory.cost import round_cost

    torch.set_num_threads(1)
    net = NetEmulation(bandwidth_mbps=mbps)
    g = torch.Generator().manual_seed(rank)
    out: dict[str, dict] = {}
    for spec_name in specs:
        spec = presets.local_sgd(world, 1, compression=None if spec_name == "dense" else spec_name)
        mix, _ = spec.schedule.advance(0, MixContext(step=0), spec.schedule.init_state())
        assert mix is not None
        rnd = plan_round(mix)
        mixer = Mixer(rank, world, 0, net=net)
        rows = torch.randn(1, width, generator=g)
        if spec_name == "dense":
            comm = mixer
            cost = [round_cost("allreduce", workers=world, params=width, bytes_per_param=4)]
            stated = cost
        else:
            assert spec.compressed is not None
            comm = CompressedMixer(mixer, spec.compressed, spec=spec, width=width, params=width, dtype=rows.dtype,
                                   device=rows.device, seed=0, layout=None, start=torch.zeros(width))
            stated = comm._costs(rnd, "average")
        walls, comms, preds, codecs = [], [], [], []
        for rep in range(reps + 1):
            if spec_name != "dense":  # calibrated in this rank right before each round: drift hits both alike
                comm.clock.codec = calibrate_all([spec_name], width, reps=3)
                cost = comm._costs(rnd, "average")
            row = rows.clone()
            dist.barrier()
            c0 = mixer.stats.comm_s
            t0 = time.perf_counter()
            comm.communicate(row, rnd)
            wall = time.perf_counter() - t0
            if rep:  # the first round warms up
                walls.append(wall)
                comms.append(mixer.stats.comm_s - c0)
                preds.append(sum(net.model.round_time(c) for c in cost))
                codecs.append(sum(c.codec_s for c in cost))
        out[spec_name] = {"wall_s": statistics.median(walls), "transport_s": statistics.median(comms),
                          "predicted_s": statistics.median(preds), "bytes_model": sum(c.bytes_sent for c in cost),
                          "transfer_s": sum(net.model.transfer_time(c) for c in cost),
                          "codec_s": statistics.median(codecs),
                          "stated_s": sum(net.model.round_time(c) for c in stated)}
    return out


def bench_round(width: int, reps: int, mbps: float) -> None:
    specs = ["dense", "topk:0.01", "int8"]
    res = launch(_round_rank, 2, (width, specs, mbps, reps), timeout_s=600, threads=1)[0]
    dense = res["dense"]["wall_s"]
    print(f"\n(b) one local-SGD averaging round, world size 2 (gloo, 1 thread per rank), d = {width} float32, "
          f"emulated {mbps:g} Mbit/s, median of {reps}")
    print(f"{'round':<11} {'bytes (model)':>14} {'transfer s':>11} {'codec s':>9} {'predicted s':>12} "
          f"{'(stated) s':>11} {'measured s':>11} {'transport s':>12} {'meas/pred':>10} {'meas/stated':>12} "
          f"{'transp/transf':>14} {'dense / this':>13}")
    for name in specs:
        r = res[name]
        print(f"{name:<11} {r['bytes_model']:>14.0f} {r['transfer_s']:>11.4f} {r['codec_s']:>9.4f} "
              f"{r['predicted_s']:>12.4f} {r['stated_s']:>11.4f} {r['wall_s']:>11.4f} {r['transport_s']:>12.4f} "
              f"{r['wall_s'] / r['predicted_s']:>10.3f} {r['wall_s'] / r['stated_s']:>12.3f} "
              f"{r['transport_s'] / r['transfer_s']:>14.3f} {dense / r['wall_s']:>13.1f}")


# ---------------------------------------------------------------------------------------------------------
# (c) CHOCO on a ring: per-worker step cost at m = 1024 vs m = 8
# ---------------------------------------------------------------------------------------------------------


def _choco_step_cost(m: int, steps: int, compress: str) -> float:
    from coopsgd.engines.simulator import Simulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))
    sim = Simulator(presets.choco(m, topology="ring", compression=compress), model, executor="vmap", seed=0)
    g = torch.Generator().manual_seed(1)
    batches = [[(torch.randn(8, 32, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(m)]
               for _ in range(4)]
    sim.step(batches[0], 0.05)  # warm-up
    times = []
    for k in range(steps):
        t0 = time.perf_counter()
        sim.step(batches[k % len(batches)], 0.05)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / m


def bench_choco(steps: int, compress: str) -> None:
    small = _choco_step_cost(8, steps, compress)
    large = _choco_step_cost(1024, steps, compress)
    print(f"\n(c) CHOCO-SGD ({compress}) on a ring, simulator (vmap), MLP 32-16-4 (d = 604), batch 8 per worker, "
          f"median of {steps} steps")
    print(f"per-worker step cost: m = 8: {small * 1e6:.1f} us, m = 1024: {large * 1e6:.1f} us, "
          f"ratio {large / small:.2f}x (target <= 1.5x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and a narrower row")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for (a) and (c) (default 1)")
    ap.add_argument("--width", type=int, default=1 << 20, help="row width d for (a) and (b) (default 2^20)")
    ap.add_argument("--mbps", type=float, default=100.0, help="emulated link of (b) in Mbit/s (default 100)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: a, b, c")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    width = args.width if not args.quick else min(args.width, 1 << 18)
    reps = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads} "
          f"((b): 1 per rank), load average {os.getloadavg()[0]:.2f}")
    skip = set(args.skip.split(","))
    if "a" not in skip:
        bench_codecs(width, reps)
    if "b" not in skip:
        bench_round(width, reps, args.mbps)
    if "c" not in skip:
        bench_choco(3 if args.quick else 5, "topk:0.01")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    # run as the importable module ``bench_compression`` so the rank function pickles by name
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_compression

    bench_compression.main()
