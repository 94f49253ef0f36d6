"""Simulator step time by torch thread count, alone and beside a busy process (issue 25 item 1).

For each model (mlp, lenet, resnet20; m = 8, batch 32 per worker, executor loop) and each thread count, the
median time of one simulator step over --reps steps after two warm-up steps. ``--busy``: a second process spins
a torch matmul loop with one thread the whole time (another user's job on the machine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

import torch


def spin(stop) -> None:
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while not stop.is_set():
        a = (a @ a).tanh_()


def step_time(model_name: str, threads: int, reps: int) -> float:
    from coopsgd.train.config import RunConfig
    from coopsgd.train.problem import build_problem, feed_from
    from coopsgd.train.trainer import make_simulator

    torch.set_num_threads(threads)
    cfg = RunConfig(preset="local_sgd", model=model_name, executor="loop", max_steps=100, eval_samples=10)
    p = build_problem(cfg)
    sim = make_simulator(cfg, p)
    feed = feed_from(p.loader)
    times = []
    for k in range(reps + 2):
        batches = feed(k, range(8), None)
        t = time.perf_counter()
        sim.step(batches, lr=0.05)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mlp,lenet,resnet20")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--busy", action="store_true")
    args = ap.parse_args()
    stop = mp.Event()
    proc = None
    if args.busy:
        proc = mp.Process(target=spin, args=(stop,), daemon=True)
        proc.start()
        time.sleep(1.0)
    out = {}
    try:
        for name in args.models.split(","):
            for th in map(int, args.threads.split(",")):
                out[f"{name}/{th}"] = round(1e3 * step_time(name, th, args.reps), 2)
                print(name, th, out[f"{name}/{th}"], "ms", flush=True)
    finally:
        stop.set()
        if proc is not None:
            proc.join(5)
    print(json.dumps({"busy": args.busy, "cpus": os.cpu_count(), "ms_per_step": out}))


if __name__ == "__main__":
    main()
