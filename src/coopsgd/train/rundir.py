"""Run directories: resolved config, versions, seeds, git revision, metrics JSONL, checkpoints.

Every file is written atomically (temporary file in the same directory, fsync, rename), so an
interrupted run never leaves a half-written JSON or checkpoint behind. Checkpoints are loaded with
``torch.load(weights_only=True)``: loading never executes code.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from coopsgd.errors import ConfigError, CoopSGDError

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_json", "save_checkpoint", "load_checkpoint", "environment", "jsonable"]


def jsonable(o: Any) -> Any:
    """Convert numpy/torch scalars and arrays, paths and non-finite floats (-> None) for strict JSON."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        o = o.item()
    if hasattr(o, "tolist") and type(o).__module__.startswith("torch"):
        return jsonable(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file + fsync + rename (the old file survives any crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n").encode())


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` into memory, then write atomically. ``state`` must hold tensors and plain Python."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint without executing code; a missing, truncated or tampered file is a clear error."""
    import pickle
    import zipfile

    import torch

    p = Path(path)
    if not p.is_file():
        raise ConfigError.invalid("checkpoint", str(path), "no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        raise CoopSGDError(
            f"checkpoint {str(path)!r} is unreadable (truncated, corrupted or not a coopsgd checkpoint): "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise CoopSGDError(f"checkpoint {str(path)!r} is not a coopsgd checkpoint (no 'format' entry)")
    return state


def _git_revision() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        if res.returncode == 0:
            rev = res.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment() -> dict[str, Any]:
    """Versions, platform, git revision and command line: enough to rerun a run from its directory."""
    import scipy
    import torch

    from coopsgd import __version__

    return {
        "coopsgd": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "git_revision": _git_revision(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class RunDir:
    """A run directory: ``config.json``, ``environment.json``, ``metrics.jsonl``, ``summary.json``, checkpoints."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError.invalid("out", str(path), "exists and is not a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self._metrics: TextIO | None = None

    def write_config(self, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.path / "config.json", config)
        atomic_write_json(self.path / "environment.json", {**environment(), **(extra or {})})

    def truncate_metrics(self, step: int) -> None:
        """Keep only the metric records up to ``step`` (a resumed run replaces what came after)."""
        if not self.metrics_path.is_file():
            return
        kept = [r for r in RunDir.read_metrics(self.metrics_path) if r.get("step", 0) <= step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(jsonable(r)) + "\n" for r in kept).encode())

    def start_metrics(self, *, append: bool = False) -> None:
        self._metrics = open(self.metrics_path, "a" if append else "w", encoding="utf-8")

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line and flush it (a crash loses at most the line being written)."""
        if self._metrics is None:
            self.start_metrics()
        assert self._metrics is not None
        self._metrics.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def checkpoint(self, state: dict[str, Any], name: str = "checkpoint.pt") -> Path:
        return save_checkpoint(self.path / name, state)

    @staticmethod
    def read_metrics(path: str | Path) -> list[dict[str, Any]]:
        """Records of ``RUN_DIR/metrics.jsonl`` (a torn last line from a crash is skipped)."""
        p = Path(path)
        if p.is_dir():
            p = p / "metrics.jsonl"
        if not p.is_file():
            raise ConfigError.invalid("run_dir", str(path), "has no metrics.jsonl (is it a coopsgd run directory?)")
        out = []
        for line in p.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return out
