"""coopsgd: Cooperative SGD, one framework A(tau, W, v) for communication-efficient distributed training."""

from coopsgd.errors import ConfigError, CoopSGDError, MixingMatrixError

__version__ = "0.1.0"

__all__ = ["ConfigError", "CoopSGDError", "MixingMatrixError", "__version__"]
