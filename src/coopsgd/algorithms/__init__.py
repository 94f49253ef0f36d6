"""Algorithms as data: :class:`AlgorithmSpec`, mixing schedules and named presets."""

from __future__ import annotations

from coopsgd.algorithms.presets import (
    PRESETS,
    decentralized_periodic,
    downpour,
    dpsgd,
    easgd,
    fedavg,
    generalized_elastic,
    hierarchical,
    local_sgd,
    lsgd,
    make_preset,
    sync,
)
from coopsgd.algorithms.schedules import (
    CallableSchedule,
    DownpourSchedule,
    FedAvgSchedule,
    LeaderSchedule,
    Mix,
    MixContext,
    PeriodicSchedule,
    Schedule,
)
from coopsgd.algorithms.spec import AlgorithmSpec, Policies

__all__ = [
    "AlgorithmSpec",
    "Policies",
    "Schedule",
    "Mix",
    "MixContext",
    "PeriodicSchedule",
    "LeaderSchedule",
    "FedAvgSchedule",
    "DownpourSchedule",
    "CallableSchedule",
    "PRESETS",
    "make_preset",
    "sync",
    "local_sgd",
    "easgd",
    "dpsgd",
    "decentralized_periodic",
    "generalized_elastic",
    "hierarchical",
    "fedavg",
    "lsgd",
    "downpour",
]
