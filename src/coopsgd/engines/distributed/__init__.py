"""The distributed engine: one worker per process with torch.distributed (``engine``), its communicator
(``communicator``: the round's collectives, lowered from the typed plan by ``collectives``), the local
launcher with its heartbeat (``launch``) and the asynchronous parameter server (``parameter_server``).
``from coopsgd.engines.distributed import DistributedEngine`` imports the engine only when asked for, so the
launcher stays importable without torch.distributed."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coopsgd.engines.distributed.engine import (
        FAILURE_MODES,
        DistributedEngine,
        DistStepStats,
        FaultHook,
        communication_table,
        fault_hook,
    )

__all__ = ["DistributedEngine", "DistStepStats", "communication_table", "FAILURE_MODES", "FaultHook", "fault_hook"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("coopsgd.engines.distributed.engine"), name)
    raise AttributeError(f"module 'coopsgd.engines.distributed' has no attribute {name!r}")
