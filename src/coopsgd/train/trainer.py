"""Runs built from a :class:`RunConfig`: :func:`run` on any engine, :func:`train` on the simulator.

Every engine is driven by :func:`coopsgd.train.loop.run_loop` through one set-up
(:mod:`coopsgd.train.setup`): the problem (:func:`coopsgd.train.problem.build_problem`: a typed
:class:`~coopsgd.train.problem.Problem`), the engine from a small factory of its own (:func:`make_simulator`
here), the :class:`LoopPlan` (:func:`coopsgd.train.setup.prepare_config_run`), the records
(:mod:`coopsgd.train.records`: one metric schema whatever the engine, :data:`TIME_KEYS`) and the checkpoint
(:mod:`coopsgd.train.checkpoint`: one layout, the engine's state envelope inside). :func:`train` runs the
simulator, :func:`coopsgd.train.reference.train_reference` the reference engine and
:func:`coopsgd.train.distributed.run_distributed` one process per worker, each rank running the same loop;
:func:`run` picks one by ``config.execution.engine``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.algorithms import AlgorithmSpec
from coopsgd.engines.simulator import Simulator
from coopsgd.engines.simulator.calibration import ExecutorCache
from coopsgd.engines.simulator.clock import FlopCompute, SimClock
from coopsgd.errors import ConfigError, Interrupted
from coopsgd.theory.cost import ComputeModel, NetworkModel
from coopsgd.train.checkpoint import CHECKPOINT_FORMAT, checkpoint_record, load_run_checkpoint
from coopsgd.train.config import RunConfig
from coopsgd.train.distributed import run_distributed
from coopsgd.train.loop import LoopState
from coopsgd.train.problem import (
    Problem,
    build_problem,
    epoch_steps,
    feed_from,
    holdout_split,
    lr_at,
    split_holdout,
)
from coopsgd.train.records import TIME_KEYS, evaluate_model, record_run, summarize
from coopsgd.train.reference import train_reference
from coopsgd.train.rundir import RunDir, check_run_dir, tensorboard_enabled
from coopsgd.train.setup import (
    RunSetup,
    check_state_fits,
    finished_summary,
    open_run_dir,
    prepare_config_run,
    problem_record,
    record_interruption,
    stop_on_signals,
)

__all__ = ["Experiment", "build", "make_simulator", "sim_clock", "iterate", "train", "run", "checkpoint_state",
           # the pieces of one run set-up, from their modules (coopsgd.train.problem, .records, .checkpoint)
           "build_problem", "holdout_split", "split_holdout", "lr_at", "feed_from", "evaluate_model", "summarize",
           "record_run", "load_run_checkpoint", "TIME_KEYS", "CHECKPOINT_FORMAT", "train_reference"]

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """A simulator run, built (:func:`build`, or by hand by an experiment whose data a config cannot express):
    the config, the spec, the simulator (``sim``), the data and the step counts; ``loop_state`` is the
    training loop's state after the last checkpoint or the end of :func:`iterate`."""

    config: RunConfig
    spec: AlgorithmSpec
    sim: Any
    loader: Any
    train_set: Any
    test_set: Any
    loss_fn: Callable[..., Any]
    total_steps: int
    eval_every: int
    is_lm: bool = False
    histograms: np.ndarray | None = None
    #: the held-out part of the training data (``config.evaluation.holdout_fraction``; ``None``: no split)
    holdout_set: Any = None
    loop_state: LoopState = field(default_factory=LoopState)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of one epoch, one pass over the training set (:func:`coopsgd.train.problem.epoch_steps`)."""
        return epoch_steps(self.loader)


def sim_clock(config: RunConfig) -> SimClock:
    """The simulated clock of a run (:class:`coopsgd.engines.simulator.clock.SimClock`): the config's network and
    compute model (``"flops"``: counted FLOPs at ``compute_gflops``, falling back to a constant
    ``compute_ms`` for a model that cannot be counted; ``"measured"``; or a ``compute_ms`` distribution), with the speed classes ``worker_speeds``."""
    c = config
    network = NetworkModel.from_mbps(c.clock.net_latency_ms, c.clock.net_bandwidth_mbps)
    compute: ComputeModel | FlopCompute | None = None
    if c.clock.compute == "flops":
        compute = FlopCompute(c.clock.compute_gflops, fallback=ComputeModel(mean_s=c.clock.compute_ms / 1e3))
    elif c.clock.compute != "measured":
        compute = ComputeModel(mean_s=c.clock.compute_ms / 1e3, distribution=c.clock.compute, spread=c.clock.compute_spread)
    return SimClock(network, compute, seed=c.execution.seed, speeds=c.clock.worker_speeds or None)


def make_simulator(config: RunConfig, problem: Problem) -> Simulator:
    """The simulator's factory: the engine of a ``simulate`` run on ``problem``.

    The simulator's one-time choices are made here, on the batches of step 0 (nothing is trained):
    ``executor="auto"`` reads the executor from the cache (:class:`coopsgd.engines.simulator.calibration.ExecutorCache`,
    ``$COOPSGD_CACHE_DIR``) or times both once and stores the choice, and the FLOP compute model counts
    the FLOPs of one worker's step (``sim.executor_info()``, ``sim.compute_model_info()``).
    """
    c, p = config, problem
    check_state_fits(p.spec.workers + p.spec.auxiliaries, p.model, p.dtype, c.optimizer, c.execution.device)
    sim = Simulator(p.spec, p.model, loss_fn=p.loss_fn, optimizer=c.optimizer, executor=c.execution.executor,
                    dtype=p.dtype, seed=c.execution.seed, loss_estimate=c.algorithm.loss_estimate,
                    probe_batch=p.probe, clock=sim_clock(c),
                    downpour_order=c.algorithm.downpour_order if p.spec.schedule.sequential else "schedule",
                    nan_policy=c.execution.nan_policy, device=c.execution.device,
                    executor_cache=ExecutorCache() if c.execution.executor == "auto" else None)
    sim.prepare(feed_from(p.loader)(0, range(c.algorithm.workers), p.spec.schedule.active(0)))
    return sim


def build(config: RunConfig) -> Experiment:
    """Build the spec, data, partition, model and simulator of a ``simulate`` run (:func:`make_simulator`)."""
    p = build_problem(config)
    sim = make_simulator(config, p)
    return Experiment(config=config, spec=p.spec, sim=sim, loader=p.loader, train_set=p.train_set,
                      test_set=p.test_set, loss_fn=p.loss_fn, total_steps=p.total_steps, eval_every=p.eval_every,
                      is_lm=p.is_lm, histograms=p.histograms, holdout_set=p.holdout_set)


def _setup(exp: Experiment, *, progress: bool = False, checkpoint: Callable[[int, LoopState], None] | None = None,
           resume: dict[str, Any] | None = None, resume_path: str = "", start: int | None = None) -> RunSetup:
    """The run set-up of an :class:`Experiment` (:func:`coopsgd.train.setup.prepare_config_run`); every
    checkpoint first keeps the loop's state in ``exp.loop_state``."""

    def ckpt(step: int, st: LoopState) -> None:
        exp.loop_state = st
        if checkpoint is not None:
            checkpoint(step, st)

    return prepare_config_run(
        exp.config, exp, exp.sim, resume=None if resume is None else (resume, resume["engine_state"]),
        resume_path=resume_path, start=start, checkpoint=ckpt if checkpoint is not None else None,
        progress=f"{exp.spec.name} x{exp.config.algorithm.workers}" if progress else None, show_rounds=True)


