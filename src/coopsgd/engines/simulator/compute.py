"""How the simulator computes its workers' gradients: which executor, and what a step costs in FLOPs.

:class:`SimulatorCompute` is the part of :class:`~coopsgd.engines.simulator.Simulator` that

* chooses the executor (:mod:`coopsgd.engines.executors`: a loop over replica modules or ``torch.func.vmap``):
  the requested one, an earlier run's choice read from an
  :class:`~coopsgd.engines.simulator.calibration.ExecutorCache`, or both timed on the first real batches
  (:meth:`SimulatorCompute._calibrate`), the chosen executor's last timed call then serving as the step's
  own computation (:meth:`SimulatorCompute._reuse_calibration`);
* counts the FLOPs of one worker's step for a :class:`~coopsgd.engines.simulator.clock.FlopCompute` clock;
* describes both in plain data for a run directory (:meth:`~SimulatorCompute.executor_info`,
  :meth:`~SimulatorCompute.compute_model_info`).

The engine supplies its clock, :meth:`SimulatorCompute._materialize` (rows a FedAvg round left deferred
are written first) and :meth:`SimulatorCompute.worker_model`.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from coopsgd.engines.base import Batch
from coopsgd.engines.executors import EXECUTORS, ComputeResult, Executor, make_executor, synchronize
from coopsgd.engines.health import absmax
from coopsgd.engines.rows import ModelRows
from coopsgd.engines.simulator.calibration import (
    ExecutorCache,
    cache_key,
    machine_fingerprint,
    model_fingerprint,
)
from coopsgd.engines.simulator.clock import FlopCompute, SimClock
from coopsgd.errors import check_int

__all__ = ["SimulatorCompute"]

log = logging.getLogger(__name__)


def _choice_settled(times: dict[str, list[float]]) -> bool:
    """Whether more timed calls could still change which executor is worth choosing (see ``_calibrate``)."""
    if len(times) < 2:
        return True
    med = {k: statistics.median(v) for k, v in times.items()}
    fast, slow = sorted(med, key=med.__getitem__)[:2]
    if med[slow] <= 1.03 * med[fast]:
        return True  # within 3%: either choice is as good
    return max(times[fast]) < min(times[slow]) and med[slow] > 1.10 * med[fast]


class SimulatorCompute(ModelRows):
    """The simulator's executors and FLOP counting (see the module docstring); mixed into the engine."""

    clock: SimClock

    def _init_compute(self, executor: str, executor_cache: ExecutorCache | None, calibration_steps: int) -> None:
        """The executor state of a new engine (``executor``: ``"auto"`` or a name of :data:`EXECUTORS`)."""
        self.calibration_steps = check_int("calibration_steps", calibration_steps, minimum=1)
        self.requested_executor = executor
        self._executors: dict[str, Executor] = {}
        self.executor_name: str = executor
        self.calibration: dict[str, float] = {}  # medians of the executors' timed calls (s), "auto" only
        self.calibration_errors: dict[str, str] = {}
        self.executor_cache = executor_cache
        #: where the executor came from: "requested", "calibrated" (timed in this run), "cache" (an earlier
        #: run's choice), "checkpoint" (a resumed run's); None until "auto" has chosen
        self.executor_source: str | None = None
        self.calibration_key: str | None = None  # the executor cache's key of this workload
        self._executor: Executor | None = None
        if executor != "auto":
            self._executor = self._get_executor(executor)
            self.executor_source = "requested"
        # FLOPs of one worker's forward + backward per batch signature (None: could not be counted)
        self._flops: dict[tuple[Any, ...], int | None] = {}
        #: "auto": the chosen executor's last calibration result, kept for the step it computed
        self._calibrated: tuple[tuple[Any, ...], Any, ComputeResult, Any] | None = None
        self.flops_error: str | None = None  # why the model could not be FLOP-counted

    # -- supplied by the engine ------------------------------------------------------------------------------
    def _materialize(self, which: list[int] | None = None) -> None:
        """Write rows a FedAvg round left deferred (``None``: every deferred row)."""
        raise NotImplementedError

    def worker_model(self, i: int) -> nn.Module:
        """A new module (eval mode) holding node ``i``'s parameters and buffers."""
        raise NotImplementedError

    # -- executors -------------------------------------------------------------------------------------------
    def _get_executor(self, name: str) -> Executor:
        if name not in self._executors:
            self._materialize()  # the replicas hold views of rows that hold their values
            self._executors[name] = make_executor(
                name, self.template, self.layout, self.rows_params, self.rows_buffers, self.other_buffers, self.loss_fn, self.m
            )
        return self._executors[name]

    @property
    def executor(self) -> Executor | None:
        return self._executor

    def _evaluator(self) -> Executor:
        return self._executor if self._executor is not None else self._get_executor("loop")

    def _rng_guard(self) -> Any:
        """A context restoring torch's RNG afterwards (one-time work must not shift dropout's draws)."""
        if self.device.type == "cpu":
            return torch.random.fork_rng(devices=[])
        return torch.random.fork_rng(device_type=self.device.type)

    def executor_info(self) -> dict[str, Any]:
        """The executor and where it came from, in plain data (for a run directory's ``environment.json``).

        ``source``: ``"requested"``, ``"calibrated"`` (timed in this run), ``"cache"`` (an earlier run's
        choice, nothing timed), ``"checkpoint"`` (a resumed run's); ``medians_s``: the timed calls' medians
        (this run's, or the cached ones).
        """
        return {
            "executor": self.executor_name,
            "requested": self.requested_executor,
            "source": self.executor_source,
            "from_cache": self.executor_source == "cache",
            "cache_key": self.calibration_key,
            "cache_file": None if self.executor_cache is None else str(self.executor_cache.path),
            "medians_s": dict(self.calibration),
            "errors": dict(self.calibration_errors),
        }

    def compute_model_info(self) -> dict[str, Any]:
        """The clock's compute model in plain data: ``kind`` and, for ``"flops"``, the FLOPs of one worker's
        step (first batch shape counted), the throughput and the resulting seconds, and the fallback in use
        (``None`` unless the model could not be counted)."""
        cm = self.clock.compute
        info: dict[str, Any] = {"kind": self.clock.compute_kind}
        if isinstance(cm, FlopCompute):
            counted = [(sig, f) for sig, f in self._flops.items()]
            flops = counted[0][1] if counted else None
            info.update({
                "flops_per_worker_step": flops,
                "batch_shape": list(counted[0][0][0]) if counted else None,
                "gflops": cm.gflops,
                "seconds_per_worker_step": None if flops is None else float(cm.seconds(flops)),
                "fallback": None if self.flops_error is None else {"reason": self.flops_error,
                                                                   "uses": cm.fallback_name()},
            })
        elif cm is not None:
            info.update({"mean_s": cm.mean_s, "spread": cm.spread})
        return info

    def _choose_executor(self, batches: Sequence[Batch | None], rows: list[int] | None) -> None:
        """``executor="auto"``: the cached choice of this workload if there is one, else time both (and store)."""
        cache = self.executor_cache
        if cache is None:
            self._calibrate(batches, rows)
            return
        model = model_fingerprint(self.template, self.layout.param_shapes, self.layout.buffer_shapes)
        key, workload = cache_key(model=model, workers=self.m, batches=batches, dtype=self.dtype, device=self.device,
                                  loss_fn=self.loss_fn, machine=machine_fingerprint(self.device))
        self.calibration_key = key
        entry = cache.lookup(key)
        if entry is not None and self._use_cached(entry):
            return
        self._calibrate(batches, rows)
        kept = cache.store(key, {"executor": self.executor_name, "medians_s": dict(self.calibration),
                                 "errors": dict(self.calibration_errors), "workload": workload})
        if kept.get("executor") != self.executor_name:  # a concurrent run of this workload stored first
            self._use_cached(kept)

    def _use_cached(self, entry: dict[str, Any]) -> bool:
        """Adopt a cache entry's executor (``False``, with a warning, if it cannot be built here)."""
        name = str(entry["executor"])
        try:
            ex = self._get_executor(name)
        except Exception as exc:
            self._executors.pop(name, None)
            warnings.warn(f"coopsgd: the executor cache names {name!r} for this workload but it cannot be built "
                          f"({type(exc).__name__}: {exc}); timing the executors again", RuntimeWarning, stacklevel=4)
            return False
        for other in list(self._executors):
            if other != name:
                del self._executors[other]
        self._executor, self.executor_name = ex, name
        self.calibration = {str(k): float(v) for k, v in dict(entry.get("medians_s") or {}).items()}
        self.calibration_errors = {str(k): str(v) for k, v in dict(entry.get("errors") or {}).items()}
        self.executor_source = "cache"
        return True

    def _step_flops(self, batches: Sequence[Batch | None]) -> np.ndarray | None:
        """Each worker's FLOPs for this step (0 for a worker without a batch); ``None`` if not countable."""
        out = np.zeros(self.m)
        for i, b in enumerate(batches):
            if b is None:
                continue
            x, y = b
            sig = (tuple(x.shape), str(x.dtype), tuple(y.shape), str(y.dtype))
            if sig not in self._flops:
                self._flops[sig] = self._count_flops(b)
            f = self._flops[sig]
            if f is None:
                return None
            out[i] = f
        return out

    def _count_flops(self, batch: Batch) -> int | None:
        """FLOPs of one worker's forward + backward (model and loss) on ``batch``, by ``FlopCounterMode``.

        Counted on a copy of worker 0 in train mode, with torch's RNG restored afterwards; the state is not
        touched. A model that cannot be counted (an error, or no counted FLOPs) gives ``None`` and a warning
        naming the fallback the clock uses instead.
        """
        from torch.utils.flop_counter import FlopCounterMode

        try:
            module = self.worker_model(0).train()
            counter = FlopCounterMode(display=False)
            with self._rng_guard(), torch.enable_grad(), counter:
                loss = self.loss_fn(module(batch[0]), batch[1])
                loss.backward()
            flops = int(counter.get_total_flops())
            if flops <= 0:
                raise ValueError("FlopCounterMode counted no FLOPs (no matrix product or convolution)")
        except Exception as exc:
            self.flops_error = f"{type(exc).__name__}: {exc}"
            cm = self.clock.compute
            uses = cm.fallback_name() if isinstance(cm, FlopCompute) else "the clock's fallback"
            msg = (f"coopsgd: cannot count the FLOPs of {type(self.template).__name__} on a batch of shape "
                   f"{tuple(batch[0].shape)} ({self.flops_error}); the simulated compute time falls back to {uses}")
            log.warning("%s", msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
            return None
        return flops

    def _calibrate(self, batches: Sequence[Batch | None], rows: list[int] | None) -> None:
        """Time each executor on the first real batches (state is not advanced) and keep the faster.

        Each executor gets one warm-up call, then timed calls interleaved (loop, vmap, loop, ...) so that
        machine drift affects both alike: at least ``calibration_steps`` rounds, then more only while the
        choice is open -- it stops as soon as every timed call of one executor was faster than every call
        of the other and the medians differ by more than 10%, or the medians are within 3% (either choice
        is then as good), and at the latest after 0.25 s of timing or 20 rounds. A clear case costs two
        warm-up and two timed calls, about four steps of a run. The timed call includes the step's gradient finiteness pass, which the
        loop executor fuses into its loop. Medians are kept in :attr:`calibration`. Torch's RNG is restored
        afterwards, so a run that times the executors and one that reads the choice from the cache draw
        the same dropout masks.
        """
        with self._rng_guard():
            self._time_executors(batches, rows)
        self.executor_source = "calibrated"

    def _time_executors(self, batches: Sequence[Batch | None], rows: list[int] | None) -> None:
        # every call starts from the step's RNG state, so each computes exactly what the step itself would:
        # the chosen executor's last result is kept for the step (see _reuse_calibration)
        rng0 = self._rng_state()
        last: dict[str, tuple[ComputeResult, Any]] = {}

        def call(name: str) -> None:
            self._set_rng_state(rng0)
            res = self._executors[name].compute(batches, rows)
            if res.grad_absmax is None:  # the step's finiteness pass, which the loop executor fuses
                absmax(res.grads)
            synchronize(self.device)
            last[name] = (res, self._rng_state())

        ready: list[str] = []
        for name in EXECUTORS:
            try:
                self._get_executor(name)
                call(name)  # warm-up (vmap sets up its transforms; a process's first backward its engine)
                ready.append(name)
            except Exception as exc:  # an executor the model does not support (e.g. an op without vmap rule)
                if name == "loop":
                    raise
                self.calibration_errors[name] = f"{type(exc).__name__}: {exc}"
                self._executors.pop(name, None)
        times: dict[str, list[float]] = {name: [] for name in ready}
        start = time.perf_counter()
        rounds = 0
        while True:
            rounds += 1
            for name in ready:
                t0 = time.perf_counter()
                call(name)
                times[name].append(time.perf_counter() - t0)
            if rounds >= self.calibration_steps and _choice_settled(times):
                break
            if rounds >= 20 or time.perf_counter() - start >= 0.25:
                break
        self.calibration = {name: statistics.median(ts) for name, ts in times.items()}
        best = min(self.calibration, key=self.calibration.__getitem__)
        for name in list(self._executors):
            if name != best:
                del self._executors[name]  # free the other executor's replicas / gradient rows
        self._executor = self._executors[best]
        self.executor_name = best
        res, rng_after = last[best]
        # the loop executor returns its scratch buffers, which an evaluation before the step overwrites
        if res.buffers is not None:
            res.buffers = res.buffers.clone()
        res.others = {n: v.clone() for n, v in res.others.items()}
        self._calibrated = (self._compute_key(batches, rows), rng0, res, rng_after)

    def _rng_state(self) -> tuple[Tensor, ...]:
        """Torch's RNG states: the CPU generator's, plus the state device's on an accelerator."""
        if self.device.type == "cpu":
            return (torch.get_rng_state(),)
        return (torch.get_rng_state(), torch.get_device_module(self.device.type).get_rng_state(self.device))

    def _set_rng_state(self, state: tuple[Tensor, ...]) -> None:
        torch.set_rng_state(state[0])
        if len(state) > 1:
            torch.get_device_module(self.device.type).set_rng_state(state[1], self.device)

    def _compute_key(self, batches: Sequence[Batch | None], rows: list[int] | None) -> tuple[Any, ...]:
        """What one executor call reads, to tell whether a calibration result is still the step's: the step,
        the active rows, the state's and integer buffers' version counters (bumped by every in-place write,
        also through views) and the batches (tensors, compared by value in :meth:`_reuse_calibration`)."""
        versions = (self._state._version, *(t._version for t in self.other_buffers.values()))
        return (self.step_count, None if rows is None else tuple(rows), versions, list(batches))

    def _reuse_calibration(self, batches: Sequence[Batch | None], rows: list[int] | None) -> ComputeResult | None:
        """The chosen executor's last calibration call if it computed exactly this step (same step, rows,
        unchanged state, equal batches, same RNG state): the step then does not compute it again, and
        torch's RNG moves on as after that call. ``None`` otherwise (the step computes)."""
        kept, self._calibrated = self._calibrated, None
        if kept is None:
            return None
        key, rng0, res, rng_after = kept
        step, krows, versions, kbatches = self._compute_key(batches, rows)
        if (step, krows, versions) != key[:3]:
            return None
        for a, b in zip(kbatches, key[3], strict=True):
            if a is b:
                continue
            if a is None or b is None or not all(torch.equal(u, v) for u, v in zip(a, b, strict=True)):
                return None
        if not all(torch.equal(a, b) for a, b in zip(self._rng_state(), rng0, strict=True)):
            return None
        self._set_rng_state(rng_after)
        return res

    def _measured(self, res: ComputeResult) -> np.ndarray:
        out = np.zeros(self.m)
        if res.rows is None:
            out[:] = res.times
        else:
            out[res.rows] = res.times
        return out

    def _load_executor(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint's executor and calibration medians (a resumed run computes as the first did)."""
        name = state["executor"]
        if name in EXECUTORS:
            self._executor = self._get_executor(name)
            for other in list(self._executors):
                if other != name:
                    del self._executors[other]
            if self.requested_executor == "auto" or name != self.requested_executor:
                self.executor_source = "checkpoint"
            self.executor_name = name
        self.calibration = dict(state.get("calibration", {}))
