"""One-process simulator: m workers (+ v auxiliary nodes) of any ``nn.Module`` on stacked state.

State ([CSGD] §3, rows are nodes: workers 0..m-1, then auxiliaries m..m+v-1) lives in ONE tensor whose
columns are ``[float buffers (b) | parameters (d) | inner-optimizer state fields (d each: SGD's momentum
with momentum > 0; Adam's exp_avg, exp_avg_sq[, max_exp_avg_sq])]``; the public views are
:attr:`Simulator.params` (n, d), :attr:`Simulator.buffers` (n, b), :attr:`Simulator.momentum` and
:attr:`Simulator.optimizer_state` (every field by name).
Integer buffers (BatchNorm's ``num_batches_tracked``) are kept per name in :attr:`Simulator.other_buffers`
and never mixed. One step ``k`` with learning rate ``lr`` does exactly what
:class:`coopsgd.engines.reference.ReferenceEngine` does:

1. ``mask = spec.schedule.active(k)``; the active workers compute stochastic gradients G on their own
   batch at the current parameters (inactive workers and auxiliaries: zero; their optimizer state is
   untouched). An *executor* does this (:mod:`coopsgd.engines.executors`: a loop over replica modules
   holding views into the rows, or ``torch.func.vmap``; ``"auto"`` times both on the first batches, or
   reads the choice an earlier run made from an :class:`~coopsgd.engines.simulator.calibration.ExecutorCache`).
2. LSGD (``spec.leader``): per-worker loss estimates for the leader election: ``"batch"`` (this step's
   mini-batch loss), ``"running_mean"`` (mean of the last ``window`` mini-batch losses, this one included)
   or ``"probe"`` (loss on a fixed probe batch at the current parameters, eval mode).
3. ``mix = spec.schedule.mix(k, MixContext(k, lr, losses))`` (``None``: identity, no communication).
4. Direction D: G, or torch.optim.SGD's momentum / Nesterov / weight-decay direction, or the step of
   another inner optimizer (Adam, AdamW, any torch.optim class; :mod:`coopsgd.engines.optim`).
   ``post_mix``: ``X <- (X - lr D) S``; ``pre_mix``: ``X <- X S - lr D``. An outer round of a spec with
   an outer optimizer (DiLoCo, SlowMo, the federated server optimizers) then moves z by its own optimizer and
   restarts the workers from it. FedProx (``spec.prox`` = mu) adds ``mu (x_i - z)`` to the active workers'
   gradients first (z, the server row, is the model they received at their last round).
   The mixing is ONE matrix product over a contiguous column range of the stacked state
   (:func:`coopsgd.engines.mixing.apply_mixing`) -- never a loop over workers or parameters.
5. Policies (:class:`coopsgd.algorithms.spec.Policies`), applied at every mix:

   * buffers ``"mix"``: the float buffers *after* this step's forward pass are mixed with the same S (in
     both rules: buffers have no gradient step to order against); ``"local"``: each node keeps its own;
   * optimizer state ``"local"``: untouched; ``"reset"``: every state field is zeroed (and Adam's step
     counts restart) after each communicating round; ``"mix"``: the state fields after this step's update
     are mixed with S, the auxiliaries counting as zero state (their rows are zeroed again after the mix);
     step counts stay each worker's own.

   The columns are ordered so that every policy combination is one contiguous range: buffers+params,
   params, params+momentum or all three.

   A spec with compression (``spec.compressed``, SPEC §11) sends its rounds through
   :class:`~coopsgd.engines.compressed.CompressedRounds` (averaging rounds: Q(x_i − x_ref + e_i) with error
   feedback; gossip rounds: CHOCO-SGD; elastic rounds: uploads against the centres' public copies and the
   centres' replies); its per-node state is checkpointed (``"compression"``) and rolled
   back with the rows, and the clock charges the payloads' bytes.
6. NaN/Inf in a loss, a gradient, a buffer or the new parameters raises
   :class:`~coopsgd.engines.reference.NonFiniteError` naming the worker and the step, before any state is
   modified. Updates are done in place (no extra full copy of the state per step) when a cheap running
   bound proves that no value can overflow; otherwise the step is computed on a copy and checked first.

Timing: a :class:`~coopsgd.engines.simulator.clock.SimClock` keeps simulated per-worker clocks; see
:mod:`coopsgd.engines.simulator.clock`. The default clock (no ``clock`` argument) charges each step its counted FLOPs
at :data:`~coopsgd.engines.simulator.clock.DEFAULT_GFLOPS` (:class:`~coopsgd.engines.simulator.clock.FlopCompute`, falling back
to the measured time, with a warning, for a model FlopCounterMode cannot count) over the default network,
so that simulated times do not follow the machine's load; pass ``SimClock(compute=None)`` for measured
compute time.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.algorithms.asynchronous import bind_arrival_time, bind_speeds
from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.algorithms.schedules import Mix, MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.asynchronous import ArrivalReport, AsyncServer, start_rows
from coopsgd.engines.base import (
    DroppedRound,
    NonFiniteError,
    StepStats,
    unwrap_state,
    wrap_state,
)
from coopsgd.engines.compressed import CompressedRounds, load_compression_state
from coopsgd.engines.executors import EXECUTORS, ComputeResult
from coopsgd.engines.fragments import fragment_costs, simulator_stages
from coopsgd.engines.health import absmax, diverged, step_bound
from coopsgd.engines.kernel import InProcess, RoundKernel, mix_columns
from coopsgd.engines.mixing import Round, RoundKind, plan_round
from coopsgd.engines.optim import SGDOptions, TorchOptimizer, optimizer_settings
from coopsgd.engines.reference import consensus_distance
from coopsgd.engines.rows import LOSS_ESTIMATES
from coopsgd.engines.simulator.asynchronous import AsyncArrivals
from coopsgd.engines.simulator.calibration import ExecutorCache
from coopsgd.engines.simulator.clock import FlopCompute, SimClock, round_senders
from coopsgd.engines.simulator.compute import SimulatorCompute
from coopsgd.errors import ConfigError, check_float, check_int

__all__ = ["Simulator", "SimStepStats", "LOSS_ESTIMATES"]

log = logging.getLogger(__name__)

#: The simulator's step record is the engines' common one.
SimStepStats = StepStats


_DOWNPOUR_ORDERS = ("schedule", "clock")
_STATE_VERSION = 2  # 2: the schedule's run state ("schedule_state") replaces "schedule"/"schedule_rounds"

Batch = tuple[Tensor, Tensor]


class Simulator(AsyncArrivals, SimulatorCompute):
    """Runs an :class:`AlgorithmSpec` on m simulated workers of a PyTorch model, in one process.

    Args:
        spec: the algorithm (any preset or custom spec).
        model: an ``nn.Module`` (its current parameters are the common start) or a zero-argument factory
            (called under ``torch.manual_seed(seed)``; the global RNG is restored afterwards).
        loss_fn: ``loss_fn(output, target) -> scalar`` (default cross-entropy).
        optimizer: every worker's inner optimizer, one value
            (:class:`~coopsgd.algorithms.inner.OptimizerSettings`: name and settings), or for convenience a name
            (``"sgd"``, ``"adam"``, ``"adamw"``) or any ``torch.optim.Optimizer`` class (one instance per
            worker: slower, see :class:`~coopsgd.engines.optim.TorchOptimizer`); ``None``: the spec's
            ``inner_optimizer``, else SGD.
        **optimizer_options: with a name, class or ``None``, its settings one by one (``momentum``,
            ``nesterov``, ``weight_decay``, ``betas``, ``eps``, ``amsgrad``; a class's ``optimizer_kwargs``):
            see :func:`~coopsgd.engines.optim.optimizer_settings`.
        executor: ``"auto"`` (time both on the first batches and keep the faster, or read the choice from
            ``executor_cache``), ``"loop"`` or ``"vmap"``.
        dtype, device: of the stacked state (float64 for exact comparisons with the reference engine).
        seed: seed of the model factory.
        loss_estimate: LSGD's loss estimate, one of :data:`LOSS_ESTIMATES`.
        window: length of the running mean.
        probe_batch: ``(x, y)`` for ``loss_estimate="probe"``.
        clock: simulated clock (default ``SimClock(compute=FlopCompute())``: counted FLOPs at
            :data:`~coopsgd.engines.simulator.clock.DEFAULT_GFLOPS`, default network; see the module docstring).
        downpour_order: DOWNPOUR's push order: ``"schedule"`` (seeded, as the reference engine) or
            ``"clock"`` (workers in the order they finish the round on the simulated clock).
        init_params: optional start, (d,) common or (m, d) per worker (auxiliaries start at the mean).
        calibration_steps: minimum timed calls per executor for ``executor="auto"`` (see :meth:`_calibrate`;
            more are made only while the choice is open).
        executor_cache: where ``executor="auto"`` keeps its choice per workload and machine
            (:class:`~coopsgd.engines.simulator.calibration.ExecutorCache`): the first run times both executors and
            stores the choice, later runs read it and time nothing, so they compute the same numbers.
            ``None`` (default): time in every run. :func:`coopsgd.train.trainer.build` passes the default
            cache.
        nan_policy: ``"stop"`` or ``"skip"`` (see :class:`coopsgd.engines.base.Engine`; the loop calls
            :meth:`check_health`).
    """

    name = "simulate"

    def __init__(
        self,
        spec: AlgorithmSpec,
        model: nn.Module | Callable[[], nn.Module],
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        executor: str = "auto",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        loss_estimate: str = "running_mean",
        window: int = 10,
        probe_batch: Batch | None = None,
        clock: SimClock | None = None,
        downpour_order: str = "schedule",
        init_params: Tensor | np.ndarray | None = None,
        calibration_steps: int = 1,
        nan_policy: str = "stop",
        executor_cache: ExecutorCache | None = None,
        optimizer: OptimizerSettings | str | type | None = None,
        **optimizer_options: Any,
    ) -> None:
        if executor not in ("auto", *EXECUTORS):
            raise ConfigError.invalid("executor", executor, "choose one of auto, loop, vmap")
        if downpour_order not in _DOWNPOUR_ORDERS:
            raise ConfigError.invalid("downpour_order", downpour_order, "choose one of schedule, clock")
        if clock is not None and not isinstance(clock, SimClock):
            raise ConfigError.invalid("clock", clock, "must be a SimClock or None")
        if executor_cache is not None and not isinstance(executor_cache, ExecutorCache):
            raise ConfigError.invalid("executor_cache", executor_cache, "must be an ExecutorCache or None")
        workers = spec.workers if isinstance(spec, AlgorithmSpec) else 0
        if workers and spec.asynchronous is not None:  # the arrival order comes from this clock's speed classes
            spec = bind_speeds(spec, None if clock is None else clock.speeds)
        super().__init__(spec, model, workers_held=range(workers), aux_rows=spec.auxiliaries if workers else 0,
                         loss_fn=loss_fn, dtype=dtype, device=device, seed=seed, loss_estimate=loss_estimate, window=window,
                         nan_policy=nan_policy, init_params=init_params, probe_batch=probe_batch,
                         optimizer=optimizer_settings(optimizer, **optimizer_options))
        if downpour_order == "clock" and not spec.schedule.sequential:
            raise ConfigError.invalid("downpour_order", downpour_order,
                                      "'clock' needs a schedule whose rounds are sequential pushes (DOWNPOUR)")
        self.downpour_order = downpour_order
        m, d, b = self.m, self.d, self.b
        self._check_initial_state()
        self._drop_template_storage()
        self._compressed = self._compression_stage()
        # Streaming DiLoCo: a compression stage per fragment (from the one stage's start) replaces the one stage
        self._fragments = simulator_stages(spec, self.layout, mix_columns(spec, b, d, self.opts), b, self._compressed,
                                           nodes=self.n, workers=m, seed=self.seed)
        if self._fragments is not None:
            self._compressed = None
        # FedAvg's unread broadcasts wait (not when a compressor reads the workers; an outer optimizer's step moves
        # the deferred value: RoundKernel.outer_round). Not under pre_mix: the gradient step after the round
        # writes into the rows, and a deferred value would later overwrite it (LSGD's rounds)
        lazy = self._compressed is None and spec.rule == "post_mix"
        self._comm = InProcess(lazy_rows=m if lazy else 0)
        self._kernel = RoundKernel(spec, self.opts, b, d, m, self._comm, outer=self.outer, compressed=self._compressed,
                                   param_sizes=tuple(math.prod(s) for s in self.layout.param_shapes),
                                   fragment_stages=None if self._fragments is None else self._fragments.stages)
        # simulated attackers send models no running bound covers (Gaussian noise): their rounds are checked as
        # a server optimizer's are (the robust rules themselves stay inside the range of what they receive)
        self._attacked = spec.robust is not None and spec.robust.byzantine_count > 0
        self._async = None if spec.asynchronous is None else AsyncServer(
            spec.asynchronous, self.rows_params[start_rows(spec.schedule)],
            lambda: torch.zeros(d, dtype=dtype, device=self.device))
        self._arrival_bound = False  # the asynchronous timeline's arrival time, from this clock (_bind_arrival)
        self._bound = self._absmax()
        # nan_policy="skip": what went non-finite since the last good round, and that round's state
        self._bad: dict[str, Any] | None = None
        self._good: dict[str, Any] | None = None
        self._good_step = 0

        # -- estimates, executors, clock -------------------------------------------------------------
        self.bytes_sent = 0.0  # the alpha-beta model's bytes of every round so far
        self.peak_bytes = 0.0  # the most bytes of the rounds of one step so far (peak_bytes_per_step)
        self._hist = np.full((self.window, m), np.nan)
        self._hist_count = np.zeros(m, dtype=np.int64)
        self._init_compute(executor, executor_cache, calibration_steps)
        self.clock = clock if clock is not None else SimClock(compute=FlopCompute())
        self.clock.bind(m, d, torch.empty((), dtype=dtype).element_size())
        if self._async is not None and not self.clock.counts_flops:  # a stated compute time: bound now
            self._bind_arrival(None)

    # ------------------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------------------
    def _drop_template_storage(self) -> None:
        """Give the template no parameter storage of its own (only the stacked state holds parameters).

        The template is only ever *read* for its structure: the vmap executor passes every parameter and
        buffer explicitly to ``functional_call``; replicas and exported models are deep copies whose
        parameters are supplied through the deepcopy memo.
        """
        with torch.no_grad():
            for p in self.template.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def _compression_stage(self) -> CompressedRounds | None:
        """The compressed rounds of ``spec.compressed`` (``None`` without: the uncompressed path, unchanged). A
        node sends the columns a round mixes; their tensor shapes (buffers, parameters, state fields) are the
        layout PowerSGD reads; x_ref starts at the common start (the workers' mean for per-worker starts)."""
        comp = self.spec.compressed
        if comp is None:
            return None
        lo, hi = mix_columns(self.spec, self.b, self.d, self.opts)
        params = [tuple(s) for s in self.layout.param_shapes]
        layout = ([tuple(s) for s in self.layout.buffer_shapes] if lo == 0 else []) + params
        layout += params * ((hi - self.b - self.d) // self.d if self.d else 0)
        rows = self._state[: self.m, lo:hi]
        start = rows.mean(dim=0) if self.per_worker_start else rows[0]
        return CompressedRounds(comp, nodes=self.n, workers=self.m, width=hi - lo, dtype=self.dtype,
                                device=self.device, seed=self.seed, layout=layout, start=start)

    # ------------------------------------------------------------------------------------------------
    # views
    # ------------------------------------------------------------------------------------------------
    # (m+v, d) parameters, (m+v, b) float buffers and (m+v, d) momentum (or ``None``), one row per node:
    # views into the stacked state (rows a FedAvg round left deferred are written first)
    @property
    def params(self) -> Tensor:
        """(m+v, d) parameters, one row per node (a view into the stacked state)."""
        self._materialize()
        return self.rows_params

    @property
    def buffers(self) -> Tensor:
        """(m+v, b) float buffers, one row per node (a view)."""
        self._materialize()
        return self.rows_buffers

    @property
    def momentum(self) -> Tensor | None:
        """(m+v, d) SGD momentum (auxiliaries: zero), or ``None`` without momentum (a view)."""
        self._materialize()
        return self.rows_momentum

    @property
    def control(self) -> Tensor | None:
        """(m+v, d) SCAFFOLD control variates (workers: c_i; the server row: c), ``None`` without (a view)."""
        return self.rows_control

    @property
    def optimizer_state(self) -> dict[str, Tensor]:
        """Every inner-optimizer state field by torch's name, each (m+v, d) (auxiliaries: zero; views)."""
        self._materialize()
        return self.rows_optimizer_state

    def _materialize(self, which: list[int] | None = None) -> None:
        """Write a deferred FedAvg broadcast into the rows ``which`` (``None``: every deferred row)."""
        if self._comm.deferred is not None:
            lo, hi = self._kernel.cols
            self._comm.materialize(self._state[:, lo:hi], which)

    @property
    def local_workers(self) -> range:
        """Every worker runs in this process."""
        return range(self.m)

    @property
    def is_writer(self) -> bool:
        return True

    def center_node(self) -> int | None:
        """The centre model's node (:meth:`AlgorithmSpec.center_node`), ``None`` for the workers' average."""
        return self._center_row()

    def reduce_losses(self, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-worker loss sums and counts over every process (all workers are here: unchanged)."""
        return np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)

    def time_record(self, *, local: bool = False) -> dict[str, Any]:
        """Bytes and time so far, in the metric schema's names: the simulated clock (nothing is measured)."""
        c = self.clock
        return {"bytes_sent": float(self.bytes_sent), "peak_bytes_per_step": float(self.peak_bytes),
                "simulated_time_s": float(c.elapsed),
                "simulated_compute_s": float(c.compute_s), "simulated_communication_s": float(c.communication_s),
                "simulated_idle_s": float(c.idle_s), "measured_compute_s": None, "measured_communication_s": None}

    def average_params(self) -> Tensor:
        """u_k = X_k 1/(m+v): the mean over all m+v nodes ([CSGD] eq. (13))."""
        return self.params.mean(dim=0)

    def average_model(self) -> nn.Module:
        """A new module (eval mode) holding u_k, with the buffers averaged over all nodes likewise."""
        others = {k: v[0] for k, v in self.other_buffers.items()}
        return self._export(self.average_params(), self.buffers.mean(dim=0), others)

    def _center_row(self) -> int | None:
        """Row of the centre model (:meth:`AlgorithmSpec.center_node`), or ``None`` for the workers' average."""
        spec = self.spec
        estimates = None
        if spec.center == "leader" and self.leader is None:
            if self._probe is not None:
                self._materialize()
                estimates = self._evaluator().evaluate(self._probe).to("cpu", torch.float64).numpy()
            elif self._hist_count.any():
                with np.errstate(all="ignore"):
                    estimates = np.nanmean(self._hist, axis=0)
        return spec.center_node(self.leader, estimates)

    def center_params(self) -> Tensor:
        """The model to evaluate: the workers' average, auxiliary node 0, or the current (global) leader."""
        row = self._center_row()
        if row is None:
            return self.params[: self.m].mean(dim=0)
        return self.params[row].clone()

    def center_model(self) -> nn.Module:
        """A new module (eval mode) holding the centre parameters and buffers (averaged for ``"average"``)."""
        row = self._center_row()
        if row is None:
            p = self.params[: self.m].mean(dim=0)
            bufs = self.buffers[: self.m].mean(dim=0)
            others = {k: v[0] for k, v in self.other_buffers.items()}
        else:
            p, bufs = self.params[row], self.buffers[row]
            others = {k: v[row] for k, v in self.other_buffers.items()}
        return self._export(p, bufs, others)

    def _export(self, params: Tensor, buffers: Tensor, others: dict[str, Tensor]) -> nn.Module:
        """A new module (eval mode) holding copies of the given flat rows."""
        lay = self.layout
        t_params = dict(self.template.named_parameters())
        memo: dict[int, Any] = {}
        for name, val, trainable in zip(lay.param_names, lay.split_params(params), lay.trainable, strict=True):
            memo[id(t_params[name])] = nn.Parameter(val.detach().clone(), requires_grad=trainable)
        module = copy.deepcopy(self.template, memo)
        return lay.load_into(module, params, buffers, others).eval()

    def worker_model(self, i: int) -> nn.Module:
        """A new module (eval mode) holding node ``i``'s parameters and buffers (workers, then auxiliaries)."""
        i = check_int("i", i, minimum=0, maximum=self.n - 1)
        others = {k: v[i] for k, v in self.other_buffers.items()}
        return self._export(self.params[i], self.buffers[i], others)

    def consensus_distance(self) -> float:
        """||X (I - J)||_F^2 / m over all m+v nodes (as :func:`coopsgd.engines.reference.consensus_distance`)."""
        return consensus_distance(self.params.detach().to("cpu", torch.float64).numpy(), self.m)

    # ------------------------------------------------------------------------------------------------
    # executors
    # ------------------------------------------------------------------------------------------------
    def prepare(self, batches: Sequence[Batch | None]) -> None:
        """Make the one-time choices of the next step now, on its batches (the state is not advanced).

        ``executor="auto"``: choose the executor (from :attr:`executor_cache`, or by timing both); a
        :class:`~coopsgd.engines.simulator.clock.FlopCompute` clock: count the FLOPs of one worker's step. :meth:`step`
        does both lazily; a runner calls this first to record the choices before training
        (:meth:`executor_info`, :meth:`compute_model_info`).
        """
        mask = self.spec.schedule.active(self.step_count)
        rows = None if mask is None or bool(np.all(mask)) else np.flatnonzero(mask).tolist()
        checked = self._check_batches(batches, rows)
        self._materialize()
        if self._executor is None:
            self._choose_executor(checked, rows)
        if self.clock.counts_flops:
            self._bind_arrival(self._step_flops(checked))

    # ------------------------------------------------------------------------------------------------
    # stepping
    # ------------------------------------------------------------------------------------------------
    def _check_batches(self, batches: Sequence[Any], rows: list[int] | None) -> list[Batch | None]:
        if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or len(batches) != self.m:
            got = len(batches) if isinstance(batches, Sequence) else type(batches).__name__
            raise ConfigError.invalid("batches", got, f"need one (x, y) batch per worker ({self.m} entries)")
        active = range(self.m) if rows is None else rows
        out: list[Batch | None] = [None] * self.m
        for i in active:
            if batches[i] is None:
                raise ConfigError.invalid(f"batches[{i}]", None, f"worker {i} is active at step {self.step_count}")
            out[i] = self._to_batch(batches[i], f"batches[{i}]")
        return out

    def _nonfinite(self, bad: Tensor | np.ndarray, idx: list[int], step: int, what: str) -> NonFiniteError:
        """The error naming the first non-finite row among ``idx`` (``bad`` flags them) and every bad worker."""
        flagged = np.flatnonzero(np.asarray(bad))
        node = idx[int(flagged[0])]
        return diverged(what, node, step, auxiliary=node >= self.m,
                        workers=sorted({int(idx[int(j)]) for j in flagged if idx[int(j)] < self.m}))

    def _found(self, k: int, exc: NonFiniteError) -> None:
        """A non-finite value at step ``k``: ``nan_policy="stop"`` raises it; ``"skip"`` marks the round as
        bad (the workers stop updating until :meth:`check_health` drops it)."""
        if self.nan_policy == "stop":
            raise exc
        if self._bad is None:
            self._bad = {"step": k, "workers": {}}
        for w in exc.workers:
            self._bad["workers"].setdefault(str(w), k)
        log.warning("step %d: %s; the round will be dropped (nan_policy=skip)", k, exc)

    def _absmax(self) -> float:
        value = self._comm.deferred_value()
        return absmax(self._state) if value is None else max(absmax(self._state), absmax(value))

    def _estimates(self, losses: np.ndarray, probe: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """LSGD loss estimates and the updated running-mean history (committed only after the step)."""
        hist, count = self._hist.copy(), self._hist_count.copy()
        active = np.isfinite(losses)
        pos = count % self.window
        cols = np.flatnonzero(active)
        hist[pos[cols], cols] = losses[cols]
        count[cols] += 1
        if self.loss_estimate == "probe":
            assert probe is not None
            est = probe
        elif self.loss_estimate == "batch":
            est = losses
        else:
            with np.errstate(all="ignore"):
                est = np.nanmean(hist, axis=0)
        return np.asarray(est, dtype=np.float64), hist, count

    def step(self, batches: Sequence[Batch | None] | None, lr: float) -> StepStats:
        """Take one step of the algorithm: one batch per worker (``None`` for inactive workers).

        In order: the active workers' gradients (none while a round is marked bad), LSGD's estimates, the
        step's compute time on the clock (:meth:`~coopsgd.engines.simulator.clock.SimClock.compute_tick`, committed
        only after the update), the schedule's round, the update and the round; then the bookkeeping.
        """
        spec, m, k = self.spec, self.m, self.step_count
        lr = check_float("lr", lr, low=0.0)
        mask = spec.schedule.active(k)
        rows = None if mask is None or bool(np.all(mask)) else np.flatnonzero(mask).tolist()
        idx = list(range(m)) if rows is None else rows
        if batches is None:
            raise ConfigError.invalid("batches", None, f"need one (x, y) batch per worker ({self.m} entries)")
        batches = self._check_batches(batches, rows)
        if self._comm.deferred is not None:  # the rows this step reads hold their values (FedAvg sampling)
            self._materialize(None if spec.needs_losses and self.loss_estimate == "probe" else idx)
        if self._executor is None and rows != []:
            self._choose_executor(batches, rows)
        flops = self._step_flops(batches) if self.clock.counts_flops else None
        if not self._arrival_bound:
            self._bind_arrival(flops)
            spec = self.spec
        losses = np.full(m, np.nan)
        with torch.no_grad():
            probe = self._probe_losses(k) if spec.needs_losses and self.loss_estimate == "probe" else None
            got = self._gradients(batches, rows, idx, k, losses) if self._bad is None else None
            est, hist, count = (None, self._hist, self._hist_count)
            if spec.needs_losses:
                est, hist, count = self._estimates(losses, probe)
            tick = self.clock.compute_tick(mask, self._measured(got[0]) if got is not None else np.zeros(m),
                                           flops=flops)
            order = np.argsort(self.clock.t + tick.dt, kind="stable") if self.downpour_order == "clock" else None
            mix, sched_state = spec.schedule.advance(k, MixContext(step=k, lr=lr, losses=est, order=order),
                                                     self.schedule_state)
            if mix is not None and order is not None:
                mix.info["order_source"] = "clock"
            if got is not None:
                err = self._update(got[0], mix, lr, rows, got[1], got[2], k)
                if err is not None:
                    self._found(k, err)
                    got = None
            arrived = None if got is None or self._async is None else self._arrivals(k)
            if self._async is not None and arrived is None:  # dropped: the slots still pass on (pulls only)
                self._pull_only(range(k, k + 1))
        before = (self.clock.compute_s, self.clock.communication_s, self.clock.idle_s)
        self.clock.commit(tick)
        self.schedule_state = sched_state
        self._hist, self._hist_count = hist, count
        if self._async is not None:  # a skipped step's arrivals still end its slots' rounds (nothing is applied)
            return self._record_arrivals(k, lr, losses, arrived or ArrivalReport(), before, skipped=arrived is None)
        return self._record(k, lr, losses, mix, est, skipped=got is None, before=before)

    def _probe_losses(self, k: int) -> np.ndarray | None:
        """LSGD's probe losses of every worker (``None`` after a non-finite one under ``"skip"``)."""
        assert self._probe is not None and self._executor is not None
        pl = self._executor.evaluate(self._probe).to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(pl)):
            self._found(k, self._nonfinite(~np.isfinite(pl), list(range(self.m)), k, "probe loss"))
        return pl

    def _gradients(self, batches: Sequence[Batch | None], rows: list[int] | None, idx: list[int], k: int,
                   losses: np.ndarray) -> tuple[ComputeResult, float, float] | None:
        """The active workers' gradients with their largest |gradient| and |buffer|, their losses written into
        ``losses``; ``None`` when a value was non-finite (under ``"skip"``; ``"stop"`` raises)."""
        if self._bad is not None:
            return None
        if rows == []:  # no client works in this step (uneven local work: all finished): the round still runs
            return ComputeResult([], self._state.new_zeros((0, self._kernel.d)), self._state.new_zeros(0), None, {},
                                 np.zeros(0)), 0.0, 0.0
        res = self._reuse_calibration(batches, rows) if self._calibrated is not None else None
        if res is None:
            assert self._executor is not None
            with torch.enable_grad():  # the gradients themselves (the rest of the step is no_grad)
                res = self._executor.compute(batches, rows)
        batch_losses = res.losses.to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(batch_losses)):
            self._found(k, self._nonfinite(~np.isfinite(batch_losses), idx, k, "loss"))
            return None
        if res.grad_absmax is not None:
            gmax = float(res.grad_absmax.max(initial=0.0)) if not np.isnan(res.grad_absmax).any() else math.nan
        else:
            gmax = absmax(res.grads)
        if not math.isfinite(gmax):
            self._found(k, self._nonfinite(~torch.isfinite(res.grads).all(dim=1).cpu().numpy(), idx, k, "gradient"))
            return None
        bmax = 0.0
        if res.buffers is not None and res.buffers.numel():
            bmax = absmax(res.buffers)
            if not math.isfinite(bmax):
                self._found(k, self._nonfinite(~torch.isfinite(res.buffers).all(dim=1).cpu().numpy(), idx, k,
                                               "buffer"))
                return None
        losses[idx] = batch_losses
        return res, gmax, bmax

    def _record(self, k: int, lr: float, losses: np.ndarray, mix: Mix | None, est: np.ndarray | None, *,
                skipped: bool, before: tuple[float, float, float]) -> StepStats:
        """Count the step and its round (the clock charges the round's cost) and return its record."""
        self.step_count += 1
        communicated = mix is not None and mix.communicates
        bytes_sent = 0.0
        if communicated:
            assert mix is not None
            self.rounds += 1
            # the clock reads the matrix of neighbour rounds only: a structured mix's is not built otherwise
            matrix = None if mix.structure is not None and mix.pattern != "neighbor" else mix.matrix
            comp = self._compressed
            rnd = plan_round(mix)
            senders = round_senders(mix, self.m)  # a sampled FedAvg round: its k clients send and receive
            elastic = None if comp is None else comp.elastic_cost(rnd, self.clock.bytes_per_param,
                                                                  self.clock.codec_time(comp.compressor.name))
            if elastic is not None:  # point-to-point payloads: uploads and replies (docs/compression.md)
                costs = [elastic]
            elif comp is not None and comp.sends_payload(rnd):  # the compressor's payloads
                costs = self.clock.round_costs(mix.pattern, matrix, payload_bytes=comp.row_bytes,
                                               reducible=comp.reducible, senders=senders,
                                               compressor=comp.compressor.name)
            elif "fragment" in mix.info:  # a Streaming DiLoCo fragment: its columns, its compressor
                costs = fragment_costs(self.clock, rnd, self._kernel.fragment_columns(mix.info), self.b, self._fragments)
            else:
                costs = self.clock.round_costs(mix.pattern, matrix, senders=senders)
                if self.spec.control:  # SCAFFOLD sends its control variates with the models: twice the bytes
                    costs = costs + self.clock.round_costs(mix.pattern, matrix, senders=senders)
            # a delayed fragment update overlaps the steps until its application
            self.clock.communicate(costs, overlap=self.spec.overlap or int(mix.info.get("delay", 0)) > 0)
            bytes_sent = float(sum(c.bytes_sent for c in costs))
            self.bytes_sent += bytes_sent
            self.peak_bytes = max(self.peak_bytes, bytes_sent)
        elif mix is not None and mix.info.get("apply"):  # a delayed fragment update is needed now
            self.clock.wait_pending()
        if mix is not None and "leader" in mix.info:
            self.leader = mix.info["leader"]
        c = self.clock
        return StepStats(
            step=k, lr=lr, losses=losses, communicated=communicated, round=self.rounds,
            pattern=None if mix is None else mix.pattern, bytes_sent=bytes_sent,
            info={} if mix is None else dict(mix.info), sim_time=c.elapsed, compute_s=c.compute_s - before[0],
            communication_s=c.communication_s - before[1], idle_s=c.idle_s - before[2], estimates=est,
            skipped=skipped,
        )

    # ------------------------------------------------------------------------------------------------
    # nan_policy="skip"
    # ------------------------------------------------------------------------------------------------
    def _snapshot(self) -> None:
        good = self._snapshot_rows(self._good)  # the last good round's buffer is reused
        good["deferred"] = self._comm.snapshot()
        good["compressed"] = None if self._compressed is None else self._compressed.snapshot()
        good["fragments"] = None if self._fragments is None else self._fragments.snapshot()
        good["async"] = None if self._async is None else self._async.snapshot()
        self._good = good
        self._good_step = self.step_count

    def check_health(self) -> DroppedRound | None:
        """Under ``nan_policy="skip"``: drop the steps since the last good round if a worker went
        non-finite (restoring that round's state), else make the current state the last good one."""
        if self.nan_policy != "skip":
            return None
        if self._bad is None:
            self._snapshot()
            return None
        assert self._good is not None
        bad, self._bad = self._bad, None
        self._restore_rows(self._good)
        with torch.no_grad():
            self._comm.restore(self._good["deferred"])
            if self._compressed is not None:
                self._compressed.restore(self._good["compressed"])
            if self._fragments is not None:
                self._fragments.restore(self._good["fragments"])
            if self._async is not None:  # the rolled-back steps' slots pass on all the same: their pulls
                self._async.restore(self._good["async"])
                self._pull_only(range(self._good_step, self.step_count))
        self._bound = self._absmax()
        first = {str(w): int(s) for w, s in sorted(bad["workers"].items(), key=lambda kv: int(kv[0]))}
        return DroppedRound(step=self.step_count - 1, workers=sorted(int(w) for w in first),
                            first_steps=first, restored_to_step=self._good_step)

    def finish(self) -> None:
        """End of a run or before reading the state: nothing is pending in one process."""
        return None

    def _update(
        self, res: ComputeResult, mix: Mix | None, lr: float, rows: list[int] | None, gmax: float, bmax: float, k: int
    ) -> NonFiniteError | None:
        """Apply direction, rule and mixing; in place when provably overflow-free, else on a checked copy.
        Returns what went non-finite (the state is then unchanged), else ``None``."""
        rnd = None if mix is None else plan_round(mix)  # from the Mix's structure, or cached per matrix
        cs = 1.0 if rnd is None else rnd.plan.col_abs_max  # max column abs-sum of S: NaN / inf iff non-finite
        if not math.isfinite(cs):
            return NonFiniteError(f"non-finite mixing matrix at step {k}")
        if self.spec.prox > 0.0:  # FedProx adds mu (x_i - z) to the gradients: |x_i - z| <= 2 bound
            gmax = gmax + 2.0 * self.spec.prox * self._bound
        if self.spec.control:  # SCAFFOLD adds c - c_i: |c - c_i| <= 2 bound
            gmax = gmax + 2.0 * self._bound
        new_bound = max(cs, 1.0) * step_bound(self.opts, max(self._bound, bmax), gmax, lr)
        limit = float(torch.finfo(self.dtype).max) / 16
        t = RoundKernel.as_rows(rows, self.device)
        # an outer round moves z by its own optimizer, a compressed round by what the compressor decodes (no
        # running bound covers either): checked on a copy (once per round)
        checked = rnd is not None and ((self.outer is not None and rnd.outer) or (self.spec.control and rnd.communicates)
                                       or (self._compressed is not None and rnd.kind is not RoundKind.IDENTITY)
                                       or (self._attacked and rnd.communicates))
        if new_bound < limit and not checked:
            self._kernel.apply(self._state, res.grads, t, res.buffers, self._opt_counters, rnd, lr)
            self._bound = new_bound
        elif new_bound < limit and rnd is not None and rows is not None and self._server_round_in_place(rnd, rows):
            err = self._apply_server_round(res, t, rows, rnd, lr, k)
            if err is not None:
                return err
        else:
            err = self._apply_checked(res, t, rnd, lr, k)
            if err is not None:
                return err
        if self._bound > limit * 1e-12:  # keep the running bound tight (one pass, rarely)
            self._bound = self._absmax()
        # integer buffers and momentum flags (not part of the checked state)
        for name, val in res.others.items():
            if t is None:
                self.other_buffers[name][: self.m].copy_(val)
            else:
                self.other_buffers[name].index_copy_(0, t, val)
        if isinstance(self.opts, SGDOptions) and self.opts.stateful:
            if t is None:
                self._mom_init.fill_(True)
            else:
                self._mom_init[t] = True
        return None

    def _server_round_in_place(self, rnd: Round, rows: list[int]) -> bool:
        """Whether an outer round can be applied in place and checked on the rows it writes only: a server
        optimizer's or SCAFFOLD's round over sampled clients (FedAvg's, writing z) whose broadcast stays deferred, without
        compression, the "reset" policy (it writes every row) or a per-worker torch optimizer. Such a round writes
        the sampled rows, z and the deferred value: O(c m) rows instead of a copy of the whole state."""
        server = ((self.outer is not None and rnd.outer) or (self.spec.control and rnd.communicates)
                  or (self._attacked and rnd.communicates))
        return (server and self._compressed is None
                and self.spec.policies.optimizer_state != "reset" and not isinstance(self.opts, TorchOptimizer)
                and self._kernel._writes_z(rnd) and self._comm._lazy(rnd.plan))

    def _apply_server_round(self, res: ComputeResult, t: Tensor | None, rows: list[int], rnd: Round, lr: float,
                            k: int) -> NonFiniteError | None:
        """A server optimizer's round (:meth:`_server_round_in_place`) in place: the rows it writes (the sampled
        clients and z), the optimizers' state and the deferred broadcast are kept first and restored when a value
        is not finite (the error is returned, the state is then unchanged)."""
        sampled = range(self.m) if rnd.plan.sources is None else rnd.plan.sources.tolist()  # SCAFFOLD: their c_i
        written = torch.as_tensor(sorted({*rows, *sampled, self.m}), device=self.device)
        kept = self._state.index_select(0, written)
        snap = self._optimizer_snapshot()
        deferred = self._comm.snapshot()
        before = self._bound
        self._kernel.apply(self._state, res.grads, t, res.buffers, self._opt_counters, rnd, lr)
        value = self._comm.deferred_value()
        now = self._state.index_select(0, written)
        new = max(absmax(now), 0.0 if value is None else absmax(value))
        if not math.isfinite(new):  # the rows that would hold a non-finite value, named as the checked copy does
            bad = np.zeros(self.n, dtype=bool)
            bad[written.cpu().numpy()] = ~torch.isfinite(now).all(dim=1).cpu().numpy()
            pend = self._comm.deferred
            if value is not None and pend is not None and not bool(torch.isfinite(value).all()):
                bad |= pend
            self._state.index_copy_(0, written, kept)
            self._optimizer_restore(snap)
            self._comm.restore(deferred)
            return self._nonfinite(bad, list(range(self.n)), k, "model")
        self._bound = max(before, new)  # the rows not written keep their values
        return None

    def _apply_checked(self, res: ComputeResult, t: Tensor | None, rnd: Round | None, lr: float,
                       k: int) -> NonFiniteError | None:
        """The step on a copy of the state, kept only when every value is finite (else the optimizer state
        outside the state tensor is restored and the error returned)."""
        snap = None if isinstance(self.opts, SGDOptions) and self.outer is None else self._optimizer_snapshot()
        compressed = None if self._compressed is None else self._compressed.snapshot()
        fragments = None if self._fragments is None else self._fragments.snapshot()
        self._materialize()
        work = self._state.clone()
        self._kernel.apply(work, res.grads, t, res.buffers, self._opt_counters, rnd, lr)
        lo, hi = self._kernel.cols
        self._comm.materialize(work[:, lo:hi])  # the copy is checked whole: nothing stays deferred
        finite = torch.isfinite(work).all(dim=1)
        if not bool(finite.all()):
            if snap is not None:
                self._optimizer_restore(snap)
            if compressed is not None:
                assert self._compressed is not None
                self._compressed.restore(compressed)
            if fragments is not None:
                assert self._fragments is not None
                self._fragments.restore(fragments)
            return self._nonfinite(~finite.cpu().numpy(), list(range(self.n)), k, "model")
        self._state.copy_(work)
        self._bound = self._absmax()
        return None

    # ------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically (loadable with ``torch.load(weights_only=True)``): the
        rows and counters (:meth:`~coopsgd.engines.rows.ModelRows._rows_payload`, with the inner optimizer's
        settings), the clock, the loss-estimate history, the executor and torch's RNG."""
        self._materialize()
        return wrap_state("simulate", {
            "version": _STATE_VERSION,
            "shape": [self.m, self.v, self.d, self.b],
            **self._rows_payload(),
            "bytes_sent": float(self.bytes_sent),
            "peak_bytes_per_step": float(self.peak_bytes),
            "loss_history": torch.from_numpy(self._hist.copy()),
            "loss_count": torch.from_numpy(self._hist_count.copy()),
            "clock": self.clock.state_dict(),
            "executor": self.executor_name,
            "calibration": dict(self.calibration),
            "torch_rng_state": torch.get_rng_state(),
            **({} if self._compressed is None else {"compression": self._compressed.state_dict()}),
            **({} if self._fragments is None else {"compression": self._fragments.state_dict()}),
            **({} if self._async is None else {"asynchronous": {
                **self._async.state_dict(), "arrival_time": getattr(self.spec.schedule, "arrival_time", None)}}),
        })

    def _load_compression(self, state: dict[str, Any]) -> None:
        """The compressed rounds' state of a checkpoint (an optional key: absent from uncompressed runs)."""
        if self._fragments is not None:
            self._fragments.load_state_dict(state.get("compression"), field="state_dict.compression")
            return
        load_compression_state(self._compressed, state.get("compression"), field="state_dict.compression")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same spec, model and options; a different inner optimizer is named)."""
        state = unwrap_state(state, "simulate")
        if state.get("version") != _STATE_VERSION:
            raise ConfigError.invalid("state_dict.version", state.get("version"), f"expected {_STATE_VERSION}")
        self._check_optimizer_settings(state, "state_dict")
        shape = [self.m, self.v, self.d, self.b]
        if list(state["shape"]) != shape:
            raise ConfigError.invalid(
                "state_dict.shape", list(state["shape"]), f"this simulator has [m, v, d, b] = {shape}"
            )
        if tuple(state["state"].shape) != tuple(self._state.shape):
            raise ConfigError.invalid(
                "state_dict.state", tuple(state["state"].shape), f"expected {tuple(self._state.shape)} (momentum or optimizer setting?)"
            )
        hist = state["loss_history"].numpy()
        if hist.shape != self._hist.shape:
            raise ConfigError.invalid("state_dict.loss_history", hist.shape, f"expected window x m = {self._hist.shape}")
        self._load_compression(state)
        if self._async is not None:
            saved = state.get("asynchronous")
            self._async.load_state_dict(saved, "state_dict.asynchronous")
            if saved is not None and saved.get("arrival_time") is not None:  # the timeline the run was on
                self.spec = bind_arrival_time(self.spec, float(saved["arrival_time"]))
                self._arrival_bound = True
        self._comm.clear()
        self._calibrated = None
        self._load_rows_payload(state, "state_dict")
        self.bytes_sent = float(state["bytes_sent"])
        self.peak_bytes = float(state.get("peak_bytes_per_step", 0.0))
        self._hist = hist.copy()
        self._hist_count = state["loss_count"].numpy().copy()
        self.clock.load_state_dict(state["clock"])
        self._load_executor(state)
        torch.set_rng_state(state["torch_rng_state"])
        self._bound = self._absmax()
        self._bad = None
        if self.nan_policy == "skip":  # checkpoints are taken after a health check: this state is good
            self._snapshot()
