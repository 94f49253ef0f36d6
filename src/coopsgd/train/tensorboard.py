"""TensorBoard for run directories: which runs write event files, and each metric record's scalars under grouped
tags (``train/``, ``test/``, ``communication/``, ``time/``). :class:`coopsgd.train.rundir.RunDir` writes them
(:func:`coopsgd.train.rundir.tensorboard_scalars`: a record's scalars under these tags)."""

from __future__ import annotations

import importlib
import importlib.util
import warnings

from coopsgd.errors import ConfigError

__all__ = ["TENSORBOARD_GROUPS", "LIST_TAGS", "tensorboard_tag", "tensorboard_enabled", "tensorboard_import_error"]


#: Tags of list-valued metric fields: ``worker_losses[i]`` is the scalar ``train/worker_loss/i``.
LIST_TAGS = {"worker_losses": "worker_loss"}
#: The TensorBoard groups (a tag's part before the first ``/``; TensorBoard shows one section per group).
TENSORBOARD_GROUPS = ("train", "test", "communication", "time")
#: Metric fields in a group their name does not tell (see :func:`tensorboard_tag`).
_TAG_GROUPS = {"rounds": "communication", "bytes_sent": "communication", "peak_bytes_per_step": "communication",
               "leader": "communication",
               "consensus_distance": "communication", "zeta": "communication", "epoch": "train", "lr": "train",
               "center_objective": "train"}


def tensorboard_tag(field: str) -> str:
    """The TensorBoard tag of a metric field, ``group/field``: ``test_*`` in ``test/``; the clocks
    (``time_s``, ``simulated_*``, ``measured_*``, ``wall_time_s``, any ``*_s``) in ``time/``; rounds, bytes,
    the leader, the consensus distance and the mixing matrix's zeta in ``communication/``; the rest
    (losses, learning rate, epoch) in ``train/``."""
    base = field.split("/", 1)[0]
    group = _TAG_GROUPS.get(base)
    if group is None:
        if base.startswith("test_"):
            group = "test"
        elif base.startswith(("simulated_", "measured_")) or base.endswith("_s") or base == "wall_time_s":
            group = "time"
        else:
            group = "train"
    return f"{group}/{field}"


def tensorboard_enabled(setting: bool | None, *, has_dir: bool = True) -> bool:
    """Whether a run writes TensorBoard event files: ``setting`` (``RunConfig.tensorboard``) ``None`` means
    when the ``tensorboard`` package is importable and the run has a directory. ``True`` without the
    package, or without a run directory, is a :class:`ConfigError`. A package that is installed but broken
    (its import fails) is found here, before the run starts: an error with ``True``, a warning (and no event
    files) when unset -- not a traceback at the first metric record."""
    if setting is False:
        return False
    available = importlib.util.find_spec("tensorboard") is not None
    if setting is True:
        if not available:
            raise ConfigError.invalid("tensorboard", True, "the tensorboard package is not installed "
                                                           "(pip install 'coopsgd[tensorboard]')")
        if not has_dir:
            raise ConfigError.invalid("tensorboard", True, "needs a run directory (out)")
    if not (available and has_dir):
        return False
    broken = tensorboard_import_error()
    if broken is None:
        return True
    if setting is True:
        raise ConfigError.invalid("tensorboard", True, f"the tensorboard package is installed but cannot be "
                                                       f"imported ({broken}); reinstall it or use --no-tensorboard")
    warnings.warn(f"the tensorboard package is installed but cannot be imported ({broken}); this run writes "
                  "no TensorBoard events (reinstall it, or --no-tensorboard to silence this)", RuntimeWarning,
                  stacklevel=2)
    return False


_TB_IMPORT: dict[str, str | None] = {}


def tensorboard_import_error() -> str | None:
    """Why ``torch.utils.tensorboard`` cannot be imported (one line), ``None`` when it can; tried once."""
    if "error" not in _TB_IMPORT:
        try:
            importlib.import_module("torch.utils.tensorboard")
            _TB_IMPORT["error"] = None
        except Exception as exc:  # noqa: BLE001 -- any failure of an optional dependency's import
            _TB_IMPORT["error"] = (f"{type(exc).__name__}: {exc}".splitlines() or [type(exc).__name__])[0][:200]
    return _TB_IMPORT["error"]
