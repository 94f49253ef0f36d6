"""Scaling benchmark of one simulator round (issue 15; prints ratios side by side, never asserts).

For m workers and an MLP of ~100k parameters (784-128-10, float32), one round over the stacked state (n, d):

* (a) D-PSGD on a ring (Metropolis weights, 3 non-zeros per column),
* (b) local SGD's averaging round (J),
* (c) FedAvg with 1000 clients at fraction 0.01 (10 sampled clients, n = 1001 with the server),

each applied three ways in the same run: the dense reference product ``state.copy_(apply_mixing(state, S))``
(what the simulator did before), the structure-aware round as the simulator applies it now
(``mix_rows_(state, S, plan=plan_round(mix).plan)``: the plan from the Mix's structure for FedAvg, from the cache of
analysed matrices -- by identity for a schedule's fixed read-only matrices -- otherwise), and one memory pass over the rows the round touches (``copy_`` of them into a preallocated buffer: the
memory-bandwidth limit). Reported: the median times, ``mix_rows_`` / memory pass, dense / ``mix_rows_``, the
first-call analysis time of S, the per-round look-up (``plan_round(mix).plan``, included in the ``mix_rows_`` time),
and the peak memory of each round above the state (VmHWM after clear_refs)
as a multiple of the state size. Targets (issue 15): every round <= 2x one memory pass over the rows it
touches; on a ring at m = 1024, mix_rows_ >= 20x faster than the dense product.

Usage: ``python benchmarks/bench_scale.py [--workers 8,64,256,1024] [--reps 5] [--threads N] [--quick]`` (``--quick``:
m in {8, 64, 256}, under ~3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.algorithms.schedules import Mix, MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.mixing import apply_mixing, mix_rows_, plan_round, round_plan
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.clock import SimClock


def first_mix(spec: AlgorithmSpec) -> Mix:
    mix, _ = spec.schedule.advance(0, MixContext(step=0, lr=0.1), spec.schedule.init_state())
    assert mix is not None
    return mix


def mlp_params() -> int:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    return sum(p.numel() for p in model.parameters())


def interleaved_medians(fns: dict[str, Callable[[], object]], reps: int, budget_s: float = 20.0) -> dict[str, float]:
    """Median time of each function over up to ``reps`` interleaved rounds (after one warm-up each), so that
    drift and other load hit every variant alike; fewer rounds when the slowest calls exhaust the budget."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, reps, budget_s).items()}


def paired_ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over the interleaved rounds of ``a``'s time / ``b``'s time in the same round (paired: robust to
    load that changes between rounds)."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def interleaved_times(fns: dict[str, Callable[[], object]], reps: int, budget_s: float = 20.0) -> dict[str, list[float]]:
    """The times of :func:`interleaved_medians`, per function and round."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return times


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_extra_bytes(fn: Callable[[], object]) -> float:
    """Peak resident memory above the current one during ``fn()`` (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = _status("VmRSS")
    fn()
    return float(_status("VmHWM") - base)


def bench_case(name: str, mix: Mix, d: int, reps: int, dense_ok: bool) -> dict[str, object]:
    S = np.asarray(mix.matrix, dtype=np.float64)
    n = S.shape[0]
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(n, d, generator=gen)
    t0 = time.perf_counter()
    plan = round_plan(S.copy())  # first call: digest of S + analysis
    analyse_s = time.perf_counter() - t0
    plan_round(mix)
    t0 = time.perf_counter()
    for _ in range(10):
        plan_round(mix)
    lookup_s = (time.perf_counter() - t0) / 10
    touched = plan.touched
    targets = plan.targets
    buf = torch.empty(touched, d)
    if targets is None:
        def mem_pass() -> object:
            return buf.copy_(state)
    else:
        idx = torch.as_tensor(targets)

        def mem_pass() -> object:
            return torch.index_select(state, 0, idx, out=buf)

    res: dict[str, object] = {"case": name, "n": n, "kind": plan.kind.value, "touched": touched, "analyse_ms": analyse_s * 1e3,
                              "lookup_ms": lookup_s * 1e3}
    fns: dict[str, Callable[[], object]] = {"mem": mem_pass, "fast": lambda: mix_rows_(state, S, plan=plan_round(mix).plan)}
    if dense_ok:
        fns["dense"] = lambda: state.copy_(apply_mixing(state, S))
    times = interleaved_times(fns, reps)
    res.update({k: statistics.median(v) for k, v in times.items()})
    res["fast/mem paired"] = paired_ratio(times, "fast", "mem")
    res.setdefault("dense", float("nan"))
    state_bytes = state.numel() * state.element_size()
    res["peak_fast"] = peak_extra_bytes(lambda: mix_rows_(state, S, plan=plan_round(mix).plan)) / state_bytes
    res["peak_dense"] = peak_extra_bytes(lambda: state.copy_(apply_mixing(state, S))) / state_bytes if dense_ok else float("nan")
    res["state_mb"] = state_bytes / 2**20
    return res


# ---------------------------------------------------------------------------------------------------------
# whole simulator steps (compute + update + round)
# ---------------------------------------------------------------------------------------------------------

BATCH = 32


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def make_batches(m: int, count: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
             for _ in range(m)] for _ in range(count)]


