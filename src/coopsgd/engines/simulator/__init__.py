"""The simulator: every worker of a spec in one process (``engine``), its executors' choice (``calibration``)
and its simulated clock (``clock``). ``from coopsgd.engines.simulator import Simulator`` imports the engine
(torch) only when it is asked for."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coopsgd.engines.simulator.engine import LOSS_ESTIMATES, SimStepStats, Simulator

__all__ = ["Simulator", "SimStepStats", "LOSS_ESTIMATES"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("coopsgd.engines.simulator.engine"), name)
    raise AttributeError(f"module 'coopsgd.engines.simulator' has no attribute {name!r}")
