"""Figures from run directories only (this module never trains).

:func:`plot_runs` overlays any number of runs: training loss of the averaged model vs steps and vs
simulated wall-clock, the centre model's test accuracy (or perplexity) vs simulated wall-clock, and the
consensus distance; or (``against=("time", "bytes")``) one loss against the clock and the bytes sent.
:func:`runs_table` gives the matching table rows. Figures are written at :data:`FIGURE_DPI`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coopsgd.errors import ConfigError
from coopsgd.fileio import check_output_path
from coopsgd.train.rundir import RunDir, read_run_json

__all__ = ["load_run", "plot_runs", "runs_table", "FIGURE_DPI", "positive_or_gap", "clock_axis_label"]

#: The resolution of every figure coopsgd writes as an image (a 12-inch-wide figure is 1,920 pixels wide).
FIGURE_DPI = 160


def load_run(path: str | Path) -> dict[str, Any]:
    """``{"path", "label", "config", "metrics", "summary"}`` of a run directory."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError.invalid("run_dir", str(path), "is not a directory")
    metrics = RunDir.read_metrics(p)  # each record checked: the file, line and field of a bad one are named
    if not metrics:
        raise ConfigError.invalid("run_dir", str(path), "has an empty metrics.jsonl")
    config = read_run_json(p / "config.json", "config") if (p / "config.json").exists() else {}
    summary = read_run_json(p / "summary.json", "summary") if (p / "summary.json").exists() else {}
    label = str(config.get("preset", p.name))
    if config.get("tau") is not None:
        label += f" (tau={config['tau']})"
    return {"path": str(p), "label": label, "config": config, "metrics": metrics, "summary": summary}


def _series(metrics: list[dict[str, Any]], key: str) -> tuple[list[dict[str, Any]], list[float]]:
    """The records that carry ``key`` and, in the same order, their ``key`` values."""
    recs: list[dict[str, Any]] = []
    ys: list[float] = []
    for r in metrics:
        if r.get(key) is not None:
            recs.append(r)
            ys.append(r[key])
    return recs, ys


#: The x axes of ``plot_runs(..., against=...)``: steps, the run's clock (simulated or measured seconds),
#: the bytes sent so far (``bytes_sent``: the cost model's count along the busiest node, e.g. 2d floats per
#: all-reduce round; :func:`coopsgd.theory.cost.round_cost`).
AGAINST = ("step", "time", "bytes")
#: The losses ``plot_runs(..., against=...)`` draws: the centre model's test loss or the averaged model's
#: training loss.
AGAINST_LOSSES = ("test_loss", "train_loss")


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path, *, labels: Sequence[str] | None = None,
              title: str | None = None, against: Sequence[str] | None = None, loss: str = "test_loss") -> Path:
    """Overlay runs in one figure; the format follows the suffix of ``out`` (png/svg/pdf).

    Without ``against``: 2x2 panels (training loss vs steps and vs the clock, the test metric vs the clock,
    the consensus distance). With ``against`` (entries of :data:`AGAINST`, e.g. ``("time", "bytes")``): one
    row with one panel per entry, ``loss`` (:data:`AGAINST_LOSSES`) against it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not run_dirs:
        raise ConfigError.invalid("run_dirs", [], "give at least one run directory")
    if against is not None:
        axes_x = list(against)
        bad = [a for a in axes_x if a not in AGAINST]
        if not axes_x or bad or len(set(axes_x)) != len(axes_x):
            raise ConfigError.invalid("against", axes_x, f"give distinct entries of {', '.join(AGAINST)}")
        if loss not in AGAINST_LOSSES:
            raise ConfigError.invalid("loss", loss, f"choose from {', '.join(AGAINST_LOSSES)}")
    out = Path(out)
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise ConfigError.invalid("out", str(out), "must end in .png, .svg or .pdf")
    check_output_path(out, "out")
    runs = [load_run(d) for d in run_dirs]
    if labels is not None and len(labels) != len(runs):
        raise ConfigError.invalid("labels", list(labels), f"need one label per run ({len(runs)})")
    if against is not None:
        return _plot_against(runs, out, labels, title, list(against), loss)
    is_lm = any("test_perplexity" in r["metrics"][-1] for r in runs)
    metric = "test_perplexity" if is_lm else "test_accuracy"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    zero_runs: list[str] = []  # runs whose consensus distance is 0 at every record (nothing to draw)
    for i, run in enumerate(runs):
        lab = labels[i] if labels is not None else run["label"]
        ms = run["metrics"]
        color = f"C{i % 10}"  # one colour per run in every panel (a run left out of one shifts no colour)
        rec, train = _series(ms, "train_loss")
        axes[0, 0].plot([r["step"] for r in rec], train, marker=".", label=lab, color=color)
        axes[0, 1].plot([_clock(r) for r in rec], train, marker=".", label=lab, color=color)
        rec, acc = _series(ms, metric)
        axes[1, 0].plot([_clock(r) for r in rec], acc, marker=".", label=lab, color=color)
        rec, cons = _series(ms, "consensus_distance")
        # exact consensus (right after an all-reduce) is 0, which a log axis cannot show: left out (a gap)
        shown = positive_or_gap(cons)
        if any(c > 0 for c in cons):
            axes[1, 1].plot([r["step"] for r in rec], shown, marker=".", label=lab, color=color)
        else:
            zero_runs.append(lab)
    axes[0, 0].set(xlabel="step", ylabel="training loss (averaged model)", yscale="log")
    clock = _clock_label(runs)
    axes[0, 1].set(xlabel=clock, ylabel="training loss (averaged model)", yscale="log")
    axes[1, 0].set(xlabel=clock,
                   ylabel="test perplexity (centre model)" if is_lm else "test accuracy (centre model)")
    cons_ax = axes[1, 1]
    cons_ax.set(xlabel="step", ylabel="consensus distance ||X(I-J)||^2/m")
    if cons_ax.lines:
        cons_ax.set_yscale("log")
        cons_ax.legend(fontsize=7, title="records of exactly 0 not drawn (gaps)", title_fontsize=7)
    if zero_runs:
        cons_ax.text(0.02, 0.02, "0 at every record (full consensus), not drawn: " + ", ".join(zero_runs),
                     transform=cons_ax.transAxes, fontsize=7, va="bottom", wrap=True)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save_figure(fig, out)


def positive_or_gap(values: Sequence[float]) -> list[float]:
    """``values`` with every entry that is not positive replaced by NaN: a log axis then leaves a gap there
    instead of drawing an arbitrary floor (a consensus distance of exactly 0 after an all-reduce)."""
    return [float(v) if v > 0 else float("nan") for v in values]


def _save_figure(fig: Any, out: Path, dpi: int = FIGURE_DPI) -> Path:
    """Write ``fig`` to ``out`` in one step and close it: a failed write leaves an earlier figure as it was."""
    import io

    import matplotlib.pyplot as plt

    from coopsgd.fileio import atomic_write_bytes

    buf = io.BytesIO()
    try:
        fig.savefig(buf, dpi=dpi, format=out.suffix.lower()[1:])
    finally:
        plt.close(fig)
    return atomic_write_bytes(out, buf.getvalue())


def clock_axis_label(engine: str) -> str:
    """The x label of a run's clock (``time_s``) in the experiments' figures: the simulator's runs are timed on
    its simulated clock, the distributed engine's by the wall clock."""
    return "measured wall-clock (s)" if engine == "distributed" else "simulated wall-clock (s)"


