"""``coopsgd reproduce NAME``: rerun an experiment of [CSGD] or [LSGD]; ``all`` runs every one and writes a
report; ``report DIR`` rewrites it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from coopsgd.catalog import MATRIX_COMPLETION, REPRODUCTION_ALIASES, REPRODUCTIONS
from coopsgd.cli.common import experiment_names, flag_int, print_json, progress_wanted, write_json
from coopsgd.errors import INT64_MAX, ConfigError
from coopsgd.settings import default_text as shown_default

#: Peak memory of a dry run in GB (:data:`coopsgd.experiments.dry_run.DRY_RUN_MEMORY_GB`, measured; a copy:
#: ``--help`` must not import the experiments, and a test checks that the two agree).
DRY_RUN_MEMORY_GB = 8.0

__all__ = ["register"]

#: Largest matrix-completion model, d x rank parameters (80 MB of float64; each worker and the centre hold one).
MC_MAX_PARAMS = 10**7


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``coopsgd reproduce`` to the sub-command parsers."""
    width = max(len(n) for n in REPRODUCTIONS) + 2
    listing = "\n".join(f"  {r.name:{width}s}{r.description} [{', '.join(r.engines)}]" for r in REPRODUCTIONS.values())
    aliases = ", ".join(f"{a} = {n}" for a, n in REPRODUCTION_ALIASES.items())
    p = sub.add_parser("reproduce", help="rerun a paper experiment", formatter_class=fmt,
                       description="Rerun an experiment of [CSGD] or [LSGD]; writes its figures and result.json.",
                       epilog=(f"experiments [engines, the first is the default]:\n{listing}\n"
                               f"aliases: {aliases}"))  # an epilog is not %-formatted (only "%(prog)" is)
    p.add_argument("name", choices=[*experiment_names(), "all", "report"], metavar="NAME",
                   help="experiment (listed below); `all`: every experiment into --out DIR, then DIR/report.md; "
                        "`report DIR`: rewrite DIR/report.md from DIR/*/result.json")
    p.add_argument("dir", nargs="?", default=None, metavar="DIR", help="`reproduce report DIR`: the directory")
    p.add_argument("--engine", default=None, help="simulate | distributed | reference (default: the experiment's "
                                                  "first engine, listed below)")
    p.add_argument("--quick", action="store_true", help="2-core CPU scale")
    p.add_argument("--dry-run", action="store_true",
                   help="smoke-test the full scale without its data or a GPU: 2 steps per setting of the full-scale "
                        "models, workers, batch, partitions, lr schedule, checkpoint (written and reloaded), "
                        "figures and result.json, on synthetic data of the real shapes (3x32x32 or 1x28x28 images of 10 "
                        "classes; random tokens of WikiText-2's 33,278 words); the first setting of each sweep; "
                        "one line per setting; csgd-fig3..6, lsgd-nets, lsgd-lstm, fl-strategies or all (default --out: "
                        f"runs/NAME-dry-run); needs about {DRY_RUN_MEMORY_GB:g} GB of memory (the VGG-16 settings "
                        "of csgd-fig3..6: 8 workers of batch 128); the peak is printed at the end")
    p.add_argument("--all-settings", action="store_true", help="--dry-run: every setting of each sweep")
    p.add_argument("--device", default="cpu",
                   help="where the neural-network experiments train: cpu | cuda | cuda:N | mps (default: cpu; the "
                        "full scale needs a GPU in practice; lsgd-toy and matrix-completion run on the CPU)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace earlier runs of other settings in the output directory (e.g. --quick, then full)")
    mc_full, mc_quick = MATRIX_COMPLETION["full"], MATRIX_COMPLETION["quick"]

    def mc(key: str) -> str:
        return f"(default: {shown_default(mc_full[key])}; --quick: {shown_default(mc_quick[key])})"

    p.add_argument("--ranks", default=None, help=f"matrix completion: ranks, e.g. 1,10,50,100 {mc('ranks')}")
    p.add_argument("--trials", type=int, default=None, help=f"matrix completion: trials {mc('trials')}")
    p.add_argument("--steps", type=int, default=None, help=f"matrix completion: steps per run {mc('steps')}")
    p.add_argument("--d", type=int, default=None, help=f"matrix completion: dimension d {mc('d')}")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (seed, seed+1, ...): mean, std and min-max bands over them "
                        "(default: 3 with --quick, 1 at full scale)")
    p.add_argument("--out", default=None, help="output directory (default: runs/NAME)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from coopsgd.experiments.report import render_report

    name = "matrix-completion" if args.name == "lsgd-matrix-completion" else args.name
    if args.dir is not None and name != "report":
        raise ConfigError.invalid("DIR", args.dir, f"only `reproduce report DIR` takes a directory; use --out with {name}")
    _check_dry_run_flags(name, args)
    if args.device != "cpu":
        from coopsgd.experiments.registry import DRY_RUNS
        from coopsgd.train.config import check_device

        if name not in (*DRY_RUNS, "all"):
            raise ConfigError.invalid("--device", args.device, f"{name} computes with numpy on the CPU; --device "
                                      f"applies to {', '.join(DRY_RUNS)} or all")
        try:
            check_device(args.device, engine=args.engine or "simulate")
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("device=", "--device=", 1), field="--device", value=args.device) from None
    if name == "report":
        target = args.dir if args.dir is not None else args.out
        if target is None:
            raise ConfigError.invalid("DIR", None, "give the directory of a `reproduce all` run: reproduce report DIR")
        if Path(target).is_dir():
            from coopsgd.fileio import lock_directory
            from coopsgd.train.rundir import check_results_dir

            check_results_dir(target)  # a report.md of someone else's is not replaced
            _held = lock_directory(target, "output directory")  # no `reproduce` writes it meanwhile
        path = render_report(target)
        print(f"report: {path}")
        return 0
    if args.out is not None:
        from coopsgd.fileio import check_output_path

        check_output_path(args.out, "--out", directory=True)
    default_dir = f"{name}-dry-run" if args.dry_run else name
    out_dir = Path(Path("runs") / default_dir if args.out is None else args.out)
    args.seed = flag_int("--seed", args.seed, 0)
    if args.seeds is not None:
        args.seeds = flag_int("--seeds", args.seeds, 1, 100)
    last_seed = args.seed + (args.seeds if args.seeds is not None else (3 if args.quick else 1)) - 1
    if last_seed > INT64_MAX:  # every seed, checked before the first run
        raise ConfigError.invalid("--seeds", args.seeds, f"the last seed, --seed + --seeds - 1 = {last_seed}, must be "
                                                         "at most 2^63 - 1")
    if name != "matrix-completion":
        for flag in ("ranks", "trials", "steps", "d"):
            if getattr(args, flag) is not None:
                raise ConfigError.invalid("--" + flag, getattr(args, flag), f"a matrix-completion flag; {name} does "
                                          "not take it")
    from coopsgd.fileio import discard_unused, first_missing, lock_directory
    from coopsgd.train.rundir import check_results_dir

    for d in [out_dir, *((out_dir / e for e in REPRODUCTIONS) if name == "all" else ())]:
        check_results_dir(d)  # never replace a file coopsgd did not write, never write into a run directory
    created = first_missing(out_dir)
    _held = lock_directory(out_dir, "output directory")  # one writer until this command returns
    try:
        return _reproduce_into(name, args, out_dir)
    except BaseException:
        if created is not None:
            discard_unused(out_dir, created)  # refused before anything was written: no empty directory left
        raise


