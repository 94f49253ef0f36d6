"""Run directories: resolved config, versions, seeds, git revision, metrics JSONL, checkpoints.

Every file is written atomically (temporary file in the same directory, fsync, rename), so an
interrupted run never leaves a half-written JSON or checkpoint behind. Checkpoints are loaded with
``torch.load(weights_only=True)``: loading never executes code.

A run never writes into a directory that holds another configuration's run (:func:`check_run_dir`): the
directory must be new or empty, or hold only the files coopsgd writes in a run directory
(:data:`RUN_FILES`, TensorBoard event files, figures) with a ``config.json`` equal to the new run's in every
field but :data:`IGNORED_FIELDS`. ``overwrite=True`` removes such an old run first; files coopsgd did not write
are never removed or replaced. With a run directory and the ``tensorboard`` package, the metric records are
also written as TensorBoard scalars, grouped as ``train/``, ``test/``, ``communication/`` and ``time/``
(:func:`tensorboard_scalars`), in event files directly in the run directory: ``tensorboard --logdir runs``
over several run directories lists each run by its directory's name (an event file's run is its folder's
path under the log directory).

One process writes a run directory at a time: a run holds the directory's lock
(:func:`coopsgd.fileio.lock_directory`, ``.coopsgd.lock`` with its PID) from :meth:`RunDir.create` until
:meth:`RunDir.release`, and :func:`check_run_dir` refuses a directory another process holds, naming its PID.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.errors import ConfigError, CoopSGDError, write_failure
from coopsgd.fileio import (
    LOCK_FILE,
    DirLock,
    append_line,
    atomic_write_bytes,
    check_output_path,
    check_unlocked,
    discard_unused,
    lock_directory,
    read_json,
    read_text,
)
from coopsgd.train.config import RunConfig
from coopsgd.train.tensorboard import (  # noqa: F401 -- re-exported: run directories' TensorBoard
    LIST_TAGS,
    TENSORBOARD_GROUPS,
    tensorboard_enabled,
    tensorboard_import_error,
    tensorboard_tag,
)

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_json", "save_checkpoint", "load_checkpoint", "environment",
           "jsonable", "check_run_dir", "prepare_run_dir", "check_compare_dir", "prepare_compare_dir",
           "fresh_run_dir", "config_difference", "tensorboard_enabled", "tensorboard_scalars", "tensorboard_tag",
           "TENSORBOARD_GROUPS", "RUN_FILES",
           "RESUME_FIELDS", "IGNORED_FIELDS", "TENSORBOARD_DIR", "EVENTS_PREFIX", "COMPARE_FILE", "METRIC_NUMBERS",
           "read_run_json", "lock_directory", "discard_unused", "LOCK_FILE", "enclosing_run_dir", "check_results_dir",
           "tensorboard_import_error"]


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
    if not p.exists():
        raise ConfigError.invalid("checkpoint", str(path), "no such file")
    if not p.is_file():
        raise ConfigError.invalid("checkpoint", str(path), "is not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise ConfigError.invalid("checkpoint", str(path), "is empty (0 bytes): not a checkpoint")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"checkpoint {str(path)!r} is unreadable (truncated, corrupted or not a coopsgd checkpoint; "
            f"{size} bytes): {first.split('. ')[0][:160]}", field="checkpoint", value=str(path)
        ) from None
    if not isinstance(state, dict) or "format" not in state:
        raise ConfigError(f"checkpoint {str(path)!r} is not a coopsgd checkpoint (no 'format' entry)",
                          field="checkpoint", value=str(path))
    return state


def read_run_json(path: str | Path, what: str) -> dict[str, Any]:
    """A run directory's JSON file (``config.json``, ``summary.json``, ...) as a mapping; a damaged one
    (empty, truncated, not UTF-8, not an object) is a :class:`ConfigError` naming the file."""
    data: dict[str, Any] = read_json(path, what)
    return data


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


# ---------------------------------------------------------------------------------------------------------
# safe run directories
# ---------------------------------------------------------------------------------------------------------

#: The files a run writes in its directory (besides ``tensorboard/`` and figures).
RUN_FILES = ("config.json", "environment.json", "metrics.jsonl", "summary.json", "checkpoint.pt")
#: The folder of TensorBoard event files in a run directory written before the event files moved into the
#: run directory itself (TensorBoard named those runs ``<run>/tensorboard``); still recognised as coopsgd's,
#: and a resumed run moves its event files up.
TENSORBOARD_DIR = "tensorboard"
#: The start of a TensorBoard event file's name (``events.out.tfevents.<time>.<host>.<pid>.<n>``).
EVENTS_PREFIX = "events.out.tfevents."
#: The file ``coopsgd compare`` writes at the top of its directory (beside one run directory per preset).
COMPARE_FILE = "compare.json"
#: The RunConfig fields a resumed run may change (``coopsgd run --resume DIR --max-steps ...``).
RESUME_FIELDS = ("max_steps", "epochs", "eval_every", "checkpoint_every", "tensorboard")
#: Fields that do not make a run "another configuration": where it is written, and what a resume may change.
IGNORED_FIELDS = ("out", *RESUME_FIELDS)

_FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
_TMP = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")  # atomic_write_bytes' temporary files


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _head_tail(path: Path, size: int = 65536) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(size)
            f.seek(0, os.SEEK_END)
            end = f.tell()
            if end <= size:
                return head
            f.seek(max(size, end - size))
            return head + f.read()
    except OSError:
        return b""


def _is_figure(path: Path) -> bool:
    """A figure coopsgd drew: png/svg/pdf with matplotlib's signature in its metadata."""
    return path.suffix.lower() in _FIGURE_SUFFIXES and b"matplotlib" in _head_tail(path).lower()


