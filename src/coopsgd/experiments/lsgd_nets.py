"""[LSGD] deep-net experiments: ``coopsgd reproduce lsgd-nets`` (here) and ``coopsgd reproduce lsgd-lstm``
(:mod:`coopsgd.experiments.lsgd_lstm`, which tunes with this module's sweep, :func:`run_methods`).

Four methods on the same model, data and budget: fully synchronous SGD, DOWNPOUR, EASGD and LSGD; the
curves are the test loss (perplexity for the LSTM) of the *centre* variable -- the average for SGD, the
server/auxiliary z for DOWNPOUR and EASGD, the leader for LSGD -- against simulated wall-clock, and the table
is the fraction of simulated time spent communicating ([LSGD] Table 6).

``lsgd-nets`` tunes LSGD and EASGD the way [LSGD] does: LSGD runs every pulling strength lambda of the paper's
grid :data:`LSGD_LAMBDAS` and EASGD every beta of :data:`EASGD_BETAS` (the paper's 0.43, bracketed by a
stronger 0.9 and a weaker 0.1 pull: one point each side is enough to see whether 0.43 sits in a valley, and
keeps the sweep affordable on a CPU). Every run of both nets holds out :data:`HOLDOUT_FRACTION` of the training
set (``RunConfig.holdout_fraction``: seeded by the run's seed, never trained on). The selection rule
(:func:`select_by_holdout`): all runs of one method have the same step budget, and the setting whose centre
variable has the lowest held-out loss at the end of its run is that method's tuned setting (a diverged
run is never chosen; ties go to the earlier setting of the grid). The curves and the claims compare SGD,
DOWNPOUR and the two *tuned* methods; the chosen lambda / beta of each seed and the held-out loss of every
setting are reported as metrics and drawn in ``lsgd_nets_sweep.png``. The choice uses held-out training
data only: the test set is never looked at to pick a setting. The labels of the tuned curves
(:data:`NET_METHODS`) do not name the setting, so every seed draws the same four curves.
``lsgd-lstm`` tunes the same way on a smaller grid (:data:`LSTM_METHODS`: lambda in {0.1, 0.25, 0.025}, beta in
{0.43, 0.9}; 10% of the training windows held out; ``lsgd_lstm_sweep.png``): seven runs per seed instead of
the nets' ten, since a quick LSTM run costs about half a minute on 2 CPU cores. tau = 4 for the three
communication-saving methods is our choice. ``lsgd-nets``' DOWNPOUR runs at the learning rate divided by the
number of workers, and on the quick scale's constant simulated clock in the schedule's seeded push order
(:func:`downpour_settings`; why: :data:`DOWNPOUR_FINDING`, which the report prints). Metrics and tables name
each net by its role at both scales, with what runs at the quick scale (:data:`ROLE_NAMES`:
``"CNN-7 (quick: LeNet)"``).

Full scale: CNN-7 and ResNet-20 on CIFAR-10 (needs torchvision + the files; batch 128), and the 2-layer,
200-unit LSTM on WikiText-2 (sequence 35, 4 workers; trains on valid.txt and tests on test.txt when the
train split is absent). Quick scale: LeNet and an MLP on the bundled MNIST subset standing in for CNN-7 and
ResNet-20 (both real CIFAR nets cost minutes per step-hundred on 2 CPU cores), 200 steps each with ten
evaluations of 1,000 samples (the sweep runs 20 settings per seed); and a 2-layer LSTM with 64 units on the
bundled WikiText-2 files with the vocabulary cut to the 2,000 most frequent words.

``args.dry_run`` (``coopsgd reproduce lsgd-nets | lsgd-lstm --dry-run``) runs every method of the full scale
for two steps on synthetic data of the real shapes: 3x32x32 images of 10 classes for CNN-7 and ResNet-20,
random tokens of WikiText-2's 33,278-word vocabulary for the LSTM. Every method runs once (the first setting
of each sweep; ``args.all_settings``: the whole sweep).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.experiments.base import assess, register
from coopsgd.experiments.dry_run import DRY_RUN_STEPS, dry_run_fields, dry_run_summary
from coopsgd.experiments.figure_axes import clock_x
from coopsgd.experiments.harness import (
    DEVICE,
    ENGINE,
    ExperimentArgs,
    check_full_data,
    describe_time,
    panel,
    plot_panels,
    public_runs,
    run_config,
    scaled,
    series,
    time_fields,
)
from coopsgd.experiments.stats import Assessment, Claim, PaperRow
from coopsgd.train.config import RunConfig

__all__ = [
    "NET_METHODS",
    "LSGD_LAMBDAS",
    "EASGD_BETAS",
    "HOLDOUT_FRACTION",
    "SELECTION",
    "select_by_holdout",
    "loss_at_time",
    "final_holdout_loss",
    "run_methods",
    "method_lines",
    "NETS_FULL",
    "NETS_QUICK",
    "ROLE_NAMES",
    "DOWNPOUR_FINDING",
    "downpour_settings",
    "run_lsgd_nets",
    "nets_metrics",
]

#: [LSGD]'s grid of LSGD's pulling strength lambda.
LSGD_LAMBDAS: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05, 0.025)
#: EASGD's beta grid: the paper's 0.43 first (the dry run's setting), then a stronger and a weaker pull.
EASGD_BETAS: tuple[float, ...] = (0.43, 0.9, 0.1)
#: Share of the training set every ``lsgd-nets`` run holds out for the selection (``RunConfig.holdout_fraction``).
HOLDOUT_FRACTION = 0.1

#: ``lsgd-nets``' methods: (label of the reported curve, preset, fixed RunConfig fields, swept field or None,
#: its grid). The label does not name the chosen setting: the same on every seed.
#: A method of a sweep: (label of the reported curve, preset, fixed RunConfig fields, swept field or None, its grid).
Method = tuple[str, str, dict[str, Any], str | None, tuple[float, ...]]
NET_METHODS: list[Method] = [
    ("SGD (sync)", "sync", {}, None, ()),
    ("DOWNPOUR (lr/m, tau=4)", "downpour", {"tau": 4}, None, ()),
    ("EASGD (tuned beta, tau=4)", "easgd", {"tau": 4}, "beta", EASGD_BETAS),
    ("LSGD (tuned lambda, tau=4)", "lsgd", {"tau": 4}, "lam", LSGD_LAMBDAS),
]
#: How the swept fields are written in labels and metric names.
SWEPT_NAME = {"lam": "lambda", "beta": "beta"}

NETS_FULL: list[dict[str, Any]] = [
    {"name": "CNN-7", "model": "cnn7", "dataset": "cifar10"},
    {"name": "ResNet-20", "model": "resnet20", "dataset": "cifar10"},
]
NETS_QUICK: list[dict[str, Any]] = [
    {"name": "LeNet (stand-in for CNN-7)", "model": "lenet", "dataset": "mnist_bundled", "executor": "loop"},
    {"name": "MLP (stand-in for ResNet-20)", "model": "mlp", "dataset": "mnist_bundled", "executor": "vmap"},
]
_NET_TRAIN_FULL: dict[str, Any] = {
    "workers": 4,
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "epochs": 200.0,
    "lr_decay_epochs": [100.0, 150.0],
    "eval_samples": 10000,
    "holdout_fraction": HOLDOUT_FRACTION,
}
_NET_TRAIN_QUICK: dict[str, Any] = {
    "workers": 4,
    "batch_size": 32,
    "lr": 0.1,
    "max_steps": 200,
    "eval_samples": 1000,
    "holdout_fraction": HOLDOUT_FRACTION,
}
#: The width of the net's name in the summary lines (the longest name, "MLP (stand-in for ResNet-20)").
_NET_WIDTH = max(len(n["name"]) for n in [*NETS_FULL, *NETS_QUICK])
#: Evaluations of a quick run (each: test, training and held-out samples, ``eval_samples`` of each).
_QUICK_EVALS = 10


def downpour_settings(base: dict[str, Any], *, constant_clock: bool) -> dict[str, Any]:
    """DOWNPOUR's own settings in ``lsgd-nets`` (see :data:`DOWNPOUR_FINDING`): the learning rate divided by the
    number of workers -- its server adds every worker's pushed update as it arrives instead of averaging
    them, so one round of m pushes moves it as far as one averaged round of the other methods -- and, on a
    simulated clock of constant compute time (quick scale), the seeded push order of the schedule
    (``downpour_order="schedule"``): every worker arrives at the same instant there, and the clock's order
    would break that tie by worker index, the same order in every round."""
    out: dict[str, Any] = {"lr": base["lr"] / base["workers"]}
    if constant_clock:
        out["downpour_order"] = "schedule"
    return out


#: What ``lsgd-nets``' DOWNPOUR baseline needed, and why (printed under the paper table of the report).
DOWNPOUR_FINDING = (
    "DOWNPOUR: with the other methods' learning rate (0.1) and the arrival order of the simulated clock, "
    "DOWNPOUR stayed at 0.1-0.4 test accuracy on the LeNet (seeds 0-2: 0.12, 0.42, 0.39 after 200 steps; sync "
    "SGD 0.94 on seed 0). Part of that is the algorithm: its server adds each worker's accumulated tau-step update as it "
    "arrives, so with m = 4 workers and tau = 4 one round moves the server by 16 steps of lr 0.1, each computed "
    "from a copy up to 12 steps stale; tau = 1 or 2 at lr 0.1 (0.89-0.96) and synchronous SGD at 4 x 0.1 without "
    "staleness (0.80) all learn. Part was our set-up: (1) DOWNPOUR ran at the learning rate of the averaging "
    "methods, untuned, while EASGD and LSGD are tuned; (2) with a constant compute time per step the workers "
    "arrive at the server together and the simulated clock gave the tie to the lowest index, so the push order "
    "was 0, 1, 2, 3 in every round and worker 0 always fetched the stalest copy -- a seeded random order "
    "instead gave 0.67-0.85 at lr 0.1. DOWNPOUR now runs at lr / m (0.025: 0.81-0.87 in the clock's order, 0.71-0.91 in the seeded "
    "order; lr / 2 would have given 0.89-0.93, but the rule is fixed beforehand, not picked on the test set) "
    "with the seeded push order on the quick scale's constant clock; the MLP learns at every setting tried "
    "(0.80-0.89). LeNet on the bundled MNIST subset, 200 steps, 4 workers, batch 32, one run per setting and "
    "seed."
)
#: How EASGD's and LSGD's reported setting is chosen (in every result).
SELECTION = ("per method, the setting whose centre variable has the lowest held-out loss at the end of its run "
             "(same step budget; diverged runs never chosen; ties: the earlier setting)")


def comm_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per reported run: its time and the share of it spent communicating ([LSGD] Table 6)."""
    rows = []
    for r in runs:
        total = r.get("time_s")
        comm = (r.get("simulated_split_s") or r.get("measured_split_s") or {}).get("communication_s")
        rows.append(
            {
                "net": r["net"],
                "method": r["method"],
                "time_s": total,
                "time_source": r.get("time_source"),
                "communication_s": comm,
                "communication_fraction": (comm / total) if total and comm is not None else None,
            }
        )
    return rows