def iterate(
    exp: Experiment,
    *,
    start_step: int = 0,
    progress: bool = False,
    on_checkpoint: Callable[[int], None] | None = None,
    state: LoopState | None = None,
) -> Generator[dict[str, Any], None, None]:
    """Run the experiment from the simulator's current step; yield one metric record per evaluation.

    ``on_checkpoint(step)`` is called after every ``config.output.checkpoint_every`` steps (``exp.loop_state``
    is then the loop's state to save, :func:`checkpoint_state`).
    """
    if start_step != exp.sim.step_count:
        raise ConfigError.invalid("start_step", start_step, f"the simulator is at step {exp.sim.step_count}")
    setup = _setup(exp, progress=progress, start=start_step,
                   checkpoint=None if on_checkpoint is None else lambda step, _st: on_checkpoint(step))
    setup.state = state if state is not None else exp.loop_state
    exp.loop_state = yield from setup.records()


def checkpoint_state(exp: Experiment, step: int) -> dict[str, Any]:
    """A run checkpoint of a simulator run (:func:`coopsgd.train.checkpoint.checkpoint_record`): the engine's
    state envelope, the data position and the loop's state (``exp.loop_state``)."""
    return checkpoint_record(exp.config, exp.sim.name, step, exp.loader, exp.loop_state,
                             engine_state=exp.sim.state_dict())


def _warn_without_rounds(exp: Experiment) -> None:
    """Warn when the run ends before its first communication round (``total_steps < tau``): the workers
    then train alone and nothing is averaged. (Reconstructed; see the helper report of issue 14.)"""
    spec = exp.spec
    if spec.workers > 1 and exp.total_steps < spec.tau and not exp.config.algorithm.warmup_steps:
        log.warning("%s: no communication round happens in this run's %d steps (tau = %d); the workers train "
                    "alone and are never averaged: raise max_steps or lower tau", spec.name, exp.total_steps,
                    spec.tau)


