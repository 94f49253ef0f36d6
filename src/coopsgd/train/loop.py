"""The one training loop: drives any engine (reference, simulator, distributed rank) step by step.

The loop owns what every engine must see identically and what every run must mean the same:

* the step counter (the engine's ``step_count`` must follow it), the learning rate of each step and the
  data of each step (``plan.feed``: the batches of the workers this process runs, ``None`` for inactive
  ones);
* the NaN policy: ``"stop"`` raises at the first non-finite value; ``"skip"`` calls the engine's
  :meth:`~coopsgd.engines.base.Engine.check_health` after every communication round and before every
  evaluation and checkpoint, so that a round with a non-finite value anywhere is dropped on every worker
  (the engine restores the state after the last good round). ``max_skips`` dropped rounds in a row stop
  the run with :class:`~coopsgd.engines.base.NonFiniteError` naming the workers and steps; only a
  round that communicated without a non-finite value resets that count;
* evaluation (``plan.evaluate``; collective on the distributed engine, so every rank calls it) and
  checkpoints (``plan.checkpoint``), at the same steps on every engine;
* the per-worker mini-batch losses between evaluations, reduced over processes by the engine; their running
  sums are part of the loop's state (:class:`LoopState`), so that the first evaluation after a resume equals
  an uninterrupted run's. The sums start again after each evaluation on the grid (every ``eval_every``
  steps), not after the final evaluation of a run that ends off the grid: a run extended from there goes on
  as an uninterrupted one would.

:func:`run_loop` is a generator of metric records (one per evaluation, step 0 included on a fresh start);
callers write them (:mod:`coopsgd.train.trainer`, :mod:`coopsgd.train.distributed`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coopsgd.engines.base import NAN_POLICIES, Batch, DroppedRound, Engine, NonFiniteError, StepStats
from coopsgd.errors import ConfigError

__all__ = ["LoopPlan", "LoopState", "run_loop"]

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What the loop itself accumulates (checkpointed with the engine so that a resumed run is exact).

    ``loss_sums`` / ``loss_counts``: every worker's mini-batch loss sum and count since the last evaluation
    on the grid (over every process; ``None``: zero); ``eval_every``: the run's evaluation grid (a resumed
    run keeps it when the config leaves it to the run's length)."""

    skips_in_a_row: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)
    train_s: float = 0.0  # measured training seconds before this process started (resumed runs)
    loss_sums: list[float] | None = None
    loss_counts: list[float] | None = None
    eval_every: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"skips_in_a_row": int(self.skips_in_a_row), "dropped": list(self.dropped),
                               "train_s": float(self.train_s)}
        if self.loss_sums is not None and self.loss_counts is not None:
            out["loss_sums"] = [float(v) for v in self.loss_sums]
            out["loss_counts"] = [float(v) for v in self.loss_counts]
        if self.eval_every is not None:
            out["eval_every"] = int(self.eval_every)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> LoopState:
        if not data:
            return cls()
        sums, counts, every = data.get("loss_sums"), data.get("loss_counts"), data.get("eval_every")
        return cls(int(data.get("skips_in_a_row", 0)), list(data.get("dropped", [])), float(data.get("train_s", 0.0)),
                   None if sums is None else [float(v) for v in sums],
                   None if counts is None else [float(v) for v in counts], None if every is None else int(every))

    def running_losses(self, m: int, local: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """This process's share of the running sums and counts (its ``local`` workers' entries), zeros when
        there are none or they do not fit ``m`` workers."""
        acc, cnt = np.zeros(m), np.zeros(m)
        if self.loss_sums is not None and self.loss_counts is not None and len(self.loss_sums) == len(self.loss_counts) == m:
            idx = np.asarray(list(local), dtype=np.int64)
            acc[idx] = np.asarray(self.loss_sums, dtype=np.float64)[idx]
            cnt[idx] = np.asarray(self.loss_counts, dtype=np.float64)[idx]
        return acc, cnt


@dataclass
class LoopPlan:
    """How to run: counts, learning rate, data, evaluation and checkpoints.

    Attributes:
        total_steps: the step to stop at.
        eval_every: evaluate after every ``eval_every`` steps and at the end.
        lr: ``lr(step, train_s) -> float``; ``train_s`` is the measured training time so far (evaluation
            and checkpoints excluded), for engines whose learning-rate milestones are in wall-clock.
        feed: ``feed(step, local_workers, active) -> batches``: one entry per worker (``None`` for the
            workers this process does not run or that are inactive; ``active`` is the schedule's mask or
            ``None``), or ``None`` for engines that draw their own gradients.
        evaluate: ``evaluate(engine, step, lr, worker_losses, loop_state) -> record`` (collective; an empty
            dict on processes that do not write).
        checkpoint_every: call ``checkpoint(step, loop_state)`` after every ``checkpoint_every`` steps
            (``None``: never) and, with ``checkpoint_at_end``, at the last step.
        nan_policy, max_skips: see the module docstring.
        on_step: optional ``on_step(stats)`` after every step (per-step traces, progress).
        progress: an optional callable ``progress(step, stats)`` (e.g. a tqdm bar's update).
    """

    total_steps: int
    eval_every: int
    lr: Callable[[int, float], float]
    feed: Callable[[int, Sequence[int], np.ndarray | None], Sequence[Batch | None] | None]
    evaluate: Callable[[Engine, int, float, np.ndarray, LoopState], dict[str, Any]]
    checkpoint: Callable[[int, LoopState], None] | None = None
    checkpoint_every: int | None = None
    checkpoint_at_end: bool = False
    nan_policy: str = "stop"
    max_skips: int = 10
    on_step: Callable[[StepStats], None] | None = None

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError.invalid("nan_policy", self.nan_policy, f"choose one of {', '.join(NAN_POLICIES)}")


def _health(engine: Engine, plan: LoopPlan, state: LoopState, *, after_round: bool) -> None:
    """Run the engine's health check (collective) and apply ``max_skips``."""
    rec: DroppedRound | None = engine.check_health()
    if rec is None:
        if after_round:
            state.skips_in_a_row = 0
        return
    state.dropped.append(rec.to_dict())
    state.skips_in_a_row += 1
    what = ", ".join(f"worker {w} at step {s}" for w, s in rec.first_steps.items()) or f"workers {rec.workers}"
    if state.skips_in_a_row > plan.max_skips:
        steps = [d["step"] for d in state.dropped[-state.skips_in_a_row:-1]]
        raise NonFiniteError(
            f"non-finite values ({what}): {plan.max_skips} rounds in a row dropped already (at steps {steps}) "
            f"and the round at step {rec.step} too (max_skips={plan.max_skips}); the run diverged "
            f"(try a smaller learning rate)"
        )
    log.warning("round at step %d dropped (nan_policy=skip): non-finite values (%s); restored the state after "
                "%d steps", rec.step, what, rec.restored_to_step)


def run_loop(
    engine: Engine, plan: LoopPlan, *, state: LoopState | None = None
) -> Generator[dict[str, Any], None, LoopState]:
    """Run ``engine`` from its current step to ``plan.total_steps``; yield one record per evaluation.

    A fresh engine (step 0) is evaluated once before the first step. ``state`` is the loop's own state
    from a checkpoint (``None``: fresh). The generator's ``return`` value is the final :class:`LoopState`.
    """
    state = state or LoopState()
    m = engine.spec.workers
    start = int(engine.step_count)
    if start > plan.total_steps:
        raise ConfigError.invalid("max_steps", plan.total_steps, f"the run is already at step {start}")
    acc, cnt = state.running_losses(m, engine.local_workers) if start > 0 else (np.zeros(m), np.zeros(m))
    state.eval_every = plan.eval_every
    skip = plan.nan_policy == "skip"
    paused = 0.0  # seconds spent in evaluation and checkpoints (not training time)
    t0 = time.perf_counter()

    def train_s() -> float:
        return state.train_s + time.perf_counter() - t0 - paused

    if start == 0:
        tp = time.perf_counter()
        yield plan.evaluate(engine, 0, plan.lr(0, 0.0), np.full(m, np.nan), state)
        paused += time.perf_counter() - tp
    elif start == plan.total_steps:  # resumed exactly at the end: evaluate the final state only
        yield plan.evaluate(engine, start, plan.lr(start, state.train_s), np.full(m, np.nan), state)
    for step in range(start, plan.total_steps):
        if engine.step_count != step:
            raise RuntimeError(f"engine at step {engine.step_count}, loop at step {step}")
        lr = plan.lr(step, train_s())
        active = engine.spec.schedule.active(step)
        batches = plan.feed(step, engine.local_workers, active)
        stats = engine.step(batches, lr)
        ok = np.isfinite(stats.losses)
        acc[ok] += stats.losses[ok]
        cnt[ok] += 1
        if skip and stats.communicated:
            _health(engine, plan, state, after_round=True)
        if plan.on_step is not None:
            plan.on_step(stats)
        done = step + 1
        on_grid = done % plan.eval_every == 0
        eval_due = on_grid or done == plan.total_steps
        ckpt_due = plan.checkpoint is not None and (
            (plan.checkpoint_every is not None and done % plan.checkpoint_every == 0)
            or (plan.checkpoint_at_end and done == plan.total_steps))
        if eval_due or ckpt_due:
            tp = time.perf_counter()
            engine.finish()
            if skip:
                _health(engine, plan, state, after_round=False)
            paused += time.perf_counter() - tp
        if eval_due:
            tp = time.perf_counter()
            sums, counts = engine.reduce_losses(acc, cnt)
            worker_losses = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
            if on_grid:  # off the grid (a run's last step): the sums go on into a checkpoint at the end
                acc[:] = 0
                cnt[:] = 0
            rec = plan.evaluate(engine, done, lr, worker_losses, _with_time(state, train_s()))
            paused += time.perf_counter() - tp
            yield rec
        if ckpt_due:
            assert plan.checkpoint is not None
            tp = time.perf_counter()
            sums, counts = engine.reduce_losses(acc, cnt)  # collective: the running sums of every process
            plan.checkpoint(done, _with_time(state, train_s(), sums, counts))
            paused += time.perf_counter() - tp
    engine.finish()
    sums, counts = engine.reduce_losses(acc, cnt)  # collective: the state a checkpoint at the end records
    state.train_s = train_s()
    state.loss_sums, state.loss_counts = [float(v) for v in sums], [float(v) for v in counts]
    return state


def _with_time(state: LoopState, train_s: float, sums: np.ndarray | None = None,
               counts: np.ndarray | None = None) -> LoopState:
    """A view of ``state`` whose ``train_s`` is the measured training time up to now (and, for a checkpoint,
    with the running loss sums and counts of every process)."""
    return LoopState(state.skips_in_a_row, state.dropped, train_s,
                     None if sums is None else [float(v) for v in sums],
                     None if counts is None else [float(v) for v in counts], state.eval_every)
