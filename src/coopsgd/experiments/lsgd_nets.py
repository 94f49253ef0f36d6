"""[LSGD] deep-net experiments: ``coopsgd reproduce lsgd-nets`` and ``coopsgd reproduce lsgd-lstm``.

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
communication-saving methods is our choice.

Full scale: CNN-7 and ResNet-20 on CIFAR-10 (needs torchvision + the files; batch 128), and the 2-layer,
200-unit LSTM on WikiText-2 (sequence 35, 4 workers; trains on valid.txt and tests on test.txt when the
train split is absent). Quick scale: LeNet and an MLP on the bundled MNIST subset standing in for CNN-7 and
ResNet-20 (both real CIFAR nets cost minutes per step-hundred on 2 CPU cores), 200 steps each with ten
evaluations of 1,000 samples (the sweep runs 20 settings per seed); and a 2-layer LSTM with 64 units on the
bundled WikiText-2 files with the vocabulary cut to the 2,000 most frequent words.

``dry_run=True`` (``coopsgd reproduce lsgd-nets | lsgd-lstm --dry-run``) runs every method of the full scale
for two steps on synthetic data of the real shapes: 3x32x32 images of 10 classes for CNN-7 and ResNet-20,
random tokens of WikiText-2's 33,278-word vocabulary for the LSTM. Every method runs once (the first setting
of each sweep; ``all_settings``: the whole sweep).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from coopsgd.experiments.harness import (
    DEVICE,
    DRY_RUN_BATCH,
    DRY_RUN_STEPS,
    DRY_RUN_WORKERS,
    WIKITEXT2_VOCAB,
    check_full_data,
    describe_time,
    dry_run_fields,
    dry_run_summary,
    dry_run_tau,
    first_reach,
    panel,
    plot_panels,
    public_runs,
    run_built,
    run_config,
    scaled,
    series,
    tail_mean,
    time_fields,
)
from coopsgd.experiments.registry import register
from coopsgd.train.config import RunConfig

__all__ = [
    "NET_METHODS",
    "LSTM_METHODS",
    "LSGD_LAMBDAS",
    "EASGD_BETAS",
    "HOLDOUT_FRACTION",
    "select_by_holdout",
    "loss_at_time",
    "final_holdout_loss",
    "NETS_FULL",
    "NETS_QUICK",
    "LSTM_FULL",
    "LSTM_QUICK",
    "run_lsgd_nets",
    "run_lsgd_lstm",
    "build_lm_experiment",
]

#: [LSGD]'s grid of LSGD's pulling strength lambda.
LSGD_LAMBDAS: tuple[float, ...] = (0.5, 0.25, 0.1, 0.05, 0.025)
#: EASGD's beta grid: the paper's 0.43 first (the dry run's setting), then a stronger and a weaker pull.
EASGD_BETAS: tuple[float, ...] = (0.43, 0.9, 0.1)
#: Share of the training set every ``lsgd-nets`` run holds out for the selection (``RunConfig.holdout_fraction``).
HOLDOUT_FRACTION = 0.1

#: ``lsgd-nets``' methods: (label of the reported curve, preset, fixed RunConfig fields, swept field or None,
#: its grid). The label does not name the chosen setting: the same on every seed.
NET_METHODS: list[tuple[str, str, dict[str, Any], str | None, tuple[float, ...]]] = [
    ("SGD (sync)", "sync", {}, None, ()),
    ("DOWNPOUR (tau=4)", "downpour", {"tau": 4}, None, ()),
    ("EASGD (tuned beta, tau=4)", "easgd", {"tau": 4}, "beta", EASGD_BETAS),
    ("LSGD (tuned lambda, tau=4)", "lsgd", {"tau": 4}, "lam", LSGD_LAMBDAS),
]
#: How the swept fields are written in labels and metric names.
_SWEPT_NAME = {"lam": "lambda", "beta": "beta"}

NETS_FULL: list[dict[str, Any]] = [
    {"name": "CNN-7", "model": "cnn7", "dataset": "cifar10"},
    {"name": "ResNet-20", "model": "resnet20", "dataset": "cifar10"},
]
NETS_QUICK: list[dict[str, Any]] = [
    {"name": "LeNet (for CNN-7)", "model": "lenet", "dataset": "mnist_bundled", "executor": "loop"},
    {"name": "MLP (for ResNet-20)", "model": "mlp", "dataset": "mnist_bundled", "executor": "vmap"},
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
#: Evaluations of a quick run (each: test, training and held-out samples, ``eval_samples`` of each).
_QUICK_EVALS = 10


def _comm_table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    return f"{preset.upper()} ({_SWEPT_NAME[key]}={value:g}, tau=4)"


def _tune(net: str, label: str, preset: str, key: str, cands: list[dict[str, Any]]
          ) -> tuple[dict[str, Any], float | None, list[dict[str, Any]], dict[str, Any]]:
    """One method's sweep on one net: the reported run (the :func:`select_by_holdout` winner under the method's
    ``label``), the chosen value (``None``: every setting diverged, the first is reported), the sweep's rows and
    its line of the sweep figure."""
    pick = select_by_holdout(cands)
    won = cands[pick if pick is not None else 0]
    reported = {**won, "label": label, "method": label, "setting": {key: won[key]}, "chosen_from": won["label"]}
    rows = [{"net": net, "method": _short(label), "preset": preset, "setting": key, "value": c[key],
             "label": c["label"], "dir": c["dir"], "diverged": c["diverged"],
             "final_holdout_loss": c["final_holdout_loss"],
             "final_test_loss": None if c["diverged"] else (c.get("final") or {}).get("test_loss"),
             "chosen": c is won and pick is not None} for c in cands]
    ordered = sorted((c for c in cands if c["final_holdout_loss"] is not None), key=lambda c: c[key])
    line = {"label": f"{net}: {_short(label)}", "diverged": None, "key": key,
            "_metrics": [{"setting": c[key], "holdout_loss": c["final_holdout_loss"]} for c in ordered]}
    return reported, (float(won[key]) if pick is not None else None), rows, line


def _run_methods(net: str, methods: list[tuple[str, str, dict[str, Any], str | None, tuple[float, ...]]], *,
                 dry_run: bool, all_settings: bool,
                 run_one: Callable[[str, dict[str, Any], dict[str, Any], str, str], dict[str, Any]],
                 ) -> tuple[list[dict[str, Any]], dict[str, float | None], list[dict[str, Any]],
                            list[dict[str, Any]], list[dict[str, Any]]]:
    """Run every method of ``methods`` (:data:`NET_METHODS`, :data:`LSTM_METHODS`) on one net and tune the swept
    ones: every grid value (a dry run without ``all_settings``: the first), the reported run chosen by
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
        values: tuple[float | None, ...] = (None,) if key is None else (grid if not dry_run or all_settings
                                                                          else grid[:1])
        cands = []
        for v in values:
            own = {} if key is None else {key: v}
            run_label = label if key is None else _setting_label(preset, key, float(v))  # type: ignore[arg-type]
            sub = preset + ("" if key is None else f"_{_SWEPT_NAME[key]}{v:g}")
            res = run_one(preset, {**kw, **own}, own, run_label, sub)
            res["final_holdout_loss"] = final_holdout_loss(res)
            cands.append(res)
            executed.append(res)
        if key is None:
            runs.append(cands[0])
            continue
        reported, value, rows, line = _tune(net, label, preset, key, cands)
        chosen[_short(label)] = value
        runs.append(reported)
        sweep += rows
        lines.append(line)
    return runs, chosen, sweep, lines, executed


