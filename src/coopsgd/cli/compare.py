"""``coopsgd compare``: several presets on equal footing (same data, model, seed and simulated network), or a
named comparison (``--set``); one run directory each, a figure and a table."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

from coopsgd.algorithms.presets import PRESETS
from coopsgd.algorithms.registry import declaration
from coopsgd.cli.common import presets_epilog, print_json, progress_wanted, use_threads, write_json
from coopsgd.cli.config_flags import add_config_flags, config_from_args, file_keys
from coopsgd.errors import ConfigError
from coopsgd.settings import default_text as shown_default
from coopsgd.settings import settings_of
from coopsgd.train.config import AlgorithmSettings, RunConfig
from coopsgd.train.rundir import check_compare_dir, fresh_run_dir, lock_directory, prepare_compare_dir

__all__ = ["register", "cmd_compare", "COMPARE_DEFAULTS", "COMPARE_PRESETS", "COMPARE_SETS", "CompareSet"]

#: Defaults of ``coopsgd compare`` where they differ from a single run's (RunConfig's).
COMPARE_DEFAULTS: dict[str, Any] = {"model": "lenet", "epochs": 15.0}
#: ``coopsgd compare``'s preset list without ``--presets`` or ``--set``.
COMPARE_PRESETS = "sync,local_sgd,easgd,dpsgd,lsgd"


class CompareSet:
    """A named comparison for ``coopsgd compare --set NAME``: its runs and the settings they share.

    ``runs``: ``(label, preset, settings)``; the label names the run's directory and its line in the table and
    figure, ``settings`` are RunConfig fields of that run alone (e.g. its tau). ``defaults``: RunConfig fields
    of every run, in place of :data:`COMPARE_DEFAULTS`. A flag or config-file key the user gives overrides
    both (a per-run setting only in the runs whose preset takes it). A default that conflicts with a given
    key is dropped (``FOLLOWS``): ``--epochs`` drops the set's ``max_steps``, ``--model`` its ``model_args``.
    """

    #: A set default that is dropped when the user gives one of these keys.
    FOLLOWS: dict[str, tuple[str, ...]] = {"max_steps": ("epochs",), "model_args": ("model",)}

    def __init__(self, name: str, summary: str, runs: tuple[tuple[str, str, dict[str, Any]], ...],
                 defaults: dict[str, Any]) -> None:
        self.name, self.summary, self.runs, self.defaults = name, summary, runs, defaults

    def epilog_line(self) -> str:
        runs = "; ".join(label + (f" ({', '.join(f'{k} {shown_default(v)}' for k, v in s.items())})" if s else "")
                         for label, _, s in self.runs)
        return f"  {self.name}: {self.summary}: {runs}"


#: The named comparisons of ``coopsgd compare --set`` (docs/optimizers.md shows ``modern``'s and ``llm``'s results,
#: docs/compression.md ``compressed``'s and ``compressed-lm``'s).
COMPARE_SETS: dict[str, CompareSet] = {
    "modern": CompareSet(
        "modern",
        "AdamW inside every worker (lr 0.003, betas 0.9/0.999, weight decay 0.01) on a small WikiText-2 LSTM "
        "(1 layer, 32 units, 4 workers, batch 8, 200 steps) over a slow network (50 ms, 100 Mbit/s)",
        runs=(
            ("sync", "sync", {}),
            ("local_sgd", "local_sgd", {"tau": 20}),
            # the diloco preset's tau default is the paper's H = 500: set so that a short run has rounds
            ("diloco", "diloco", {"tau": 20, "outer_optimizer": "nesterov", "outer_lr": 0.7, "outer_momentum": 0.9}),
            ("slowmo", "slowmo", {"tau": 20, "base_algorithm": "local_sgd", "outer_lr": 1.0, "outer_momentum": 0.5}),
        ),
        defaults={
            "model": "lstm_lm", "dataset": "wikitext2",
            "model_args": {"emb_size": 32, "hidden_size": 32, "num_layers": 1},
            "workers": 4, "batch_size": 8, "max_steps": 200, "eval_every": 20, "eval_samples": 100,
            "optimizer": "adamw", "lr": 0.003, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01,
            "net_latency_ms": 50.0, "net_bandwidth_mbps": 100.0,
        },
    ),
    # issue 23 item 5 (docs/compression.md shows the results): the MNIST runs here, the LSTM ones in
    # compressed-lm (one set shares one model and data set)
    "compressed": CompareSet(
        "compressed",
        "compressed communication on bundled MNIST (MLP 784-100-10, 8 workers, batch 32, lr 0.1, 400 steps, "
        "constant 10 ms per step, network 1 ms / 100 Mbit/s): D-PSGD against CHOCO-SGD on a ring, local SGD "
        "against compressed averaging with error feedback",
        runs=(
            ("dpsgd", "dpsgd", {}),
            ("choco_topk", "choco", {"compress": "topk:0.01", "consensus_step": 0.05}),
            ("choco_sign", "choco", {"compress": "sign", "consensus_step": 0.1}),
            ("choco_int8", "choco", {"compress": "int8"}),
            ("local_sgd", "local_sgd", {"tau": 4}),
            ("local_sgd_int8", "local_sgd", {"tau": 4, "compress": "int8"}),
            ("local_sgd_topk", "local_sgd", {"tau": 4, "compress": "topk:0.01"}),
        ),
        defaults={
            "model": "mlp", "model_args": {"hidden": [100]}, "dataset": "mnist_bundled", "workers": 8,
            "batch_size": 32, "lr": 0.1, "max_steps": 400, "eval_every": 40, "eval_samples": 1000,
            "topology": "ring", "compute": "constant", "compute_ms": 10.0, "net_latency_ms": 1.0,
            "net_bandwidth_mbps": 100.0,
        },
    ),
    "compressed-lm": CompareSet(
        "compressed-lm",
        "DiLoCo with an exact outer step against a top-1% outer step with error feedback on the modern set's "
        "WikiText-2 LSTM (AdamW inside, Nesterov outside, tau 20, 4 workers, 200 steps, 50 ms / 100 Mbit/s)",
        runs=(
            ("diloco", "diloco", {"tau": 20, "outer_optimizer": "nesterov", "outer_lr": 0.7, "outer_momentum": 0.9}),
            ("diloco_topk", "diloco", {"tau": 20, "outer_optimizer": "nesterov", "outer_lr": 0.7,
                                            "outer_momentum": 0.9, "compress": "topk:0.01"}),
        ),
        defaults={
            "model": "lstm_lm", "dataset": "wikitext2",
            "model_args": {"emb_size": 32, "hidden_size": 32, "num_layers": 1},
            "workers": 4, "batch_size": 8, "max_steps": 200, "eval_every": 20, "eval_samples": 100,
            "optimizer": "adamw", "lr": 0.003, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01,
            "compute": "constant", "compute_ms": 10.0, "net_latency_ms": 50.0, "net_bandwidth_mbps": 100.0,
        },
    ),
    # issue 27 item 4 (docs/optimizers.md shows the results): how language models are trained across uneven
    # machines today, on one simulated cluster with a slow class of workers
    "llm": CompareSet(
        "llm",
        "the small GPT (2 layers, 4 heads, width 64, context 35) on WikiText-2, AdamW inside every worker (lr 0.003), "
        "4 workers of which 2 run at half speed (worker_speeds 1,0.5), batch 8, 200 steps, 50 ms / 100 Mbit/s: "
        "synchronous AdamW, DiLoCo, Streaming DiLoCo (4 fragments, with and without 4-bit outer updates) and "
        "asynchronous local SGD",
        runs=(
            ("sync", "sync", {}),
            ("diloco", "diloco", {"tau": 20, "outer_optimizer": "nesterov", "outer_lr": 0.7, "outer_momentum": 0.9}),
            ("streaming", "streaming_diloco", {"tau": 20, "fragments": 4, "fragment_split": "coordinates",
                                               "fragment_delay": 2, "merge_alpha": 0.5, "outer_lr": 0.7,
                                               "outer_momentum": 0.9}),
            ("streaming_int4", "streaming_diloco", {"tau": 20, "fragments": 4, "fragment_split": "coordinates",
                                                    "fragment_delay": 2, "merge_alpha": 0.5, "outer_lr": 0.7,
                                                    "outer_momentum": 0.9, "compress": "int4"}),
            ("async_local_sgd", "async_local_sgd", {"tau": 20, "outer_lr": 0.7, "outer_momentum": 0.5,
                                                    "delayed_nesterov": 4, "dynamic_local_updates": True}),
        ),
        defaults={
            "model": "gpt", "dataset": "wikitext2",
            "model_args": {"layers": 2, "heads": 4, "width": 64, "context": 35},
            "workers": 4, "batch_size": 8, "max_steps": 200, "eval_every": 20, "eval_samples": 100,
            "optimizer": "adamw", "lr": 0.003, "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.01,
            "worker_speeds": [1.0, 0.5], "net_latency_ms": 50.0, "net_bandwidth_mbps": 100.0,
        },
    ),
}


def register(sub: Any, fmt: type[argparse.HelpFormatter]) -> None:
    """Add ``coopsgd compare`` to the sub-command parsers."""
    compare_defaults = ", ".join(f"{k} {shown_default(v)}" for k, v in COMPARE_DEFAULTS.items())
    p = sub.add_parser(
        "compare", help="run several algorithms on equal footing; one figure and a table", formatter_class=fmt,
        epilog=presets_epilog() + "\nsets (--set NAME):\n"
        + "\n".join(s.epilog_line() for s in COMPARE_SETS.values()),  # an epilog is not %-formatted
        description="Train several presets on equal footing (same data, model, seed and simulated network); write "
                    "one run directory each, compare.png, compare.json (with --set also compare_cost.png: test "
                    "loss against the simulated clock and the bytes sent), and print a table.\n"
                    f"Defaults: the main job, {compare_defaults} (a small CNN; `coopsgd run` defaults to model "
                    "mlp, 5 epochs), 8 workers, mnist_bundled; every flag and config key overrides them.")
    p.add_argument("--presets", default=None,
                   help=f"comma-separated presets (listed below) (default: {COMPARE_PRESETS})")
    p.add_argument("--set", default=None,
                   help=f"a named comparison instead of --presets: {', '.join(COMPARE_SETS)} (listed below: its runs, "
                        "their own settings and the defaults it brings; flags override them) (default: none)")
    add_config_flags(p, skip=("preset",), defaults=COMPARE_DEFAULTS, other="coopsgd run",
                     default_text={"out": "a new runs/compare-YYYYmmdd-HHMMSS, one run directory per preset inside"})
    p.add_argument("--overwrite", action="store_true", help="replace the comparison of another configuration in --out "
                                                            "(its files are removed first)")
    p.set_defaults(func=cmd_compare)


def _compare_plan(args: argparse.Namespace) -> tuple[RunConfig, list[tuple[str, RunConfig]]]:
    """The shared config and one ``(label, config)`` per run of ``coopsgd compare`` (no ``out`` yet); nothing
    is written. Shared flags apply to a run where its preset takes them."""
    set_name = getattr(args, "set", None)
    if set_name is not None:
        if set_name not in COMPARE_SETS:
            raise ConfigError.invalid("--set", set_name, f"choose from {', '.join(COMPARE_SETS)}")
        if args.presets is not None:
            raise ConfigError.invalid("--presets", args.presets, "cannot be combined with --set (the set names "
                                                                 "its presets)")
        chosen = COMPARE_SETS[set_name]
        runs = [(label, preset, dict(s)) for label, preset, s in chosen.runs]
        own_defaults = chosen.defaults
    else:
        text = COMPARE_PRESETS if args.presets is None else args.presets
        names = [p.strip() for p in text.split(",") if p.strip()]
        if not names:
            raise ConfigError.invalid("--presets", args.presets, "give at least one preset")
        twice = [n for i, n in enumerate(names) if n in names[:i]]
        if twice:
            raise ConfigError.invalid("--presets", args.presets, f"{twice[0]!r} is given twice; list each preset once")
        for n in names:
            if n not in PRESETS:
                raise ConfigError.invalid("--presets", n, f"choose from {', '.join(PRESETS)}")
        runs = [(n, n, {}) for n in names]
        own_defaults = COMPARE_DEFAULTS
    # the command's (or the set's) defaults; flags and config-file keys override them
    given = (set(vars(args)) | file_keys(args.config)) - {"presets", "set"}
    defaults = {k: v for k, v in own_defaults.items()
                if k not in given and not given.intersection(CompareSet.FOLLOWS.get(k, ()))}
    base = config_from_args(args, preset=runs[0][1], **defaults)
    plan: list[tuple[str, RunConfig]] = []
    for label, preset, settings in runs:
        cfg = base.replace(preset=preset)
        # shared flags apply where the preset takes them: clear the settings it does not take
        decl = declaration(preset)
        cleared = {s.key: s.default for s in settings_of(AlgorithmSettings)
                   if s.info.preset and not decl.takes(s.key) and getattr(cfg.algorithm, s.name) != s.default}
        own = {k: v for k, v in settings.items() if k not in given}
        if cleared or own:
            cfg = cfg.replace(**{**cleared, **own})
        plan.append((label, cfg))
    return base, plan


def _table(results: dict[str, dict[str, Any]], metric: str | None) -> str:
    """The printed table of a comparison: one row per run; no header is cut, and the time column names its clock
    ("simulated s" from the simulated clock, "measured s" from a real one) beside the wall-clock seconds. "peak MB"
    is ``peak_bytes_per_step``: the most bytes the rounds of any one step sent."""
    label = metric.replace("test_", "test ") if metric else ""
    width = max(10, len(label))
    sources = {r.get("time_source") or "simulated" for r in results.values()}
    clock = f"{sources.pop()} s" if len(sources) == 1 else "run clock s"
    tw = max(10, len(clock))
    name_w = max(24, *(len(n) for n in results))
    head = f"{'preset':{name_w}s} {'train loss':>10s} {'test loss':>10s}"
    head += f" {label:>{width}s}" if metric else ""
    head += f" {'rounds':>7s} {'MB sent':>9s} {'peak MB':>8s} {clock:>{tw}s} {'comm %':>7s} {'wall s':>7s}"
    lines = [head]
    for n, r in results.items():
        f = r["final"]
        sim = r["time_s"]
        comm = (r.get("simulated_split_s") or r.get("measured_split_s") or {}).get("communication_s") or 0.0
        line = f"{n:{name_w}s} {f['train_loss']:10.4g} {f['test_loss']:10.4g}"
        line += f" {f.get(metric, float('nan')):{width}.4g}" if metric else ""
        peak = r.get("peak_bytes_per_step")
        line += (f" {r['communication_rounds']:7d} {r['bytes_sent'] / 1e6:9.3g} "
                 f"{float('nan') if peak is None else peak / 1e6:8.3g} {sim:{tw}.4g} "
                 f"{100 * comm / sim if sim else 0:6.1f}% {r['wall_time_s']:7.1f}")
        lines.append(line)
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace) -> int:
    from coopsgd.plots import plot_runs  # matplotlib, torch: only when a comparison starts
    from coopsgd.train.problem import settle
    from coopsgd.train.trainer import run

    base, plan = _compare_plan(args)
    names = [label for label, _ in plan]

    # a directory of its own (runs/compare-<time>[-N]), or --out: refused when it holds another comparison
    # unless --overwrite; the old comparison's files are removed before the first run
    out = Path(base.output.out) if base.output.out else fresh_run_dir("compare")
    overwrite = bool(getattr(args, "overwrite", False))
    check_compare_dir(out, base.to_dict(), names, overwrite=overwrite)  # refused: nothing is written
    _held = lock_directory(out, "compare directory")  # one writer until this command returns
    prepare_compare_dir(out, base.to_dict(), names, overwrite=overwrite)
    if not args.json and not base.output.out:
        print(f"coopsgd: writing the comparison to {out}", file=sys.stderr, flush=True)
    meta: dict[str, Any] = {"config": base.to_dict(), "presets": names}
    if getattr(args, "set", None) is not None:  # the set's runs differ in more than their preset: keep each config
        meta["set"] = args.set
        meta["runs"] = {label: cfg.to_dict() for label, cfg in plan}
    write_json(out / "compare.json", {**meta, "results": {}})
    results: dict[str, dict[str, Any]] = {}
    dirs: list[Path] = []
    for n, cfg in plan:
        cfg, notes = settle(cfg.replace(out=str(out / n)))  # the defaults that depend on the run, written in
        use_threads(cfg)
        if not args.json:
            print(f"[{len(dirs) + 1}/{len(names)}] {n} ...", file=sys.stderr, flush=True)
            for note in notes:
                print(f"coopsgd: note: {n}: {note}", file=sys.stderr, flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[n] = run(cfg, progress=progress_wanted(args))
        dirs.append(out / n)
    engine, problem, clock = base.execution.engine, base.problem, base.clock
    title = (f"{engine}: {problem.model if engine == 'simulate' else problem.objective}, "
             f"m={base.algorithm.workers}, network {clock.net_latency_ms} ms / {clock.net_bandwidth_mbps} Mbit/s")
    fig = plot_runs(dirs, out / "compare.png", labels=names, title=title)
    figs = [fig]
    if "set" in meta:  # a set's cost view: the centre model's test loss against the clock and the bytes sent
        figs.append(plot_runs(dirs, out / "compare_cost.png", labels=names, title=title, against=("time", "bytes")))
    write_json(out / "compare.json", {**meta, "results": results})
    if args.json:
        print_json({"results": results, "plot": str(fig), "out": str(out),
                     **({"cost_plot": str(figs[1])} if len(figs) > 1 else {})})
        return 0
    metric = "test_accuracy" if any("test_accuracy" in r["final"] for r in results.values()) else (
        "test_perplexity" if any("test_perplexity" in r["final"] for r in results.values()) else None)
    print(_table(results, metric))
    print(f"figure{'s' if len(figs) > 1 else ''}: {', '.join(map(str, figs))}   table: {out / 'compare.json'}")
    return 0
