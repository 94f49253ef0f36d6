"""Runs of a :class:`RunConfig` on the exact reference engine (analytic ``objective``): :func:`train_reference`.

The engine comes from its factory (:func:`make_reference`), the loop plan from the one set-up
(:func:`coopsgd.train.setup.prepare_run`) with the reference run's own :class:`~coopsgd.train.setup.Workload`:
no data (analytic objectives draw their own gradients), the objective's values as records, time from the
cost model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from coopsgd.algorithms import AlgorithmSpec
from coopsgd.algorithms.asynchronous import bind_arrival_time, bind_speeds
from coopsgd.analysis import spec_round_cost
from coopsgd.engines.base import Engine
from coopsgd.engines.reference import ReferenceEngine, consensus_distance
from coopsgd.errors import ConfigError, Interrupted
from coopsgd.objectives import Objective, make_objective
from coopsgd.theory.cost import ComputeModel, NetworkModel, RoundCost, expected_runtime, round_cost
from coopsgd.train.config import RunConfig
from coopsgd.train.loop import LoopState
from coopsgd.train.problem import REFERENCE_STEPS, lr_at
from coopsgd.train.records import nonnegative, spec_zeta, summarize, time_fields
from coopsgd.train.rundir import RunDir, check_run_dir, tensorboard_enabled
from coopsgd.train.setup import (
    RunSetup,
    Workload,
    open_run_dir,
    prepare_run,
    record_interruption,
    stop_on_signals,
)

__all__ = ["train_reference", "make_objective_of", "make_reference", "DEFAULT_STEPS"]

#: Steps of a reference run without ``max_steps``.
DEFAULT_STEPS = REFERENCE_STEPS


def make_objective_of(config: RunConfig) -> Objective:
    """The analytic objective of ``config`` (``objective`` with ``objective_args``; the workers, the seed, the
    batch size and the partition's iid-ness filled in where the objective takes them)."""
    c = config
    args = dict(c.problem.objective_args)
    if c.problem.objective in ("quadratic", "logistic"):
        args.setdefault("workers", c.algorithm.workers)
    if c.problem.objective in ("quadratic", "matrix_completion", "logistic"):
        args.setdefault("seed", c.execution.seed)
    if c.problem.objective == "logistic":
        args.setdefault("batch_size", c.problem.batch_size)
        args.setdefault("iid", c.problem.partition == "iid")
    return make_objective(c.problem.objective, **args)


def make_reference(config: RunConfig, spec: AlgorithmSpec, objective: Objective) -> ReferenceEngine:
    """The reference engine's factory. Its workers run plain SGD: another inner optimizer is refused."""
    inner = config.optimizer.name or spec.inner_optimizer or "sgd"
    if inner != "sgd":
        raise ConfigError.invalid("optimizer", inner, "the reference engine's workers run plain SGD on analytic "
                                  f"objectives; use --optimizer sgd (preset {spec.name!r}) or another engine")
    # an asynchronous server's arrival order: the speed classes, and one worker's push and pull in units of a step
    spec = bind_speeds(spec, config.clock.worker_speeds)
    network = NetworkModel.from_mbps(config.clock.net_latency_ms, config.clock.net_bandwidth_mbps)
    push_pull = network.round_time(round_cost("parameter_server", workers=1, params=objective.dim, bytes_per_param=8))
    step_s = config.clock.compute_ms / 1e3
    spec = bind_arrival_time(spec, push_pull / step_s if step_s > 0 else 0.0)
    return ReferenceEngine(spec, objective, seed=config.execution.seed, nan_policy=config.execution.nan_policy)


def _expected_clock(c: RunConfig, spec: AlgorithmSpec, dim: int, steps: int) -> tuple[RoundCost, dict[str, Any]]:
    """The cost of a round and the cost model's expected run time (``compute_ms`` per step: an analytic
    objective has no model to FLOP-count, so ``compute="flops"`` and ``"measured"`` are constant here)."""
    rc = spec_round_cost(spec, dim, bytes_per_param=8)
    network = NetworkModel.from_mbps(c.clock.net_latency_ms, c.clock.net_bandwidth_mbps)
    compute = ComputeModel(mean_s=c.clock.compute_ms / 1e3, spread=c.clock.compute_spread,
                           distribution="constant" if c.clock.compute in ("measured", "flops") else c.clock.compute)
    clock = expected_runtime(steps=steps, tau=spec.tau, workers=spec.workers, cost=rc, network=network,
                             compute=compute, overlap=spec.overlap, trials=1 if compute.deterministic else 50)
    return rc, clock


def _workload(c: RunConfig, spec: AlgorithmSpec, obj: Objective, steps: int, rc: RoundCost, clock: dict[str, Any],
              t0: float) -> Workload:
    """The reference run's loop: F at the averaged model and at the centre model as records, no data; time
    from the cost model (``rc``, ``clock``: :func:`_expected_clock`)."""
    per_step = clock["per_step_s"]
    zeta = spec_zeta(spec)
    logistic = hasattr(obj, "accuracy")

    def evaluate(engine: Engine, step: int, lr: float, worker_losses: np.ndarray, st: LoopState) -> dict[str, Any]:
        assert isinstance(engine, ReferenceEngine)
        center = engine.center()
        frac = step / steps
        times = {"simulated_time_s": step * per_step, "simulated_compute_s": frac * clock["compute_s"],
                 "simulated_communication_s": frac * clock["communication_s"],
                 "simulated_idle_s": frac * clock["idle_s"], "bytes_sent": rc.bytes_sent * engine.units_sent,
                 "peak_bytes_per_step": rc.bytes_sent * engine.peak_units}
        rec: dict[str, Any] = {
            "step": step, "epoch": None, "lr": lr, "train_loss": float(obj.value(engine.average())),
            "worker_losses": [float(v) for v in np.asarray(obj.value(engine.workers_state))],
            "test_loss": _logistic_test_loss(obj, center) if logistic else float(obj.value(center)),
            "center_objective": float(obj.value(center)),
            "consensus_distance": consensus_distance(engine.state, spec.workers), "zeta": zeta,
            "rounds": int(engine.rounds), "leader": engine.leader, "dropped_rounds": list(st.dropped),
            **time_fields(times, st.train_s, time.perf_counter() - t0), "measured_samples_per_s": None,
        }
        if logistic:
            rec["test_accuracy"] = float(obj.accuracy(center))  # type: ignore[attr-defined]
        rec.update(engine.async_record())  # an asynchronous server's staleness statistics (none otherwise)
        return rec

    return Workload(total_steps=steps, eval_every=max(1, steps // 200), lr=lambda k, _t: lr_at(c, k, max(1, steps), 0.0),
                    feed=lambda k, local, active: None, evaluate=evaluate)


def train_reference(config: RunConfig, *, progress: bool = False, out: str | Path | None = None,
                    overwrite: bool = False) -> dict[str, Any]:
    """Run ``config`` on the exact reference engine (analytic ``objective``) through the training loop;
    the summary has the same keys as :func:`coopsgd.train.trainer.train`'s.

    ``final.train_loss`` is F at the averaged model u_k, ``final.test_loss`` F at the centre model (the
    held-out loss for ``logistic``, with ``test_accuracy``). Time comes from the cost model
    (:func:`coopsgd.theory.cost.expected_runtime` with ``compute_ms`` per step; an analytic objective has no
    model to FLOP-count, so ``compute="flops"`` and ``"measured"`` are a constant ``compute_ms`` here).
    The run directory is checked and replaced as in :func:`coopsgd.train.trainer.train` (``overwrite``).
    """
    c = config
    out_dir = out or c.output.out
    if out_dir:
        check_run_dir(out_dir, c.to_dict(), overwrite=overwrite)
    tensorboard = tensorboard_enabled(c.output.tensorboard, has_dir=bool(out_dir))
    obj = make_objective_of(c)
    spec = c.build_spec()
    eng = make_reference(c, spec, obj)
    steps = c.schedule.max_steps or DEFAULT_STEPS
    rc, clock = _expected_clock(c, spec, obj.dim, steps)
    t0 = time.perf_counter()
    work = _workload(c, spec, obj, steps, rc, clock, t0)
    rd = open_run_dir(out_dir, c, {"spec": spec.describe()}, overwrite=overwrite, tensorboard=tensorboard) if out_dir else None
    setup = prepare_run(eng, work, nan_policy=c.execution.nan_policy, max_skips=c.execution.max_skips,
                        progress=f"{spec.name} x{spec.workers}" if progress else None)
    try:
        with stop_on_signals():  # SIGTERM / SIGINT: summary "interrupted", one line from the CLI
            summary = _run_and_summarize(c, spec, obj, eng, setup, rd, steps, clock, t0)
    except Interrupted as exc:
        record_interruption(rd, exc)
        raise
    finally:
        if rd is not None:
            rd.release()  # the run directory's lock
    return summary


def _run_and_summarize(c: RunConfig, spec: AlgorithmSpec, obj: Objective, eng: ReferenceEngine, setup: RunSetup,
                       rd: RunDir | None, steps: int, clock: dict[str, Any], t0: float) -> dict[str, Any]:
    """Run a reference run's loop; its summary (written to the run directory, if any)."""
    last, _ = setup.run(rd)
    summary = summarize(spec, c, last, total_steps=steps, wall=time.perf_counter() - t0, engine="reference",
                        is_lm=False)
    if hasattr(obj, "accuracy"):  # logistic
        summary["final"]["test_accuracy"] = last["test_accuracy"]
    # the cost model's expected totals (exact for deterministic compute)
    summary["simulated_time_s"] = summary["time_s"] = clock["total_s"]
    summary["simulated_split_s"] = {k: nonnegative(clock[k]) for k in ("compute_s", "communication_s", "idle_s")}
    summary["worker_objectives"] = [float(v) for v in np.asarray(obj.value(eng.workers_state))]
    summary["center_objective"] = last["center_objective"]
    if rd is not None:
        rd.write_summary(summary)
        summary["out"] = str(rd.path)
    return summary


def _logistic_test_loss(obj: Any, w: np.ndarray) -> float:
    logits = obj.X_test @ np.asarray(w).reshape(obj.features, obj.classes)
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(obj.y_test)), obj.y_test]))
