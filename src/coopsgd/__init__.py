"""coopsgd: Cooperative SGD, one framework A(tau, W, v) for communication-efficient distributed training.

``coopsgd.algorithms`` holds the presets; ``coopsgd.CooperativeSGD`` wraps your own model and optimizer
for torch.distributed training (everything is imported lazily: ``import coopsgd`` loads no numpy, scipy or torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from coopsgd.errors import ConfigError, CoopSGDError, MixingMatrixError

if TYPE_CHECKING:
    from coopsgd import algorithms, topology
    from coopsgd.algorithms import AlgorithmSpec, make_preset
    from coopsgd.wrapper import CooperativeSGD

__version__ = "0.1.0"

# imported on first use, so that `coopsgd --version` and `--help` do not load numpy/scipy/torch
_LAZY = {"algorithms": ("coopsgd.algorithms", None), "topology": ("coopsgd.topology", None),
         "AlgorithmSpec": ("coopsgd.algorithms", "AlgorithmSpec"), "make_preset": ("coopsgd.algorithms", "make_preset"),
         "CooperativeSGD": ("coopsgd.wrapper", "CooperativeSGD")}

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
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'coopsgd' has no attribute {name!r}")
