"""Registry of paper experiments for ``coopsgd reproduce NAME``.

An experiment is a function ``run(*, quick, engine, out, seed, progress) -> dict`` returning a JSON-ready
result that includes ``"plots"`` (paths of the figures it wrote) and ``"summary"`` (lines to print). The
experiments with a full scale on real data (:data:`DRY_RUNS`) also take ``dry_run`` and ``all_settings``
(``coopsgd reproduce NAME --dry-run [--all-settings]``; see :func:`coopsgd.experiments.harness.dry_run_fields`).
Register one with :func:`register`; the CLI lists and runs whatever is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ExperimentEntry", "EXPERIMENTS", "ASSESSMENTS", "DETERMINISTIC", "DRY_RUNS", "register", "assess"]


@dataclass(frozen=True)
class ExperimentEntry:
    name: str
    run: Callable[..., dict[str, Any]]
    description: str
    engines: tuple[str, ...] = ("simulate",)


EXPERIMENTS: dict[str, ExperimentEntry] = {}
#: What each experiment reports over seeds: its metrics of one seed's result, its claims and the paper's
#: numbers (:class:`coopsgd.experiments.stats.Assessment`), keyed like :data:`EXPERIMENTS`.
ASSESSMENTS: dict[str, Any] = {}
#: Experiments whose result does not depend on the seed (run once whatever ``--seeds`` says).
DETERMINISTIC: set[str] = set()
#: Experiments whose full scale needs real data (CIFAR-10 through torchvision, WikiText-2) and, in practice, a
#: GPU: the ones ``--dry-run`` smoke-tests, in ``reproduce all`` order.
DRY_RUNS: tuple[str, ...] = ("csgd-fig3", "csgd-fig4", "csgd-fig5", "csgd-fig6", "lsgd-nets", "lsgd-lstm")


def assess(name: str, assessment: Any, *, deterministic: bool = False) -> None:
    """Attach the multi-seed assessment of experiment ``name``."""
    ASSESSMENTS[name] = assessment
    if deterministic:
        DETERMINISTIC.add(name)


def register(name: str, description: str, engines: tuple[str, ...] = ("simulate",)):
    """Decorator adding ``fn`` to :data:`EXPERIMENTS` under ``name``."""

    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def runner(**kwargs: Any) -> dict[str, Any]:
            from coopsgd.experiments.harness import DRY_RUN, ENGINE

            token = ENGINE.set(kwargs.get("engine", engines[0]))
            dry = DRY_RUN.set(bool(kwargs.get("dry_run", False)))
            try:
                return fn(**kwargs)
            finally:
                DRY_RUN.reset(dry)
                ENGINE.reset(token)

        EXPERIMENTS[name] = ExperimentEntry(name, runner, description, engines)
        return fn

    return deco


def _lsgd_toy(*, quick: bool, engine: str, out: Path, seed: int, progress: bool) -> dict[str, Any]:
    from coopsgd.experiments.lsgd_toy import plot_lsgd_toy, public, run_lsgd_toy

    res = run_lsgd_toy()
    plots = plot_lsgd_toy(res, out)
    data = public(res)
    data["plots"] = [str(p) for p in plots]
    data["summary"] = [
        f"{key.upper():6s} centre objective {data[key]['final_objective']:.4f} after {data[key]['steps']} steps; "
        f"workers: {', '.join(f'{v:.4f}' for v in data[key]['workers'])}"
        for key in ("easgd", "lsgd")
    ]
    return data


register("lsgd-toy", "[LSGD] Table 1 / Fig. 7: EASGD vs LSGD on sin(pi r)/(pi r)", ("reference",))(_lsgd_toy)


def _toy_metrics(res: dict[str, Any]) -> dict[str, float | None]:
    return {"EASGD centre objective": res["easgd"]["final_objective"],
            "LSGD leader objective": res["lsgd"]["final_objective"]}


def _toy_assessment() -> Any:
    from coopsgd.experiments.stats import Assessment, Claim, PaperRow

    return Assessment(
        _toy_metrics,
        [Claim("LSGD's leader ends in a deeper basin than EASGD's centre (Table 1)",
               ("LSGD leader objective", "EASGD centre objective"))],
        [PaperRow("final centre objective", "LSGD lower than EASGD (Table 1; its values are not restated in "
                  "our spec)", "LSGD leader objective"),
         PaperRow("final centre objective, EASGD", "higher than LSGD's", "EASGD centre objective")],
    )


assess("lsgd-toy", _toy_assessment(), deterministic=True)


# Experiments defined in their own modules register themselves on import (kept last: they import `register`).
from coopsgd.experiments import csgd as _csgd  # noqa: E402,F401
from coopsgd.experiments import lsgd_nets as _lsgd_nets  # noqa: E402,F401