def _is_run_file(path: Path) -> bool:
    """Whether ``path`` (a file directly inside a run directory) is one coopsgd wrote there: its name is one
    coopsgd writes and its content is what coopsgd writes under that name."""
    name = path.name
    if not path.is_file() or path.is_symlink():
        return False
    tmp = _TMP.match(name)
    if tmp:  # a temporary file of an interrupted atomic write
        tname = tmp.group("name")
        return tname in (*RUN_FILES, COMPARE_FILE) or Path(tname).suffix.lower() in _FIGURE_SUFFIXES
    if name == "config.json":
        data = _read_json_object(path)
        return data is not None and "engine" in data and "preset" in data
    if name == "environment.json":
        data = _read_json_object(path)
        return data is not None and "coopsgd" in data
    if name == "summary.json":
        data = _read_json_object(path)
        return data is not None and "status" in data
    if name == "metrics.jsonl":
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline(1 << 20).strip()
        except (OSError, ValueError):
            return False
        if not first:
            return True
        try:
            rec = json.loads(first)
        except ValueError:
            return False
        return isinstance(rec, dict) and "step" in rec
    if name == "checkpoint.pt":
        return _head_tail(path, 4)[:4] == b"PK\x03\x04"  # torch.save's zip format
    if name.startswith(EVENTS_PREFIX):
        return _is_event_file(path)
    return _is_figure(path)


def _is_event_file(path: Path) -> bool:
    """A TensorBoard event file: empty (a writer that had not flushed yet) or starting with the record that
    names the event format (``brain.Event:2``)."""
    head = _head_tail(path, 64)
    return not head or b"brain.Event:" in head


