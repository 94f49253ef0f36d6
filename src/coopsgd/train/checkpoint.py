"""The run checkpoint: one layout for every engine, written by :func:`checkpoint_record` and read by
:func:`load_run_checkpoint`.

A run checkpoint (``checkpoint.pt``, :data:`CHECKPOINT_FORMAT`) holds the step, the run's config, the data
position, the training loop's own state and the engine's state envelope (``engine_state``) -- or, for the
distributed engine, one envelope per rank (``ranks``) and the ``world_size``. ``engine`` says which engine
wrote it; a file written by another engine, by another run or damaged is refused naming the entry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from coopsgd.engines.base import ENGINE_STATE_FORMAT
from coopsgd.errors import INT64_MAX, ConfigError
from coopsgd.train.config import RunConfig
from coopsgd.train.loop import LoopState
from coopsgd.train.rundir import IGNORED_FIELDS, config_difference, load_checkpoint, read_run_json

__all__ = ["CHECKPOINT_FORMAT", "checkpoint_record", "load_run_checkpoint", "checkpoint_path"]

#: ``format`` of every run checkpoint (``checkpoint.pt``), whatever the engine: ``engine`` says which wrote it.
CHECKPOINT_FORMAT = "coopsgd-checkpoint-v2"


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file of ``path``: the file itself, or ``checkpoint.pt`` in a run directory."""
    rp = Path(path)
    return rp / "checkpoint.pt" if rp.is_dir() else rp


def checkpoint_record(config: RunConfig, engine: str, step: int, loader: Any, loop: LoopState, *,
                      engine_state: dict[str, Any] | None = None,
                      ranks: list[Any] | None = None) -> dict[str, Any]:
    """The one layout of a run checkpoint at ``step`` (the loader is moved to that step's data position).

    ``engine_state``: the engine's state envelope (one process holds every node); ``ranks``: one envelope per
    rank instead (the distributed engine; ``world_size`` is their number).
    """
    if (engine_state is None) == (ranks is None):
        raise ValueError("give the engine's state or one state per rank")
    epoch, bi = divmod(step, loader.steps_per_epoch)
    loader.seek(epoch, bi)
    rec: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "engine": engine, "step": step, "config": config.to_dict()}
    if ranks is None:
        rec["engine_state"] = engine_state
    else:
        rec["world_size"] = len(ranks)
    rec["loader"] = loader.state_dict()
    rec["loop"] = loop.to_dict()
    if ranks is not None:
        rec["ranks"] = ranks
    return rec


