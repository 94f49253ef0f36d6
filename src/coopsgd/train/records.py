"""What a run records: the metrics schema (:data:`TIME_KEYS`), the evaluation of a neural-network run
(:func:`nn_evaluator`, the same for the simulator and every distributed rank), the writing of the loop's
records (:func:`record_run`) and the run summary (:func:`summarize`): the same keys from every engine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import torch

from coopsgd.algorithms import AlgorithmSpec
from coopsgd.algorithms.asynchronous import ASYNC_STATS
from coopsgd.engines.base import Engine, ModelEngine, NonFiniteError
from coopsgd.theory.spectral import zeta
from coopsgd.train.config import RunConfig
from coopsgd.train.loop import LoopState
from coopsgd.train.problem import TrainingData
from coopsgd.train.rundir import RunDir

__all__ = ["TIME_KEYS", "nonnegative", "evaluate_model", "nn_evaluator", "time_fields", "spec_zeta", "record_run", "summarize"]

#: Keys every engine's metric records and summaries carry (``None`` where an engine has no such value):
#: simulated time from the simulated clock / cost model, measured time from real clocks, and ``time_s``,
#: the run's own clock for plots (``time_source`` says which).
TIME_KEYS = ("time_s", "time_source", "simulated_time_s", "simulated_compute_s", "simulated_communication_s",
             "simulated_idle_s", "measured_train_s", "measured_compute_s", "measured_communication_s",
             "wall_time_s")


#: Windows of a language model's evaluation batch (35 tokens x an 18,328-word vocabulary: 82 MB of logits).
LM_EVAL_WINDOWS = 32


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor],
                   *, is_lm: bool = False, batch: int = 500, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (language model) of ``model`` on (x, y).

    The data may live elsewhere (the data sets are on the CPU): each batch moves to the model's device. A
    language model is evaluated :data:`LM_EVAL_WINDOWS` windows at a time: its logits are windows x tokens x
    vocabulary (500 WikiText-2 windows would be 1.3 GB of them).
    """
    if is_lm:
        batch = min(batch, LM_EVAL_WINDOWS)
    model.eval()
    first: torch.Tensor | None = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    total, correct, n = 0.0, 0, 0
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch].to(device)
        xb = xb.to(device) if is_lm else xb.to(device, dtype)
        out = model(xb)
        k = yb.numel() if is_lm else len(yb)
        total += float(loss_fn(out, yb)) * k
        if not is_lm:
            correct += int((out.argmax(dim=1) == yb).sum())
        n += k
    model.train()
    loss = total / max(n, 1)
    if is_lm:
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 50.0)))}
    return {"loss": loss, "accuracy": correct / max(n, 1)}


def spec_zeta(spec: AlgorithmSpec) -> float | None:
    """ζ of the spec's theory matrix (``None``: the spec has none)."""
    return None if spec.theory_matrix is None else float(zeta(spec.theory_matrix))


#: A time below zero by at most this much is rounding (a difference of two equal sums), recorded as 0.
ROUNDING_S = 1e-9


def nonnegative(seconds: Any) -> Any:
    """A duration with rounding below zero (``-1.8e-15`` from ``phases - busy``) recorded as ``0.0``; ``None``
    and real values as they are."""
    if isinstance(seconds, float) and -ROUNDING_S <= seconds <= 0.0:  # -0.0 too
        return 0.0
    return seconds


def time_fields(times: dict[str, Any], train_s: float, wall: float) -> dict[str, Any]:
    """The :data:`TIME_KEYS` of a record from an engine's ``time_record()``, the measured training seconds
    and the wall-clock seconds of the run (a duration below zero by rounding is 0, :func:`nonnegative`)."""
    simulated = times.get("simulated_time_s")
    out = {k: nonnegative(times.get(k)) for k in TIME_KEYS}
    out["bytes_sent"] = float(times.get("bytes_sent", 0.0))
    out["peak_bytes_per_step"] = float(times.get("peak_bytes_per_step", 0.0))
    out["measured_train_s"] = float(train_s)
    out["wall_time_s"] = float(wall)
    out["time_source"] = "simulated" if simulated is not None else "measured"
    out["time_s"] = float(simulated) if simulated is not None else float(train_s)
    return out


