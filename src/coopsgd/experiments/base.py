"""What an experiment is, and the tables that hold them: :class:`ExperimentEntry`, :func:`register`, :func:`assess`.

An experiment module registers its functions here on import; :mod:`coopsgd.experiments.registry` imports every
experiment module, so that importing it fills :data:`EXPERIMENTS` and :data:`ASSESSMENTS`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coopsgd.experiments.harness import ExperimentArgs, experiment_context

__all__ = ["ExperimentEntry", "EXPERIMENTS", "ASSESSMENTS", "DETERMINISTIC", "DRY_RUNS", "register", "assess"]


@dataclass(frozen=True)
class ExperimentEntry:
    name: str
    #: ``run(args, **options)``: the experiment under :func:`~coopsgd.experiments.harness.experiment_context`.
    run: Callable[..., dict[str, Any]]
    description: str
    engines: tuple[str, ...] = ("simulate",)


EXPERIMENTS: dict[str, ExperimentEntry] = {}
#: What each experiment reports over seeds: its metrics of one seed's result, its claims and the paper's
#: numbers (:class:`coopsgd.experiments.stats.Assessment`), keyed like :data:`EXPERIMENTS`.
ASSESSMENTS: dict[str, Any] = {}
#: Experiments whose result does not depend on the seed (run once whatever ``--seeds`` says).
DETERMINISTIC: set[str] = set()
#: Experiments whose full scale needs real data (CIFAR-10 or MNIST through torchvision, WikiText-2) and, in practice, a
#: GPU: the ones ``--dry-run`` smoke-tests, in ``reproduce all`` order.
DRY_RUNS: tuple[str, ...] = ("csgd-fig3", "csgd-fig4", "csgd-fig5", "csgd-fig6", "lsgd-nets", "lsgd-lstm",
                             "fl-strategies")


def assess(name: str, assessment: Any, *, deterministic: bool = False) -> None:
    """Attach the multi-seed assessment of experiment ``name``."""
    ASSESSMENTS[name] = assessment
    if deterministic:
        DETERMINISTIC.add(name)


def register(name: str, description: str, engines: tuple[str, ...] = ("simulate",)):
    """Decorator adding ``fn(args, **options)`` to :data:`EXPERIMENTS` under ``name``; the function it returns runs
    ``fn`` under :func:`~coopsgd.experiments.harness.experiment_context` (``args``' engine, dry run, device and
    overwrite reach every run), so a direct call behaves as ``coopsgd reproduce`` does."""

    def deco(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        @functools.wraps(fn)
        def runner(args: ExperimentArgs, **options: Any) -> dict[str, Any]:
            with experiment_context(args):
                return fn(args, **options)

        EXPERIMENTS[name] = ExperimentEntry(name, runner, description, engines)
        return runner

    return deco
