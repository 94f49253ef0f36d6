"""Algorithms as data: :class:`AlgorithmSpec`, mixing schedules and named presets."""

from __future__ import annotations

from coopsgd.algorithms import presets
from coopsgd.algorithms.communication import Compression
from coopsgd.algorithms.presets import (  # noqa: F401 -- re-exported through presets.__all__ below
    PRESETS,
    choco,
    compressible,
    decentralized_periodic,
    diloco,
    downpour,
    dpsgd,
    easgd,
    fedavg,
    generalized_elastic,
    hierarchical,
    local_sgd,
    lsgd,
    make_preset,
    matcha,
    slowmo,
    sync,
    with_compression,
)
from coopsgd.algorithms.registry import (
    DataInput,
    PresetArg,
    PresetDecl,
    TheoryHook,
    declaration,
    declarations,
    register,
    spec_from_settings,
)
from coopsgd.algorithms.schedules import (
    CallableSchedule,
    DownpourSchedule,
    FedAvgSchedule,
    LeaderSchedule,
    MatchaSchedule,
    Mix,
    MixContext,
    PeriodicSchedule,
    Schedule,
)
from coopsgd.algorithms.spec import AlgorithmSpec, Policies

__all__ = [
    "AlgorithmSpec",
    "Policies",
    "Compression",
    "Schedule",
    "Mix",
    "MixContext",
    "PeriodicSchedule",
    "LeaderSchedule",
    "FedAvgSchedule",
    "DownpourSchedule",
    "MatchaSchedule",
    "CallableSchedule",
    "spec_from_settings",
    "PresetDecl",
    "PresetArg",
    "DataInput",
    "TheoryHook",
    "register",
    "declaration",
    "declarations",
]
# every preset constructor, PRESETS and make_preset: the public names of coopsgd.algorithms.presets
__all__ += presets.__all__
