"""Engines that execute any :class:`coopsgd.algorithms.AlgorithmSpec`."""

from __future__ import annotations

from coopsgd.engines.mixing import apply_mixing
from coopsgd.engines.reference import (
    NonFiniteError,
    ReferenceEngine,
    ReferenceResult,
    StepStats,
    consensus_distance,
    run_reference,
)

__all__ = [
    "apply_mixing",
    "ReferenceEngine",
    "ReferenceResult",
    "StepStats",
    "NonFiniteError",
    "consensus_distance",
    "run_reference",
]