def _is_tensorboard_dir(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    return all(p.is_file() and p.name.startswith(EVENTS_PREFIX) for p in path.iterdir())


def _scan_run_dir(path: Path) -> tuple[list[Path], list[Path]]:
    """(coopsgd's entries, foreign entries) of a run directory, each sorted by name."""
    ours: list[Path] = []
    foreign: list[Path] = []
    for p in sorted(path.iterdir()):
        if p.name == LOCK_FILE:  # the directory's lock: never removed (another process may be waiting on it)
            continue
        if p.name == TENSORBOARD_DIR:
            (ours if _is_tensorboard_dir(p) else foreign).append(p)
        else:
            (ours if _is_run_file(p) else foreign).append(p)
    return ours, foreign


def _normal(value: Any) -> Any:
    """A value as it reads back from JSON (tuples -> lists, numpy -> Python, non-finite -> None)."""
    return json.loads(json.dumps(jsonable(value)))


def config_difference(old: dict[str, Any], new: dict[str, Any],
                      ignore: tuple[str, ...] = IGNORED_FIELDS) -> tuple[str, Any, Any] | None:
    """The first field (in the new config's order) whose value differs: ``(field, old, new)``; ``None`` if
    none does. ``ignore`` fields are skipped; a field the old config lacks (one added to RunConfig since it
    was written) counts as its default."""
    defaults = RunConfig().to_dict()
    missing = object()
    for key in [*new, *sorted(k for k in old if k not in new)]:
        if key in ignore:
            continue
        a = old.get(key, defaults.get(key, missing))
        b = new.get(key, defaults.get(key, missing))
        a = None if a is missing else _normal(a)
        b = None if b is missing else _normal(b)
        if a != b and not _same_weight_decay(key, a, b, old, new):
            return key, a, b
    return None


def _same_weight_decay(key: str, a: Any, b: Any, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """A run directory written before the inner optimizer could be chosen holds ``weight_decay = 0.0`` and no
    ``optimizer`` field: that is SGD's default, the same run as an unset (``None``) weight decay now."""
    if key != "weight_decay" or {a, b} != {None, 0.0}:
        return False
    legacy = old if a == 0.0 else new
    return "optimizer" not in legacy


def _names(paths: list[Path], limit: int = 3) -> str:
    shown = ", ".join(repr(p.name + ("/" if p.is_dir() else "")) for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _refuse(what: str, path: Path, reason: str, fix: str) -> ConfigError:
    return ConfigError(f"{what} {str(path)!r} {reason}; {fix}", field="out", value=str(path))


_REPLACE = "choose another directory, or add --overwrite (overwrite=True) to replace that run"
_FOREIGN = ("coopsgd writes only into a new, empty or coopsgd run directory and never removes files it did "
            "not write: choose another directory")


def check_run_dir(path: str | Path, config: dict[str, Any], *, overwrite: bool = False,
                  resume: bool = False, probe: bool = True) -> list[Path]:
    """Check that a run of ``config`` (a :meth:`RunConfig.to_dict`) may write into ``path``; return the old
    run's entries a fresh run removes first (nothing is removed here).

    ``path`` may receive the run when it does not exist, is empty, or holds only coopsgd run files whose
    ``config.json`` equals ``config`` in every field but :data:`IGNORED_FIELDS` (the same run, rerun or
    resumed). Otherwise it holds *another configuration*: a different ``config.json``, coopsgd run files
    without a readable ``config.json``, or files coopsgd did not write -- a :class:`ConfigError` naming the
    directory and the first differing field, unless ``overwrite`` (then that old run's files are returned
    for removal). Files coopsgd did not write are refused even with ``overwrite``. ``resume``: the run
    continues the run in ``path`` (nothing is removed; ``overwrite`` cannot be combined with it).
    ``probe``: refuse a directory whose lock another process holds (:func:`coopsgd.fileio.check_unlocked`;
    off for a rank whose launcher holds it).
    """
    p = Path(path)
    if resume and overwrite:
        raise ConfigError.invalid("overwrite", True, "cannot be combined with resume (a resumed run continues "
                                                      "the run in its own directory)")
    check_output_path(p, "out", directory=True)
    _refuse_nested(p, "run directory")
    if not p.exists():
        return []
    if probe:
        check_unlocked(p, "run directory")
    ours, foreign = _scan_run_dir(p)
    ckpt = p / "checkpoint.pt"
    if resume and ckpt in foreign and ckpt.is_file():
        size = ckpt.stat().st_size
        raise ConfigError.invalid("checkpoint", str(ckpt), f"is {'empty' if size == 0 else 'damaged'} ({size} "
                                  "bytes; not a file torch.save wrote), so the run cannot be resumed from it")
    if foreign:
        raise _refuse("run directory", p, f"holds files coopsgd did not write ({_names(foreign)})", _FOREIGN)
    if not ours:
        return []
    fix = ("a resumed run continues its own run directory: resume into it or into a new one" if resume
           else _REPLACE)
    old = _read_json_object(p / "config.json") if (p / "config.json").is_file() else None
    if old is None:
        if not overwrite:
            raise _refuse("run directory", p, f"holds coopsgd run files ({_names(ours)}) but no readable "
                          "config.json, so they may belong to another configuration", fix)
    else:
        diff = config_difference(old, config)
        if diff is not None and not overwrite:
            key, a, b = diff
            raise _refuse("run directory", p, f"holds a run of another configuration ({key}: {a!r} there, "
                          f"{b!r} here)", fix)
    return [] if resume else ours


def enclosing_run_dir(path: str | Path) -> Path | None:
    """The run directory (a directory with coopsgd's ``config.json``) that ``path`` lies inside, if any."""
    p = Path(os.path.abspath(path))
    for parent in p.parents:
        cfg = parent / "config.json"
        if cfg.is_file() and _is_run_file(cfg):
            return parent
    return None


def _refuse_nested(p: Path, what: str) -> None:
    """An output inside another run's directory would be refused by that run's resume (files coopsgd did not
    write there) and could be removed by its ``--overwrite``: refuse it."""
    run = enclosing_run_dir(p)
    if run is not None:
        raise _refuse(what, p, f"lies inside the run directory {str(run)!r}", "coopsgd writes nothing into "
                      "another run's directory: choose a directory outside it")


#: What coopsgd writes as the results of ``reproduce`` and how each file is recognised (its content's start).
_RESULT_FILES = {"result.json": b"{", "report.md": b"# Reproducing the papers' experiments (generated report)",
                 "report.html": b"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>coopsgd"}


def check_results_dir(path: str | Path, what: str = "output directory") -> None:
    """Refuse ``path`` as the output of ``coopsgd reproduce`` when writing there would replace files coopsgd
    did not write (a ``result.json``, ``report.md``/``.html`` or a figure of someone else's), when it is a
    run directory (whose resume would then refuse it) or lies inside one. Writes nothing."""
    p = Path(path)
    check_output_path(p, "out", directory=True)
    _refuse_nested(p, what)
    if not p.is_dir():
        return
    cfg = p / "config.json"
    if cfg.is_file() and _is_run_file(cfg):
        raise _refuse(what, p, "is a run directory", "coopsgd writes experiment results only outside run "
                      "directories: choose another directory")
    foreign = []
    for e in sorted(p.iterdir()):
        if e.name in _RESULT_FILES:
            head = _head_tail(e, 256)
            ok = e.is_file() and head.startswith(_RESULT_FILES[e.name])
            if ok and e.name == "result.json":
                data = _read_json_object(e)
                ok = data is not None and bool({"experiment", "summary", "claims"} & set(data))
            if not ok:
                foreign.append(e)
        elif e.suffix.lower() in _FIGURE_SUFFIXES and not _is_figure(e):
            foreign.append(e)
    if foreign:
        raise _refuse(what, p, f"holds files coopsgd did not write ({_names(foreign)}) that a result of the same "
                      "name would replace", "choose another directory")


def _remove(entries: list[Path]) -> None:
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink(missing_ok=True)


def prepare_run_dir(path: str | Path, config: dict[str, Any], *, overwrite: bool = False,
                    resume: bool = False, probe: bool = True) -> Path:
    """:func:`check_run_dir`, then remove the old run's files (not when resuming) and create the directory."""
    p = Path(path)
    _remove(check_run_dir(p, config, overwrite=overwrite, resume=resume, probe=probe))
    _mkdir(p)
    return p



def _mkdir(p: Path) -> None:
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        write_failure(exc, p, "nothing was written")
        raise


def check_compare_dir(path: str | Path, config: dict[str, Any], presets: list[str], *,
                      overwrite: bool = False) -> list[Path]:
    """:func:`check_run_dir` for ``coopsgd compare``'s directory: ``compare.json`` (the shared config and the
    presets), figures and one run directory per listed preset. The same rule: another configuration (a
    differing field or preset list) is refused unless ``overwrite``; files coopsgd did not write (including
    subdirectories ``compare.json`` does not list) always are. Returns the entries to remove."""
    p = Path(path)
    check_output_path(p, "out", directory=True)
    _refuse_nested(p, "compare directory")
    if not p.exists():
        return []
    check_unlocked(p, "compare directory")
    meta = _read_json_object(p / COMPARE_FILE) if (p / COMPARE_FILE).is_file() else None
    if meta is not None and not isinstance(meta.get("config"), dict):
        meta = None
    listed: list[str] = []
    if meta is not None:
        old_presets = meta.get("presets")
        if not isinstance(old_presets, list):
            old_presets = list(meta.get("results") or {})
        listed = [str(n) for n in old_presets]
    ours: list[Path] = []
    foreign: list[Path] = []
    for e in sorted(p.iterdir()):
        if e.name == LOCK_FILE:
            continue
        if e.name == COMPARE_FILE:
            (ours if meta is not None else foreign).append(e)
        elif e.is_dir() and not e.is_symlink():
            if e.name in listed:
                sub_ours, sub_foreign = _scan_run_dir(e)
                foreign.extend(sub_foreign)
                ours.append(e)
            else:
                foreign.append(e)
        elif _is_run_file(e) and e.name not in RUN_FILES and not e.name.startswith(EVENTS_PREFIX):  # figures, tmp
            ours.append(e)
        else:
            foreign.append(e)
    if foreign:
        raise _refuse("compare directory", p, f"holds files coopsgd did not write ({_names(foreign)})", _FOREIGN)
    if not ours:
        return []
    if meta is None:
        if not overwrite:
            raise _refuse("compare directory", p, f"holds coopsgd files ({_names(ours)}) but no readable "
                          f"{COMPARE_FILE}, so they may belong to another comparison", _REPLACE)
        return ours
    diff = config_difference(meta["config"], config)
    if diff is None and listed != list(presets):
        diff = ("presets", listed, list(presets))
    if diff is not None and not overwrite:
        key, a, b = diff
        raise _refuse("compare directory", p, f"holds a comparison of another configuration ({key}: {a!r} "
                      f"there, {b!r} here)", _REPLACE)
    return ours


def prepare_compare_dir(path: str | Path, config: dict[str, Any], presets: list[str], *,
                        overwrite: bool = False) -> Path:
    """:func:`check_compare_dir`, then remove the old comparison and create the directory."""
    p = Path(path)
    _remove(check_compare_dir(p, config, presets, overwrite=overwrite))
    _mkdir(p)
    return p


def fresh_run_dir(name: str, root: str | Path = "runs", *, now: float | None = None) -> Path:
    """Create and return a new directory ``root/<name>-<YYYYmmdd-HHMMSS>[-N]`` (``-2``, ``-3``, ... when
    that second's name is taken; creation is atomic, so two processes never get the same one)."""
    base = f"{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"
    root = Path(root)
    check_output_path(root, "out", directory=True)
    _mkdir(root)
    for n in range(1, 10_000):
        p = root / (base if n == 1 else f"{base}-{n}")
        try:
            p.mkdir()
        except FileExistsError:
            continue
        return p
    raise CoopSGDError(f"no free run directory name {str(root / base)!r}-N")


# ---------------------------------------------------------------------------------------------------------
# TensorBoard (the tags and when a run writes events: coopsgd.train.tensorboard)
# ---------------------------------------------------------------------------------------------------------

def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The TensorBoard scalars of one metric record: every numeric field as in ``metrics.jsonl`` (non-finite
    values are left out there as ``null``, and here), tagged by :func:`tensorboard_tag` (``test/test_loss``,
    ``time/simulated_time_s``), list fields one scalar per entry (``train/worker_loss/3``); ``step`` is the
    x axis, strings, booleans and nested records are left out."""
    out: dict[str, float] = {}
    for key, value in jsonable(record).items():
        if key == "step" or isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[tensorboard_tag(key)] = float(value)
        elif isinstance(value, list):
            tag = LIST_TAGS.get(key, key)
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[tensorboard_tag(f"{tag}/{i}")] = float(v)
    return out


class RunDir:
    """A run directory: ``config.json``, ``environment.json``, ``metrics.jsonl``, ``summary.json``, checkpoints,
    and TensorBoard event files (the scalars of every metric record, when enabled).

    Runs create theirs with :meth:`create`, which refuses a directory holding another configuration's run
    (:func:`check_run_dir`) and holds its lock until :meth:`release` (or the object is collected, or the
    process ends); ``RunDir(path)`` opens a directory as it is.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_output_path(self.path, "out", directory=True)
        _mkdir(self.path)
        self.metrics_path = self.path / "metrics.jsonl"
        self._metrics: int | None = None  # the file descriptor of metrics.jsonl (O_APPEND, unbuffered)
        self._tb: Any = None
        self._tb_start: int | None = None
        self._lock: DirLock | None = None

    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any], *, overwrite: bool = False,
               resume: bool = False, lock: bool = True) -> RunDir:
        """The run directory of a run of ``config`` (a :meth:`RunConfig.to_dict`): :func:`prepare_run_dir`
        (refuse another configuration's run unless ``overwrite``; remove the old run's files unless
        ``resume``), then open it. ``lock``: first take the directory's lock (checked before, so that a
        refused directory is left as it was; checked again under the lock); ``False`` where the process
        that started this one holds it (a rank of a local launch)."""
        p = Path(path)
        held = None
        if lock:
            check_run_dir(p, config, overwrite=overwrite, resume=resume)
            held = lock_directory(p, "run directory")
        try:
            rd = cls(prepare_run_dir(p, config, overwrite=overwrite, resume=resume, probe=False))
        except BaseException:
            if held is not None:
                held.release()
            raise
        if held is not None:
            rd._lock = held
            weakref.finalize(rd, held.release)
        return rd

    def release(self) -> None:
        """Close the files and give the directory's lock back (the run is over)."""
        self.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def write_config(self, config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        atomic_write_json(self.path / "config.json", config)
        atomic_write_json(self.path / "environment.json", {**environment(), **(extra or {})})

    def truncate_metrics(self, step: int) -> None:
        """Keep only the metric records up to ``step`` (a resumed run replaces what came after)."""
        if not self.metrics_path.is_file():
            return
        kept = [r for r in RunDir.read_metrics(self.metrics_path) if r["step"] <= step]
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(jsonable(r)) + "\n" for r in kept).encode())

    def start_metrics(self, *, append: bool = False, tensorboard: bool = False, start_step: int = 0) -> None:
        """Open ``metrics.jsonl`` (``append``: a resumed run) and, with ``tensorboard``, the TensorBoard
        writer (event files in the run directory). A resumed run (``append``) tells TensorBoard to drop the earlier events
        after ``start_step`` (as :meth:`truncate_metrics` drops the records)."""
        self.close()
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if append else os.O_TRUNC)
        try:
            self._metrics = os.open(self.metrics_path, flags, 0o666)  # the umask decides, as for every file
        except OSError as exc:
            write_failure(exc, self.metrics_path)
            raise
        self._tb_start = (start_step + 1 if append else 0) if tensorboard else None

    def _tensorboard(self) -> Any:
        """The TensorBoard writer, opened at the first record: its event file lies in the run directory itself,
        so that TensorBoard names the run by the directory. A resumed run written before that layout has its
        events in ``tensorboard/``: they are moved up first, so that the resume's purge step applies to them
        and TensorBoard shows one run."""
        if self._tb is None and self._tb_start is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = self._tb_start if self._tb_start > 0 else None
            self._move_legacy_events()
            self._tb = SummaryWriter(log_dir=str(self.path), purge_step=purge, flush_secs=10)
        return self._tb

    def _move_legacy_events(self) -> None:
        legacy = self.path / TENSORBOARD_DIR
        if not _is_tensorboard_dir(legacy):
            return
        try:
            for f in sorted(legacy.iterdir()):
                if not (self.path / f.name).exists():
                    os.replace(f, self.path / f.name)
            legacy.rmdir()
        except OSError as exc:
            write_failure(exc, legacy)
            raise

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line, unbuffered (a crash loses at most the line being written; a failed write, e.g.
        a full disk, leaves no torn line and raises the ``OSError`` naming the file); with TensorBoard
        on, the record's scalars too (:func:`tensorboard_scalars`)."""
        if self._metrics is None:
            self.start_metrics()
        assert self._metrics is not None
        append_line(self._metrics, self.metrics_path, json.dumps(jsonable(record), allow_nan=False) + "\n")
        tb = self._tensorboard()
        step = record.get("step")
        if tb is not None and step is not None:
            for tag, value in tensorboard_scalars(record).items():
                tb.add_scalar(tag, value, global_step=int(step))

    def close(self) -> None:
        if self._metrics is not None:
            os.close(self._metrics)
            self._metrics = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._tb_start = None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def checkpoint(self, state: dict[str, Any], name: str = "checkpoint.pt") -> Path:
        return save_checkpoint(self.path / name, state)

    @staticmethod
    def read_metrics(path: str | Path) -> list[dict[str, Any]]:
        """Records of ``RUN_DIR/metrics.jsonl``, checked (:func:`check_metric_record`).

        A torn last line (no final newline: a crash while it was written) is skipped; any other line that is
        not a JSON object with a non-negative integer ``step`` and numbers (or null) in the numeric fields
        (:data:`METRIC_NUMBERS`), or a file that is not UTF-8, is a :class:`ConfigError` naming the file,
        the line and the field."""
        p = Path(path)
        if p.is_dir():
            p = p / "metrics.jsonl"
        if not p.is_file():
            raise ConfigError.invalid("run_dir", str(path), "has no metrics.jsonl (is it a coopsgd run directory?)")
        text = read_text(p, "metrics", allow_empty=True)
        lines = text.split("\n")
        torn = lines[-1]  # "" when the file ends with a newline
        out = []
        for no, line in enumerate(lines[:-1], start=1):
            if line.strip():
                out.append(check_metric_record(_parse_metric_line(p, no, line), p, no))
        if torn.strip():
            try:
                rec = json.loads(torn)
            except ValueError:
                rec = None  # torn by a crash: skipped
            if rec is not None:
                out.append(check_metric_record(rec, p, len(lines)))
        return out


