"""[LSGD] toy experiment (its Table 1 and Fig. 7): EASGD vs LSGD on the sinc landscape.

``L(x, y) = sin(pi r)/(pi r)``; 4 workers start at (-6,-4), (-15,-18), (20,11), (17,8); tau = 1; lr = 0.1;
EASGD with beta = 0.43 (alpha = beta/4); LSGD with lambda = 0.1; full gradients; run until converged.
The centre model is the auxiliary z for EASGD and the leader for LSGD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.algorithms import presets
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.reference import ReferenceEngine
from coopsgd.errors import check_float, check_int
from coopsgd.experiments.base import assess, register
from coopsgd.experiments.harness import ExperimentArgs
from coopsgd.experiments.stats import Assessment, Claim, PaperRow
from coopsgd.objectives import SincToy

__all__ = ["TOY_SETTINGS", "run_lsgd_toy", "plot_lsgd_toy"]

TOY_SETTINGS: dict[str, Any] = {
    "workers": 4,
    "starts": SincToy.STARTS.tolist(),
    "tau": 1,
    "lr": 0.1,
    "easgd_beta": 0.43,
    "lsgd_lambda": 0.1,
    "max_steps": 20000,
    "tol": 1e-12,
}


def _run_until_converged(spec: AlgorithmSpec, obj: SincToy, lr: float, max_steps: int, tol: float) -> dict[str, Any]:
    eng = ReferenceEngine(spec, obj, SincToy.STARTS.copy())
    traj = [eng.state.copy()]
    centers = [eng.center().copy()]
    converged = False
    while eng.step_count < max_steps:
        before = eng.state
        eng.step(None, lr)
        traj.append(eng.state.copy())
        centers.append(eng.center().copy())
        if np.max(np.abs(eng.state - before)) < tol:
            converged = True
            break
    traj_arr = np.stack(traj)
    center_arr = np.stack(centers)
    m = spec.workers
    values = np.asarray(obj.value(traj_arr.reshape(-1, 2))).reshape(traj_arr.shape[:2])
    center_values = np.asarray(obj.value(center_arr))
    return {
        "final_objective": float(center_values[-1]),
        "workers": [float(v) for v in values[-1, :m]],
        "center": [float(c) for c in center_arr[-1]],
        "steps": int(eng.step_count),
        "converged": converged,
        "_trajectory": traj_arr[:, :m],
        "_center_trajectory": center_arr,
        "_worker_values": values[:, :m],
        "_center_values": center_values,
    }


def run_lsgd_toy(
    *,
    lr: float = TOY_SETTINGS["lr"],
    beta: float = TOY_SETTINGS["easgd_beta"],
    lam: float = TOY_SETTINGS["lsgd_lambda"],
    max_steps: int = TOY_SETTINGS["max_steps"],
    tol: float = TOY_SETTINGS["tol"],
) -> dict[str, Any]:
    """Run both methods to convergence. Keys starting with ``_`` hold arrays for plotting."""
    lr = check_float("lr", lr, low=0.0, low_open=True)
    max_steps = check_int("max_steps", max_steps, minimum=1)
    tol = check_float("tol", tol, low=0.0, low_open=True)
    obj = SincToy()
    m = TOY_SETTINGS["workers"]
    return {
        "easgd": _run_until_converged(presets.easgd(m, 1, beta=beta), obj, lr, max_steps, tol),
        "lsgd": _run_until_converged(presets.lsgd(m, 1, lam=lam), obj, lr, max_steps, tol),
        "settings": {**TOY_SETTINGS, "lr": lr, "easgd_beta": beta, "easgd_alpha": beta / m, "lsgd_lambda": lam,
                     "max_steps": max_steps, "tol": tol},
    }


def public(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of a result (drops the ``_`` arrays)."""
    if isinstance(result, dict):
        return {k: public(v) for k, v in result.items() if not str(k).startswith("_")}
    return result