def _reproduce_into(name: str, args: argparse.Namespace, out_dir: Path) -> int:
    """``reproduce NAME`` (or ``all``) into ``out_dir``, whose lock this process holds."""
    from coopsgd.experiments.report import REPORT_ORDER, render_report

    memory = (f"dry run: needs about {DRY_RUN_MEMORY_GB:g} GB of memory (measured at the VGG-16 settings of "
              "csgd-fig3..6: 8 workers of batch 128); the peak of this run is printed at the end")
    if name == "all":
        from coopsgd.experiments.registry import DRY_RUNS

        summaries = []
        if args.dry_run:
            print(f"dry run of the full-scale experiments ({', '.join(DRY_RUNS)}); "
                  f"{', '.join(e for e in REPORT_ORDER if e not in DRY_RUNS)} have no full scale on real data and "
                  "are not run", flush=True)
            print(memory, flush=True)
        for exp in (DRY_RUNS if args.dry_run else REPORT_ORDER):
            data = _reproduce_one(exp, args, out_dir / exp)
            write_json(out_dir / exp / "result.json", data)
            summaries += data.get("summary", [])
            print("\n".join(data.get("summary", [])), flush=True)
        path = render_report(out_dir)
        print(f"report: {path}")
        return 0
    if args.dry_run and not args.json:
        print(memory, flush=True)
    data = _reproduce_one(name, args, out_dir)
    write_json(out_dir / "result.json", data)
    if args.json:
        print_json(data)
    else:
        for line in data.get("summary", []):
            print(line)
        if data.get("plots"):
            print(f"plots: {', '.join(str(p) for p in data['plots'])}")
    return 0


