"""Distributed engine: one process per worker with ``torch.distributed`` ([SPEC] §5, engine 3).

Rank ``r`` runs worker ``r`` (the world size is m); an auxiliary node is held by the ranks whose workers
read it -- every rank for EASGD, FedAvg, LSGD and DOWNPOUR, the ranks of its group for hierarchical
averaging, whose rounds then run in process subgroups (see :mod:`coopsgd.engines.distributed.communicator` for the placement
and for the collective each kind of mixing matrix uses). Each rank keeps ONE flat state tensor of shape
``(1 + v, b + d [+ f d])`` -- its worker's ``[float buffers | parameters | optimizer state fields]`` and the auxiliaries'
rows (those of auxiliaries it does not hold are not maintained) -- and its optimizer counters. One step ``k`` does exactly what
:class:`coopsgd.engines.simulator.Simulator` does for that worker:

1. ``spec.schedule.active(k)``: an inactive FedAvg client computes nothing;
2. the gradient at the current parameters on this worker's batch (a replica module whose parameters are
   views into the flat row, as the simulator's loop executor);
3. LSGD: at each leader refresh (``k % tau == 0``) one all_gather of the m loss estimates (one float per
   rank); every rank then elects the same leader with the schedule's own rule;
4. ``S_k = spec.schedule.mix(k, ctx)`` -- evaluated identically on every rank (deterministic given the
   step and the gathered losses);
5. the worker's inner optimizer (:mod:`coopsgd.engines.optim`: torch.optim.SGD's direction D, Adam / AdamW,
   or a torch optimizer class); ``post_mix``: ``x <- x - lr D`` then the round; ``pre_mix``: the round
   then ``x <- x - lr D``; buffers and every optimizer-state field follow
   :class:`~coopsgd.algorithms.spec.Policies` as in the simulator;
6. an outer round (DiLoCo, SlowMo, the federated server optimizers FedAvgM / FedAdam / FedYogi / FedAdagrad:
   ``spec.outer``): every rank holds z and its outer optimizer's state, and after the round that averages the
   workers (the sampled clients, for the federated ones) applies the same outer step to it (identical
   inputs, identical result on every rank), then restarts its worker from z. FedProx (``spec.prox``) adds
   ``mu (x - z)`` to this worker's gradient, z being the server row every rank holds: no extra state or
   communication.

Given the same seeds and data order (:class:`~coopsgd.data.WorkerLoader`, worker r's batches on rank r)
the parameters after K steps equal the simulator's (float64: to 1e-10; tested). Differences from the
simulator: DOWNPOUR either uses the schedule's seeded push order (``downpour_order="schedule"``),
emulated exactly by one all_gather per round and applied in that order on every rank (deterministic,
equal to the simulator), or runs a real asynchronous parameter server (``downpour_order="async"``,
:mod:`coopsgd.engines.distributed.parameter_server`: z only on rank 0, pushes applied in arrival order, no barrier
between workers -- the default of ``coopsgd run --engine distributed``, whose ``downpour_order="clock"``
means "the order in which pushes arrive"). The asynchronous presets (FedBuff, asynchronous local SGD:
``spec.asynchronous``) always run on that server, with their rule (buffer, staleness weights, delayed Nesterov:
:meth:`coopsgd.engines.asynchronous.AsyncServer.on_push`) in place of DOWNPOUR's sum; each rank pushes after its
own H local steps. Non-blocking EASGD is truly asynchronous (``async_op=True``, waited at the next
round). NaN/Inf in a worker's loss or gradient stops that rank with an error naming it; a NaN that
reaches other workers through mixing is detected by them right after the communication round.

A spec with compression (``spec.compressed``, SPEC §11) sends its rounds through
:class:`~coopsgd.engines.distributed.compressed.CompressedMixer`: the compressor's packed payload is what goes
on the wire (all-gather, the sampled clients' broadcasts, or point-to-point to the neighbours for CHOCO),
the iterates and the bytes charged equal the simulator's, and its per-rank state (residuals, public copies,
x_ref, PowerSGD's factors, the round count) is in the rank checkpoint (``"compression"``) and the NaN-skip
rollback. Elastic rounds, LSGD's leader refresh and DOWNPOUR's pushes (``downpour_order="schedule"``) are
compressed too; asynchronous pushes are refused
(:func:`~coopsgd.engines.distributed.compressed.check_distributed_compression`).

The engine implements :class:`coopsgd.engines.base.Engine`; the update itself is the shared round kernel
(:class:`coopsgd.engines.kernel.RoundKernel`) with the collectives of :class:`coopsgd.engines.distributed.communicator.Mixer` as
its communicator. What a rank shows of the run without advancing it -- every node's rows, the centre and
average models, the measured timing -- is :class:`~coopsgd.engines.distributed.views.RankViews` (mixed into
the engine); failure injection for tests is :mod:`coopsgd.engines.distributed.faults`. Runs -- the training loop in every rank, run directories, checkpoints, launching -- are
in :mod:`coopsgd.train.distributed` (``coopsgd run --engine distributed``, :func:`run_spec` for tensors)
and :mod:`coopsgd.torchrun` (``torchrun --nproc-per-node N -m coopsgd.torchrun --config run.toml``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.algorithms.schedules import Mix, MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.asynchronous import AsyncServer
from coopsgd.engines.base import (
    DroppedRound,
    NonFiniteError,
    StepStats,
    unwrap_state,
    wrap_state,
)
from coopsgd.engines.compressed import load_compression_state
from coopsgd.engines.distributed.communicator import Mixer, NetEmulation, aux_placement
from coopsgd.engines.distributed.compressed import (
    CompressedMixer,
    average_start,
    check_distributed_compression,
)
from coopsgd.engines.distributed.faults import FAILURE_MODES, FaultHook, fault_hook
from coopsgd.engines.distributed.launch import no_heartbeat
from coopsgd.engines.distributed.parameter_server import AsyncParameterServer
from coopsgd.engines.distributed.views import RankViews, communication_table
from coopsgd.engines.executors import ComputeResult, LoopExecutor
from coopsgd.engines.fragments import check_distributed_fragments
from coopsgd.engines.health import diverged
from coopsgd.engines.kernel import RoundKernel, mix_columns
from coopsgd.engines.mixing import Round, plan_round
from coopsgd.engines.optim import SGDOptions, optimizer_settings
from coopsgd.engines.rows import ModelRows
from coopsgd.errors import ConfigError, check_float

__all__ = [
    "DistributedEngine",
    "DistStepStats",
    "communication_table",
    "FAILURE_MODES",
    "FaultHook",
    "fault_hook",
]

log = logging.getLogger(__name__)

_DOWNPOUR_ORDERS = ("schedule", "async")
_RANK_STATE_VERSION = 2  # 2: the schedule's run state ("schedule_state")

Batch = tuple[Tensor, Tensor]

#: The distributed engine's step record is the engines' common one (``losses`` holds this rank's worker only).
DistStepStats = StepStats

def _check_options(spec: AlgorithmSpec, device: str | torch.device, downpour_order: str, nan_policy: str,
                   fault: FaultHook | None) -> tuple[int, bool]:
    """The engine's own arguments checked against the process group: (this rank, whether DOWNPOUR is asynchronous)."""
    if not isinstance(spec, AlgorithmSpec):
        raise ConfigError.invalid("spec", spec, "must be an AlgorithmSpec (see coopsgd.algorithms.presets)")
    # asynchronous pushes: refused, never a silent uncompressed run
    check_distributed_compression(spec, asynchronous=downpour_order == "async")
    check_distributed_fragments(spec)  # compressed fragment rounds: refused likewise
    server = spec.asynchronous is not None  # FedBuff, asynchronous local SGD: the real parameter server's order
    if server and getattr(spec.schedule, "concurrency", spec.workers) != spec.workers:
        raise ConfigError.invalid("concurrency", getattr(spec.schedule, "concurrency", None), "the distributed "
                                  f"engine runs one rank per client, every one training: concurrency = workers = "
                                  f"{spec.workers}")
    if server and getattr(spec.schedule, "dynamic", False):
        raise ConfigError.invalid("dynamic_local_updates", True, "false on the distributed engine (each rank pushes "
                                  "after its own tau real local steps; H_i follows simulated speed classes)")
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError.invalid("process group", None, "call torch.distributed.init_process_group first")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != spec.workers:
        raise ConfigError.invalid("workers", spec.workers, f"must equal the world size ({world}): one rank per worker")
    if downpour_order not in _DOWNPOUR_ORDERS:
        raise ConfigError.invalid("downpour_order", downpour_order, f"choose one of {', '.join(_DOWNPOUR_ORDERS)}")
    asynchronous = downpour_order == "async" or server
    if asynchronous and not server and not spec.schedule.sequential:
        raise ConfigError.invalid("downpour_order", downpour_order, "'async' needs a schedule whose rounds are "
                                  "sequential pushes to a server (DOWNPOUR)")
    if asynchronous and torch.device(device).type != "cpu":
        raise ConfigError.invalid("downpour_order", downpour_order, "the asynchronous parameter server runs on "
                                  "CPU tensors with gloo; use downpour_order='schedule' on GPUs")
    if asynchronous and nan_policy == "skip":
        raise ConfigError.invalid("nan_policy", nan_policy, "'skip' cannot roll back an asynchronous parameter "
                                  "server; use 'stop'" + ("" if server else " or downpour_order='schedule'"))
    if fault is not None and not callable(fault):
        raise ConfigError.invalid("fault", fault, "must be callable as fault(rank, step)")
    return rank, asynchronous