def final_holdout_loss(run: dict[str, Any]) -> float | None:
    """Held-out loss of the centre variable at the last evaluation of ``run`` (``None``: diverged or none)."""
    if run.get("diverged"):
        return None
    vals = [r.get("holdout_loss") for r in run.get("_metrics", [])]
    vals = [v for v in vals if v is not None]
    return float(vals[-1]) if vals and np.isfinite(vals[-1]) else None


def select_by_holdout(runs: list[dict[str, Any]]) -> int | None:
    """Index of the run (one method's settings, same step budget) whose centre variable has the lowest held-out
    loss at the end (:func:`final_holdout_loss`); diverged runs are skipped, ties go to the earliest; ``None``
    when no run has a held-out loss."""
    best: int | None = None
    best_v = float("inf")
    for i, r in enumerate(runs):
        v = final_holdout_loss(r)
        if v is not None and v < best_v:
            best, best_v = i, v
    return best


def loss_at_time(run: dict[str, Any], t: float, y: str = "test_loss") -> float | None:
    """``y`` of ``run`` at simulated time ``t``, read off its curve: linear between the two evaluations around
    ``t`` (the value of the last evaluation at ``t`` itself or at the run's end). ``lsgd-nets`` compares the
    methods at the time the fastest one finished; the tuned EASGD and LSGD finish within 1% of each other, so
    the last evaluation at or before ``t`` would judge the slightly slower one a whole evaluation interval
    (20 steps) earlier."""
    xs, ys = series(run, "time_s", y)
    if not len(xs) or t < xs[0] - 1e-9:
        return None
    return float(np.interp(t, xs, ys))