#: Metric fields that must be numbers (or null) in every record that has them: what the readers plot,
#: tabulate and compare.
METRIC_NUMBERS = (
    "epoch", "lr", "train_loss", "test_loss", "test_accuracy", "test_perplexity", "consensus_distance", "zeta",
    "rounds", "bytes_sent", "peak_bytes_per_step", "time_s", "simulated_time_s", "simulated_compute_s", "simulated_communication_s",
    "simulated_idle_s", "measured_train_s", "measured_compute_s", "measured_communication_s", "wall_time_s",
    "center_objective",
)


def _parse_metric_line(path: Path, no: int, line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ConfigError.invalid("metrics", f"{path}:{no}", f"line {no} is not JSON ({reason}): "
                                  f"{line[:60]!r}") from None


def check_metric_record(rec: Any, path: str | Path, no: int) -> dict[str, Any]:
    """``rec`` (line ``no`` of the metrics file ``path``) if it has the shape of a metric record: a JSON
    object, ``step`` a non-negative integer, the :data:`METRIC_NUMBERS` numbers or null, ``worker_losses``
    a list of numbers or nulls; otherwise a :class:`ConfigError` naming the file, line and field."""
    where = f"{path}:{no}"
    if not isinstance(rec, dict):
        raise ConfigError.invalid("metrics", where, f"line {no} must be a JSON object (a metric record), not a "
                                  f"{type(rec).__name__}")
    step = rec.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ConfigError.invalid(f"metrics {where}: step", step, "must be a non-negative integer")

    def number(v: Any) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))

    for key in METRIC_NUMBERS:
        if key in rec and not number(rec[key]):
            raise ConfigError.invalid(f"metrics {where}: {key}", rec[key], "must be a number or null")
    wl = rec.get("worker_losses")
    if wl is not None and (not isinstance(wl, list) or not all(number(v) for v in wl)):
        raise ConfigError.invalid(f"metrics {where}: worker_losses", wl, "must be a list of numbers or nulls")
    return rec
