"""Registry of paper experiments for ``coopsgd reproduce NAME``.

An experiment is a function ``run(args: ExperimentArgs, **options) -> dict`` returning a JSON-ready result that
includes ``"plots"`` (paths of the figures it wrote) and ``"summary"`` (lines to print).
:class:`~coopsgd.experiments.harness.ExperimentArgs` says how ``coopsgd reproduce`` asked for it (scale, seed,
engine, output directory, dry run, device...); ``options`` are the experiment's own knobs for the tests'
reduced runs. The experiments with a full scale on real data (:data:`DRY_RUNS`) honour ``args.dry_run`` and
``args.all_settings`` (``coopsgd reproduce NAME --dry-run [--all-settings]``; see
:func:`coopsgd.experiments.dry_run.dry_run_fields`). Register one with :func:`~coopsgd.experiments.base.register`
(:mod:`coopsgd.experiments.base`) in its module and import that module here; the CLI lists and runs whatever is
registered.
"""

from __future__ import annotations

# every experiment module registers its experiments when it is imported
from coopsgd.experiments import choco, csgd, csgd_fig6, fl_strategies, lsgd_lstm, lsgd_nets, lsgd_toy  # noqa: F401
from coopsgd.experiments.base import (
    ASSESSMENTS,
    DETERMINISTIC,
    DRY_RUNS,
    EXPERIMENTS,
    ExperimentEntry,
    assess,
    register,
)

__all__ = ["ExperimentEntry", "EXPERIMENTS", "ASSESSMENTS", "DETERMINISTIC", "DRY_RUNS", "register", "assess"]