def _setting_label(preset: str, key: str, value: float) -> str:
    return f"{preset.upper()} ({SWEPT_NAME[key]}={value:g}, tau=4)"


def _tune(net: str, label: str, preset: str, key: str, cands: list[dict[str, Any]]
          ) -> tuple[dict[str, Any], float | None, list[dict[str, Any]], dict[str, Any]]:
    """One method's sweep on one net: the reported run (the :func:`select_by_holdout` winner under the method's
    ``label``), the chosen value (``None``: every setting diverged, the first is reported), the sweep's rows and
    its line of the sweep figure."""
    pick = select_by_holdout(cands)
    won = cands[pick if pick is not None else 0]
    reported = {**won, "label": label, "method": label, "setting": {key: won[key]}, "chosen_from": won["label"]}
    rows = [{"net": net, "method": short(label), "preset": preset, "setting": key, "value": c[key],
             "label": c["label"], "dir": c["dir"], "diverged": c["diverged"],
             "final_holdout_loss": c["final_holdout_loss"],
             "final_test_loss": None if c["diverged"] else (c.get("final") or {}).get("test_loss"),
             "chosen": c is won and pick is not None} for c in cands]
    ordered = sorted((c for c in cands if c["final_holdout_loss"] is not None), key=lambda c: c[key])
    line = {"label": f"{net}: {short(label)}", "diverged": None, "key": key,
            "_metrics": [{"setting": c[key], "holdout_loss": c["final_holdout_loss"]} for c in ordered]}
    return reported, (float(won[key]) if pick is not None else None), rows, line


