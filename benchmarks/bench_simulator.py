"""Simulator benchmarks for SPEC §10 (prints ratios side by side; no asserts).

1. Step time: one simulator step with m workers vs m x one plain single-model PyTorch step
   (zero_grad / forward / backward / torch.optim.SGD.step), for an MLP (784-200-200-10), a LeNet-style CNN
   and a ResNet-20-like net, batch 32 per worker, executors loop / vmap / auto.   target <= 1.10x
2. auto vs the better of loop and vmap (steady state, after its calibration).       target within 5%
3. One mixing round: one (m+v)x(m+v) by (m+v)xd product over the stacked state (what the simulator does)
   vs a per-parameter Python loop over m replica modules.                           target >= 5x faster
4. Peak memory (peak-RSS increment, VmHWM after clear_refs, in fresh subprocesses) with m workers vs
   m x a single model.
                                                                                   target <= 1.10x

Usage: ``python benchmarks/bench_simulator.py [--workers 8] [--reps 5] [--quick] [--models mlp,lenet,resnet]``.
Timings are medians over ``--reps`` repetitions, measured interleaved so that drift hits all variants.
Threads: torch's default for the machine (``torch.get_num_threads()``), reported in the header.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.engines.mixing import apply_mixing
from coopsgd.engines.simulator import Simulator

# ---------------------------------------------------------------------------------------------------------
# models (defined here so the benchmark does not depend on coopsgd.models)
# ---------------------------------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))


def lenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


def resnet20() -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for j in range(3):
            layers.append(_Block(cin, cout, stride if j == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (1, 28, 28)),
    "lenet": (lenet, (1, 28, 28)),
    "resnet": (resnet20, (3, 32, 32)),
}
STEPS = {"mlp": 20, "lenet": 10, "resnet": 2}
BATCH = 32


def make_batches(m: int, shape: tuple[int, ...], count: int = 4) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    return [[(torch.randn(BATCH, *shape, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(m)]
            for _ in range(count)]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# 1 + 2: step time
# ---------------------------------------------------------------------------------------------------------


def bench_steps(name: str, m: int, reps: int) -> dict[str, object]:
    factory, shape = MODELS[name]
    data = make_batches(m, shape)
    steps = STEPS[name]
    lr = 0.01

    single = factory()
    single_opt = torch.optim.SGD(single.parameters(), lr=lr)
    separate = [factory() for _ in range(m)]
    separate_opt = [torch.optim.SGD(md.parameters(), lr=lr) for md in separate]

    def one(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def run_single() -> None:  # m x one single-model step (one model, m different batches)
        for s in range(steps):
            for i in range(m):
                one(single, single_opt, *data[s % len(data)][i])

    def run_separate() -> None:  # m separate models (as m processes would hold them), one step each
        for s in range(steps):
            for i in range(m):
                one(separate[i], separate_opt[i], *data[s % len(data)][i])

    sims: dict[str, Simulator] = {}
    auto_calibration_s = 0.0
    for ex in ("loop", "vmap", "auto"):
        sim = Simulator(presets.local_sgd(m, 10**9), factory, executor=ex)  # local steps only (no round)
        t0 = time.perf_counter()
        sim.step(data[0], lr)  # warm-up (for auto: includes the calibration)
        if ex == "auto":
            auto_calibration_s = time.perf_counter() - t0
        sims[ex] = sim

    def run_sim(sim: Simulator) -> Callable[[], None]:
        def go() -> None:
            for s in range(steps):
                sim.step(data[s % len(data)], lr)

        return go

    variants: dict[str, Callable[[], None]] = {
        "single x m": run_single,
        "separate": run_separate,
        **{f"sim {k}": run_sim(v) for k, v in sims.items()},
    }
    for fn in variants.values():  # warm up every variant once
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for key, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = times["single x m"]
    best = [min(a, b) for a, b in zip(times["sim loop"], times["sim vmap"], strict=True)]
    return {
        "model": name,
        "params": count_params(single),
        "median_s": med,
        # per repetition, each variant against the reference timed next to it (robust to changing load)
        "paired": {k: statistics.median(t / b for t, b in zip(v, base, strict=True)) for k, v in times.items()},
        "auto_best_paired": statistics.median(a / b for a, b in zip(times["sim auto"], best, strict=True)),
        "auto_choice": sims["auto"].executor_name,
        "auto_calibration": sims["auto"].calibration,
        "auto_first_step_s": auto_calibration_s,
    }


# ---------------------------------------------------------------------------------------------------------
# 5: whole runs with executor="auto", calibration included
# ---------------------------------------------------------------------------------------------------------


def bench_auto_runs(name: str, m: int, reps: int, steps: int = 100) -> dict[str, float]:
    """Median wall time of a whole run of ``steps`` steps (construction included) with executor loop, vmap,
    auto with an empty executor cache (the first run: calibration included) and auto reading the cache."""
    import tempfile

    from coopsgd.engines.simulator.calibration import ExecutorCache

    factory, shape = MODELS[name]
    data = make_batches(m, shape)
    cached_dir = tempfile.mkdtemp(prefix="coopsgd-bench-cache-")

    def run(executor: str, cache: ExecutorCache | None) -> Callable[[], None]:
        def go() -> None:
            sim = Simulator(presets.local_sgd(m, 10**9), factory, executor=executor, executor_cache=cache)
            for s in range(steps):
                sim.step(data[s % len(data)], 0.01)

        return go

    def first_run() -> None:
        with tempfile.TemporaryDirectory(prefix="coopsgd-bench-cache-") as d:
            run("auto", ExecutorCache(os.path.join(d, "cache.json")))()

    variants = {"loop": run("loop", None), "vmap": run("vmap", None), "auto first run": first_run,
                "auto cached": run("auto", ExecutorCache(os.path.join(cached_dir, "cache.json")))}
    variants["auto cached"]()  # fills the cache
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for key, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    best = [min(a, b) for a, b in zip(times["loop"], times["vmap"], strict=True)]
    paired = {f"{k}/best paired": statistics.median(t / b for t, b in zip(times[k], best, strict=True))
              for k in ("auto first run", "auto cached")}
    return {k: statistics.median(v) for k, v in times.items()} | paired


# ---------------------------------------------------------------------------------------------------------
# 3: mixing
# ---------------------------------------------------------------------------------------------------------


def bench_mixing(name: str, m: int, reps: int) -> dict[str, float]:
    factory, _ = MODELS[name]
    spec = presets.easgd(m, 1)  # m workers + 1 auxiliary, dense-ish W_alpha
    S = spec.schedule.mix(0, None).matrix  # type: ignore[arg-type, union-attr]
    n = spec.nodes
    sim = Simulator(spec, factory, executor="loop")
    state = sim._state  # [buffers | params], the simulator's storage
    reps_inner = 30

    def stacked() -> None:  # what the simulator does for a round: one product + write back in place
        state.copy_(apply_mixing(state, S))

    models = [factory() for _ in range(n)]
    per_model = [list(md.parameters()) + [b for b in md.buffers() if b.is_floating_point()] for md in models]
    St = torch.as_tensor(S.T, dtype=torch.float32)

    def per_parameter() -> None:  # loop over parameter tensors (vectorised over nodes) and write back per node
        with torch.no_grad():
            for j in range(len(per_model[0])):
                mixed = St @ torch.stack([p[j].reshape(-1) for p in per_model])
                for i in range(n):
                    per_model[i][j].copy_(mixed[i].view_as(per_model[i][j]))

    def per_worker_parameter() -> None:  # the naive double loop: x_i = sum_j S_ji x_j per node and tensor
        with torch.no_grad():
            new = [[sum(float(S[k, i]) * per_model[k][j] for k in range(n) if S[k, i] != 0)
                    for j in range(len(per_model[0]))] for i in range(n)]
            for i in range(n):
                for j, t in enumerate(new[i]):
                    per_model[i][j].copy_(t)

    out: dict[str, list[float]] = {"stacked": [], "per_parameter": [], "per_worker_parameter": []}
    fns = {"stacked": stacked, "per_parameter": per_parameter, "per_worker_parameter": per_worker_parameter}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps_inner):
                fn()
            out[key].append((time.perf_counter() - t0) / reps_inner)
    return {k: statistics.median(v) for k, v in out.items()} | {"tensors": float(len(per_model[0]))}


# ---------------------------------------------------------------------------------------------------------
# 4: memory (fresh subprocesses)
# ---------------------------------------------------------------------------------------------------------

_MEM_SCRIPT = r"""
import resource, sys, json, torch, torch.nn.functional as F
sys.path.insert(0, {bench_dir!r})
import bench_simulator as B
from coopsgd.algorithms import presets
from coopsgd.engines.simulator import Simulator
name, mode, m = {name!r}, {mode!r}, {m}
factory, shape = B.MODELS[name]
data = B.make_batches(m, shape, count=2)
torch.manual_seed(0)
# run every code path once on a negligible model first, so that lazy initialisation (torch.optim pulls in
# torch._dynamo, oneDNN/thread pools, vmap) is not counted as the model's memory
tiny = lambda: torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 3))
tx, ty = torch.randn(2, 1, 4, 4), torch.randint(0, 3, (2,))
t = tiny(); o = torch.optim.SGD(t.parameters(), lr=0.1); F.cross_entropy(t(tx), ty).backward(); o.step()
for ex in ("loop", "vmap"):
    Simulator(presets.local_sgd(2, 2), tiny, executor=ex).step([(tx, ty), (tx, ty)], 0.1)