class _StepRunner:
    """``steps`` simulator steps of one spec (loop executor, measured clock: no FLOP counting)."""

    def __init__(self, spec: AlgorithmSpec, steps: int, data: list[list[tuple[torch.Tensor, torch.Tensor]]],
                 nan_policy: str = "stop") -> None:
        self.sim = Simulator(spec, mlp, executor="loop", clock=SimClock(compute=None), nan_policy=nan_policy)
        self.steps, self.data = steps, data
        self.m = spec.workers
        self.active = int(getattr(spec.schedule, "clients_per_round", self.m))
        self()  # warm-up

    def __call__(self) -> None:
        sim = self.sim
        for s in range(self.steps):
            mask = sim.spec.schedule.active(sim.step_count)
            batches = self.data[s % len(self.data)]
            if mask is not None:
                batches = [b if a else None for b, a in zip(batches, mask, strict=True)]
            sim.step(batches, 0.01)
            if sim.nan_policy == "skip":
                sim.check_health()


def bench_steps(workers: list[int], reps: int, steps: int, fedavg_tau: list[int]) -> None:
    """Per-worker step cost in m (target: m = max <= 1.3x of m = min) and FedAvg 1000 clients at c = 0.01 vs
    10 clients at c = 1 (target <= 1.5x), each set of variants timed interleaved."""
    print("\n# whole steps: MLP 784-128-10, batch 32 per active worker, loop executor, median of interleaved reps")
    print(f"{'workload':<34} {'m':>5} {'active':>6} {'ms/step':>9} {'ms/active worker':>16} {'vs smallest m':>13}")
    kinds: dict[str, Callable[[int], AlgorithmSpec]] = {
        "local steps (no round)": lambda m: presets.local_sgd(m, 10**9),
        "D-PSGD ring (round every step)": lambda m: presets.dpsgd(m),
        "local SGD tau=1 (J every step)": lambda m: presets.local_sgd(m, 1),
        "local SGD tau=4": lambda m: presets.local_sgd(m, 4),
    }
    data_max = make_batches(max(workers))
    for label, build in kinds.items():  # every m of one workload interleaved (A/B alternating)
        runners = {m: _StepRunner(build(m), max(2, min(steps, int(steps * 64 / m) + 2)), [b[:m] for b in data_max])
                   for m in workers}
        med = interleaved_medians(runners, reps, budget_s=60.0)  # type: ignore[arg-type]
        base = None
        for m, runner in runners.items():
            t = med[m] / runner.steps  # type: ignore[index]
            per = t / m
            base = per if base is None else base
            print(f"{label:<34} {m:>5} {m:>6} {t * 1e3:>9.2f} {per * 1e3:>16.3f} {per / base:>12.2f}x", flush=True)
        del runners
    for tau in fedavg_tau:
        data = make_batches(1000)
        small = _StepRunner(presets.fedavg(10, tau), steps, [b[:10] for b in data])
        large = _StepRunner(presets.fedavg(1000, tau, fraction=0.01), steps, data)
        times = interleaved_times({"small": small, "large": large}, reps, budget_s=30.0)
        med = {k: statistics.median(v) for k, v in times.items()}
        for key, r in (("small", small), ("large", large)):
            t = med[key] / steps
            print(f"{'FedAvg tau=' + str(tau) + (' c=1.0' if key == 'small' else ' c=0.01'):<34} {r.m:>5} "
                  f"{r.active:>6} {t * 1e3:>9.2f} {t / r.active * 1e3:>16.3f} {med[key] / med['small']:>12.2f}x",
                  flush=True)
        print(f"{'  paired ratio (median of per-round)':<34} {'':>5} {'':>6} {'':>9} {'':>16} "
              f"{paired_ratio(times, 'large', 'small'):>12.2f}x  ({len(times['small'])} rounds)", flush=True)
        del small, large
    print("# targets: per active worker at the largest m <= 1.3x of the smallest; FedAvg 1000 clients c = 0.01 "
          "<= 1.5x of 10 clients c = 1.0 (last column)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="8,64,256,1024", help="comma-separated list of m")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="m in {8, 64, 256}")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 gives stable numbers on a loaded machine")
    ap.add_argument("--no-dense-above", type=int, default=4096, help="skip the dense product above this n")
    ap.add_argument("--only", choices=("rounds", "steps"), default=None, help="run one part")
    ap.add_argument("--steps", type=int, default=8, help="steps per timed repetition (fewer for large m)")
    ap.add_argument("--fedavg-tau", default="1,5", help="FedAvg local steps per round to measure")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [8, 64, 256] if args.quick else [int(w) for w in args.workers.split(",")]
    d = mlp_params()
    print(f"# bench_scale: d = {d} parameters (MLP 784-128-10), float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus, {platform.machine()}")
    if args.only != "rounds":
        bench_steps(workers, args.reps, args.steps, [int(t) for t in args.fedavg_tau.split(",")])
    if args.only == "steps":
        return
    cases: list[tuple[str, Mix]] = []
    for m in workers:
        cases.append((f"ring m={m}", first_mix(presets.dpsgd(m))))
        cases.append((f"J m={m}", first_mix(presets.local_sgd(m, 1))))
    cases.append(("fedavg 1000 c=0.01", first_mix(presets.fedavg(1000, 1, fraction=0.01))))
    head = (f"{'round':<20} {'kernel':<8} {'rows':>5} {'touched':>7} {'state MB':>8} {'dense ms':>9} {'mix_rows_ ms':>12} "
            f"{'mem pass ms':>11} {'fast/mem':>8} {'paired':>7} {'dense/fast':>10} {'analyse ms':>10} {'lookup ms':>9} {'peak fast':>9} {'peak dense':>10}")
    print(head)
    for name, mix in cases:
        r = bench_case(name, mix, d, args.reps, mix.matrix.shape[0] <= args.no_dense_above)
        fast, mem, dense = float(r["fast"]), float(r["mem"]), float(r["dense"])  # type: ignore[arg-type]
        print(f"{name:<20} {r['kind']!s:<8} {r['n']:>5} {r['touched']:>7} {float(r['state_mb']):>8.0f} "  # type: ignore[arg-type]
              f"{dense * 1e3:>9.2f} {fast * 1e3:>12.2f} {mem * 1e3:>11.2f} {fast / mem:>7.2f}x {float(r['fast/mem paired']):>6.2f}x {dense / fast:>9.1f}x "
              f"{float(r['analyse_ms']):>10.2f} {float(r['lookup_ms']):>9.2f} {float(r['peak_fast']):>8.2f}x {float(r['peak_dense']):>9.2f}x",  # type: ignore[arg-type]
              flush=True)
    print("# fast/mem: mix_rows_ / one copy_ of the touched rows (target <= 2x); dense/fast: speed-up over the "
          "dense product (target >= 20x on a ring at m = 1024); peak: memory above the state during the round, "
          "in states")


if __name__ == "__main__":
    main()
