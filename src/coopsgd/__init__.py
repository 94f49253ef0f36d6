"""coopsgd: Cooperative SGD, one framework A(tau, W, v) for communication-efficient distributed training.

``coopsgd.algorithms`` holds the presets; ``coopsgd.CooperativeSGD`` wraps your own model and optimizer
for torch.distributed training (imported lazily: ``import coopsgd`` does not load torch.distributed).
"""

from __future__ import annotations

from typing import Any

from coopsgd import algorithms, topology
from coopsgd.algorithms import AlgorithmSpec, make_preset
from coopsgd.errors import ConfigError, CoopSGDError, MixingMatrixError

__version__ = "0.1.0"

__all__ = [
    "AlgorithmSpec",
    "ConfigError",
    "CoopSGDError",
    "CooperativeSGD",
    "MixingMatrixError",
    "algorithms",
    "make_preset",
    "topology",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "CooperativeSGD":
        from coopsgd.wrapper import CooperativeSGD

        return CooperativeSGD
    raise AttributeError(f"module 'coopsgd' has no attribute {name!r}")
