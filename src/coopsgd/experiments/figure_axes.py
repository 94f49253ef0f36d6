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


def zoom_window(runs: Sequence[dict[str, Any]], y: str, *, last: float = 0.25, margin: float = 0.6
                ) -> tuple[float, float] | None:
    """A y range that shows the last ``last`` fraction of every (not diverged) run's curve of ``y``: from the
    lowest to the highest value there, widened by ``margin`` times that span on each side (at least 1% of the
    values), so that differences of about 1% between the curves' ends are visible. ``None`` when no run has
    values there."""
    tails = []
    for r in runs:
        if r.get("diverged"):
            continue
        _, ys = series(r, "step", y)
        ys = ys[np.isfinite(ys)]
        if len(ys):
            tails.append(ys[int(len(ys) * (1.0 - last)):] if len(ys) > 1 else ys)
    if not tails:
        return None
    vals = np.concatenate(tails)
    lo, hi = float(vals.min()), float(vals.max())
    pad = max(margin * (hi - lo), 0.01 * abs(hi))
    return lo - pad, hi + pad
