"""[LSGD] matrix completion: EASGD vs LSGD on ``F(X) = 1/4 ||M - X X^T||_F^2``.

Paper settings: ``M = U U^T``, U in R^{d x r} i.i.d. N(0,1), d = 1000, r in {1, 10, 50, 100}, p = 8 workers,
lr = 5e-4, lambda = 1/5, tau = 1, 10 trials, each worker's X_0 i.i.d. N(0,1) and the same start for both
methods. EASGD: ``X+ = (1 - lr lam) X + lr lam Xt - lr grad F(X)``, ``Xt+ = (1 - p lr lam) Xt + p lr lam mean X``
(the easgd preset with alpha = lr * lam); LSGD pulls toward ``Z = argmin_i F(X_i)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.algorithms import presets
from coopsgd.engines.reference import run_reference
from coopsgd.errors import ConfigError, check_float, check_int
from coopsgd.objectives import MatrixCompletion
from coopsgd.train.progress import Progress

__all__ = ["MC_SETTINGS", "MC_QUICK", "run_matrix_completion", "plot_matrix_completion", "parse_ranks"]

MC_SETTINGS: dict[str, Any] = {
    "d": 1000, "ranks": [1, 10, 50, 100], "workers": 8, "lr": 5e-4, "lam": 0.2, "tau": 1, "trials": 10, "steps": 1000,
}
#: A 2-core-CPU scale with the same qualitative outcome (seconds instead of tens of minutes).
MC_QUICK: dict[str, Any] = {**MC_SETTINGS, "d": 200, "ranks": [1, 10], "trials": 3, "steps": 300}


def parse_ranks(text: str) -> list[int]:
    try:
        ranks = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ConfigError.invalid("ranks", text, "a comma-separated list of positive integers, e.g. 1,10,50") from None
    if not ranks or any(r < 1 for r in ranks):
        raise ConfigError.invalid("ranks", text, "a comma-separated list of positive integers, e.g. 1,10,50")
    return ranks


def run_matrix_completion(
    *,
    d: int = MC_SETTINGS["d"],
    ranks: list[int] | None = None,
    trials: int = MC_SETTINGS["trials"],
    steps: int = MC_SETTINGS["steps"],
    workers: int = MC_SETTINGS["workers"],
    lr: float = MC_SETTINGS["lr"],
    lam: float = MC_SETTINGS["lam"],
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Final centre objective per method and rank over ``trials`` trials (mean, std, values, curves)."""
    d = check_int("d", d, minimum=2)
    ranks = list(MC_SETTINGS["ranks"] if ranks is None else ranks)
    for r in ranks:
        if check_int("ranks", r, minimum=1) > d:
            raise ConfigError.invalid("ranks", r, f"must be <= d={d}")
    trials = check_int("trials", trials, minimum=1)
    steps = check_int("steps", steps, minimum=1)
    workers = check_int("workers", workers, minimum=1)
    lr = check_float("lr", lr, low=0.0, low_open=True)
    lam = check_float("lam", lam, low=0.0)
    specs = {
        "easgd": presets.easgd(workers, 1, alpha=lr * lam),
        "lsgd": presets.lsgd(workers, 1, lam=lam),
    }
    record_every = max(1, steps // 50)
    out: dict[str, Any] = {name: {} for name in specs}
    curves: dict[str, dict[int, list[np.ndarray]]] = {name: {} for name in specs}
    # a bar on a terminal, plain lines in a log (no carriage returns)
    bar = Progress(len(ranks) * trials * len(specs), desc="matrix completion (runs)") if progress else None
    rec_steps = None
    for r in ranks:
        finals: dict[str, list[float]] = {name: [] for name in specs}
        for t in range(trials):
            obj = MatrixCompletion(d, r, seed=seed * 1000 + t)
            x0 = np.random.default_rng([seed, t, r]).standard_normal((workers, obj.dim))
            for name, spec in specs.items():
                res = run_reference(spec, obj, steps=steps, lr=lr, x0=x0, record_every=record_every)
                finals[name].append(res.final_center_objective)
                curves[name].setdefault(r, []).append(res.center_objective)
                rec_steps = res.steps
                if bar is not None:
                    bar.update(bar.n + 1)
        for name in specs:
            vals = np.asarray(finals[name])
            out[name][str(r)] = {"mean": float(vals.mean()), "std": float(vals.std()), "values": vals.tolist()}
    if bar is not None:
        bar.close()
    out["settings"] = {"d": d, "ranks": ranks, "trials": trials, "steps": steps, "workers": workers, "lr": lr,
                       "lam": lam, "easgd_alpha": lr * lam, "tau": 1, "seed": seed}
    out["_curves"] = curves
    out["_steps"] = rec_steps
    return out


def plot_matrix_completion(result: dict[str, Any], path: str | Path) -> Path:
    """Two panels: final centre objective per rank (mean +- std, log scale) and mean curves per rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coopsgd.plots import FIGURE_DPI

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = result["settings"]["ranks"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    width = 0.38
    xs = np.arange(len(ranks))
    floor = 1e-30
    for off, name, color in ((-width / 2, "easgd", "tab:blue"), (width / 2, "lsgd", "tab:red")):
        mean = np.array([max(result[name][str(r)]["mean"], floor) for r in ranks])
        std = np.array([result[name][str(r)]["std"] for r in ranks])
        ax1.bar(xs + off, mean, width, yerr=std, color=color, label=name.upper(), capsize=3)
    ax1.set_yscale("log")
    ax1.set_xticks(xs, [f"r={r}" for r in ranks])
    ax1.set_ylabel("final centre objective F")
    ax1.set_title(f"Matrix completion, d={result['settings']['d']}, {result['settings']['trials']} trials")
    ax1.legend()
    steps = result["_steps"]
    for name, ls in (("easgd", "-"), ("lsgd", "--")):
        for r in ranks:
            curve = np.mean(np.stack(result["_curves"][name][r]), axis=0)
            ax2.plot(steps, np.maximum(curve, floor), ls, label=f"{name.upper()} r={r}")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("centre objective (mean over trials)")
    ax2.legend(fontsize=7, ncol=2)
    ax2.grid(alpha=0.3)
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    return path


def mc_assessment(result: dict[str, Any]) -> dict[str, Any]:
    """Bands over the trials (each trial is a seed: its own M and starts) and the claims, as the multi-seed
    experiments report them (:func:`coopsgd.experiments.stats.aggregate`)."""
    from coopsgd.experiments.stats import Assessment, Claim, PaperRow, aggregate

    ranks = result["settings"]["ranks"]
    n = result["settings"]["trials"]
    per_trial: list[dict[str, float | None]] = [
        {f"{name.upper()} final centre objective, r={r}": result[name][str(r)]["values"][t]
         for r in ranks for name in ("easgd", "lsgd")}
        for t in range(n)
    ]
    claims = [Claim(f"LSGD recovers M, EASGD stalls at a larger objective (r={r})",
                    (f"LSGD final centre objective, r={r}", f"EASGD final centre objective, r={r}")) for r in ranks]
    rows = [PaperRow(f"LSGD final centre objective, r={r}", "-> 0 (M recovered)",
                     f"LSGD final centre objective, r={r}", fmt=".2g") for r in ranks]
    return aggregate(per_trial, Assessment(lambda _: {}, claims, rows))


__all__ += ["mc_assessment"]
