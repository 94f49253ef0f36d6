"""The simulator on one device: its step against m separate models, and a stacked mixing round against one memory pass.

For each model (ResNet-20 on synthetic CIFAR-shaped batches of 32; the small GPT on random WikiText-2-sized token
windows, 8 x 35 tokens, vocabulary 18,328) and each m:

* **step**: one simulator step of m workers (local steps only, ``local_sgd`` with no round in reach; executors
  ``loop`` and ``vmap``) against m separate models on the same device, each its own ``nn.Module`` and
  ``torch.optim.SGD`` (zero_grad / forward / backward / step, one after the other). Ratio: simulator ÷ separate,
  paired per repetition (target on CPU for the GPT at m = 8: <= 1.10x).
* **mixing**: one round over the stacked state (m rows of d parameters, d of the model): local SGD's averaging
  and D-PSGD on a ring, as the simulator applies them (``mix_rows_`` with the round's plan), against one memory
  pass over the same rows (``copy_`` into a preallocated buffer: the memory-bandwidth floor).

Timings: medians over ``--reps`` repetitions, the variants interleaved so that drift hits all of them, with
``torch.cuda.synchronize`` around every timed block on a GPU. Prints one table; ``--json FILE`` also writes
the raw numbers; ``--pytest-junit FILE`` adds the outcome of a pytest run (benchmarks/gpu_check.sh passes the
CUDA tests' result) as the table's first row.

Usage::

    python benchmarks/bench_gpu.py --device cuda                       # m = 8, 64; both models (the GPU check)
    python benchmarks/bench_gpu.py --device cpu --quick                # small sizes: a smoke run on a CPU
    python benchmarks/bench_gpu.py --device cpu --models gpt --workers 8 --threads 1 --sections step  # GPT, CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coopsgd.algorithms import presets
from coopsgd.engines.mixing import mix_rows_, plan_round
from coopsgd.engines.simulator import Simulator
from coopsgd.models import count_parameters, make_model

WIKITEXT2_VOCAB = 18328  # the bundled WikiText-2 files' vocabulary (valid + test), what a GPT run trains on
SEQ = 35  # the token windows runs cut WikiText-2 into


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


# ------------------------------------------------------------------------------------------------ workloads


class Workload:
    """A model factory, its loss and a batch maker (one batch per worker, made on the CPU, moved once)."""

    def __init__(self, name: str, quick: bool) -> None:
        self.name = name
        if name == "resnet20":
            self.batch, shape, width = (8, (3, 16, 16), 8) if quick else (32, (3, 32, 32), 16)
            self.factory: Callable[[], nn.Module] = lambda: make_model(
                "resnet20", num_classes=10, input_shape=shape, width=width)
            self.loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
            self._make = lambda g: (torch.randn(self.batch, *shape, generator=g),
                                    torch.randint(0, 10, (self.batch,), generator=g))
            self.label = "ResNet-20" + (" (width 8, 16x16)" if quick else "") + f", batch {self.batch}"
        elif name == "gpt":
            vocab, self.batch = (1000, 4) if quick else (WIKITEXT2_VOCAB, 8)
            kw = {"width": 32, "context": SEQ} if quick else {}
            self.factory = lambda: make_model("gpt", num_classes=vocab, input_shape=(SEQ,), **kw)
            self.loss = lm_loss
            self._make = lambda g: (torch.randint(0, vocab, (self.batch, SEQ), generator=g),
                                    torch.randint(0, vocab, (self.batch, SEQ), generator=g))
            self.label = f"GPT ({'width 32, ' if quick else ''}V {vocab}), {self.batch}x{SEQ} tokens"
        else:
            raise SystemExit(f"--models: unknown model {name!r}; choose resnet20, gpt")
        self.params = count_parameters(self.factory())

    def batches(self, m: int, count: int, device: torch.device) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        g = torch.Generator().manual_seed(0)
        return [[tuple(t.to(device) for t in self._make(g)) for _ in range(m)] for _ in range(count)]  # type: ignore[misc]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], None]], reps: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, ``reps`` times, the functions interleaved; one warm-up call each."""
    for fn in fns.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return times


def paired(times: dict[str, list[float]], key: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[key], times[base], strict=True))


# ------------------------------------------------------------------------------------------------ step


def bench_step(w: Workload, m: int, reps: int, steps: int, device: torch.device) -> dict[str, Any]:
    data = w.batches(m, 2, device)
    lr = 0.01
    torch.manual_seed(0)
    separate = [w.factory().to(device) for _ in range(m)]
    opts = [torch.optim.SGD(md.parameters(), lr=lr) for md in separate]

    def run_separate() -> None:
        for s in range(steps):
            for i in range(m):
                x, y = data[s % 2][i]
                opts[i].zero_grad()
                w.loss(separate[i](x), y).backward()
                opts[i].step()

    fns: dict[str, Callable[[], None]] = {"separate": run_separate}
    errors: dict[str, str] = {}
    for ex in ("loop", "vmap"):
        try:
            sim = Simulator(presets.local_sgd(m, 10**9), w.factory, loss_fn=w.loss, executor=ex, device=device)
            sim.step(data[0], lr)
        except (RuntimeError, MemoryError) as exc:  # e.g. out of device memory at m = 64: reported, not fatal
            errors[ex] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue

        def run_sim(sim: Simulator = sim) -> None:
            for s in range(steps):
                sim.step(data[s % 2], lr)

        fns[ex] = run_sim
    times = interleaved(fns, reps, device)
    med = {k: statistics.median(v) / steps for k, v in times.items()}
    ratio = {k: paired(times, k, "separate") for k in fns if k != "separate"}
    best = min(ratio, key=lambda k: ratio[k]) if ratio else None
    return {"model": w.name, "label": w.label, "params": w.params, "m": m, "step_s": med, "ratio": ratio,
            "best": best, "errors": errors}


