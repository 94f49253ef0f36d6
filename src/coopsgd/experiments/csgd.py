"""[CSGD] Figures 3-6 as ``coopsgd reproduce csgd-fig3 | csgd-fig4 | csgd-fig5 | csgd-fig6``.

Full scale follows [CSGD] Appendix A: VGG-16 on CIFAR-10, 8 workers, batch 128 per worker, 200 epochs,
lr 0.4 divided by 10 at epochs 100 and 150 (momentum and weight decay are not stated there; we use none).
It needs torchvision and the CIFAR-10 files (and, in practice, a GPU); without torchvision it stops with
the data layer's ConfigError before training anything.

``--quick`` runs the same algorithms on a 2-core CPU in about one to three minutes per seed on an idle machine: an MLP (784-200-200-10) on the
bundled 8,000-image MNIST subset, 8 workers, batch 32 per worker, learning rates scaled to that model, and
simulated wall-clock from :data:`coopsgd.experiments.harness.QUICK_TIME` (constant 100 ms per step; 2 ms,
100 Mbit/s network). Every ``run_fig*`` takes one :class:`~coopsgd.experiments.harness.ExperimentArgs`
(``args.scale``: the tests' step/epoch multiplier) and, keyword-only, its own sweep for the tests' reduced runs.

``args.dry_run`` (``coopsgd reproduce NAME --dry-run``) runs the full-scale configuration for two steps per
setting on synthetic 3x32x32 data (:func:`coopsgd.experiments.dry_run.dry_run_fields`), the first setting
of each sweep unless ``args.all_settings``; figures, result and summary go through the full-scale code.

This module holds the shared scale (:data:`FULL`, :data:`QUICK`, :func:`base_config`) and Figs. 3-5; Fig. 6 and
its cost model are :mod:`coopsgd.experiments.csgd_fig6`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.experiments.base import assess, register
from coopsgd.experiments.dry_run import DRY_RUN_STEPS, dry_run_fields, dry_run_summary
from coopsgd.experiments.figure_axes import clock_x
from coopsgd.experiments.harness import (
    DEVICE,
    ExperimentArgs,
    check_full_data,
    describe_time,
    first_reach,
    panel,
    plot_panels,
    public_runs,
    run_config,
    scaled,
    series,
    tail_mean,
    time_fields,
)
from coopsgd.experiments.stats import Assessment, Claim, PaperRow
from coopsgd.theory.bounds import easgd_alpha_limit, easgd_best_alpha, easgd_zeta, network_error_term
from coopsgd.theory.heatmap import plot_network_error_heatmap
from coopsgd.topology import mixing_matrix
from coopsgd.train.config import RunConfig

__all__ = ["FULL", "QUICK", "base_config", "run_fig3", "run_fig4", "run_fig5", "rounds_to_target", "series"]

#: [CSGD] Appendix A.
FULL: dict[str, Any] = {
    "model": "vgg16",
    "dataset": "cifar10",
    "workers": 8,
    "batch_size": 128,
    "lr": 0.4,
    "epochs": 200.0,
    "lr_decay_epochs": [100.0, 150.0],
    "lr_decay_factor": 0.1,
    "eval_samples": 10000,
}
#: The CPU scale: same workers, a small model on bundled data; lr x ``lr_scale`` of the paper's value.
QUICK: dict[str, Any] = {
    "model": "mlp",
    "dataset": "mnist_bundled",
    "workers": 8,
    "batch_size": 32,
    "eval_samples": 2000,
    "executor": "vmap",
}
#: The paper's learning rates are multiplied by this in quick mode (0.4 -> 0.2 for the MLP).
QUICK_LR_SCALE = 0.5


def base_config(quick: bool, seed: int, *, dry_run: bool = False, **kw: Any) -> RunConfig:
    """A RunConfig of the quick or full scale with the stated time model; ``kw`` overrides; ``dry_run``: the
    full scale's two-step dry run (:func:`~coopsgd.experiments.dry_run.dry_run_fields`)."""
    fields: dict[str, Any] = {**(QUICK if quick else FULL), **time_fields(quick), "seed": seed, "device": DEVICE.get()}
    fields.update(kw)
    if dry_run:
        fields = dry_run_fields(fields)
    if fields.get("max_steps") is not None:  # a run of max_steps steps: the full scale's epochs do not apply
        fields.pop("epochs", None)
    return RunConfig(**fields)


