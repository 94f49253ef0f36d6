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

import contextlib
import contextvars
import dataclasses
import logging
import re
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.algorithms import make_preset
from coopsgd.data import load_dataset
from coopsgd.engines.reference import NonFiniteError
from coopsgd.errors import DivergenceWarning
from coopsgd.experiments.dry_run import DRY_RUN, dry_run_check, shape_text
from coopsgd.theory.spectral import zeta
from coopsgd.train import trainer
from coopsgd.train.config import RunConfig
from coopsgd.train.rundir import RunDir, jsonable

__all__ = [
    "ExperimentArgs",
    "experiment_context",
    "QUICK_TIME",
    "FULL_TIME",
    "time_fields",
    "describe_time",
    "check_full_data",
    "run_config",
    "run_built",
    "run_threads_of",
    "series",
    "tail_mean",
    "first_reach",
    "value_at",
    "plot_panels",
    "plot_curves",
    "scaled",
    "public_runs",
    "band_series",
    "FIGURES",
    "DEVICE",
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
#: Device of every model of a neural-network experiment (``coopsgd reproduce --device``; ``RunConfig.device``).
DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("coopsgd_experiment_device", default="cpu")
#: Whether an experiment's runs may replace runs of another configuration in their directories
#: (``coopsgd reproduce --overwrite``; see :func:`coopsgd.train.rundir.check_run_dir`).
OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("coopsgd_experiment_overwrite", default=False)

#: When set to a list, :func:`plot_panels` appends a JSON-ready description of every figure it draws, so the
#: multi-seed runner (:mod:`coopsgd.experiments.multiseed`) can redraw it with bands over the seeds.
FIGURES: contextvars.ContextVar[list[dict[str, Any]] | None] = contextvars.ContextVar(
    "coopsgd_experiment_figures", default=None
)


@dataclasses.dataclass(frozen=True)
class ExperimentArgs:
    """How ``coopsgd reproduce NAME`` asks an experiment to run: the one value every experiment function takes
    (``run(args, **options)``; ``options`` are an experiment's own test knobs, such as Fig. 5's ``taus``).

    ``out``: the directory of its runs, figures and result; ``quick``: the 2-core CPU scale (else the papers'
    full scale); ``seed``: the seed of every run; ``engine``: ``simulate`` or ``distributed`` where the
    experiment offers both (the reference experiments ignore it); ``progress``: progress bars on stderr;
    ``dry_run``: two steps of every full-scale setting on synthetic data of the real shapes
    (:func:`dry_run_fields`), the first setting of each sweep unless ``all_settings``; ``device``: where the
    models train (``--device``); ``overwrite``: runs may replace runs of another configuration in their
    directories (``--overwrite``); ``scale``: a step/epoch multiplier for the tests' reduced runs (1: the
    scale ``reproduce`` runs).
    """

    out: Path
    quick: bool = False
    seed: int = 0
    engine: str = "simulate"
    progress: bool = False
    dry_run: bool = False
    all_settings: bool = False
    device: str = "cpu"
    overwrite: bool = False
    scale: float = 1.0

    def replace(self, **changes: Any) -> ExperimentArgs:
        """A copy with ``changes`` (``args.replace(seed=1, out=...)``)."""
        return dataclasses.replace(self, **changes)

    @property
    def scale_name(self) -> str:
        """``"quick"`` or ``"full"``, as the summaries name the scale."""
        return "quick" if self.quick else "full"

    def first(self, grid: Sequence[Any]) -> list[Any]:
        """The settings of a sweep this call runs: all of ``grid``, or its first one in a dry run without
        ``all_settings``."""
        return list(grid[:1] if self.dry_run and not self.all_settings else grid)

    def start(self) -> Path:
        """Create :attr:`out` and return it."""
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        return out


@contextlib.contextmanager
def experiment_context(args: ExperimentArgs) -> Iterator[None]:
    """Within the block, :func:`run_config`, :func:`run_built` and the experiments' configurations follow ``args``:
    its engine (:data:`ENGINE`), dry run (:data:`DRY_RUN`), device (:data:`DEVICE`) and :data:`OVERWRITE`."""
    engine, dry, device, overwrite = (ENGINE.set(args.engine), DRY_RUN.set(bool(args.dry_run)),
                                      DEVICE.set(args.device), OVERWRITE.set(bool(args.overwrite)))
    try:
        yield
    finally:
        OVERWRITE.reset(overwrite)
        DEVICE.reset(device)
        DRY_RUN.reset(dry)
        ENGINE.reset(engine)


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


def _announce(label: str, out: Path, progress: bool) -> None:
    """With progress on, name the run its progress lines belong to (the runs of one preset at several settings
    and seeds would otherwise print identical lines)."""
    if progress:
        print(f"{label} -> {out}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def run_threads_of(cfg: RunConfig) -> Iterator[None]:
    """Within the block, torch computes with the threads a run of ``cfg`` takes in this process
    (:func:`coopsgd.train.problem.run_threads`: one for the small models on the simulator, as ``coopsgd run``
    does), so that a result does not depend on the machine's core count or ``OMP_NUM_THREADS`` (summation order
    changes with the threads: two threads moved csgd-fig4's losses in the third digit); restored afterwards."""
    import torch

    from coopsgd.train.problem import run_threads

    before = torch.get_num_threads()
    wanted = None if cfg.execution.engine == "distributed" else run_threads(cfg)
    if wanted is not None and wanted != before:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def run_config(
    cfg: RunConfig, out: Path, label: str, *, progress: bool = False, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into ``out`` with the simulate engine; return its result (``_metrics``: the records).

    A non-finite loss does not raise: the result's ``diverged`` holds the step and the message. Torch runs with
    the run's threads (:func:`run_threads_of`).
    """
    out = Path(out)
    _announce(label, out, progress)
    if ENGINE.get() == "distributed":
        # one process per worker; the stated network is emulated on every message, time is measured
        cfg = cfg.replace(engine="distributed", emulate_network=True)
    t0 = time.perf_counter()
    summary: dict[str, Any] | None = None
    error: Exception | None = None
    with warnings.catch_warnings(), run_threads_of(cfg):
        warnings.simplefilter(
            "ignore", DivergenceWarning
        )  # the experiments choose diverging settings on purpose
        try:
            summary = trainer.run(cfg, progress=progress, out=out, overwrite=OVERWRITE.get())
            if summary.get("zeta") is None:  # the distributed summary has no zeta: take it from the spec
                spec = make_preset(cfg.algorithm.preset, cfg.algorithm.workers, **cfg.spec_kwargs())
                summary["zeta"] = None if spec.theory_matrix is None else zeta(spec.theory_matrix)
        except NonFiniteError as exc:
            error = exc
        except Exception as exc:  # a distributed rank that hit a NaN is reported by the launcher
            if cfg.execution.engine == "distributed" and "non-finite" in str(exc):
                error = exc
            else:
                raise
    res = _finish(label, out, summary, error, time.perf_counter() - t0, dict(extra or {}))
    if DRY_RUN.get():
        dry_run_check(res, cfg, cfg.execution.engine, shape_text(cfg.problem.dataset))
    return res


def run_built(
    exp: Any, out: Path, label: str, *, progress: bool = False, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run an :class:`~coopsgd.train.trainer.Experiment` built by hand through the trainer loop
    (:func:`coopsgd.train.trainer.iterate`), writing ``config.json``/``metrics.jsonl`` like :func:`train`, a
    checkpoint every ``config.checkpoint_every`` steps and at the end (:func:`~coopsgd.train.trainer.checkpoint_state`,
    the trainer's layout), and refusing a directory that holds another configuration's run unless
    :data:`OVERWRITE`. Torch runs with the run's threads (:func:`run_threads_of`)."""
    out = Path(out)
    _announce(label, out, progress)
    rd = RunDir.create(out, exp.config.to_dict(), overwrite=OVERWRITE.get())
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
    def on_checkpoint(step: int) -> None:
        rd.checkpoint(trainer.checkpoint_state(exp, step))

    try:
        with run_threads_of(exp.config):
            for rec in trainer.iterate(exp, progress=progress, on_checkpoint=on_checkpoint):
                if rec:
                    last = rec
                    rd.log(rec)
    except NonFiniteError as exc:
        error = exc
    finally:
        rd.close()
    summary = None
    if error is None and last:
        rd.checkpoint(trainer.checkpoint_state(exp, exp.total_steps))
        summary = trainer.summarize(exp.spec, exp.config, last, total_steps=exp.total_steps,
                            wall=time.perf_counter() - t0, engine=exp.sim.name, is_lm=exp.is_lm)
        rd.write_summary(jsonable(summary))
    res = _finish(label, out, summary, error, time.perf_counter() - t0, dict(extra or {}))
    if DRY_RUN.get():
        dry_run_check(res, exp.config, "simulate", (extra or {}).get("data", exp.config.problem.dataset))
    return res


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
            "time_s": "wall-clock (s)"}


def panel(x: str, y: str, ylabel: str, *, logy: bool = False, **extra: Any) -> dict[str, Any]:
    """A panel description for :func:`plot_panels`: ``y`` against ``x`` (one of :data:`X_LABELS`); ``extra``
    holds the optional keys (``runs``, ``title``, ``legend``, ...)."""
    return {"x": x, "y": y, "xlabel": X_LABELS[x], "ylabel": ylabel, "logy": logy, **extra}


def plot_curves(path: Path, runs: Sequence[dict[str, Any]], y: str, ylabel: str, *, against: Sequence[str],
                title: str, note: str) -> Path:
    """One figure of ``y`` (log scale) of every run, one panel per x quantity of ``against`` (:data:`X_LABELS`)."""
    return plot_panels(path, runs, [panel(x, y, ylabel, logy=True) for x in against], title=title, note=note,
                       ncols=len(against))


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
    import matplotlib  # here, not at import: the backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = ncols or min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(4.6 * ncols, 3.6 * nrows + 0.5), squeeze=False, constrained_layout=True
    )
    for k, spec in enumerate(panels):
        ax = axes[k // ncols][k % ncols]
        for i in spec.get("runs", range(len(runs))):
            _draw_run(ax, runs[i], spec, color=None if colors is None else colors[i % len(colors)],
                      style=None if styles is None else styles[i % len(styles)])
        _dress_panel(ax, spec, legend=k == 0 or bool(spec.get("legend")))
    for k in range(n, nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    width = max(60, int(ncols * 4.6 * 15))
    fig.suptitle(title + ("\n" + "\n".join(textwrap.wrap(note, width)) if note else ""), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from coopsgd.plots import FIGURE_DPI

    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    _record_figure(path, runs, panels, title=title, note=note, ncols=ncols, colors=colors, styles=styles)
    return path


def _draw_run(ax: Any, res: dict[str, Any], spec: dict[str, Any], *, color: Any, style: str | None) -> None:
    """One run's line in one panel: its mean and min-max band when it carries ``_band``, a cross where it diverged."""
    lo = hi = None
    if res.get("_band") is not None:
        xs, ys, lo, hi = band_series(res, spec["x"], spec["y"])
    else:
        xs, ys = series(res, spec["x"], spec["y"])
    if spec.get("xscale") is not None:
        xs = xs * spec["xscale"]
    lab = res["label"]
    if res.get("diverged"):
        lab += f" (diverged @ step {res['diverged']['step']})"
    kw: dict[str, Any] = {"label": lab, "lw": 1.5}
    if color is not None:
        kw["color"] = color
    if style is not None:
        kw["ls"] = style
    if spec.get("marker"):
        kw["marker"] = spec["marker"]
    line = ax.plot(xs, ys, **kw)[0]
    c = line.get_color()
    if lo is not None and hi is not None and len(xs):
        # the min-max band over the seeds: a tinted area with its edges drawn, visible beside the other runs'
        ax.fill_between(xs, lo, hi, color=c, alpha=0.3, lw=0)
        for edge in (lo, hi):
            ax.plot(xs, edge, color=c, lw=0.8, alpha=0.9, ls=(0, (2, 1.5)))
    if spec.get("mark_min") and len(xs) and np.isfinite(ys).any():
        k = int(np.nanargmin(ys))
        ax.plot(xs[k], ys[k], "*", color=c, ms=15, mec="k", mew=0.8, zorder=5)
    if res.get("diverged") and len(xs):
        ax.plot(xs[-1], ys[-1], "x", color=c, ms=9, mew=2)


def _dress_panel(ax: Any, spec: dict[str, Any], *, legend: bool) -> None:
    """Labels, scale, limits, title, grid and legend of one panel."""
    ax.set_xlabel(spec["xlabel"] + (" (log scale)" if spec.get("logx") else ""))
    ax.set_ylabel(spec["ylabel"])
    if spec.get("logy"):
        ax.set_yscale("log")
    if spec.get("logx"):
        ax.set_xscale("log")
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

        if spec.get("xticks"):  # a geometric grid: its values as the ticks, written plainly
            ax.xaxis.set_major_locator(FixedLocator(list(spec["xticks"])))
            ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if spec.get("ylim") is not None:
        ax.set_ylim(*spec["ylim"])
    if spec.get("xlim") is not None:
        ax.set_xlim(*spec["xlim"])
    if spec.get("title"):
        ax.set_title(spec["title"], fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        if spec.get("mark_min"):
            from matplotlib.lines import Line2D

            handles.append(Line2D([], [], ls="", marker="*", ms=11, color="gray", mec="k"))
            labels.append("lowest point: the tuned setting (of the mean, with several seeds)")
        ax.legend(handles, labels, fontsize=7)


def _record_figure(path: Path, runs: Sequence[dict[str, Any]], panels: Sequence[dict[str, Any]], *, title: str,
                   note: str | None, ncols: int, colors: Sequence[Any] | None, styles: Sequence[str] | None) -> None:
    """Describe the figure just drawn in :data:`FIGURES` when a multi-seed run records them."""
    record = FIGURES.get()
    if record is None:
        return
    record.append({
        "path": str(path), "title": title, "note": note, "ncols": ncols,
        "colors": None if colors is None else list(colors),
        "styles": None if styles is None else list(styles),
        "panels": [{**p, **({"runs": list(p["runs"])} if "runs" in p else {})} for p in panels],
        # in memory only: the records each line was drawn from (derived keys such as local_loss included)
        "runs": [{"label": r["label"], "diverged": r.get("diverged"), "_metrics": r.get("_metrics", [])}
                 for r in runs],
    })


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