@register(
    "lsgd-nets",
    "[LSGD] Fig. 4/5 + Table 6: SGD, DOWNPOUR, EASGD, LSGD on CNN-7 and ResNet-20",
    engines=("simulate", "distributed"),
)
def run_lsgd_nets(
    *,
    quick: bool,
    engine: str,
    out: Path,
    seed: int,
    progress: bool,
    _scale: float = 1.0,
    _nets: int | None = None,
    dry_run: bool = False,
    all_settings: bool = False,
) -> dict[str, Any]:
    """Test loss of the centre variable vs simulated wall-clock of SGD, DOWNPOUR and the tuned EASGD and LSGD
    (the lambda / beta sweep and its held-out losses), and the communication fractions."""
    nets = NETS_QUICK if quick else NETS_FULL
    if not quick and not dry_run:
        check_full_data("cifar10")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(_NET_TRAIN_QUICK if quick else _NET_TRAIN_FULL)
    if quick:
        base["max_steps"] = scaled(base["max_steps"], _scale, 8)
    else:
        base["epochs"] = base["epochs"] * _scale
    tf = time_fields(quick)
    runs: list[dict[str, Any]] = []  # the four reported (tuned) runs of every net
    sweep: list[dict[str, Any]] = []  # every swept setting's run
    chosen: dict[str, dict[str, float | None]] = {}
    plots = []
    sweep_lines: list[dict[str, Any]] = []
    executed: list[dict[str, Any]] = []  # every run, in the order it ran
    for net in nets[: _nets or len(nets)]:
        made: list[RunConfig] = []  # the configurations run on this net (the note names the last one's data)

        def run_net(preset: str, settings: dict[str, Any], swept: dict[str, Any], run_label: str, sub: str,
                    net: dict[str, Any] = net, made: list[RunConfig] = made) -> dict[str, Any]:
            fields: dict[str, Any] = dict(
                preset=preset,
                model=net["model"],
                dataset=net["dataset"],
                seed=seed,
                executor=net.get("executor", "auto"),
                device=DEVICE.get(),
                **base,
                **settings,
                **tf,
                eval_every=max(4, base["max_steps"] // _QUICK_EVALS) if quick else None,  # at least a round apart
            )
            cfg = RunConfig(**(dry_run_fields(fields) if dry_run else fields))
            made.append(cfg)
            return run_config(cfg, out / f"{net['model']}_{sub}", run_label, progress=progress,
                              extra={"net": net["name"], "method": run_label, "preset": preset, **swept})

        net_runs, chosen[net["name"]], rows, lines, done = _run_methods(
            net["name"], NET_METHODS, dry_run=dry_run, all_settings=all_settings, run_one=run_net)
        sweep += rows
        sweep_lines += lines
        executed += done
        cfg = made[-1]
        note = (
            f"{net['name']} on {cfg.problem.dataset}, {base['workers']} workers, batch {cfg.problem.batch_size}, "
            f"lr {base['lr']:g}, {100 * base['holdout_fraction']:g}% of the training set held out; EASGD and LSGD: "
            f"the setting of lowest held-out loss at the end; {describe_time(tf)}"
            + (f"; dry run: {DRY_RUN_STEPS} steps on synthetic data, a smoke test, not a result" if dry_run else "")
        )
        plots.append(
            str(
                plot_panels(
                    out / f"lsgd_nets_{net['model']}.png",
                    net_runs,
                    [
                        panel("time_s", "test_loss", "test loss (centre variable)", logy=True),
                        panel("time_s", "test_accuracy", "test accuracy (centre variable)"),
                        panel("step", "test_loss", "test loss (centre variable)", logy=True),
                    ],
                    title=f"[LSGD] {net['name']}: centre variable vs wall-clock (EASGD, LSGD tuned)",
                    note=note,
                    ncols=3,
                )
            )
        )
        runs += net_runs
    plots.append(str(_plot_sweep(out / "lsgd_nets_sweep.png", sweep_lines, base, tf)))
    table = _comm_table(runs)
    equal_time: dict[str, dict[str, float | None]] = {}
    for net_name in {r["net"] for r in runs}:
        rs = [r for r in runs if r["net"] == net_name and not r["diverged"]]
        if not rs:
            continue
        t = min(r["time_s"] for r in rs)
        equal_time[net_name] = {"time_s": t, **{r["method"]: loss_at_time(r, t) for r in rs}}
    summary = [f"lsgd-nets ({'quick' if quick else 'full'}): {describe_time(tf)}; EASGD and LSGD tuned on "
               f"{100 * base['holdout_fraction']:g}% held-out training data (lowest final held-out loss)"]
    for r, row in zip(runs, table, strict=True):
        if r["diverged"]:
            summary.append(f"  {r['net']:22s} {r['method']:28s} DIVERGED at step {r['diverged']['step']}")
            continue
        summary.append(
            f"  {r['net']:22s} {r['method']:28s} test loss {r['final']['test_loss']:.4f}  "
            f"acc {r['final']['test_accuracy']:.3f}  {r['time_source']} {r['time_s']:8.1f} s  "
            f"communication {100 * row['communication_fraction']:5.1f}%  test loss at "
            f"{equal_time[r['net']]['time_s']:.0f} s: {equal_time[r['net']][r['method']]:.4f}"
            + (f"  [{r['chosen_from']}]" if r.get("chosen_from") else "")
        )
    for row in sweep:
        h = row["final_holdout_loss"]
        summary.append(f"  sweep {row['net']:22s} {row['label']:28s} held-out loss "
                       + ("DIVERGED" if h is None else f"{h:.4f}") + ("  <- chosen" if row["chosen"] else ""))
    if dry_run:
        summary = dry_run_summary(
            "lsgd-nets", "every method on " + " and ".join(n["name"] for n in nets[: _nets or len(nets)]),
            executed,
            every=None if all_settings else f"EASGD's {len(EASGD_BETAS)} betas and LSGD's {len(LSGD_LAMBDAS)} lambdas")
    return {
        "experiment": "lsgd-nets",
        "test_loss_at_equal_time": equal_time,
        "quick": quick,
        "time_model": tf,
        "train": base,
        "methods": [{"label": lab, "preset": p, **kw, **({"swept": k, "grid": list(g)} if k else {})}
                    for lab, p, kw, k, g in NET_METHODS],
        "selection": "per method, the setting whose centre variable has the lowest held-out loss at the end of "
                     "its run (same step budget; diverged runs never chosen; ties: the earlier setting)",
        "chosen": chosen,
        "sweep": sweep,
        "communication_table": table,
        "runs": public_runs(runs),
        "plots": plots,
        "summary": summary,
    }


def _plot_sweep(path: Path, lines: list[dict[str, Any]], base: dict[str, Any], tf: dict[str, Any], *,
                what: str = "nets") -> Path:
    """Held-out loss of the centre variable at the end of the run against lambda (LSGD) and beta (EASGD)."""
    panels = []
    for key, name, what in (("lam", "lambda", "LSGD"), ("beta", "beta", "EASGD")):
        idx = [i for i, ln in enumerate(lines) if ln["key"] == key]
        panels.append({"x": "setting", "y": "holdout_loss", "xlabel": f"{what}'s {name}",
                       "ylabel": "held-out loss at the end (centre variable)", "logy": False, "runs": idx,
                       "title": f"{what}: held-out loss per {name}", "legend": True})
    return plot_panels(path, lines, panels, title=f"[LSGD] {what}, the sweep: held-out loss of each setting",
                       note=f"{100 * base['holdout_fraction']:g}% of the training set held out; the lowest is "
                            f"the tuned setting; {describe_time(tf)}", ncols=2)


# ------------------------------------------------------------------------------------------------------ LSTM

#: ``lsgd-lstm``'s methods, as :data:`NET_METHODS` with smaller grids (a quick LSTM run costs about half a minute
#: on 2 CPU cores): LSGD at the paper's lambda = 0.1 and the grid's second and last values, EASGD at the paper's
#: beta = 0.43 and 0.9 (the weaker 0.1 lost clearly on both nets). The first value of a grid is the dry run's.
LSTM_LAMBDAS: tuple[float, ...] = (0.1, 0.25, 0.025)
LSTM_BETAS: tuple[float, ...] = (0.43, 0.9)
LSTM_METHODS: list[tuple[str, str, dict[str, Any], str | None, tuple[float, ...]]] = [
    ("SGD (sync)", "sync", {}, None, ()),
    ("DOWNPOUR (tau=4)", "downpour", {"tau": 4}, None, ()),
    ("EASGD (tuned beta, tau=4)", "easgd", {"tau": 4}, "beta", LSTM_BETAS),
    ("LSGD (tuned lambda, tau=4)", "lsgd", {"tau": 4}, "lam", LSTM_LAMBDAS),
]

LSTM_FULL: dict[str, Any] = {
    "workers": 4,
    "hidden": 200,
    "layers": 2,
    "seq_len": 35,
    "batch_size": 20,
    "lr": 1.0,
    "epochs": 40.0,
    "vocab_cap": None,
    "test_windows": None,
    "eval_samples": 2000,
    "holdout_fraction": HOLDOUT_FRACTION,
}
LSTM_QUICK: dict[str, Any] = {
    "workers": 4,
    "hidden": 64,
    "layers": 2,
    "seq_len": 35,
    "batch_size": 20,
    "lr": 1.0,
    "max_steps": 300,
    "vocab_cap": 2000,
    "test_windows": 150,
    "eval_samples": 150,
    "holdout_fraction": HOLDOUT_FRACTION,
}


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _cap_vocab(train: torch.Tensor, test: torch.Tensor, cap: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep the ``cap - 1`` most frequent training words; every other word becomes one <unk> id."""
    counts = torch.bincount(train, minlength=int(max(train.max(), test.max())) + 1)
    keep = torch.argsort(counts, descending=True, stable=True)[: cap - 1]
    remap = torch.full((counts.numel(),), cap - 1, dtype=torch.long)
    remap[keep] = torch.arange(cap - 1)
    return remap[train], remap[test], cap


def build_lm_experiment(cfg: RunConfig, settings: dict[str, Any]) -> Any:
    """The trainer's :class:`~coopsgd.train.trainer.Experiment` for the LSTM language model, built by hand.

    Built here rather than by :func:`coopsgd.train.trainer.build` because the quick scale cuts the vocabulary
    (``settings["vocab_cap"]``) and the test set (``settings["test_windows"]``), which a ``RunConfig`` does not
    express. Everything else is the trainer's: data order, loop, records, and the held-out windows of
    ``cfg.holdout_fraction`` (:func:`~coopsgd.train.trainer.split_holdout`).

    ``settings["synthetic_vocab"]`` (the dry run): instead of WikiText-2, seeded random tokens of that
    vocabulary, enough windows for ``cfg.max_steps`` steps of every worker and ``settings["test_windows"]``
    test windows.
    """
    from coopsgd.algorithms import make_preset
    from coopsgd.data import WorkerLoader, lm_windows, load_dataset, partition
    from coopsgd.engines.simulator import Simulator
    from coopsgd.models import make_model
    from coopsgd.train.trainer import Experiment, sim_clock, split_holdout

    L = int(settings["seq_len"])
    if settings.get("synthetic_vocab"):
        vocab = int(settings["synthetic_vocab"])
        gen = torch.Generator().manual_seed(cfg.execution.seed)
        n_train = cfg.algorithm.workers * cfg.problem.batch_size * int(cfg.schedule.max_steps or 1) * L + 1
        tr_tokens = torch.randint(vocab, (n_train,), generator=gen)
        te_tokens = torch.randint(vocab, (int(settings["test_windows"]) * L + 1,), generator=gen)
    else:
        tr = load_dataset("wikitext2", split="train")
        te = load_dataset("wikitext2", split="test")
        tr_tokens, te_tokens, vocab = tr.x, te.x, tr.num_classes
    if settings.get("vocab_cap"):
        tr_tokens, te_tokens, vocab = _cap_vocab(tr_tokens, te_tokens, int(settings["vocab_cap"]))
    import dataclasses

    train_set = dataclasses.replace(lm_windows(tr_tokens, L, name="wikitext2/train"), num_classes=vocab)
    test_set = dataclasses.replace(lm_windows(te_tokens, L, name="wikitext2/test"), num_classes=vocab)
    if settings.get("test_windows"):
        n = int(settings["test_windows"])
        test_set = dataclasses.replace(test_set, x=test_set.x[:n], y=test_set.y[:n])
    train_set, holdout_set = split_holdout(train_set, cfg.evaluation.holdout_fraction, cfg.execution.seed)  # windows, as the trainer
    parts = partition(np.zeros(len(train_set), dtype=np.int64), cfg.algorithm.workers, "iid", seed=cfg.execution.seed)
    loader = WorkerLoader(train_set, parts, cfg.problem.batch_size, seed=cfg.execution.seed)
    spec = make_preset(cfg.algorithm.preset, cfg.algorithm.workers, **cfg.spec_kwargs())
    torch.manual_seed(cfg.execution.seed)
    h = int(settings["hidden"])
    model = make_model(
        "lstm_lm",
        num_classes=vocab,
        input_shape=(L,),
        emb_size=h,
        hidden_size=h,
        num_layers=int(settings["layers"]),
        batch_first=True,
    )
    clock = sim_clock(cfg)  # the config's network and compute model, as every RunConfig run's
    sim = Simulator(
        spec,
        model,
        loss_fn=_lm_loss,
        momentum=cfg.optimizer.momentum,
        weight_decay=cfg.optimizer.weight_decay,
        executor=cfg.execution.executor,
        seed=cfg.execution.seed,
        loss_estimate=cfg.algorithm.loss_estimate,
        clock=clock,
        device=cfg.execution.device,
    )
    spe = loader.steps_per_epoch
    total = cfg.schedule.max_steps if cfg.schedule.max_steps is not None else max(1, int(np.ceil(cfg.schedule.epochs * spe)))
    eval_every = cfg.evaluation.eval_every or max(1, min(spe, total // 10 or 1))
    return Experiment(
        config=cfg,
        spec=spec,
        sim=sim,
        loader=loader,
        train_set=train_set,
        test_set=test_set,
        loss_fn=_lm_loss,
        total_steps=total,
        eval_every=eval_every,
        is_lm=True,
        holdout_set=holdout_set,
    )


@register(
    "lsgd-lstm", "[LSGD] LSTM on WikiText-2: test perplexity vs wall-clock for SGD, DOWNPOUR, EASGD, LSGD"
)
def run_lsgd_lstm(
    *,
    quick: bool,
    engine: str,
    out: Path,
    seed: int,
    progress: bool,
    _scale: float = 1.0,
    dry_run: bool = False,
    all_settings: bool = False,
) -> dict[str, Any]:
    """Test perplexity of the centre variable vs simulated wall-clock for the four methods."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = dict(LSTM_QUICK if quick else LSTM_FULL)
    tf = time_fields(quick)
    length: dict[str, Any] = (
        {"max_steps": scaled(st["max_steps"], _scale, 4)} if quick else {"epochs": st["epochs"] * _scale}
    )
    if dry_run:  # the full scale's model and vocabulary size on random tokens, two steps, every step checkpointed
        st.update(synthetic_vocab=WIKITEXT2_VOCAB, test_windows=100, batch_size=DRY_RUN_BATCH.get() or st["batch_size"],
                  workers=DRY_RUN_WORKERS.get() or st["workers"])
        length = {"max_steps": DRY_RUN_STEPS, "eval_every": 1, "checkpoint_every": 1}
    def run_lstm(preset: str, settings: dict[str, Any], swept: dict[str, Any], run_label: str, sub: str
                 ) -> dict[str, Any]:
        cfg = RunConfig(
            preset=preset,
            model="lstm_lm",
            dataset="wikitext2",
            workers=st["workers"],
            batch_size=st["batch_size"],
            lr=st["lr"],
            seed=seed,
            eval_samples=st["eval_samples"],
            holdout_fraction=st["holdout_fraction"],
            executor="loop",  # measured: the per-replica loop beats vmap for this LSTM on CPU
            device=DEVICE.get(),
            **({"eval_every": max(1, length["max_steps"] // 12) if quick else None, **length}),
            **{**settings, **(dry_run_tau(settings) if dry_run else {})},
            **tf,
        )
        exp = build_lm_experiment(cfg, st)
        res = run_built(
            exp,
            out / f"lstm_{sub}",
            run_label,
            progress=progress,
            extra={"net": "LSTM", "method": run_label, "preset": preset, "lstm": st, **swept,
                   **({"data": f"random tokens (vocabulary {WIKITEXT2_VOCAB:,}, seq {st['seq_len']})"}
                      if dry_run else {})},
        )
        res["final_test_perplexity"] = (res.get("final") or {}).get("test_perplexity")
        return res

    # the four reported runs (EASGD and LSGD: tuned), the choices, the sweep and every run in the order it ran
    runs, chosen, sweep, sweep_lines, executed = _run_methods(
        "LSTM", LSTM_METHODS, dry_run=dry_run, all_settings=all_settings, run_one=run_lstm)
    scale_note = (
        f"2-layer LSTM, {st['hidden']} units, seq {st['seq_len']}, {st['workers']} workers, batch "
        f"{st['batch_size']}, lr {st['lr']:g}"
        + (
            f", vocabulary cut to {st['vocab_cap']} words, test on the first {st['test_windows']} windows"
            if quick
            else ""
        )
        + (f"; dry run: {DRY_RUN_STEPS} steps on random tokens of WikiText-2's {WIKITEXT2_VOCAB:,}-word vocabulary"
           if dry_run else "")
    )
    plot = plot_panels(
        out / "lsgd_lstm.png",
        runs,
        [
            panel("time_s", "test_perplexity", "test perplexity (centre variable)", logy=True),
            panel("step", "test_perplexity", "test perplexity (centre variable)", logy=True),
        ],
        title="[LSGD] LSTM on WikiText-2 (bundled: train = valid.txt, test = test.txt)",
        note=f"{scale_note}; {describe_time(tf)}",
        ncols=2,
    )
    sweep_plot = _plot_sweep(out / "lsgd_lstm_sweep.png", sweep_lines, st, tf, what="LSTM") if sweep_lines else None
    table = _comm_table(runs)
    summary = [f"lsgd-lstm ({'quick' if quick else 'full'}): {scale_note}; {describe_time(tf)}"
               + (f"; EASGD and LSGD tuned on {100 * st['holdout_fraction']:g}% held-out training windows (lowest "
                  "final held-out loss)" if sweep else "")]
    for r, row in zip(runs, table, strict=True):
        if r["diverged"]:
            summary.append(f"  {r['method']:26s} DIVERGED at step {r['diverged']['step']}")
            continue
        summary.append(
            f"  {r['method']:26s} test perplexity {r['final_test_perplexity']:8.1f}  simulated "
            f"{r['time_s']:7.1f} s  communication {100 * row['communication_fraction']:5.1f}%"
            + (f"  [{r['chosen_from']}]" if r.get("chosen_from") else "")
        )
    for srow in sweep:
        h = srow["final_holdout_loss"]
        summary.append(f"  sweep {srow['label']:28s} held-out loss " + ("DIVERGED" if h is None else f"{h:.4f}")
                       + ("  <- chosen" if srow["chosen"] else ""))
    if dry_run:
        summary = dry_run_summary("lsgd-lstm", "every method", executed, every=None)
    return {
        "experiment": "lsgd-lstm",
        "quick": quick,
        "settings": st,
        "time_model": tf,
        "scale": scale_note,
        "communication_table": table,
        "runs": public_runs(runs),
        "plots": [str(plot)] + ([str(sweep_plot)] if sweep_plot is not None else []),
        "summary": summary,
        "selection": "per method, the setting whose centre variable has the lowest held-out loss at the end of "
                     "its run (same step budget; diverged runs never chosen; ties: the earlier setting)",
        "chosen": chosen,
        "sweep": sweep,
        "time_to_best_sync_perplexity": _time_to(runs),
        "perplexity_at_equal_time": _ppl_at_equal_time(runs),
    }


def _ppl_at_equal_time(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each method's test perplexity at the simulated time the fastest method finished, read off its curve as
    in ``lsgd-nets`` (:func:`loss_at_time`)."""
    ok = [r for r in runs if not r["diverged"] and r.get("time_s") is not None]
    if not ok:
        return {}
    t = min(r["time_s"] for r in ok)
    return {"time_s": t, **{r["method"]: loss_at_time(r, t, y="test_perplexity") for r in ok}}


def _time_to(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Simulated time each method needs to reach the final perplexity of synchronous SGD."""
    target = runs[0].get("final_test_perplexity")
    if target is None:
        return {}
    return {r["method"]: first_reach(r, target, y="test_perplexity") for r in runs}


__all__ += ["tail_mean"]


# --------------------------------------------------------------------------------- multi-seed assessments

from coopsgd.experiments.registry import assess  # noqa: E402
from coopsgd.experiments.stats import Assessment, Claim, PaperRow  # noqa: E402

_SHORT = ("SGD", "DOWNPOUR", "EASGD", "LSGD")
#: The quick nets stand in for the full ones, in this order; metric names use the full nets' names.
_ROLE = {**{n["name"]: n["name"] for n in NETS_FULL},
         **{q["name"]: f["name"] for q, f in zip(NETS_QUICK, NETS_FULL, strict=True)}}


def _short(method: str) -> str:
    return method.split(" ")[0]


def nets_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    """One seed's numbers: per net, the four reported methods' test loss at equal time, final test loss and
    communication fraction; the tuned lambda / beta; every swept setting's final held-out loss."""
    m: dict[str, float | None] = {}
    comm = {(row["net"], row["method"]): row["communication_fraction"] for row in res["communication_table"]}
    for r in res["runs"]:
        net, meth = _ROLE.get(r["net"], r["net"]), _short(r["method"])
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
          f"{_SWEPT_NAME[row['setting']]}={row['value']:g}"] = row["final_holdout_loss"]
    return m


def _best_claim(net: str) -> Claim:
    k = f"{net}: {{}} test loss at equal time"
    return Claim(f"LSGD reaches the lowest test loss of the centre variable fastest ({net}, Fig. 4/5; EASGD and "
                 "LSGD each at its setting of lowest held-out loss)",
                 (k.format("LSGD"), k.format("EASGD")),
                 also=((k.format("LSGD"), k.format("SGD")), (k.format("LSGD"), k.format("DOWNPOUR"))))


assess("lsgd-nets", Assessment(nets_metrics, [
    *(_best_claim(f["name"]) for f in NETS_FULL),
    *(Claim(f"LSGD and EASGD communicate less than DOWNPOUR ({f['name']}, Table 6)",
            (f"{f['name']}: LSGD communication fraction", f"{f['name']}: DOWNPOUR communication fraction"),
            also=((f"{f['name']}: EASGD communication fraction", f"{f['name']}: DOWNPOUR communication fraction"),))
      for f in NETS_FULL),
], [
    *(PaperRow(f"{f['name']}: {meth} communication fraction", paper, f"{f['name']}: {meth} communication fraction",
               note="Table 6's range over its nets; our network is deliberately slow (100 Mbit/s) in quick mode",
               fmt=".3f")
      for f in NETS_FULL
      for meth, paper in (("LSGD", "0.01-0.02"), ("EASGD", "0.02-0.04"), ("DOWNPOUR", "0.17-0.57"))),
    *(PaperRow(f"{f['name']}: LSGD's lambda", "tuned over {0.5, 0.25, 0.1, 0.05, 0.025}",
               f"{f['name']}: LSGD tuned lambda", note="ours: lowest held-out loss at the end, per seed", fmt=".3g")
      for f in NETS_FULL),
    *(PaperRow(f"{f['name']}: EASGD's beta", "0.43", f"{f['name']}: EASGD tuned beta",
               note="ours: tuned over {0.9, 0.43, 0.1} by held-out loss, per seed", fmt=".3g")
      for f in NETS_FULL),
]))


def lstm_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    """One seed's numbers: the four reported methods' perplexities, times and communication fractions; the tuned
    lambda / beta; every swept setting's final held-out loss."""
    m: dict[str, float | None] = {}
    comm = {row["method"]: row["communication_fraction"] for row in res["communication_table"]}
    eq = res.get("perplexity_at_equal_time") or {}
    reach = res.get("time_to_best_sync_perplexity") or {}
    for r in res["runs"]:
        meth, ok = _short(r["method"]), not r["diverged"]
        m[f"{meth} final test perplexity"] = r.get("final_test_perplexity") if ok else None
        m[f"{meth} test perplexity at equal time"] = eq.get(r["method"]) if ok else None
        m[f"{meth} time to sync's final perplexity (s)"] = reach.get(r["method"]) if ok else None
        m[f"{meth} communication fraction"] = comm.get(r["method"]) if ok else None
    for meth, v in (res.get("chosen") or {}).items():
        m[f"{meth} tuned {'lambda' if meth == 'LSGD' else 'beta'}"] = v
    for row in res.get("sweep") or []:
        m[f"{row['method']} held-out loss, {_SWEPT_NAME[row['setting']]}={row['value']:g}"] = row["final_holdout_loss"]
    return m


assess("lsgd-lstm", Assessment(lstm_metrics, [
    Claim("LSGD reaches a given test perplexity in the least wall-clock (LSTM; EASGD and LSGD each at its "
          "setting of lowest held-out loss)",
          ("LSGD test perplexity at equal time", "EASGD test perplexity at equal time"),
          also=(("LSGD test perplexity at equal time", "SGD test perplexity at equal time"),
                ("LSGD test perplexity at equal time", "DOWNPOUR test perplexity at equal time"))),
    Claim("DOWNPOUR spends a larger share of time communicating than LSGD",
          ("LSGD communication fraction", "DOWNPOUR communication fraction")),
]))
