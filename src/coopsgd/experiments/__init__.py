"""Paper experiments as functions returning JSON-ready results (keys starting with ``_`` hold plot data)."""

from __future__ import annotations

from coopsgd.experiments.lsgd_toy import TOY_SETTINGS, plot_lsgd_toy, public, run_lsgd_toy
from coopsgd.experiments.matrix_completion import (
    MC_QUICK,
    MC_SETTINGS,
    parse_ranks,
    plot_matrix_completion,
    run_matrix_completion,
)

__all__ = [
    "TOY_SETTINGS",
    "run_lsgd_toy",
    "plot_lsgd_toy",
    "public",
    "MC_SETTINGS",
    "MC_QUICK",
    "parse_ranks",
    "run_matrix_completion",
    "plot_matrix_completion",
]
