"""The executor cache: ``executor="auto"`` times loop vs vmap once per workload and machine, then remembers.

The two executors (:mod:`coopsgd.engines.executors`) compute the same gradients in a different order of
floating-point operations, so their results differ in the last bits. If ``"auto"`` re-timed them in every
run, two runs of the same command could pick differently (the timing follows the machine's load) and give
different numbers. Instead, the first run of a workload times both (:meth:`Simulator._calibrate
<coopsgd.engines.simulator.Simulator._calibrate>`) and stores the choice here; every later run with the
same key reads it and times nothing.

The key (:func:`cache_key`) is a hash of everything the choice depends on: the model's structure (module
classes and ``repr``, parameter and buffer shapes), the number of workers and how many compute in the first
step, the batch shapes and dtypes, the loss function, the state's dtype and device, and the machine (CPU
model, accelerator name, torch version, intra-op threads). Anything else (seed, learning rate, preset)
does not change which executor is faster and is not part of it.

Location: ``$COOPSGD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/coopsgd``, else ``~/.cache/coopsgd``; one
JSON file, :data:`CACHE_FILE`. Writes are atomic (temporary file + rename, under an advisory lock where the
platform has one); a damaged file is ignored with a warning and rewritten by the next store; an unwritable
directory only costs the cache (warning), never the run. Delete the file to re-time every workload.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from coopsgd.fileio import atomic_write_bytes

__all__ = ["CACHE_ENV", "CACHE_FILE", "CACHE_FORMAT", "CacheWarning", "ExecutorCache", "cache_dir", "cache_key",
           "machine_fingerprint", "model_fingerprint"]

#: Environment variable naming the cache directory (overrides the XDG / home default).
CACHE_ENV = "COOPSGD_CACHE_DIR"
#: File name of the executor cache inside :func:`cache_dir`.
CACHE_FILE = "executor-calibration.json"
#: ``format`` entry of the cache file; a file without it is treated as damaged.
CACHE_FORMAT = "coopsgd-executor-cache-v1"

_EXECUTORS = ("loop", "vmap")


class CacheWarning(UserWarning):
    """The executor cache could not be read (ignored, rewritten) or written (the choice is not kept)."""


def cache_dir() -> Path:
    """``$COOPSGD_CACHE_DIR``, else ``$XDG_CACHE_HOME/coopsgd``, else ``~/.cache/coopsgd`` (not created)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "coopsgd"
    return Path.home() / ".cache" / "coopsgd"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_fingerprint(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine as the executor choice sees it: CPU model, accelerator, torch version, threads."""
    device = torch.device(device)
    out: dict[str, Any] = {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        out["accelerator"] = torch.cuda.get_device_name(device)
    return out


def model_fingerprint(module: nn.Module, param_shapes: Sequence[Sequence[int]] | None = None,
                      buffer_shapes: Sequence[Sequence[int]] | None = None) -> str:
    """A hash of a module's structure: every submodule's class and ``repr`` plus parameter / buffer shapes.

    ``param_shapes`` / ``buffer_shapes`` replace the module's own (the simulator's template holds no
    parameter storage, its shapes live in the flat layout).
    """
    h = hashlib.sha256()
    for name, sub in module.named_modules():
        h.update(f"{name}:{type(sub).__module__}.{type(sub).__qualname__}\n".encode())
    h.update(repr(module).encode())
    if param_shapes is None:
        param_shapes = [tuple(p.shape) for p in module.parameters()]
    if buffer_shapes is None:
        buffer_shapes = [tuple(b.shape) for b in module.buffers()]
    h.update(json.dumps([[list(s) for s in param_shapes], [list(s) for s in buffer_shapes]]).encode())
    return h.hexdigest()[:32]


def _batch_signature(batches: Sequence[tuple[Tensor, Tensor] | None]) -> list[list[Any]]:
    sigs: list[list[Any]] = []
    for b in batches:
        if b is None:
            continue
        x, y = b
        sig = [list(x.shape), str(x.dtype), list(y.shape), str(y.dtype)]
        if sig not in sigs:
            sigs.append(sig)
    return sigs


def cache_key(*, model: str, workers: int, batches: Sequence[tuple[Tensor, Tensor] | None], dtype: torch.dtype,
              device: torch.device | str, loss_fn: Any = None, machine: Mapping[str, Any] | None = None
              ) -> tuple[str, dict[str, Any]]:
    """``(key, description)``: the hex key of a workload and the plain description it hashes.

    ``model`` is :func:`model_fingerprint`'s hash; ``batches`` the first step's per-worker batches (``None``
    for a worker that does not compute); ``machine`` defaults to :func:`machine_fingerprint`.
    """
    device = torch.device(device)
    desc = {
        "model": model,
        "workers": int(workers),
        "active": sum(b is not None for b in batches),
        "batches": _batch_signature(batches),
        "loss_fn": None if loss_fn is None else f"{getattr(loss_fn, '__module__', '')}."
                                                  f"{getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}",
        "dtype": str(dtype),
        "device": device.type,
        "machine": dict(machine) if machine is not None else machine_fingerprint(device),
    }
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:40]
    return key, desc


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and entry.get("executor") in _EXECUTORS
            and isinstance(entry.get("medians_s", {}), dict))


class ExecutorCache:
    """The JSON file of executor choices (see the module docstring).

    Args:
        path: the cache file; ``None``: :data:`CACHE_FILE` in :func:`cache_dir` (read from the environment
            when the cache is created).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir() / CACHE_FILE

    def __repr__(self) -> str:
        return f"ExecutorCache({str(self.path)!r})"

    # -- reading -----------------------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        """The entries of the file; ``{}`` for a missing file, ``{}`` with a warning for a damaged one."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            warnings.warn(f"coopsgd: cannot read the executor cache {str(self.path)!r} ({exc}); ignoring it",
                          CacheWarning, stacklevel=3)
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            why = f"not JSON: {exc}"
        else:
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                why = f"no 'format': {CACHE_FORMAT!r} entry"
            elif not isinstance(data.get("entries"), dict):
                why = "no 'entries' mapping"
            else:
                return {k: v for k, v in data["entries"].items() if isinstance(k, str)}
        warnings.warn(f"coopsgd: the executor cache {str(self.path)!r} is damaged ({why}); ignoring it "
                      "(it is rewritten with the next executor choice)", CacheWarning, stacklevel=3)
        return {}

    def lookup(self, key: str) -> dict[str, Any] | None:
        """The stored entry of ``key`` (``executor``, ``medians_s``, ...) or ``None``."""
        entry = self._read().get(key)
        if entry is None:
            return None
        if not _valid_entry(entry):
            warnings.warn(f"coopsgd: the executor cache {str(self.path)!r} has a damaged entry for key {key} "
                          "(ignored; it is rewritten)", CacheWarning, stacklevel=2)
            return None
        return dict(entry)

    # -- writing -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An advisory lock on ``<file>.lock`` where the platform has ``fcntl`` (read-modify-write)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: atomic renames only
            yield
            return
        lock = self.path.with_name(self.path.name + ".lock")
        with open(lock, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def store(self, key: str, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Store ``entry`` under ``key`` unless another run stored one first; returns the entry in force.

        The file is rewritten atomically (damaged content is dropped). If the directory cannot be written
        the entry is returned unchanged with a :class:`CacheWarning` (the run goes on, uncached).
        """
        new = {**dict(entry), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CacheWarning)  # already reported by lookup()
                    entries = self._read()
                old = entries.get(key)
                if isinstance(old, dict) and _valid_entry(old):
                    return dict(old)  # a concurrent run chose first: every run of this key uses its choice
                entries[key] = new
                data = {"format": CACHE_FORMAT, "entries": entries}
                atomic_write_bytes(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
        except OSError as exc:
            warnings.warn(f"coopsgd: cannot write the executor cache {str(self.path)!r} ({exc}); the executor "
                          f"choice is not kept (set ${CACHE_ENV} to a writable directory)", CacheWarning,
                          stacklevel=2)
        return new
