"""Shared run-and-plot helpers of the neural-network reproductions (``coopsgd reproduce csgd-* / lsgd-*``).

Each experiment builds :class:`~coopsgd.train.config.RunConfig` objects, runs them through the trainer
(:func:`run_config`, or :func:`run_built` for an :class:`~coopsgd.train.trainer.Experiment` built by hand),
reads the records back from ``<out>/<run>/metrics.jsonl`` and draws multi-panel figures with
:func:`plot_panels`. Divergence (a :class:`~coopsgd.engines.reference.NonFiniteError`) is recorded as
``"diverged": {"step": ..., "error": ...}`` instead of being raised.

Simulated wall-clock in the quick modes comes from the simulated clock with a *stated* network and a
constant per-step compute time (:data:`QUICK_TIME`), so every number is deterministic and every figure
says which model of time produced it.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.engines.reference import NonFiniteError
from coopsgd.errors import DivergenceWarning
from coopsgd.train.config import RunConfig
from coopsgd.train.rundir import RunDir, jsonable

__all__ = [
    "QUICK_TIME",
    "FULL_TIME",
    "time_fields",
    "describe_time",
    "check_full_data",
    "run_config",
    "run_built",
    "series",
    "tail_mean",
    "first_reach",
    "value_at",
    "plot_panels",
    "scaled",
    "public_runs",
    "band_series",
    "FIGURES",
]

log = logging.getLogger(__name__)

#: Quick-mode time model: one local step costs a constant 100 ms (about one VGG-16 mini-batch of 128 on one
#: 2015-era GPU), and the network is slow: 2 ms per handshake, 100 Mbit/s.
QUICK_TIME: dict[str, Any] = {
    "compute": "constant",
    "compute_ms": 100.0,
    "net_latency_ms": 2.0,
    "net_bandwidth_mbps": 100.0,
}
#: Full-scale time model: the measured compute time of each step and the papers' 40 Gbit/s Ethernet.
FULL_TIME: dict[str, Any] = {"compute": "measured", "net_latency_ms": 0.1, "net_bandwidth_mbps": 40_000.0}


#: Engine of the current ``coopsgd reproduce`` call ("simulate" or "distributed"), set by the registry.
ENGINE: contextvars.ContextVar[str] = contextvars.ContextVar("coopsgd_experiment_engine", default="simulate")
#: Whether an experiment's runs may replace runs of another configuration in their directories
#: (``coopsgd reproduce --overwrite``; see :func:`coopsgd.train.rundir.check_run_dir`).
OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("coopsgd_experiment_overwrite", default=False)
#: When set to a list, :func:`plot_panels` appends a JSON-ready description of every figure it draws, so the
#: multi-seed runner (:mod:`coopsgd.experiments.multiseed`) can redraw it with bands over the seeds.
FIGURES: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "coopsgd_experiment_figures", default=None
)


def time_fields(quick: bool) -> dict[str, Any]:
    """The RunConfig time fields of a quick or full run."""
    return dict(QUICK_TIME if quick else FULL_TIME)


def describe_time(fields: dict[str, Any]) -> str:
    """One line naming the model of simulated time (printed in results and on every figure)."""
    if fields.get("compute") == "constant":
        comp = f"compute {fields['compute_ms']:g} ms/step (constant)"
    else:
        comp = "measured compute time per step"
    return (
        f"simulated time: {comp}; network {fields['net_latency_ms']:g} ms latency, "
        f"{fields['net_bandwidth_mbps']:g} Mbit/s (alpha-beta model)"
    )


def check_full_data(dataset: str) -> None:
    """Load the train split of ``dataset`` once so a missing dependency (torchvision) or missing files stop
    the full-scale run at once with the data layer's :class:`~coopsgd.errors.ConfigError`."""
    from coopsgd.data import load_dataset

    load_dataset(dataset, split="train")


def scaled(n: float, scale: float, minimum: int = 1) -> int:
    """``n * scale`` rounded, at least ``minimum`` (the tests' reduced runs)."""
    return max(minimum, int(round(n * scale)))


_STEP_RE = re.compile(r"at step (\d+)")