# ------------------------------------------------------------------------------------------------ mixing


def bench_mixing(w: Workload, m: int, reps: int, device: torch.device) -> list[dict[str, Any]]:
    d = w.params
    g = torch.Generator().manual_seed(0)
    state = torch.randn(m, d, generator=g).to(device)
    out = []
    inner = 20  # rounds per timed block (one round is well under a millisecond)
    for name, spec in (("average", presets.local_sgd(m, 1)), ("ring", presets.dpsgd(m, topology="ring"))):
        mix = spec.schedule.mix(0, None)  # type: ignore[arg-type]  # these fixed rounds read no context
        assert mix is not None
        S = mix.matrix
        plan = plan_round(mix).plan
        buf = torch.empty(plan.touched, d, device=device)
        idx = None if plan.targets is None else torch.as_tensor(plan.targets, device=device)

        def mem(buf: torch.Tensor = buf, idx: torch.Tensor | None = idx) -> None:
            if idx is None:  # every row: one copy
                buf.copy_(state)
            else:  # the rows the round writes
                torch.index_select(state, 0, idx, out=buf)

        def stacked(S: Any = S, mix: Any = mix) -> None:
            for _ in range(inner):
                mix_rows_(state, S, plan=plan_round(mix).plan)

        def memory(mem: Callable[[], None] = mem) -> None:
            for _ in range(inner):
                mem()

        times = interleaved({"stacked": stacked, "memory": memory}, reps, device)
        out.append({"model": w.name, "round": name, "m": m, "d": d, "touched": plan.touched,
                    "stacked_s": statistics.median(times["stacked"]) / inner,
                    "memory_s": statistics.median(times["memory"]) / inner,
                    "ratio": paired(times, "stacked", "memory")})
    return out


# ------------------------------------------------------------------------------------------------ table


def pytest_row(path: str) -> tuple[str, str]:
    """``(check, result)`` of a pytest run from its JUnit XML file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return "tests/cuda (pytest)", f"no result: {exc}"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return "tests/cuda (pytest)", "no result: no testsuite in the XML"
    n, fail, err, skip = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    t = float(suite.get("time", 0.0))
    failed = [c.get("name", "?") for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    result = f"{n - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped in {t:.0f} s"
    if failed:
        result += "; failed: " + ", ".join(failed[:6]) + (" ..." if len(failed) > 6 else "")
    return "tests/cuda (pytest)", result


def ms(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--workers", default=None, help="comma-separated m (default: 8,64; --quick: 2,4)")
    ap.add_argument("--models", default="resnet20,gpt", help="comma-separated: resnet20, gpt")
    ap.add_argument("--sections", default="step,mixing", help="comma-separated: step, mixing")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5; --quick: 3)")
    ap.add_argument("--steps", type=int, default=3, help="simulator steps per timed repetition (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="stop starting new measurements after this many seconds (0: no limit); the table keeps "
                         "what was measured and names what was skipped")
    ap.add_argument("--quick", action="store_true", help="small models, m = 2, 4: a smoke run (on a CPU)")
    ap.add_argument("--json", default=None, help="also write the raw numbers to this file")
    ap.add_argument("--pytest-junit", default=None, help="a pytest JUnit XML file: its outcome becomes the first row")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: --device cuda but no CUDA device is visible (use --device cpu)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [int(v) for v in (args.workers or ("2,4" if args.quick else "8,64")).split(",") if v]
    reps = args.reps or (3 if args.quick else 5)
    sections = set(args.sections.split(","))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    cuda = f" | CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    print(f"coopsgd bench_gpu | {device} ({where}) | torch {torch.__version__}{cuda} | threads {torch.get_num_threads()}"
          f" | median of {reps} x {args.steps} steps")
    rows: list[tuple[str, str]] = []
    raw: dict[str, Any] = {"device": str(device), "name": where, "torch": torch.__version__, "steps": [], "mixing": []}
    if args.pytest_junit:
        rows.append(pytest_row(args.pytest_junit))
    t_start = time.perf_counter()
    loads = [Workload(name, args.quick) for name in args.models.split(",") if name]
    for m in workers:  # every model at the smaller m first: a spent budget cuts the larger m
        for w in loads:
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                rows.append((f"{w.label}, m={m}", f"skipped: the {args.budget_s:.0f} s budget was spent"))
                continue
            if "step" in sections:
                r = bench_step(w, m, reps, args.steps, device)
                raw["steps"].append(r)
                st, ratio = r["step_s"], r["ratio"]
                cells = [f"{k} {ms(st[k])} ({ratio[k]:.2f}x)" for k in ("loop", "vmap") if k in st]
                cells += [f"{k} failed: {e}" for k, e in r["errors"].items()]
                rows.append((f"step {w.label}, m={m}",
                             f"separate {ms(st['separate'])}; " + "; ".join(cells)
                             + (f"; best {r['best']} {ratio[r['best']]:.2f}x" if r["best"] else "")))
            if "mixing" in sections:
                for r in bench_mixing(w, m, reps, device):
                    raw["mixing"].append(r)
                    rows.append((f"mixing {r['round']} round, m={m}, d={r['d']:,}",
                                 f"stacked {ms(r['stacked_s'])}, one memory pass {ms(r['memory_s'])} "
                                 f"({r['ratio']:.2f}x)"))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    width = max(len(c) for c, _ in rows) if rows else 10
    print(f"\n{'check':<{width}} | result (ratios: simulator / separate models, stacked round / memory pass)")
    print(f"{'-' * width}-|-{'-' * 60}")
    for check, result in rows:
        print(f"{check:<{width}} | {result}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(raw, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
