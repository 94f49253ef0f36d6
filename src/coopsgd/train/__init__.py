"""Training runs: validated configs, the trainer loop, run directories and checkpoints."""

from __future__ import annotations

from coopsgd.train.config import RunConfig, load_config
from coopsgd.train.rundir import RunDir, atomic_write_json, load_checkpoint, save_checkpoint

__all__ = ["RunConfig", "load_config", "RunDir", "atomic_write_json", "save_checkpoint", "load_checkpoint"]