def train(
    config: RunConfig,
    *,
    progress: bool = False,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run ``config`` (engine ``simulate``), write the run directory, return the summary.

    The summary holds ``final`` (train_loss, test_loss, test_accuracy or test_perplexity),
    ``simulated_time_s`` and its split, ``wall_time_s``, ``communication_rounds``, ``bytes_sent``.
    On a non-finite loss the run stops with an error naming the worker and the step; the metrics
    written so far stay valid and ``summary.json`` records the failure (no checkpoint of a broken state).

    ``resume`` is a checkpoint file (or a run directory holding ``checkpoint.pt``): the simulator state
    (all nodes, buffers, momentum, RNG, schedule and leader state, clock), the data position and the
    counters are restored and the run continues; the final parameters equal an uninterrupted run's
    exactly. Metric records after the checkpoint's step are replaced.

    The run directory (``out`` or ``config.output.out``; none: nothing is written) must not hold another
    configuration's run (:func:`coopsgd.train.rundir.check_run_dir`; checked before anything is built)
    unless ``overwrite``; the old run's files are removed first (not when resuming).
    """
    if config.execution.engine != "simulate":
        raise ConfigError.invalid("engine", config.execution.engine, "train() runs the 'simulate' engine")
    out_dir = out or config.output.out
    if out_dir:
        check_run_dir(out_dir, config.to_dict(), overwrite=overwrite, resume=resume is not None)
    tensorboard = tensorboard_enabled(config.output.tensorboard, has_dir=bool(out_dir))
    exp = build(config)
    _warn_without_rounds(exp)
    rd: RunDir | None = None

    def checkpoint(step: int, st: LoopState) -> None:
        if rd is not None:
            rd.checkpoint(checkpoint_state(exp, step))

    ckpt = load_run_checkpoint(resume, "simulate", config=config.to_dict()) if resume is not None else None
    setup = _setup(exp, progress=progress, checkpoint=checkpoint, resume=ckpt, resume_path=str(resume))
    done = finished_summary(out_dir, setup.start, exp.total_steps) if ckpt is not None else None
    if done is not None:  # a finished run resumed: nothing to do, nothing written
        if setup.bar is not None:
            setup.bar.close()
        return done
    try:
        with stop_on_signals():  # SIGTERM / SIGINT: summary "interrupted", the last checkpoint kept
            if out_dir:
                # the executor and where it came from (cache key, timed medians) and the compute model: how the
                # run's numbers and simulated times were produced (see docs/reliability.md, "Determinism")
                calib = exp.sim.executor_info()
                extra = {"executor": exp.sim.executor_name, "executor_from_cache": calib["from_cache"],
                         "optimizer": exp.sim.optimizer_info(), "executor_calibration": calib,
                         "compute_model": exp.sim.compute_model_info(),
                         **problem_record(exp, setup.start, exp.histograms)}
                rd = open_run_dir(out_dir, config, extra, overwrite=overwrite, resume=resume is not None,
                                  start=setup.start, tensorboard=tensorboard, eval_every=setup.plan.eval_every,
                                  total_steps=exp.total_steps)
            t0 = time.perf_counter()
            last, exp.loop_state = setup.run(rd)
            wall = time.perf_counter() - t0
            summary = summarize(exp.spec, config, last, total_steps=exp.total_steps, wall=wall, engine="simulate",
                                is_lm=exp.is_lm, extra={"executor": exp.sim.executor_name})
            if rd is not None:
                rd.checkpoint(checkpoint_state(exp, exp.total_steps))
                rd.write_summary(summary)
                summary["out"] = str(rd.path)
    except Interrupted as exc:
        record_interruption(rd, exc)
        raise
    finally:
        if rd is not None:
            rd.release()
    return summary


def run(config: RunConfig, *, progress: bool = False, out: str | Path | None = None,
        resume: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run ``config`` on the engine ``config.execution.engine`` names. ``overwrite``: replace another
    configuration's run in the run directory (:func:`coopsgd.train.rundir.check_run_dir`)."""
    if resume is not None and config.execution.engine == "reference":
        raise ConfigError.invalid("resume", str(resume), "resuming is supported by the 'simulate' and 'distributed' engines")
    if config.execution.engine == "reference":
        return train_reference(config, progress=progress, out=out, overwrite=overwrite)
    if config.execution.engine == "simulate":
        return train(config, progress=progress, out=out, resume=resume, overwrite=overwrite)
    emulate = config.clock.emulate_network
    return run_distributed(config, out=out, timeout_s=config.execution.timeout_s, resume=resume,
                           net_latency_ms=config.clock.net_latency_ms if emulate else None,
                           net_bandwidth_mbps=config.clock.net_bandwidth_mbps if emulate else None,
                           overwrite=overwrite, progress=progress)