def plot_lsgd_toy(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``lsgd_toy_trajectories.png`` (contours + paths) and ``lsgd_toy_objective.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from coopsgd.plots import FIGURE_DPI

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    obj = SincToy()
    lim = 22.0
    grid = np.linspace(-lim, lim, 400)
    gx, gy = np.meshgrid(grid, grid)
    gz = np.asarray(obj.value(np.stack([gx.ravel(), gy.ravel()], axis=1))).reshape(gx.shape)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), constrained_layout=True)
    for ax, key, title in zip(axes, ("easgd", "lsgd"), ("EASGD (centre: z)", "LSGD (centre: leader)"), strict=False):
        res = result[key]
        cs = ax.contourf(gx, gy, gz, levels=30, cmap="Greys_r", alpha=0.85)
        traj = res["_trajectory"]
        for i in range(traj.shape[1]):
            ax.plot(traj[:, i, 0], traj[:, i, 1], color=colors[i % 4], lw=1.6, label=f"worker {i}")
            ax.plot(traj[0, i, 0], traj[0, i, 1], "o", color=colors[i % 4], ms=6)
            ax.plot(traj[-1, i, 0], traj[-1, i, 1], "*", color=colors[i % 4], ms=11, mec="k")
        c = res["_center_trajectory"]
        ax.plot(c[:, 0], c[:, 1], "--", color="yellow", lw=1.4, label="centre")
        ax.plot(c[-1, 0], c[-1, 1], "X", color="yellow", ms=11, mec="k")
        ax.set_title(f"{title}: final centre objective {res['final_objective']:.4f}")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend(loc="lower right", fontsize=8)
    fig.colorbar(cs, ax=axes, shrink=0.8, label="sin(pi r)/(pi r)")
    p1 = out / "lsgd_toy_trajectories.png"
    fig.savefig(p1, dpi=FIGURE_DPI)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True, constrained_layout=True)
    for ax, key in zip(axes, ("easgd", "lsgd"), strict=False):
        res = result[key]
        steps = np.arange(len(res["_center_values"]))
        for i in range(res["_worker_values"].shape[1]):
            ax.plot(steps + 1, res["_worker_values"][:, i], color=colors[i % 4], lw=1.2, label=f"worker {i}")
        ax.plot(steps + 1, res["_center_values"], "k--", lw=1.8, label="centre")
        ax.set_xscale("log")
        ax.set_xlabel("step + 1")
        ax.set_title(key.upper())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("objective")
    axes[1].legend(fontsize=8)
    p2 = out / "lsgd_toy_objective.png"
    fig.savefig(p2, dpi=FIGURE_DPI)
    plt.close(fig)
    return [p1, p2]


# ------------------------------------------------------------------------------- coopsgd reproduce lsgd-toy


def _reproduce(args: ExperimentArgs) -> dict[str, Any]:
    """``coopsgd reproduce lsgd-toy``: the toy run (deterministic: the seed, scale and engine change nothing)."""
    res = run_lsgd_toy()
    plots = plot_lsgd_toy(res, args.out)
    data = public(res)
    data["plots"] = [str(p) for p in plots]
    data["summary"] = [
        f"{key.upper():6s} centre objective {data[key]['final_objective']:.4f} after {data[key]['steps']} steps; "
        f"workers: {', '.join(f'{v:.4f}' for v in data[key]['workers'])}"
        for key in ("easgd", "lsgd")
    ]
    return data


register("lsgd-toy", "[LSGD] Table 1 / Fig. 7: EASGD vs LSGD on sin(pi r)/(pi r)", ("reference",))(_reproduce)


def _toy_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    return {"EASGD centre objective": res["easgd"]["final_objective"],
            "LSGD leader objective": res["lsgd"]["final_objective"]}


def _toy_assessment() -> Assessment:
    return Assessment(
        _toy_metrics,
        [Claim("LSGD's leader ends in a deeper basin than EASGD's centre (Table 1)",
               ("LSGD leader objective", "EASGD centre objective"))],
        [PaperRow("final centre objective", "LSGD lower than EASGD (Table 1; its values are not restated in "
                  "our spec)", "LSGD leader objective"),
         PaperRow("final centre objective, EASGD", "higher than LSGD's", "EASGD centre objective")],
    )


assess("lsgd-toy", _toy_assessment(), deterministic=True)
