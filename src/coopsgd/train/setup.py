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
directory of a run is opened by :func:`open_run_dir`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.engines.base import Engine, ModelEngine, StepStats
from coopsgd.errors import ConfigError
from coopsgd.train.config import RunConfig
from coopsgd.train.loop import LoopPlan, LoopState, run_loop
from coopsgd.train.problem import TrainingData, feed_from, lr_at
from coopsgd.train.progress import Progress
from coopsgd.train.records import nn_evaluator, record_run
from coopsgd.train.rundir import RunDir

__all__ = ["Workload", "RunSetup", "prepare_run", "prepare_config_run", "config_workload", "restore_data",
           "restore_engine", "open_run_dir", "problem_record"]

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
                 resume: bool = False, start: int = 0, tensorboard: bool = False) -> RunDir:
    """Open a run's directory (:meth:`RunDir.create`: another configuration's run is refused unless
    ``overwrite``; the old run's files are removed unless ``resume``), write ``config.json`` and
    ``environment.json`` (with ``extra``) and start the metrics (a run resumed at ``start`` > 0 replaces the
    records after that step)."""
    rd = RunDir.create(out_dir, config.to_dict(), overwrite=overwrite, resume=resume)
    rd.write_config(config.to_dict(), extra)
    if start > 0:
        rd.truncate_metrics(start)
    rd.start_metrics(append=start > 0, tensorboard=tensorboard, start_step=start)
    return rd
