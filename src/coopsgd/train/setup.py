"""One run set-up for every engine: the engine and its :class:`LoopPlan`, where the run starts, what the
writer records.

Every run -- the simulator (:func:`coopsgd.train.trainer.train`), the reference engine
(:func:`coopsgd.train.reference.train_reference`), each rank of a distributed run
(:func:`coopsgd.train.distributed.rank_main`) and tensor jobs (:func:`coopsgd.train.distributed.run_spec`) --
builds its engine with one small factory of its own and hands it, with a :class:`Workload` (length, learning
rate, data, evaluation), to :func:`prepare_run`, the one place a :class:`LoopPlan` is built. Runs of a
:class:`RunConfig` on a neural-network :class:`~coopsgd.train.problem.Problem` (the simulator and the
distributed ranks) go through :func:`prepare_config_run`, which adds what they share: the config's learning
rate schedule, the data order, the evaluation (:func:`coopsgd.train.records.nn_evaluator`), the NaN policy,
checkpoints, and the restore of a checkpoint (:func:`restore_data`, :func:`restore_engine`). The run
directory of a run is opened by :func:`open_run_dir` (which takes its lock), a resume of a run that has
already ended is answered by :func:`finished_summary` without writing anything, and
:func:`stop_on_signals` turns SIGTERM / SIGINT into :class:`~coopsgd.errors.Interrupted` for the
single-process engines (the distributed launcher does the same for its ranks).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import nn

from coopsgd.engines.base import Engine, ModelEngine, StepStats
from coopsgd.errors import ConfigError, Interrupted
from coopsgd.train.config import RunConfig
from coopsgd.train.loop import LoopPlan, LoopState, run_loop
from coopsgd.train.problem import TrainingData, feed_from, lr_at
from coopsgd.train.progress import Progress
from coopsgd.train.records import nn_evaluator, record_run
from coopsgd.train.rundir import RunDir, read_run_json

__all__ = ["Workload", "RunSetup", "prepare_run", "prepare_config_run", "config_workload", "restore_data",
           "restore_engine", "open_run_dir", "problem_record", "finished_summary", "stop_on_signals",
           "record_interruption", "check_state_fits", "available_memory"]

Feed = Callable[[int, Sequence[int], np.ndarray | None], Sequence[Any] | None]
Evaluate = Callable[[Engine, int, float, np.ndarray, LoopState], dict[str, Any]]
Checkpoint = Callable[[int, LoopState], None]


@dataclass(frozen=True)
class Workload:
    """What the loop runs, whatever built it (a config's problem, an analytic objective, a tensor job).

    Attributes:
        total_steps, eval_every: the step to stop at; evaluate after every ``eval_every`` steps and at the end.
        lr: ``lr(step, train_s) -> float`` (see :class:`LoopPlan`).
        feed: the data of each step (see :class:`LoopPlan`).
        evaluate: the evaluation (see :class:`LoopPlan`).
    """

    total_steps: int
    eval_every: int
    lr: Callable[[int, float], float]
    feed: Feed
    evaluate: Evaluate


@dataclass
class RunSetup:
    """A run, set up: its engine and loop plan, the step it starts at, the loop's state to start from, and
    its progress bar. :meth:`records` runs it; :meth:`run` runs it and writes its records."""

    engine: Engine
    plan: LoopPlan
    start: int = 0
    state: LoopState = field(default_factory=LoopState)
    bar: Progress | None = None

    def records(self) -> Generator[dict[str, Any], None, LoopState]:
        """The loop's metric records (one per evaluation); returns, and keeps as ``state``, the final loop state."""
        try:
            self.state = yield from run_loop(self.engine, self.plan, state=self.state)
        finally:
            if self.bar is not None:
                self.bar.close()
        return self.state

    def run(self, rd: RunDir | None) -> tuple[dict[str, Any], LoopState]:
        """Run the loop, logging its records to ``rd`` (:func:`coopsgd.train.records.record_run`); the last
        record and the final loop state."""
        return record_run(self.records(), rd)


def prepare_run(engine: Engine, work: Workload, *, nan_policy: str, max_skips: int,
                checkpoint: Checkpoint | None = None, checkpoint_every: int | None = None,
                checkpoint_at_end: bool = False, on_step: Callable[[StepStats], None] | None = None,
                progress: str | None = None, show_rounds: bool = False, start: int = 0,
                state: LoopState | None = None) -> RunSetup:
    """The one construction of a :class:`LoopPlan`: ``work`` with the NaN policy, the checkpoints
    (``checkpoint(step, loop_state)`` every ``checkpoint_every`` steps and, with ``checkpoint_at_end``, at the
    last step), ``on_step`` after every step and, with a ``progress`` description, a progress bar on stderr
    (a bar on a terminal, a line every ~10 s or 10% elsewhere; ``show_rounds``: with the round count).
    ``start`` and ``state``: where a resumed run starts."""
    bar = Progress(work.total_steps, initial=start, desc=progress) if progress is not None else None

    def tick(stats: StepStats) -> None:
        if on_step is not None:
            on_step(stats)
        assert bar is not None
        if show_rounds:
            bar.update(stats.step + 1, loss=lambda: stats.loss, rounds=stats.round)
        else:
            bar.update(stats.step + 1, loss=lambda: stats.loss)

    plan = LoopPlan(total_steps=work.total_steps, eval_every=work.eval_every, lr=work.lr, feed=work.feed,
                    evaluate=work.evaluate, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                    checkpoint_at_end=checkpoint_at_end, nan_policy=nan_policy, max_skips=max_skips,
                    on_step=tick if bar is not None else on_step)
    return RunSetup(engine, plan, start, state if state is not None else LoopState(), bar)


def config_workload(config: RunConfig, data: TrainingData, engine: ModelEngine, *,
                    lr_agree: Callable[[float], float] | None = None, wall_offset: float = 0.0) -> Workload:
    """The :class:`Workload` of a :class:`RunConfig` run on a neural-network problem (simulator or one
    distributed rank): the config's learning-rate schedule (:func:`lr_at`; wall-clock milestones from the
    simulated clock, else the measured training time, agreed on by every rank through ``lr_agree``), each
    worker's shard order (:func:`feed_from`) and :func:`coopsgd.train.records.nn_evaluator`."""
    c = config
    spe = data.steps_per_epoch
    uses_time = bool(c.schedule.lr_decay_times_s)

    def lr(step: int, train_s: float) -> float:
        if not uses_time:
            return lr_at(c, step, spe, 0.0)
        t = engine.time_record(local=True).get("simulated_time_s")
        if t is None:  # measured: every rank must agree on the milestone (the slowest clock)
            t = lr_agree(train_s) if lr_agree is not None else train_s
        return lr_at(c, step, spe, float(t))

    return Workload(total_steps=data.total_steps, eval_every=data.eval_every, lr=lr, feed=feed_from(data.loader),
                    evaluate=nn_evaluator(c, data, wall_offset=wall_offset))


def restore_data(checkpoint: dict[str, Any], data: TrainingData) -> int:
    """The step a checkpoint resumes at, after moving the data order there (the loader checks the seed,
    the batch size and the shards); no collective, so every rank can check it before training."""
    start = int(checkpoint["step"])
    if start > data.total_steps:
        raise ConfigError.invalid("max_steps", data.total_steps, f"the checkpoint is already at step {start}")
    data.loader.load_state_dict(checkpoint["loader"])
    return start


def restore_engine(engine: Engine, envelope: dict[str, Any], start: int, *, path: str = "",
                   who: str = "the engine") -> None:
    """Load the engine's state envelope from the checkpoint ``path`` at step ``start``; the engine (``who``)
    must then be at that step."""
    engine.load_state_dict(envelope)
    if engine.step_count != start:
        raise ConfigError.invalid("resume", path, f"{who}'s state is at step {engine.step_count}, the "
                                                  f"checkpoint at step {start}")


def prepare_config_run(config: RunConfig, data: TrainingData, engine: ModelEngine, *,
                       resume: tuple[dict[str, Any], dict[str, Any]] | None = None, start: int | None = None,
                       checkpoint: Checkpoint | None = None, checkpoint_at_end: bool = False,
                       progress: str | None = None, show_rounds: bool = False,
                       lr_agree: Callable[[float], float] | None = None, wall_offset: float = 0.0,
                       resume_path: str = "", who: str = "the engine") -> RunSetup:
    """The set-up of a :class:`RunConfig` run on a neural-network problem, on an engine built by its factory.

    ``resume``: ``(checkpoint, envelope)`` -- a run checkpoint (:func:`coopsgd.train.checkpoint.load_run_checkpoint`)
    and this process's engine state in it (``resume_path``, ``who``: named in an error); the data order is moved to its step (unless ``start`` says that
    :func:`restore_data` did so already), the engine restored and the loop's state taken from it.
    Checkpoints every ``config.output.checkpoint_every`` steps through ``checkpoint``; the NaN policy is the
    config's. See :func:`prepare_run` for the rest.
    """
    state = None
    if resume is not None:
        ckpt, envelope = resume
        if start is None:
            start = restore_data(ckpt, data)
        restore_engine(engine, envelope, start, path=resume_path, who=who)
        state = LoopState.from_dict(ckpt.get("loop"))
    work = config_workload(config, data, engine, lr_agree=lr_agree, wall_offset=wall_offset)
    if state is not None and state.eval_every and config.evaluation.eval_every is None:
        # the grid follows the run's length when unset: a resumed (and maybe extended) run keeps its own
        work = dataclasses.replace(work, eval_every=state.eval_every)
    return prepare_run(engine, work, nan_policy=config.execution.nan_policy, max_skips=config.execution.max_skips,
                       checkpoint=checkpoint, checkpoint_every=config.output.checkpoint_every,
                       checkpoint_at_end=checkpoint_at_end, progress=progress, show_rounds=show_rounds,
                       start=start or 0, state=state)


def problem_record(data: TrainingData, start: int, histograms: np.ndarray | None) -> dict[str, Any]:
    """What ``environment.json`` records about a run's problem: steps per epoch, total steps, the spec, the
    step it resumed from and the workers' label histograms (when the data has labels)."""
    rec: dict[str, Any] = {"steps_per_epoch": data.steps_per_epoch, "total_steps": data.total_steps,
                           "spec": data.spec.describe(), "resumed_from_step": start}
    if histograms is not None:
        rec["label_histograms"] = histograms.tolist()
    return rec


def open_run_dir(out_dir: str | Path, config: RunConfig, extra: dict[str, Any], *, overwrite: bool = False,
                 resume: bool = False, start: int = 0, tensorboard: bool = False, lock: bool = True,
                 eval_every: int | None = None, total_steps: int | None = None) -> RunDir:
    """Open a run's directory (:meth:`RunDir.create`: another configuration's run is refused unless
    ``overwrite``; the old run's files are removed unless ``resume``; with ``lock`` the directory's lock is
    taken, until :meth:`RunDir.release`), write ``config.json`` and ``environment.json`` (with ``extra``) and
    start the metrics (a run resumed at ``start`` > 0 replaces the records after that step, and the record
    at ``start`` when it is off the ``eval_every`` grid -- the end of a run that is now extended -- or is
    ``total_steps``, where the loop evaluates the final state again)."""
    rd = RunDir.create(out_dir, config.to_dict(), overwrite=overwrite, resume=resume, lock=lock)
    off_grid = eval_every is not None and start % eval_every != 0
    kept = start - 1 if off_grid or start == total_steps else start  # the records (and events) kept
    try:
        rd.write_config(config.to_dict(), extra)
        if start > 0:
            rd.truncate_metrics(kept)
        rd.start_metrics(append=start > 0, tensorboard=tensorboard, start_step=kept)
    except BaseException:
        rd.release()
        raise
    return rd


def finished_summary(out_dir: str | Path | None, start: int, total_steps: int) -> dict[str, Any] | None:
    """The summary of a run resumed at its last step whose ``summary.json`` says it ended well: resuming it is
    a no-op (nothing is evaluated, appended or rewritten). ``None`` when there is something left to do (a
    run that stopped between its last checkpoint and its summary is evaluated again)."""
    if not out_dir or start != total_steps:
        return None
    path = Path(out_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = read_run_json(path, "summary")
    if summary.get("status") != "ok" or summary.get("steps") != total_steps:
        return None
    return {**summary, "out": str(out_dir)}


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`~coopsgd.errors.Interrupted` (exit status 143 /
    130) where the run stands, so that the caller records the run as interrupted; the earlier handlers come
    back afterwards. Only from the main thread (elsewhere signals cannot be handled: a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        raise Interrupted(f"interrupted by {name}: the run was stopped (resume it from its last checkpoint "
                          "with --resume)", signum=signum)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


def record_interruption(rd: RunDir | None, exc: Interrupted) -> None:
    """An interrupted run's ``summary.json`` (status ``"interrupted"``, the signal); the last checkpoint is left
    as it is (written atomically), so ``--resume`` continues from there."""
    if rd is not None and rd.path.is_dir():
        rd.write_summary({"status": "interrupted", "signal": exc.signal_name, "error": str(exc)})


def available_memory(device: str) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the machine's ``MemAvailable``
    (``/proc/meminfo``); ``None`` where it cannot be told."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None


def check_state_fits(rows: int, model: nn.Module, dtype: torch.dtype, optimizer: Any, device: str) -> int:
    """Refuse a run whose stacked state cannot fit before it is allocated (else an allocator traceback
    halfway through the set-up): ``rows`` copies of the model's parameters and buffers in ``dtype``, and the
    inner optimizer's state beside them (SGD's momentum, Adam's two moments), against
    :func:`available_memory`. A lower bound: a refused run could never have run. Returns the estimate."""
    per_row = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    name = getattr(optimizer, "name", None) or "sgd"
    fields = 1 + (2 if name in ("adam", "adamw") else 1 if getattr(optimizer, "momentum", 0.0) else 0)
    need = rows * per_row * fields * torch.empty((), dtype=dtype).element_size()
    free = available_memory(device)
    if free is not None and need > free:
        raise ConfigError(f"the run's state needs {_size(need)} ({rows} copies of {per_row:,} numbers x {fields} "
                          f"in {str(dtype).replace('torch.', '')}) but {device} has {_size(free)} free: use fewer "
                          "workers, a smaller model or another device", field="workers", value=rows)
    return need


def _size(n: int) -> str:
    """A byte count for a message: ``1000 bytes``, ``1.5 KiB`` ... ``298 GiB``."""
    if n < 1024:
        return f"{n} bytes"
    value, units = n / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:.3g} {units[0]}"