del t, o
def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)
try:  # reset the peak-RSS mark (Linux >= 4.0), then count from the current RSS
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base, peak_of = status_kb("VmRSS"), (lambda: status_kb("VmHWM"))
except OSError:  # ru_maxrss (may be inherited from the parent's high-water mark across fork/exec)
    base, peak_of = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, (lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
if mode == "single":
    md = factory(); opt = torch.optim.SGD(md.parameters(), lr=0.01)
    for s in range(3):
        x, y = data[s % 2][0]; opt.zero_grad(); F.cross_entropy(md(x), y).backward(); opt.step()
elif mode == "separate":
    mds = [factory() for _ in range(m)]; opts = [torch.optim.SGD(md.parameters(), lr=0.01) for md in mds]
    for s in range(3):
        for i in range(m):
            x, y = data[s % 2][i]; opts[i].zero_grad(); F.cross_entropy(mds[i](x), y).backward(); opts[i].step()
else:
    ex, tau = mode.split("-")  # "loop-local": local steps only; "loop-round": a round after step 2
    sim = Simulator(presets.local_sgd(m, 2 if tau == "round" else 10**9), factory, executor=ex)
    for s in range(3):
        sim.step(data[s % 2], 0.01)
print(json.dumps({{"increment_kb": peak_of() - base}}))
"""


MEMORY_MODES = ("single", "separate", "loop-local", "loop-round", "vmap-local")


def bench_memory(name: str, m: int) -> dict[str, float]:
    here = os.path.dirname(os.path.abspath(__file__))
    out: dict[str, float] = {}
    # a fixed mmap threshold makes glibc return every large block on free, so maxrss tracks live memory
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    for mode in MEMORY_MODES:
        code = _MEM_SCRIPT.format(bench_dir=here, name=name, mode=mode, m=m)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])["increment_kb"] / 1024.0
    return out


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--models", default="mlp,lenet,resnet")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no memory subprocesses")
    ap.add_argument("--json", default=None, help="also write the raw numbers to this file")
    ap.add_argument("--sections", default="1,3,5,4",
                    help="which parts to run: 1 (step time, with 2), 3 (mixing), 5 (whole auto runs), 4 (memory)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 gives stable numbers on a loaded machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    m, reps = args.workers, (3 if args.quick else args.reps)
    names = [s for s in args.models.split(",") if s]
    sections = set(args.sections.split(","))
    print(f"coopsgd simulator benchmark | torch {torch.__version__} | {platform.processor() or platform.machine()} | "
          f"threads {torch.get_num_threads()} | m = {m} | batch {BATCH}/worker | median of {reps}")
    raw: dict[str, object] = {}

    print("\n(1) step time: simulator step vs m x one single-model step (target <= 1.10x)")
    print("    (2) auto vs min(loop, vmap) (target <= 1.05x)")
    print("    paired: median over the repetitions of (variant / m x single) timed next to each other")
    hdr = f"{'model':8} {'params':>8} {'m x single':>11} {'separate':>9} {'loop':>13} {'vmap':>13} {'auto':>13} {'auto/best':>10}  auto picks"
    print(hdr)
    steps_raw = []
    for name in names if "1" in sections else []:
        r = bench_steps(name, m, reps)
        steps_raw.append(r)
        med = r["median_s"]
        assert isinstance(med, dict)
        base = med["single x m"]
        best = min(med["sim loop"], med["sim vmap"])

        def cell(key: str) -> str:
            return f"{med[key] * 1e3:6.1f}ms {med[key] / base:4.2f}x"  # noqa: B023

        print(f"{name:8} {r['params']:>8} {base * 1e3:9.1f}ms {med['separate'] / base:8.2f}x {cell('sim loop'):>13} "
              f"{cell('sim vmap'):>13} {cell('sim auto'):>13} {med['sim auto'] / best:9.3f}x  {r['auto_choice']} "
              f"(calibration loop {r['auto_calibration'].get('loop', float('nan')) * 1e3:.1f}ms, "  # type: ignore[union-attr]
              f"vmap {r['auto_calibration'].get('vmap', float('nan')) * 1e3:.1f}ms per step; "  # type: ignore[union-attr]
              f"first step {r['auto_first_step_s']:.2f}s)")
        pr = r["paired"]
        assert isinstance(pr, dict)
        print(f"{'  paired':8} {'':>8} {'':>11} {pr['separate']:8.2f}x {pr['sim loop']:12.2f}x {pr['sim vmap']:12.2f}x "
              f"{pr['sim auto']:12.2f}x {r['auto_best_paired']:9.3f}x")
    raw["steps"] = steps_raw

    print(f"\n(3) one mixing round, EASGD W_alpha on {m}+1 nodes (target: stacked >= 5x faster than the per-parameter loop)")
    print(f"{'model':8} {'tensors':>7} {'stacked':>10} {'per-param loop':>15} {'speed-up':>9} {'per-node-per-param':>19} {'speed-up':>9}")
    mix_raw = []
    for name in names if "3" in sections else []:
        r = bench_mixing(name, m, reps)
        mix_raw.append({"model": name, **r})
        print(f"{name:8} {int(r['tensors']):>7} {r['stacked'] * 1e3:8.3f}ms {r['per_parameter'] * 1e3:13.3f}ms "
              f"{r['per_parameter'] / r['stacked']:8.1f}x {r['per_worker_parameter'] * 1e3:17.3f}ms "
              f"{r['per_worker_parameter'] / r['stacked']:8.1f}x")
    raw["mixing"] = mix_raw

    print("\n(5) whole runs of 100 steps (construction included), executor auto vs the better fixed one "
          "(target <= 1.05x)")
    print(f"{'model':8} {'loop':>9} {'vmap':>9} {'auto 1st run':>13} {'auto cached':>12} {'1st/best':>9} {'cached/best':>12}")
    auto_raw = []
    for name in names if "5" in sections else []:
        r = bench_auto_runs(name, m, reps, steps=100 if name != "resnet" else 20)
        auto_raw.append({"model": name, **r})
        best = min(r["loop"], r["vmap"])
        print(f"{name:8} {r['loop']:8.2f}s {r['vmap']:8.2f}s {r['auto first run']:12.2f}s {r['auto cached']:11.2f}s "
              f"{r['auto first run'] / best:8.3f}x {r['auto cached'] / best:11.3f}x  (paired: "
              f"{r['auto first run/best paired']:.3f}x / {r['auto cached/best paired']:.3f}x)")
    raw["auto_runs"] = auto_raw

    if not args.quick and "4" in sections:
        print(f"\n(4) peak memory increment (peak RSS, fresh process) with m = {m} workers vs m x one model (target <= 1.10x)")
        print("    each cell: increment, ratio to m x (one model's increment), ratio to m separate models in one process")
        print("    sim loop/vmap: 3 local steps; loop+round: the 2nd step ends with a round (transient mixing output)")
        print(f"{'model':8} {'single':>8} {'m x single':>11} {'separate':>9} {'sim loop':>23} {'sim loop+round':>23} "
              f"{'sim vmap':>23}")
        mem_raw = []
        for name in names:
            r = bench_memory(name, m)
            mem_raw.append({"model": name, **r})
            ms = max(m * r["single"], 1e-9)
            sep = max(r["separate"], 1e-9)

            def cell(key: str) -> str:
                return f"{r[key]:6.1f}MB {r[key] / ms:5.2f}x {r[key] / sep:5.2f}x"  # noqa: B023

            print(f"{name:8} {r['single']:6.1f}MB {ms:9.1f}MB {r['separate']:7.1f}MB {cell('loop-local'):>23} "
                  f"{cell('loop-round'):>23} {cell('vmap-local'):>23}")
        raw["memory"] = mem_raw
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