def load_run_checkpoint(path: str | Path, engine: str, *, world: int | None = None,
                        config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a run checkpoint (a file, or a run directory holding ``checkpoint.pt``) written by ``engine``.

    One code path for every engine: the file must be a :data:`CHECKPOINT_FORMAT` checkpoint whose
    ``engine`` matches, and every entry the engines read must have its type and range (:func:`_check_run_state`:
    ``step`` an integer in [0, 2^63), ``config`` a mapping, the data position, the loop state, the engine
    state; ``world_size`` and ``ranks`` for the distributed engine). When a ``config.json`` lies beside it
    (a run directory), the checkpoint's config must equal it in every field but the ones a resume may
    change: a checkpoint of another run, or a damaged ``config.json``, is refused naming the field.
    ``world`` (distributed runs): the number of ranks resuming, which must be the checkpoint's, with one
    state per rank, the config and the data position. ``config`` (a :meth:`RunConfig.to_dict`): the run that
    resumes from it, which must equal the checkpoint's config in the same fields (a checkpoint given from
    another directory, e.g. ``torchrun --resume``, is checked like the run directory's own). Anything else is
    a :class:`ConfigError` naming the file and the entry.
    """
    file = checkpoint_path(path)
    state = load_checkpoint(file)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError.invalid("resume", str(path), f"not a {CHECKPOINT_FORMAT} checkpoint "
                                                       f"(format {state.get('format')!r})")
    if state.get("engine") != engine:
        raise ConfigError.invalid("resume", str(path), f"written by the {state.get('engine')!r} engine; "
                                                       f"this run uses the {engine!r} engine")
    _check_run_state(state, file, engine)
    beside = file.parent / "config.json"
    if beside.is_file() and "config" in state:
        _same_config(file, state["config"], read_run_json(beside, "config"),
                     f"does not belong to the run in {str(beside)!r}",
                     "in config.json (a checkpoint of another run, or a damaged config.json)")
    if config is not None and isinstance(state.get("config"), dict):
        _same_config(file, state["config"], config, "is of another configuration",
                     f"in this run (only {', '.join(IGNORED_FIELDS)} may change when resuming)")
    if world is not None:
        _check_world(state, path, world)
    return state


def _same_config(file: Path, saved: dict[str, Any], other: dict[str, Any], what: str, where: str) -> None:
    """The checkpoint's config ``saved`` equals ``other`` in every field a resume may not change; else a
    :class:`ConfigError` naming the checkpoint (``what`` it is) and the first differing field (``where`` the
    other value is)."""
    diff = config_difference(saved, other, ignore=IGNORED_FIELDS)
    if diff is not None:
        key, there, here = diff
        raise ConfigError(f"checkpoint {str(file)!r} {what}: {key} is {there!r} in the checkpoint and {here!r} "
                          f"{where}", field=key, value=here)


def _check_world(state: dict[str, Any], path: str | Path, world: int) -> None:
    """A distributed checkpoint fits a run of ``world`` ranks: its world size, one state per rank, the
    run's config and data position."""
    saved = state.get("world_size")
    if saved != world:
        raise ConfigError.invalid("world_size", saved, f"the checkpoint was written by {saved} ranks; this run has "
                                                       f"workers={world} (resume with the same number of workers)")
    ranks = state.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != world:
        raise ConfigError.invalid("resume", str(path), f"the checkpoint must hold one state per rank ({world})")
    for key in ("config", "loader"):
        if not isinstance(state.get(key), dict):
            raise ConfigError.invalid(key, type(state.get(key)).__name__,
                                      f"checkpoint {str(path)!r} must hold the run's {key} state (a mapping); "
                                      "damaged or not written by coopsgd")


def _check_run_state(state: dict[str, Any], file: Path, engine: str) -> None:
    """Check the types and ranges of the entries of a run checkpoint the engines read (see
    :func:`load_run_checkpoint`); a bad one is a :class:`ConfigError` naming the file and the entry.

    ``step`` is always required; the simulator's ``config``, ``engine_state`` and ``loader`` too (every
    simulator checkpoint has them). Every other entry is checked when present (the distributed engine's
    ``world_size`` and ``ranks`` are compared with the run by :func:`_check_world`)."""

    def bad(entry: str, value: Any, allowed: str) -> ConfigError:
        shown = value if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
        return ConfigError(f"checkpoint {str(file)!r}: {entry}={shown!r} is invalid: {allowed}", field=entry,
                           value=shown)

    def integer(entry: str, value: Any, minimum: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= INT64_MAX:
            raise bad(entry, value, f"must be an integer in [{minimum}, 2^63)")
        return value

    simulate = engine != "distributed"
    integer("step", state.get("step"))
    if (simulate or "config" in state) and not isinstance(state.get("config"), dict):
        raise bad("config", state.get("config"), "must be a mapping (the run's resolved config)")
    if simulate or "loader" in state:
        loader = state.get("loader")
        if not isinstance(loader, dict):
            raise bad("loader", loader, "must be a mapping (the data position)")
        for key in ("epoch", "batch"):
            integer(f"loader.{key}", loader.get(key))
    loop = state.get("loop")
    if loop is not None:
        if not isinstance(loop, dict):
            raise bad("loop", loop, "must be a mapping (the training loop's state) or absent")
        if "skips_in_a_row" in loop:
            integer("loop.skips_in_a_row", loop["skips_in_a_row"])
        if "dropped" in loop and not isinstance(loop["dropped"], list):
            raise bad("loop.dropped", loop["dropped"], "must be a list (the dropped rounds)")
        t = loop.get("train_s", 0.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise bad("loop.train_s", t, "must be a finite number >= 0")
        for key in ("loss_sums", "loss_counts"):
            vals = loop.get(key)
            if vals is not None and (not isinstance(vals, list) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vals)):
                raise bad(f"loop.{key}", vals, "must be a list of finite numbers (one per worker) or absent")
        if "eval_every" in loop:
            integer("loop.eval_every", loop["eval_every"], minimum=1)
    if not simulate:
        if "world_size" in state:
            integer("world_size", state["world_size"], minimum=1)
        ranks = state.get("ranks")
        if ranks is not None and (not isinstance(ranks, list) or not all(isinstance(r, dict) for r in ranks)):
            raise bad("ranks", ranks, "must be a list of engine states (one per rank)")
        return
    es = state.get("engine_state")
    if not isinstance(es, dict):
        raise bad("engine_state", es, "must be a mapping (the engine's state)")
    if es.get("format") != ENGINE_STATE_FORMAT:
        raise bad("engine_state.format", es.get("format"), f"must be {ENGINE_STATE_FORMAT!r}")