def nn_evaluator(config: RunConfig, data: TrainingData, *, wall_offset: float = 0.0) -> Callable[..., dict[str, Any]]:
    """The evaluation of a neural-network run, the same for the simulator and the distributed engine.

    Every process calls it (the engine's views are collective on the distributed engine); the writer
    gets the record, the others an empty dict. The centre model (:meth:`AlgorithmSpec.center_node`) is
    evaluated on the first ``eval_samples`` test samples, the averaged model u_k on as many training
    samples; with a held-out set (``holdout_fraction``), the centre model on its first ``eval_samples``
    samples too (``holdout_loss``, ``holdout_accuracy`` / ``holdout_perplexity``).
    """
    c = config
    steps_per_epoch = data.steps_per_epoch
    dtype = torch.float64 if c.execution.dtype == "float64" else torch.float32
    test_set, train_set, is_lm, loss_fn = data.test_set, data.train_set, data.is_lm, data.loss_fn
    holdout_set = data.holdout_set
    zeta_value = spec_zeta(data.spec)
    t0 = time.perf_counter() - wall_offset

    def evaluate(engine: Engine, step: int, lr: float, worker_losses: np.ndarray, st: LoopState) -> dict[str, Any]:
        assert isinstance(engine, ModelEngine)
        center = engine.center_model()
        avg = engine.average_model()
        consensus = engine.consensus_distance()
        times = engine.time_record()
        if not engine.is_writer:
            return {}
        nt = min(c.evaluation.eval_samples, len(test_set))
        test = evaluate_model(center, test_set.x[:nt], test_set.y[:nt], loss_fn, is_lm=is_lm, dtype=dtype)
        n = min(c.evaluation.eval_samples, len(train_set))
        train = evaluate_model(avg, train_set.x[:n], train_set.y[:n], loss_fn, is_lm=is_lm, dtype=dtype)
        wall = time.perf_counter() - t0
        rec: dict[str, Any] = {
            "step": step,
            "epoch": step / steps_per_epoch,
            "lr": lr,
            "train_loss": train["loss"],
            "worker_losses": [float(v) for v in worker_losses],
            "test_loss": test["loss"],
            "consensus_distance": float(consensus),
            "zeta": zeta_value,
            "rounds": int(engine.rounds),
            "leader": engine.leader,
            "dropped_rounds": list(st.dropped),
            **time_fields(times, st.train_s, wall),
            "measured_samples_per_s": step * c.algorithm.workers * c.problem.batch_size / st.train_s if st.train_s > 0 else None,
        }
        rec.update(engine.async_record())  # an asynchronous server's staleness statistics (none otherwise)
        if is_lm:
            rec["test_perplexity"] = test["perplexity"]
            rec["train_perplexity"] = train["perplexity"]
        else:
            rec["test_accuracy"] = test["accuracy"]
            rec["train_accuracy"] = train["accuracy"]
        if holdout_set is not None:
            nh = min(c.evaluation.eval_samples, len(holdout_set))
            held = evaluate_model(center, holdout_set.x[:nh], holdout_set.y[:nh], loss_fn, is_lm=is_lm, dtype=dtype)
            rec["holdout_loss"] = held["loss"]
            rec["holdout_perplexity" if is_lm else "holdout_accuracy"] = held["perplexity" if is_lm else "accuracy"]
        return rec

    return evaluate


def record_run(records: Generator[dict[str, Any], None, Any], rd: RunDir | None) -> tuple[dict[str, Any], Any]:
    """Consume a loop's records, logging each non-empty one to the run directory (``None``: nowhere).

    Returns the last record and the generator's return value. On divergence the run directory gets
    ``summary.json`` with ``"status": "diverged"``, the error and the last record, and the error is raised.
    """
    last: dict[str, Any] = {}
    try:
        while True:
            rec = next(records)
            if rec:
                last = rec
                if rd is not None:
                    rd.log(rec)
    except StopIteration as stop:
        return last, stop.value
    except NonFiniteError as exc:
        if rd is not None:
            rd.close()
            rd.write_summary({"status": "diverged", "error": str(exc), "last_record": last})
        raise
    finally:
        if rd is not None:
            rd.close()


def summarize(spec: AlgorithmSpec, config: RunConfig, last: dict[str, Any], *, total_steps: int, wall: float,
              engine: str, is_lm: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run summary from the last metric record; the same keys from every engine."""
    final: dict[str, Any] = {"train_loss": last["train_loss"], "test_loss": last["test_loss"]}
    for k in ("test_perplexity", "test_accuracy"):
        if k in last:
            final[k] = last[k]
    sim = last.get("simulated_time_s")
    summary: dict[str, Any] = {
        "status": "ok",
        "engine": engine,
        "preset": spec.name,
        "workers": config.algorithm.workers,
        "steps": total_steps,
        "final": final,
        "time_s": last.get("time_s"),
        "time_source": last.get("time_source"),
        "simulated_time_s": sim,
        "simulated_split_s": None if sim is None else {
            "compute_s": last.get("simulated_compute_s"), "communication_s": last.get("simulated_communication_s"),
            "idle_s": last.get("simulated_idle_s")},
        "measured_train_s": last.get("measured_train_s"),
        "wall_time_s": wall,
        "communication_rounds": last["rounds"],
        "bytes_sent": last["bytes_sent"],
        "peak_bytes_per_step": last.get("peak_bytes_per_step"),
        "consensus_distance": last.get("consensus_distance"),
        "zeta": last.get("zeta"),
        "dropped_rounds": list(last.get("dropped_rounds") or []),
    }
    for k in ASYNC_STATS:  # an asynchronous server's staleness statistics
        if k in last:
            summary[k] = last[k]
    summary.update(extra or {})
    return summary
