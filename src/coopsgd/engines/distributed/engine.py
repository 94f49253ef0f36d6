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
6. an outer round (DiLoCo, SlowMo: ``spec.outer``): every rank holds z and its outer optimizer's state,
   and after the all-reduce that averages the workers applies the same outer step to it (identical
   inputs, identical result on every rank), then restarts its worker from z.

Given the same seeds and data order (:class:`~coopsgd.data.WorkerLoader`, worker r's batches on rank r)
the parameters after K steps equal the simulator's (float64: to 1e-10; tested). Differences from the
simulator: DOWNPOUR either uses the schedule's seeded push order (``downpour_order="schedule"``),
emulated exactly by one all_gather per round and applied in that order on every rank (deterministic,
equal to the simulator), or runs a real asynchronous parameter server (``downpour_order="async"``,
:mod:`coopsgd.engines.distributed.parameter_server`: z only on rank 0, pushes applied in arrival order, no barrier
between workers -- the default of ``coopsgd run --engine distributed``, whose ``downpour_order="clock"``
means "the order in which pushes arrive"). Non-blocking EASGD is truly asynchronous (``async_op=True``, waited at the next
round). NaN/Inf in a worker's loss or gradient stops that rank with an error naming it; a NaN that
reaches other workers through mixing is detected by them right after the communication round.

The engine implements :class:`coopsgd.engines.base.Engine`; the update itself is the shared round kernel
(:class:`coopsgd.engines.kernel.RoundKernel`) with the collectives of :class:`coopsgd.engines.distributed.communicator.Mixer` as
its communicator. Runs -- the training loop in every rank, run directories, checkpoints, launching -- are
in :mod:`coopsgd.train.distributed` (``coopsgd run --engine distributed``, :func:`run_spec` for tensors)
and :mod:`coopsgd.torchrun` (``torchrun --nproc-per-node N -m coopsgd.torchrun --config run.toml``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from coopsgd.algorithms.inner import OptimizerSettings
from coopsgd.algorithms.schedules import MixContext
from coopsgd.algorithms.spec import AlgorithmSpec
from coopsgd.engines.base import (
    DroppedRound,
    NonFiniteError,
    StepStats,
    unwrap_state,
    wrap_state,
)
from coopsgd.engines.distributed.communicator import Mixer, NetEmulation, aux_placement
from coopsgd.engines.distributed.launch import no_heartbeat
from coopsgd.engines.executors import LoopExecutor
from coopsgd.engines.kernel import RoundKernel
from coopsgd.engines.mixing import plan_round
from coopsgd.engines.optim import SGDOptions, optimizer_settings
from coopsgd.engines.reference import consensus_distance
from coopsgd.engines.rows import ModelRows
from coopsgd.errors import ConfigError, check_float, check_int

__all__ = [
    "DistributedEngine",
    "DistStepStats",
    "communication_table",
    "FAILURE_MODES",
    "FaultHook",
    "fault_hook",
]

log = logging.getLogger(__name__)

#: What an injected fault does (tests): ``raise`` (an exception), ``exit`` (``os._exit(3)``), ``kill``
#: (SIGKILL itself), ``term`` (SIGTERM itself), ``stop`` (SIGSTOP itself: frozen until SIGCONT), ``hang``
#: (sleep forever) or ``nan`` (that step's loss and gradient become NaN on that rank).
FAILURE_MODES = ("raise", "exit", "kill", "hang", "term", "stop", "nan")
_DOWNPOUR_ORDERS = ("schedule", "async")
_RANK_STATE_VERSION = 2  # 2: the schedule's run state ("schedule_state")

Batch = tuple[Tensor, Tensor]

#: The distributed engine's step record is the engines' common one (``losses`` holds this rank's worker only).
DistStepStats = StepStats

#: ``fault(rank, step) -> None | "nan"``: called at the start of every step (tests inject failures with it).
FaultHook = Callable[[int, int], "str | None"]


def fault_hook(rank: int, step: int, mode: str, *, once_file: str | Path | None = None) -> FaultHook:
    """A :data:`FaultHook` that makes ``rank`` fail at the start of ``step`` in one of :data:`FAILURE_MODES`.

    With ``once_file`` the fault happens once: the file marks it as done (a restarted run gets past it).
    """
    if mode not in FAILURE_MODES:
        raise ConfigError.invalid("mode", mode, f"choose one of {', '.join(FAILURE_MODES)}")

    def hook(r: int, k: int) -> str | None:
        if r != rank or k != step:
            return None
        if once_file is not None:
            marker = Path(once_file)
            if marker.exists():
                return None
            marker.write_text(f"rank {r} step {k} {mode}\n")
        log.warning("rank %d: injected failure %r at step %d", r, mode, k)
        if mode == "nan":
            return "nan"
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank {r} at step {k}")
        if mode == "exit":
            sys.stderr.flush()
            os._exit(3)
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "term":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # the default SIGTERM action ends the process before this returns
        if mode == "stop" and hasattr(signal, "SIGSTOP"):
            os.kill(os.getpid(), signal.SIGSTOP)  # continued (SIGCONT) only to be terminated
        while True:  # hang
            time.sleep(3600)

    return hook


class DistributedEngine(ModelRows):
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
        if not isinstance(spec, AlgorithmSpec):
            raise ConfigError.invalid("spec", spec, "must be an AlgorithmSpec (see coopsgd.algorithms.presets)")
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError.invalid("process group", None, "call torch.distributed.init_process_group first")
        self.rank = dist.get_rank()
        world = dist.get_world_size()
        if world != spec.workers:
            raise ConfigError.invalid("workers", spec.workers, f"must equal the world size ({world}): one rank per worker")
        if downpour_order not in _DOWNPOUR_ORDERS:
            raise ConfigError.invalid("downpour_order", downpour_order, f"choose one of {', '.join(_DOWNPOUR_ORDERS)}")
        self.asynchronous = downpour_order == "async"
        if self.asynchronous and not spec.schedule.sequential:
            raise ConfigError.invalid("downpour_order", downpour_order, "'async' needs a schedule whose rounds are "
                                      "sequential pushes to a server (DOWNPOUR)")
        if self.asynchronous and torch.device(device).type != "cpu":
            raise ConfigError.invalid("downpour_order", downpour_order, "the asynchronous parameter server runs on "
                                      "CPU tensors with gloo; use downpour_order='schedule' on GPUs")
        if self.asynchronous and nan_policy == "skip":
            raise ConfigError.invalid("nan_policy", nan_policy, "'skip' cannot roll back an asynchronous parameter "
                                                                "server; use 'stop' or downpour_order='schedule'")
        if fault is not None and not callable(fault):
            raise ConfigError.invalid("fault", fault, "must be callable as fault(rank, step)")
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
        self._kernel = RoundKernel(spec, self.opts, b, d, 1, self.mixer, outer=self.outer)
        self._ps = None
        if self.asynchronous:
            from coopsgd.engines.distributed.parameter_server import AsyncParameterServer

            lo, hi = self._kernel.cols
            self._aux_fill = self._state[0].clone()  # an auxiliary's columns that are not mixed: initial values
            if self.opts.fields:
                self._aux_fill[b + d :] = 0.0
            self._ps = AsyncParameterServer(self._state[0, lo:hi].clone(), host=0, net=net, heartbeat=self.heartbeat)

        # -- estimates and timing ------------------------------------------------------------------------
        self._hist = np.full(self.window, np.nan)
        self._hist_count = 0
        self.compute_s = 0.0
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

    def aux_params(self, j: int = 0) -> Tensor:
        """Auxiliary node ``j``'s parameters on a rank that holds it (completes a pending round first)."""
        j = check_int("j", j, minimum=0, maximum=max(self.v - 1, 0))
        if self.asynchronous:
            raise ConfigError.invalid("j", j, "with an asynchronous server use gather_state() or center_row()")
        if not self.mixer.holds(j):
            raise ConfigError.invalid("j", j, f"auxiliary {j} is held by ranks {self.aux_holders(j)}, "
                                              f"not by rank {self.rank} (gather_state() collects every node)")
        self.mixer.finalize()
        return self._state[1 + j, self.b : self.b + self.d]

    def aux_host(self, j: int) -> int:
        """The designated host rank of auxiliary ``j`` (see :func:`coopsgd.engines.distributed.communicator.aux_placement`)."""
        if self.asynchronous:  # z on rank 0, worker i's last pull on rank i
            return 0 if j == 0 else j - 1
        return self.mixer.host(j)

    def aux_holders(self, j: int) -> list[int]:
        """The ranks that hold (and update) auxiliary ``j``."""
        h = self.mixer.holders
        return list(range(self.m)) if h is None else list(h[j])

    def _zero_aux_momentum(self) -> None:
        self._kernel.zero_aux_momentum(self._state)

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

    def center_node(self) -> int | None:
        """The centre's node (:meth:`AlgorithmSpec.center_node`); collective before LSGD's first election."""
        return self._center_row()

    def center_model(self) -> nn.Module:
        """The centre model as a new module on every rank (collective)."""
        return self.export(self.center_row())

    def average_model(self) -> nn.Module:
        """u_k over all m+v nodes as a new module on every rank (collective)."""
        return self.export(self.average_row())

    def consensus_distance(self) -> float:
        """||X (I - J)||_F^2 / m over all m+v nodes (collective)."""
        return consensus_distance(self.gather_params().detach().to("cpu", torch.float64).numpy(), self.m)

    def reduce_losses(self, sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-worker loss sums and counts of every rank (collective: each rank holds its worker's entry)."""
        t = torch.tensor(np.stack([sums, counts]), dtype=torch.float64)
        dist.all_reduce(t)
        return t[0].numpy(), t[1].numpy()

    def time_record(self, *, local: bool = False) -> dict[str, Any]:
        """Bytes and time so far in the metric schema's names: measured (no simulated clock here).

        ``bytes_sent`` is summed over the ranks (collective) unless ``local``; the measured compute and
        communication seconds are this rank's."""
        sent = float(self.mixer.stats.bytes_sent)
        if not local:
            t = torch.tensor([sent], dtype=torch.float64)
            dist.all_reduce(t)
            sent = float(t[0])
        return {"bytes_sent": sent, "simulated_time_s": None, "simulated_compute_s": None,
                "simulated_communication_s": None, "simulated_idle_s": None,
                "measured_compute_s": float(self.compute_s), "measured_communication_s": float(self.mixer.stats.comm_s)}

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
        return NonFiniteError(
            f"non-finite {what} on worker {self.rank} at step {k}: the run diverged "
            f"(try a smaller learning rate, or for EASGD alpha < 2/(m+1))"
        )

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
        res = None
        probe = None
        with torch.no_grad():
            if spec.needs_losses and self.loss_estimate == "probe":
                assert self._probe is not None
                probe = float(self._executor.evaluate(self._probe)[0])
                if not math.isfinite(probe):
                    raise self._nonfinite("probe loss", k)
        loss = math.nan
        if active:
            assert batch is not None
            res = self._executor.compute([self._to_batch(batch)], None)
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
                        log.warning("rank %d: non-finite %s at step %d; the round will be dropped", r, what, k)
                    res = None  # this worker stops updating until the round
                    loss = math.nan
            if self._bad is not None:  # already bad since an earlier step: do not update
                res = None
        est, hist, count = (math.nan, self._hist, self._hist_count)
        if spec.needs_losses:
            est, hist, count = self._estimate(loss, probe)
        self.compute_s += time.perf_counter() - t0

        arrived: float | None = None
        comm0 = self.mixer.stats.comm_s
        losses = None
        if self._needs_losses(k):
            self.heartbeat(k, "comm")
            arrived = time.time()
            losses = self.mixer.gather_floats(est)[:, 0]
        ps_round = self.asynchronous and (k + 1) % spec.tau == 0
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
        communicated = ps_round or (mix is not None and mix.communicates)
        if arrived is not None:
            self._round_arrivals.append(arrived)
            self._round_durations.append(self.mixer.stats.comm_s - comm0)
        self._hist, self._hist_count = hist, count
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
        losses_out[r] = loss
        return StepStats(
            step=k, lr=lr, losses=losses_out, communicated=communicated, round=self.rounds,
            pattern="parameter_server" if ps_round else (None if mix is None else mix.pattern), info=info,
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

    def _async_aux_rows(self, which: list[int]) -> Tensor:
        """Rows of auxiliaries ``which`` (0: z on rank 0; 1+i: worker i's last pull) on every rank (collective)."""
        assert self._ps is not None
        lo, hi = self._kernel.cols
        buf = torch.zeros((len(which), self._state.shape[1]), dtype=self.dtype, device=self.device)
        for n, a in enumerate(which):
            owner = 0 if a == 0 else a - 1
            if owner == self.rank:
                buf[n].copy_(self._aux_fill)
                buf[n, lo:hi] = self._ps.server_value() if a == 0 else self._ps.pulled
        dist.all_reduce(buf)  # one contributor per row: exact
        return buf

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
        self._good = {
            "state": self._state.clone(),
            "other": {k: t.clone() for k, t in self.other_buffers.items()},
            "mom_init": self._mom_init.clone(),
            "optimizer": self._optimizer_snapshot(),
        }
        self._good_step = int(done)

    def _restore(self) -> None:
        self.mixer.finalize()
        assert self._good is not None
        with torch.no_grad():
            self._state.copy_(self._good["state"])
            for k, t in self._good["other"].items():
                self.other_buffers[k].copy_(t)
            self._mom_init.copy_(self._good["mom_init"])
            self._optimizer_restore(self._good["optimizer"])

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

        Holds the worker's and the replicated auxiliaries' rows (buffers, parameters, momentum), the
        momentum flag, integer buffers, counters, schedule and leader state, the loss-estimate history,
        the RNG states and the communication / timing counters. A pending non-blocking round must have
        been completed (:meth:`finish`, a collective) before.
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
            "state": self._state.detach().to("cpu", copy=True),
            "other_buffers": {k: t.detach().to("cpu", copy=True) for k, t in self.other_buffers.items()},
            "momentum_initialized": self._mom_init.to("cpu", copy=True),
            "step": self.step_count,
            "rounds": self.rounds,
            "leader": self.leader,
            "schedule_state": json.dumps(self.schedule_state),
            "loss_history": torch.from_numpy(self._hist.astype(np.float64, copy=True)),
            "loss_count": int(self._hist_count),
            "compute_s": float(self.compute_s),
            "comm": {"bytes_sent": float(st.bytes_sent), "bytes_model": float(st.bytes_model),
                     "ops": {str(k): int(n) for k, n in st.ops.items()}, "comm_s": float(st.comm_s),
                     "emulated_s": float(st.emulated_s)},
            "parameter_server": None if self._ps is None else {
                "z": self._ps.server_value() if self.rank == self._ps.host else None,
                "pulled": self._ps.pulled.clone(), "pushes": int(self._ps.stats.pushes)},
            "round_arrivals": [float(a) for a in self._round_arrivals],
            "round_durations": [float(a) for a in self._round_durations],
            "wall_s": (self._t_last - self._t_start) if self._t_start is not None else self._resumed_wall,
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
        out.update(self._optimizer_payload())
        return wrap_state("distributed", out)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` of the same rank (same spec, model, dtype and options)."""
        state = unwrap_state(state, "distributed", what="checkpoint.ranks")
        if not isinstance(state, dict) or state.get("version") != _RANK_STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ConfigError.invalid("checkpoint.ranks.version", got, f"expected {_RANK_STATE_VERSION}")
        if int(state["rank"]) != self.rank:
            raise ConfigError.invalid("checkpoint.ranks.rank", state["rank"], f"this is rank {self.rank}")
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
        hist = state["loss_history"].numpy()
        if hist.shape != self._hist.shape:
            raise ConfigError.invalid("checkpoint.loss_history", tuple(hist.shape), f"expected ({self.window},) (window)")
        self.mixer.finalize()
        with torch.no_grad():
            self._state.copy_(state["state"])
            for k, t in state["other_buffers"].items():
                self.other_buffers[k].copy_(t)
            self._mom_init.copy_(state["momentum_initialized"])
            self._load_optimizer_payload(state, "checkpoint.ranks")
        self.step_count = int(state["step"])
        self.rounds = int(state["rounds"])
        self.leader = None if state["leader"] is None else int(state["leader"])
        self.schedule_state = json.loads(state["schedule_state"])
        self._hist = hist.astype(np.float64, copy=True)
        self._hist_count = int(state["loss_count"])
        self.compute_s = float(state["compute_s"])
        st, saved = self.mixer.stats, state["comm"]
        st.bytes_sent = float(saved["bytes_sent"])
        st.bytes_model = float(saved["bytes_model"])
        st.ops = {str(k): int(n) for k, n in saved["ops"].items()}
        st.comm_s = float(saved["comm_s"])
        st.emulated_s = float(saved["emulated_s"])
        if self._ps is not None:
            saved_ps = state["parameter_server"]
            self._ps.load_state(saved_ps["z"], saved_ps["pulled"])
            self._ps.stats.pushes = int(saved_ps["pushes"])
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

    # ------------------------------------------------------------------------------------------------
    # collective views (call on every rank)
    # ------------------------------------------------------------------------------------------------
    def finish(self) -> None:
        """Complete any pending non-blocking round (the end of a run waits for the last one)."""
        if self.mixer.pending:
            self.mixer.finalize()
            self._t_last = time.perf_counter()

    def gather_state(self) -> Tensor:
        """(m+v, width) stacked state of every node -- workers then auxiliaries -- on every rank (collective)."""
        self.mixer.finalize()
        row = self._state[0].contiguous()
        out = torch.empty(self.m * row.numel(), dtype=row.dtype, device=row.device)
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, row)
        if self.asynchronous:
            aux = self._async_aux_rows(list(range(self.v)))
        else:
            aux = self.mixer.collect_aux(self._state[1:])
        return torch.cat([out.view(self.m, -1), aux], dim=0)

    def gather_params(self) -> Tensor:
        """(m+v, d) parameters of every node on every rank (collective)."""
        return self.gather_state()[:, self.b : self.b + self.d]

    def _center_row(self) -> int | None:
        """The centre's node (:meth:`AlgorithmSpec.center_node`); collective before LSGD's first election."""
        estimates = None
        if self.spec.center == "leader" and self.leader is None:
            if self._probe is not None:
                mine = float(self._executor.evaluate(self._probe)[0])
            else:
                vals = self._hist[np.isfinite(self._hist)]
                mine = float(vals.mean()) if vals.size else math.nan
            estimates = self.mixer.gather_floats(mine)[:, 0]
        return self.spec.center_node(self.leader, estimates)

    def center_row(self) -> Tensor:
        """The centre model's ``[buffers | params]`` row: workers' average, auxiliary 0, or the leader (collective)."""
        self.mixer.finalize()
        w = self.b + self.d
        row = self._center_row()
        if row is None:
            t = self._state[0, :w].clone()
            dist.all_reduce(t)
            return t / self.m
        if row >= self.m:
            a = row - self.m
            if self.asynchronous:
                return self._async_aux_rows([a])[0, :w]
            t = self._state[1 + a, :w].clone()
            if self.mixer.placed:
                dist.broadcast(t, src=self.mixer.host(a))
            return t
        t = self._state[0, :w].clone()
        dist.broadcast(t, src=row)
        return t

    def average_row(self) -> Tensor:
        """u_k = mean over all m+v nodes ([CSGD] eq. (13)) as a ``[buffers | params]`` row (collective)."""
        self.mixer.finalize()
        w = self.b + self.d
        t = self._state[0, :w].clone()
        if self.asynchronous:
            aux = self._async_aux_rows(list(range(self.v)))[:, :w].sum(dim=0)  # on every rank: add it once
            if self.rank == 0:
                t += aux
        else:
            for a in range(self.v):  # each auxiliary counted once, by its host
                if self.mixer.host(a) == self.rank:
                    t += self._state[1 + a, :w]
        dist.all_reduce(t)
        return t / (self.m + self.v)

    def export(self, row: Tensor) -> nn.Module:
        """A new module (eval mode) holding the ``[buffers | params]`` row (integer buffers: this worker's)."""
        module = copy.deepcopy(self.template)
        others = {k: v[0] for k, v in self.other_buffers.items()}
        module = self.layout.load_into(module, row[self.b : self.b + self.d], row[: self.b], others).eval()
        return module.to("cpu")

    def timing(self) -> dict[str, Any]:
        """Per-rank compute / communication / idle seconds and bytes, for every rank (collective).

        Idle time is the wait for the slowest rank at each round: ``min(time in the round, latest arrival
        - own arrival)`` (arrivals from the machine clock, so exact on one machine, approximate across
        machines with skewed clocks); communication is the rest of the time spent in collectives.
        """
        self.finish()
        R = len(self._round_arrivals)
        gathered: list[Any] = [None] * self.m
        dist.all_gather_object(gathered, list(self._round_arrivals))
        if len({len(g) for g in gathered}) != 1:
            raise RuntimeError(f"ranks recorded different numbers of rounds: {[len(g) for g in gathered]}")
        A = np.asarray(gathered, dtype=np.float64).reshape(self.m, R)
        dur = np.asarray(self._round_durations)
        idle = float(np.minimum(dur, A.max(axis=0) - A[self.rank]).clip(min=0).sum()) if R else 0.0
        st = self.mixer.stats
        wall = (self._t_last - self._t_start) if self._t_start is not None else 0.0
        mine = {
            "rank": self.rank,
            "wall_s": wall,
            "compute_s": self.compute_s,
            "communication_s": max(st.comm_s - idle, 0.0),
            "idle_s": idle,
            "emulated_delay_s": st.emulated_s,
            "bytes_sent": st.bytes_sent,
            "bytes_model": st.bytes_model,
            "rounds": self.rounds,
            "ops": dict(st.ops),
        }
        table: list[Any] = [None] * self.m
        dist.all_gather_object(table, mine)
        return {"ranks": table, **_aggregate(table)}


def _aggregate(table: list[dict[str, Any]]) -> dict[str, Any]:
    wall = max(t["wall_s"] for t in table)
    mean = {k: float(np.mean([t[k] for t in table])) for k in ("compute_s", "communication_s", "idle_s")}
    return {
        "wall_s": wall,
        **mean,
        "bytes_sent": float(sum(t["bytes_sent"] for t in table)),
        "bytes_model": float(table[0]["bytes_model"]),
        "communication_fraction": mean["communication_s"] / wall if wall > 0 else 0.0,
        "idle_fraction": mean["idle_s"] / wall if wall > 0 else 0.0,
        "compute_fraction": mean["compute_s"] / wall if wall > 0 else 0.0,
    }


def communication_table(rows: dict[str, dict[str, Any]]) -> str:
    """A text table like [LSGD] Table 6: per run, the % of wall-clock spent computing / communicating / idle."""
    lines = [f"{'run':<28} {'compute %':>10} {'comm %':>8} {'idle %':>8} {'wall s':>8} {'MB sent':>9}"]
    for name, t in rows.items():
        lines.append(
            f"{name:<28} {100 * t['compute_fraction']:>10.1f} {100 * t['communication_fraction']:>8.1f} "
            f"{100 * t['idle_fraction']:>8.1f} {t['wall_s']:>8.2f} {t['bytes_sent'] / 1e6:>9.2f}"
        )
    return "\n".join(lines)