def _reproduce_one(name: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Run experiment ``name`` as ``reproduce`` was asked to (seeds, scale, engine) into ``out_dir``; the result
    records the code that produced it (``provenance``, :mod:`coopsgd.experiments.provenance`), taken when the
    run starts."""
    from coopsgd.experiments.provenance import finish, provenance

    started = provenance()
    data = _run_one(name, args, out_dir)
    data["provenance"] = finish(started)
    return data


def _run_one(name: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    from coopsgd.experiments.registry import EXPERIMENTS

    if name == "matrix-completion":
        return _matrix_completion(args, out_dir)
    if name not in EXPERIMENTS:
        raise ConfigError.invalid("NAME", args.name, f"choose one of {', '.join(experiment_names())}")
    from coopsgd.experiments.harness import ExperimentArgs
    from coopsgd.experiments.multiseed import DEFAULT_QUICK_SEEDS, run_seeds

    entry = EXPERIMENTS[name]
    engine = args.engine or entry.engines[0]
    if engine not in entry.engines:
        raise ConfigError.invalid("--engine", engine, f"{name} runs on {', '.join(entry.engines)}")
    n = args.seeds if args.seeds is not None else (DEFAULT_QUICK_SEEDS if args.quick else 1)
    run = ExperimentArgs(out=out_dir, quick=args.quick, seed=args.seed, engine=engine, progress=progress_wanted(args),
                         dry_run=bool(args.dry_run), all_settings=bool(args.dry_run and args.all_settings),
                         device=args.device, overwrite=bool(args.overwrite))
    return run_seeds(name, run, seeds=[args.seed + k for k in range(n)])


def _check_dry_run_flags(name: str, args: argparse.Namespace) -> None:
    """``--dry-run`` / ``--all-settings``: refuse the combinations that make no sense (one line, exit 2)."""
    if args.all_settings and not args.dry_run:
        raise ConfigError.invalid("--all-settings", True, "only a --dry-run takes it (every setting of each sweep)")
    if not args.dry_run:
        return
    from coopsgd.experiments.registry import DRY_RUNS

    if name == "report":
        raise ConfigError.invalid("--dry-run", True, "`reproduce report DIR` renders a report and runs nothing")
    if name not in (*DRY_RUNS, "all"):
        raise ConfigError.invalid("--dry-run", True, f"{name} has no full scale on real data to smoke-test; "
                                  f"--dry-run takes {', '.join(DRY_RUNS)} or all")
    if args.quick:
        raise ConfigError.invalid("--quick", True, "cannot be combined with --dry-run (a dry run smoke-tests the "
                                  "full scale: two steps on synthetic data of the real shapes)")
    if args.seeds is not None:
        raise ConfigError.invalid("--seeds", args.seeds, "a --dry-run runs one seed (choose it with --seed)")


def _matrix_completion(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """``reproduce matrix-completion``: EASGD's centre vs LSGD's leader over ranks ([LSGD])."""
    from coopsgd.experiments import (
        MC_QUICK,
        MC_SETTINGS,
        parse_ranks,
        plot_matrix_completion,
        public,
        run_matrix_completion,
    )
    from coopsgd.experiments.matrix_completion import mc_assessment
    from coopsgd.experiments.stats import VERDICT_MARKS

    if args.seeds is not None and args.name != "all":
        raise ConfigError.invalid("--seeds", args.seeds, "matrix-completion repeats over --trials (each trial "
                                  "is its own seed)")
    base = MC_QUICK if args.quick else MC_SETTINGS
    ranks = parse_ranks(args.ranks) if args.ranks is not None else base["ranks"]
    twice = [r for i, r in enumerate(ranks) if r in ranks[:i]]
    if twice:
        raise ConfigError.invalid("--ranks", args.ranks, f"{twice[0]} is given twice; list each rank once")
    d = base["d"] if args.d is None else flag_int("--d", args.d, 2)
    if d * max(ranks) > MC_MAX_PARAMS:
        raise ConfigError.invalid("--d", d, f"d x rank = {d} x {max(ranks)} parameters per model must be <= "
                                  f"{MC_MAX_PARAMS:,} (every worker and the centre hold one)")
    t0 = time.perf_counter()
    # a given 0 is refused (never "the default"): only an absent flag takes the setting's default
    res = run_matrix_completion(
        d=d, ranks=ranks,
        trials=base["trials"] if args.trials is None else flag_int("--trials", args.trials, 1),
        steps=base["steps"] if args.steps is None else flag_int("--steps", args.steps, 1),
        seed=args.seed, progress=progress_wanted(args),
    )
    plot = plot_matrix_completion(res, out_dir / "matrix_completion.png")
    data = public(res)
    data.update(mc_assessment(data))
    data.update({"experiment": "matrix-completion", "quick": args.quick, "seeds": list(range(data["settings"]["trials"])),
                 "description": "[LSGD] matrix completion: EASGD's centre vs LSGD's leader over ranks",
                 "scale": f"d={d}, ranks {ranks}, {data['settings']['trials']} trials, "
                          f"{data['settings']['steps']} steps, p=8, lr 5e-4, lambda 1/5",
                 "runtime_s": round(time.perf_counter() - t0, 1)})
    data["plots"] = [str(plot)]
    data["summary"] = [
        f"matrix completion, d={data['settings']['d']}, {data['settings']['trials']} trials, "
        f"{data['settings']['steps']} steps; final centre objective (mean +- std):"
    ] + [
        f"  r={r:<4d} EASGD {data['easgd'][str(r)]['mean']:.4g} +- {data['easgd'][str(r)]['std']:.2g}   "
        f"LSGD {data['lsgd'][str(r)]['mean']:.4g} +- {data['lsgd'][str(r)]['std']:.2g}"
        for r in data["settings"]["ranks"]
    ] + [f"  [{VERDICT_MARKS.get(c['verdict'], c['verdict'])}] {c['paper']}" for c in data["claims"]]
    return data