def _finish(
    label: str,
    run_dir: Path,
    summary: dict[str, Any] | None,
    error: BaseException | None,
    wall: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    metrics = RunDir.read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    res: dict[str, Any] = {
        "label": label,
        "dir": str(run_dir),
        "wall_s": round(wall, 2),
        "diverged": None,
        **extra,
    }
    if error is not None:
        m = _STEP_RE.search(str(error))
        res["diverged"] = {"step": int(m.group(1)) if m else None, "error": str(error)}
    if summary is not None:
        res["final"] = summary["final"]
        # time_s: the run's clock -- simulated, or measured on the distributed engine (time_source says which)
        res["time_s"] = summary.get("time_s")
        res["time_source"] = summary.get("time_source")
        res["simulated_time_s"] = summary["simulated_time_s"]
        res["simulated_split_s"] = summary["simulated_split_s"]
        res["measured_split_s"] = summary.get("measured_split_s")
        res["communication_rounds"] = summary["communication_rounds"]
        res["zeta"] = summary.get("zeta")
    res["_metrics"] = metrics
    return res


def run_config(
    cfg: RunConfig, out: Path, label: str, *, progress: bool = False, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into ``out`` with the simulate engine; return its result (``_metrics``: the records).

    A non-finite loss does not raise: the result's ``diverged`` holds the step and the message.
    """
    import dataclasses

    from coopsgd.train.trainer import run

    out = Path(out)
    if ENGINE.get() == "distributed":
        # one process per worker; the stated network is emulated on every message, time is measured
        cfg = dataclasses.replace(cfg, engine="distributed", emulate_network=True)
    t0 = time.perf_counter()
    summary: dict[str, Any] | None = None
    error: Exception | None = None
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DivergenceWarning
        )  # the experiments choose diverging settings on purpose
        try:
            summary = run(cfg, progress=progress, out=out, overwrite=OVERWRITE.get())
            if summary.get("zeta") is None:  # the distributed summary has no zeta: take it from the spec
                from coopsgd.algorithms import make_preset
                from coopsgd.theory.spectral import zeta

                spec = make_preset(cfg.preset, cfg.workers, **cfg.spec_kwargs())
                summary["zeta"] = None if spec.theory_matrix is None else zeta(spec.theory_matrix)
        except NonFiniteError as exc:
            error = exc
        except Exception as exc:  # a distributed rank that hit a NaN is reported by the launcher
            if cfg.engine == "distributed" and "non-finite" in str(exc):
                error = exc
            else:
                raise
    return _finish(label, out, summary, error, time.perf_counter() - t0, dict(extra or {}))


def run_built(
    exp: Any, out: Path, label: str, *, progress: bool = False, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run an :class:`~coopsgd.train.trainer.Experiment` built by hand through the trainer loop
    (:func:`coopsgd.train.trainer.iterate`), writing ``config.json``/``metrics.jsonl`` like :func:`train`."""
    from coopsgd.train.trainer import iterate, summarize

    out = Path(out)
    rd = RunDir(out)
    rd.write_config(
        exp.config.to_dict(),
        {
            "spec": exp.spec.describe(),
            "steps_per_epoch": exp.steps_per_epoch,
            "total_steps": exp.total_steps,
            **(extra or {}),
        },
    )
    rd.start_metrics()
    t0 = time.perf_counter()
    last: dict[str, Any] = {}
    error = None
    try:
        for rec in iterate(exp, progress=progress):
            last = rec
            rd.log(rec)
    except NonFiniteError as exc:
        error = exc
    finally:
        rd.close()
    summary = None
    if error is None and last:
        summary = summarize(exp.spec, exp.config, last, total_steps=exp.total_steps,
                            wall=time.perf_counter() - t0, engine=exp.sim.name, is_lm=exp.is_lm)
        rd.write_summary(jsonable(summary))
    return _finish(label, out, summary, error, time.perf_counter() - t0, dict(extra or {}))


def series(res: dict[str, Any], x: str, y: str) -> tuple[np.ndarray, np.ndarray]:
    """``(xs, ys)`` of the records of ``res`` that have a finite ``y`` (``x``: step, epoch, simulated_time_s...)."""
    xs, ys = [], []
    for r in res["_metrics"]:
        v = r.get(y)
        if v is None or r.get(x) is None or not np.isfinite(v):
            continue
        xs.append(float(r[x]))
        ys.append(float(v))
    return np.asarray(xs), np.asarray(ys)


def tail_mean(res: dict[str, Any], y: str = "train_loss", frac: float = 0.25) -> float | None:
    """Mean of ``y`` over the records in the last ``frac`` of the run (the measured error floor)."""
    xs, ys = series(res, "step", y)
    if not len(xs):
        return None
    cut = xs[-1] * (1.0 - frac)
    sel = ys[xs >= cut]
    return float(sel.mean())


def value_at(
    res: dict[str, Any], t: float, *, x: str = "time_s", y: str = "test_loss"
) -> float | None:
    """``y`` of the last record with ``x <= t`` (``None`` when there is none)."""
    xs, ys = series(res, x, y)
    sel = np.flatnonzero(xs <= t + 1e-9)
    return float(ys[sel[-1]]) if sel.size else None


def first_reach(
    res: dict[str, Any],
    target: float,
    *,
    x: str = "time_s",
    y: str = "train_loss",
    above: bool = False,
) -> float | None:
    """First ``x`` at which ``y`` reaches ``target`` (``<=``; ``>=`` when ``above``), or ``None``."""
    xs, ys = series(res, x, y)
    hit = ys >= target if above else ys <= target
    idx = np.flatnonzero(hit)
    return float(xs[idx[0]]) if idx.size else None


#: Axis labels of the x quantities the experiments plot against.
X_LABELS = {"step": "step", "epoch": "epoch", "simulated_time_s": "simulated wall-clock (s)",
            "time_s": "wall-clock (s; simulated, measured on the distributed engine)"}


def panel(x: str, y: str, ylabel: str, *, logy: bool = False, **extra: Any) -> dict[str, Any]:
    """A panel description for :func:`plot_panels`: ``y`` against ``x`` (one of :data:`X_LABELS`); ``extra``
    holds the optional keys (``runs``, ``title``, ``legend``, ...)."""
    return {"x": x, "y": y, "xlabel": X_LABELS[x], "ylabel": ylabel, "logy": logy, **extra}


def plot_panels(
    path: Path,
    runs: Sequence[dict[str, Any]],
    panels: Sequence[dict[str, Any]],
    *,
    title: str,
    note: str | None = None,
    ncols: int | None = None,
    colors: Sequence[Any] | None = None,
    styles: Sequence[str] | None = None,
) -> Path:
    """One figure, one panel per entry of ``panels`` (``x``, ``y``, ``xlabel``, ``ylabel``, optional ``logy``,
    ``title``, ``runs`` (indices into ``runs``)); every run a line; ``note`` printed under the title.

    A run may carry ``_band``: one list of metric records per seed; the line is then the mean over the seeds and a
    shaded band spans their min-max (see :func:`band_series`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = ncols or min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.5), squeeze=False, constrained_layout=True
    )
    for k, panel in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        for i in panel.get("runs", range(len(runs))):
            res = runs[i]
            lo = hi = None
            if res.get("_band") is not None:
                xs, ys, lo, hi = band_series(res, panel["x"], panel["y"])
            else:
                xs, ys = series(res, panel["x"], panel["y"])
            if panel.get("xscale") is not None:
                xs = xs * panel["xscale"]
            lab = res["label"]
            if res.get("diverged"):
                lab += f" (diverged @ step {res['diverged']['step']})"
            kw: dict[str, Any] = {"label": lab, "lw": 1.5}
            if colors is not None:
                kw["color"] = colors[i % len(colors)]
            if styles is not None:
                kw["ls"] = styles[i % len(styles)]
            ax.plot(xs, ys, **kw)
            if lo is not None and hi is not None and len(xs):
                ax.fill_between(xs, lo, hi, color=ax.lines[-1].get_color(), alpha=0.22, lw=0)
            if res.get("diverged") and len(xs):
                ax.plot(xs[-1], ys[-1], "x", color=ax.lines[-1].get_color(), ms=9, mew=2)
        ax.set_xlabel(panel["xlabel"])
        ax.set_ylabel(panel["ylabel"])
        if panel.get("logy"):
            ax.set_yscale("log")
        if panel.get("ylim") is not None:
            ax.set_ylim(*panel["ylim"])
        if panel.get("title"):
            ax.set_title(panel["title"], fontsize=10)
        ax.grid(alpha=0.3)
        if k == 0 or panel.get("legend"):
            ax.legend(fontsize=7)
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    import textwrap

    width = max(60, int(ncols * 4.6 * 15))
    fig.suptitle(title + ("\n" + "\n".join(textwrap.wrap(note, width)) if note else ""), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    record = FIGURES.get()
    if record is not None:
        record.append({
            "path": str(path), "title": title, "note": note, "ncols": ncols,
            "colors": None if colors is None else list(colors),
            "styles": None if styles is None else list(styles),
            "panels": [{**p, **({"runs": list(p["runs"])} if "runs" in p else {})} for p in panels],
            # in memory only: the records each line was drawn from (derived keys such as local_loss included)
            "runs": [{"label": r["label"], "diverged": r.get("diverged"), "_metrics": r.get("_metrics", [])}
                     for r in runs],
        })
    return path


def band_series(
    res: dict[str, Any], x: str, y: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Mean, min and max over the seeds of ``res["_band"]`` (a list of per-seed metric records), on the x
    values of the first seed that every seed covers (linear interpolation where their x differ)."""
    curves = [series({"_metrics": recs}, x, y) for recs in res["_band"]]
    curves = [(xs, ys) for xs, ys in curves if len(xs)]
    if not curves:
        return np.array([]), np.array([]), None, None
    lo_x = max(float(xs[0]) for xs, _ in curves)
    hi_x = min(float(xs[-1]) for xs, _ in curves)
    grid = curves[0][0]
    grid = grid[(grid >= lo_x - 1e-12) & (grid <= hi_x + 1e-12)]
    if not len(grid):
        return curves[0][0], curves[0][1], None, None
    stack = np.stack([np.interp(grid, xs, ys) for xs, ys in curves])
    return grid, stack.mean(axis=0), stack.min(axis=0), stack.max(axis=0)


def public_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The JSON-ready part of run results (drops ``_metrics``)."""
    return [jsonable({k: v for k, v in r.items() if not k.startswith("_")}) for r in runs]