def _clock_label(runs: list[dict[str, Any]]) -> str:
    sources = {r["metrics"][-1].get("time_source", "simulated") for r in runs}
    return "simulated wall-clock (s)" if sources == {"simulated"} else (
        "measured wall-clock (s)" if sources == {"measured"} else "wall-clock (s; simulated or measured)")


def _plot_against(runs: list[dict[str, Any]], out: Path, labels: Sequence[str] | None, title: str | None,
                  against: list[str], loss: str) -> Path:
    """One row of panels: ``loss`` of every run against each x axis of ``against`` (see :func:`plot_runs`)."""
    import matplotlib.pyplot as plt

    def x_of(record: dict[str, Any], axis: str) -> float | None:
        if axis == "step":
            return float(record["step"])
        if axis == "time":
            return _clock(record)
        sent = record.get("bytes_sent")
        return None if sent is None else float(sent) / 1e6

    xlabels = {"step": "step", "time": _clock_label(runs), "bytes": "bytes sent, busiest node (MB)"}
    ylabel = "test loss (centre model)" if loss == "test_loss" else "training loss (averaged model)"
    fig, axes = plt.subplots(1, len(against), figsize=(5.0 * len(against), 3.8), constrained_layout=True,
                             squeeze=False)
    series = [_series(run["metrics"], loss) for run in runs]
    # time and bytes span decades between a run that communicates every step and one that rarely does: a log
    # axis (without the start, x = 0) where every run ends at x > 0, else a linear one with every point
    log = {axis: axis != "step" and all(rec and (x_of(rec[-1], axis) or 0.0) > 0 for rec, _ in series)
           for axis in against}
    for i, (run, (rec, ys)) in enumerate(zip(runs, series, strict=True)):
        lab = labels[i] if labels is not None else run["label"]
        for ax, axis in zip(axes[0], against, strict=True):
            pts = [(x, y) for x, y in zip((x_of(r, axis) for r in rec), ys, strict=True)
                   if x is not None and (x > 0 or not log[axis])]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=lab)
    for ax, axis in zip(axes[0], against, strict=True):
        ax.set(xlabel=xlabels[axis] + (", log scale" if log[axis] else ""), ylabel=ylabel,
               xscale="log" if log[axis] else "linear")
        if log[axis]:
            _log_ticks(ax.xaxis, ax.get_xlim())
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save_figure(fig, out)


def _log_ticks(axis: Any, limits: tuple[float, float]) -> None:
    """Readable labels on a log axis: 1, 2 and 5 times each power of ten when it spans at most two decades (a
    decade alone may hold no power of ten), the powers of ten otherwise; plain numbers, minor ticks unlabelled
    (matplotlib's labels of the minor ticks run into each other)."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    lo, hi = (max(v, 1e-300) for v in limits)
    subs = (1.0, 2.0, 5.0) if math.log10(hi / lo) <= 2 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _clock(record: dict[str, Any]) -> float | None:
    """A record's time: the run's own clock (``time_s``; older runs: ``simulated_time_s``)."""
    t = record.get("time_s", record.get("simulated_time_s"))
    return None if t is None else float(t)


def runs_table(run_dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """One row per run: final losses/metrics, rounds, bytes, simulated and real time."""
    rows = []
    for d in run_dirs:
        run = load_run(d)
        last = run["metrics"][-1]
        rows.append({
            "run": run["label"],
            "path": run["path"],
            "train_loss": last.get("train_loss"),
            "test_loss": last.get("test_loss"),
            "test_accuracy": last.get("test_accuracy"),
            "test_perplexity": last.get("test_perplexity"),
            "rounds": last.get("rounds"),
            "bytes_sent": last.get("bytes_sent"),
            "time_s": _clock(last),
            "time_source": last.get("time_source", "simulated"),
            "simulated_time_s": last.get("simulated_time_s"),
            "communication_s": last.get("simulated_communication_s", last.get("measured_communication_s")),
            "wall_time_s": last.get("wall_time_s"),
        })
    return rows