def config(args: ExperimentArgs, **kw: Any) -> RunConfig:
    """:func:`base_config` at the scale, seed and dry run of ``args``."""
    return base_config(args.quick, args.seed, dry_run=args.dry_run, **kw)


def run(args: ExperimentArgs, cfg: RunConfig, out: Path, label: str, **extra: Any) -> dict[str, Any]:
    """Train ``cfg`` into ``out`` (:func:`~coopsgd.experiments.harness.run_config`); ``extra`` is kept in the
    result."""
    return run_config(cfg, out, label, progress=args.progress, extra=extra)


def lr_of(paper_lr: float, quick: bool) -> float:
    """The learning rate run for the paper's ``paper_lr`` (scaled by :data:`QUICK_LR_SCALE` in quick mode)."""
    return paper_lr * QUICK_LR_SCALE if quick else paper_lr


def start(args: ExperimentArgs) -> Path:
    """Check the full scale's data (before anything trains) and create the output directory."""
    if not args.quick and not args.dry_run:
        check_full_data(FULL["dataset"])
    return args.start()


def scale_note(quick: bool, dry_run: bool = False) -> str:
    """The scale in words, for figures and results."""
    if dry_run:
        return (f"dry run: the full scale (VGG-16, 8 workers) for {DRY_RUN_STEPS} steps on synthetic 3x32x32 data "
                "of 10 classes -- a smoke test, not a result")
    if quick:
        return (
            f"quick scale: MLP on bundled MNIST (8,000 train images), 8 workers, batch 32/worker, "
            f"lr = paper lr x {QUICK_LR_SCALE:g}"
        )
    return "full scale: VGG-16 on CIFAR-10, 8 workers, batch 128/worker ([CSGD] App. A)"


# ------------------------------------------------------------------------------------------------- Fig. 3

FIG3_POINTS: list[tuple[int, str]] = [
    (1, "complete"),
    (4, "complete"),
    (16, "complete"),
    (1, "hypercube"),
    (1, "ring"),
    (4, "ring"),
]


@register(
    "csgd-fig3",
    "[CSGD] Fig. 3: network error bound over (tau, zeta) and measured error floors at fixed lr",
    engines=("simulate", "distributed"),
)
def run_fig3(args: ExperimentArgs, *, points: Sequence[tuple[int, str]] | None = None) -> dict[str, Any]:
    """Heat map of the NEB factor with circled (tau, zeta) points, and for each point the training loss of
    the averaged model at a fixed learning rate; the error floor is the mean over the last 25 % of steps.
    ``points``: the (tau, topology) points (default :data:`FIG3_POINTS`)."""
    out = start(args)
    lr = lr_of(0.4, args.quick)
    steps = DRY_RUN_STEPS if args.dry_run else scaled(600 if args.quick else 40000, args.scale, 20)
    planned = args.first(points or FIG3_POINTS)
    runs = [_fig3_run(args, out, tau, topo, lr=lr, steps=steps) for tau, topo in planned]
    note = f"{scale_note(args.quick, args.dry_run)}; fixed lr {lr:g}; {describe_time(time_fields(args.quick))}"
    heat = plot_network_error_heatmap(
        out / "csgd_fig3a_heatmap.png",
        taus=range(1, 21),
        circled=[(r["tau"], r["zeta"], f"τ={r['tau']}, ζ={r['zeta']:.2f}") for r in runs],
        title="[CSGD] Fig. 3a: network error bound factor",
    )
    curves = plot_panels(out / "csgd_fig3b_loss.png", runs,
                         [panel(x, "train_loss", "training loss (averaged model)", logy=True, **clock_x(x))
                          for x in ("step", "time_s")],
                         title="[CSGD] Fig. 3b: larger tau or zeta -> higher error floor at a fixed lr", note=note,
                         ncols=2)
    summary = _fig3_summary(args, runs, lr, steps)
    if args.dry_run:
        summary = dry_run_summary("csgd-fig3", ", ".join(f"tau={t}/{topo}" for t, topo in planned), runs,
                                  every=None if args.all_settings else f"all {len(FIG3_POINTS)} (tau, topology) points")
    return {
        "experiment": "csgd-fig3",
        "quick": args.quick,
        "lr": lr,
        "steps": steps,
        "time_model": time_fields(args.quick),
        "scale": note,
        "runs": public_runs(runs),
        "error_floor": {f"tau={r['tau']},{r['topology']}": r["error_floor"] for r in runs},
        "plots": [str(heat), str(curves)],
        "summary": summary,
    }


