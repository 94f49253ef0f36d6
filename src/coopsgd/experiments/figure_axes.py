"""Axis settings the experiments' figures share: the x label that names the clock a ``time_s`` axis shows, and
the zoom window of a panel that must show a small difference between the final values of its curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from coopsgd.experiments.harness import ENGINE, series
from coopsgd.plots import clock_axis_label

__all__ = ["clock_x", "zoom_window"]


def clock_x(x: str) -> dict[str, Any]:
    """Extra panel keys for x quantity ``x``: for ``time_s`` (the run's clock) the label of the clock the runs of
    this experiment are timed on (:func:`coopsgd.plots.clock_axis_label`: simulated, or measured on the
    distributed engine), short enough to fit under a panel; nothing for the other x quantities."""
    return {"xlabel": clock_axis_label(ENGINE.get())} if x == "time_s" else {}


def zoom_window(runs: Sequence[dict[str, Any]], y: str, *, within: float = 0.1, margin: float = 0.6
                ) -> tuple[float, float] | None:
    """A y range on the best final values of ``y`` (lower is better): the final values of the (not diverged) runs
    that end within ``within`` (relative) of the lowest one, widened by ``margin`` times their span on each side
    (at least 1% of the values), so that differences of about 1% between those runs' ends are visible; a run
    that ends higher leaves the window at its top. ``None`` when no run has a value of ``y``."""
    finals = []
    for r in runs:
        if r.get("diverged"):
            continue
        _, ys = series(r, "step", y)
        ys = ys[np.isfinite(ys)]
        if len(ys):
            finals.append(float(ys[-1]))
    if not finals:
        return None
    best = min(finals)
    close = [f for f in finals if f <= best + within * abs(best)]
    lo, hi = min(close), max(close)
    pad = max(margin * (hi - lo), 0.01 * abs(hi))
    return lo - pad, hi + pad