class DistributedEngine(RankViews):
    """Runs one worker of an :class:`AlgorithmSpec` in this process; call it on every rank of the group.

    The process group must be initialised (``torch.distributed.init_process_group``) with world size
    ``spec.workers``. Arguments as :class:`coopsgd.engines.simulator.Simulator`; in addition:

    Args:
        net: network emulation (:class:`~coopsgd.engines.distributed.communicator.NetEmulation`) or ``None``.
        sync_init: broadcast rank 0's initial model to everyone (guards against unseeded inits); not
            done when ``init_params`` gives per-worker starts.
        fault: a :data:`FaultHook` called at the start of every step (tests; see :func:`fault_hook`).
        heartbeat: ``heartbeat(step, phase)``, the rank's liveness signal for a launcher's hang detector
            (:func:`coopsgd.engines.distributed.launch.launch` injects its :class:`~coopsgd.engines.distributed.launch.Heartbeat`
            into the rank's function); also given to the parameter server. Default: none.
        nan_policy: what a NaN/Inf loss, gradient or model does. ``"stop"``: the rank that sees it raises
            :class:`~coopsgd.engines.base.NonFiniteError` naming the worker and the step at once
            (the others stop when it leaves). ``"skip"``: it stops updating until :meth:`check_health`
            (the loop calls it after every round), where every rank learns it (one small all_gather of
            health flags), restores the state of the last good round (models, auxiliaries, momentum,
            buffers) and goes on with the next data; the data of the dropped steps is not reused. A
            pending non-blocking round is completed before each snapshot (no overlap under ``"skip"``).
        downpour_order: DOWNPOUR only. ``"schedule"``: the schedule's seeded push order, emulated exactly
            by one all_gather per round (deterministic, equals the simulator). ``"async"``: a real
            asynchronous parameter server (:class:`~coopsgd.engines.distributed.parameter_server.AsyncParameterServer`):
            z lives on rank 0 only, each worker pushes and pulls every tau steps without waiting for
            the others, pushes are applied in arrival order (not deterministic). Call :meth:`close` on
            every rank at the end.
    """

    def __init__(
        self,
        spec: AlgorithmSpec,
        model: nn.Module | Callable[[], nn.Module],
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        loss_estimate: str = "running_mean",
        window: int = 10,
        probe_batch: Batch | None = None,
        net: NetEmulation | None = None,
        init_params: Tensor | np.ndarray | None = None,
        sync_init: bool = True,
        heartbeat: Callable[[int, str], None] | None = None,
        fault: FaultHook | None = None,
        nan_policy: str = "stop",
        downpour_order: str = "schedule",
        optimizer: OptimizerSettings | str | type | None = None,
        **optimizer_options: Any,
    ) -> None:
        self.rank, self.asynchronous = _check_options(spec, device, downpour_order, nan_policy, fault)
        if spec.asynchronous is not None:  # every rank trains at its own pace; pushes in the server's real order
            spec = replace(spec, schedule=spec.schedule.free())  # type: ignore[attr-defined]
        # rows: this worker, then the auxiliaries (none here with an asynchronous server: z lives in it)
        super().__init__(spec, model, workers_held=[self.rank], aux_rows=0 if self.asynchronous else spec.auxiliaries,
                         loss_fn=loss_fn, dtype=dtype, device=device, seed=seed, loss_estimate=loss_estimate, window=window,
                         nan_policy=nan_policy, init_params=init_params, probe_batch=probe_batch,
                         optimizer=optimizer_settings(optimizer, **optimizer_options))
        self.heartbeat = heartbeat or no_heartbeat
        self._fault = fault
        b, d = self.b, self.d
        if sync_init and not self.per_worker_start:  # one common start even if the factory is not seeded
            with torch.no_grad():
                row = self._state[0, : b + d].clone()
                dist.broadcast(row, src=0)
                self._state[:, : b + d] = row
        self._check_initial_state()
        self._executor = LoopExecutor(
            self.template, self.layout, self.params_all, self.buffers_all, self.other_buffers, loss_fn, 1
        )
        # z of an outer optimizer lives on every rank (each applies the same outer step to it)
        holders = None if spec.outer is not None else aux_placement(spec)
        self.mixer = Mixer(
            self.rank, self.m, self.v, net=net, on_finalize=self._zero_aux_momentum, holders=holders,
            matrices=spec.schedule.matrices(4096) if holders is not None else None,
        )
        self.net = self.mixer.net
        # a compressed spec's rounds go through its compressed stage, which hands the rest to the mixer
        self._compressed = self._compression_stage()
        comm = self.mixer if self._compressed is None else self._compressed
        self._kernel = RoundKernel(spec, self.opts, b, d, 1, comm, outer=self.outer, worker_ids=(self.rank,),
                                   param_sizes=tuple(math.prod(s) for s in self.layout.param_shapes))
        self._server_rule: AsyncServer | None = None
        self._ps = self._start_parameter_server(net) if self.asynchronous else None
        #: local steps between pushes: tau, or an asynchronous server's H_i of this worker
        self._push_every = spec.tau if spec.asynchronous is None else \
            int(spec.schedule.local_steps[self.rank])  # type: ignore[attr-defined]

        # -- estimates and timing ------------------------------------------------------------------------
        self._hist = np.full(self.window, np.nan)
        self._hist_count = 0
        self.compute_s = 0.0
        self.peak_bytes = 0.0  # this rank's most bytes sent in one step (peak_bytes_per_step: summed over ranks)
        self._round_arrivals: list[float] = []
        self._round_durations: list[float] = []
        self._t_start: float | None = None
        self._t_last = 0.0
        self._resumed_wall = 0.0  # wall seconds of the run before a resume (timing() continues from it)
        # -- nan_policy="skip": the last good state and what went wrong since ---------------------------
        self._bad: tuple[int, str] | None = None  # (first step, what) this rank saw non-finite since the last round
        self._good: dict[str, Any] | None = None
        self._good_step = 0
        if self.nan_policy == "skip":
            self._snapshot(0)

    def _compression_stage(self) -> CompressedMixer | None:
        """The compressed rounds of ``spec.compressed`` (``None`` without: the uncompressed path, unchanged), as
        the simulator's: a node sends the columns a round mixes, whose tensor shapes (buffers, parameters,
        state fields) are the layout PowerSGD reads; x_ref starts at the common start (the workers' mean for
        per-worker starts: one all_reduce)."""
        comp = self.spec.compressed
        if comp is None:
            return None
        lo, hi = mix_columns(self.spec, self.b, self.d, self.opts)
        params = [tuple(s) for s in self.layout.param_shapes]
        layout = ([tuple(s) for s in self.layout.buffer_shapes] if lo == 0 else []) + params
        layout += params * ((hi - self.b - self.d) // self.d if self.d else 0)
        start = average_start(self._state[0, lo:hi], self.per_worker_start, dist.all_reduce, self.m)
        return CompressedMixer(self.mixer, comp, spec=self.spec, width=hi - lo, params=self.d, dtype=self.dtype,
                               device=self.device, seed=self.seed, layout=layout, start=start)

    def _settle(self, rnd: Round | None) -> None:
        """After an outer round of a compressed spec: z, where every worker restarted, is the new x_ref."""
        if self._compressed is not None and rnd is not None and self.outer is not None and rnd.outer:
            lo, hi = self._kernel.cols
            self._compressed.settle(self._state[:, lo:hi], rnd)

    def _start_parameter_server(self, net: NetEmulation | None) -> AsyncParameterServer:
        """``downpour_order="async"``: z lives in a parameter server on rank 0, started from this rank's row."""
        lo, hi = self._kernel.cols
        self._aux_fill = self._state[0].clone()  # an auxiliary's columns that are not mixed: initial values
        if self.opts.fields:
            self._aux_fill[self.b + self.d :] = 0.0
        agg = self.spec.asynchronous
        self._server_rule = None if agg is None else AsyncServer(
            agg, torch.zeros((self.m, 0), dtype=self.dtype), lambda: torch.zeros(hi - lo, dtype=self.dtype))
        return AsyncParameterServer(self._state[0, lo:hi].clone(), host=0, net=net, heartbeat=self.heartbeat,
                                    rule=None if self._server_rule is None else self._server_rule.on_push)

    # ------------------------------------------------------------------------------------------------
    # construction helpers and views
    # ------------------------------------------------------------------------------------------------
    #: (1+v, d) parameters and (1+v, b) float buffers held here: row 0 this worker, then the auxiliaries
    params_all = ModelRows.rows_params
    buffers_all = ModelRows.rows_buffers

    @property
    def params(self) -> Tensor:
        """This worker's flat parameters (a view)."""
        return self.rows_params[0]

    @property
    def momentum(self) -> Tensor | None:
        """This worker's SGD momentum buffer (a view), ``None`` without one."""
        mom = self.rows_momentum
        return None if mom is None else mom[0]

    @property
    def optimizer_state(self) -> dict[str, Tensor]:
        """This worker's inner-optimizer state fields by torch's names (views)."""
        return {k: v[0] for k, v in self.rows_optimizer_state.items()}

    def _zero_aux_momentum(self) -> None:
        """After a non-blocking round completes: the auxiliaries hold no optimizer state, and the outer steps of
        Streaming DiLoCo's delayed fragment rounds (their reductions just arrived) are taken."""
        self._kernel.zero_aux_momentum(self._state)
        self._kernel.complete_fragments(self._state)

    # -- the loop's side of the engine contract ------------------------------------------------------------
    name = "distributed"

    @property
    def local_workers(self) -> list[int]:
        """This rank runs worker ``rank``."""
        return [self.rank]

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the run directory."""
        return self.rank == 0

    # ------------------------------------------------------------------------------------------------
    # stepping
    # ------------------------------------------------------------------------------------------------
    def _estimate(self, loss: float, probe: float | None) -> tuple[float, np.ndarray, int]:
        hist, count = self._hist.copy(), self._hist_count
        if math.isfinite(loss):
            hist[count % self.window] = loss
            count += 1
        if self.loss_estimate == "probe":
            assert probe is not None
            return probe, hist, count
        if self.loss_estimate == "batch":
            return loss, hist, count
        vals = hist[np.isfinite(hist)]
        return (float(vals.mean()) if vals.size else math.nan), hist, count

    def _needs_losses(self, k: int) -> bool:
        return self.spec.needs_losses and self.spec.schedule.wants_losses(k, self.schedule_state)

    def _nonfinite(self, what: str, k: int) -> NonFiniteError:
        return diverged(what, self.rank, k, workers=[self.rank])

    def _my_batch(self, batches: Sequence[Batch | None] | None, active: bool, k: int) -> Batch | None:
        """This rank's entry of the per-worker ``batches`` (the engines' common step input)."""
        if batches is None or isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) \
                or len(batches) != self.m:
            got = len(batches) if isinstance(batches, Sequence) else type(batches).__name__
            raise ConfigError.invalid("batches", got, f"need one entry per worker ({self.m}); rank {self.rank} "
                                                      f"reads entry {self.rank}, the others may be None")
        batch = batches[self.rank]
        if active and batch is None:
            raise ConfigError.invalid(f"batches[{self.rank}]", None, f"worker {self.rank} is active at step {k}")
        return batch

    def step(self, batches: Sequence[Batch | None] | None, lr: float) -> StepStats:
        """One step of the algorithm on this rank: ``batches[rank]`` is this worker's batch (ignored when
        inactive; the other entries are not read)."""
        spec, r = self.spec, self.rank
        lr = check_float("lr", lr, low=0.0)
        k = self.step_count
        now = time.perf_counter()
        if self._t_start is None:
            self._t_start = now - self._resumed_wall
        self.heartbeat(k, "compute")
        poison = self._fault is not None and self._fault(r, k) == "nan"
        t0 = time.perf_counter()
        sched = spec.schedule
        mask = sched.active(k)
        active = mask is None or bool(mask[r])
        batch = self._my_batch(batches, active, k)
        res, loss, probe = self._gradients(batch if active else None, poison, k)
        est, hist, count = (math.nan, self._hist, self._hist_count)
        if spec.needs_losses:
            est, hist, count = self._estimate(loss, probe)
        self.compute_s += time.perf_counter() - t0

        arrived: float | None = None
        comm0, sent0 = self.mixer.stats.comm_s, self.mixer.stats.bytes_sent
        losses = None
        if self._needs_losses(k):
            self.heartbeat(k, "comm")
            arrived = time.time()
            losses = self.mixer.gather_floats(est)[:, 0]
        ps_round = self.asynchronous and (k + 1) % self._push_every == 0
        mix = None
        if not self.asynchronous:
            mix, self.schedule_state = sched.advance(k, MixContext(step=k, lr=lr, losses=losses), self.schedule_state)

        rnd = None if mix is None else plan_round(mix)

        def on_round() -> None:
            nonlocal arrived
            if arrived is None and rnd is not None and (self.mixer.exchanges(rnd) or self.mixer.pending):
                self.heartbeat(k, "comm")
                arrived = time.time()

        with torch.no_grad():
            t1 = time.perf_counter()
            c1 = self.mixer.stats.comm_s
            self._kernel.apply(self._state, None if res is None else res.grads, None,
                               None if res is None else res.buffers, self._opt_counters, rnd, lr, on_round=on_round)
            self._settle(rnd)
            if ps_round:
                arrived = time.time()
                self._push_pull(k)
            if mix is not None and mix.communicates and self.nan_policy == "stop" \
                    and not bool(torch.isfinite(self._state[0]).all()):
                raise NonFiniteError(
                    f"non-finite model on worker {r} after the communication round at step {k}: "
                    f"a NaN/Inf reached it from another node (the run diverged)"
                )
            self.compute_s += max(time.perf_counter() - t1 - (self.mixer.stats.comm_s - c1), 0.0)
            if res is not None:
                for name, val in res.others.items():
                    self.other_buffers[name][0].copy_(val[0])
                if isinstance(self.opts, SGDOptions) and self.opts.stateful:
                    self._mom_init.fill_(True)
        if arrived is not None:
            self._round_arrivals.append(arrived)
            self._round_durations.append(self.mixer.stats.comm_s - comm0)
        self._hist, self._hist_count = hist, count
        self.peak_bytes = max(self.peak_bytes, float(self.mixer.stats.bytes_sent - sent0))
        return self._record(k, lr, loss, mix, losses, ps_round=ps_round, sent=self.mixer.stats.bytes_sent - sent0)

    def _gradients(self, batch: Batch | None, poison: bool, k: int) -> tuple[ComputeResult | None, float, float | None]:
        """This worker's gradient on ``batch`` (``None``: inactive) with its loss, and LSGD's probe loss. A
        non-finite loss, gradient or buffer raises under ``nan_policy="stop"``; under ``"skip"`` it marks the
        round as bad and the worker stops updating until the round (the result is then ``None``)."""
        probe = None
        with torch.no_grad():
            if self.spec.needs_losses and self.loss_estimate == "probe":
                assert self._probe is not None
                probe = float(self._executor.evaluate(self._probe)[0])
                if not math.isfinite(probe):
                    raise self._nonfinite("probe loss", k)
        if batch is None:
            return None, math.nan, probe
        res: ComputeResult | None = self._executor.compute([self._to_batch(batch)], None)
        assert res is not None
        with torch.no_grad():
            loss = float(res.losses[0])
            if poison:
                loss = math.nan
                res.grads.fill_(math.nan)
            what = None
            if not math.isfinite(loss):
                what = "loss"
            elif not bool(torch.isfinite(res.grads).all()):
                what = "gradient"
            elif res.buffers is not None and not bool(torch.isfinite(res.buffers).all()):
                what = "buffer"
            if what is not None:
                if self.nan_policy == "stop":
                    raise self._nonfinite(what, k)
                if self._bad is None:
                    self._bad = (k, what)
                    log.warning("rank %d: non-finite %s at step %d; the round will be dropped", self.rank, what, k)
                res = None  # this worker stops updating until the round
                loss = math.nan
        if self._bad is not None:  # already bad since an earlier step: do not update
            res = None
        return res, loss, probe

    def _record(self, k: int, lr: float, loss: float, mix: Mix | None, losses: np.ndarray | None, *,
                ps_round: bool, sent: float = 0.0) -> StepStats:
        """Count the step and its round and return its record (``sent``: the bytes this rank put on the wire)."""
        communicated = ps_round or (mix is not None and mix.communicates)
        self.step_count += 1
        if communicated:
            self.rounds += 1
        if mix is not None and "leader" in mix.info:
            self.leader = int(mix.info["leader"])
        self._t_last = time.perf_counter()
        info = {} if mix is None else dict(mix.info)
        if ps_round:
            info["asynchronous"] = True
        losses_out = np.full(self.m, np.nan)
        losses_out[self.rank] = loss
        return StepStats(
            step=k, lr=lr, losses=losses_out, communicated=communicated, round=self.rounds,
            pattern="parameter_server" if ps_round else (None if mix is None else mix.pattern), bytes_sent=float(sent),
            info=info,
            estimates=None if losses is None else np.asarray(losses), skipped=self._bad is not None,
        )

    # ------------------------------------------------------------------------------------------------
    # asynchronous DOWNPOUR
    # ------------------------------------------------------------------------------------------------
    def _push_pull(self, k: int) -> None:
        """Push this worker's accumulated update to the server on rank 0 and pull z (no barrier)."""
        assert self._ps is not None
        ps, ms = self._ps.stats, self.mixer.stats
        sent, waited, emulated = ps.bytes_sent, ps.wait_s, ps.emulated_s
        lo, hi = self._kernel.cols
        self._ps.push_pull(self._state[0, lo:hi])
        ms.count("push_pull", ps.bytes_sent - sent, None)
        ms.comm_s += ps.wait_s - waited
        ms.emulated_s += ps.emulated_s - emulated
        b, d = self.b, self.d
        if self.opts.fields and self.spec.policies.optimizer_state == "reset":
            self._state[0, b + d :].zero_()
            self._opt_steps.zero_()
        if self.nan_policy == "stop" and not bool(torch.isfinite(self._state[0]).all()):
            raise NonFiniteError(f"non-finite model on worker {self.rank} after its pull at step {k}: "
                                 f"the server model diverged")

    def async_record(self) -> dict[str, Any]:
        """An asynchronous server's staleness statistics, on the rank hosting it (empty elsewhere and for every
        other algorithm)."""
        if self._server_rule is None or self._ps is None or self.rank != self._ps.host:
            return {}
        return dict(self._ps.locked(self._server_rule.stats))

    def close(self) -> None:
        """End of a run (every rank): completes a pending round and, with ``downpour_order="async"``, ends
        the parameter server (rank 0 waits for every worker's last push). Views still work afterwards."""
        self.finish()
        if self._ps is not None and not self._ps.closed:
            self._ps.close()

    # ------------------------------------------------------------------------------------------------
    # nan_policy="skip"
    # ------------------------------------------------------------------------------------------------
    def _snapshot(self, done: int) -> None:
        """Keep the current state as the last good one (``done`` steps completed)."""
        self.mixer.finalize()
        self._good = self._snapshot_rows(self._good)
        self._good["compressed"] = None if self._compressed is None else self._compressed.snapshot()
        self._good_step = int(done)

    def _restore(self) -> None:
        self.mixer.finalize()
        assert self._good is not None
        self._restore_rows(self._good)
        if self._compressed is not None:  # e, x_hat, x_ref, factors and the round count of that round
            self._compressed.restore(self._good["compressed"])

    def check_health(self) -> DroppedRound | None:
        """Every rank's health since the last check (collective); under ``nan_policy="skip"`` a non-finite
        value anywhere drops the steps since the last good round on every rank (restoring its state)."""
        if self.nan_policy != "skip":
            return None
        k = self.step_count - 1
        with torch.no_grad():
            self.mixer.finalize()
            finite = bool(torch.isfinite(self._state[0]).all()) and (
                self.v == 0 or bool(torch.isfinite(self._state[1:]).all()))
        bad_step = -1.0 if self._bad is None else float(self._bad[0])
        flags = self.mixer.gather_floats(np.array([bad_step, 0.0 if finite else 1.0]))
        self._bad = None
        bad = [(i, int(f[0])) for i, f in enumerate(flags) if f[0] >= 0]
        spread = [i for i, f in enumerate(flags) if f[1] > 0 and f[0] < 0]
        if not bad and not spread:
            self._snapshot(self.step_count)
            return None
        rec = DroppedRound(step=k, workers=sorted({i for i, _ in bad} | set(spread)),
                           first_steps={str(i): s for i, s in bad}, restored_to_step=self._good_step)
        self._restore()
        return rec

    # ------------------------------------------------------------------------------------------------
    # checkpointing (local to this rank; complete a pending round with finish() first)
    # ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's state for a bit-identical continuation: tensors and plain Python only (CPU).

        Holds the worker's and the replicated auxiliaries' rows (buffers, parameters, optimizer state), the
        counters, schedule and leader state and the inner optimizer's settings
        (:meth:`~coopsgd.engines.rows.ModelRows._rows_payload`), the loss-estimate history, the RNG states and
        the communication / timing counters. A pending non-blocking round must have been completed
        (:meth:`finish`, a collective) before.
        """
        if self.mixer.pending:
            raise RuntimeError("state_dict() with a pending non-blocking round: call finish() on every rank first")
        st = self.mixer.stats
        np_state = np.random.get_state(legacy=False)
        out: dict[str, Any] = {
            "version": _RANK_STATE_VERSION,
            "rank": self.rank,
            "shape": [self.m, self.v, self.d, self.b, int(self._state.shape[1])],
            "dtype": str(self.dtype),
            **self._rows_payload(),
            "loss_history": torch.from_numpy(self._hist.astype(np.float64, copy=True)),
            "loss_count": int(self._hist_count),
            "compute_s": float(self.compute_s),
            "comm": {"bytes_sent": float(st.bytes_sent), "bytes_model": float(st.bytes_model),
                     "ops": {str(k): int(n) for k, n in st.ops.items()}, "comm_s": float(st.comm_s),
                     "emulated_s": float(st.emulated_s), "peak_bytes": float(self.peak_bytes)},
            "parameter_server": None if self._ps is None else {
                "z": self._ps.server_value() if self.rank == self._ps.host else None,
                "pulled": self._ps.pulled.clone(), "pushes": int(self._ps.stats.pushes),
                **({} if self._server_rule is None else {"rule": self._ps.locked(self._server_rule.state_dict)})},
            "round_arrivals": [float(a) for a in self._round_arrivals],
            "round_durations": [float(a) for a in self._round_durations],
            "wall_s": (self._t_last - self._t_start) if self._t_start is not None else self._resumed_wall,
            **({} if self._compressed is None else {"compression": self._compressed.state_dict()}),
            "torch_rng_state": torch.get_rng_state(),
            "numpy_rng_state": {
                "bit_generator": str(np_state["bit_generator"]),
                "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                "pos": int(np_state["state"]["pos"]),
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            },
        }
        if self.device.type == "cuda":
            out["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        return wrap_state("distributed", out)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same rank (same spec, model, dtype and options; a different
        inner optimizer is named)."""
        state = unwrap_state(state, "distributed", what="checkpoint.ranks")
        if not isinstance(state, dict) or state.get("version") != _RANK_STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ConfigError.invalid("checkpoint.ranks.version", got, f"expected {_RANK_STATE_VERSION}")
        if int(state["rank"]) != self.rank:
            raise ConfigError.invalid("checkpoint.ranks.rank", state["rank"], f"this is rank {self.rank}")
        self._check_optimizer_settings(state, "checkpoint.ranks")
        self._check_layout(state)
        self.mixer.finalize()
        self._load_compression(state)
        self._load_rows_payload(state, "checkpoint.ranks")
        self._hist = state["loss_history"].numpy().astype(np.float64, copy=True)
        self._hist_count = int(state["loss_count"])
        self.compute_s = float(state["compute_s"])
        st, saved = self.mixer.stats, state["comm"]
        st.bytes_sent = float(saved["bytes_sent"])
        st.bytes_model = float(saved["bytes_model"])
        st.ops = {str(k): int(n) for k, n in saved["ops"].items()}
        st.comm_s = float(saved["comm_s"])
        st.emulated_s = float(saved["emulated_s"])
        self.peak_bytes = float(saved.get("peak_bytes", 0.0))
        if self._ps is not None:
            saved_ps = state["parameter_server"]
            self._ps.load_state(saved_ps["z"], saved_ps["pulled"])
            self._ps.stats.pushes = int(saved_ps["pushes"])
            if self._server_rule is not None:
                rule, saved_rule = self._server_rule, saved_ps.get("rule")
                self._ps.locked(lambda: rule.load_state_dict(saved_rule, "checkpoint.ranks.parameter_server.rule"))
        self._bad = None
        if self.nan_policy == "skip":  # the checkpoint was taken after a health check (finish())
            self._snapshot(self.step_count)
        self._round_arrivals = [float(a) for a in state["round_arrivals"]]
        self._round_durations = [float(a) for a in state["round_durations"]]
        self._resumed_wall = float(state["wall_s"])
        self._t_start = None
        torch.set_rng_state(state["torch_rng_state"])
        nps = state["numpy_rng_state"]
        np.random.set_state({"bit_generator": nps["bit_generator"],
                             "state": {"key": nps["key"].numpy().astype(np.uint32), "pos": int(nps["pos"])},
                             "has_gauss": int(nps["has_gauss"]), "gauss": float(nps["gauss"])})
        if self.device.type == "cuda" and "cuda_rng_state" in state:
            torch.cuda.set_rng_state(state["cuda_rng_state"], self.device)

    def _load_compression(self, state: dict[str, Any]) -> None:
        """The compressed rounds' state of a rank checkpoint (an optional key: absent from uncompressed runs)."""
        load_compression_state(self._compressed, state.get("compression"), field="checkpoint.ranks.compression")

    def _check_layout(self, state: dict[str, Any]) -> None:
        """A rank checkpoint's shapes and dtype against this engine's (before anything is restored)."""
        shape = [self.m, self.v, self.d, self.b, int(self._state.shape[1])]
        if list(state["shape"]) != shape:
            raise ConfigError.invalid("checkpoint.shape", list(state["shape"]),
                                      f"this run has [m, v, d, b, width] = {shape} (model, preset or momentum changed?)")
        if tuple(state["state"].shape) != tuple(self._state.shape) or (state.get("parameter_server") is None) != (self._ps is None):
            raise ConfigError.invalid("checkpoint.state", tuple(state["state"].shape),
                                      f"this run holds {tuple(self._state.shape)} (downpour_order changed between "
                                      f"'async' and 'schedule'?)")
        if state["state"].dtype != self.dtype:
            raise ConfigError.invalid("checkpoint.dtype", str(state["state"].dtype), f"this run uses {self.dtype}")
        if set(state["other_buffers"]) != set(self.other_buffers):
            raise ConfigError.invalid("checkpoint.other_buffers", sorted(state["other_buffers"]),
                                      f"this model has {sorted(self.other_buffers)}")
        hist = state["loss_history"]
        if tuple(hist.shape) != self._hist.shape:
            raise ConfigError.invalid("checkpoint.loss_history", tuple(hist.shape), f"expected ({self.window},) (window)")
