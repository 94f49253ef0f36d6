"""Cost per active client of FedBuff and SCAFFOLD: a population of N = 1000 clients with C = 10 training against
N = C = 10 (prints the ratios side by side, never asserts).

``--preset scaffold`` measures SCAFFOLD the same way (N = 1000 with client fraction c = 0.01 against N = 10 with
c = 1.0: 10 clients per round either way) and prints the size of its control variates (issue 26: exactly one extra
row per client and one for the server, no per-round copies).

The asynchronous server touches only the active clients' rows (their local steps, the arrivals' pseudo-gradients,
the pulls), so a step's cost should follow C, not N. Measured in the same run, interleaved:

* ``engine``: ``Simulator.step`` alone on the MLP (784-128-10, float32, SGD), batches for the active clients only;
* ``train``: a whole ``coopsgd`` run (``train(RunConfig)``, batch 8: data feed, loop, clock, records) of the same steps,
  evaluated only at the end (evaluation reads every row: its cost is per evaluation, not per step).

Reported: the median seconds per step and per active client-step of each, and the ratio N=1000 / N=10. Target
(issue 26 items 3 and 5): ratio <= 1.5.

Usage: ``python benchmarks/bench_async.py [--preset fedbuff|scaffold] [--steps 60] [--reps 3] [--tau 5]
[--buffer-size 5]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch
from torch import nn

from coopsgd.algorithms.asynchronous import fedbuff
from coopsgd.algorithms.federated_presets import scaffold
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.clock import SimClock
from coopsgd.theory.cost import ComputeModel


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


CONTROL_ROWS: dict[int, tuple[int, ...]] = {}  # SCAFFOLD: the control variates' shape per population


def engine_seconds(preset: str, population: int, concurrency: int, steps: int, tau: int,
                   k: int) -> tuple[float, int]:
    """Seconds of ``steps`` simulator steps and the active client-steps they took."""
    if preset == "scaffold":
        spec = scaffold(population, tau, fraction=concurrency / population, seed=0)
    else:
        spec = fedbuff(population, tau, buffer_size=k, concurrency=concurrency, seed=0)
    sim = Simulator(spec, _mlp, executor="vmap", clock=SimClock(compute=ComputeModel(mean_s=0.01)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    active = 0

    def batches(k: int) -> list:
        mask = spec.schedule.active(k)
        return [(x, y) if mask is None or mask[i] else None for i in range(population)]

    sim.step(batches(0), 0.05)  # warm-up (the executor's first call)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        b = batches(step)
        active += sum(v is not None for v in b)
        sim.step(b, 0.05)
    elapsed = time.perf_counter() - t0
    if sim.control is not None:
        CONTROL_ROWS[population] = tuple(sim.control.shape)
    return elapsed, active


def train_seconds(preset: str, population: int, concurrency: int, steps: int, tau: int,
                  k: int) -> tuple[float, int]:
    """Measured training seconds (the loop's ``measured_train_s``: evaluation excluded) of a whole run."""
    from coopsgd.train import RunConfig
    from coopsgd.train.trainer import train

    with tempfile.TemporaryDirectory() as d:
        own = ({"fraction": concurrency / population} if preset == "scaffold"
               else {"concurrency": concurrency, "buffer_size": k})
        cfg = RunConfig(preset=preset, workers=population, tau=tau, max_steps=steps, eval_every=steps,
                        eval_samples=100, batch_size=8, executor="vmap", compute="constant",
                        out=os.path.join(d, "r"), **own)
        summary = train(cfg)
    return float(summary["measured_train_s"]), steps * concurrency


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("fedbuff", "scaffold"), default="fedbuff")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tau", type=int, default=5)
    ap.add_argument("--buffer-size", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# {a.preset} cost per active client: 10 active, N = 10 vs N = 1000; MLP 784-128-10; {a.steps} steps, "
          f"tau {a.tau}, K {a.buffer_size}; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.2f}")
    res: dict[tuple[str, int], list[float]] = {}
    for _ in range(a.reps):  # interleaved: drift and other load hit both sizes alike
        for n in (10, 1000):
            for what, fn in (("engine", engine_seconds), ("train", train_seconds)):
                s, active = fn(a.preset, n, 10, a.steps, a.tau, a.buffer_size)
                res.setdefault((what, n), []).append(s / active)
    print(f"{'what':8} {'N=10 ms/client-step':>20} {'N=1000 ms/client-step':>22} {'ratio':>6}")
    for what in ("engine", "train"):
        small, big = statistics.median(res[(what, 10)]), statistics.median(res[(what, 1000)])
        print(f"{what:8} {small * 1e3:20.3f} {big * 1e3:22.3f} {big / small:6.2f}")
    for n, shape in sorted(CONTROL_ROWS.items()):
        print(f"# scaffold control variates at N = {n}: shape {shape} (N clients + the server, d parameters)")
    print(f"# load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
