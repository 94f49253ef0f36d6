"""The run configuration: :class:`RunConfig`, made of typed, frozen sections whose settings are declared once.

* :mod:`coopsgd.train.config.sections`: the sections (algorithm, problem, schedule, evaluation, clock,
  execution, output; the optimizer section is :class:`coopsgd.algorithms.inner.OptimizerSettings`), each
  setting a field declared with :func:`coopsgd.settings.setting` (help, choices, range);
  :mod:`coopsgd.train.config.communication`: the communication section (compressor, error feedback,
  CHOCO's consensus step);
* :mod:`coopsgd.train.config.run`: :class:`RunConfig` (flat keys routed to their sections, checks across
  sections, ``to_dict`` / ``from_dict``) and the file loader :func:`load_config`.

The CLI flags, ``--help``, the loader and the validation are generated from the declarations.
"""

from __future__ import annotations

from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.train.config.communication import COMPRESSED_ENGINES, CommunicationSettings
from coopsgd.train.config.run import (
    FLAT_KEYS,
    FLOAT32_MAX,
    OPTIMIZERS,
    SECTIONS,
    RunConfig,
    config_settings,
    flat_settings,
    load_config,
)
from coopsgd.train.config.sections import (
    COMPUTE_MODELS,
    DTYPES,
    ENGINES,
    EXECUTORS,
    LOSS_ESTIMATES,
    MAX_TIMEOUT_S,
    PARTITIONS,
    AlgorithmSettings,
    ClockSettings,
    EvaluationSettings,
    ExecutionSettings,
    OutputSettings,
    ProblemSettings,
    ScheduleSettings,
    check_device,
)

__all__ = [
    "RunConfig", "load_config", "flat_settings", "config_settings", "SECTIONS", "FLAT_KEYS",
    "AlgorithmSettings", "ProblemSettings", "OptimizerSettings", "ScheduleSettings", "EvaluationSettings",
    "ClockSettings", "ExecutionSettings", "OutputSettings", "CommunicationSettings", "check_device",
    "COMPRESSED_ENGINES",
    "ENGINES", "DTYPES", "EXECUTORS", "PARTITIONS", "LOSS_ESTIMATES", "COMPUTE_MODELS", "OPTIMIZERS",
    "MAX_TIMEOUT_S", "FLOAT32_MAX",
]