def run_methods(net: str, methods: list[Method], args: ExperimentArgs,
                run_one: Callable[[str, dict[str, Any], dict[str, Any], str, str], dict[str, Any]],
                ) -> tuple[list[dict[str, Any]], dict[str, float | None], list[dict[str, Any]],
                            list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every method of ``methods`` (:data:`NET_METHODS`, :data:`LSTM_METHODS`) on one net and tune the swept
    ones: every grid value (a dry run without ``args.all_settings``: the first, :meth:`ExperimentArgs.first`), the reported run chosen by
    :func:`_tune`. ``run_one(preset, settings, swept, label, subdir)`` runs one setting (``settings``: the
    method's fixed fields plus ``swept``, the swept field and its value, ``{}`` for an unswept method, which
    the run records so :func:`_tune` can read it; ``subdir``: the preset and the swept value).

    Returns the reported runs (one per method, in order), the chosen value per swept method, the sweep's rows
    and figure lines, and every run in the order it ran."""
    runs: list[dict[str, Any]] = []
    chosen: dict[str, float | None] = {}
    sweep: list[dict[str, Any]] = []
    lines: list[dict[str, Any]] = []
    executed: list[dict[str, Any]] = []
    for label, preset, kw, key, grid in methods:
        values: list[float | None] = [None] if key is None else args.first(grid)
        cands = []
        for v in values:
            own = {} if key is None else {key: v}
            run_label = label if key is None else _setting_label(preset, key, float(v))  # type: ignore[arg-type]
            sub = preset + ("" if key is None else f"_{SWEPT_NAME[key]}{v:g}")
            res = run_one(preset, {**kw, **own}, own, run_label, sub)
            res["final_holdout_loss"] = final_holdout_loss(res)
            cands.append(res)
            executed.append(res)
        if key is None:
            runs.append(cands[0])
            continue
        reported, value, rows, line = _tune(net, label, preset, key, cands)
        chosen[short(label)] = value
        runs.append(reported)
        sweep += rows
        lines.append(line)
    return runs, chosen, sweep, lines, executed


@register(
    "lsgd-nets",
    "[LSGD] Fig. 4/5 + Table 6: SGD, DOWNPOUR, EASGD, LSGD on CNN-7 and ResNet-20",
    engines=("simulate", "distributed"),
)
def run_lsgd_nets(args: ExperimentArgs, *, nets: int | None = None) -> dict[str, Any]:
    """Test loss of the centre variable vs simulated wall-clock of SGD, DOWNPOUR and the tuned EASGD and LSGD
    (the lambda / beta sweep and its held-out losses), and the communication fractions. ``nets``: run the first
    ``nets`` nets only."""
    catalog = NETS_QUICK if args.quick else NETS_FULL
    todo = catalog[: nets or len(catalog)]
    if not args.quick and not args.dry_run:
        check_full_data("cifar10")
    out = args.start()
    base = dict(_NET_TRAIN_QUICK if args.quick else _NET_TRAIN_FULL)
    if args.quick:
        base["max_steps"] = scaled(base["max_steps"], args.scale, 8)
    else:
        base["epochs"] = base["epochs"] * args.scale
    tf = time_fields(args.quick)
    runs: list[dict[str, Any]] = []  # the four reported (tuned) runs of every net
    sweep: list[dict[str, Any]] = []  # every swept setting's run
    chosen: dict[str, dict[str, float | None]] = {}
    plots = []
    sweep_lines: list[dict[str, Any]] = []
    executed: list[dict[str, Any]] = []  # every run, in the order it ran
    for net in todo:
        made: list[RunConfig] = []  # the configurations run on this net (the note names the last one's data)
        net_runs, chosen[net["name"]], rows, lines, done = run_methods(
            net["name"], NET_METHODS, args, functools.partial(_run_net, args, out, net, base, made))
        sweep += rows
        sweep_lines += lines
        executed += done
        plots.append(str(_plot_net(out, net, net_runs, made[-1], base, tf, dry_run=args.dry_run)))
        runs += net_runs
    plots.append(str(plot_sweep(out / "lsgd_nets_sweep.png", sweep_lines, base, tf)))
    table = comm_table(runs)
    equal_time = _equal_time(runs)
    summary = _nets_summary(args, runs, table, equal_time, sweep, base, tf)
    if args.dry_run:
        summary = dry_run_summary(
            "lsgd-nets", "every method on " + " and ".join(n["name"] for n in todo), executed,
            every=None if args.all_settings else f"EASGD's {len(EASGD_BETAS)} betas and LSGD's {len(LSGD_LAMBDAS)} lambdas")
    length = f"{base['max_steps']} steps" if "max_steps" in base else f"{base['epochs']:g} epochs"
    scale = (("quick scale: " if args.quick else "full scale: ") + ", ".join(n["name"] for n in todo)
             + f" on {todo[0]['dataset']}, {base['workers']} workers, batch {base['batch_size']}/worker, lr "
             f"{base['lr']:g} (DOWNPOUR lr/m), {length}, {100 * base['holdout_fraction']:g}% of the training set "
             f"held out for tuning; {describe_time(tf)}"
             + (f"; dry run: {DRY_RUN_STEPS} steps on synthetic data, a smoke test, not a result" if args.dry_run
                else ""))
    return {
        "experiment": "lsgd-nets",
        "scale": scale,
        "test_loss_at_equal_time": equal_time,
        "quick": args.quick,
        "time_model": tf,
        "train": base,
        "methods": [{"label": lab, "preset": p, **kw, **({"swept": k, "grid": list(g)} if k else {})}
                    for lab, p, kw, k, g in NET_METHODS],
        "selection": SELECTION,
        "chosen": chosen,
        "sweep": sweep,
        "communication_table": table,
        "runs": public_runs(runs),
        "plots": plots,
        "summary": summary,
    }


def _run_net(args: ExperimentArgs, out: Path, net: dict[str, Any], base: dict[str, Any], made: list[RunConfig],
             preset: str, settings: dict[str, Any], swept: dict[str, Any], run_label: str, sub: str
             ) -> dict[str, Any]:
    """One setting of one method on ``net`` (``run_one`` of :func:`run_methods`); its configuration is appended to
    ``made``."""
    own = dict(settings)
    if preset == "downpour":
        tf = time_fields(args.quick)
        own = {**downpour_settings(base, constant_clock=tf.get("compute") == "constant"
                                   and ENGINE.get() == "simulate"), **own}
    fields: dict[str, Any] = dict(
        preset=preset,
        model=net["model"],
        dataset=net["dataset"],
        seed=args.seed,
        executor=net.get("executor", "auto"),
        device=DEVICE.get(),
        **{**base, **own},
        **time_fields(args.quick),
        eval_every=max(4, base["max_steps"] // _QUICK_EVALS) if args.quick else None,  # at least a round apart
    )
    cfg = RunConfig(**(dry_run_fields(fields) if args.dry_run else fields))
    made.append(cfg)
    return run_config(cfg, out / f"{net['model']}_{sub}", run_label, progress=args.progress,
                      extra={"net": net["name"], "method": run_label, "preset": preset, **swept})


def _plot_net(out: Path, net: dict[str, Any], net_runs: list[dict[str, Any]], cfg: RunConfig, base: dict[str, Any],
              tf: dict[str, Any], *, dry_run: bool) -> Path:
    """One net's figure: test loss and accuracy of the centre variable against wall-clock, test loss against steps."""
    note = (
        f"{net['name']} on {cfg.problem.dataset}, {base['workers']} workers, batch {cfg.problem.batch_size}, "
        f"lr {base['lr']:g}, {100 * base['holdout_fraction']:g}% of the training set held out; EASGD and LSGD: "
        f"the setting of lowest held-out loss at the end; {describe_time(tf)}"
        + (f"; dry run: {DRY_RUN_STEPS} steps on synthetic data, a smoke test, not a result" if dry_run else "")
    )
    return plot_panels(
        out / f"lsgd_nets_{net['model']}.png",
        net_runs,
        [
            panel("time_s", "test_loss", "test loss (centre variable)", logy=True, **clock_x("time_s")),
            panel("time_s", "test_accuracy", "test accuracy (centre variable)", **clock_x("time_s")),
            panel("step", "test_loss", "test loss (centre variable)", logy=True),
        ],
        title=f"[LSGD] {net['name']}: centre variable vs wall-clock (EASGD, LSGD tuned)",
        note=note,
        ncols=3,
    )


def _equal_time(runs: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per net, every method's test loss at the simulated time its fastest method finished (:func:`loss_at_time`)."""
    equal_time: dict[str, dict[str, float | None]] = {}
    for net_name in {r["net"] for r in runs}:
        rs = [r for r in runs if r["net"] == net_name and not r["diverged"]]
        if not rs:
            continue
        t = min(r["time_s"] for r in rs)
        equal_time[net_name] = {"time_s": t, **{r["method"]: loss_at_time(r, t) for r in rs}}
    return equal_time


def _nets_summary(args: ExperimentArgs, runs: list[dict[str, Any]], table: list[dict[str, Any]],
                  equal_time: dict[str, dict[str, float | None]], sweep: list[dict[str, Any]],
                  base: dict[str, Any], tf: dict[str, Any]) -> list[str]:
    summary = [f"lsgd-nets ({args.scale_name}): {describe_time(tf)}; EASGD and LSGD tuned on "
               f"{100 * base['holdout_fraction']:g}% held-out training data (lowest final held-out loss)"]
    summary += method_lines(
        runs, table, lambda r: f"{r['net']:{_NET_WIDTH}s} {r['method']:28s}",
        lambda r, row: (f"test loss {r['final']['test_loss']:.4f}  acc {r['final']['test_accuracy']:.3f}  "
                        f"{r['time_source']} {r['time_s']:8.1f} s  communication "
                        f"{100 * row['communication_fraction']:5.1f}%  test loss at "
                        f"{equal_time[r['net']]['time_s']:.0f} s: {equal_time[r['net']][r['method']]:.4f}"))
    return summary + sweep_summary(sweep, net_width=_NET_WIDTH)


def method_lines(runs: list[dict[str, Any]], table: list[dict[str, Any]], name: Callable[[dict[str, Any]], str],
                 numbers: Callable[[dict[str, Any], dict[str, Any]], str]) -> list[str]:
    """One summary line per reported run: ``name(run)``, then DIVERGED or ``numbers(run, its row of the
    communication table)`` and the setting a tuned run was chosen from."""
    lines = []
    for r, row in zip(runs, table, strict=True):
        if r["diverged"]:
            lines.append(f"  {name(r)} DIVERGED at step {r['diverged']['step']}")
        else:
            lines.append(f"  {name(r)} {numbers(r, row)}" + (f"  [{r['chosen_from']}]" if r.get("chosen_from") else ""))
    return lines


def sweep_summary(sweep: list[dict[str, Any]], *, net_width: int | None) -> list[str]:
    """One summary line per swept setting: its held-out loss, and which one was chosen (``net_width``: the width
    of the net's name in front, ``None``: no name)."""
    lines = []
    for row in sweep:
        h = row["final_holdout_loss"]
        net = "" if net_width is None else f"{row['net']:{net_width}s} "
        lines.append(f"  sweep {net}{row['label']:28s} held-out loss " + ("DIVERGED" if h is None else f"{h:.4f}")
                     + ("  <- chosen" if row["chosen"] else ""))
    return lines


def plot_sweep(path: Path, lines: list[dict[str, Any]], base: dict[str, Any], tf: dict[str, Any], *,
                what: str = "nets") -> Path:
    """Held-out loss of the centre variable at the end of the run against lambda (LSGD) and beta (EASGD): the
    grids are geometric, so the x axis is logarithmic (``logx``, ticks at the grid's values); every setting is a
    point (``marker``) and the lowest point of each line -- the tuned setting -- is marked (``mark_min``)."""
    panels = []
    for key, name, method in (("lam", "lambda", "LSGD"), ("beta", "beta", "EASGD")):
        idx = [i for i, ln in enumerate(lines) if ln["key"] == key]
        grid = sorted({float(m["setting"]) for i in idx for m in lines[i]["_metrics"]})
        panels.append({"x": "setting", "y": "holdout_loss", "xlabel": f"{method}'s {name}",
                       "ylabel": "held-out loss at the end (centre variable)", "logy": False, "runs": idx,
                       "title": f"{method}: held-out loss per {name}", "legend": True, "logx": True,
                       "xticks": grid, "marker": "o", "mark_min": True})
    return plot_panels(path, lines, panels, title=f"[LSGD] {what}, the sweep: held-out loss of each setting",
                       note=f"{100 * base['holdout_fraction']:g}% of the training set held out; the lowest point "
                            f"of each line is the tuned setting; {describe_time(tf)}", ncols=2)


# --------------------------------------------------------------------------------- multi-seed assessments

#: The name of each net's role in metrics, claims and tables, the same at both scales (one assessment judges
#: both), saying what runs at the quick scale: ``"CNN-7 (quick: LeNet)"``.
ROLE_NAMES = [f"{f['name']} (quick: {q['name'].split(' ')[0]})" for q, f in zip(NETS_QUICK, NETS_FULL, strict=True)]
_ROLE = {**{n["name"]: r for n, r in zip(NETS_FULL, ROLE_NAMES, strict=True)},
         **{q["name"]: r for q, r in zip(NETS_QUICK, ROLE_NAMES, strict=True)}}


def short(method: str) -> str:
    """The method's name without its setting (``"LSGD (tuned lambda, tau=4)"`` -> ``"LSGD"``)."""
    return method.split(" ")[0]


def nets_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    """One seed's numbers: per net, the four reported methods' test loss at equal time, final test loss and
    communication fraction; the tuned lambda / beta; every swept setting's final held-out loss."""
    m: dict[str, float | None] = {}
    comm = {(row["net"], row["method"]): row["communication_fraction"] for row in res["communication_table"]}
    for r in res["runs"]:
        net, meth = _ROLE.get(r["net"], r["net"]), short(r["method"])
        ok = not r["diverged"]
        m[f"{net}: {meth} test loss at equal time"] = (
            res["test_loss_at_equal_time"].get(r["net"], {}).get(r["method"]) if ok else None)
        m[f"{net}: {meth} final test loss"] = (r.get("final") or {}).get("test_loss") if ok else None
        m[f"{net}: {meth} communication fraction"] = comm.get((r["net"], r["method"])) if ok else None
    for net_name, picks in (res.get("chosen") or {}).items():
        for meth, v in picks.items():
            key = "lambda" if meth == "LSGD" else "beta"
            m[f"{_ROLE.get(net_name, net_name)}: {meth} tuned {key}"] = v
    for row in res.get("sweep") or []:
        m[f"{_ROLE.get(row['net'], row['net'])}: {row['method']} held-out loss, "
          f"{SWEPT_NAME[row['setting']]}={row['value']:g}"] = row["final_holdout_loss"]
    return m


def _best_claim(role: str, net: str) -> Claim:
    k = f"{role}: {{}} test loss at equal time"
    return Claim(f"LSGD reaches the lowest test loss of the centre variable fastest ({net}, Fig. 4/5; EASGD and "
                 "LSGD each at its setting of lowest held-out loss)",
                 (k.format("LSGD"), k.format("EASGD")),
                 also=((k.format("LSGD"), k.format("SGD")), (k.format("LSGD"), k.format("DOWNPOUR"))))


def _notes(bands: Any) -> list[str]:
    return [DOWNPOUR_FINDING]


assess("lsgd-nets", Assessment(nets_metrics, [
    *(_best_claim(r, f["name"]) for r, f in zip(ROLE_NAMES, NETS_FULL, strict=True)),
    *(Claim(f"LSGD and EASGD communicate less than DOWNPOUR ({f['name']}, Table 6)",
            (f"{r}: LSGD communication fraction", f"{r}: DOWNPOUR communication fraction"),
            also=((f"{r}: EASGD communication fraction", f"{r}: DOWNPOUR communication fraction"),))
      for r, f in zip(ROLE_NAMES, NETS_FULL, strict=True)),
], [
    *(PaperRow(f"{r}: {meth} communication fraction", paper, f"{r}: {meth} communication fraction",
               note="Table 6's range over its nets; our network is deliberately slow (100 Mbit/s) in quick mode",
               fmt=".3f")
      for r in ROLE_NAMES
      for meth, paper in (("LSGD", "0.01-0.02"), ("EASGD", "0.02-0.04"), ("DOWNPOUR", "0.17-0.57"))),
    *(PaperRow(f"{r}: LSGD's lambda", "tuned over {0.5, 0.25, 0.1, 0.05, 0.025}",
               f"{r}: LSGD tuned lambda", note="ours: lowest held-out loss at the end, per seed", fmt=".3g")
      for r in ROLE_NAMES),
    *(PaperRow(f"{r}: EASGD's beta", "0.43", f"{r}: EASGD tuned beta",
               note="ours: tuned over {0.9, 0.43, 0.1} by held-out loss, per seed", fmt=".3g")
      for r in ROLE_NAMES),
], notes=_notes))
