"""Engines that execute any :class:`coopsgd.algorithms.AlgorithmSpec`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from coopsgd.engines.mixing import apply_mixing
from coopsgd.engines.reference import (
    NonFiniteError,
    ReferenceEngine,
    ReferenceResult,
    StepStats,
    consensus_distance,
    run_reference,
)

if TYPE_CHECKING:
    from coopsgd.engines.simulator.clock import SimClock
    from coopsgd.engines.simulator.engine import SimStepStats, Simulator

__all__ = [
    "apply_mixing",
    "ReferenceEngine",
    "ReferenceResult",
    "StepStats",
    "NonFiniteError",
    "consensus_distance",
    "run_reference",
    "Simulator",
    "SimStepStats",
    "SimClock",
]

# the simulator needs torch; import it only when asked for so that numpy-only users stay fast
_LAZY = {"Simulator": "simulator.engine", "SimStepStats": "simulator.engine", "SimClock": "simulator.clock"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"coopsgd.engines.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'coopsgd.engines' has no attribute {name!r}")