def _fig3_run(args: ExperimentArgs, out: Path, tau: int, topo: str, *, lr: float, steps: int) -> dict[str, Any]:
    """One (tau, topology) point at the fixed ``lr``, with its error floor."""
    z = float(mixing_matrix(topo, 8, "metropolis").zeta)
    cfg = config(args, preset="decentralized_periodic", tau=tau, topology=topo, weights="metropolis", lr=lr,
                 max_steps=steps, lr_decay_epochs=[], eval_every=max(1, steps // 30))
    res = run(args, cfg, out / f"tau{tau}_{topo}", f"tau={tau}, {topo} (zeta={z:.2f})",
              tau=tau, topology=topo, zeta=z, neb_factor=float(network_error_term(tau, z)))
    res["error_floor"] = tail_mean(res, "train_loss", 0.25)
    return res


def _fig3_summary(args: ExperimentArgs, runs: list[dict[str, Any]], lr: float, steps: int) -> list[str]:
    summary = [
        f"csgd-fig3 ({args.scale_name}): fixed lr {lr:g}, {steps} steps; "
        "error floor = mean training loss over the last 25% of steps"
    ]
    for r in runs:
        summary.append(
            f"  tau={r['tau']:<3d} {r['topology']:9s} zeta={r['zeta']:.3f}  NEB factor {r['neb_factor']:7.2f}"
            f"  error floor {r['error_floor']:.4f}"
        )
    return summary


# ------------------------------------------------------------------------------------------------- Fig. 4

FIG4_CASES = ("alpha=0.9/m", "alpha=2/(m+2)", "alpha=0.25", "alpha=2/(m+2) non-blocking")
#: Fig. 4's workers and learning rate (the paper's lr in both modes: the MLP takes it, and it separates the
#: alphas more clearly).
FIG4_M, FIG4_LR = 8, 0.4


@register(
    "csgd-fig4",
    "[CSGD] Fig. 4: EASGD alpha sweep (m=8) and blocking vs non-blocking time",
    engines=("simulate", "distributed"),
)
def run_fig4(args: ExperimentArgs, *, nonblocking: bool = True) -> dict[str, Any]:
    """EASGD, m = 8, tau = 1: alpha = 0.9/m, 2/(m+2) (best, Lemma 1), 0.25 > 2/(m+1) (diverges), and the
    best alpha non-blocking (``nonblocking=False``: the three blocking cases only). Reports the mean training
    loss of the local models (running mean of the workers' mini-batch losses), the discrepancy ||X(I-J)||^2/m
    over workers and z, and simulated time."""
    out = start(args)
    steps = scaled(300, args.scale, 30) if args.quick else None
    cases = _fig4_cases(args, nonblocking)
    runs = [_fig4_run(args, out, *case, steps=steps) for case in cases]
    note = (
        f"{scale_note(args.quick, args.dry_run).split(', lr =')[0]}; tau=1, lr {FIG4_LR:g} (the paper's); "
        f"{describe_time(time_fields(args.quick))}"
    )
    plot = _fig4_plot(out, runs, note)
    saving = _fig4_saving(runs)
    summary = _fig4_summary(args, runs, saving)
    if args.dry_run:
        summary = dry_run_summary("csgd-fig4", ", ".join(c[0] for c in cases), runs,
                                  every=None if args.all_settings else "all four alpha cases")
    return {
        "experiment": "csgd-fig4",
        "quick": args.quick,
        "lr": FIG4_LR,
        "time_model": time_fields(args.quick),
        "scale": note,
        "runs": public_runs(runs),
        "nonblocking_time_saving": saving,
        "plots": [str(plot)],
        "summary": summary,
    }


def _fig4_cases(args: ExperimentArgs, nonblocking: bool) -> list[tuple[str, str, float, bool]]:
    """(case key of :data:`FIG4_CASES`, label, alpha, non-blocking) of every run; a dry run without
    ``all_settings``: the first alpha and the non-blocking code path."""
    m, best = FIG4_M, easgd_best_alpha(FIG4_M)
    cases = [
        (FIG4_CASES[0], "0.9/m", 0.9 / m, False),
        (FIG4_CASES[1], "2/(m+2) (best)", best, False),
        (FIG4_CASES[2], "0.25 > 2/(m+1)", 0.25, False),
        (FIG4_CASES[3], "2/(m+2) non-blocking", best, True),
    ][: 4 if nonblocking else 3]
    if args.dry_run and not args.all_settings:
        cases = [cases[0], *cases[3:]]
    return cases


def _fig4_run(args: ExperimentArgs, out: Path, case: str, name: str, alpha: float, nb: bool, *,
              steps: int | None) -> dict[str, Any]:
    """One alpha case, with the local models' mean loss per record and the tails the claims compare."""
    cfg = config(args, preset="easgd", tau=1, alpha=alpha, nonblocking=nb, lr=FIG4_LR, max_steps=steps,
                 eval_every=max(1, (steps or 10000) // 30) if args.quick else None)
    res = run(args, cfg, out / f"alpha{alpha:.4f}{'_nb' if nb else ''}", f"alpha={alpha:.4f} ({name})",
              case=case, alpha=alpha, nonblocking=nb, zeta=easgd_zeta(alpha, FIG4_M))
    for rec in res["_metrics"]:
        wl = [v for v in rec.get("worker_losses", []) if v is not None and np.isfinite(v)]
        rec["local_loss"] = float(np.mean(wl)) if wl else None
    res["local_loss_tail"] = tail_mean(res, "local_loss", 0.25)
    res["discrepancy_tail"] = tail_mean(res, "consensus_distance", 0.25)
    return res


def _fig4_plot(out: Path, runs: list[dict[str, Any]], note: str) -> Path:
    """(a) the local models' loss and (b) the discrepancy of the blocking cases; (c) blocking vs non-blocking."""
    ok = [r for r in runs if not r["diverged"]]
    at = {r["case"]: i for i, r in enumerate(runs)}
    blocking_cases = [at[c] for c in FIG4_CASES[:3] if c in at]
    best_pair = [at[c] for c in (FIG4_CASES[1], FIG4_CASES[3]) if c in at]

    def _lim(key: str) -> tuple[float, float] | None:
        vals = np.concatenate([series(r, "step", key)[1] for r in ok]) if ok else np.array([])
        vals = vals[vals > 0]
        return (float(vals.min()) / 1.5, float(vals.max()) * 1.5) if vals.size else None

    loss = "training loss of local models (mean)"
    return plot_panels(
        out / "csgd_fig4_easgd.png",
        runs,
        [
            panel("step", "local_loss", loss, logy=True, runs=blocking_cases, title="(a) average training loss",
                  ylim=_lim("local_loss")),
            panel("step", "consensus_distance", "||X(I-J)||^2/m (workers + z)", logy=True, runs=blocking_cases,
                  title="(b) worker-auxiliary discrepancy", ylim=_lim("consensus_distance")),
            panel("time_s", "local_loss", loss, logy=True, runs=best_pair, legend=True,
                  title="(c) blocking vs non-blocking, alpha=2/(m+2)", **clock_x("time_s")),
        ],
        title="[CSGD] Fig. 4: EASGD with m=8",
        note=note,
        ncols=3,
    )


def _fig4_saving(runs: list[dict[str, Any]]) -> float | None:
    """The share of the best alpha's time the non-blocking run saves (``None``: a case missing or untimed)."""
    at = {r["case"]: r for r in runs}
    if FIG4_CASES[1] not in at or FIG4_CASES[3] not in at:
        return None
    blocking, nonblocking = at[FIG4_CASES[1]], at[FIG4_CASES[3]]
    if blocking.get("time_s") and nonblocking.get("time_s"):
        return 1.0 - nonblocking["time_s"] / blocking["time_s"]
    return None


def _fig4_summary(args: ExperimentArgs, runs: list[dict[str, Any]], saving: float | None) -> list[str]:
    summary = [
        f"csgd-fig4 ({args.scale_name}): EASGD m=8, tau=1, lr {FIG4_LR:g}; "
        f"best alpha 2/(m+2)={easgd_best_alpha(FIG4_M):.4f}, divergence beyond 2/(m+1)="
        f"{easgd_alpha_limit(FIG4_M):.4f}"
    ]
    for r in runs:
        if r["diverged"]:
            summary.append(
                f"  {r['label']:34s} zeta={r['zeta']:.3f}  DIVERGED at step {r['diverged']['step']}"
            )
        else:
            summary.append(
                f"  {r['label']:34s} zeta={r['zeta']:.3f}  local-model loss (last 25%) "
                f"{r['local_loss_tail']:.4f}  discrepancy {r['discrepancy_tail']:.4f}  "
                f"{r['time_source']} time {r['time_s']:.1f} s"
            )
    if saving is not None:
        summary.append(f"  non-blocking saves {100 * saving:.0f}% of the simulated time (identical iterates)")
    return summary


# ------------------------------------------------------------------------------------------------- Fig. 5

FIG5_TAUS = (1, 4, 8, 16, 24)
#: The paper's two learning rates of Fig. 5.
FIG5_PAPER_LRS = (0.04, 0.4)


@register(
    "csgd-fig5",
    "[CSGD] Fig. 5: local SGD tau in {1,4,8,16,24} at two learning rates",
    engines=("simulate", "distributed"),
)
def run_fig5(args: ExperimentArgs, *, taus: tuple[int, ...] = FIG5_TAUS,
             paper_lrs: tuple[float, ...] = FIG5_PAPER_LRS) -> dict[str, Any]:
    """PSASGD (local SGD) for each tau at the paper's lr 0.04 and 0.4 (scaled in quick mode), lr / 10 at
    50 % and 75 % of training: loss vs epochs and vs simulated wall-clock, test accuracy."""
    out = start(args)
    every = f"tau in {{{', '.join(map(str, taus))}}} x paper lr {{{', '.join(f'{v:g}' for v in paper_lrs)}}}"
    taus, paper_lrs = tuple(args.first(taus)), tuple(args.first(paper_lrs))
    epochs = (8.0 if args.quick else 200.0) * args.scale
    decay = [epochs * 0.5, epochs * 0.75]
    runs = [_fig5_run(args, out, tau, paper_lr, epochs=epochs, decay=decay) for paper_lr in paper_lrs for tau in taus]
    n = len(taus)
    groups = [(list(range(k * n, (k + 1) * n)), p, lr_of(p, args.quick)) for k, p in enumerate(paper_lrs)]
    note = (f"{scale_note(args.quick, args.dry_run)}; lr/10 at epochs {decay[0]:g}, {decay[1]:g}; "
            f"{describe_time(time_fields(args.quick))}")
    plot = _fig5_plot(out, runs, groups, note)
    table = [_fig5_row(r) for r in runs]
    gaps: dict[str, float | None] = {}
    for idx, paper_lr, _ in groups:
        losses = [runs[i].get("final", {}).get("train_loss") for i in idx]
        gaps[f"{paper_lr:g}"] = (max(losses) / min(losses)) if all(v is not None for v in losses) else None
    summary = _fig5_summary(args, table, groups, gaps, epochs)
    if args.dry_run:
        summary = dry_run_summary("csgd-fig5", ", ".join(f"tau={r['tau']} at paper lr {r['paper_lr']:g}" for r in runs),
                                  runs, every=None if args.all_settings else every)
    return {
        "experiment": "csgd-fig5",
        "quick": args.quick,
        "epochs": epochs,
        "time_model": time_fields(args.quick),
        "scale": note,
        "table": table,
        "loss_spread_over_tau": gaps,
        "runs": public_runs(runs),
        "plots": [str(plot)],
        "summary": summary,
    }


def _fig5_run(args: ExperimentArgs, out: Path, tau: int, paper_lr: float, *, epochs: float,
              decay: list[float]) -> dict[str, Any]:
    lr = lr_of(paper_lr, args.quick)
    cfg = config(args, preset="local_sgd", tau=tau, lr=lr, epochs=epochs, lr_decay_epochs=decay,
                 eval_every=8 if args.quick else None)
    return run(args, cfg, out / f"lr{paper_lr:g}_tau{tau}", f"tau={tau}", tau=tau, lr=lr, paper_lr=paper_lr)


def _fig5_plot(out: Path, runs: list[dict[str, Any]], groups: list[tuple[list[int], float, float]], note: str) -> Path:
    """Per learning rate: loss vs epochs, loss vs wall-clock, test accuracy."""
    panels = []
    for idx, _, lr in groups:
        panels += [
            panel("epoch", "train_loss", "training loss", logy=True, runs=idx, title=f"lr {lr:g}: loss vs epochs",
                  legend=True),
            panel("time_s", "train_loss", "training loss", logy=True, runs=idx,
                  title=f"lr {lr:g}: loss vs wall-clock", **clock_x("time_s")),
            panel("epoch", "test_accuracy", "test accuracy", runs=idx, title=f"lr {lr:g}: test accuracy"),
        ]
    return plot_panels(out / "csgd_fig5_local_sgd.png", runs, panels,
                       title="[CSGD] Fig. 5: local SGD error-runtime trade-off", note=note, ncols=3)


def _fig5_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "paper_lr": r["paper_lr"],
        "lr": r["lr"],
        "tau": r["tau"],
        "final_train_loss": r.get("final", {}).get("train_loss"),
        "test_accuracy": r.get("final", {}).get("test_accuracy"),
        "time_s": r.get("time_s"),
        "time_source": r.get("time_source"),
        "rounds": r.get("communication_rounds"),
    }


def _fig5_summary(args: ExperimentArgs, table: list[dict[str, Any]], groups: list[tuple[list[int], float, float]],
                  gaps: dict[str, float | None], epochs: float) -> list[str]:
    summary = [
        f"csgd-fig5 ({args.scale_name}): local SGD, {epochs:g} epochs, lrs "
        f"{', '.join(f'{g[2]:g}' for g in groups)} (paper {', '.join(f'{g[1]:g}' for g in groups)})"
    ]
    for row in table:
        summary.append(
            f"  lr {row['lr']:<6g} tau={row['tau']:<3d} final train loss {row['final_train_loss']:.4f}  "
            f"test acc {row['test_accuracy']:.3f}  {row['time_source']} time {row['time_s']:.1f} s  "
            f"rounds {row['rounds']}"
        )
    for _, paper_lr, lr in groups:
        g = gaps[f"{paper_lr:g}"]
        if g is not None:
            summary.append(f"  lr {lr:g}: largest / smallest final training loss over tau = {g:.2f}x")
    return summary


def rounds_to_target(res: dict[str, Any], target: float) -> float | None:
    """Communication rounds until the averaged model's training loss first reaches ``target``."""
    return first_reach(res, target, x="rounds")


# --------------------------------------------------------------------------------- multi-seed assessments
# Metric names are the same at every scale (the paper's learning rates, not the quick ones, name the rows).


def _fig3_key(tau: int, topo: str) -> str:
    return f"error floor, tau={tau}, {topo}"


def fig3_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    return {_fig3_key(r["tau"], r["topology"]): r.get("error_floor") for r in res["runs"]}


assess("csgd-fig3", Assessment(fig3_metrics, [
    Claim("larger tau -> higher training-loss floor at the same lr (Fig. 3b), zeta = 0",
          (_fig3_key(1, "complete"), _fig3_key(4, "complete"), _fig3_key(8, "complete"), _fig3_key(16, "complete")),
          skip_absent=True),
    Claim("larger zeta -> higher floor (Fig. 3b), tau = 1",
          (_fig3_key(1, "complete"), _fig3_key(1, "hypercube"), _fig3_key(1, "ring")), skip_absent=True),
    Claim("larger zeta -> higher floor (Fig. 3b), tau = 4", (_fig3_key(4, "complete"), _fig3_key(4, "ring"))),
    Claim("the floor follows the NEB factor: tau=16/complete (15.0) below tau=4/ring (17.7)",
          (_fig3_key(16, "complete"), _fig3_key(4, "ring"))),
]))


def fig4_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    m: dict[str, float | None] = {}
    # results written before runs carried their case key hold the cases in FIG4_CASES order
    for default, r in zip(FIG4_CASES, res["runs"], strict=False):
        case = r.get("case", default)
        m[f"diverged, {case}"] = 1.0 if r["diverged"] else 0.0
        m[f"local-model loss, {case}"] = r.get("local_loss_tail") if not r["diverged"] else None
        m[f"discrepancy, {case}"] = r.get("discrepancy_tail") if not r["diverged"] else None
        m[f"time (s), {case}"] = r.get("time_s") if not r["diverged"] else None
    m["non-blocking time saving"] = res.get("nonblocking_time_saving")
    return m


assess("csgd-fig4", Assessment(fig4_metrics, [
    Claim("alpha = 2/(m+2) converges faster than 0.9/m (Fig. 4a)",
          ("local-model loss, alpha=2/(m+2)", "local-model loss, alpha=0.9/m")),
    Claim("alpha = 2/(m+2) has the smallest worker-z discrepancy (Fig. 4b)",
          ("discrepancy, alpha=2/(m+2)", "discrepancy, alpha=0.9/m")),
    Claim("alpha > 2/(m+1) does not converge", (0.5, "diverged, alpha=0.25"),
          what="every seed diverges (diverged = 1)"),
    Claim("non-blocking EASGD takes less time (Fig. 4c)", (0.0, "non-blocking time saving")),
], [
    PaperRow("non-blocking time saving (fraction of blocking time)", "about 0.5 (Fig. 4c)",
             "non-blocking time saving", fmt=".3f"),
]))


def fig5_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    m: dict[str, float | None] = {}
    for row in res["table"]:
        lr, tau = f"{row['paper_lr']:g}", row["tau"]
        m[f"final loss, paper lr {lr}, tau={tau}"] = row["final_train_loss"]
        m[f"test accuracy, paper lr {lr}, tau={tau}"] = row["test_accuracy"]
        m[f"time (s), paper lr {lr}, tau={tau}"] = row["time_s"]
    for lr, g in res["loss_spread_over_tau"].items():
        m[f"largest/smallest final loss over tau, paper lr {lr}"] = g
    return m


assess("csgd-fig5", Assessment(fig5_metrics, [
    *(Claim(f"after the same epochs, larger tau -> higher training loss (paper lr {lr})",
            tuple(f"final loss, paper lr {lr}, tau={t}" for t in FIG5_TAUS), skip_absent=True)
      for lr in ("0.04", "0.4")),
    Claim("larger tau finishes sooner in wall-clock (paper lr 0.4)",
          tuple(f"time (s), paper lr 0.4, tau={t}" for t in reversed(FIG5_TAUS)), skip_absent=True),
    Claim("the small lr shrinks the gap between the taus",
          ("largest/smallest final loss over tau, paper lr 0.04", "largest/smallest final loss over tau, paper lr 0.4")),
    Claim("large tau generalises better than fully synchronous SGD (Fig. 5c/d)",
          ("test accuracy, paper lr 0.4, tau=1", "test accuracy, paper lr 0.4, tau=24")),
]))
